"""Self-attention blocks that stand in for a convolution: bot (global MHSA), halo (blocked local), lambda.

Each maps (N, C, H, W) to (N, C, H, W) on any size and is inserted as a C→C block (their papers replace
a ResNet bottleneck's 3×3 conv with them); none is a product of x with weights, so identity init wraps
them in the output gate x + γ·(attn(x) − x). Head counts that do not divide the channels are lowered to
the largest count that does.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from surgeon.layers._util import check_feat_size, check_odd_kernel, check_positive_int
from surgeon.layers.applied import Applied, centre, part


def same_format(out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """`out` in x's memory format: a channels_last map stays channels_last through reshapes."""
    if x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return out.contiguous(memory_format=torch.channels_last)
    return out


def _heads(channels: int, num_heads: int) -> int:
    check_positive_int("channels", channels)
    return math.gcd(channels, check_positive_int("num_heads", num_heads))


def _rel_index(queries: int, keys: int, offset: int, device) -> torch.Tensor:
    """(queries, keys) index into a table of relative positions: key j − query i + offset."""
    return torch.arange(keys, device=device)[None, :] - torch.arange(queries, device=device)[:, None] + offset


def _rel_logits(q: torch.Tensor, table_h: torch.Tensor, table_w: torch.Tensor, idx_h: torch.Tensor,
                idx_w: torch.Tensor) -> torch.Tensor:
    """Relative position logits q·(r_h[Δy] + r_w[Δx]) for queries q (..., Y, X, d) and keys (Ky, Kx):
    (..., Y·X, Ky·Kx)."""
    lh = torch.einsum("...yxd,ykd->...yxk", q, table_h[idx_h])
    lw = torch.einsum("...yxd,xld->...yxl", q, table_w[idx_w])
    logits = lh[..., :, None] + lw[..., None, :]  # (..., Y, X, Ky, Kx)
    return logits.flatten(-2).flatten(-3, -2)


def _resample(table: torch.Tensor, length: int) -> torch.Tensor:
    """A (L, d) relative-position table resampled linearly to `length` rows (unchanged when it has them)."""
    if table.shape[0] == length:
        return table
    return F.interpolate(table.t()[None], size=length, mode="linear", align_corners=True)[0].t()


