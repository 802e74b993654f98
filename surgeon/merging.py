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
With `fold_bn=True` (deployment; the merged model then has no BatchNorm to train), each eval-mode
BatchNorm that only ever normalises one convolution's output, called once, is folded into that
convolution (`fold_bn_pairs`): the conv gets the BN's scale and shift, the BN becomes an `nn.Identity`.

The merged model records which gates it dropped (`recipe.json` field `merged`), so `surgeon.save` /
`surgeon.load` round-trip it.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

from torch import nn

__all__ = ["GateFold", "merge", "merge_plan", "drop_gates", "bn_pairs", "fold_bn_pairs"]


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


_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def bn_pairs(model: nn.Module) -> list[tuple[str, str]]:
    """(conv path, BatchNorm path) of every BatchNorm that can fold into the convolution before it: both
    plain torch.nn classes (a subclass may compute more, like timm's BatchNormAct2d), the conv's output
    used by the BN alone, each module called exactly once in a forward of the model's example input, the
    BN with running statistics.
    """
    import torch

    from surgeon.planning import example_inputs
    from surgeon.surgery import shapes
    from surgeon.surgery.owned import structural_copy
    from surgeon.surgery.trace import trace

    copy_ = structural_copy(model).eval()
    inputs = example_inputs(copy_)
    counts: dict[str, int] = {}
    handles = [m.register_forward_pre_hook(lambda _m, _a, p=p: counts.__setitem__(p, counts.get(p, 0) + 1))
               for p, m in copy_.named_modules() if type(m) in _CONVS + _NORMS]
    try:
        with torch.no_grad():
            copy_(*inputs)
    finally:
        for h in handles:
            h.remove()
    traced = trace(copy_, calls=shapes.record_calls(copy_, inputs).calls)
    pairs = []
    for prefix, gm in traced.graphs.items():
        def full(target, prefix=prefix):
            return f"{prefix}.{target}" if prefix else target
        for node in gm.graph.nodes:
            if node.op != "call_module" or type(gm.get_submodule(node.target)) not in _CONVS or len(node.users) != 1:
                continue
            (user,) = node.users
            if user.op != "call_module" or user.args[:1] != (node,) or len(user.args) != 1 or user.kwargs:
                continue
            norm = gm.get_submodule(user.target)
            if type(norm) not in _NORMS or norm.running_mean is None:
                continue
            conv, bn = full(node.target), full(user.target)
            if counts.get(conv) == 1 and counts.get(bn) == 1:
                pairs.append((conv, bn))
    return pairs


def fold_bn_pairs(model: nn.Module, pairs, *, structure_only: bool = False) -> None:
    """Fold each (conv, BatchNorm) pair of `model` in place: the conv computes conv+BN (eval mode) and the
    BN is replaced by nn.Identity. With `structure_only` the conv just gets its bias slot and the BN
    goes (a saved merged model's form, whose weights are loaded next).

    Raises:
        RecipeError: a path that is not a conv or a BatchNorm of `model`.
    """
    import torch
    from torch.nn.utils.fusion import fuse_conv_bn_weights

    from surgeon.errors import RecipeError

    for conv_path, bn_path in pairs:
        try:
            conv, bn = model.get_submodule(conv_path), model.get_submodule(bn_path)
        except AttributeError:
            conv = bn = None
        if not isinstance(conv, _CONVS) or not isinstance(bn, _NORMS):
            raise RecipeError(f"Folded pair ({conv_path!r}, {bn_path!r}) is not a convolution and a BatchNorm of "
                              f"this model; was the recipe edited?")
        if structure_only:
            weight, bias = conv.weight, torch.zeros(conv.out_channels, dtype=conv.weight.dtype)
        else:
            weight, bias = fuse_conv_bn_weights(conv.weight, conv.bias, bn.running_mean, bn.running_var, bn.eps,
                                                bn.weight, bn.bias)
        conv.weight = nn.Parameter(weight.detach(), requires_grad=conv.weight.requires_grad)
        conv.bias = nn.Parameter(bias.detach(), requires_grad=conv.weight.requires_grad)
        parent, _, name = bn_path.rpartition(".")
        (model.get_submodule(parent) if parent else model)._modules[name] = nn.Identity()


def merge(model: nn.Module, *, inplace: bool = False, fold_bn: bool = False) -> nn.Module:
    """Fold the identity-init gates of a fine-tuned model where that is exact (see `merge_plan`), and with
    `fold_bn` its BatchNorms into the convolutions before them (see `bn_pairs`).

    Args:
        model: a patched model (after fine-tuning; at init every γ is 0 and nothing folds).
        inplace: change `model` itself instead of a copy.
        fold_bn: fold BatchNorm into convolutions: for inference (the same output in eval mode; the
            merged model has no BatchNorm left to train or to update in train mode).

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
    if fold_bn:
        pairs = bn_pairs(out)
        fold_bn_pairs(out, pairs)
        record.set_folded_bn(out, record.folded_bn(out) + [list(p) for p in pairs])
    return out
