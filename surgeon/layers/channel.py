"""Channel attention: reweight channels from globally pooled statistics.

Works on any channels-first tensor (N, C, ...), so 1-D, 2-D and 3-D feature maps alike.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from surgeon.layers._util import check_positive_int, get_act, reduced_channels, spatial_dims


class SEModule(nn.Module):
    """Squeeze-and-Excitation: x · σ(W₂ δ(W₁ avgpool(x))).

    Paper: Squeeze-and-Excitation Networks, Hu et al., CVPR 2018 (arXiv:1709.01507).
    The hidden width is exactly channels·rd_ratio (rd_divisor=1), as in the paper; timm rounds to
    multiples of 8, which pass as rd_divisor=8. The FC layers are nn.Linear (same parameters as 1×1 convs).
    """

    def __init__(self, channels: int, *, rd_ratio: float = 1 / 16, rd_channels: int | None = None,
                 rd_divisor: int = 1, act_layer: str = "relu", gate_layer: str = "sigmoid", bias: bool = True):
        super().__init__()
        rd = reduced_channels(channels, rd_ratio, rd_channels, rd_divisor)
        self.fc1 = nn.Linear(channels, rd, bias=bias)
        self.act = get_act(act_layer)
        self.fc2 = nn.Linear(rd, channels, bias=bias)
        self.gate = get_act(gate_layer, "gate_layer")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = x.mean(spatial_dims(x))
        w = self.gate(self.fc2(self.act(self.fc1(s))))
        return x * w.view(*w.shape, *([1] * (x.dim() - 2)))


def eca_kernel_size(channels: int, gamma: float = 2, beta: float = 1) -> int:
    """ECA's adaptive kernel size: the odd number nearest to |log2(C)/γ + b/γ| (rounded up to odd)."""
    t = int(abs(math.log2(channels) / gamma + beta / gamma))
    return t if t % 2 else t + 1


class EcaModule(nn.Module):
    """Efficient Channel Attention: a 1-D convolution across pooled channels, no reduction.

    Paper: ECA-Net: Efficient Channel Attention for Deep Convolutional Neural Networks, Wang et al.,
    CVPR 2020 (arXiv:1910.03151). Kernel size adapts to the channel count (γ=2, b=1) unless given.
    """

    def __init__(self, channels: int, *, kernel_size: int | None = None, gamma: float = 2, beta: float = 1,
                 gate_layer: str = "sigmoid"):
        super().__init__()
        check_positive_int("channels", channels)
        if kernel_size is None:
            if gamma <= 0:
                raise ValueError(f"gamma must be positive, got {gamma!r}")
            kernel_size = eca_kernel_size(channels, gamma, beta)
        check_positive_int("kernel_size", kernel_size)
        if kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be odd, got {kernel_size}")
        self.kernel_size = kernel_size
        self.conv = nn.Conv1d(1, 1, kernel_size, padding=(kernel_size - 1) // 2, bias=False)
        self.gate = get_act(gate_layer, "gate_layer")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = x.mean(spatial_dims(x)).unsqueeze(1)  # (N, 1, C)
        w = self.gate(self.conv(s)).squeeze(1)
        return x * w.view(*w.shape, *([1] * (x.dim() - 2)))
