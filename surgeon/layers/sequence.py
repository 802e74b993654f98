"""Attention over sequences (B, T, C): pooling (soft, hard, local, structured, with an external query),
token self-attention (multi-head, local) and DA-RNN's input attention.

The score functions they use and the (B, T) masks (True on real steps; masked steps get exactly zero
weight) are in `surgeon.layers.scores`.

Papers: Bahdanau et al., Neural Machine Translation by Jointly Learning to Align and Translate, ICLR
2015 (arXiv:1409.0473); Luong et al., Effective Approaches to Attention-based NMT, EMNLP 2015
(arXiv:1508.04025); Lin et al., A Structured Self-attentive Sentence Embedding, ICLR 2017
(arXiv:1703.03130); Qin et al., A Dual-Stage Attention-Based RNN for Time Series Prediction, IJCAI
2017 (arXiv:1704.02971); Jang et al., Categorical Reparameterization with Gumbel-Softmax, ICLR 2017
(arXiv:1611.01144); Vaswani et al., Attention Is All You Need, NeurIPS 2017 (arXiv:1706.03762).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import PackedSequence, pad_packed_sequence

from surgeon.layers._util import check_bool, check_choice, check_divisible, check_positive, check_positive_int
from surgeon.layers.applied import Applied, part
from surgeon.layers.gate import ZeroGate
# score functions and masks live in scores.py; importable from here as before
from surgeon.layers.scores import (MASK_FORMS, SCORES, AdditiveScore, ConcatScore, CosineScore,  # noqa: F401
                                   DotScore, GeneralScore, ScaledDotScore, key_mask, last_valid, make_score,
                                   masked_softmax)


# -- pooling over time steps ----------------------------------------------------------------------------
_QUERIES = ("learned", "last", "external")
LOCAL_MODES = ("m", "p")  # monotonic (the last step), predicted


class SeqAttnPool(nn.Module):
    """Soft attention pooling (B, T, C) -> (B, C): Σₜ softmax(score(q, xₜ))·xₜ.

    Args:
        channels: C.
        score: a name in `SCORES`.
        query: 'learned' (one learned vector), 'last' (the last real step, Luong-style) or 'external'
            (passed to forward, e.g. another model input; `query_dim` is its size).
        hidden: hidden size of the additive score.

    The latest weights (B, T) are kept in `attn_weights` (detached) for inspection.
    """

    def __init__(self, channels: int, *, score: str = "additive", query: str = "learned",
                 query_dim: int | None = None, hidden: int | None = None):
        super().__init__()
        check_positive_int("channels", channels)
        check_choice("query", query, _QUERIES)
        q_dim = channels if query != "external" else check_positive_int("query_dim", query_dim)
        self.query_mode = query
        self.score = make_score(score, q_dim, channels, hidden=hidden)
        if query == "learned":
            # zero for parameter-free scores (uniform weights at init); small for the others, whose
            # last weights are zero, so gradients reach both
            init = torch.zeros(1, 1, q_dim) if not self.score.has_params else torch.randn(1, 1, q_dim) * q_dim ** -0.5
            self.query = nn.Parameter(init)  # (1, 1, Dq): broadcasts over the batch in every score
        self.attn_weights: torch.Tensor | None = None

    @property
    def uniform_at_init(self) -> bool:
        """Whether the weights start uniform for every input (the plain mean)."""
        return self.query_mode == "learned" and not isinstance(self.score, CosineScore)

    def _query(self, x: torch.Tensor, mask: torch.Tensor | None, query: torch.Tensor | None) -> torch.Tensor:
        if self.query_mode == "learned":
            return self.query
        if self.query_mode == "last":
            return last_valid(x, mask).unsqueeze(1)
        if query is None:
            raise ValueError("this pool takes an external query: call it as pool(x, mask, query)")
        return query.reshape(x.shape[0], 1, -1)

    def weights(self, x: torch.Tensor, mask: torch.Tensor | None = None,
                query: torch.Tensor | None = None) -> torch.Tensor:
        """Attention weights (B, T)."""
        s = self.score(self._query(x, mask, query), x)[:, 0]
        return masked_softmax(s, mask)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None,
                query: torch.Tensor | None = None) -> torch.Tensor:
        a = self.weights(x, mask, query)
        self.attn_weights = a.detach()
        return torch.einsum("bt,btc->bc", a, x)

    def applied(self, x: torch.Tensor, mask: torch.Tensor | None = None,
                query: torch.Tensor | None = None) -> dict[str, Applied]:
        """The weights over time steps (N, T): a softmax (local-p: times its Gaussian window)."""
        return part("tokens", self.weights(x, mask, query))


class HardAttnPool(SeqAttnPool):
    """Hard attention: picks one step. Training uses straight-through Gumbel-softmax (one-hot forward,
    soft gradient) at `temperature` (an attribute, so a training loop can anneal it); eval takes the
    argmax (one-hot forward, softmax gradient). Options as `SeqAttnPool`."""

    def __init__(self, channels: int, *, score: str = "additive", query: str = "learned",
                 query_dim: int | None = None, hidden: int | None = None, temperature: float = 1.0):
        super().__init__(channels, score=score, query=query, query_dim=query_dim, hidden=hidden)
        self.temperature = check_positive("temperature", temperature)

    @property
    def uniform_at_init(self) -> bool:
        return False

    def weights(self, x, mask=None, query=None):
        s = self.score(self._query(x, mask, query), x)[:, 0]
        if mask is not None:
            s = s.masked_fill(~mask, float("-inf"))
        if self.training:
            return F.gumbel_softmax(s, tau=self.temperature, hard=True)
        # the argmax, with the softmax's gradient (straight-through) so eval-mode backward still works
        soft = s.softmax(-1)
        hard = F.one_hot(s.argmax(-1), s.shape[-1]).to(x.dtype)
        return hard - soft.detach() + soft

    def applied(self, x, mask=None, query=None) -> dict[str, Applied]:
        """The chosen step (N,) (in training a Gumbel sample, so one call's choice, not the forward's)."""
        return part("selection", self.weights(x, mask, query).argmax(-1))


def _local_weights(scores: torch.Tensor, centers: torch.Tensor, window: int, gaussian: bool,
                   mask: torch.Tensor | None) -> torch.Tensor:
    """Luong's local attention: softmax over the steps within `window` of each query's center
    (scores (B, Q, T), centers (B, Q)), times a Gaussian exp(−(s − p)²/(2σ²)), σ = window/2, for
    predicted centers (local-p)."""
    pos = torch.arange(scores.shape[-1], device=scores.device, dtype=scores.dtype)
    dist = pos.view(1, 1, -1) - centers.unsqueeze(-1)
    inside = dist.abs() <= window
    if mask is not None:
        inside = inside & mask.unsqueeze(1)
    a = masked_softmax(scores, inside)
    if gaussian:
        a = a * torch.exp(-dist.pow(2) / (2 * (window / 2) ** 2))
    return a


class LocalAttnPool(SeqAttnPool):
    """Local attention pooling (Luong): attends within `window` steps of a center: the last real step
    (mode 'm', local-m) or a predicted position p = (L − 1)·sigmoid(v·tanh(W·q)) (mode 'p', local-p,
    with Gaussian weighting). Options as `SeqAttnPool`."""

    def __init__(self, channels: int, *, score: str = "general", query: str = "last",
                 query_dim: int | None = None, hidden: int | None = None, window: int = 8, mode: str = "m"):
        super().__init__(channels, score=score, query=query, query_dim=query_dim, hidden=hidden)
        self.window = check_positive_int("window", window)
        self.mode = check_choice("mode", mode, LOCAL_MODES)
        if mode == "p":
            q_dim = channels if query != "external" else query_dim
            self.predict = nn.Sequential(nn.Linear(q_dim, channels), nn.Tanh(), nn.Linear(channels, 1))

    @property
    def uniform_at_init(self) -> bool:
        return False

    def weights(self, x, mask=None, query=None):
        q = self._query(x, mask, query)
        steps = x.new_full((x.shape[0],), x.shape[1]) if mask is None else mask.sum(1).to(x.dtype)
        if self.mode == "m":
            centers = (steps - 1).unsqueeze(1)
        else:
            centers = (steps - 1).unsqueeze(1) * torch.sigmoid(self.predict(q)[..., 0])
        return _local_weights(self.score(q, x), centers, self.window, self.mode == "p", mask)[:, 0]


class StructuredSelfAttn(nn.Module):
    """Structured self-attentive embedding (Lin et al. 2017): A = softmax(W₂·tanh(W₁·Hᵀ)) with r hops,
    M = A·H, returned flattened (B, r·C). `penalty` holds the latest ‖AAᵀ − I‖²_F (batch mean); add
    `coef · module.penalty` to the loss (the paper's P term).

    Args:
        channels: C. hops: r. hidden: d_a.
    """

    def __init__(self, channels: int, *, hops: int = 4, hidden: int = 64):
        super().__init__()
        check_positive_int("channels", channels)
        self.hops = check_positive_int("hops", hops)
        self.w1 = nn.Linear(channels, check_positive_int("hidden", hidden), bias=False)
        self.w2 = nn.Linear(hidden, hops, bias=False)
        self.penalty: torch.Tensor = torch.zeros(())
        self.attn_weights: torch.Tensor | None = None

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None, query: torch.Tensor | None = None):
        s = self.w2(torch.tanh(self.w1(x))).transpose(1, 2)  # (B, r, T)
        a = masked_softmax(s, None if mask is None else mask.unsqueeze(1))
        eye = torch.eye(self.hops, device=x.device, dtype=x.dtype)
        self.penalty = (a @ a.transpose(1, 2) - eye).pow(2).sum((1, 2)).mean()
        self.attn_weights = a.detach()
        return (a @ x).flatten(1)

    def applied(self, x: torch.Tensor, mask: torch.Tensor | None = None,
                query: torch.Tensor | None = None) -> dict[str, Applied]:
        """The hops' weights over time steps, averaged over the r hops (N, T)."""
        s = self.w2(torch.tanh(self.w1(x))).transpose(1, 2)
        return part("tokens", masked_softmax(s, None if mask is None else mask.unsqueeze(1)).mean(1))

    def __getstate__(self):
        # NOTE: the penalty of the latest forward is part of an autograd graph, which deepcopy (EMA
        # copies, `load(base=...)`) and pickle refuse; a copy keeps its value without the graph.
        state = super().__getstate__()
        state["penalty"] = state["penalty"].detach()
        return state


def structured_penalty(model: nn.Module) -> torch.Tensor:
    """The sum of every `StructuredSelfAttn` penalty in `model` from its latest forward."""
    terms = [m.penalty for m in model.modules() if isinstance(m, StructuredSelfAttn)]
    return sum(terms, torch.zeros(()))


class SequenceReplacement(ZeroGate):
    """Stands in for the selection of an RNN's output (last step, h_n, mean): `forward(seq, orig,
    *extra)` pools `seq` (a tensor, a PackedSequence, or the RNN's (output, h_n) tuple; a packed
    output is padded here and its lengths mask the padding) with `pool` and, when gated, returns orig + γ·(pooled − orig) with γ = 0 at
    init, so the model computes exactly what it did.

    Args:
        pool: (B, T, C) -> (B, D) module taking (x, mask, query).
        out_features: the selection's size; a linear layer maps D to it when they differ.
        in_features: D.
        batch_first: whether `seq` is (B, T, C) (else (T, B, C)).
        gate: identity init by a zero gate.
        mask_at, mask_form, pad_id: which extra argument holds padding information, and its form (see
            `key_mask`). query_at: which extra argument is the external query ((B, D), or an
            RNN's (layers·directions, B, D) h_n stack, read as h_n[-1]).
    """

    form = "mix"

    def __init__(self, pool: nn.Module, *, out_features: int, in_features: int, batch_first: bool = True,
                 gate: bool = True, mask_at: int | None = None, mask_form: str | None = None,
                 pad_id: int | None = None, query_at: int | None = None):
        super().__init__(gate)
        self.pool = pool
        self.proj = nn.Linear(in_features, out_features) if in_features != out_features else None
        self.batch_first = batch_first
        self.mask_at, self.mask_form, self.pad_id, self.query_at = mask_at, mask_form, pad_id, query_at

    def forward(self, seq, orig: torch.Tensor, *extra: torch.Tensor) -> torch.Tensor:
        if isinstance(seq, (tuple, list)) and not isinstance(seq, PackedSequence):  # the RNN's (output, h_n)
            seq = seq[0]
        mask = None
        if isinstance(seq, PackedSequence):
            seq, lengths = pad_packed_sequence(seq, batch_first=True)
            mask = key_mask(lengths, "lengths", seq.shape[1])
        elif not self.batch_first:
            seq = seq.transpose(0, 1)
        if mask is None and self.mask_at is not None and self.mask_at < len(extra):
            mask = key_mask(extra[self.mask_at], self.mask_form, seq.shape[1], pad_id=self.pad_id)
        query = extra[self.query_at] if self.query_at is not None else None
        if query is not None and query.dim() == 3:  # another RNN's h_n stack: its last layer's state
            query = query[-1]
        y = self.pool(seq, mask, query)
        if self.proj is not None:
            y = self.proj(y)
        return self.mix(orig, y.reshape(orig.shape))


# -- token self-attention (shape-preserving) ------------------------------------------------------------
class MultiHeadSelfAttn(ZeroGate):
    """Pre-norm multi-head self-attention block: x + proj(SDPA(qkv(LN(x)))), (B, N, C) -> (B, N, C).

    Args:
        channels: C (divisible by `heads`). heads: number of heads. qkv_bias: bias on the qkv map.
        identity: scale the attention branch by a γ = 0 (see `ZeroGate.add`).
    """

    form, branch_out = "add", "proj"

    def __init__(self, channels: int, *, heads: int = 4, qkv_bias: bool = True, identity: bool = False):
        super().__init__(identity)
        check_positive_int("channels", channels)
        check_positive_int("heads", heads)
        check_divisible("channels", channels, "heads", heads)
        check_bool("qkv_bias", qkv_bias)
        self.heads = heads
        self.norm = nn.LayerNorm(channels)
        self.qkv = nn.Linear(channels, 3 * channels, bias=qkv_bias)
        self.proj = nn.Linear(channels, channels)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, N, C); mask (B, N) booleans, True on real tokens: padded ones are never attended to."""
        b, n, c = x.shape
        qkv = self.qkv(self.norm(x)).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        attn_mask = None if mask is None else mask[:, None, None, :]
        y = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2], attn_mask=attn_mask)
        return self.add(x, self.proj(y.transpose(1, 2).reshape(b, n, c)))

    def applied(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> dict[str, Applied]:
        """Token 0's attention row (N, T), averaged over heads."""
        b, n, c = x.shape
        q, k, _ = self.qkv(self.norm(x)).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        s = torch.einsum("bhd,bhtd->bht", q[:, :, 0], k) * (c // self.heads) ** -0.5
        return part("self", masked_softmax(s, None if mask is None else mask[:, None]).mean(1))


class LocalSelfAttn(ZeroGate):
    """Local self-attention block: each position attends within `window` steps of itself (mode 'm') or
    of a predicted position (mode 'p', Gaussian-weighted), with any score; x + proj(context).

    Args:
        channels: C. window: half-width D. mode: 'm' or 'p'. score: a name in `SCORES`.
        identity: scale the attention branch by a γ = 0 (see `ZeroGate.add`).
    """

    form, branch_out = "add", "proj"

    def __init__(self, channels: int, *, window: int = 8, mode: str = "m", score: str = "scaled_dot",
                 identity: bool = False):
        super().__init__(identity)
        check_positive_int("channels", channels)
        self.window = check_positive_int("window", window)
        self.mode = check_choice("mode", mode, LOCAL_MODES)
        self.norm = nn.LayerNorm(channels)
        self.score = make_score(score, channels, channels)
        self.proj = nn.Linear(channels, channels)
        if mode == "p":
            self.predict = nn.Sequential(nn.Linear(channels, channels), nn.Tanh(), nn.Linear(channels, 1))

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, N, C); mask (B, N) booleans, True on real tokens: padded ones are never attended to."""
        h = self.norm(x)
        return self.add(x, self.proj(self._weights(h, mask) @ h))

    def _weights(self, h: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """The (B, N, N) local weights of the normalised tokens h."""
        n = h.shape[1]
        if self.mode == "m":
            centers = torch.arange(n, device=h.device, dtype=h.dtype).expand(h.shape[0], n)
        else:
            centers = (n - 1) * torch.sigmoid(self.predict(h)[..., 0])
        return _local_weights(self.score(h, h), centers, self.window, self.mode == "p", mask)

    def applied(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> dict[str, Applied]:
        """Token 0's attention row (N, T) (mode 'p': times its Gaussian window)."""
        return part("self", self._weights(self.norm(x), mask)[:, 0])


