"""The catalogue's second part (surgeon.layers.recalibration, grouped, strip, polarized, external,
local_attention): each layer against its paper's formula written out here, identity init and gradient reach
through surgeon.add, parameter counts on ResNet-50 from each paper's structure, option errors.
"""
import math

import pytest
import torch
import torch.nn.functional as F

import surgeon
from conftest import perturb_bn
from surgeon import catalogue, registry
from surgeon.errors import OptionError
from surgeon.layers.external import ExternalAttention
from surgeon.layers.grouped import ShuffleAttention, SplitAttn
from surgeon.layers.local_attention import BottleneckMHSA, HaloAttn, LambdaLayer
from surgeon.layers.polarized import PolarizedSelfAttention
from surgeon.layers.recalibration import GCT, CecaModule, EffectiveSE, SimAM
from surgeon.layers.strip import ELA, StripPool
from test_channel_spatial_mixed import _add, _timm  # identity ≤ 1e-5 and gradient reach, as there
from toy_models import TinyResNet

NEW = ["simam", "gct", "ese", "ceca", "sa", "splat", "ela", "strip", "psa", "ea", "bot", "halo", "lambda"]
RESNET50_BLOCKS = [256] * 3 + [512] * 4 + [1024] * 6 + [2048] * 3
RESNET50_STAGES = [256, 512, 1024]  # the stage sites of ResNet-50: ends of layer1..layer3


