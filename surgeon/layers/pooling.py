"""Attention pooling: a learned softmax-weighted average in place of average or max pooling.

Each output cell is Σᵢ softmax(sᵢ)·xᵢ over its pooling window, with scores s = W·x from a linear map
of the channels (one score map per head, each head weighting its group of channels). Zero scores give
uniform weights, i.e. exactly the plain average. Computed as pool(x·eˢ) / pool(eˢ) with the op's own
geometry, so global, windowed (kernel/stride/padding) and adaptive pooling all share one formula.

Paper: the windowed form is Local Importance-based Pooling (LIP), Gao et al., ICCV 2019
(arXiv:1908.04156), with a linear score function; the global form is softmax attention pooling
over positions as in attention-based MIL pooling (Ilse et al., ICML 2018, arXiv:1802.04712).
"""
from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from surgeon.layers._util import check_divisible, check_positive_int
from surgeon.layers.applied import Applied, part


class AttentionPool2d(nn.Module):
    """Attention pooling over 2-D positions.

    Args:
        channels: input channels (divisible by `num_heads`).
        num_heads: score maps; head h weights channels [h·C/heads, (h+1)·C/heads).
        output_size: pool to this size (1 = global); ignored when `kernel_size` is given.
        kernel_size, stride, padding, ceil_mode: a windowed pool's geometry.
        flatten: return (N, C) for global pooling instead of (N, C, 1, 1).
    """

    def __init__(self, channels: int, *, num_heads: int = 1, output_size: int | tuple[int, int] = 1,
                 kernel_size: int | tuple[int, int] | None = None, stride: int | tuple[int, int] | None = None,
                 padding: int | tuple[int, int] = 0, ceil_mode: bool = False, flatten: bool = True):
        super().__init__()
        check_positive_int("channels", channels)
        check_positive_int("num_heads", num_heads)
        check_divisible("channels", channels, "num_heads", num_heads)
        self.num_heads = num_heads
        # a raw parameter (not a Conv2d), so global conv re-initialisation leaves the zero init alone
        self.score = nn.Parameter(torch.zeros(num_heads, channels))
        if kernel_size is not None:
            self._pool = partial(F.avg_pool2d, kernel_size=kernel_size, stride=stride or kernel_size,
                                 padding=padding, ceil_mode=ceil_mode)
            self.flatten = False
        else:
            self._pool = partial(F.adaptive_avg_pool2d, output_size=output_size)
            self.flatten = flatten and output_size in (1, (1, 1))

    def weights(self, x: torch.Tensor) -> torch.Tensor:
        """Unnormalised positive weights eˢ (N, heads, H, W), shifted by the per-map maximum for stability."""
        s = torch.einsum("nchw,kc->nkhw", x, self.score)
        return torch.exp(s - s.detach().amax((2, 3), keepdim=True))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        e = self.weights(x)
        e_full = e.repeat_interleave(c // self.num_heads, dim=1)
        out = self._pool(x * e_full) / self._pool(e).repeat_interleave(c // self.num_heads, dim=1)
        return out.flatten(1) if self.flatten else out

    def attention_map(self, x: torch.Tensor) -> torch.Tensor:
        """The normalised weights over all positions (N, heads, H, W), for visualisation."""
        e = self.weights(x)
        return e / e.sum((2, 3), keepdim=True)

    def applied(self, x: torch.Tensor) -> dict[str, Applied]:
        """The pooling weights over all positions (N, H, W), averaged over heads (uniform at init)."""
        return part("pool", self.attention_map(x).mean(1))


class PoolReplacement(nn.Module):
    """Adapts a pooling module to stand in for a pooling op whose per-sample output shape is `shape`
    (e.g. (C,) after a flatten, or (C, 1, 1))."""

    def __init__(self, pool: nn.Module, shape: tuple[int, ...]):
        super().__init__()
        self.pool = pool
        self.shape = tuple(shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(x).reshape(x.shape[0], *self.shape)
