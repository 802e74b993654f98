"""surgeon: retrofit attention into existing PyTorch models.

    import surgeon
    model = surgeon.add(model, "cbam")            # any nn.Module; identity at init
    print(surgeon.plan("resnet50", "se"))         # what would change, before anything does
    surgeon.sites(model, kind="residual")         # where attention can go

Heavy imports (torch, timm) happen on first use, so `import surgeon` stays cheap.
"""
from __future__ import annotations

from typing import Any

from surgeon.errors import SurgeonError
from surgeon.hookspecs import hookimpl

__version__ = "0.1.0"

_API = {"add", "plan", "sites", "attentions", "example_inputs", "verify_model", "Plan", "Edit"}
_CHECKPOINT = {"save", "load", "summary"}
_RECIPE = {"replay"}
_FINETUNE = {"finetune", "evaluate", "FinetuneConfig"}
_MERGING = {"merge", "merge_plan"}  # the module is `merging`: a submodule `merge` would shadow the function


def __getattr__(name: str) -> Any:
    if name in _API:
        from surgeon import api

        return getattr(api, name)
    if name in _CHECKPOINT:
        from surgeon import checkpoint

        return getattr(checkpoint, name)
    if name in _RECIPE:
        from surgeon import recipe

        return getattr(recipe, name)
    if name in _FINETUNE:  # the module is `training`: a submodule named `finetune` would shadow the function
        from surgeon import training

        return getattr(training, name)
    if name in _MERGING:
        from surgeon import merging

        return getattr(merging, name)
    if name in ("capture", "gates", "Capture", "GateStat"):
        from surgeon import viz

        return getattr(viz, name)
    if name == "maps":  # the module is `pictures`: a submodule `maps` would shadow the function
        from surgeon.pictures import maps

        return maps
    if name in ("edits", "EditRecord"):
        from surgeon import record

        return getattr(record, name)
    if name == "data":
        import surgeon.data as data

        return data
    if name == "plugin":  # what plugin authors import: `from surgeon.plugin import hookimpl, feature_map`
        import surgeon.plugin as plugin

        return plugin
    if name == "export_model":  # not `export`: that name is the submodule surgeon.export
        from surgeon.export import export

        return export
    if name == "load_model":
        from surgeon.models import load

        return load
    raise AttributeError(f"module 'surgeon' has no attribute {name!r}")


__all__ = ["add", "plan", "edits", "EditRecord", "sites", "attentions", "save", "load", "load_model", "replay",
           "summary", "export_model", "merge", "merge_plan", "capture", "gates", "Capture", "GateStat", "maps",
           "finetune", "evaluate", "FinetuneConfig", "hookimpl",
           "SurgeonError",
           "__version__"]
