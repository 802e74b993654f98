"""How to rebuild a model a library built, read from the model itself, so that a saved surgery loads without
`base=`: timm's `pretrained_cfg`, a transformers model's class and config, and the torchvision builder whose
architecture matches the model's (found by building the candidates on the meta device: no memory, no
weights). None when it cannot be known; loading then asks for `base=`.
"""
from __future__ import annotations

import inspect
import logging
from typing import Any

log = logging.getLogger("surgeon")


def library_reference(model, *, search: bool = True) -> dict[str, Any] | None:
    """{"ref", "args", "pretrained", "weights"} rebuilding `model`'s architecture, or None.

    Args:
        search: also identify torchvision models by building candidate builders on the meta device (a
            second or so; the other libraries say what they built). A patched model's inserted modules
            (its edit records) are left out of the comparison.
    """
    from surgeon import hf

    if hf.is_hf(model):
        return _transformers(model)
    cls = getattr(type(model), "_surgeon_base", type(model))
    if cls.__module__.startswith("timm."):
        return _timm(model)
    if search and cls.__module__.startswith("torchvision.models"):
        return _torchvision(model, cls)
    return None


def _reference(ref: str, args: dict[str, Any]) -> dict[str, Any]:
    return {"ref": ref, "args": args, "pretrained": False, "weights": None}


def _transformers(model) -> dict[str, Any] | None:
    """`hf:ClassName` and the config values that differ from the config class's defaults."""
    import json

    import transformers

    name = type(model).__name__
    if getattr(transformers, name, None) is not type(model):
        return None
    from surgeon.record import CONFIG_KEY

    config = json.loads(model.config.to_json_string(use_diff=True))
    config.pop(CONFIG_KEY, None)  # the recipe of a patched model (see record.sync_config), not the base's config
    return _reference(f"hf:{name}", {"config": config})


def _timm(model) -> dict[str, Any] | None:
    cfg = getattr(model, "pretrained_cfg", None)
    arch = cfg.get("architecture") if isinstance(cfg, dict) else None
    if not arch:
        return None
    args: dict[str, Any] = {}
    if isinstance(getattr(model, "num_classes", None), int):
        args["num_classes"] = model.num_classes
    return _reference(arch, args)


def _shapes(model) -> dict[str, tuple]:
    """Every state-dict key with its shape, without the modules surgery inserted."""
    from surgeon import record

    added = tuple(e.module + "." for e in record.edits(model))
    return {k: tuple(v.shape) for k, v in model.state_dict().items() if not k.startswith(added)}


def _settings(model) -> dict[str, Any]:
    """The plain number, string and tuple attributes of every module (sizes, strides, flags), without the
    modules surgery inserted."""
    from surgeon import record

    simple = (bool, int, float, str)
    added = tuple(e.module for e in record.edits(model))
    return {f"{path}.{k}": v for path, m in model.named_modules() for k, v in vars(m).items()
            if not any(path == a or path.startswith(a + ".") for a in added)
            and not k.startswith("_") and k != "training" and (isinstance(v, simple) or (
                isinstance(v, tuple) and all(isinstance(x, simple) for x in v)))}


def _torchvision(model, cls: type) -> dict[str, Any] | None:
    import torch
    from torchvision.models import get_model_builder, list_models

    own = _shapes(model)

    def build(builder, args: dict[str, Any]):
        params = inspect.signature(builder).parameters
        extra = {"weights_backbone": None} if "weights_backbone" in params else {}
        try:
            with torch.device("meta"):
                return builder(weights=None, **args, **extra)
        except Exception as exc:  # noqa: BLE001 - a builder refusing these arguments is not the one
            log.debug("torchvision builder %s %s: not built (%s)", builder.__name__, args, exc)
            return None

    found = []
    for name in list_models():
        builder = get_model_builder(name)
        if inspect.signature(builder).return_annotation is not cls:
            continue
        candidate = build(builder, {})
        shapes = _shapes(candidate) if candidate is not None else {}
        if set(shapes) != set(own):  # another architecture
            continue
        if shapes == own:
            found.append((_reference(f"tv:{name}", {}), candidate))
            continue
        # the same layers with other sizes: another number of classes, read off the sizes that differ
        for n in sorted({own[k][0] for k in own if own[k] != shapes[k] and own[k]}):
            candidate = build(builder, {"num_classes": n})
            if candidate is not None and _shapes(candidate) == own:
                found.append((_reference(f"tv:{name}", {"num_classes": n}), candidate))
                break
    # the same weights may come with other settings (a detector's input size): those must match too, or the
    # rebuilt model would compute something else
    mine = _settings(model)
    found = [f for f in found if _settings(f[1]) == mine]
    if len(found) == 1:
        return found[0][0]
    log.debug("torchvision %s: %d builders match its architecture; base not recorded", cls.__name__, len(found))
    return None


__all__ = ["library_reference"]
