"""Merge: after fine-tuning, fold the identity-init gates away where that is exact.

Every gate is a `surgeon.layers.gate.ZeroGate` γ in one of three forms; merge decides per gate:
- γ = 1 (every entry, exactly): dropped, whatever the form; the output is bit-for-bit the same.
- `add` (x + γ·a) whose branch a ends in an affine layer (mhsa and local's `proj`, danet's and ccnet's
  value conv, ema's batch norm): γ is multiplied into that layer and dropped (equal up to rounding).
- `weights` (1 + γ·(w − 1)) with γ ≠ 1: kept. w comes out of a sigmoid (or a softmax), so γ cannot
  move into the layer before it. It costs nothing on the feature map: it acts on the small weights
  ((N, C) or (N, 1, H, W)), and the map is multiplied once, as in the paper's module.
- `mix` (a + γ·(b − a), the output gate of wrapped attentions and replaced ops) with γ ≠ 1: kept; it
  costs one fused pass over the map.
BatchNorm folding into convolutions is not done here.

The merged model records which gates it dropped (`recipe.json` field `merged`), so `surgeon.save` /
`surgeon.load` round-trip it.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

from torch import nn

__all__ = ["GateFold", "merge", "merge_plan", "drop_gates"]


@dataclass(frozen=True)
class GateFold:
    """What merge does with one gate: `gate` its module path, `form` ('weights', 'add' or 'mix'),
    `gamma` (min, max) of its entries, `action` ('dropped', 'folded' or 'kept') and `why`."""

    gate: str
    form: str
    gamma: tuple[float, float]
    action: str
    why: str

    def to_dict(self) -> dict:
        return {"gate": self.gate, "form": self.form, "gamma": list(self.gamma), "action": self.action,
                "why": self.why}


def _gates(model: nn.Module):
    from surgeon.layers.gate import ZeroGate

    return [(name, m) for name, m in model.named_modules() if isinstance(m, ZeroGate) and m.gamma is not None]


def _decide(name: str, gate) -> GateFold:
    gamma = gate.gamma.detach()
    span = (float(gamma.min()), float(gamma.max()))
    if bool((gamma == 1).all()):
        return GateFold(name, gate.form, span, "dropped", "γ = 1: the ungated form is exactly the same")
    if gate.form == "add" and gate.branch_out and gamma.numel() == 1:
        target = f"{name}.{gate.branch_out}" if name else gate.branch_out
        return GateFold(name, gate.form, span, "folded", f"γ multiplied into {target}")
    if gate.form == "weights":
        return GateFold(name, gate.form, span, "kept", "gates the attention weights after a sigmoid, not the "
                                                      "map: no cost over the paper's module")
    if gate.form == "add":
        return GateFold(name, gate.form, span, "kept", "x + γ·a in one fused op: no cost over x + a")
    return GateFold(name, gate.form, span, "kept", "output gate a + γ·(b − a): one fused pass over the map")


def merge_plan(model: nn.Module) -> list[GateFold]:
    """What `merge` would do with each gate of `model`, without changing anything."""
    return [_decide(name, gate) for name, gate in _gates(model)]


def _fold_into(layer: nn.Module, gamma: float) -> None:
    import torch

    with torch.no_grad():
        for name in ("weight", "bias"):
            p = getattr(layer, name, None)
            if p is not None:
                p.mul_(gamma)


def drop_gates(model: nn.Module, paths) -> None:
    """Remove the γ of the gates at `paths` (in place): a merged model's recorded form, replayed on load.

    Raises:
        RecipeError: a path that is not a gate of `model`.
    """
    from surgeon.errors import RecipeError
    from surgeon.layers.gate import ZeroGate, drop_gate

    for path in paths:
        gate = None
        try:
            gate = model.get_submodule(path)
        except AttributeError:
            pass
        if not isinstance(gate, ZeroGate):
            raise RecipeError(f"Merged gate {path!r} is not a gate of this model; was the recipe edited?")
        drop_gate(gate)


def merge(model: nn.Module, *, inplace: bool = False) -> nn.Module:
    """Fold the identity-init gates of a fine-tuned model where that is exact (see `merge_plan`).

    Args:
        model: a patched model (after fine-tuning; at init every γ is 0 and nothing folds).
        inplace: change `model` itself instead of a copy.

    Returns:
        nn.Module: the merged model (computes the same function, up to float rounding where γ was
        multiplied into a layer).

    Example:
        >>> merged = surgeon.merge(surgeon.load("runs/cbam"))
        >>> [(f.gate, f.action) for f in surgeon.merge_plan(merged)]
    """
    from surgeon import record
    from surgeon.layers.gate import drop_gate

    out = model if inplace else copy.deepcopy(model)
    done = []
    for (name, gate), fold in zip(_gates(out), merge_plan(out)):
        if fold.action == "kept":
            continue
        if fold.action == "folded":
            _fold_into(gate.get_submodule(gate.branch_out), fold.gamma[0])
        drop_gate(gate)
        done.append(name)
    record.set_merged(out, record.merged(out) + done)
    return out
