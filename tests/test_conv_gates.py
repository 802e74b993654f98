"""aaconv (conv sites), residual_attention, attention_gate (skip sites on a U-Net built here)."""

import pytest
import timm
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from torch import nn

import surgeon
from surgeon.surgery.owned import rewritten
from surgeon.cli import cli
from surgeon.errors import OptionError
from surgeon.layers.attention_gate import AttentionGate
from surgeon.layers.augmented import AAConv2d
from surgeon.layers.residual_attention import ResidualAttention, auto_depth

from conftest import perturb_bn
from toy_models import TinyResNet


def _block(i, o):
    return nn.Sequential(nn.Conv2d(i, o, 3, padding=1), nn.BatchNorm2d(o), nn.ReLU())


class UNet(nn.Module):
    """Three levels; one decoder upsamples with a transposed conv, the other with F.interpolate."""

    def __init__(self, c=8):
        super().__init__()
        self.enc1, self.enc2, self.enc3 = _block(3, c), _block(c, 2 * c), _block(2 * c, 4 * c)
        self.pool = nn.MaxPool2d(2)
        self.up3 = nn.ConvTranspose2d(4 * c, 2 * c, 2, stride=2)
        self.dec2 = _block(4 * c, 2 * c)
        self.dec1 = _block(3 * c, c)
        self.head = nn.Conv2d(c, 2, 1)

    def forward(self, x):
        e1 = self.enc1(x)
        e2 = self.enc2(self.pool(e1))
        e3 = self.enc3(self.pool(e2))
        d2 = self.dec2(torch.cat([e2, self.up3(e3)], dim=1))
        d1 = self.dec1(torch.cat([e1, F.interpolate(d2, scale_factor=2.0, mode="bilinear")], dim=1))
        return self.head(d1)


def unet():
    """A factory for the CLI (`test_conv_gates:unet`)."""
    torch.manual_seed(0)
    return perturb_bn(UNet()).eval()


class ToyCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.conv1 = nn.Conv2d(8, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 32, 3, stride=2, padding=1)
        self.dw = nn.Conv2d(32, 32, 3, padding=1, groups=32)
        self.fc = nn.Linear(32, 10)

    def forward(self, x):
        x = F.relu(self.conv1(F.relu(self.stem(x))))
        x = F.relu(self.dw(F.relu(self.conv2(x))))
        return self.fc(x.mean((2, 3)))


@pytest.fixture(scope="module")
def resnet50():
    torch.manual_seed(0)
    return perturb_bn(timm.create_model("resnet50")).eval()


