"""Differentiable hard attention (DHAM): keep the k highest-scoring positions of a feature map, zero the rest.

Forward: y = x ⊙ m, m ∈ {0, 1} the top-k mask of a learned 1×1 score map s (k = ⌈keep·H·W⌉ per image).
Backward: straight-through, m = hard + (σ(s) − stop_grad(σ(s))), so the scores learn through σ(s) while the
forward pass stays exactly hard (the soft terms cancel to 0).

Paper: Malinowski et al., Learning Visual Question Answering by Bootstrapping Hard Attention, ECCV 2018
(arXiv:1808.00300); straight-through estimator: Bengio et al., arXiv:1308.3432 (2013).
NOTE: the paper scores positions by their feature L2 norm and gathers the kept cells; here the scores are a
learned 1×1 conv trained through the straight-through estimator, and the map keeps its shape (zeros elsewhere).
"""
from __future__ import annotations

import math

import torch
from torch import nn

from surgeon.layers._util import check_positive_int, check_ratio
from surgeon.layers.applied import Applied, part
from surgeon.layers.gate import ZeroGate


def topk_mask(scores: torch.Tensor, k: int) -> torch.Tensor:
    """A {0, 1} tensor of `scores`' shape (N, L): 1 at the k largest entries of each row."""
    idx = scores.topk(min(k, scores.shape[1]), dim=1).indices
    return torch.zeros_like(scores).scatter_(1, idx, 1.0)


class HardAttn(ZeroGate):
    """Top-k spatial selection with a straight-through gradient, on a (N, C, H, W) map.

    Args:
        channels: channels of the feature map.
        keep: fraction of positions kept per image, in (0, 1] (at least one position).
        identity: start as the identity, weights 1 + γ·(m − 1), γ = 0.
    """

    def __init__(self, channels: int, *, keep: float = 0.25, identity: bool = False):
        super().__init__(identity)
        check_positive_int("channels", channels)
        self.keep = check_ratio("keep", keep)
        self.score = nn.Conv2d(channels, 1, 1)

    def mask(self, x: torch.Tensor) -> torch.Tensor:
        """The selection m, (N, 1, H, W): exactly 0/1 forward, σ(s)'s gradient backward."""
        s = self.score(x).flatten(1)
        k = max(1, math.ceil(self.keep * s.shape[1]))
        soft = torch.sigmoid(s)
        m = topk_mask(s.detach(), k) + (soft - soft.detach())
        return m.view(x.shape[0], 1, *x.shape[2:])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.weights(self.mask(x))

    def applied(self, x: torch.Tensor) -> dict[str, Applied]:
        """The kept positions as "spatial" (N, H, W) in {0, 1}: the mask forward multiplies by (the
        straight-through term σ(s) − σ(s) is exactly 0), not the scores σ(s) it was chosen from."""
        return part("spatial", self.mask(x)[:, 0])
