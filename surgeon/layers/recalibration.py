"""Cheap channel recalibration: simam (parameter-free), gct, ese and ceca (eca with circular padding).

Each multiplies x by weights computed from x; all work on channels-first maps of any rank (N, C, ...).
`identity=True` gates the weights, 1 + γ·(w − 1) with γ = 0 (see `surgeon.layers.gate.ZeroGate`), except
GCT, whose paper init (γ = β = 0) already makes it the identity.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from surgeon.errors import OptionError
from surgeon.layers._util import check_choice, check_positive, get_act, spatial_dims
from surgeon.layers.applied import Applied, part
from surgeon.layers.channel import EcaModule
from surgeon.layers.gate import ZeroGate


def _per_channel(w: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """(N, C) weights viewed to broadcast over x's spatial dims."""
    return w.view(*w.shape, *([1] * (x.dim() - 2)))


class SimAM(ZeroGate):
    """SimAM: x · σ(1/e*), the inverse minimal energy of each neuron against the others of its channel.

    Paper: SimAM: A Simple, Parameter-Free Attention Module for Convolutional Neural Networks, Yang et al.,
    ICML 2021. 1/e* = (x − μ)² / (4(σ² + λ)) + 1/2 with μ, σ² = Σ(x − μ)²/(n − 1) over the channel's
    n positions (Eq. 5). No parameters; with `identity=True` one γ.
    """

    def __init__(self, channels: int | None = None, *, e_lambda: float = 1e-4, identity: bool = False):
        super().__init__(identity)
        self.e_lambda = check_positive("e_lambda", e_lambda)

    def _attn(self, x: torch.Tensor) -> torch.Tensor:
        dims = spatial_dims(x)
        n = max(x[0, 0].numel() - 1, 1)  # a 1×1 map has no other neuron: σ² = 0
        d = (x - x.mean(dims, keepdim=True)).square()
        inv_energy = d / (4 * (d.sum(dims, keepdim=True) / n + self.e_lambda)) + 0.5
        return torch.sigmoid(inv_energy)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.weights(self._attn(x))

    def applied(self, x: torch.Tensor) -> dict[str, Applied]:
        """One weight per neuron, per-channel maps (N, C, H, W) (x's shape), before the gate."""
        return part("maps", self._attn(x))


class GCT(nn.Module):
    """Gated Channel Transformation: x · (1 + tanh(γ·ŝ + β)), ŝ the channel's normalised embedding.

    Paper: Gated Channel Transformation for Visual Recognition, Yang et al., CVPR 2020 (arXiv:1909.11519).
    s = α·‖x_c‖₂ (mode 'l2', or α·Σ|x_c| for 'l1'); ŝ = √C·s/‖s‖₂ ('l2', written as s/√(mean s² + ε), as
    the official code) or C·s/‖s‖₁ ('l1'). Three parameters per channel; the paper's init α = 1, γ = β = 0
    makes the gate exactly 1, so the module starts as the identity by itself.
    """

    def __init__(self, channels: int, *, mode: str = "l2", eps: float = 1e-5):
        super().__init__()
        self.mode = check_choice("mode", mode, ("l2", "l1"))
        self.eps = check_positive("eps", eps)
        self.alpha = nn.Parameter(torch.ones(channels))
        self.gamma = nn.Parameter(torch.zeros(channels))
        self.beta = nn.Parameter(torch.zeros(channels))

    def _attn(self, x: torch.Tensor) -> torch.Tensor:
        """1 + tanh(γ·ŝ + β), (N, C, 1, ...)."""
        dims = spatial_dims(x)
        alpha, gamma, beta = (p.view(1, -1, *([1] * len(dims))) for p in (self.alpha, self.gamma, self.beta))
        if self.mode == "l2":
            s = (x.square().sum(dims, keepdim=True) + self.eps).sqrt() * alpha
            norm = gamma / (s.square().mean(1, keepdim=True) + self.eps).sqrt()
        else:
            s = x.abs().sum(dims, keepdim=True) * alpha
            norm = gamma / (s.abs().mean(1, keepdim=True) + self.eps)
        return 1 + torch.tanh(s * norm + beta)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self._attn(x)

    def applied(self, x: torch.Tensor) -> dict[str, Applied]:
        """The channel weights 1 + tanh(γ·ŝ + β), (N, C) in [0, 2]: exactly 1 at the paper's init (GCT has no
        identity gate of its own)."""
        return part("channel", self._attn(x).flatten(1))


class EffectiveSE(ZeroGate):
    """Effective Squeeze-Excitation: x · hardσ(W·avgpool(x) + b), one C→C fully connected layer.

    Paper: CenterMask: Real-Time Anchor-Free Instance Segmentation, Lee & Park, CVPR 2020
    (arXiv:1911.06667), Sec. 3.3 (VoVNetV2's eSE). SE without the bottleneck, so no channel information is
    lost to the reduction; C² + C parameters.
    """

    def __init__(self, channels: int, *, gate_layer: str = "hard_sigmoid", identity: bool = False):
        super().__init__(identity)
        self.fc = nn.Linear(channels, channels)
        self.gate = get_act(gate_layer, "gate_layer")

    def _attn(self, x: torch.Tensor) -> torch.Tensor:
        return self.gate(self.fc(x.mean(spatial_dims(x))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weights(self._attn(x))
        return x * _per_channel(w, x)

    def applied(self, x: torch.Tensor) -> dict[str, Applied]:
        """The channel weights (N, C) before the gate."""
        return part("channel", self._attn(x))


class CecaModule(EcaModule):
    """ECA with circular padding: the 1-D conv across channels wraps around instead of seeing zeros.

    Paper: ECA-Net, Wang et al., CVPR 2020 (arXiv:1910.03151), with the circular padding of timm's
    `CecaModule` (C. Ha): channels have no ends, so the first and last channels get full neighbourhoods.
    Same parameters as eca. `forward` and `applied` are eca's, on this `_attn`.
    """

    def __init__(self, channels: int, *, kernel_size: int | None = None, gamma: float = 2, beta: float = 1,
                 gate_layer: str = "sigmoid", identity: bool = False):
        super().__init__(channels, kernel_size=kernel_size, gamma=gamma, beta=beta, gate_layer=gate_layer,
                         identity=identity)
        if (self.kernel_size - 1) // 2 > channels:
            raise OptionError(f"kernel_size ({self.kernel_size}) wraps more than once around {channels} channels; "
                              f"use at most {2 * channels + 1}")
        self.conv.padding = (0,)

    def _attn(self, x: torch.Tensor) -> torch.Tensor:
        # the conv has no padding of its own (eca's `_attn` would give C − 2·pad weights): pad circularly here
        pad = (self.kernel_size - 1) // 2
        s = F.pad(x.mean(spatial_dims(x)).unsqueeze(1), (pad, pad), mode="circular")  # (N, 1, C + 2·pad)
        return self.gate(self.conv(s)).squeeze(1)  # (N, C)
