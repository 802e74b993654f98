"""Identity init by a zero gate: one learnable γ, 0 at init, applied where it costs least.

`ZeroGate` is the one implementation. A module that owns a γ subclasses it (the γ is its `gamma`
parameter) and uses one of three forms, each exactly the identity at γ = 0 (bit for bit) and exactly
the ungated form at γ = 1:

- `weights(w) = 1 + γ·(w − 1)`: multiplicative attention (SE's channel weights, CBAM's spatial map);
  the gate acts on the small weights, so the feature map is multiplied once, as without a gate;
- `add(x, a) = x + γ·a`: an additive branch (DANet, CCNet): one fused multiply-add;
- `mix(a, b) = a + γ·(b − a)`: anything else (an attention's whole output, a replaced op's result);
  one fused op over the map (`torch.lerp`).

With `gamma` None (paper init, or after `surgeon.merge` found γ = 1) each form is the ungated one.
γ is a raw parameter, so `model.apply(init_fn)` style re-initialisation of conv/linear/norm layers
leaves it at zero.
"""
from __future__ import annotations

import torch
from torch import nn

from surgeon.layers._util import check_choice


class ZeroGate(nn.Module):
    """Owns a learnable gate γ (zeros) when `identity`; see the module docstring for its three forms.

    Args:
        identity: create γ (start as the identity); False keeps `gamma` None (the ungated form).
        channels: when given, γ is per channel (dim 1, or the last dim with `channels_last`).
        channels_last: channels are the last dim (token sequences).
    """

    # which form the subclass uses (read by `surgeon.merge`), and for 'add', the affine layer (weight,
    # bias) that ends the branch a, into which merge can multiply γ
    form = "weights"
    branch_out: str | None = None

    def __init__(self, identity: bool = True, *, channels: int | None = None, channels_last: bool = False):
        super().__init__()
        self.channels_last = channels_last
        self.gamma = nn.Parameter(torch.zeros(channels if channels else 1)) if identity else None

    def _gamma(self, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """γ shaped to broadcast over x, in `dtype` (lerp and addcmul take one dtype: autocast mixes them)."""
        gamma = self.gamma.to(dtype)
        if gamma.numel() == 1 or self.channels_last:
            return gamma
        return gamma.view(1, -1, *([1] * (x.dim() - 2)))

    def weights(self, w: torch.Tensor) -> torch.Tensor:
        """1 + γ·(w − 1): multiplicative weights that start at exactly 1."""
        if self.gamma is None:
            return w
        return torch.lerp(w.new_ones(()), w, self._gamma(w, w.dtype))

    def add(self, x: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        """x + γ·a: an additive branch that starts at exactly 0."""
        if self.gamma is None:
            return x + a
        dtype = torch.promote_types(x.dtype, a.dtype)
        return strided_like(torch.addcmul(x.to(dtype), self._gamma(x, dtype), a.to(dtype)), x)

    def mix(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """a + γ·(b − a): `b` in place of `a`, starting at exactly `a`."""
        if self.gamma is None:
            return b
        dtype = torch.promote_types(a.dtype, b.dtype)
        return strided_like(torch.lerp(a.to(dtype), b.to(dtype), self._gamma(a, dtype)), a)


def strided_like(out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """`out` laid out in memory as `x` is, when it has x's shape. An elementwise op lays its result out by
    its inputs' strides, and where x's strides leave the order open (dims of size 1: a 1×1 map), a branch
    computed through token reshapes decides it; the layers after the module, which may pick their kernel by
    the strides (a convolution's channels-last path), must see what they saw without it: the identity at
    init is then bit-exact, and the rewritten forward's `out += shortcut` keeps the original's layout."""
    if out.stride() == x.stride() or out.shape != x.shape or not _dense(x):
        return out
    return torch.empty_like(x, dtype=out.dtype).copy_(out)


def _dense(x: torch.Tensor) -> bool:
    """x's elements fill its storage span once each (empty_like then copies its strides)."""
    return x.is_contiguous() or x.is_contiguous(memory_format=torch.channels_last) \
        or (x.dim() == 5 and x.is_contiguous(memory_format=torch.channels_last_3d))


def mul_own(out: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """out · w, for a map `out` that the calling layer made itself: in place when autograd needs neither (eval,
    inference) and the product keeps out's shape and dtype. A layer that multiplies a map by several weights in
    turn (CBAM's channel then spatial weights, coord's directions) then allocates one full-size map, not one
    per weight."""
    if (torch.is_grad_enabled() and (out.requires_grad or w.requires_grad)) \
            or torch.promote_types(out.dtype, w.dtype) != out.dtype \
            or torch.broadcast_shapes(out.shape, w.shape) != out.shape:
        return out * w
    return out.mul_(w)


class GatedResidual(ZeroGate):
    """Wraps an attention that has no weights to gate so it starts as the identity: y = x + γ·(attn(x) − x).

    Args:
        attn: a module whose output has its input's shape.
        channels, channels_last: as `ZeroGate`.
    """

    form = "mix"

    def __init__(self, attn: nn.Module, *, channels: int | None = None, channels_last: bool = False):
        super().__init__(channels=channels, channels_last=channels_last)
        self.attn = attn

    def forward(self, x: torch.Tensor, *extra: torch.Tensor) -> torch.Tensor:
        # `extra` (e.g. a padding mask) goes to the attention unchanged
        return self.mix(x, self.attn(x, *extra))


class GatedReplacement(ZeroGate):
    """Identity init for a module that replaces an op: y = orig + γ·(attn(x) − orig), γ = 0 at init.

    `forward(x, orig)` receives the replaced op's input and its original output.
    """

    form = "mix"

    def __init__(self, attn: nn.Module):
        super().__init__()
        self.attn = attn

    def forward(self, x: torch.Tensor, orig: torch.Tensor) -> torch.Tensor:
        return self.mix(orig, self.attn(x))


INITS = ("identity", "paper")


def check_init(init: str) -> str:
    """`init` itself when it is 'identity' or 'paper'; OptionError (a ValueError) otherwise."""
    return check_choice("init", init, INITS)


def gated(module: nn.Module, init: str) -> nn.Module:
    """`module` itself for init='paper'; wrapped in `GatedResidual` for init='identity'.

    For a multiplicative attention, prefer a layer that subclasses `ZeroGate` and gates its own
    weights (`identity=True`): the wrapper's output gate costs one more pass over the feature map.
    """
    return GatedResidual(module) if check_init(init) == "identity" else module


def drop_gate(module: ZeroGate) -> None:
    """Remove `module`'s γ in place: it then computes its ungated (paper) form."""
    module.gamma = None


def upgrade_legacy(model: nn.Module, keys) -> list[str]:
    """Make `model` fit a state dict saved before attentions gated their own weights.

    Before the weight gates, every identity-init attention was wrapped as `GatedResidual(module)`:
    keys `P.gamma` and `P.attn.*`. Each module at such a path P that has no
    `attn` child now is put back in that wrapper, its own gates removed, so the old weights load and
    the model computes exactly what it computed when saved (the old output gate x + γ·(attn(x) − x)
    equals the new weight gate only for a single weight tensor, not e.g. CBAM's two).

    Returns:
        the paths wrapped ([] for a state dict of the current form).
    """
    keys = set(keys)
    wrapped = []
    for key in sorted(keys):
        path = key[: -len(".gamma")] if key.endswith(".gamma") else None
        if not path or not any(k.startswith(path + ".attn.") for k in keys):
            continue
        try:
            module = model.get_submodule(path)
        except AttributeError:
            continue
        if hasattr(module, "attn"):
            continue
        for inner in module.modules():
            if isinstance(inner, ZeroGate):
                drop_gate(inner)
        model.set_submodule(path, GatedResidual(module))
        wrapped.append(path)
    return wrapped