def _x(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _diff(a, b):
    return (a - b).abs().max().item()


# -- aaconv ---------------------------------------------------------------------------------------------
def test_conv_sites_toy_and_resnet50(resnet50):
    sites = surgeon.sites(ToyCNN(), kind="conv", input_size=(3, 16, 16))
    # the stem reads the image and the depthwise conv is grouped: neither is a site
    assert [s.name for s in sites] == ["conv1", "conv2"]
    s = sites[1]
    assert s.action == "replace" and s.shape == (2, 16, 16, 16) and s.out_shape == (2, 32, 8, 8)
    assert s.info["stride"] == (2, 2) and s.info["path"] == "conv2" and isinstance(s.info["module"], nn.Conv2d)
    r50 = surgeon.sites(resnet50, kind="conv", input_size=(3, 64, 64))
    assert len(r50) == 52 and r50[0].name == "layer1.0.conv1"  # every conv but the stem


def _reference_attention(m: AAConv2d, x):
    """softmax(QKᵀ/√d + rel)V written out, per head, for AAConv2d.attend at stride 1."""
    b, _, h, w = x.shape
    q, k, v = torch.split(m.qkv(x), [m.dk, m.dk, m.dv], dim=1)
    nh, dkh, dvh = m.heads, m.dk // m.heads, m.dv // m.heads
    outs = []
    for i in range(nh):
        qi = q[:, i * dkh:(i + 1) * dkh].flatten(2).transpose(1, 2) * dkh ** -0.5  # (B, N, d)
        ki = k[:, i * dkh:(i + 1) * dkh].flatten(2)
        vi = v[:, i * dvh:(i + 1) * dvh].flatten(2).transpose(1, 2)
        logits = qi @ ki
        if m.relative:
            rel = torch.zeros(b, h * w, h * w)
            for a in range(h * w):
                for c in range(h * w):
                    (r1, c1), (r2, c2) = divmod(a, w), divmod(c, w)
                    rel[:, a, c] = qi[:, a] @ (m.rel_w[c2 - c1 + w - 1] + m.rel_h[r2 - r1 + h - 1])
            logits = logits + rel
        outs.append((logits.softmax(-1) @ vi).transpose(1, 2).reshape(b, dvh, h, w))
    return m.proj(torch.cat(outs, 1))


@pytest.mark.parametrize("relative", [False, True])
def test_aaconv_attention_equals_reference(relative):
    torch.manual_seed(0)
    m = AAConv2d(6, out_channels=20, heads=2, key_channels=8, value_channels=4, relative=relative, size=(3, 4))
    x = _x(2, 6, 3, 4)
    out = m(x)
    assert out.shape == (2, 20, 3, 4)
    assert torch.allclose(out[:, 16:], _reference_attention(m, x), atol=1e-5)
    assert torch.equal(out[:, :16], m.conv(x))


def test_aaconv_paper_defaults_and_stride():
    m = AAConv2d(64, out_channels=256)  # κ = 2υ = 0.2, Nh = 8: d_k = 0.2·256 → 48, d_v = 0.1·256 → 24
    assert (m.dk, m.dv, m.heads, m.relative) == (48, 24, 8, True) and m.conv.out_channels == 232
    s = AAConv2d(8, out_channels=16, heads=2, stride=2)
    assert s(_x(1, 8, 9, 7)).shape == (1, 16, 5, 4)  # attention on the strided conv's output grid
    assert s.rel_w.shape[0] == 2 * 4 - 1 and s.rel_h.shape[0] == 2 * 5 - 1


def test_aaconv_identity_toy_and_backward():
    torch.manual_seed(0)
    m = ToyCNN().eval()
    x = _x(2, 3, 16, 16)
    patched = surgeon.add(m, "aaconv", example_input=x, heads=4)
    assert _diff(patched(x), m(x)) <= 1e-5
    new = [p for n, p in patched.named_parameters() if "aaconv" in n]
    patched(x).square().sum().backward()
    assert new and all(p.grad is not None for p in new)
    # the conv part starts from the original filters: those channels agree at any gate
    aa = patched.get_submodule("conv2_aaconv")
    assert torch.equal(aa.attn.conv.weight, m.conv2.weight[: aa.attn.conv.out_channels])


def test_aaconv_paper_init_shape_and_backward():
    m = ToyCNN().eval()
    x = _x(2, 3, 16, 16)
    plan = surgeon.plan(m, "aaconv", init="paper", example_input=x, heads=4, relative=False)
    patched = plan.apply(verify=False)
    assert patched(x).shape == (2, 10)
    aa = patched.get_submodule("conv2_aaconv").attn
    assert aa(_x(2, 16, 16, 16)).shape == (2, 32, 8, 8)
    patched(x).sum().backward()
    assert all(p.grad is not None for p in aa.parameters())


def test_aaconv_identity_resnet50(resnet50):
    x = _x(1, 3, 64, 64)
    at = ["layer1.0.conv2", "layer2.0.conv2", "layer2.0.downsample.0", "layer3.1.conv1"]
    patched = surgeon.add(resnet50, "aaconv", at=at, example_input=x)
    assert _diff(patched(x), resnet50(x)) <= 1e-5
    assert {e["site"] for e in patched._surgeon["edits"]} == set(at)
    assert "layer2.0.conv2.weight" in patched.state_dict()  # the original conv's keys survive


@pytest.mark.parametrize("options, match", [
    ({"heads": 0}, "heads must be a positive integer, got 0"),
    ({"key_ratio": 1.5}, r"key_ratio must be a number in \(0, 1\], got 1.5"),
    ({"value_channels": 6}, r"value_channels \(6\) must be divisible by heads \(8\)"),
    ({"value_ratio": 1.0}, "leave no convolution channels"),
    ({"relative": "yes"}, "relative must be true or false"),
])
def test_aaconv_bad_options(options, match):
    with pytest.raises(OptionError, match=match):
        surgeon.plan(ToyCNN(), "aaconv", input_size=(3, 16, 16), **options)


def test_aaconv_needs_conv_site():
    with pytest.raises(OptionError, match="aaconv cannot serve kind 'residual'"):
        surgeon.plan(ToyCNN(), "aaconv", kind="residual", input_size=(3, 16, 16))


# -- residual_attention ----------------------------------------------------------------------------------
@pytest.mark.parametrize("size", [(7, 7), (13, 11), (29, 30)])
def test_residual_attention_shape_odd_sizes(size):
    d = auto_depth(*size)
    m = ResidualAttention(8, depth=d).eval()
    assert m(_x(2, 8, *size)).shape == (2, 8, *size)
    assert ResidualAttention(8, depth=3)(_x(2, 8, *size)).shape == (2, 8, *size)


def test_residual_attention_auto_depth_follows_paper():
    assert [auto_depth(s, s) for s in (56, 28, 14, 7, 4)] == [3, 2, 1, 1, 1]


def test_residual_attention_mask_in_unit_interval_and_params():
    m = ResidualAttention(16, depth=2)
    mask = m.mask(_x(2, 16, 12, 12))
    assert mask.shape == (2, 16, 12, 12) and bool(((mask >= 0) & (mask <= 1)).all())
    # p + t + p units, r per level down, skip units between levels, r per level up (all depth-1) + bottom r
    units = sum(1 for x in m.modules() if type(x).__name__ == "PreActUnit")
    assert units == 1 + 2 + 1 + 2 + 1 + 1 + 1


@pytest.mark.parametrize("options, match", [
    ({"t": 0}, "t must be a positive integer, got 0"), ({"p": -1}, "p must be a non-negative integer"),
    ({"depth": 1.5}, "depth=1.5 is not valid; depth must be an integer or None"),
    ({"rr": 1}, "Unknown option 'rr'.*Did you mean 'r'"),
])
def test_residual_attention_bad_options(options, match):
    with pytest.raises(OptionError, match=match):
        surgeon.plan(TinyResNet(), "residual_attention", input_size=(3, 32, 32), **options)


@pytest.mark.parametrize("model, at, kind", [
    ("resnet50", ["layer1.0", "layer3.2"], "residual"),
    ("resnet50", ["layer2"], "stage"),
    ("convnext_tiny", ["stages.0.blocks.0", "stages.2.blocks.1"], "residual"),
])
def test_residual_attention_identity_timm(model, at, kind, resnet50):
    torch.manual_seed(0)
    m = resnet50 if model == "resnet50" else perturb_bn(timm.create_model(model)).eval()
    x = _x(1, 3, 64, 64)
    patched = surgeon.add(m, "residual_attention", kind=kind, at=at, example_input=x)
    assert _diff(patched(x), m(x)) <= 1e-5
    new = [p for n, p in patched.named_parameters() if "residual_attention" in n]
    patched(x).sum().backward()
    assert new and all(p.grad is not None for p in new)


# -- attention_gate ------------------------------------------------------------------------------------
def test_skip_sites_and_default_gating():
    sites = surgeon.sites(unet(), kind="skip", input_size=(3, 32, 32))
    by_name = {s.name: s for s in sites}
    assert set(by_name) == {"enc1", "enc2"}
    # the paper's gating: the coarser feature the decoder upsampled for that concat
    assert by_name["enc1"].info["gating"] == "site:dec2" and by_name["enc2"].info["gating"] == "site:enc3"
    assert by_name["enc1"].user and by_name["enc1"].out_shape == by_name["enc1"].shape == (2, 8, 32, 32)


class CropUNet(nn.Module):
    """The original U-Net's form: unpadded convs, the skip cropped to the upsampled size (read from its shape)."""

    def __init__(self):
        super().__init__()
        self.enc = nn.Conv2d(3, 8, 3)
        self.down = nn.Conv2d(8, 16, 3, stride=2)
        self.up = nn.ConvTranspose2d(16, 8, 2, stride=2)
        self.dec = nn.Conv2d(16, 4, 3)

    def forward(self, x):
        e = self.enc(x)
        d = self.up(self.down(e))
        h, w = d.shape[-2:]
        return self.dec(torch.cat([d, e[:, :, 1:1 + h, 1:1 + w]], 1))


def test_attention_gate_cropped_skip():
    m = CropUNet().eval()
    x = _x(2, 3, 36, 36)
    (site,) = surgeon.sites(m, kind="skip", example_input=x)
    assert site.name == "enc" and site.shape == (2, 8, 32, 32) and site.info["gating"] == "site:down"
    patched = surgeon.add(m, "attention_gate", example_input=x)
    assert _diff(patched(x), m(x)) <= 1e-5


def test_attention_gate_identity_and_training():
    m = unet()
    x = _x(4, 3, 32, 32)
    patched = surgeon.add(m, "attention_gate", example_input=x)
    assert _diff(patched(x), m(x)) <= 1e-5
    gates = {n: mod for n, mod in patched.named_modules() if isinstance(mod, AttentionGate)}
    assert set(gates) == {"enc1_attention_gate", "enc2_attention_gate"}
    assert gates["enc1_attention_gate"].phi.in_channels == 16  # gated by dec2 (16 channels)
    # the encoder's own path still reads the ungated feature: only the concat input is replaced
    code = rewritten(patched)
    assert "pool = self.pool(enc1_2)" in code and "enc1_attention_gate(enc1_2, dec2_2)" in code
    # a few steps on a toy task move the gates and change the output
    target = torch.randn(4, 2, 32, 32, generator=torch.Generator().manual_seed(1))
    params = [p for n, p in patched.named_parameters() if "attention_gate" in n]
    opt = torch.optim.Adam(params, lr=1e-2)
    patched.train()
    for _ in range(5):
        opt.zero_grad()
        F.mse_loss(patched(x), target).backward()
        opt.step()
    patched.eval()
    assert all(g.gamma.abs().item() > 0 for g in gates.values())
    assert _diff(patched(x), m(x)) > 1e-4


def test_attention_gate_named_gating_and_paper_init():
    m = unet()
    x = _x(2, 3, 32, 32)
    plan = surgeon.plan(m, "attention_gate", init="paper", example_input=x,
                        gating={"enc1": "site:interpolate", "enc2": "up3"})
    gates = {e.site.name: e.module for e in plan.edits}
    assert all(e.flops > 0 for e in plan.edits)  # counted with the chosen gating signal's shape
    assert gates["enc1"].phi.in_channels == 16 and gates["enc2"].phi.in_channels == 16
    patched = plan.apply(verify=False)
    assert patched(x).shape == (2, 2, 32, 32)
    alpha = gates["enc1"].coefficients(_x(2, 8, 32, 32), _x(2, 16, 16, 16))
    assert alpha.shape == (2, 1, 32, 32) and gates["enc1"].gamma is None


def test_attention_gate_misspelt_gating():
    with pytest.raises(OptionError, match=r"unknown gating site 'dec_2'\. Did you mean 'dec2'"):
        surgeon.plan(unet(), "attention_gate", at=["enc1"], gating="dec_2", input_size=(3, 32, 32))
    with pytest.raises(OptionError, match=r"no entry for the skip site 'enc2'\. Did you mean 'enc3'"):
        surgeon.plan(unet(), "attention_gate", gating={"enc1": "dec2", "enc3": "dec2"}, input_size=(3, 32, 32))
    with pytest.raises(OptionError, match="inter_channels must be a positive integer"):
        surgeon.plan(unet(), "attention_gate", inter_channels=0, input_size=(3, 32, 32))


def test_attention_gate_cli():
    runner = CliRunner()
    ref = "test_conv_gates:unet"
    ok = runner.invoke(cli, ["add", "attention_gate", ref, "--input-size", "3,32,32", "--at", "enc1",
                             "--option", "gating=dec2"])
    assert ok.exit_code == 0, ok.output
    assert "enc1" in ok.output
    bad = runner.invoke(cli, ["add", "attention_gate", ref, "--input-size", "3,32,32", "--at", "enc1",
                              "--option", "gating=dek2"])
    assert bad.exit_code == 2 and "Did you mean 'dec2'" in bad.output


# -- the catalogue ----------------------------------------------------------------------------------------
def test_listed_and_dry_run():
    runner = CliRunner()
    out = runner.invoke(cli, ["list"]).output
    for name in ("aaconv", "residual_attention", "attention_gate"):
        assert name in out
    for name in ("aaconv", "residual_attention"):
        r = runner.invoke(cli, ["add", name, "resnet50", "--dry-run", "--input-size", "3,64,64"])
        assert r.exit_code == 0, r.output


@pytest.mark.slow
@pytest.mark.parametrize("name", ["aaconv", "residual_attention"])
def test_dry_run_resnet50_full_size(name):
    r = CliRunner().invoke(cli, ["add", name, "resnet50", "--dry-run"])
    assert r.exit_code == 0, r.output


def _nudge(model, seed=1):
    """Non-trivial values in the inserted modules (small: a dozen stacked residual units must not overflow)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for e in model._surgeon["edits"]:
            for p in model.get_submodule(e["module"]).parameters():
                p.add_(torch.randn(p.shape, generator=g) * 0.01 + 0.01)
    return model


@pytest.mark.parametrize("attention, options", [
    ("aaconv", {"heads": 4}), ("residual_attention", {}), ("attention_gate", {"gating": {"enc1": "interpolate",
                                                                                         "enc2": "enc3"}}),
])
def test_save_load_round_trip(tmp_path, attention, options):
    base = (ToyCNN().eval() if attention == "aaconv" else unet() if attention == "attention_gate"
            else TinyResNet().eval())
    x = _x(2, 3, 32, 32)
    patched = _nudge(surgeon.add(base, attention, example_input=x, **options))
    surgeon.save(patched, tmp_path / "out")
    again = surgeon.load(tmp_path / "out", base=base)
    with torch.no_grad():
        assert torch.equal(again(x), patched(x))
