"""Identity init for any shape-preserving attention: y = x + γ·(attn(x) − x), γ = 0 at init.

With γ = 0 the wrapped network computes exactly what it computed before (bit-exact); γ is a learnable
scalar (or per-channel vector) stored as a raw parameter, so `model.apply(init_fn)` style
re-initialisation of conv/linear/norm layers leaves it at zero.
"""
from __future__ import annotations

import torch
from torch import nn

from surgeon.layers._util import check_choice


class GatedResidual(nn.Module):
    """Wraps an attention so it starts as the identity: y = x + γ·(attn(x) − x).

    Args:
        attn: a module whose output has its input's shape.
        channels: when given, γ is per channel (dim 1, or the last dim with `channels_last`).
        channels_last: channels are the last dim (token sequences).
    """

    def __init__(self, attn: nn.Module, *, channels: int | None = None, channels_last: bool = False):
        super().__init__()
        self.attn = attn
        self.channels_last = channels_last
        self.gamma = nn.Parameter(torch.zeros(channels if channels else 1))

    def _gamma(self, x: torch.Tensor) -> torch.Tensor:
        if self.gamma.numel() == 1 or self.channels_last:
            return self.gamma
        return self.gamma.view(1, -1, *([1] * (x.dim() - 2)))

    def forward(self, x: torch.Tensor, *extra: torch.Tensor) -> torch.Tensor:
        # `extra` (e.g. a padding mask) goes to the attention unchanged
        return x + self._gamma(x) * (self.attn(x, *extra) - x)


class GatedReplacement(nn.Module):
    """Identity init for a module that replaces an op: y = orig + γ·(attn(x) − orig), γ = 0 at init.

    `forward(x, orig)` receives the replaced op's input and its original output.
    """

    def __init__(self, attn: nn.Module):
        super().__init__()
        self.attn = attn
        self.gamma = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor, orig: torch.Tensor) -> torch.Tensor:
        return orig + self.gamma * (self.attn(x) - orig)


INITS = ("identity", "paper")


def check_init(init: str) -> str:
    """`init` itself when it is 'identity' or 'paper'; OptionError (a ValueError) otherwise."""
    return check_choice("init", init, INITS)


def gated(module: nn.Module, init: str) -> nn.Module:
    """`module` itself for init='paper'; wrapped in `GatedResidual` for init='identity'."""
    return GatedResidual(module) if check_init(init) == "identity" else module
