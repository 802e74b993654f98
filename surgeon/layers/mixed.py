"""Mixed attention: channel and spatial attention combined (CBAM in sequence; BAM, scSE, triplet in parallel).

All work on 1-D, 2-D and 3-D maps: CBAM, BAM and triplet take `dims` (their convs become Conv1d/2d/3d),
scSE needs nothing (its spatial squeeze is a per-position linear map).
"""
from __future__ import annotations

import torch
from torch import nn

from surgeon.layers._util import (batch_norm_nd, check_bool, check_choice, check_dims, check_int, check_odd_kernel,
                                  check_positive_int, conv_nd, get_act, reduced_channels)
from surgeon.layers.applied import Applied, part
from surgeon.layers.gate import ZeroGate, mul_own
from surgeon.layers.pooled import mean_max
from surgeon.layers.spatial import SpatialAttn


class ChannelAttn(ZeroGate):
    """CBAM's channel attention: σ(MLP(avgpool(x)) + MLP(maxpool(x))) with one shared MLP (with biases)."""

    def __init__(self, channels: int, *, rd_ratio: float = 1 / 16, rd_channels: int | None = None,
                 rd_divisor: int = 1, act_layer: str = "relu", gate_layer: str = "sigmoid", identity: bool = False):
        super().__init__(identity)
        rd = reduced_channels(channels, rd_ratio, rd_channels, rd_divisor)
        self.fc1 = nn.Linear(channels, rd)
        self.act = get_act(act_layer)
        self.fc2 = nn.Linear(rd, channels)
        self.gate = get_act(gate_layer, "gate_layer")

    def _attn(self, x: torch.Tensor) -> torch.Tensor:
        mean, peak = mean_max(x, list(range(2, x.dim())))
        mlp = lambda s: self.fc2(self.act(self.fc1(s.flatten(1))))  # noqa: E731
        return self.gate(mlp(mean) + mlp(peak))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weights(self._attn(x))
        return x * w.view(*w.shape, *([1] * (x.dim() - 2)))

    def applied(self, x: torch.Tensor) -> dict[str, Applied]:
        """The channel weights (N, C) before the gate."""
        return part("channel", self._attn(x))


class CBAM(nn.Module):
    """Convolutional Block Attention Module: channel attention, then spatial attention, in sequence.

    Paper: CBAM: Convolutional Block Attention Module, Woo et al., ECCV 2018 (arXiv:1807.06521).
    Matches the official code: MLP with biases, 7×7 spatial conv without bias followed by batch norm.
    `identity=True` gates each part's weights with its own γ (`channel.gamma`, `spatial.gamma`).
    `dims=1`/`3`: the spatial part's conv is a Conv1d/Conv3d, as CBAM for sequences and for video/volumes.
    Without autograd (eval, inference) the spatial map is multiplied into the channel-weighted map in place
    (`mul_own`): one full-size map allocated per call instead of two.
    """

    def __init__(self, channels: int, *, rd_ratio: float = 1 / 16, rd_channels: int | None = None,
                 rd_divisor: int = 1, kernel_size: int = 7, spatial_norm: bool = True, act_layer: str = "relu",
                 gate_layer: str = "sigmoid", dims: int = 2, identity: bool = False):
        super().__init__()
        self.channel = ChannelAttn(channels, rd_ratio=rd_ratio, rd_channels=rd_channels, rd_divisor=rd_divisor,
                                   act_layer=act_layer, gate_layer=gate_layer, identity=identity)
        self.spatial = SpatialAttn(channels, kernel_size=kernel_size, norm=spatial_norm, gate_layer=gate_layer,
                                   dims=dims, identity=identity)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.channel(x)  # a new map, this module's own
        return mul_own(y, self.spatial.weights(self.spatial._attn(y)))

    def applied(self, x: torch.Tensor) -> dict[str, Applied]:
        """The channel weights (N, C), then the spatial map (N, H, W) of the channel-weighted x."""
        return self.channel.applied(x) | self.spatial.applied(self.channel(x))


