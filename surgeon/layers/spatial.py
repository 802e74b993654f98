"""Spatial attention: reweight (or resample) the positions of a feature map of any size.

2-D maps as the papers; `dims` builds the same idea over 1-D sequences (N, C, L) or 3-D volumes and clips
(N, C, D, H, W) with Conv1d/Conv3d where the idea carries (spatial: 1-3, coord and stn: 2-3).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from surgeon.layers._util import (adaptive_avg_pool_nd, batch_norm_nd, check_bool, check_choice, check_dims,
                                  check_odd_kernel, check_positive_int, check_ratio, conv_nd, get_act, reduced_channels)
from surgeon.errors import OptionError
from surgeon.layers.applied import Applied, part
from surgeon.layers.gate import ZeroGate, mul_own
from surgeon.layers.pooled import mean_max


class SpatialAttn(ZeroGate):
    """CBAM's spatial attention: x · σ(BN(conv_k×k([max_c(x); mean_c(x)]))).

    Paper: CBAM: Convolutional Block Attention Module, Woo et al., ECCV 2018 (arXiv:1807.06521).
    As in the official code, the conv has no bias and is followed by batch norm (`norm=True`).
    `channels` is accepted for a uniform constructor; the module has no per-channel weights.
    `identity=True` gates the (N, 1, H, W) map: 1 + γ·(w − 1), γ = 0 (see `ZeroGate`).
    `dims=1` or `3` makes the conv a k or k×k×k Conv1d/Conv3d over (N, C, L) or (N, C, D, H, W) maps.
    """

    def __init__(self, channels: int | None = None, *, kernel_size: int = 7, norm: bool = True,
                 gate_layer: str = "sigmoid", dims: int = 2, identity: bool = False):
        super().__init__(identity)
        check_odd_kernel("kernel_size", kernel_size)
        check_bool("norm", norm)
        self.conv = conv_nd(dims)(2, 1, kernel_size, padding=kernel_size // 2, bias=not norm)
        self.bn = batch_norm_nd(dims)(1, eps=1e-5, momentum=0.01) if norm else nn.Identity()
        self.gate = get_act(gate_layer, "gate_layer")

    def _attn(self, x: torch.Tensor) -> torch.Tensor:
        mean, peak = mean_max(x, [1])
        return self.gate(self.bn(self.conv(torch.cat([peak, mean], dim=1))))  # (N, 1, H, W)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.weights(self._attn(x))

    def applied(self, x: torch.Tensor) -> dict[str, Applied]:
        """The spatial map (N, H, W) before the gate."""
        return part("spatial", self._attn(x)[:, 0])


class CoordAttn(ZeroGate):
    """Coordinate attention: x · σ(a_h) · σ(a_w) from direction-aware pooling along W and along H.

    Paper: Coordinate Attention for Efficient Mobile Network Design, Hou et al., CVPR 2021
    (arXiv:2103.02907). As the official code: the pooled strips share a 1×1 conv (C → max(min_channels,
    C·rd_ratio)) with BN and h-swish, then one 1×1 conv (with bias) per direction.
    `dims=3` extends it to (N, C, D, H, W): three strips (each pooled over the other two positional dims)
    and three direction gates `conv_d`, `conv_h`, `conv_w`.
    `identity=True` gates every direction's weights with one γ: 1 + γ·(a − 1), γ = 0 (see `ZeroGate`).
    """

    def __init__(self, channels: int, *, rd_ratio: float = 1 / 32, rd_channels: int | None = None,
                 min_channels: int = 8, act_layer: str = "hardswish", gate_layer: str = "sigmoid",
                 dims: int = 2, identity: bool = False):
        super().__init__(identity)
        check_positive_int("channels", channels)
        check_positive_int("min_channels", min_channels)
        if check_dims(dims) == 1:
            raise OptionError("coord attention needs two or three positional dims (one direction has no "
                              "coordinate to encode), got dims=1")
        if rd_channels is None:
            check_ratio("rd_ratio", rd_ratio)
            rd = max(min_channels, int(channels * rd_ratio))
        else:
            rd = reduced_channels(channels, rd_ratio, rd_channels, 1)
        conv = conv_nd(dims)
        self.axes = "dhw"[3 - dims:]
        self.conv = conv(channels, rd, 1)
        self.bn = batch_norm_nd(dims)(rd)
        self.act = get_act(act_layer)
        for axis in self.axes:
            setattr(self, f"conv_{axis}", conv(rd, channels, 1))
        self.gate = get_act(gate_layer, "gate_layer")

    def _attn(self, x: torch.Tensor) -> list[torch.Tensor]:
        """One weight per positional dim, shaped to broadcast over x: (N, C, S_i, 1, ...) along dim i."""
        n, c, *sizes = x.shape
        dims = len(sizes)
        ones = [1] * (dims - 1)
        # strip i: x pooled over every positional dim but i, (N, C, S_i); all strips share one conv
        strips = torch.cat([x.mean([2 + j for j in range(dims) if j != i]) for i in range(dims)], dim=2)
        y = self.act(self.bn(self.conv(strips.reshape(n, c, -1, *ones))))  # (N, rd, ΣS, 1, ...)
        return [self.gate(getattr(self, f"conv_{axis}")(y_i)).reshape(n, c, *[s if j == i else 1
                                                                              for j, s in enumerate(sizes)])
                for i, (axis, y_i) in enumerate(zip(self.axes, torch.split(y, sizes, dim=2)))]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = x
        for a in self._attn(x):  # the first product is a new map; the others multiply into it (see mul_own)
            out = out * self.weights(a) if out is x else mul_own(out, self.weights(a))
        return out

    def applied(self, x: torch.Tensor) -> dict[str, Applied]:
        """The product of the direction weights, per-channel maps (N, C, H, W) (or (N, C, D, H, W)), before
        the gate."""
        maps = self._attn(x)
        prod = maps[0]
        for a in maps[1:]:
            prod = prod * a
        return part("maps", prod)


class SpatialTransformer(nn.Module):
    """Spatial transformer: a localisation net predicts an affine θ; the map is resampled on θ's grid.

    Paper: Spatial Transformer Networks, Jaderberg et al., NeurIPS 2015 (arXiv:1506.02025).
    Localisation net: 3×3 conv → ReLU → adaptive average pool to pool_size² → FC → ReLU → FC(6), whose
    weights start at zero and bias at the identity transform (as the paper advises). Computed as
    x + S_θ(x) − S_I(x), the same map but exactly x while θ is the identity (plain S_I(x) rounds to
    ~1e-7·|x|); this costs a second resampling. Bilinear sampling, zero padding, output size = input.
    `dims=3` transforms (N, C, D, H, W) volumes by a 3-D affine θ (3×4, trilinear sampling).
    """

    def __init__(self, channels: int, *, hidden_channels: int = 32, hidden_features: int = 32,
                 pool_size: int = 4, padding_mode: str = "zeros", align_corners: bool = False, dims: int = 2):
        super().__init__()
        check_positive_int("channels", channels)
        if check_dims(dims) == 1:
            raise OptionError("a spatial transformer needs two or three positional dims (affine_grid has no "
                              "1-D form), got dims=1")
        check_positive_int("hidden_channels", hidden_channels)
        check_positive_int("hidden_features", hidden_features)
        check_positive_int("pool_size", pool_size)
        self.padding_mode = check_choice("padding_mode", padding_mode, ("zeros", "border", "reflection"))
        self.align_corners = check_bool("align_corners", align_corners)
        self.loc = nn.Sequential(
            conv_nd(dims)(channels, hidden_channels, 3, padding=1), nn.ReLU(),
            adaptive_avg_pool_nd(dims)(pool_size), nn.Flatten(),
            nn.Linear(hidden_channels * pool_size ** dims, hidden_features), nn.ReLU(),
        )
        self.theta = nn.Linear(hidden_features, dims * (dims + 1))
        self.register_buffer("_identity", torch.eye(dims, dims + 1), persistent=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.zeros_(self.theta.weight)
        with torch.no_grad():
            self.theta.bias.copy_(self._identity.flatten())

    def _sample(self, x: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
        grid = F.affine_grid(theta, list(x.shape), align_corners=self.align_corners)
        return F.grid_sample(x, grid, mode="bilinear", padding_mode=self.padding_mode,
                             align_corners=self.align_corners)

    def applied(self, x: torch.Tensor) -> dict[str, Applied]:
        """The affine transform θ (N, 2, 3) the map is resampled with (the identity [[1, 0, 0], [0, 1, 0]] at init)."""
        return part("transform", self.theta(self.loc(x)).view(-1, *self._identity.shape))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        theta = self.theta(self.loc(x)).view(-1, *self._identity.shape).to(x.dtype)
        identity = self._identity.to(x.dtype).expand_as(theta)
        # x + S_θ(x) − S_I(x) equals S_θ(x) (S_I(x) is x up to rounding) and is exactly x when θ = I
        return x + (self._sample(x, theta) - self._sample(x, identity))
