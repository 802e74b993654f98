"""Channel attention: reweight channels from pooled statistics (or, for sk, mix branches per channel).

SE, ECA, GC and SRM work on any channels-first tensor (N, C, ...), 1-D, 2-D and 3-D maps alike;
SK, GE and FCA need (N, C, H, W). None of them is built for one spatial size.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from surgeon.errors import OptionError
from surgeon.layers._util import (check_act, check_bool, check_choice, check_feat_size, check_groups, check_int,
                                  check_number, check_odd_kernel, check_positive, check_positive_int, check_ratio,
                                  get_act, reduced_channels, spatial_dims)
from surgeon.layers.applied import Applied, part
from surgeon.layers.gate import ZeroGate


class SEModule(ZeroGate):
    """Squeeze-and-Excitation: x · σ(W₂ δ(W₁ avgpool(x))).

    Paper: Squeeze-and-Excitation Networks, Hu et al., CVPR 2018 (arXiv:1709.01507).
    The hidden width is exactly channels·rd_ratio (rd_divisor=1), as in the paper; timm rounds to
    multiples of 8, which pass as rd_divisor=8. The FC layers are nn.Linear (same parameters as 1×1 convs).
    `identity=True` gates the channel weights, 1 + γ·(w − 1) with γ = 0 (see `ZeroGate`), as do the
    other multiplicative attentions here.
    """

    def __init__(self, channels: int, *, rd_ratio: float = 1 / 16, rd_channels: int | None = None,
                 rd_divisor: int = 1, act_layer: str = "relu", gate_layer: str = "sigmoid", bias: bool = True,
                 identity: bool = False):
        super().__init__(identity)
        rd = reduced_channels(channels, rd_ratio, rd_channels, rd_divisor)
        self.fc1 = nn.Linear(channels, rd, bias=bias)
        self.act = get_act(act_layer)
        self.fc2 = nn.Linear(rd, channels, bias=bias)
        self.gate = get_act(gate_layer, "gate_layer")

    def _attn(self, x: torch.Tensor) -> torch.Tensor:
        return self.gate(self.fc2(self.act(self.fc1(x.mean(spatial_dims(x))))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weights(self._attn(x))
        return x * w.view(*w.shape, *([1] * (x.dim() - 2)))

    def applied(self, x: torch.Tensor) -> dict[str, Applied]:
        """The channel weights (N, C) before the gate."""
        return part("channel", self._attn(x))


def eca_kernel_size(channels: int, gamma: float = 2, beta: float = 1) -> int:
    """ECA's adaptive kernel size: the odd number nearest to |log2(C)/γ + b/γ| (rounded up to odd)."""
    t = int(abs(math.log2(channels) / gamma + beta / gamma))
    return t if t % 2 else t + 1


