"""What fine-tuning reads from and writes to a model's surgery record: the input size it was trained at
and the base model's constructor arguments (a replaced head's `num_classes`).

NOTE: the only place in training and data that touches the record's dict; when the record becomes a
typed object, only these functions change.
"""
from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

log = logging.getLogger("surgeon")

def _record(model) -> dict[str, Any] | None:
    from surgeon import record

    return record._raw(model)


def input_size_of(model) -> tuple[int, ...] | None:
    """The per-sample input size recorded on the model (what it was patched or trained at), or None."""
    size = (_record(model) or {}).get("input_size")
    return tuple(int(d) for d in size) if size else None


def set_model_arg(model, key: str, value: Any) -> None:
    """Record a constructor argument of the base model, so `surgeon.load` rebuilds the model with it."""
    rec = _record(model)
    if rec and rec.get("model"):
        rec["model"]["args"] = {**(rec["model"].get("args") or {}), key: value}


def set_input_size(model, size: Sequence[int]) -> None:
    """Record `size` (C, H, W) as the model's input size: what it is loaded, evaluated and exported at.

    The shapes recorded for the edits follow (a saved model is rebuilt by finding its sites again at this
    size, and each site's shape is checked against the recipe): one forward pass at `size` reads the
    input of every inserted module. A plain model without a record gets one.
    """
    import torch

    from surgeon.surgery.rewrite import arg_indices, record

    size = [int(d) for d in size]
    rec = record(model)
    if rec.get("input_size") == size:
        return
    edits = [e for e in rec["edits"] if e.get("shape")]
    seen: dict[str, list[int]] = {}

    def reader(path: str, position: int | None):
        def hook(_module, args):
            if path not in seen and position is not None and position < len(args):
                seen[path] = list(args[position].shape)
        return hook

    handles = []
    for e in edits:
        module = model.get_submodule(e["module"])
        picks = arg_indices(module, 1)  # which of the site's inputs it receives; input 0 is the site's shape
        handles.append(module.register_forward_pre_hook(reader(e["module"], picks.index(0) if 0 in picks else None)))
    if edits:
        param = next(model.parameters(), None)
        x = torch.zeros(edits[0]["shape"][0], *size, device=param.device if param is not None else "cpu")
        was_training = model.training
        try:
            with torch.no_grad():
                model.eval()(x)
        finally:
            model.train(was_training)
            for h in handles:
                h.remove()
    for e in edits:
        if e["module"] in seen:
            e["shape"] = seen[e["module"]]
        else:  # its input was not observed: no shape to check on load rather than a wrong one
            log.debug("edit %s: shape at input size %s not observed; dropped from the record", e["module"], size)
            e.pop("shape")
    rec["input_size"] = size
    log.info("input size recorded: %s", "×".join(map(str, size)))
