"""Attention from strips: ela (efficient local attention) and strip (strip pooling), on (N, C, H, W) maps.

Both pool whole rows and columns, so the attention map sees long, narrow context at the cost of two 1-D
poolings. `identity=True` gates the map, 1 + γ·(w − 1) with γ = 0 (see `surgeon.layers.gate.ZeroGate`).
"""
from __future__ import annotations

import math

import torch
from torch import nn

from surgeon.layers._util import check_choice, check_positive_int, get_act
from surgeon.layers.applied import Applied, part
from surgeon.layers.gate import ZeroGate

# ELA's four sizes (Table 1 of the paper, as the official code): kernel, conv groups (0: depthwise,
# else channels // 8 groups), GroupNorm groups
ELA_VARIANTS = {"T": (5, 0, 32), "B": (7, 0, 16), "S": (5, 8, 16), "L": (7, 8, 16)}


class ELA(ZeroGate):
    """Efficient local attention: x · σ(GN(conv1d(mean_W x)))ᵀ ⊗ σ(GN(conv1d(mean_H x))).

    Paper: ELA: Efficient Local Attention for Deep Convolutional Neural Networks, Xu & Wan, 2024
    (arXiv:2403.01123). One 1-D conv (no bias) and one GroupNorm are shared by the height and width
    strips. `variant` T, B, S, L picks kernel size, conv groups and GroupNorm groups as the paper's
    table. Where the site's channels do not divide by the variant's group counts, the largest divisor of
    the channels below them is used (the paper fixes them for ResNet widths).
    """

    def __init__(self, channels: int, *, variant: str = "B", identity: bool = False):
        super().__init__(identity)
        check_positive_int("channels", channels)
        kernel_size, per_group, gn_groups = ELA_VARIANTS[check_choice("variant", variant, tuple(ELA_VARIANTS))]
        groups = channels if not per_group else math.gcd(channels, max(channels // per_group, 1))
        self.conv = nn.Conv1d(channels, channels, kernel_size, padding=kernel_size // 2, groups=groups, bias=False)
        self.gn = nn.GroupNorm(math.gcd(channels, gn_groups), channels)

    def _attn(self, x: torch.Tensor) -> torch.Tensor:
        a_h = torch.sigmoid(self.gn(self.conv(x.mean(3))))  # (N, C, H)
        a_w = torch.sigmoid(self.gn(self.conv(x.mean(2))))  # (N, C, W)
        return a_h.unsqueeze(3) * a_w.unsqueeze(2)  # (N, C, H, W)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.weights(self._attn(x))

    def applied(self, x: torch.Tensor) -> dict[str, Applied]:
        """The product of the height and width weights, per-channel maps (N, C, H, W), before the gate."""
        return part("maps", self._attn(x))


class StripPool(ZeroGate):
    """Strip pooling: x · σ(conv1×1(δ(expand(BN(conv3×1(pool_W x))) + expand(BN(conv1×3(pool_H x)))))).

    Paper: Strip Pooling: Rethinking Spatial Pooling for Scene Parsing, Hou et al., CVPR 2020
    (arXiv:2003.13328), the strip pooling module (SPM, Fig. 2) as the official `SPBlock` uses it in a
    ResNet: C→mid 3×1 and 1×3 convs without bias, each with BN, summed, ReLU, a 1×1 conv with bias to C,
    sigmoid, times x. mid defaults to C, as the official block; pass `mid_channels` for a lighter one.
    """

    def __init__(self, channels: int, *, mid_channels: int | None = None, act_layer: str = "relu",
                 identity: bool = False):
        super().__init__(identity)
        check_positive_int("channels", channels)
        mid = channels if mid_channels is None else check_positive_int("mid_channels", mid_channels)
        self.conv_h = nn.Conv2d(channels, mid, (3, 1), padding=(1, 0), bias=False)
        self.bn_h = nn.BatchNorm2d(mid)
        self.conv_w = nn.Conv2d(channels, mid, (1, 3), padding=(0, 1), bias=False)
        self.bn_w = nn.BatchNorm2d(mid)
        self.act = get_act(act_layer)
        self.fuse = nn.Conv2d(mid, channels, 1)

    def _attn(self, x: torch.Tensor) -> torch.Tensor:
        h = self.bn_h(self.conv_h(x.mean(3, keepdim=True)))  # (N, mid, H, 1)
        w = self.bn_w(self.conv_w(x.mean(2, keepdim=True)))  # (N, mid, 1, W)
        return torch.sigmoid(self.fuse(self.act(h + w)))  # (N, C, H, W)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.weights(self._attn(x))

    def applied(self, x: torch.Tensor) -> dict[str, Applied]:
        """The sigmoid map, per-channel maps (N, C, H, W), before the gate."""
        return part("maps", self._attn(x))
