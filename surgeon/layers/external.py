"""External attention (ea): attention of every position to a small learned memory instead of to each other.

Linear in the number of positions; the memory (S = 64 units by default) is shared by all samples.
"""
from __future__ import annotations

import torch
from torch import nn

from surgeon.layers._util import check_positive, check_positive_int
from surgeon.layers.applied import Applied, part
from surgeon.layers.gate import ZeroGate


class ExternalAttention(ZeroGate):
    """External attention: x + BN(W₂ · (M_v · DoubleNorm(M_k · W₁x))), as EANet's block.

    Paper: Beyond Self-attention: External Attention using Two Linear Layers for Visual Tasks, Guo et al.,
    TPAMI 2022 (arXiv:2105.02358), Eqs. 5-7 and the official EANet block: 1×1 conv (bias), M_k as a
    C→S linear map (no bias), softmax over the positions, then ℓ1 normalisation over the S memory units,
    M_v as S→C (no bias, initialised to M_kᵀ as the official code), 1×1 conv (no bias) + BN, residual
    add. The official block ends with a ReLU after the add; it is left out here so that the block keeps
    the site's values (a ReLU would clip a pretrained network's negative features). `identity=True`
    gates the branch: x + γ·branch, γ = 0 (see `ZeroGate.add`).
    """

    form = "add"
    branch_out = "norm"

    def __init__(self, channels: int, *, memory: int = 64, eps: float = 1e-9, identity: bool = False):
        super().__init__(identity)
        check_positive_int("channels", channels)
        check_positive_int("memory", memory)
        self.eps = check_positive("eps", eps)
        self.proj_in = nn.Conv2d(channels, channels, 1)
        self.mk = nn.Conv1d(channels, memory, 1, bias=False)
        self.mv = nn.Conv1d(memory, channels, 1, bias=False)
        with torch.no_grad():
            self.mv.weight.copy_(self.mk.weight.permute(1, 0, 2))
        self.proj_out = nn.Conv2d(channels, channels, 1, bias=False)
        self.norm = nn.BatchNorm2d(channels)

    def _attn(self, x: torch.Tensor) -> torch.Tensor:
        """The double-normalised attention (N, S, HW) of the positions to the S memory units."""
        attn = self.mk(self.proj_in(x).flatten(2)).softmax(dim=-1)  # (N, S, HW): softmax over positions
        return attn / (attn.sum(dim=1, keepdim=True) + self.eps)  # then ℓ1 over the memory units

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        branch = self.norm(self.proj_out(self.mv(self._attn(x)).view(n, c, h, w)))
        return self.add(x, branch)

    def applied(self, x: torch.Tensor) -> dict[str, Applied]:
        """The attention as "maps" (N, S, H, W), one per memory unit; at each position the S weights sum to 1
        (the ℓ1 step, up to eps), the weights M_v mixes into the branch."""
        n, _, h, w = x.shape
        return part("maps", self._attn(x).view(n, -1, h, w))
