"""Self-attention on feature maps: non-local, DANet, CCNet (criss-cross) and EMANet (EM attention).

Every block here maps an (N, C, H, W) map to the same shape and ends in a residual connection, so
each can be dropped into a hand-written model. None of them materialises the N×N (N = H·W)
attention matrix where the paper's arithmetic allows otherwise: softmax attention runs through the
fused kernels of `F.scaled_dot_product_attention`, the dot-product non-local form is reassociated to θ·(φᵀg),
the concatenation form sorts its pairwise scores, and criss-cross attention keeps per-row and
per-column energies only.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from surgeon.layers._util import check_bool, check_choice, check_number, check_positive_int, reduced_channels
from surgeon.layers.applied import Applied, centre, part, query_row
from surgeon.layers.gate import ZeroGate

NONLOCAL_MODES = ("embedded_gaussian", "gaussian", "dot", "concat")


def _tokens(x: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, H·W, C), contiguous.

    NOTE: contiguous matters: given a transposed view, `scaled_dot_product_attention` silently falls
    back to its math path on CPU, which materialises the N×N matrix (1.4 GB instead of ~0.1 GB at 96²).
    """
    return x.flatten(2).transpose(1, 2).contiguous()


def _attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """softmax(q·kᵀ)·v, unscaled, for (B, N, d) tokens, through SDPA's fused (O(N)-memory) kernels.

    The fused CPU kernel needs one width for q, k and v, else SDPA silently takes its N×N math path.
    A narrower v is zero-padded to q's width; a wider one (DANet: C/8 for q, k, C for v) is cut into
    heads of q's width that share q and k (expanded, not copied): q·kᵀ is recomputed per head, but
    memory stays O(N).
    """
    b, n, dq = q.shape
    m, dv = v.shape[1], v.shape[2]
    if dv == dq:
        return F.scaled_dot_product_attention(q, k, v, scale=1.0)
    heads = -(-dv // dq)
    v = F.pad(v, (0, heads * dq - dv)).view(b, m, heads, dq).transpose(1, 2)
    q, k = q.unsqueeze(1).expand(b, heads, n, dq), k.unsqueeze(1).expand(b, heads, m, dq)
    y = F.scaled_dot_product_attention(q, k, v, scale=1.0)
    return y.transpose(1, 2).reshape(b, n, heads * dq)[..., :dv]




def _concat_attention(a: torch.Tensor, b: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """y_i = Σ_j ReLU(a_i + b_j)·g_j for a (B, N), b (B, M), g (B, M, D), without an N×M matrix.

    ReLU(a_i + b_j) is non-zero exactly where b_j > −a_i, so with b sorted ascending the sum is
    a_i·Σ_{j≥k} g_j + Σ_{j≥k} b_j·g_j for k = the first index where b_j > −a_i: suffix sums plus a
    binary search, O((N + M)·log M·D) time and O((N + M)·D) memory.
    """
    # 1. sort the key scores and carry the values along
    b_sorted, order = b.sort(dim=1)
    g_sorted = g.gather(1, order.unsqueeze(-1).expand_as(g))
    # 2. suffix sums of g and b·g, with a zero row for "no key passes the ReLU"
    zero = g.new_zeros(g.shape[0], 1, g.shape[2])
    suffix_g = torch.cat([g_sorted.flip(1).cumsum(1).flip(1), zero], 1)
    suffix_bg = torch.cat([(b_sorted.unsqueeze(-1) * g_sorted).flip(1).cumsum(1).flip(1), zero], 1)
    # 3. for each query, where its ReLU starts to pass
    start = torch.searchsorted(b_sorted.contiguous(), (-a).contiguous(), right=True)
    start = start.unsqueeze(-1).expand(-1, -1, g.shape[2])
    return a.unsqueeze(-1) * suffix_g.gather(1, start) + suffix_bg.gather(1, start)


class NonLocal2d(nn.Module):
    """Non-local block: z = x + BN(W_z·y), y_i = Σ_j f(x_i, x_j)·g(x_j) / C(x) over all positions j.

    Paper: Non-local Neural Networks, Wang et al., CVPR 2018 (arXiv:1711.07971).
    `mode` picks f: 'embedded_gaussian' (softmax of θᵀφ, the default), 'gaussian' (softmax of xᵢᵀxⱼ),
    'dot' (θᵀφ / N) or 'concat' (ReLU(w·[θ; φ]) / N). θ, φ, g are 1×1 convs to channels/2; `sub_sample`
    max-pools φ and g by 2 (the paper's subsampling trick, off by default). The BN after W_z starts
    with zero scale as in the paper, so the block starts as the identity. There is no 1/√d scaling,
    as in the paper (timm's NonLocalAttn scales). NOTE: a global re-initialisation that resets
    BatchNorm weights to 1 (`model.apply(init_fn)`) also undoes that identity start.
    """

    def __init__(self, channels: int, *, mode: str = "embedded_gaussian", rd_ratio: float = 1 / 2,
                 rd_channels: int | None = None, rd_divisor: int = 1, sub_sample: bool = False):
        super().__init__()
        check_choice("mode", mode, NONLOCAL_MODES)
        check_bool("sub_sample", sub_sample)
        rd = reduced_channels(channels, rd_ratio, rd_channels, rd_divisor)
        self.mode = mode
        if mode != "gaussian":
            self.theta = nn.Conv2d(channels, rd, 1)
            self.phi = nn.Conv2d(channels, rd, 1)
        if mode == "concat":
            self.concat_project = nn.Conv2d(2 * rd, 1, 1, bias=False)  # w_f, split into θ and φ halves
        self.g = nn.Conv2d(channels, rd, 1)
        self.pool = nn.MaxPool2d(2, ceil_mode=True) if sub_sample else nn.Identity()
        self.z = nn.Conv2d(rd, channels, 1)
        self.norm = nn.BatchNorm2d(channels)
        nn.init.zeros_(self.norm.weight)

    def attend(self, x: torch.Tensor) -> torch.Tensor:
        """y before W_z: (B, C, H, W) -> (B, rd, H, W)."""
        b, _, h, w = x.shape
        g = _tokens(self.pool(self.g(x)))
        if self.mode == "gaussian":
            q, k = _tokens(x), _tokens(self.pool(x))
        else:
            q, k = _tokens(self.theta(x)), _tokens(self.pool(self.phi(x)))
        if self.mode in ("embedded_gaussian", "gaussian"):
            y = _attention(q, k, g)
        elif self.mode == "dot":
            y = q @ (k.transpose(1, 2) @ g) / k.shape[1]  # (θᵀφ)·g = θ·(φᵀg): no N×N matrix
        else:
            wf = self.concat_project.weight.flatten()
            rd = q.shape[-1]
            y = _concat_attention(q @ wf[:rd], k @ wf[rd:], g) / k.shape[1]
        return y.transpose(1, 2).reshape(b, -1, h, w)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.norm(self.z(self.attend(x)))

    def applied(self, x: torch.Tensor) -> dict[str, Applied]:
        """The centre position's weights f(x_c, x_j)/C(x) over the key grid (N, H', W'), H' = H/2 with sub_sample."""
        keys = self.pool(x if self.mode == "gaussian" else self.phi(x))
        q, k = _tokens(x if self.mode == "gaussian" else self.theta(x)), _tokens(keys)
        i = centre(*x.shape[-2:])
        if self.mode in ("embedded_gaussian", "gaussian"):
            row = query_row(q, k, i)
        elif self.mode == "dot":
            row = torch.einsum("bd,bmd->bm", q[:, i], k) / k.shape[1]
        else:
            wf = self.concat_project.weight.flatten()
            rd = q.shape[-1]
            row = F.relu(q[:, i] @ wf[:rd, None] + k @ wf[rd:]) / k.shape[1]
        return part("self", row.reshape(x.shape[0], *keys.shape[-2:]))


class PositionAttn(ZeroGate):
    """DANet's position attention: x + γ·(V·softmax(QᵀK)ᵀ), Q, K 1×1 convs to C/8, V to C, γ = 0."""

    form, branch_out = "add", "value"  # the output is linear in V

    def __init__(self, channels: int, *, rd_ratio: float = 1 / 8, rd_channels: int | None = None,
                 rd_divisor: int = 1):
        super().__init__()
        rd = reduced_channels(channels, rd_ratio, rd_channels, rd_divisor)
        self.query = nn.Conv2d(channels, rd, 1)
        self.key = nn.Conv2d(channels, rd, 1)
        self.value = nn.Conv2d(channels, channels, 1)

    def attend(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = _tokens(self.query(x)), _tokens(self.key(x)), _tokens(self.value(x))
        return _attention(q, k, v).transpose(1, 2).reshape(x.shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.add(x, self.attend(x))


class ChannelSelfAttn(ZeroGate):
    """DANet's channel attention: x + γ·(softmax(X·Xᵀ)·X) over the C×C channel affinities, γ = 0.

    Follows the paper's softmax(X·Xᵀ); the official code feeds softmax(rowmax − X·Xᵀ) instead.
    """

    form = "add"

    def __init__(self, channels: int):
        super().__init__()
        check_positive_int("channels", channels)

    def attend(self, x: torch.Tensor) -> torch.Tensor:
        f = x.flatten(2)  # (B, C, N); the C×C affinity matrix is small, plain bmm/softmax suffices
        return torch.bmm(torch.softmax(torch.bmm(f, f.transpose(1, 2)), -1), f).reshape(x.shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.add(x, self.attend(x))


class DualAttention(nn.Module):
    """DANet's dual attention: position and channel self-attention, summed: x + γ_p·PAM(x) + γ_c·CAM(x).

    Paper: Dual Attention Network for Scene Segmentation, Fu et al., CVPR 2019 (arXiv:1809.02983).
    Each module has its own learned γ starting at 0, so the block starts as the identity. Retrofitted
    shape-preserving: the paper's head convolutions around the two modules (3×3 reduce, 3×3 conv after
    each) are left out and the two attention outputs are summed onto x (the paper's sum fusion).
    """

    def __init__(self, channels: int, *, rd_ratio: float = 1 / 8, rd_channels: int | None = None,
                 rd_divisor: int = 1):
        super().__init__()
        self.position = PositionAttn(channels, rd_ratio=rd_ratio, rd_channels=rd_channels, rd_divisor=rd_divisor)
        self.channel = ChannelSelfAttn(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.channel.add(self.position.add(x, self.position.attend(x)), self.channel.attend(x))

    def applied(self, x: torch.Tensor) -> dict[str, Applied]:
        """The position attention's row for the centre position (N, H, W)."""
        p = self.position
        row = query_row(_tokens(p.query(x)), _tokens(p.key(x)), centre(*x.shape[-2:]))
        return part("self", row.reshape(x.shape[0], *x.shape[-2:]), "position")


class CrissCrossAttn(ZeroGate):
    """Recurrent criss-cross attention: each position attends to its row and column, `recurrence` times.

    Paper: CCNet: Criss-Cross Attention for Semantic Segmentation, Huang et al., ICCV 2019 (arXiv:1811.11721).
    One softmax over the H + W − 1 positions on the cross (the position itself counted once), x + γ·out
    with γ = 0 at init; the recurrences share weights (R = 2 in the paper). Costs O(N·(H + W)) memory,
    never N×N. The paper's head convolutions around the module (RCCA's reduce/concat convs) are left out.
    """

    form, branch_out = "add", "value"  # each recurrence's output is linear in V

    def __init__(self, channels: int, *, rd_ratio: float = 1 / 8, rd_channels: int | None = None,
                 rd_divisor: int = 1, recurrence: int = 2):
        super().__init__()
        rd = reduced_channels(channels, rd_ratio, rd_channels, rd_divisor)
        self.recurrence = check_positive_int("recurrence", recurrence)
        self.query = nn.Conv2d(channels, rd, 1)
        self.key = nn.Conv2d(channels, rd, 1)
        self.value = nn.Conv2d(channels, channels, 1)

    def attend(self, x: torch.Tensor) -> torch.Tensor:
        """The criss-cross aggregation of one recurrence, before γ."""
        h, w = x.shape[-2:]
        q, k, v = self.query(x), self.key(x), self.value(x)
        # 1. energies along the column (B, H, W, H) and the row (B, H, W, W)
        e_col = torch.einsum("bchw,bckw->bhwk", q, k)
        self_pos = torch.eye(h, dtype=torch.bool, device=x.device).view(1, h, 1, h)
        e_col = e_col.masked_fill(self_pos, float("-inf"))  # the row already holds the position itself
        e_row = torch.einsum("bchw,bchk->bhwk", q, k)
        # 2. one softmax over the whole cross, then aggregate the values along each arm
        a_col, a_row = torch.softmax(torch.cat([e_col, e_row], -1), -1).split([h, w], -1)
        return torch.einsum("bhwk,bckw->bchw", a_col, v) + torch.einsum("bhwk,bchk->bchw", a_row, v)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for _ in range(self.recurrence):
            x = self.add(x, self.attend(x))
        return x

    def applied(self, x: torch.Tensor) -> dict[str, Applied]:
        """The first recurrence's weights for the centre position (N, H, W): non-zero on its row and column."""
        h, w = x.shape[-2:]
        q, k = self.query(x)[..., h // 2, w // 2], self.key(x)  # (B, C'), (B, C', H, W)
        col, row = k[..., w // 2], k[:, :, h // 2]  # (B, C', H), (B, C', W)
        e_col = torch.einsum("bc,bck->bk", q, col)
        e_col[:, h // 2] = float("-inf")  # the position itself is counted once, on the row
        a_col, a_row = torch.softmax(torch.cat([e_col, torch.einsum("bc,bck->bk", q, row)], -1), -1).split([h, w], -1)
        out = x.new_zeros(x.shape[0], h, w)
        out[:, :, w // 2] = a_col
        out[:, h // 2, :] += a_row
        return part("self", out)


class EMAUnit(ZeroGate):
    """Expectation-maximisation attention: reconstruct x from K bases found by T EM iterations.

    Paper: Expectation-Maximization Attention Networks for Semantic Segmentation, Li et al., ICCV 2019
    (arXiv:1907.13426). 1×1 conv in; E-step softmax responsibilities, M-step l2-normalised bases;
    x + BN(conv(ReLU(μ·zᵀ))). EM starts from bases kept in a buffer, which only training-mode forwards
    update: bases ← momentum·bases + (1 − momentum)·(batch mean of the final bases, l2-normalised).
    Deviations from the official code: with gradients on, the last E-step runs once more with gradient
    (same values; the official code runs all of EM without gradient, so its input conv never learns),
    and there is no ReLU after the residual sum, which would break retrofitting. `identity=True` scales
    the residual branch by a γ = 0 (see `ZeroGate.add`).
    """

    form, branch_out = "add", "norm"

    def __init__(self, channels: int, *, num_bases: int = 64, num_iters: int = 3, momentum: float = 0.9,
                 identity: bool = False):
        super().__init__(identity)
        check_positive_int("channels", channels)
        self.num_bases = check_positive_int("num_bases", num_bases)
        self.num_iters = check_positive_int("num_iters", num_iters)
        self.momentum = check_number("momentum", momentum, low=0, high=1, high_open=True)
        self.conv_in = nn.Conv2d(channels, channels, 1)
        self.conv_out = nn.Conv2d(channels, channels, 1, bias=False)
        self.norm = nn.BatchNorm2d(channels)
        bases = torch.randn(1, channels, num_bases) * math.sqrt(2.0 / num_bases)
        self.register_buffer("bases", self._l2norm(bases))

    @staticmethod
    def _l2norm(mu: torch.Tensor) -> torch.Tensor:
        return mu / (1e-6 + mu.norm(dim=1, keepdim=True))

    def attend(self, x: torch.Tensor) -> torch.Tensor:
        """The low-rank reconstruction μ·zᵀ of conv_in(x), (B, C, H, W); updates the bases in training."""
        f = self.conv_in(x).flatten(2)  # (B, C, N)
        mu = self.bases.expand(x.shape[0], -1, -1)
        with torch.no_grad():
            for _ in range(self.num_iters):
                mu_prev = mu
                z = torch.softmax(torch.einsum("bcn,bck->bnk", f, mu), -1)  # E-step
                mu = self._l2norm(torch.einsum("bcn,bnk->bck", f, z / (1e-6 + z.sum(1, keepdim=True))))  # M
        if f.requires_grad:  # the last E-step again, now with gradient (same values)
            z = torch.softmax(torch.einsum("bcn,bck->bnk", f, mu_prev), -1)
        if self.training:
            with torch.no_grad():
                self.bases.mul_(self.momentum).add_(self._l2norm(mu.mean(0, keepdim=True)), alpha=1 - self.momentum)
        return torch.einsum("bck,bnk->bcn", mu, z).reshape(x.shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.add(x, self.norm(self.conv_out(F.relu(self.attend(x)))))

    def applied(self, x: torch.Tensor) -> dict[str, Applied]:
        """The final E-step's responsibilities as maps (N, K, H, W): each position's softmax over the K bases."""
        f = self.conv_in(x).flatten(2)
        mu = self.bases.expand(x.shape[0], -1, -1)
        for _ in range(self.num_iters):  # as `attend` without the training-mode update of the bases
            z = torch.softmax(torch.einsum("bcn,bck->bnk", f, mu), -1)
            mu_prev, mu = mu, self._l2norm(torch.einsum("bcn,bnk->bck", f, z / (1e-6 + z.sum(1, keepdim=True))))
        z = torch.softmax(torch.einsum("bcn,bck->bnk", f, mu_prev), -1)
        return part("maps", z.transpose(1, 2).reshape(x.shape[0], -1, *x.shape[-2:]))


__all__ = ["NonLocal2d", "PositionAttn", "ChannelSelfAttn", "DualAttention", "CrissCrossAttn", "EMAUnit",
           "NONLOCAL_MODES"]