def _x(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _randomised(module, seed=0):
    """`module` with every parameter and BN statistic random, in eval mode: no init can hide a term."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
        for m in module.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
    return module.eval()


def _site(shape):
    """A stand-in for a traced site: what a feature-map build reads."""
    from surgeon.surgery.sites import Site

    return Site(name="layer1.0", kind="residual", shape=tuple(shape), layout="nchw")


def _bn(bn, t):
    """Eval batch norm over dim 1, written out."""
    shape = (1, -1) + (1,) * (t.dim() - 2)
    return ((t - bn.running_mean.view(shape)) / torch.sqrt(bn.running_var.view(shape) + bn.eps)
            * bn.weight.view(shape) + bn.bias.view(shape))


# -- each layer against its paper's formula ------------------------------------------------------------
def test_simam_is_x_times_sigmoid_of_inverse_energy():
    """SimAM Eq. 5 and its Algorithm 1: 1/e* = (x − μ)² / (4(σ̂² + λ)) + 0.5, σ̂² unbiased over the channel."""
    x = _x(2, 6, 5, 7)
    mu = x.mean((2, 3), keepdim=True)
    var = x.var((2, 3), unbiased=True, keepdim=True)
    expected = x * torch.sigmoid((x - mu) ** 2 / (4 * (var + 1e-4)) + 0.5)
    assert torch.allclose(SimAM(6)(x), expected, atol=1e-6)
    assert sum(p.numel() for p in SimAM(6).parameters()) == 0


@pytest.mark.parametrize("mode", ["l2", "l1"])
def test_gct_embedding_normalisation_and_gate(mode):
    """GCT Eqs. 1-4: s_c = α_c‖x_c‖_p, ŝ_c = √C·s_c/‖s‖₂ (C·s_c/‖s‖₁ for ℓ1), y = x(1 + tanh(γŝ + β))."""
    gct = _randomised(GCT(8, mode=mode))
    x = _x(2, 8, 5, 6)
    a, g, b = (p.view(1, -1, 1, 1) for p in (gct.alpha, gct.gamma, gct.beta))
    if mode == "l2":
        s = a * torch.sqrt((x ** 2).sum((2, 3), keepdim=True))
        s_hat = math.sqrt(8) * s / torch.linalg.vector_norm(s, dim=1, keepdim=True)
    else:
        s = a * x.abs().sum((2, 3), keepdim=True)
        s_hat = 8 * s / s.abs().sum(1, keepdim=True)
    assert torch.allclose(gct(x), x * (1 + torch.tanh(g * s_hat + b)), atol=1e-4)
    assert torch.equal(GCT(8)(x), x)  # the paper's init: γ = β = 0


def test_ese_is_one_fc_and_a_hard_sigmoid():
    ese = _randomised(EffectiveSE(6))
    x = _x(2, 6, 4, 5)
    z = x.mean((2, 3)) @ ese.fc.weight.t() + ese.fc.bias
    expected = x * (torch.clamp(z + 3, 0, 6) / 6)[..., None, None]
    assert torch.allclose(ese(x), expected, atol=1e-6)


def test_ceca_convolves_channels_circularly():
    ceca = _randomised(CecaModule(7, kernel_size=5))
    x = _x(2, 7, 3, 4)
    s, k = x.mean((2, 3)), ceca.conv.weight.view(5)
    logits = torch.stack([sum(k[j] * s[:, (c + j - 2) % 7] for j in range(5)) for c in range(7)], dim=1)
    assert torch.allclose(ceca(x), x * torch.sigmoid(logits)[..., None, None], atol=1e-6)


def test_shuffle_attention_groups_halves_and_shuffle():
    """SA-Net Eqs. 1-4 and the channel shuffle, per group g and channel, as the paper describes them."""
    sa = _randomised(ShuffleAttention(16, groups=2))
    x = _x(2, 16, 5, 6)
    half = 4
    pre = torch.empty_like(x)
    for g in range(2):
        x1, x2 = x[:, g * 8:g * 8 + half], x[:, g * 8 + half:g * 8 + 8]
        w1 = torch.sigmoid(sa.cweight * x1.mean((2, 3), keepdim=True) + sa.cbias)
        norm = (x2 - x2.mean((2, 3), keepdim=True)) / torch.sqrt(x2.var((2, 3), unbiased=False, keepdim=True) + 1e-5)
        norm = norm * sa.gn.weight.view(1, -1, 1, 1) + sa.gn.bias.view(1, -1, 1, 1)
        pre[:, g * 8:g * 8 + half] = x1 * w1
        pre[:, g * 8 + half:g * 8 + 8] = x2 * torch.sigmoid(sa.sweight * norm + sa.sbias)
    shuffled = torch.stack([pre[:, (k % 2) * 8 + k // 2] for k in range(16)], dim=1)  # 2 groups, interleaved
    assert torch.allclose(sa(x), shuffled, atol=1e-5)
    assert ShuffleAttention(24).groups == 12 and ShuffleAttention(256).groups == 64  # 64, lowered to divide


def test_split_attention_radix_softmax_per_cardinal_group():
    """ResNeSt Eqs. 1-3 with R = 2, K = 2: a softmax over the radix splits within each cardinal group."""
    sp = _randomised(SplitAttn(8, radix=2, groups=2, rd_channels=4))
    x = _x(2, 8, 5, 5)
    u = F.relu(_bn(sp.bn0, F.conv2d(x, sp.conv.weight, padding=1, groups=4)))
    splits = [u[:, :8], u[:, 8:]]
    s = (splits[0] + splits[1]).mean((2, 3), keepdim=True)
    z = F.relu(_bn(sp.bn1, F.conv2d(s, sp.fc1.weight, sp.fc1.bias, groups=2)))
    logits = F.conv2d(z, sp.fc2.weight, sp.fc2.bias, groups=2).flatten(1)  # per group k: [r0 of k | r1 of k]
    out = torch.zeros_like(x)
    for k in range(2):
        l0, l1 = logits[:, k * 8:k * 8 + 4], logits[:, k * 8 + 4:k * 8 + 8]
        a0 = torch.exp(l0) / (torch.exp(l0) + torch.exp(l1))
        ch = slice(k * 4, k * 4 + 4)
        out[:, ch] = splits[0][:, ch] * a0[..., None, None] + splits[1][:, ch] * (1 - a0)[..., None, None]
    assert torch.allclose(sp(x), out, atol=1e-5)


def test_ela_strip_maps():
    ela = _randomised(ELA(16, variant="S"))
    x = _x(2, 16, 5, 7)
    gn = ela.gn

    def branch(pooled):  # (N, C, L): conv1d, GroupNorm(16 channels in gn groups), sigmoid
        y = F.conv1d(pooled, ela.conv.weight, padding=2, groups=ela.conv.groups)
        g = y.view(2, gn.num_groups, -1)
        y = ((g - g.mean(-1, keepdim=True)) / torch.sqrt(g.var(-1, unbiased=False, keepdim=True) + gn.eps)).view_as(y)
        return torch.sigmoid(y * gn.weight[:, None] + gn.bias[:, None])

    expected = x * branch(x.mean(3))[..., None] * branch(x.mean(2))[:, :, None, :]
    assert torch.allclose(ela(x), expected, atol=1e-5)
    assert (ela.conv.kernel_size, ela.conv.groups, gn.num_groups) == ((5,), 2, 16)  # S: k 5, C/8 groups, GN 16


def test_strip_pooling_module():
    sp = _randomised(StripPool(6, mid_channels=4))
    x = _x(2, 6, 5, 7)
    h = _bn(sp.bn_h, F.conv2d(F.adaptive_avg_pool2d(x, (5, 1)), sp.conv_h.weight, padding=(1, 0)))
    w = _bn(sp.bn_w, F.conv2d(F.adaptive_avg_pool2d(x, (1, 7)), sp.conv_w.weight, padding=(0, 1)))
    fused = F.conv2d(F.relu(h.expand(-1, -1, 5, 7) + w.expand(-1, -1, 5, 7)), sp.fuse.weight, sp.fuse.bias)
    assert torch.allclose(sp(x), x * torch.sigmoid(fused), atol=1e-5)


@pytest.mark.parametrize("mode", ["parallel", "sequential"])
def test_polarized_self_attention(mode):
    """PSA Eqs. 1-5 as einsums over flattened positions."""
    psa = _randomised(PolarizedSelfAttention(8, mode=mode))
    ch, sp = psa.channel, psa.spatial
    lin = lambda conv, t: torch.einsum("oc,ncp->nop", conv.weight[:, :, 0, 0], t) + conv.bias[None, :, None]  # noqa: E731

    def a_ch(t):
        f = t.flatten(2)
        z = torch.einsum("ncp,np->nc", lin(ch.wv, f), lin(ch.wq, f)[:, 0].softmax(-1))
        z = ch.wz.weight[:, :, 0, 0] @ z.t() + ch.wz.bias[:, None]
        return torch.sigmoid(F.layer_norm(z.t(), (8,), ch.ln.weight, ch.ln.bias))[..., None, None]

    def a_sp(t):
        f = t.flatten(2)
        q = lin(sp.wq, f).mean(-1).softmax(-1)
        return torch.sigmoid(torch.einsum("nc,ncp->np", q, lin(sp.wv, f))).view(t.shape[0], 1, *t.shape[2:])

    x = _x(2, 8, 4, 5)
    if mode == "parallel":
        expected = a_ch(x) * x + a_sp(x) * x
    else:
        y = a_ch(x) * x
        expected = a_sp(y) * y
    assert torch.allclose(psa(x), expected, atol=1e-5)


def test_external_attention_double_normalisation():
    """EANet Eq. 7 with the official block: A = softmax over positions, then ℓ1 over memory units."""
    ea = _randomised(ExternalAttention(6, memory=5))
    x = _x(2, 6, 3, 4)
    f = F.conv2d(x, ea.proj_in.weight, ea.proj_in.bias).flatten(2).transpose(1, 2)  # (N, positions, C)
    logits = f @ ea.mk.weight[:, :, 0].t()  # (N, positions, S)
    a = torch.exp(logits) / torch.exp(logits).sum(1, keepdim=True)
    a = a / a.sum(2, keepdim=True)
    out = (a @ ea.mv.weight[:, :, 0].t()).transpose(1, 2).reshape(2, 6, 3, 4)
    expected = x + _bn(ea.norm, F.conv2d(out, ea.proj_out.weight))
    assert torch.allclose(ea(x), expected, atol=1e-5)
    fresh = ExternalAttention(6)
    assert torch.equal(fresh.mv.weight[:, :, 0], fresh.mk.weight[:, :, 0].t())  # M_v starts as M_kᵀ


def _heads_split(t, heads):
    n, c = t.shape[:2]
    return t.reshape(n, heads, c // heads, -1)  # (N, heads, d, positions)


def test_bot_mhsa_with_relative_logits_by_loops():
    bot = _randomised(BottleneckMHSA(8, num_heads=2, feat_size=(3, 4)))
    x = _x(1, 8, 3, 4)
    q, k, v = (_heads_split(t, 2) for t in F.conv2d(x, bot.qkv.weight).chunk(3, dim=1))
    out = torch.zeros(1, 2, 4, 12)
    pos = [(i, j) for i in range(3) for j in range(4)]
    for h in range(2):
        for a, (yi, xi) in enumerate(pos):
            logits = torch.stack([q[0, h, :, a] @ k[0, h, :, b] / 2 + q[0, h, :, a] @ (
                bot.rel_h[yj - yi + 2] + bot.rel_w[xj - xi + 3]) for b, (yj, xj) in enumerate(pos)])
            out[0, h, :, a] = v[0, h] @ logits.softmax(0)
    assert torch.allclose(bot(x), out.reshape(1, 8, 3, 4), atol=1e-5)
    # on another size the tables are resampled: still a finite map of the input's shape
    y = _x(2, 8, 5, 6)
    assert bot(y).shape == y.shape and torch.isfinite(bot(y)).all()


def test_halo_attention_by_loops_over_queries():
    """Blocks of 2×2, halo 1 on a 3×5 map (padded to 4×6): each query sees its block's 4×4 window, minus
    positions outside the map."""
    halo = _randomised(HaloAttn(4, block_size=2, halo_size=1, num_heads=2))
    x = _x(1, 4, 3, 5)
    q = _heads_split(F.conv2d(x, halo.q.weight), 2)
    k, v = (_heads_split(t, 2) for t in F.conv2d(x, halo.kv.weight).chunk(2, dim=1))
    out = torch.zeros(1, 2, 2, 15)
    for h in range(2):
        for yi in range(3):
            for xi in range(5):
                by, bx = yi // 2 * 2, xi // 2 * 2
                keys = [(yj, xj) for yj in range(by - 1, by + 3) for xj in range(bx - 1, bx + 3)
                        if 0 <= yj < 3 and 0 <= xj < 5]
                qa = q[0, h, :, yi * 5 + xi]
                logits = torch.stack([qa @ k[0, h, :, yj * 5 + xj] / math.sqrt(2) + qa @ (
                    halo.rel_h[yj - yi + 2] + halo.rel_w[xj - xi + 2]) for yj, xj in keys])
                vs = torch.stack([v[0, h, :, yj * 5 + xj] for yj, xj in keys], dim=1)
                out[0, h, :, yi * 5 + xi] = vs @ logits.softmax(0)
    assert torch.allclose(halo(x), out.reshape(1, 4, 3, 5), atol=1e-5)


def test_lambda_layer_content_and_position_lambdas_by_loops():
    """y_n = q_nᵀ(λc + λp_n): λc = softmax(K)ᵀV, λp_n = Σ_m E_{n−m} v_m (+ bias) over the r×r context."""
    lam = _randomised(LambdaLayer(4, dim_qk=3, num_heads=2, r=3))
    x = _x(1, 4, 3, 4)
    qkv = F.conv2d(x, lam.qkv.weight).flatten(2)[0]  # (heads·K + K + V, M)
    q = _bn(lam.norm_q, qkv[None, :6, :, None])[0, :, :, 0].view(2, 3, 12)
    k = qkv[6:9].softmax(-1)  # (K, M)
    v = _bn(lam.norm_v, qkv[None, 9:, :, None])[0, :, :, 0]  # (V, M)
    content = k @ v.t()  # (K, V)
    e, bias = lam.conv_lambda.weight[:, 0], lam.conv_lambda.bias  # (K, r, r)
    out = torch.zeros(2, 2, 12)
    for n in range(12):
        yn, xn = divmod(n, 4)
        pos = bias[:, None].expand(3, 2).clone()
        for dy in range(-1, 2):
            for dx in range(-1, 2):
                if 0 <= yn + dy < 3 and 0 <= xn + dx < 4:
                    pos = pos + e[:, dy + 1, dx + 1, None] * v[:, (yn + dy) * 4 + xn + dx][None, :]
        for h in range(2):
            out[h, :, n] = q[h, :, n] @ (content + pos)
    assert torch.allclose(lam(x), out.reshape(1, 4, 3, 4), atol=1e-5)


# -- shapes, backward, both modes ----------------------------------------------------------------------
@pytest.mark.parametrize("name", NEW)
def test_layer_shapes_backward_and_both_inits_on_odd_sizes(name):
    """Both modes keep odd shapes; backward reaches every parameter; identity init returns x exactly, paper init
    does not (GCT's paper init is the identity itself, so it builds no gate)."""
    build = registry.get_attention(name).build
    for shape in ((2, 16, 13, 9), (2, 24, 1, 1)):
        torch.manual_seed(0)
        layer = build(_site(shape), init="paper")
        x = _x(*shape).requires_grad_()
        for mode in (True, False):
            y = layer.train(mode)(x)
            assert y.shape == x.shape and torch.isfinite(y).all()
        layer.train()(x).square().sum().backward()
        assert torch.isfinite(x.grad).all()
        assert all(p.grad is not None for p in layer.parameters())
        with torch.no_grad():
            x = x.detach()
            assert torch.equal(build(_site(shape), init="identity").eval()(x), x)
            if shape[2] > 1:
                assert torch.equal(layer.eval()(x), x) == (name == "gct")


# -- identity init and gradient reach through surgeon.add ----------------------------------------------
@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return perturb_bn(TinyResNet(width=16)).eval()


@pytest.mark.parametrize("name", NEW)
def test_identity_and_gradients_on_tiny_resnet(tiny, name):
    _add(tiny, name, _x(1, 3, 23, 29))


TIMM = ["resnet18", "convnext_tiny", "mobilenetv3_small_100"]


@pytest.fixture(scope="module", params=TIMM)
def timm_model(request):
    return request.param, _timm(request.param)


@pytest.mark.slow
@pytest.mark.parametrize("name", NEW)
def test_identity_and_gradients_model_wide_on_timm(timm_model, name):
    """Every new attention at every site of its default kind of resnet18, convnext_tiny, mobilenetv3."""
    model_name, model = timm_model
    patched = _add(model, name, _x(1, 3, 64, 64))
    kind = registry.get_attention(name).default_kind
    expected = {("resnet18", "residual"): 8, ("resnet18", "stage"): 3, ("convnext_tiny", "residual"): 18,
                ("convnext_tiny", "stage"): 3, ("mobilenetv3_small_100", "residual"): 6,
                ("mobilenetv3_small_100", "stage"): 3}
    assert len(surgeon.edits(patched)) == expected[model_name, kind]


# the default run's sample (the full matrix above is slow; convnext_tiny only there): two sites each
SAMPLE = {"simam": "resnet18", "sa": "mobilenetv3_small_100"}
AT = {"resnet18": ["layer1.0", "layer4.1"], "convnext_tiny": ["stages.0.blocks.0", "stages.3.blocks.2"],
      "mobilenetv3_small_100": ["blocks.1.1", "blocks.4.1"]}


@pytest.mark.parametrize("name", SAMPLE)
def test_identity_and_gradients_on_a_timm_model_sample(name):
    model_name = SAMPLE[name]
    patched = _add(_timm(model_name), name, _x(1, 3, 64, 64), kind="residual",
                                             at=AT[model_name])
    assert len(surgeon.edits(patched)) == 2


# -- parameters on ResNet-50 from each paper's structure (derived) -------------------------------------
def _splat(c):  # conv R·C×C/(R)×9 /groups(=1)... + BN(2RC) + fc1 C→d (+bias) + BN(d) + fc2 d→RC (+bias)
    d = max(32, (c * 2 // 4 + 4) // 8 * 8)
    return 9 * c * c + 2 * 2 * c + (c * d + d) + 2 * d + (d * 2 * c + 2 * c)


PER_BLOCK = {
    "simam": lambda c: 0,  # parameter-free
    "gct": lambda c: 3 * c,  # α, γ, β per channel (GCT Sec. 3)
    "ese": lambda c: c * c + c,  # one C→C FC with bias (CenterMask Sec. 3.3)
    "ceca": None,  # as eca: the adaptive kernel sizes, asserted in test_channel_spatial_mixed
    "sa": lambda c: 3 * c // 64,  # w, b of each half + GN affine: 6·C/2G with G = 64
    "splat": _splat,  # ResNeSt with R = 2, K = 1, d = max(C·R/4 rounded to 8, 32)
    "ela": lambda c: c * (c // 16 if False else 1) * 7 + 2 * c,  # B: depthwise 7-tap conv (no bias), GN affine
    "strip": lambda c: 2 * 3 * c * c + 2 * 2 * c + c * c + c,  # 3×1 and 1×3 C→C (no bias), 2 BN, 1×1 C→C + bias
    "psa": lambda c: ((c * (c // 2) + c // 2) + (c + 1) + ((c // 2) * c + c) + 2 * c)  # channel branch
    + 2 * (c * (c // 2) + c // 2),  # spatial branch: W_q, W_v to C/2
    "lambda": lambda c: c * (4 * 16 + 16 + c // 4) + 2 * 64 + 2 * (c // 4) + (16 * 81 + 16),
    "halo": lambda c: 3 * c * c + 2 * (8 + 14 - 1) * (c // 8),  # q, kv 1×1; relative tables
}
PER_STAGE = {
    "ea": lambda c: (c * c + c) + 2 * 64 * c + c * c + 2 * c,  # proj_in, M_k, M_v, proj_out, BN
    # (the stage sites are 56×56, 28×28, 14×14 at 224×224; tables 2H − 1 rows of C/4)
    "bot": None,
}


@pytest.fixture(scope="module")
def r50_sites():
    by_kind = catalogue.r50_sites()
    assert [s.channels for s in by_kind["residual"]] == RESNET50_BLOCKS
    assert [s.channels for s in by_kind["stage"]] == RESNET50_STAGES
    return by_kind


@pytest.mark.parametrize("name", [n for n, f in PER_BLOCK.items() if f])
def test_resnet50_parameters_from_structure_residual(r50_sites, name):
    added = catalogue.r50_added(registry.get_attention(name), r50_sites)
    assert added["kind"] == "residual" and added["sites"] == 16
    assert added["params"] == sum(PER_BLOCK[name](c) for c in RESNET50_BLOCKS)


def test_resnet50_parameters_from_structure_stage(r50_sites):
    ea = catalogue.r50_added(registry.get_attention("ea"), r50_sites)
    assert (ea["kind"], ea["sites"]) == ("stage", 3)
    assert ea["params"] == sum(PER_STAGE["ea"](c) for c in RESNET50_STAGES)
    bot = catalogue.r50_added(registry.get_attention("bot"), r50_sites)
    sizes = [s.shape[2] for s in r50_sites["stage"]]
    assert sizes == [56, 28, 14]
    assert bot["params"] == sum(3 * c * c + 2 * (2 * h - 1) * (c // 4) for c, h in zip(RESNET50_STAGES, sizes))
    ceca = catalogue.r50_added(registry.get_attention("ceca"), r50_sites)
    assert ceca["params"] == catalogue.r50_added(registry.get_attention("eca"), r50_sites)["params"] == 86


# -- option errors ---------------------------------------------------------------------------------------
BAD = [("simam", dict(e_lambda=0)), ("gct", dict(mode="l3")), ("ese", dict(gate_layer="sigmoidd")),
       ("ceca", dict(kernel_size=4)), ("sa", dict(groups=0)), ("splat", dict(radix=0)), ("splat", dict(groups=3)),
       ("ela", dict(variant="XL")), ("strip", dict(mid_channels=0)), ("psa", dict(mode="serial")),
       ("ea", dict(memory=0)), ("bot", dict(num_heads=0)), ("halo", dict(block_size=0)), ("lambda", dict(r=4))]


@pytest.mark.parametrize("name,options", BAD)
def test_options_out_of_range_give_one_line_option_error(name, options):
    with pytest.raises(OptionError) as exc:
        registry.get_attention(name).build(_site((1, 32, 8, 8)), **options)
    msg = str(exc.value)
    assert "\n" not in msg and name in msg
    key = next(iter(options))
    assert key in msg or repr(options[key]) in msg
