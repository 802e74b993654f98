"""Polarized self-attention (psa): full-resolution channel and spatial attention with softmax-sigmoid gating.

Both branches keep one dimension at full resolution (C/2 channels or H×W positions) and collapse the
other completely; `identity=True` gates their weights (see `surgeon.layers.gate.ZeroGate`).
"""
from __future__ import annotations

import torch
from torch import nn

from surgeon.layers._util import check_choice, check_positive_int
from surgeon.layers.applied import Applied, part
from surgeon.layers.gate import ZeroGate


class _ChannelOnly(nn.Module):
    """A_ch(x) = σ(LN(W_z((W_v x) · softmax_HW(W_q x)))): (N, C, 1, 1) weights."""

    def __init__(self, channels: int, inner: int):
        super().__init__()
        self.wv = nn.Conv2d(channels, inner, 1)
        self.wq = nn.Conv2d(channels, 1, 1)
        self.wz = nn.Conv2d(inner, channels, 1)
        self.ln = nn.LayerNorm(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        v = self.wv(x).flatten(2)  # (N, C/2, HW)
        q = self.wq(x).flatten(2).softmax(dim=-1)  # (N, 1, HW)
        z = self.wz((v * q).sum(-1)[..., None, None])  # (N, C, 1, 1)
        return torch.sigmoid(self.ln(z.flatten(1)))[..., None, None]


class _SpatialOnly(nn.Module):
    """A_sp(x) = σ(softmax_C(gap(W_q x)) · W_v x): (N, 1, H, W) weights."""

    def __init__(self, channels: int, inner: int):
        super().__init__()
        self.wq = nn.Conv2d(channels, inner, 1)
        self.wv = nn.Conv2d(channels, inner, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q = self.wq(x).mean((2, 3)).softmax(dim=1)  # (N, C/2)
        v = self.wv(x)  # (N, C/2, H, W)
        return torch.sigmoid((q[..., None, None] * v).sum(1, keepdim=True))


class PolarizedSelfAttention(ZeroGate):
    """Polarized self-attention: channel-only and spatial-only branches, in parallel or in sequence.

    Paper: Polarized Self-Attention: Towards High-quality Pixel-wise Regression, Liu et al., 2021
    (arXiv:2107.00782), Eqs. 1-5: A_ch = σ(LN(W_z(σ₁(W_v x) × F_SM(σ₂(W_q x))))) and
    A_sp = σ(σ₃(F_SM(σ₁(F_GP(W_q x)))) × σ₂(W_v x)), with W_v, W_q to C/2 channels (W_q to 1 channel in
    the channel branch), 1×1 convs with biases; 'parallel' = x·A_ch + x·A_sp (computed as x·(A_ch + A_sp),
    one product with x), 'sequential' = A_sp(x')·x' with x' = A_ch(x)·x. `identity=True` gates the
    weights with one γ: x·(1 + γ·(A_ch + A_sp − 1)) in parallel, each product in sequence.
    """

    def __init__(self, channels: int, *, mode: str = "parallel", identity: bool = False):
        super().__init__(identity)
        check_positive_int("channels", channels)
        self.mode = check_choice("mode", mode, ("parallel", "sequential"))
        inner = max(channels // 2, 1)
        self.channel = _ChannelOnly(channels, inner)
        self.spatial = _SpatialOnly(channels, inner)

    def _attn(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """A_ch (N, C, 1, 1), A_sp (N, 1, H, W) and the map A_sp was computed on (x' in sequence, else x)."""
        a_ch = self.channel(x)
        if self.mode == "sequential":
            x = x * self.weights(a_ch)
        return a_ch, self.spatial(x), x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a_ch, a_sp, x = self._attn(x)
        if self.mode == "sequential":
            return x * self.weights(a_sp)
        return x * self.weights(a_ch + a_sp)

    def applied(self, x: torch.Tensor) -> dict[str, Applied]:
        """The two branches' sigmoid weights: A_ch as "channel" (N, C) and A_sp as "spatial" (N, H, W).

        In parallel mode the map is multiplied by their sum A_ch + A_sp (in [0, 2]), reported as its two
        terms; in sequence A_sp is the spatial branch's weights for x' = A_ch(x)·x (gated as in forward).
        """
        a_ch, a_sp, _ = self._attn(x)
        return part("channel", a_ch.flatten(1)) | part("spatial", a_sp[:, 0])
