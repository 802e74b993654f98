"""Spatial attention: reweight positions of a 2-D feature map."""
from __future__ import annotations

import torch
from torch import nn

from surgeon.layers._util import check_positive_int, get_act


class SpatialAttn(nn.Module):
    """CBAM's spatial attention: x · σ(BN(conv_k×k([max_c(x); mean_c(x)]))).

    Paper: CBAM: Convolutional Block Attention Module, Woo et al., ECCV 2018 (arXiv:1807.06521).
    As in the official code, the conv has no bias and is followed by batch norm (`norm=True`).
    `channels` is accepted for a uniform constructor; the module has no per-channel weights.
    """

    def __init__(self, channels: int | None = None, *, kernel_size: int = 7, norm: bool = True,
                 gate_layer: str = "sigmoid"):
        super().__init__()
        check_positive_int("kernel_size", kernel_size)
        if kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be odd, got {kernel_size}")
        self.conv = nn.Conv2d(2, 1, kernel_size, padding=kernel_size // 2, bias=not norm)
        self.bn = nn.BatchNorm2d(1, eps=1e-5, momentum=0.01) if norm else nn.Identity()
        self.gate = get_act(gate_layer, "gate_layer")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = torch.cat([x.amax(1, keepdim=True), x.mean(1, keepdim=True)], dim=1)
        return x * self.gate(self.bn(self.conv(pooled)))
