"""Residual Attention Network's attention module: a trunk branch T(x) and a soft mask branch M(x) in
[0, 1], combined as (1 + M(x))·T(x), between p pre- and p post-processing residual units.

The mask branch is bottom-up top-down: max-pool down `depth` times (r residual units after each pool),
then bilinear upsampling back, adding a skip connection (one residual unit on the features before each
pool) at each level, and ends with BN-ReLU-1×1 conv-BN-ReLU-1×1 conv and a sigmoid.

Paper: Wang et al., Residual Attention Network for Image Classification, CVPR 2017 (arXiv:1704.06873).
NOTE: the paper picks the mask's number of poolings per stage so its bottom is 7×7 on 224×224 inputs
(3, 2, 1 for stages 1–3); `depth=None` does the same from the input size it sees: pool while the smaller
side stays ≥ 7, at most 3 times, at least once. Upsampling is to each level's exact size, so any input size
works (the paper assumes even sizes).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from surgeon.layers._util import check_int, check_positive_int
from surgeon.layers.applied import Applied, part


class PreActUnit(nn.Module):
    """Pre-activation bottleneck residual unit (BN-ReLU-conv ×3, 1×1 / 3×3 / 1×1) of width channels/4."""

    def __init__(self, channels: int, *, bottleneck: int = 4):
        super().__init__()
        mid = max(channels // bottleneck, 1)
        self.body = nn.Sequential(
            nn.BatchNorm2d(channels), nn.ReLU(inplace=False), nn.Conv2d(channels, mid, 1, bias=False),
            nn.BatchNorm2d(mid), nn.ReLU(inplace=False), nn.Conv2d(mid, mid, 3, padding=1, bias=False),
            nn.BatchNorm2d(mid), nn.ReLU(inplace=False), nn.Conv2d(mid, channels, 1, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


def _units(channels: int, n: int) -> nn.Sequential:
    return nn.Sequential(*[PreActUnit(channels) for _ in range(n)])


def auto_depth(height: int, width: int, *, bottom: int = 7, most: int = 3) -> int:
    """How many stride-2 poolings keep the smaller side at least `bottom` (1 to `most`)."""
    side, depth = min(height, width), 0
    while depth < most and (side + 1) // 2 >= bottom:
        side, depth = (side + 1) // 2, depth + 1
    return max(depth, 1)


class ResidualAttention(nn.Module):
    """Attention module of the Residual Attention Network: (1 + M(x))·T(x), shape preserving.

    Args:
        channels: input (= output) channels.
        p: residual units before the split and after the combination (paper: 1).
        t: residual units in the trunk branch (paper: 2).
        r: residual units between adjacent poolings in the mask branch (paper: 1).
        depth: max-pool downsamplings in the mask branch (paper: 3, 2, 1 by stage; see the module note).
    """

    def __init__(self, channels: int, *, p: int = 1, t: int = 2, r: int = 1, depth: int = 1):
        super().__init__()
        check_positive_int("channels", channels)
        check_int("p", p, low=0)
        check_positive_int("t", t)
        check_positive_int("r", r)
        check_positive_int("depth", depth)
        self.depth = depth
        self.pre = _units(channels, p)
        self.trunk = _units(channels, t)
        self.down = nn.ModuleList([_units(channels, r) for _ in range(depth)])
        self.skips = nn.ModuleList([PreActUnit(channels) for _ in range(depth - 1)])
        self.up = nn.ModuleList([_units(channels, r) for _ in range(depth - 1)])
        # the bottom level runs 2r units (r down, r up) as in the paper's figure
        self.bottom = _units(channels, r)
        self.mask_out = nn.Sequential(
            nn.BatchNorm2d(channels), nn.ReLU(inplace=False), nn.Conv2d(channels, channels, 1, bias=False),
            nn.BatchNorm2d(channels), nn.ReLU(inplace=False), nn.Conv2d(channels, channels, 1, bias=False),
            nn.Sigmoid())
        self.post = _units(channels, p)

    def mask(self, x: torch.Tensor) -> torch.Tensor:
        """The soft mask M(x) in [0, 1], of x's shape."""
        sizes, skips = [], []
        h = x
        for i in range(self.depth):
            sizes.append(h.shape[-2:])
            h = self.down[i](F.max_pool2d(h, 3, stride=2, padding=1))
            if i < self.depth - 1:
                skips.append(self.skips[i](h))
        h = self.bottom(h)
        for i in reversed(range(self.depth)):
            h = F.interpolate(h, size=sizes[i], mode="bilinear", align_corners=False)
            if i > 0:
                h = self.up[i - 1](h + skips[i - 1])
        return self.mask_out(h)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pre(x)
        return self.post((1 + self.mask(x)) * self.trunk(x))

    def applied(self, x: torch.Tensor) -> dict[str, Applied]:
        """The soft mask M (N, C, H, W) in [0, 1] that scales the trunk by 1 + M."""
        return part("maps", self.mask(self.pre(x)))
