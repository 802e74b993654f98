"""What surgery did to a model: a typed record kept on the model, read with `surgeon.edits(model)`.

The record holds the base model's reference (how to rebuild it), the input size it was patched or
trained at, one `EditRecord` per inserted module, and the verification of the last `add`. It lives in
the model's `__dict__` (so copies of the model carry it, and it never shows in the state dict); this
module is the only code that touches it. Recipes (`recipe.json`) are its JSON form.
"""
from __future__ import annotations

import copy
from dataclasses import asdict, dataclass, field, fields
from typing import Any

ATTR = "_surgeon"


@dataclass(frozen=True)
class EditRecord:
    """One inserted module.

    site: the site's name; kind: its kind; shape: the tensor shape there (example batch first);
    attention, options, init: what was inserted; module: the inserted module's path in the model;
    owner: the module whose forward was rewritten to call it ('' for the root; equal to `module` when
    the inserted module took the place of a stateless layer); params, flops: what it adds;
    step: which `add` call made it (a recipe replays each step as one plan).
    """

    site: str
    attention: str
    kind: str | None = None
    shape: tuple[int, ...] = ()
    options: dict[str, Any] = field(default_factory=dict)
    init: str = "identity"
    module: str = ""
    owner: str = ""
    params: int = 0
    flops: int = 0
    step: int = 0

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["shape"] = list(self.shape)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> EditRecord:
        known = {f.name for f in fields(cls)}
        d = {k: v for k, v in d.items() if k in known}
        if "shape" in d:
            d["shape"] = tuple(d["shape"] or ())
        return cls(**d)


def _raw(model) -> dict[str, Any] | None:
    return model.__dict__.get(ATTR) if model is not None else None


def ensure(model) -> dict[str, Any]:
    """The model's own record, created when missing (never one shared with another model object)."""
    rec = _raw(model)
    if rec is None:
        rec = {"model": None, "input_size": None, "edits": [], "verification": None}
        model.__dict__[ATTR] = rec
    return rec


def detach(model, source) -> dict[str, Any]:
    """Give `model` its own copy of `source`'s record (a patched copy must not share its original's)."""
    rec = copy.deepcopy({k: v for k, v in (_raw(source) or {}).items() if k != "verification"})
    rec.setdefault("model", None), rec.setdefault("input_size", None), rec.setdefault("edits", [])
    rec.setdefault("example_input", None)
    rec["verification"] = None
    model.__dict__[ATTR] = rec
    return rec


def edits(model) -> list[EditRecord]:
    """The edits surgery made to `model`, in order ([] for a model surgery never touched).

    Example:
        >>> [(e.site, e.attention, e.module) for e in surgeon.edits(patched)]
        [('layer1.0', 'cbam', 'layer1.0.cbam'), ...]
    """
    rec = _raw(model)
    return [EditRecord.from_dict(e) for e in (rec or {}).get("edits", [])]


CONFIG_KEY = "surgeon"  # the recipe in a Hugging Face model's config (see `sync_config`)
HF_CONFIG = "config.json"  # a Hugging Face save_pretrained folder's config
FORMAT = "surgeon.recipe"  # a recipe's `format` and `version` (see recipe.validate)
FORMAT_VERSION = 1


def versions() -> dict[str, str]:
    """The versions a recipe is written with: surgeon's, torch's and timm's (read without importing timm)."""
    import sys
    from importlib.metadata import version

    import torch

    return {"surgeon": sys.modules["surgeon"].__version__, "torch": torch.__version__, "timm": version("timm")}


def recipe(model, reference: dict[str, Any] | None) -> dict[str, Any]:
    """The recipe of a patched model whose base model `reference` names (see `checkpoint.recipe_of`)."""
    from pathlib import Path

    reference = copy.deepcopy(reference)
    if reference and reference.get("weights"):
        # the base's weights file is named, not pointed to: paths in a recipe stay inside its folder
        reference["weights"] = Path(reference["weights"]).name
    size = input_size(model)
    return {"format": FORMAT, "version": FORMAT_VERSION, "model": reference,
            "input_size": list(size) if size else None, "edits": [e.to_dict() for e in edits(model)],
            **({"example_input": input_spec(ex)} if (ex := example_input(model)) else {}),
            **({"merged": done} if (done := merged(model)) else {}),
            **({"folded_bn": pairs} if (pairs := folded_bn(model)) else {}),
            "versions": versions()}


