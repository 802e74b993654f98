"""Pyramid Attention Network's two modules: Feature Pyramid Attention (FPA) on the deepest feature map,
and Global Attention Upsample (GAU) on a decoder's skip connection.

FPA: y = master(x) ⊙ A(x) + gpb(x): a 1×1 conv branch weighted per pixel by a U-shaped pyramid A (max pool
then 7×7, 5×5, 3×3 convs down; each level refined by a second conv of its size; summed back up coarse to fine),
plus a global-pooling branch (broadcast over the map).
GAU: y = ReLU(low(x) ⊙ ctx(g) + up(g)), the skip x's 3×3 conv weighted per channel by the global context of
the coarser decoder feature g, plus g projected by a 1×1 conv and upsampled onto x's grid.

Paper: Li et al., Pyramid Attention Network for Semantic Segmentation, BMVC 2018 (arXiv:1805.10180).
NOTE: FPA follows segmentation_models_pytorch's FPABlock (one-channel, pixel-level pyramid; `mid_channels` > 1
adds a 1×1 conv back to `channels`) with ceil-mode pooling and each level's own size when upsampling, so
odd sites work (7×7 → 4 → 2 → 1); its convs have no bias (BN follows). GAU follows the paper's reference code
(ReLU context, final ReLU) but upsamples g bilinearly instead of by a 4×4 transposed conv, so any size ratio works.
Both keep their input's shape; with `identity=True` the output is x + γ·(y − x), γ = 0 (`ZeroGate.mix`).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from surgeon.layers._util import check_choice, check_odd_kernel, check_optional_int, check_positive_int
from surgeon.errors import OptionError
from surgeon.layers.applied import Applied, part
from surgeon.layers.gate import ZeroGate


def conv_bn(cin: int, cout: int, kernel_size: int = 1, *, stride: int = 1, act: bool = False) -> nn.Sequential:
    """Conv (no bias, 'same' padding) → BN (→ ReLU)."""
    layers = [nn.Conv2d(cin, cout, kernel_size, stride=stride, padding=kernel_size // 2, bias=False),
              nn.BatchNorm2d(cout)]
    return nn.Sequential(*layers, nn.ReLU()) if act else nn.Sequential(*layers)


def resize(x: torch.Tensor, size, mode: str = "bilinear") -> torch.Tensor:
    """`x` resampled to spatial `size` (itself when it has that size); bilinear with aligned corners."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=tuple(size), mode=mode, **({"align_corners": True} if mode == "bilinear" else {}))


class FPA(ZeroGate):
    """Feature Pyramid Attention on a (N, C, H, W) map; output of the same shape.

    Args:
        channels: channels of the feature map.
        mid_channels: channels of the pyramid (1: a pixel-level map broadcast over the channels).
        kernel_sizes: odd kernel of each pyramid level, coarsest last (the paper's 7, 5, 3).
        identity: start as the identity (γ = 0), y = x + γ·(FPA(x) − x).
    """

    form = "mix"

    def __init__(self, channels: int, *, mid_channels: int = 1, kernel_sizes: tuple[int, ...] = (7, 5, 3),
                 identity: bool = False):
        super().__init__(identity)
        check_positive_int("channels", channels)
        mid = check_positive_int("mid_channels", mid_channels)
        if not isinstance(kernel_sizes, (tuple, list)) or not kernel_sizes:
            raise OptionError(f"kernel_sizes must be a non-empty list of positive odd integers, got {kernel_sizes!r}")
        ks = [check_odd_kernel("kernel_sizes", k) for k in kernel_sizes]
        self.master = conv_bn(channels, channels, act=True)
        self.gpb = conv_bn(channels, channels, act=True)
        self.down = nn.ModuleList(conv_bn(channels if i == 0 else mid, mid, k, act=True) for i, k in enumerate(ks))
        self.refine = nn.ModuleList(conv_bn(mid, mid, k, act=True) for k in ks)
        self.expand = conv_bn(mid, channels) if mid > 1 else None

    def pyramid(self, x: torch.Tensor) -> torch.Tensor:
        """The attention A(x) on x's grid, (N, 1, H, W) (or (N, C, H, W) with mid_channels > 1)."""
        levels, h = [], x
        for down, refine in zip(self.down, self.refine):
            h = down(F.max_pool2d(h, 2, ceil_mode=True))
            levels.append(refine(h))
        a = levels[-1]
        for level in reversed(levels[:-1]):
            a = level + resize(a, level.shape[-2:])
        if self.expand is not None:
            a = self.expand(a)
        return resize(a, x.shape[-2:])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.master(x) * self.pyramid(x) + self.gpb(x.mean((2, 3), keepdim=True))
        return self.mix(x, y)

    def applied(self, x: torch.Tensor) -> dict[str, Applied]:
        """The pyramid A(x) that weights master(x): "spatial" (N, H, W) with one channel, "maps" (N, C, H, W)
        with mid_channels > 1. Not a sigmoid: a sum of ReLU levels (a BN output with mid_channels > 1)."""
        a = self.pyramid(x)
        return part("spatial", a[:, 0]) if a.shape[1] == 1 else part("maps", a)


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

    def _attn(self, g: torch.Tensor) -> torch.Tensor:
        """The channel weights (N, C, 1, 1) from g's global context."""
        return self.context(g.mean((2, 3), keepdim=True))

    def forward(self, x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        w = self._attn(g)
        y = F.relu(self.low(x) * w + resize(self.high(g), x.shape[-2:], self.mode))
        return self.mix(x, y)

    def applied(self, x: torch.Tensor, g: torch.Tensor) -> dict[str, Applied]:
        """The context weights on low(x)'s channels as "channel" (N, C): ReLU outputs (≥ 0), not a sigmoid."""
        return part("channel", self._attn(g).flatten(1))
