"""Save a patched model: DIR/recipe.json (base model reference, edits, versions) + DIR/model.safetensors.

Writes are atomic: everything goes to a temporary folder beside DIR, renamed into place at the end,
so a failure never leaves a half-written DIR.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from surgeon.errors import SurgeonError

RECIPE = "recipe.json"
WEIGHTS = "model.safetensors"
FORMAT = "surgeon.recipe"
FORMAT_VERSION = 1


def versions() -> dict[str, str]:
    import timm
    import torch

    import surgeon

    return {"surgeon": surgeon.__version__, "torch": torch.__version__, "timm": timm.__version__}


def recipe_of(model) -> dict[str, Any]:
    """The recipe of a patched model: base model reference, input size, edits, versions."""
    from surgeon.surgery.rewrite import RECORD_ATTR

    rec = model.__dict__.get(RECORD_ATTR) or {"model": None, "input_size": None, "edits": []}
    return {"format": FORMAT, "version": FORMAT_VERSION, "model": rec.get("model"),
            "input_size": rec.get("input_size"), "edits": rec.get("edits", []), "versions": versions()}


def save(model, directory: str | os.PathLike, *, force: bool = False) -> Path:
    """Write `recipe.json` and `model.safetensors` for a (patched) model into `directory`, atomically.

    Args:
        force: replace `directory` when it exists.

    Raises:
        SurgeonError: `directory` exists and force is False.

    Example:
        >>> surgeon.save(surgeon.add("resnet50", "cbam"), "out/cbam-r50")
    """
    from safetensors.torch import save_model

    target = Path(directory)
    if target.exists() and not force:
        raise SurgeonError(f"Output folder {str(target)!r} exists; pass --force (force=True) to replace it")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        (tmp / RECIPE).write_text(json.dumps(recipe_of(model), indent=2) + "\n")
        save_model(model, str(tmp / WEIGHTS))
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target
