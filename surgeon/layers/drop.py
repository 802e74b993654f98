"""Attention-based drops: regularisers that use the features' own attention in training only."""
from __future__ import annotations

import torch
from torch import nn

from surgeon.layers._util import check_fraction
from surgeon.layers.applied import Applied, part


class ADL(nn.Module):
    """Attention-based Dropout Layer: in training, x · (drop mask or importance map) of A = mean_c(x).

    Paper: Attention-based Dropout Layer for Weakly Supervised Object Localization, Choe & Shim,
    CVPR 2019 (arXiv:1908.10028). Per forward pass, with probability `drop_rate` the drop mask
    1[A < gamma·max A] (per sample), else the importance map σ(A). No parameters; identity in eval.
    """

    # it drops in training by design: only in eval mode does it start as the identity
    identity_in_train = False

    def __init__(self, channels: int | None = None, *, drop_rate: float = 0.75, gamma: float = 0.9):
        super().__init__()
        self.drop_rate = check_fraction("drop_rate", drop_rate)
        self.gamma = check_fraction("gamma", gamma)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return x
        attn = x.mean(1, keepdim=True)
        if float(torch.rand(())) < self.drop_rate:
            peak = attn.flatten(1).amax(1).view(-1, *([1] * (x.dim() - 1)))
            return x * (attn < self.gamma * peak).to(x.dtype)
        return x * torch.sigmoid(attn)

    def applied(self, x: torch.Tensor) -> dict[str, Applied]:
        """The importance map σ(mean_c(x)) (N, H, W) it applies in training when it does not drop (eval: nothing)."""
        return part("spatial", torch.sigmoid(x.mean(1)))

    def extra_repr(self) -> str:
        return f"drop_rate={self.drop_rate}, gamma={self.gamma}"
