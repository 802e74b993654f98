"""Attention-augmented convolution: the output of a convolution with C_out − d_v filters concatenated
(along channels) with d_v channels of multi-head self-attention over all positions, the attention's
logits optionally including 2-D relative position logits (relative width and height embeddings).

Paper: Bello et al., Attention Augmented Convolutional Networks, ICCV 2019 (arXiv:1904.09925).
Defaults are the paper's ResNet setting κ = 2υ = 0.2 (d_k = 0.2·C_out, d_v = 0.1·C_out), N_h = 8 heads,
relative logits on. NOTE: d_k and d_v are rounded to multiples of N_h (at least N_h). For a strided conv,
attention runs on the conv's output grid: the 1×1 q/k/v projections are average-pooled (adaptively) to it,
which equals projecting the pooled input. Attention uses `scaled_dot_product_attention`; relative logits
go in as W + H extra query/key features (one-hot key positions) rather than an N×N additive mask, so memory
stays O(N·(d + H + W)) instead of O(N²).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from surgeon.errors import OptionError
from surgeon.layers._util import check_bool, check_divisible, check_positive_int, check_ratio
from surgeon.layers.applied import Applied, centre, part
from surgeon.layers.gate import GatedReplacement


def _depth(ratio: float, explicit: int | None, out_channels: int, heads: int, name: str) -> int:
    if explicit is not None:
        check_positive_int(f"{name}_channels", explicit)
        check_divisible(f"{name}_channels", explicit, "heads", heads)
        return explicit
    check_ratio(f"{name}_ratio", ratio)
    return max(heads, int(round(ratio * out_channels / heads)) * heads)


def relative_features(q: torch.Tensor, rel_w: torch.Tensor, rel_h: torch.Tensor, height: int,
                      width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """2-D relative position logits as extra query and key features, so that no N×N mask is built.

    logit[(i, j), (k, l)] = q_ij · rel_w[l − j + W − 1] + q_ij · rel_h[k − i + H − 1] equals the dot product
    of the query features (q_ij · rel_w[l' − j + W − 1] for l' < W, q_ij · rel_h[k' − i + H − 1] for k' < H)
    with the key features (one-hot of l, one-hot of k).

    Args:
        q: (B, heads, N, d) queries (already scaled as the content logits are), N = height·width.
        rel_w: (2W − 1, d); rel_h: (2H − 1, d).
    Returns:
        ((B, heads, N, W + H) query features, (N, W + H) key features).
    """
    b, nh, n, d = q.shape
    q = q.reshape(b, nh, height, width, d)
    jw = torch.arange(width, device=q.device)
    ih = torch.arange(height, device=q.device)
    # logits against every relative offset, then per query the offsets to each key column / row
    lw = (q @ rel_w.transpose(0, 1))[:, :, :, jw[:, None], jw[None, :] - jw[:, None] + width - 1]
    lh = (q @ rel_h.transpose(0, 1)).transpose(2, 3)[:, :, :, ih[:, None], ih[None, :] - ih[:, None] + height - 1]
    lh = lh.transpose(2, 3)  # (B, nh, H, W, H_key)
    q_rel = torch.cat([lw, lh], dim=-1).reshape(b, nh, n, width + height)
    pos = torch.arange(n, device=q.device)
    k_rel = torch.cat([F.one_hot(pos % width, width), F.one_hot(pos // width, height)], dim=-1).to(q.dtype)
    return q_rel, k_rel


def _attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """scaled_dot_product_attention with q/k and v padded to one head size.

    NOTE: torch's fused CPU kernel needs equal q/k and v head sizes; otherwise it falls back to the math
    path, which materialises the (B, heads, N, N) matrix. Zero padding changes neither the logits nor
    the kept value channels.
    """
    dq, dv = q.shape[-1], v.shape[-1]
    if dq > dv:
        v = F.pad(v, (0, dq - dv))
    elif dv > dq:
        q, k = F.pad(q, (0, dv - dq)), F.pad(k, (0, dv - dq))
    return F.scaled_dot_product_attention(q, k, v, scale=scale)[..., :dv]


class AAConv2d(nn.Module):
    """Attention-augmented 2-D convolution (replaces an `nn.Conv2d`; same output shape).

    Args:
        channels: input channels.
        out_channels: output channels C_out (default: `channels`).
        kernel_size, stride, padding, dilation, bias: of the convolution part (padding default k // 2).
        heads: attention heads N_h (paper: 8).
        key_ratio: κ = d_k / C_out (paper: 0.2); or `key_channels` = d_k.
        value_ratio: υ = d_v / C_out (paper: 0.1); or `value_channels` = d_v (< C_out).
        relative: add 2-D relative position logits (paper: on).
        size: the output grid (H, W) the relative embeddings are made for; None: the first input's.
    """

    def __init__(self, channels: int, *, out_channels: int | None = None, kernel_size: int | tuple = 3,
                 stride: int | tuple = 1, padding: int | tuple | None = None, dilation: int | tuple = 1,
                 bias: bool = True, heads: int = 8, key_ratio: float = 0.2, value_ratio: float = 0.1,
                 key_channels: int | None = None, value_channels: int | None = None, relative: bool = True,
                 size: tuple[int, int] | None = None):
        super().__init__()
        out_channels = channels if out_channels is None else out_channels
        for name, v in (("channels", channels), ("out_channels", out_channels), ("heads", heads)):
            check_positive_int(name, v)
        check_bool("relative", relative)
        dk = _depth(key_ratio, key_channels, out_channels, heads, "key")
        dv = _depth(value_ratio, value_channels, out_channels, heads, "value")
        if dv >= out_channels:
            raise OptionError(f"value channels d_v={dv} (heads={heads}) leave no convolution channels of "
                             f"out_channels={out_channels}; lower value_ratio or heads")
        k = kernel_size if isinstance(kernel_size, tuple) else (kernel_size, kernel_size)
        if padding is None:
            padding = (k[0] // 2, k[1] // 2)
        self.heads, self.dk, self.dv, self.relative = heads, dk, dv, relative
        self.out_channels = out_channels
        self.conv = nn.Conv2d(channels, out_channels - dv, kernel_size, stride=stride, padding=padding,
                              dilation=dilation, bias=bias)
        self.qkv = nn.Conv2d(channels, 2 * dk + dv, 1)
        self.proj = nn.Conv2d(dv, dv, 1)  # W^O
        if relative:
            self.rel_std = (dk // heads) ** -0.5
        # relative embeddings are sized to `size`, else to the first input's grid (no hard-coded sizes)
        self.rel_w: nn.Parameter | None = None
        self.rel_h: nn.Parameter | None = None
        if relative and size is not None:
            self.init_relative(*size)

    def init_relative(self, height: int, width: int) -> None:
        """Create the relative embeddings for an output grid (done on the first call when absent)."""
        d = self.dk // self.heads
        dev = self.qkv.weight.device
        self.rel_w = nn.Parameter(torch.randn(2 * width - 1, d, device=dev) * self.rel_std)
        self.rel_h = nn.Parameter(torch.randn(2 * height - 1, d, device=dev) * self.rel_std)

    def _qkv(self, x: torch.Tensor, size: tuple[int, int]):
        """(q, k, v, scale) per head, (B, heads, H·W, d), with the relative logits' features in q and k."""
        b = x.shape[0]
        qkv = self.qkv(x)
        if tuple(qkv.shape[-2:]) != tuple(size):
            qkv = F.adaptive_avg_pool2d(qkv, size)
        h, w = size
        n, nh = h * w, self.heads
        q, k, v = torch.split(qkv, [self.dk, self.dk, self.dv], dim=1)
        q = q.reshape(b, nh, self.dk // nh, n).transpose(-1, -2)
        k = k.reshape(b, nh, self.dk // nh, n).transpose(-1, -2)
        v = v.reshape(b, nh, self.dv // nh, n).transpose(-1, -2)
        if self.relative:
            if self.rel_w is None or self.rel_w.shape[0] != 2 * w - 1 or self.rel_h.shape[0] != 2 * h - 1:
                raise RuntimeError(f"relative embeddings are sized for another grid; call init_relative({h}, {w})")
            q = q * (self.dk // nh) ** -0.5
            q_rel, k_rel = relative_features(q, self.rel_w, self.rel_h, h, w)
            q = torch.cat([q, q_rel], dim=-1)
            k = torch.cat([k, k_rel.expand(b, nh, n, w + h)], dim=-1)
            return q, k, v, 1.0
        return q, k, v, (self.dk // nh) ** -0.5

    def attend(self, x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """The d_v attention channels on the output grid `size`, shape (B, d_v, *size)."""
        q, k, v, scale = self._qkv(x, size)
        out = _attention(q, k, v, scale=scale)  # (B, nh, N, dv/nh)
        return self.proj(out.transpose(-1, -2).reshape(x.shape[0], self.dv, *size))

    def applied(self, x: torch.Tensor) -> dict[str, Applied]:
        """The centre output position's attention row over the output grid (N, H, W), averaged over heads."""
        size = tuple(self.conv(x).shape[-2:])
        if self.relative and self.rel_w is None:
            self.init_relative(*size)
        q, k, _, scale = self._qkv(x, size)
        i = centre(*size)
        row = torch.softmax(torch.einsum("bhd,bhmd->bhm", q[:, :, i], k) * scale, -1).mean(1)
        return part("self", row.reshape(x.shape[0], *size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        if self.relative and self.rel_w is None:
            self.init_relative(*y.shape[-2:])
        return torch.cat([y, self.attend(x, tuple(y.shape[-2:]))], dim=1)


class AAConvReplacement(GatedReplacement):
    """Identity init for an AAConv2d replacing a conv: y = orig + γ·(aaconv(x) − orig), γ = 0 at init.

    `forward(x, orig)` receives the replaced conv's input and output; the AAConv2d's conv part starts
    from the original conv's first C_out − d_v filters, so those channels also agree at any γ.
    """


class AAConvPaper(nn.Module):
    """The paper's AAConv2d in place of a conv: forward(x) only (the original conv no longer runs)."""

    def __init__(self, attn: AAConv2d):
        super().__init__()
        self.attn = attn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.attn(x)


def from_conv(conv: nn.Conv2d, **options) -> AAConv2d:
    """An AAConv2d with `conv`'s geometry; its conv part copies conv's first C_out − d_v filters."""
    aa = AAConv2d(conv.in_channels, out_channels=conv.out_channels, kernel_size=conv.kernel_size,
                  stride=conv.stride, padding=conv.padding, dilation=conv.dilation, bias=conv.bias is not None,
                  **options)
    keep = aa.conv.out_channels
    with torch.no_grad():
        aa.conv.weight.copy_(conv.weight[:keep])
        if conv.bias is not None:
            aa.conv.bias.copy_(conv.bias[:keep])
    return aa

