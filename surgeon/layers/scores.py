"""Score functions and masks for attention over sequences (B, T, C), shared by the modules in
`surgeon.layers.sequence`.

Score functions share one interface, `score(q, k) -> (B, Q, T)` for queries (B, Q, Dq) and keys
(B, T, Dk): dot, scaled_dot, general (q·W·k), cosine, concat (w·[q;k]) and additive/mlp
(Bahdanau: v·tanh(W·q + U·k)). Their last weights start at zero, so a zero query or zero weights give
uniform attention: the plain mean over time steps. Masks are (B, T) booleans, True on real steps;
masked steps get exactly zero weight, so their values never reach the output.

Papers: Bahdanau et al., Neural Machine Translation by Jointly Learning to Align and Translate, ICLR
2015 (arXiv:1409.0473); Luong et al., Effective Approaches to Attention-based NMT, EMNLP 2015
(arXiv:1508.04025).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from surgeon.errors import OptionError
from surgeon.layers._util import check_choice, check_positive_int


# -- score functions -----------------------------------------------------------------------------------
class DotScore(nn.Module):
    """q·k (Luong's dot). Needs Dq == Dk."""

    has_params = False

    def __init__(self, q_dim: int, k_dim: int, *, hidden: int | None = None):
        super().__init__()
        if q_dim != k_dim:
            raise OptionError(f"score '{self.name}' needs query and keys of one size, got {q_dim} and {k_dim}; "
                             f"use score='general' or 'additive'")

    name = "dot"

    def forward(self, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        return q @ k.transpose(-1, -2)


class ScaledDotScore(DotScore):
    """q·k / √D (Vaswani et al.)."""

    name = "scaled_dot"

    def forward(self, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        return q @ k.transpose(-1, -2) / math.sqrt(k.shape[-1])


class CosineScore(DotScore):
    """cos(q, k) = q·k / (‖q‖‖k‖)."""

    name = "cosine"

    def forward(self, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        return F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).transpose(-1, -2)


class GeneralScore(nn.Module):
    """q·W·k (Luong's general, bilinear). W starts at zero."""

    has_params = True
    name = "general"

    def __init__(self, q_dim: int, k_dim: int, *, hidden: int | None = None):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(q_dim, k_dim))

    def forward(self, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        return (q @ self.weight) @ k.transpose(-1, -2)


class ConcatScore(nn.Module):
    """w·[q;k] = w_q·q + w_k·k. w starts at zero.

    NOTE: this is the linear form; the query's term is the same for every key, so it cancels in the
    softmax over keys. Luong's 'concat' with a tanh is `additive`.
    """

    has_params = True
    name = "concat"

    def __init__(self, q_dim: int, k_dim: int, *, hidden: int | None = None):
        super().__init__()
        self.q_dim = q_dim
        self.weight = nn.Parameter(torch.zeros(q_dim + k_dim))

    def forward(self, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        wq, wk = self.weight[: self.q_dim], self.weight[self.q_dim:]
        return (q @ wq).unsqueeze(-1) + (k @ wk).unsqueeze(-2)


class AdditiveScore(nn.Module):
    """v·tanh(W·q + U·k) (Bahdanau). v starts at zero; `hidden` defaults to Dk."""

    has_params = True
    name = "additive"

    def __init__(self, q_dim: int, k_dim: int, *, hidden: int | None = None):
        super().__init__()
        hidden = check_positive_int("hidden", hidden) if hidden is not None else k_dim
        self.w = nn.Linear(q_dim, hidden, bias=False)
        self.u = nn.Linear(k_dim, hidden)
        self.v = nn.Parameter(torch.zeros(hidden))

    def forward(self, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.w(q).unsqueeze(-2) + self.u(k).unsqueeze(-3)) @ self.v


SCORES: dict[str, type[nn.Module]] = {
    "dot": DotScore, "scaled_dot": ScaledDotScore, "general": GeneralScore, "cosine": CosineScore,
    "concat": ConcatScore, "additive": AdditiveScore, "mlp": AdditiveScore,
}


def make_score(name: str, q_dim: int, k_dim: int, *, hidden: int | None = None) -> nn.Module:
    """A score module by name (see `SCORES`)."""
    check_choice("score", name, tuple(SCORES))
    return SCORES[name](q_dim, k_dim, hidden=hidden)


# -- masks ---------------------------------------------------------------------------------------------
MASK_FORMS = ("lengths", "valid", "padding", "tokens")


def key_mask(source: torch.Tensor, form: str, steps: int, *, pad_id: int | None = None) -> torch.Tensor:
    """A (B, T) boolean mask, True on real steps, from a model's own padding information.

    Args:
        source: lengths (B,), a (B, T) mask, or (B, T) token ids.
        form: 'lengths'; 'valid' (nonzero = real step); 'padding' (nonzero = padding); 'tokens' (ids;
            `pad_id` is padding).
    """
    if form == "lengths":
        return torch.arange(steps, device=source.device) < source.to(torch.long).reshape(-1, 1)
    if form == "valid":
        return source[:, :steps] != 0
    if form == "padding":
        return source[:, :steps] == 0
    if form == "tokens":
        return source[:, :steps] != pad_id
    raise ValueError(f"mask form {form!r} is not known. Valid: {', '.join(MASK_FORMS)}")


def masked_softmax(scores: torch.Tensor, mask: torch.Tensor | None, dim: int = -1) -> torch.Tensor:
    """softmax over `dim` with masked entries exactly zero (a row with no real entry gives zeros)."""
    if mask is None:
        return scores.softmax(dim)
    scores = scores.masked_fill(~mask, float("-inf"))
    return torch.nan_to_num(scores.softmax(dim), nan=0.0)


def last_valid(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """x[:, -1], or for each sample its last real step when a mask is given. (B, T, C) -> (B, C)."""
    if mask is None:
        return x[:, -1]
    idx = (mask.long().cumsum(1).argmax(1)).clamp(min=0)
    return x[torch.arange(x.shape[0], device=x.device), idx]