class BAM(ZeroGate):
    """Bottleneck Attention Module: x · (1 + σ(M_c(x) ⊙ M_s(x))), channel and spatial branches in parallel.

    Paper: BAM: Bottleneck Attention Module, Park et al., BMVC 2018 (arXiv:1807.06514).
    Matches the official code: channel branch avgpool → FC → BN → ReLU → FC; spatial branch
    1×1 reduce → `num_convs` dilated 3×3 convs (each with BN, ReLU) → 1×1 to one map, all with biases.
    `identity=True` gates the attention term: x · (1 + γ·σ(M_c ⊙ M_s)), γ = 0 (see `ZeroGate.add`).
    `dims=1`/`3`: the spatial branch's convs are Conv1d/Conv3d, for (N, C, L) and (N, C, D, H, W) maps.
    """

    form = "add"

    def __init__(self, channels: int, *, rd_ratio: float = 1 / 16, rd_channels: int | None = None,
                 rd_divisor: int = 1, dilation: int = 4, num_convs: int = 2, act_layer: str = "relu",
                 dims: int = 2, identity: bool = False):
        super().__init__(identity)
        rd = reduced_channels(channels, rd_ratio, rd_channels, rd_divisor)
        check_positive_int("dilation", dilation)
        check_int("num_convs", num_convs, low=0)
        conv, norm = conv_nd(dims), batch_norm_nd(dims)
        self.channel = nn.Sequential(nn.Linear(channels, rd), nn.BatchNorm1d(rd), get_act(act_layer),
                                     nn.Linear(rd, channels))
        layers: list[nn.Module] = [conv(channels, rd, 1), norm(rd), get_act(act_layer)]
        for _ in range(num_convs):
            layers += [conv(rd, rd, 3, padding=dilation, dilation=dilation), norm(rd), get_act(act_layer)]
        layers.append(conv(rd, 1, 1))
        self.spatial = nn.Sequential(*layers)

    def _attn(self, x: torch.Tensor) -> torch.Tensor:
        c = self.channel(x.mean(tuple(range(2, x.dim()))))
        c = c.view(*c.shape, *([1] * (x.dim() - 2)))
        return torch.sigmoid(c * self.spatial(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.add(x.new_ones(()), self._attn(x))

    def applied(self, x: torch.Tensor) -> dict[str, Applied]:
        """σ(M_c ⊙ M_s), per-channel maps (N, C, H, W): x is multiplied by 1 + γ·σ(…)."""
        return part("maps", self._attn(x))


class _ZPoolGate(ZeroGate):
    """σ(BN(conv_k([max_1(x); mean_1(x)]))) over dim 1: triplet attention's weights for one branch."""

    def __init__(self, kernel_size: int, dims: int, identity: bool):
        super().__init__(identity)
        self.conv = conv_nd(dims)(2, 1, kernel_size, padding=kernel_size // 2, bias=False)
        self.bn = batch_norm_nd(dims)(1, eps=1e-5, momentum=0.01)

    def forward(self, x: torch.Tensor, gated: bool = True) -> torch.Tensor:
        mean, peak = mean_max(x, [1])
        w = torch.sigmoid(self.bn(self.conv(torch.cat([peak, mean], dim=1))))
        return self.weights(w) if gated else w


class TripletAttention(nn.Module):
    """Triplet attention: three Z-pool + k×k conv + BN gates over the (C, W), (H, C) and (H, W) planes.

    Paper: Rotate to Attend: Convolutional Triplet Attention Module, Misra et al., WACV 2021
    (arXiv:2010.03045). Branches rotate x so that H, W or C plays the channel role, gate, rotate back;
    the output is their average. As the official code: conv without bias, BN (momentum 0.01). The three
    branch weights, (N, C, 1, W), (N, C, H, 1) and (N, 1, H, W), are averaged before the one product
    with x (the official code multiplies x three times). `identity=True` gates each branch's weights
    with its own γ (see `ZeroGate`); their average is then exactly 1.
    `dims=1`/`3` carries the rotation to (N, C, L) and (N, C, D, H, W): one branch per dim of (C, positions),
    each pooling that dim away and convolving the others (Conv1d: branches `l`, `c`; Conv3d: `dhw`, `chw`,
    `dcw`, `dhc`), named like the 2-D ones after the dims they attend over.
    """

    def __init__(self, channels: int | None = None, *, kernel_size: int = 7, no_spatial: bool = False,
                 dims: int = 2, identity: bool = False):
        super().__init__()
        check_odd_kernel("kernel_size", kernel_size)
        check_bool("no_spatial", no_spatial)
        check_dims(dims)
        letters = "c" + "dhw"[3 - dims:] if dims > 1 else "cl"
        # branch a pools dim a away after x.transpose(1, a); it attends over the other dims in that order
        self.branches: list[tuple[int, str]] = []
        for a in (*range(2, dims + 2), 1):  # 2-D: cw, hc, hw, as before
            if a == 1 and no_spatial:
                continue
            order = list(letters)
            order[0], order[a - 1] = order[a - 1], order[0]
            name = "".join(order[1:])
            setattr(self, name, _ZPoolGate(kernel_size, dims, identity))
            self.branches.append((a, name))

    def _attn(self, x: torch.Tensor, gated: bool = True) -> torch.Tensor:
        """The branch weights' average, broadcasting to x's shape."""
        w = None
        for a, name in self.branches:
            w_a = getattr(self, name)(x.transpose(1, a), gated=gated).transpose(1, a)
            w = w_a if w is None else w + w_a
        return w / len(self.branches)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self._attn(x)

    def applied(self, x: torch.Tensor) -> dict[str, Applied]:
        """The average of the branches' weights before their gates, per-channel maps (N, C, H, W)."""
        return part("maps", self._attn(x, gated=False).expand_as(x))


class SCSE(ZeroGate):
    """Concurrent spatial and channel squeeze & excitation: cSE(x) and sSE(x) combined element-wise.

    Paper: Concurrent Spatial and Channel 'Squeeze & Excitation' in Fully Convolutional Networks,
    Roy et al., MICCAI 2018 (arXiv:1803.02579): cSE = x·σ(FC(ReLU(FC(gap(x))))) with reduction 2,
    sSE = x·σ(conv1×1(x)); fusion 'add' as that paper, 'max' (max-out) or 'mul' as compared in its
    TMI 2019 extension (Roy et al., arXiv:1808.08127). 'add' is computed as x·(w_c + w_s), one product
    with x. `identity=True` (one γ, see `ZeroGate`): 'add' weights 1 + γ·(w_c + w_s − 1) and 'max' gated
    w_c and w_s, both without extra work on the map; 'mul' (x·w_c)·(x·w_s) mixes its output with x.
    """

    def __init__(self, channels: int, *, rd_ratio: float = 1 / 2, rd_channels: int | None = None,
                 rd_divisor: int = 1, fusion: str = "add", act_layer: str = "relu", gate_layer: str = "sigmoid",
                 identity: bool = False):
        super().__init__(identity)
        rd = reduced_channels(channels, rd_ratio, rd_channels, rd_divisor)
        check_choice("fusion", fusion, ("add", "max", "mul"))
        self.fusion = fusion
        self.form = "mix" if fusion == "mul" else "weights"
        self.fc1 = nn.Linear(channels, rd)
        self.act = get_act(act_layer)
        self.fc2 = nn.Linear(rd, channels)
        self.spatial = nn.Linear(channels, 1)  # a 1×1 conv to one map, for any number of spatial dims
        self.gate = get_act(gate_layer, "gate_layer")

    def _attn(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The channel weights (N, C, 1, ...) and the spatial map (N, 1, ...)."""
        dims = tuple(range(2, x.dim()))
        w = self.gate(self.fc2(self.act(self.fc1(x.mean(dims)))))
        w = w.view(*w.shape, *([1] * len(dims)))  # (N, C, 1, ...)
        return w, self.gate(self.spatial(x.movedim(1, -1))).movedim(-1, 1)  # (N, 1, ...)

    def applied(self, x: torch.Tensor) -> dict[str, Applied]:
        """The channel weights (N, C) and the spatial map (N, H, W), before the gate."""
        w, s = self._attn(x)
        return part("channel", w.flatten(1)) | part("spatial", s[:, 0])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w, s = self._attn(x)
        if self.fusion == "add":
            return x * self.add(self.weights(w), s)  # 1 + γ·(w − 1) + γ·s
        if self.fusion == "max":
            return torch.maximum(x * self.weights(w), x * self.weights(s))
        return self.mix(x, (x * w) * (x * s))