class EcaModule(ZeroGate):
    """Efficient Channel Attention: a 1-D convolution across pooled channels, no reduction.

    Paper: ECA-Net: Efficient Channel Attention for Deep Convolutional Neural Networks, Wang et al.,
    CVPR 2020 (arXiv:1910.03151). Kernel size adapts to the channel count (γ=2, b=1) unless given.
    """

    def __init__(self, channels: int, *, kernel_size: int | None = None, gamma: float = 2, beta: float = 1,
                 gate_layer: str = "sigmoid", identity: bool = False):
        super().__init__(identity)
        check_positive_int("channels", channels)
        check_positive("gamma", gamma)
        check_number("beta", beta)
        if kernel_size is None:
            kernel_size = eca_kernel_size(channels, gamma, beta)
        check_odd_kernel("kernel_size", kernel_size)
        self.kernel_size = kernel_size
        self.conv = nn.Conv1d(1, 1, kernel_size, padding=(kernel_size - 1) // 2, bias=False)
        self.gate = get_act(gate_layer, "gate_layer")

    def _attn(self, x: torch.Tensor) -> torch.Tensor:
        return self.gate(self.conv(x.mean(spatial_dims(x)).unsqueeze(1))).squeeze(1)  # (N, 1, C) -> (N, C)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weights(self._attn(x))
        return x * w.view(*w.shape, *([1] * (x.dim() - 2)))

    def applied(self, x: torch.Tensor) -> dict[str, Applied]:
        """The channel weights (N, C) before the gate."""
        return part("channel", self._attn(x))


def _expand(w: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """(N, C) weights viewed to broadcast over x's spatial dims."""
    return w.view(*w.shape, *([1] * (x.dim() - 2)))


class SelectiveKernel(nn.Module):
    """Selective Kernel: branches of growing receptive field, mixed per channel by a softmax over branches.

    Paper: Selective Kernel Networks, Li et al., CVPR 2019 (arXiv:1903.06586).
    An insertable C→C block (the paper replaces the bottleneck's 3×3 conv with it): branch m is a grouped
    k×k conv (`groups` by default the paper's 32, or the largest divisor of C below 32 where 32 does not
    divide C) with dilation m+1 (the paper's 5×5 branch as a dilated 3×3), BN, ReLU; fuse
    z = ReLU(BN(W·gap(ΣUₘ))) with d = max(C·rd_ratio, min_channels); select aₘ = softmax over m of Aₘz.
    """

    def __init__(self, channels: int, *, num_branches: int = 2, kernel_size: int = 3, groups: int | None = None,
                 rd_ratio: float = 1 / 16, min_channels: int = 32, act_layer: str = "relu"):
        super().__init__()
        check_positive_int("channels", channels)
        check_int("num_branches", num_branches, low=2)
        check_odd_kernel("kernel_size", kernel_size)
        if groups is None:  # the paper's cardinality 32, or the largest divisor of channels below it
            groups = max(g for g in range(1, min(32, channels) + 1) if channels % g == 0)
        check_positive_int("groups", groups)
        check_groups(channels, groups)
        check_ratio("rd_ratio", rd_ratio)
        check_positive_int("min_channels", min_channels)
        d = max(int(channels * rd_ratio), min_channels)
        self.num_branches = num_branches
        self.branches = nn.ModuleList(
            nn.Sequential(nn.Conv2d(channels, channels, kernel_size, padding=kernel_size // 2 * (m + 1),
                                    dilation=m + 1, groups=groups, bias=False),
                          nn.BatchNorm2d(channels), get_act(act_layer))
            for m in range(num_branches))
        self.fc = nn.Sequential(nn.Linear(channels, d, bias=False), nn.BatchNorm1d(d), get_act(act_layer))
        self.select = nn.Linear(d, num_branches * channels, bias=False)

    def _select(self, feats: list[torch.Tensor]) -> torch.Tensor:
        """The softmax over branches, (N, M, C)."""
        z = self.fc(sum(feats).mean((2, 3)))
        return self.select(z).view(z.shape[0], self.num_branches, -1).softmax(dim=1)

    def applied(self, x: torch.Tensor) -> dict[str, Applied]:
        """The branch weights (N, M, C), summing to 1 over the M branches."""
        return part("branches", self._select([branch(x) for branch in self.branches]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feats = [branch(x) for branch in self.branches]
        a = self._select(feats)[..., None, None]
        # a running sum rather than stacking the branches: elementwise ops keep channels_last maps as they are
        out = feats[0] * a[:, 0]
        for i in range(1, self.num_branches):
            out = out + feats[i] * a[:, i]
        return out


class _GlobalDepthwise(nn.Module):
    """A depthwise conv whose kernel covers the whole (H₀, W₀) map: one learned weighted sum per channel.

    On another size the kernel is resampled bilinearly to (H, W) and rescaled by H₀W₀/(HW), so that a
    kernel that averages still averages.
    """

    def __init__(self, channels: int, feat_size: tuple[int, int]):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, tuple(feat_size), groups=channels, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.conv.weight
        if tuple(x.shape[-2:]) != tuple(w.shape[-2:]):
            scale = w.shape[-2] * w.shape[-1] / (x.shape[-2] * x.shape[-1])
            w = F.interpolate(w, size=tuple(x.shape[-2:]), mode="bilinear", align_corners=False) * scale
        return F.conv2d(x, w, groups=x.shape[1])


class GatherExcite(ZeroGate):
    """Gather-Excite: x · σ(upsample(gather(x))), gathering context over an `extent` (0 = the whole map).

    Paper: Gather-Excite: Exploiting Feature Context in CNNs, Hu et al., NeurIPS 2018 (arXiv:1810.12348).
    `param=False` is the parameter-free GE-θ⁻ (average pooling: windows of 2e−1 every e positions, as
    timm); `param=True` is GE-θ (strided depthwise 3×3 convs with BN, or one map-sized depthwise conv for
    the global extent, built for `feat_size` and resampled on other sizes); `mlp=True` adds θ⁺'s 1×1 MLP.
    """

    def __init__(self, channels: int, *, extent: int = 0, param: bool = False, mlp: bool = False,
                 rd_ratio: float = 1 / 16, feat_size: tuple[int, int] | None = None, act_layer: str = "relu",
                 identity: bool = False):
        super().__init__(identity)
        check_positive_int("channels", channels)
        check_int("extent", extent, low=0)
        check_bool("param", param)
        check_bool("mlp", mlp)
        check_ratio("rd_ratio", rd_ratio)  # checked even where unused (mlp=False): a wrong value is a mistake
        check_act(act_layer)
        self.extent = extent
        self.gather: nn.Module | None = None
        if param:
            if extent == 0:
                check_feat_size(feat_size)
                self.gather = nn.Sequential(_GlobalDepthwise(channels, tuple(feat_size)), nn.BatchNorm2d(channels))
            else:
                if extent & (extent - 1) or extent < 2:
                    raise OptionError(f"extent must be 0 or a power of two >= 2 with param=True, got {extent}")
                layers: list[nn.Module] = []
                for i in range(extent.bit_length() - 1):
                    if i:
                        layers.append(get_act(act_layer))
                    layers += [nn.Conv2d(channels, channels, 3, stride=2, padding=1, groups=channels, bias=False),
                               nn.BatchNorm2d(channels)]
                self.gather = nn.Sequential(*layers)
        self.mlp: nn.Module | None = None
        if mlp:
            rd = reduced_channels(channels, rd_ratio, None, 1)
            self.mlp = nn.Sequential(nn.Conv2d(channels, rd, 1), get_act(act_layer), nn.Conv2d(rd, channels, 1))

    def _attn(self, x: torch.Tensor) -> torch.Tensor:
        """σ(gathered context), (N, C, h, w) on the gathered grid."""
        if self.gather is not None:
            g = self.gather(x)
        elif self.extent == 0:
            g = x.mean((2, 3), keepdim=True)
        else:
            e = self.extent
            g = F.avg_pool2d(x, 2 * e - 1, stride=e, padding=e - 1, count_include_pad=False)
        if self.mlp is not None:
            g = self.mlp(g)
        return torch.sigmoid(g)

    def applied(self, x: torch.Tensor) -> dict[str, Applied]:
        """Channel weights (N, C) for the global extent; else per-channel maps (N, C, H, W) on x's grid."""
        w = self._attn(x)
        if w.shape[-2:] == (1, 1):
            return part("channel", w.flatten(1))
        return part("maps", F.interpolate(w, size=tuple(x.shape[-2:]), mode="nearest"))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # σ and the gate act on the gathered map; nearest upsampling only repeats their values
        w = self.weights(self._attn(x))
        if w.shape[-2:] != x.shape[-2:] and w.shape[-2:] != (1, 1):
            w = F.interpolate(w, size=tuple(x.shape[-2:]), mode="nearest")
        return x * w


class GlobalContext(ZeroGate):
    """Global context block: x + T(Σⱼ softmax(w·xⱼ)·xⱼ), T = 1×1 conv → LayerNorm → ReLU → 1×1 conv.

    Paper: GCNet: Non-local Networks Meet Squeeze-Excitation Networks and Beyond, Cao et al., ICCVW 2019
    (arXiv:1904.11492). As the official code: biases everywhere, the transform's last conv zero-initialised
    (so the block starts as the identity); `fusion='mul'` is the paper's x·σ(T(·)) ablation. The 1×1 convs
    act on pooled vectors and are stored as nn.Linear (same parameters), so any (N, C, ...) map works.
    `identity=True` gates the weights of fusion 'mul' only: 'add' starts as the identity by its zero last layer.
    """

    def __init__(self, channels: int, *, rd_ratio: float = 1 / 16, rd_channels: int | None = None,
                 rd_divisor: int = 1, fusion: str = "add", act_layer: str = "relu", identity: bool = False):
        check_choice("fusion", fusion, ("add", "mul"))
        super().__init__(identity and fusion == "mul")
        rd = reduced_channels(channels, rd_ratio, rd_channels, rd_divisor)
        self.fusion = fusion
        self.conv_attn = nn.Linear(channels, 1)
        self.transform = nn.Sequential(nn.Linear(channels, rd), nn.LayerNorm(rd), get_act(act_layer),
                                       nn.Linear(rd, channels))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.kaiming_normal_(self.conv_attn.weight, mode="fan_in", nonlinearity="relu")
        nn.init.zeros_(self.conv_attn.bias)
        nn.init.zeros_(self.transform[-1].weight)
        nn.init.zeros_(self.transform[-1].bias)

    def _pool(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(softmax over positions (N, L, 1), transformed context (N, C))."""
        flat = x.flatten(2)  # (N, C, L)
        scores = self.conv_attn(flat.transpose(1, 2)).softmax(dim=1)  # (N, L, 1)
        return scores, self.transform(torch.bmm(flat, scores).squeeze(-1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = _expand(self._pool(x)[1], x)
        return x + t if self.fusion == "add" else x * self.weights(torch.sigmoid(t))

    def applied(self, x: torch.Tensor) -> dict[str, Applied]:
        """The context pooling's softmax over positions (N, *spatial); with fusion 'mul', channel weights too."""
        scores, t = self._pool(x)
        out = part("pool", scores.reshape(x.shape[0], *x.shape[2:]))
        return out | (part("channel", torch.sigmoid(t)) if self.fusion == "mul" else {})


class SRM(ZeroGate):
    """Style-based Recalibration: x · σ(BN(w_c,1·mean_c + w_c,2·std_c)), one weight pair per channel.

    Paper: SRM: A Style-based Recalibration Module for Convolutional Neural Networks, Lee et al.,
    ICCV 2019 (arXiv:1903.10829). As the official code: zero-initialised channel-wise FC, std from the
    unbiased variance + eps (biased when there is only one position, where the unbiased one is undefined).
    """

    def __init__(self, channels: int, *, eps: float = 1e-5, gate_layer: str = "sigmoid", identity: bool = False):
        super().__init__(identity)
        check_positive_int("channels", channels)
        self.eps = check_number("eps", eps, low=0)
        self.cfc = nn.Parameter(torch.zeros(channels, 2))
        self.bn = nn.BatchNorm1d(channels)
        self.gate = get_act(gate_layer, "gate_layer")

    def _attn(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.flatten(2)
        mean = flat.mean(-1)
        std = (flat.var(-1, correction=1 if flat.shape[-1] > 1 else 0) + self.eps).sqrt()
        return self.gate(self.bn(mean * self.cfc[:, 0] + std * self.cfc[:, 1]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * _expand(self.weights(self._attn(x)), x)

    def applied(self, x: torch.Tensor) -> dict[str, Applied]:
        """The channel weights (N, C) before the gate."""
        return part("channel", self._attn(x))


# FcaNet's frequency orders on a 7×7 DCT grid (u, v), from the paper's per-frequency ImageNet study
# (`top`), low-first zig-zag (`low`) and least useful first (`bot`), as in the official code.
_FCA_FREQS = {
    "top": ((0, 0), (0, 1), (6, 0), (0, 5), (0, 2), (1, 0), (1, 2), (4, 0), (5, 0), (1, 6), (3, 0), (0, 4),
            (0, 6), (0, 3), (3, 5), (2, 2), (4, 6), (6, 3), (3, 3), (5, 3), (5, 5), (2, 1), (6, 1), (5, 2),
            (5, 4), (3, 2), (3, 1), (4, 1), (2, 3), (2, 0), (6, 5), (1, 3)),
    "low": ((0, 0), (0, 1), (1, 0), (1, 1), (0, 2), (2, 0), (2, 1), (1, 2), (2, 2), (0, 3), (3, 0), (4, 0),
            (0, 4), (1, 3), (3, 1), (0, 5), (1, 4), (2, 3), (3, 2), (4, 1), (5, 0), (0, 6), (1, 5), (2, 4),
            (3, 3), (4, 2), (5, 1), (6, 0), (1, 6), (2, 5), (3, 4), (4, 3)),
    "bot": ((6, 6), (1, 4), (3, 4), (3, 6), (2, 6), (4, 3), (1, 1), (2, 4), (4, 4), (4, 5), (5, 6), (1, 5),
            (4, 2), (6, 2), (2, 5), (5, 1), (6, 4), (1, 3), (6, 5), (2, 0), (2, 3), (4, 1), (3, 1), (3, 2),
            (5, 4), (5, 2), (6, 1), (2, 1), (5, 5), (5, 3), (3, 3), (6, 3)),
}
FCA_FREQ_SEL = tuple(f"{k}{n}" for k in _FCA_FREQS for n in (1, 2, 4, 8, 16, 32))


def dct_filters(size: tuple[int, int], freqs: list[tuple[int, int]], *, dtype=torch.float32,
                device=None) -> torch.Tensor:
    """Orthonormal 2-D DCT-II bases (len(freqs), H, W); frequencies on the 7×7 grid scaled to (H, W)."""
    out = []
    for (u7, v7) in freqs:
        basis = []
        for n, f7 in zip(size, (u7, v7)):
            f = f7 * n // 7  # (2, 2) on 14×14 is (1, 1) on 7×7; always < n
            pos = torch.arange(n, dtype=torch.float64, device=device)
            b = torch.cos(math.pi * f * (pos + 0.5) / n) / math.sqrt(n)
            basis.append(b * math.sqrt(2) if f else b)
        out.append(basis[0][:, None] * basis[1][None, :])
    return torch.stack(out).to(dtype)


class FcaModule(ZeroGate):
    """Multi-spectral channel attention: SE whose squeeze is a DCT component per channel group.

    Paper: FcaNet: Frequency Channel Attention Networks, Qin et al., ICCV 2021 (arXiv:2012.11879).
    Channels are split into len(freqs) groups, group i pooled with the 2-D DCT basis of frequency i
    (FC layers without biases, as the official code). Bases are computed for the input's own H×W
    (a non-persistent buffer for `feat_size`, recomputed for other sizes) instead of pooling to 7×7.
    """

    def __init__(self, channels: int, *, freq_sel: str = "top16", rd_ratio: float = 1 / 16,
                 rd_channels: int | None = None, rd_divisor: int = 1, feat_size: tuple[int, int] = (7, 7),
                 act_layer: str = "relu", gate_layer: str = "sigmoid", identity: bool = False):
        super().__init__(identity)
        rd = reduced_channels(channels, rd_ratio, rd_channels, rd_divisor)
        check_choice("freq_sel", freq_sel, FCA_FREQ_SEL)
        check_feat_size(feat_size)
        self.freqs = list(_FCA_FREQS[freq_sel[:3]][: int(freq_sel[3:])])
        # channel c pools with frequency c·F // C: equal groups when F divides C, as the paper
        self.register_buffer("group", torch.arange(channels) * len(self.freqs) // channels, persistent=False)
        self.register_buffer("dct", dct_filters(tuple(feat_size), self.freqs), persistent=False)
        self.fc1 = nn.Linear(channels, rd, bias=False)
        self.act = get_act(act_layer)
        self.fc2 = nn.Linear(rd, channels, bias=False)
        self.gate = get_act(gate_layer, "gate_layer")

    def _attn(self, x: torch.Tensor) -> torch.Tensor:
        dct = self.dct
        if tuple(dct.shape[-2:]) != tuple(x.shape[-2:]):
            dct = dct_filters(tuple(x.shape[-2:]), self.freqs, dtype=x.dtype, device=x.device)
        s = torch.einsum("nchw,chw->nc", x, dct.to(x.dtype)[self.group])
        return self.gate(self.fc2(self.act(self.fc1(s))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.weights(self._attn(x))[:, :, None, None]

    def applied(self, x: torch.Tensor) -> dict[str, Applied]:
        """The channel weights (N, C) before the gate."""
        return part("channel", self._attn(x))
