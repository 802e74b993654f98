"""Attention U-Net's additive attention gate: a skip connection's features x are scaled per position by
α = σ(ψ(ReLU(W_x·x + W_g·g))), where the gating signal g is a coarser decoder feature.

Paper: Oktay et al., Attention U-Net: Learning Where to Look for the Pancreas, MIDL 2018 (arXiv:1804.03999).
NOTE: the paper's reference code computes W_x with a strided conv onto g's grid and upsamples α back;
here W_g·g is resampled (bilinear) onto x's grid instead, so any pair of sizes works, and the gate's
output is x·α without the reference code's extra 1×1 conv + BN after the product.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from surgeon.layers._util import check_choice, check_optional_int, check_positive_int
from surgeon.layers.applied import Applied, part
from surgeon.layers.gate import ZeroGate


class AttentionGate(ZeroGate):
    """Additive attention gate: forward(x, g) -> x·α, α of shape (N, 1, H, W).

    Args:
        channels: channels of the gated features x.
        gating_channels: channels of the gating signal g (default: `channels`).
        inter_channels: channels F_int of the joint space (paper's code: channels // 2, at least 1).
        mode: interpolation of W_g·g onto x's grid: 'bilinear' or 'nearest'.
        identity: start as the identity, y = x·(1 + γ·(α − 1)) with a learnable γ = 0 (retrofitting).
    """

    def __init__(self, channels: int, *, gating_channels: int | None = None, inter_channels: int | None = None,
                 mode: str = "bilinear", identity: bool = False):
        super().__init__(identity)
        check_positive_int("channels", channels)
        check_optional_int("gating_channels", gating_channels)
        check_optional_int("inter_channels", inter_channels)
        check_choice("mode", mode, ("bilinear", "nearest"))
        gating_channels = gating_channels or channels
        inter = inter_channels or max(channels // 2, 1)
        self.mode = mode
        self.theta = nn.Conv2d(channels, inter, 1, bias=False)  # W_x
        self.phi = nn.Conv2d(gating_channels, inter, 1, bias=True)  # W_g (+ b_g)
        self.psi = nn.Conv2d(inter, 1, 1, bias=True)  # ψ (+ b_ψ)

    def coefficients(self, x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        """The attention coefficients α in [0, 1], shape (N, 1, H, W) on x's grid."""
        phi = self.phi(g)
        if phi.shape[-2:] != x.shape[-2:]:
            kw = {"align_corners": False} if self.mode == "bilinear" else {}
            phi = F.interpolate(phi, size=x.shape[-2:], mode=self.mode, **kw)
        return torch.sigmoid(self.psi(F.relu(self.theta(x) + phi)))

    def forward(self, x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        return x * self.weights(self.coefficients(x, g))

    def applied(self, x: torch.Tensor, g: torch.Tensor) -> dict[str, Applied]:
        """The coefficients α (N, H, W) before the gate."""
        return part("spatial", self.coefficients(x, g)[:, 0])
