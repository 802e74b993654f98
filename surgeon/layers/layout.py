"""Run a channels-first attention on a channels-last tensor: NHWC feature maps and (N, L, C) tokens.

`ChannelsLast(module)` moves the last dim to dim 1, calls the module, and moves it back. Both moves are
views (no copy, exact), so a module that starts as the identity stays exactly the identity.
"""
from __future__ import annotations

import torch
from torch import nn


class ChannelsLast(nn.Module):
    """`module` (an attention over (N, C, ...)) applied to x of shape (N, ..., C): channels last.

    The inner module's parameters keep their names under `.module` (e.g. `se.module.fc1.weight`).
    """

    def __init__(self, module: nn.Module):
        super().__init__()
        self.module = module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.module(x.movedim(-1, 1)).movedim(1, -1)
