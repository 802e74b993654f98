"""Attention over channel groups: shuffle attention (sa) and split attention (splat, ResNeSt).

Both regroup channels, so neither is a plain product of x with weights: identity init wraps them in the
output gate x + γ·(attn(x) − x) (see `surgeon.layers.gate.GatedResidual`).
"""
from __future__ import annotations

import math

import torch
from torch import nn

from surgeon.errors import SiteShapeError
from surgeon.layers._util import (check_groups, check_odd_kernel, check_positive_int, check_ratio, get_act,
                                  make_divisible)
from surgeon.layers.applied import Applied, part
from surgeon.layers.local_attention import same_format


def _largest_group_count(channels: int, groups: int, per_group: int) -> int:
    """The largest g ≤ groups with channels divisible by g·per_group (channels must be divisible by per_group)."""
    return max(g for g in range(1, min(groups, channels // per_group) + 1) if channels % (g * per_group) == 0)


class ShuffleAttention(nn.Module):
    """Shuffle attention: per channel group, a channel half and a spatial half gated, then a channel shuffle.

    Paper: SA-Net: Shuffle Attention for Deep Convolutional Neural Networks, Zhang & Yang, ICASSP 2021
    (arXiv:2102.00240). x is split into G groups, each into halves x₁, x₂ of C/2G channels:
    x₁·σ(w₁·gap(x₁) + b₁) and x₂·σ(w₂·GN(x₂) + b₂) (GroupNorm with one channel per group), with
    w, b per channel of a half (shared by the groups); the halves are concatenated and the channels
    shuffled with 2 groups. 3C/G parameters, initialised as the official code (w = 0, b = 1). G is the
    paper's 64, lowered to the largest count that divides the site's channels into even halves.
    """

    def __init__(self, channels: int, *, groups: int = 64):
        super().__init__()
        check_positive_int("channels", channels)
        check_positive_int("groups", groups)
        if channels % 2:
            raise SiteShapeError(f"shuffle attention splits channels into halves; {channels} channels is odd")
        self.groups = _largest_group_count(channels, groups, 2)
        half = channels // (2 * self.groups)
        self.cweight = nn.Parameter(torch.zeros(1, half, 1, 1))
        self.cbias = nn.Parameter(torch.ones(1, half, 1, 1))
        self.sweight = nn.Parameter(torch.zeros(1, half, 1, 1))
        self.sbias = nn.Parameter(torch.ones(1, half, 1, 1))
        self.gn = nn.GroupNorm(half, half)

    def _halves(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x's channel halves x₁, x₂ of every group, (N·G, C/2G, H, W) each."""
        b, c, h, w = x.shape
        return x.reshape(b * self.groups, c // self.groups, h, w).chunk(2, dim=1)

    def _attn(self, x1: torch.Tensor, x2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The channel half's weights (N·G, C/2G, 1, 1) and the spatial half's (N·G, C/2G, H, W)."""
        return (torch.sigmoid(self.cweight * x1.mean((2, 3), keepdim=True) + self.cbias),
                torch.sigmoid(self.sweight * self.gn(x2) + self.sbias))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        x1, x2 = self._halves(x)
        a1, a2 = self._attn(x1, x2)
        x1 = x1 * a1
        x2 = x2 * a2
        out = torch.cat([x1, x2], dim=1).reshape(b, c, h, w)
        out = out.reshape(b, 2, c // 2, h, w).transpose(1, 2).reshape(b, c, h, w)  # channel shuffle, 2 groups
        return same_format(out, x)

    def applied(self, x: torch.Tensor) -> dict[str, Applied]:
        """The weight each element of x is multiplied by, per-channel maps (N, C, H, W) in x's channel order
        (before the shuffle): σ(w₁·gap + b₁), constant over positions, on each group's channel half and
        σ(w₂·GN + b₂) on its spatial half."""
        x1, x2 = self._halves(x)
        a1, a2 = self._attn(x1, x2)
        return part("maps", torch.cat([a1.expand_as(x1), a2], dim=1).reshape(x.shape))


class SplitAttn(nn.Module):
    """Split attention: R radix branches of one grouped conv, mixed per channel by a softmax over the branches.

    Paper: ResNeSt: Split-Attention Networks, Zhang et al., CVPRW 2022 (arXiv:2004.08955), Sec. 3 and
    Fig. 2. As an insertable C→C block (ResNeSt puts it in place of the bottleneck's 3×3 conv): conv k×k
    to R·C channels in R·groups groups, BN, ReLU; gap of the branch sum; 1×1 conv to d channels (groups),
    BN, ReLU; 1×1 conv to R·C; softmax over the R branches within each cardinal group; weighted sum.
    d = max(C·R·rd_ratio rounded to rd_divisor, 32), as timm's `SplitAttn`.
    """

    def __init__(self, channels: int, *, radix: int = 2, groups: int = 1, kernel_size: int = 3,
                 rd_ratio: float = 0.25, rd_channels: int | None = None, rd_divisor: int = 8,
                 act_layer: str = "relu"):
        super().__init__()
        check_positive_int("channels", channels)
        self.radix = check_positive_int("radix", radix)
        self.groups = check_positive_int("groups", groups)
        check_odd_kernel("kernel_size", kernel_size)
        check_groups(channels, groups)
        check_ratio("rd_ratio", rd_ratio)
        check_positive_int("rd_divisor", rd_divisor)
        if rd_channels is None:
            rd_channels = make_divisible(channels * radix * rd_ratio, rd_divisor, min_value=32)
        rd = check_positive_int("rd_channels", rd_channels)
        if rd % groups:
            rd = math.ceil(rd / groups) * groups
        mid = channels * radix
        self.conv = nn.Conv2d(channels, mid, kernel_size, padding=kernel_size // 2, groups=groups * radix, bias=False)
        self.bn0 = nn.BatchNorm2d(mid)
        self.act0 = get_act(act_layer)
        self.fc1 = nn.Conv2d(channels, rd, 1, groups=groups)
        self.bn1 = nn.BatchNorm2d(rd)
        self.act1 = get_act(act_layer)
        self.fc2 = nn.Conv2d(rd, mid, 1, groups=groups)

    def _branches(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The R radix branches (N, C, H, W) of the grouped conv."""
        feats = self.act0(self.bn0(self.conv(x)))
        return feats.chunk(self.radix, dim=1) if self.radix > 1 else (feats,)

    def _attn(self, branches: tuple[torch.Tensor, ...]) -> torch.Tensor:
        """The branch weights (N, R, C, 1, 1): a softmax over the R branches (radix 1: a sigmoid)."""
        n, c = branches[0].shape[:2]
        gap = sum(branches).mean((2, 3), keepdim=True)
        logits = self.fc2(self.act1(self.bn1(self.fc1(gap))))  # (N, R·C, 1, 1), cardinal-group-major
        if self.radix > 1:
            a = logits.view(n, self.groups, self.radix, c // self.groups).softmax(dim=2)
            return a.transpose(1, 2).reshape(n, self.radix, c, 1, 1)
        return torch.sigmoid(logits).view(n, 1, c, 1, 1)

    def applied(self, x: torch.Tensor) -> dict[str, Applied]:
        """The branch weights (N, R, C), summing to 1 over the R radix branches; radix 1: the channel
        weights (N, C) of its sigmoid."""
        a = self._attn(self._branches(x)).flatten(2)
        return part("branches", a) if self.radix > 1 else part("channel", a[:, 0])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        branches = self._branches(x)
        a = self._attn(branches)
        out = branches[0] * a[:, 0]
        for i in range(1, self.radix):
            out = out + branches[i] * a[:, i]
        return out


