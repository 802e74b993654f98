"""Pyramid Attention Network's two modules: Feature Pyramid Attention (FPA) on the deepest feature map,
and Global Attention Upsample (GAU) on a decoder's skip connection.

FPA: y = ReLU(master(x) ⊙ A(x) + gpb(x)), a 1×1 conv branch weighted per pixel and channel by a U-shaped
pyramid A (7×7, 5×5, 3×3 strided convs down, summed back up) plus a global-pooling branch.
GAU: y = ReLU(low(x) ⊙ ctx(g) + up(g)), the skip x's 3×3 conv weighted per channel by the global context of
the coarser decoder feature g, plus g projected and upsampled onto x's grid.

Paper: Li et al., Pyramid Attention Network for Semantic Segmentation, BMVC 2018 (arXiv:1805.10180).
NOTE: where the paper's code upsamples by 4×4 transposed convs (stride 2, sizes that halve exactly), here
maps are resampled bilinearly to the finer map's size, so any site size works (7×7 → 4 → 2 → 1 and back);
FPA's pyramid has `mid_channels` (channels // 4 as in the paper's code) and a 1×1 conv back to `channels`.
Both keep their input's shape; with `identity=True` the output is x + γ·(y − x), γ = 0 (`ZeroGate.mix`).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from surgeon.layers._util import check_choice, check_odd_kernel, check_optional_int, check_positive_int
from surgeon.errors import OptionError
from surgeon.layers.gate import ZeroGate


def conv_bn(cin: int, cout: int, kernel_size: int = 1, *, stride: int = 1, act: bool = False) -> nn.Sequential:
    """Conv (no bias, 'same' padding) → BN (→ ReLU)."""
    layers = [nn.Conv2d(cin, cout, kernel_size, stride=stride, padding=kernel_size // 2, bias=False),
              nn.BatchNorm2d(cout)]
    return nn.Sequential(*layers, nn.ReLU()) if act else nn.Sequential(*layers)


def resize(x: torch.Tensor, size, mode: str = "bilinear") -> torch.Tensor:
    """`x` resampled to spatial `size` (itself when it has that size)."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=tuple(size), mode=mode, **({"align_corners": False} if mode == "bilinear" else {}))


class FPA(ZeroGate):
    """Feature Pyramid Attention on a (N, C, H, W) map; output of the same shape.

    Args:
        channels: channels of the feature map.
        mid_channels: channels of the pyramid (default channels // 4, at least 1).
        kernel_sizes: odd kernel of each pyramid level, coarsest last (the paper's 7, 5, 3).
        identity: start as the identity (γ = 0), y = x + γ·(FPA(x) − x).
    """

    form = "mix"

    def __init__(self, channels: int, *, mid_channels: int | None = None, kernel_sizes: tuple[int, ...] = (7, 5, 3),
                 identity: bool = False):
        super().__init__(identity)
        check_positive_int("channels", channels)
        check_optional_int("mid_channels", mid_channels)
        if not isinstance(kernel_sizes, (tuple, list)) or not kernel_sizes:
            raise OptionError(f"kernel_sizes must be a non-empty list of positive odd integers, got {kernel_sizes!r}")
        ks = [check_odd_kernel("kernel_sizes", k) for k in kernel_sizes]
        mid = mid_channels or max(channels // 4, 1)
        self.master = conv_bn(channels, channels)
        self.gpb = conv_bn(channels, channels)
        self.down = nn.ModuleList(conv_bn(channels if i == 0 else mid, mid, k, stride=2, act=True)
                                  for i, k in enumerate(ks))
        self.refine = nn.ModuleList(conv_bn(mid, mid, k) for k in ks)
        self.expand = conv_bn(mid, channels)

    def pyramid(self, x: torch.Tensor) -> torch.Tensor:
        """The attention A(x) ≥ 0, shape of x: the pyramid's levels summed coarse to fine."""
        levels, h = [], x
        for down, refine in zip(self.down, self.refine):
            h = down(h)
            levels.append(refine(h))
        a = levels[-1]
        for level in reversed(levels[:-1]):
            a = F.relu(level + resize(a, level.shape[-2:]))
        return F.relu(resize(self.expand(a), x.shape[-2:]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.master(x) * self.pyramid(x) + self.gpb(x.mean((2, 3), keepdim=True)))
        return self.mix(x, y)


class GAU(ZeroGate):
    """Global Attention Upsample: forward(x, g) -> a map of x's shape; g is the coarser decoder feature.

    Args:
        channels: channels of the skip features x.
        high_channels: channels of g (default: `channels`).
        mode: resampling of g's projection onto x's grid: 'bilinear' or 'nearest'.
        identity: start as the identity (γ = 0), y = x + γ·(GAU(x, g) − x).
    """

    form = "mix"

    def __init__(self, channels: int, *, high_channels: int | None = None, mode: str = "bilinear",
                 identity: bool = False):
        super().__init__(identity)
        check_positive_int("channels", channels)
        check_optional_int("high_channels", high_channels)
        self.mode = check_choice("mode", mode, ("bilinear", "nearest"))
        high = high_channels or channels
        self.low = conv_bn(channels, channels, 3)
        self.context = conv_bn(high, channels, act=True)
        self.high = conv_bn(high, channels)

    def forward(self, x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        w = self.context(g.mean((2, 3), keepdim=True))
        y = F.relu(self.low(x) * w + resize(self.high(g), x.shape[-2:], self.mode))
        return self.mix(x, y)