class SequenceFirst(nn.Module):
    """Runs a (B, T, C) module on a (T, B, C) sequence (extra arguments, e.g. a (B, T) mask, pass as they are)."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.module = module

    def forward(self, x: torch.Tensor, *extra: torch.Tensor) -> torch.Tensor:
        return self.module(x.transpose(0, 1), *extra).transpose(0, 1)


class TokenMask(nn.Module):
    """Gives a token attention the padding mask of its sequence: `forward(x, source)` turns the model's own
    padding information (`source`: lengths, a mask or token ids, see `key_mask`) into a (B, T) mask and
    calls `module(x, mask)`.

    Args:
        module: takes (x, mask). form, pad_id: as `key_mask`. batch_first: x is (B, T, C), else (T, B, C).
    """

    def __init__(self, module: nn.Module, *, form: str, pad_id: int | None = None, batch_first: bool = True):
        super().__init__()
        self.module = module
        self.form = check_choice("mask form", form, MASK_FORMS)
        self.pad_id, self.batch_first = pad_id, batch_first

    def forward(self, x: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
        steps = x.shape[1] if self.batch_first else x.shape[0]
        return self.module(x, key_mask(source, self.form, steps, pad_id=self.pad_id))


class InputAttn(nn.Module):
    """DA-RNN's input attention: weights αₖ over the n input series from each series' whole window,
    eₖ = v·tanh(U·xᵏ + b) + cₖ, α = softmax(e), output x ⊙ (n·α). (B, T, n) -> (B, T, n).

    v and c start at zero, so α is uniform and the output is x: the identity without a gate.
    NOTE: the paper also conditions eₖ on the encoder's previous state, recomputing α at every step
    inside the recurrence; a retrofit cannot enter nn.GRU's loop, so α here is one per sample. The
    per-series prior cₖ is not in the paper: with U shared by all series, series that look alike
    (same distribution) could not otherwise be told apart.

    Args:
        channels: n, the number of input series. steps: T, the window length. hidden: U's size.
    """

    def __init__(self, channels: int, *, steps: int, hidden: int = 32):
        super().__init__()
        check_positive_int("channels", channels)
        self.u = nn.Linear(check_positive_int("steps", steps), check_positive_int("hidden", hidden))
        self.v = nn.Parameter(torch.zeros(hidden))
        self.prior = nn.Parameter(torch.zeros(channels))
        self.attn_weights: torch.Tensor | None = None

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, T, n); mask (B, T) booleans, True on real steps: padded steps do not shape the weights."""
        a = self._weights(x, mask)
        self.attn_weights = a.detach()
        return x * (a * x.shape[-1]).unsqueeze(1)

    def _weights(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        series = x if mask is None else x * mask.unsqueeze(-1).to(x.dtype)
        e = torch.tanh(self.u(series.transpose(1, 2))) @ self.v + self.prior  # (B, n)
        return e.softmax(-1)

    def applied(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> dict[str, Applied]:
        """The weights α over the n input series (N, n), summing to 1 (x is scaled by n·α)."""
        return part("series", self._weights(x, mask))
