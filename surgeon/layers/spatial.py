"""Spatial attention: reweight (or resample) the positions of a 2-D feature map of any size."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from surgeon.layers._util import check_bool, check_choice, check_odd_kernel, check_positive_int, check_ratio, get_act, \
    reduced_channels
from surgeon.layers.applied import Applied, part
from surgeon.layers.gate import ZeroGate


class SpatialAttn(ZeroGate):
    """CBAM's spatial attention: x · σ(BN(conv_k×k([max_c(x); mean_c(x)]))).

    Paper: CBAM: Convolutional Block Attention Module, Woo et al., ECCV 2018 (arXiv:1807.06521).
    As in the official code, the conv has no bias and is followed by batch norm (`norm=True`).
    `channels` is accepted for a uniform constructor; the module has no per-channel weights.
    `identity=True` gates the (N, 1, H, W) map: 1 + γ·(w − 1), γ = 0 (see `ZeroGate`).
    """

    def __init__(self, channels: int | None = None, *, kernel_size: int = 7, norm: bool = True,
                 gate_layer: str = "sigmoid", identity: bool = False):
        super().__init__(identity)
        check_odd_kernel("kernel_size", kernel_size)
        check_bool("norm", norm)
        self.conv = nn.Conv2d(2, 1, kernel_size, padding=kernel_size // 2, bias=not norm)
        self.bn = nn.BatchNorm2d(1, eps=1e-5, momentum=0.01) if norm else nn.Identity()
        self.gate = get_act(gate_layer, "gate_layer")

    def _attn(self, x: torch.Tensor) -> torch.Tensor:
        pooled = torch.cat([x.amax(1, keepdim=True), x.mean(1, keepdim=True)], dim=1)
        return self.gate(self.bn(self.conv(pooled)))  # (N, 1, H, W)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.weights(self._attn(x))

    def applied(self, x: torch.Tensor) -> dict[str, Applied]:
        """The spatial map (N, H, W) before the gate."""
        return part("spatial", self._attn(x)[:, 0])


class CoordAttn(ZeroGate):
    """Coordinate attention: x · σ(a_h) · σ(a_w) from direction-aware pooling along W and along H.

    Paper: Coordinate Attention for Efficient Mobile Network Design, Hou et al., CVPR 2021
    (arXiv:2103.02907). As the official code: the two pooled strips share a 1×1 conv (C → max(min_channels,
    C·rd_ratio)) with BN and h-swish, then one 1×1 conv (with bias) per direction.
    `identity=True` gates both direction weights with one γ: 1 + γ·(a − 1), γ = 0 (see `ZeroGate`).
    """

    def __init__(self, channels: int, *, rd_ratio: float = 1 / 32, rd_channels: int | None = None,
                 min_channels: int = 8, act_layer: str = "hardswish", gate_layer: str = "sigmoid",
                 identity: bool = False):
        super().__init__(identity)
        check_positive_int("channels", channels)
        check_positive_int("min_channels", min_channels)
        if rd_channels is None:
            check_ratio("rd_ratio", rd_ratio)
            rd = max(min_channels, int(channels * rd_ratio))
        else:
            rd = reduced_channels(channels, rd_ratio, rd_channels, 1)
        self.conv = nn.Conv2d(channels, rd, 1)
        self.bn = nn.BatchNorm2d(rd)
        self.act = get_act(act_layer)
        self.conv_h = nn.Conv2d(rd, channels, 1)
        self.conv_w = nn.Conv2d(rd, channels, 1)
        self.gate = get_act(gate_layer, "gate_layer")

    def _attn(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The direction weights (N, C, H, 1) and (N, C, 1, W)."""
        h, w = x.shape[-2:]
        strips = torch.cat([x.mean(3, keepdim=True), x.mean(2, keepdim=True).transpose(2, 3)], dim=2)
        y = self.act(self.bn(self.conv(strips)))  # (N, rd, H + W, 1)
        y_h, y_w = torch.split(y, [h, w], dim=2)
        return self.gate(self.conv_h(y_h)), self.gate(self.conv_w(y_w.transpose(2, 3)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a_h, a_w = self._attn(x)
        return x * self.weights(a_h) * self.weights(a_w)

    def applied(self, x: torch.Tensor) -> dict[str, Applied]:
        """The product of the two direction weights, per-channel maps (N, C, H, W), before the gate."""
        a_h, a_w = self._attn(x)
        return part("maps", a_h * a_w)


class SpatialTransformer(nn.Module):
    """Spatial transformer: a localisation net predicts an affine θ; the map is resampled on θ's grid.

    Paper: Spatial Transformer Networks, Jaderberg et al., NeurIPS 2015 (arXiv:1506.02025).
    Localisation net: 3×3 conv → ReLU → adaptive average pool to pool_size² → FC → ReLU → FC(6), whose
    weights start at zero and bias at the identity transform (as the paper advises). Computed as
    x + S_θ(x) − S_I(x), the same map but exactly x while θ is the identity (plain S_I(x) rounds to
    ~1e-7·|x|); this costs a second resampling. Bilinear sampling, zero padding, output size = input.
    """

    def __init__(self, channels: int, *, hidden_channels: int = 32, hidden_features: int = 32,
                 pool_size: int = 4, padding_mode: str = "zeros", align_corners: bool = False):
        super().__init__()
        check_positive_int("channels", channels)
        check_positive_int("hidden_channels", hidden_channels)
        check_positive_int("hidden_features", hidden_features)
        check_positive_int("pool_size", pool_size)
        self.padding_mode = check_choice("padding_mode", padding_mode, ("zeros", "border", "reflection"))
        self.align_corners = check_bool("align_corners", align_corners)
        self.loc = nn.Sequential(
            nn.Conv2d(channels, hidden_channels, 3, padding=1), nn.ReLU(),
            nn.AdaptiveAvgPool2d(pool_size), nn.Flatten(),
            nn.Linear(hidden_channels * pool_size * pool_size, hidden_features), nn.ReLU(),
        )
        self.theta = nn.Linear(hidden_features, 6)
        self.register_buffer("_identity", torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]), persistent=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.zeros_(self.theta.weight)
        with torch.no_grad():
            self.theta.bias.copy_(torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0, 0.0]))

    def _sample(self, x: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
        grid = F.affine_grid(theta, list(x.shape), align_corners=self.align_corners)
        return F.grid_sample(x, grid, mode="bilinear", padding_mode=self.padding_mode,
                             align_corners=self.align_corners)

    def applied(self, x: torch.Tensor) -> dict[str, Applied]:
        """The affine transform θ (N, 2, 3) the map is resampled with (the identity [[1, 0, 0], [0, 1, 0]] at init)."""
        return part("transform", self.theta(self.loc(x)).view(-1, 2, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        theta = self.theta(self.loc(x)).view(-1, 2, 3).to(x.dtype)
        identity = self._identity.to(x.dtype).expand_as(theta)
        # x + S_θ(x) − S_I(x) equals S_θ(x) (S_I(x) is x up to rounding) and is exactly x when θ = I
        return x + (self._sample(x, theta) - self._sample(x, identity))