class BottleneckMHSA(nn.Module):
    """BoT's multi-head self-attention: every position attends to all, with 2-D relative position logits.

    Paper: Bottleneck Transformers for Visual Recognition, Srinivas et al., CVPR 2021 (arXiv:2101.11605),
    Fig. 4: q, k, v by 1×1 convs without bias, softmax(q·kᵀ/√d + q·rᵀ)·v with r = r_h[Δy] + r_w[Δx]
    (relative logits, the paper's choice), 4 heads, no output projection (timm's `BottleneckAttn`). The
    relative tables are built for `feat_size` (the site's size) and resampled linearly on other sizes.
    """

    def __init__(self, channels: int, *, num_heads: int = 4, feat_size: tuple[int, int] = (7, 7)):
        super().__init__()
        self.num_heads = _heads(channels, num_heads)
        self.dim_head = channels // self.num_heads
        h, w = check_feat_size(feat_size)
        self.qkv = nn.Conv2d(channels, channels * 3, 1, bias=False)
        self.rel_h = nn.Parameter(torch.randn(2 * h - 1, self.dim_head) * self.dim_head ** -0.5)
        self.rel_w = nn.Parameter(torch.randn(2 * w - 1, self.dim_head) * self.dim_head ** -0.5)

    def _attn(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The attention (N, heads, HW, HW), softmax over the keys, and the values (N, heads, d, HW)."""
        n, c, h, w = x.shape
        q, k, v = self.qkv(x).view(n, 3, self.num_heads, self.dim_head, h, w).unbind(1)
        q = q.permute(0, 1, 3, 4, 2)  # (N, heads, H, W, d)
        k, v = k.flatten(3), v.flatten(3)  # (N, heads, d, HW)
        logits = (q.flatten(2, 3) @ k) * self.dim_head ** -0.5
        logits = logits + _rel_logits(q, _resample(self.rel_h, 2 * h - 1), _resample(self.rel_w, 2 * w - 1),
                                      _rel_index(h, h, h - 1, x.device), _rel_index(w, w, w - 1, x.device))
        return logits.softmax(dim=-1), v

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        attn, v = self._attn(x)
        out = attn @ v.transpose(-1, -2)  # (N, heads, HW, d)
        return same_format(out.transpose(-1, -2).reshape(n, c, h, w), x)

    def applied(self, x: torch.Tensor) -> dict[str, Applied]:
        """The centre position's attention row over the map as "self" (N, H, W), averaged over the heads."""
        n, _, h, w = x.shape
        return part("self", self._attn(x)[0][:, :, centre(h, w)].mean(1).view(n, h, w))


class HaloAttn(nn.Module):
    """Halo attention: queries in b×b blocks attend to their (b + 2h)² window, with relative position logits.

    Paper: Scaling Local Self-Attention for Parameter Efficient Visual Backbones, Vaswani et al., CVPR 2021
    (arXiv:2103.12731): blocked local attention, block 8, halo 3, 8 heads, q and kv by 1×1 convs without
    bias, no output projection (timm's `HaloAttn`). Maps whose sides are not multiples of the block are
    padded and cropped back; window positions outside the map are masked out of the softmax (timm and the
    paper attend to the zero padding instead).
    """

    def __init__(self, channels: int, *, block_size: int = 8, halo_size: int = 3, num_heads: int = 8):
        super().__init__()
        self.num_heads = _heads(channels, num_heads)
        self.dim_head = channels // self.num_heads
        self.block = check_positive_int("block_size", block_size)
        self.halo = check_positive_int("halo_size", halo_size) if halo_size else 0
        win = self.block + 2 * self.halo
        self.q = nn.Conv2d(channels, channels, 1, bias=False)
        self.kv = nn.Conv2d(channels, channels * 2, 1, bias=False)
        # offsets key − query within a window run from −(b − 1) to win − 1: b + win − 1 rows
        self.rel_h = nn.Parameter(torch.randn(self.block + win - 1, self.dim_head) * self.dim_head ** -0.5)
        self.rel_w = nn.Parameter(torch.randn(self.block + win - 1, self.dim_head) * self.dim_head ** -0.5)

    def _windows(self, t: torch.Tensor) -> torch.Tensor:
        """(N, C, Hp, Wp) → (N, C, nH, nW, win²): each block's window, halo included (zeros outside)."""
        b, win = self.block, self.block + 2 * self.halo
        t = F.pad(t, [self.halo] * 4)
        return t.unfold(2, win, b).unfold(3, win, b).flatten(-2)

    def _attn(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The attention (N, heads, nH, nW, b², win²) of each block's queries to its window, softmax over the
        window (positions outside the map get 0), and the values (N, heads, nH, nW, win², d)."""
        n, c, h, w = x.shape
        b, heads, d = self.block, self.num_heads, self.dim_head
        ph, pw = -h % b, -w % b
        xp = F.pad(x, (0, pw, 0, ph))
        nh, nw = (h + ph) // b, (w + pw) // b
        q = self.q(xp).view(n, heads, d, nh, b, nw, b).permute(0, 1, 3, 5, 4, 6, 2)  # (N, heads, nH, nW, b, b, d)
        kv = self._windows(self.kv(xp)).view(n, 2, heads, d, nh, nw, -1)
        k, v = kv[:, 0].permute(0, 1, 3, 4, 2, 5), kv[:, 1].permute(0, 1, 3, 4, 5, 2)  # (.., d, win²), (.., win², d)
        logits = (q.flatten(4, 5) @ k) * d ** -0.5  # (N, heads, nH, nW, b², win²)
        idx = _rel_index(b, b + 2 * self.halo, b - 1, x.device)
        logits = logits + _rel_logits(q, self.rel_h, self.rel_w, idx, idx)
        inside = self._windows(F.pad(x.new_ones(1, 1, h, w), (0, pw, 0, ph)))[0, 0] > 0  # (nH, nW, win²)
        logits = logits.masked_fill(~inside[:, :, None, :], float("-inf"))
        return logits.softmax(dim=-1), v

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        b, heads, d = self.block, self.num_heads, self.dim_head
        ph, pw = -h % b, -w % b
        nh, nw = (h + ph) // b, (w + pw) // b
        attn, v = self._attn(x)
        out = attn @ v  # (N, heads, nH, nW, b², d)
        out = out.view(n, heads, nh, nw, b, b, d).permute(0, 1, 6, 2, 4, 3, 5).reshape(n, c, h + ph, w + pw)
        return same_format(out[:, :, :h, :w], x)

    def applied(self, x: torch.Tensor) -> dict[str, Applied]:
        """The centre position's attention row as "self" (N, H, W), averaged over the heads: its block's window
        placed on the map, 0 elsewhere (the window's positions outside the map have weight 0)."""
        n, _, h, w = x.shape
        b, win = self.block, self.block + 2 * self.halo
        cy, cx = h // 2, w // 2
        by, bx = cy // b, cx // b
        row = self._attn(x)[0][:, :, by, bx, (cy % b) * b + cx % b].mean(1).view(n, win, win)
        # on the map padded to whole blocks and by the halo on every side, window (by, bx) starts at (by·b, bx·b)
        canvas = row.new_zeros(n, h + (-h % b) + 2 * self.halo, w + (-w % b) + 2 * self.halo)
        canvas[:, by * b:by * b + win, bx * b:bx * b + win] = row
        return part("self", canvas[:, self.halo:self.halo + h, self.halo:self.halo + w])


class LambdaLayer(nn.Module):
    """Lambda layer: content and position lambdas, linear functions that each query applies to itself.

    Paper: LambdaNetworks: Modeling Long-Range Interactions Without Attention, Bello, ICLR 2021
    (arXiv:2102.08602), Fig. 3 and Appendix: q, k, v by one 1×1 conv without bias, BN on q and v,
    softmax over positions on k; content lambda λc = K̄ᵀV shared by all queries; position lambdas from a
    local r×r context by the lambda convolution (r×r, per value channel); y = qᵀ(λc + λp) per head.
    dim_k = 16, 4 heads, r = 9 (timm's `LambdaLayer`); value depth C / heads.
    """

    def __init__(self, channels: int, *, dim_qk: int = 16, num_heads: int = 4, r: int = 9):
        super().__init__()
        self.num_heads = _heads(channels, num_heads)
        self.dim_qk = check_positive_int("dim_qk", dim_qk)
        check_odd_kernel("r", r)
        self.dim_v = channels // self.num_heads
        self.qkv = nn.Conv2d(channels, self.num_heads * dim_qk + dim_qk + self.dim_v, 1, bias=False)
        self.norm_q = nn.BatchNorm2d(self.num_heads * dim_qk)
        self.norm_v = nn.BatchNorm2d(self.dim_v)
        # the paper's 3-D lambda conv with an r×r×1 kernel, as a 2-D conv over each value channel (4-D weights)
        self.conv_lambda = nn.Conv2d(1, dim_qk, r, padding=r // 2)

    def _attn(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q (N, heads, M, K), the keys softmaxed over the M positions (N, K, M), v (N, M, V)."""
        n, c, h, w = x.shape
        m, kq = h * w, self.dim_qk
        q, k, v = torch.split(self.qkv(x), [self.num_heads * kq, kq, self.dim_v], dim=1)
        q = self.norm_q(q).view(n, self.num_heads, kq, m).transpose(-1, -2)  # (N, heads, M, K)
        v = self.norm_v(v).flatten(2).transpose(-1, -2)  # (N, M, V)
        k = k.flatten(2).softmax(dim=-1)  # (N, K, M)
        return q, k, v

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        m, kq = h * w, self.dim_qk
        q, k, v = self._attn(x)
        content = q @ (k @ v).unsqueeze(1)  # (N, heads, M, V)
        lam = self.conv_lambda(v.transpose(1, 2).reshape(n * self.dim_v, 1, h, w))  # (N·V, K, H, W)
        lam = lam.view(n, self.dim_v, kq, m).permute(0, 3, 2, 1).unsqueeze(1)  # (N, 1, M, K, V)
        position = (q.unsqueeze(-2) @ lam).squeeze(-2)  # (N, heads, M, V)
        return same_format((content + position).transpose(-1, -2).reshape(n, c, h, w), x)

    def applied(self, x: torch.Tensor) -> dict[str, Applied]:
        """The normalised keys K̄ as "maps" (N, K, H, W): each a softmax over the positions (summing to 1), the
        weights with which the content lambda λc = K̄ᵀV pools the values, shared by every query.

        A lambda layer has no per-query attention row: each query applies the linear maps λc + λp to
        itself, and the position lambdas λp are a learned convolution, not normalised weights, so they
        are not reported.
        """
        n, _, h, w = x.shape
        return part("maps", self._attn(x)[1].view(n, -1, h, w))