def holds_recipe(folder) -> bool:
    """Whether a folder is a surgeon save: a `recipe.json`, or a Hugging Face save whose config.json carries a
    recipe (see `sync_config`)."""
    import json
    from pathlib import Path

    from surgeon.outputs import MARKER

    folder = Path(folder)
    if (folder / MARKER).is_file():
        return True
    try:
        config = json.loads((folder / HF_CONFIG).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(config, dict) and isinstance(config.get(CONFIG_KEY), dict)


def sync_config(model) -> None:
    """Put the model's recipe in its Hugging Face config (`config.surgeon`), so that `save_pretrained` (and a
    Trainer's checkpoints) write it into config.json and `surgeon.load` can rebuild the patched model from that
    folder. Other models are left alone."""
    from surgeon import hf

    if not hf.is_hf(model) or getattr(model, "config", None) is None:
        return
    setattr(model.config, CONFIG_KEY, recipe(model, base(model)))  # a transformers model's base is always known


def add_edits(model, records: list[EditRecord]) -> None:
    ensure(model)["edits"].extend(r.to_dict() for r in records)
    sync_config(model)


def base(model) -> dict[str, Any] | None:
    """How to rebuild the model before surgery: {'ref', 'args', 'pretrained', 'weights'} or None."""
    return copy.deepcopy((_raw(model) or {}).get("model"))


def set_base(model, spec: dict[str, Any] | None) -> None:
    ensure(model)["model"] = copy.deepcopy(spec)


def input_size(model) -> tuple[int, ...] | None:
    size = (_raw(model) or {}).get("input_size")
    return tuple(size) if size else None


def set_input_size(model, size) -> None:
    ensure(model)["input_size"] = list(size) if size else None


_SMALL = 4096  # integer inputs up to this many values (token ids, lengths) are kept as they are


def input_spec(inputs: tuple) -> list[dict[str, Any]] | None:
    """A JSON form of example inputs that several tensors, integer inputs (token ids, lengths) and masks need
    to be rebuilt exactly enough: each tensor's shape and dtype, and the values of small integer or bool
    tensors. None when an input is not a tensor (a list of images): the input size then has to do."""
    import torch

    spec = []
    for x in inputs:
        if not isinstance(x, torch.Tensor):
            return None
        item: dict[str, Any] = {"shape": list(x.shape), "dtype": str(x.dtype).removeprefix("torch.")}
        if not x.is_floating_point() and x.numel() <= _SMALL:
            item["values"] = x.flatten().tolist()
        spec.append(item)
    return spec


def inputs_from_spec(spec: list[dict[str, Any]]) -> tuple:
    """Example inputs rebuilt from `input_spec` (floating inputs are fresh random values of that shape)."""
    import torch

    gen = torch.Generator().manual_seed(0)
    out = []
    for item in spec:
        dtype = getattr(torch, item["dtype"])
        if "values" in item:
            out.append(torch.tensor(item["values"], dtype=dtype).reshape(item["shape"]))
        elif dtype.is_floating_point:
            out.append(torch.randn(*item["shape"], generator=gen).to(dtype))
        else:
            out.append(torch.zeros(item["shape"], dtype=dtype))
    return tuple(out)


def example_input(model) -> tuple | None:
    """The example inputs the model was patched with, when they were recorded (see `input_spec`)."""
    spec = (_raw(model) or {}).get("example_input")
    return inputs_from_spec(spec) if spec else None


def set_example_input(model, inputs: tuple) -> None:
    ensure(model)["example_input"] = input_spec(inputs)


def verification(model):
    """The verification of the last `add` on this model (a `surgery.verify.Verification`), or None."""
    return (_raw(model) or {}).get("verification")


def set_verification(model, v) -> None:
    ensure(model)["verification"] = v


def merged(model) -> list[str]:
    """The gates `surgeon.merge` removed from this model (their module paths), in order."""
    return list((_raw(model) or {}).get("merged") or [])


def set_merged(model, paths: list[str]) -> None:
    ensure(model)["merged"] = list(paths)
    sync_config(model)


def folded_bn(model) -> list[list[str]]:
    """The (conv, BatchNorm) pairs `surgeon.merge(fold_bn=True)` folded in this model, in order."""
    return [list(p) for p in (_raw(model) or {}).get("folded_bn") or []]


def set_folded_bn(model, pairs: list) -> None:
    ensure(model)["folded_bn"] = [list(p) for p in pairs]
    sync_config(model)


def set_edit_shapes(model, shapes: dict[str, tuple]) -> None:
    """Update the recorded site shapes ({site: shape}), e.g. after training at another input size."""
    for e in ensure(model)["edits"]:
        if e["site"] in shapes:
            e["shape"] = list(shapes[e["site"]])
