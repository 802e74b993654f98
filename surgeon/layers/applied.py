"""What an attention applied: every layer of the catalogue has `applied(*inputs)`, taking its forward's
inputs and returning the weights it computes for them, by part: `{"channel": Applied("channel", w)}`.

The weights are the attention's own (a sigmoid's or softmax's output), before any identity gate: a
gated layer multiplies by 1 + γ·(w − 1) (see `surgeon.layers.gate`), so its γ says how much of them
reaches the output. `surgeon.capture` calls these methods from forward hooks; nothing here knows fx.

Kinds of weights (`KINDS`), N the batch:
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

KINDS = {
    "channel": "(N, C): one weight per channel",
    "spatial": "(N, H, W): one map over positions",
    "maps": "(N, K, H, W): K maps over positions (per channel, basis or head)",
    "pool": "(N, H, W): softmax over positions, summing to 1 (attention pooling)",
    "self": "(N, H, W) or (N, T): one query's row of self-attention (the centre position, or token 0), "
            "summing to 1",
    "tokens": "(N, T): weights over time steps, summing to 1",
    "selection": "(N,): the index hard attention chose",
    "branches": "(N, M, C): softmax over M branches, per channel",
    "series": "(N, n): softmax over the n input series",
    "transform": "(N, 2, 3): the affine transform θ",
}
__doc__ += "".join(f"\n- {k}: {v}" for k, v in KINDS.items()) + "\n"


@dataclass(frozen=True)
class Applied:
    """One part of what an attention applied: `kind` (a key of `KINDS`) and its `weights` tensor."""

    kind: str
    weights: torch.Tensor

    def __post_init__(self):
        if self.kind not in KINDS:  # a bug in a layer, not a user mistake
            raise ValueError(f"unknown kind of attention weights {self.kind!r}; known: {', '.join(KINDS)}")


def part(kind: str, weights: torch.Tensor, name: str | None = None) -> dict[str, Applied]:
    """`{name or kind: Applied(kind, weights)}`: the return value of a one-part `applied`."""
    return {name or kind: Applied(kind, weights)}


def centre(height: int, width: int) -> int:
    """The flat index of the centre position of a (height, width) grid: the query whose row "self" shows."""
    return (height // 2) * width + width // 2


def query_row(q: torch.Tensor, k: torch.Tensor, index: int, *, scale: float = 1.0) -> torch.Tensor:
    """softmax(q_i·kᵀ·scale) for query `index` of q (B, N, d) against keys k (B, M, d): (B, M)."""
    return torch.softmax(torch.einsum("bd,bmd->bm", q[:, index], k) * scale, dim=-1)
