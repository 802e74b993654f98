"""PAN's fpa and gau, and the `last` site kind: plain-formula references, identity init and gradient
reach on timm models (fpa) and U-Nets (gau), gating choice, parameter counts from the structure."""
import json

import pytest
import segmentation_models_pytorch as smp
import torch
import torch.nn.functional as F
from click.testing import CliRunner

import surgeon
from surgeon.cli import cli
from surgeon.errors import OptionError
from surgeon.layers.pyramid import FPA, GAU

from conftest import perturb_bn
from test_channel_spatial_mixed import _add, _timm
from test_conv_gates import unet
from toy_models import TinyResNet


def _x(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _cbn(x, seq, relu=False):
    """Conv (no bias, padding k // 2) then batch norm with running statistics (then ReLU): the plain formula."""
    conv, bn = seq[0], seq[1]
    y = F.conv2d(x, conv.weight, None, 1, conv.kernel_size[0] // 2)
    y = (y - bn.running_mean[:, None, None]) / torch.sqrt(bn.running_var[:, None, None] + bn.eps) \
        * bn.weight[:, None, None] + bn.bias[:, None, None]
    return F.relu(y) if relu else y


def _up(x, size):
    return F.interpolate(x, size=size, mode="bilinear", align_corners=True)


def _fpa_reference(m, x):
    """The paper's FPA written out for three levels: y = master ⊙ A + gpb, A a one-channel map."""
    pool = lambda t: F.max_pool2d(t, 2, ceil_mode=True)  # noqa: E731
    d1 = _cbn(pool(x), m.down[0], True)
    d2 = _cbn(pool(d1), m.down[1], True)
    d3 = _cbn(pool(d2), m.down[2], True)
    l1, l2, l3 = _cbn(d1, m.refine[0], True), _cbn(d2, m.refine[1], True), _cbn(d3, m.refine[2], True)
    att = _up(l1 + _up(l2 + _up(l3, l2.shape[-2:]), l1.shape[-2:]), x.shape[-2:])
    return _cbn(x, m.master, True) * att + _cbn(x.mean((2, 3), keepdim=True), m.gpb, True)


def _gau_reference(m, x, g):
    w = _cbn(g.mean((2, 3), keepdim=True), m.context, True)
    return F.relu(_cbn(x, m.low) * w + _up(_cbn(g, m.high), x.shape[-2:]))


@pytest.mark.parametrize("shape", [(2, 32, 16, 16), (2, 24, 13, 9), (3, 16, 7, 7), (2, 8, 1, 1)])
def test_fpa_matches_the_plain_formula(shape):
    torch.manual_seed(0)
    m = perturb_bn(FPA(shape[1])).eval()
    x = _x(*shape)
    with torch.no_grad():
        y = m(x)
        assert y.shape == x.shape
        assert (y - _fpa_reference(m, x)).abs().max().item() <= 1e-5
        gated = perturb_bn(FPA(shape[1], identity=True)).eval()
        gated.load_state_dict(m.state_dict(), strict=False)
        assert torch.equal(gated(x), x)  # γ = 0: exactly the input
        gated.gamma.fill_(1.0)
        assert torch.allclose(gated(x), y, atol=1e-6)  # γ = 1: the paper's module


@pytest.mark.parametrize("low,high", [((2, 16, 16, 16), (2, 32, 8, 8)), ((2, 8, 13, 11), (2, 24, 7, 6)),
                                      ((2, 8, 9, 9), (2, 8, 9, 9))])
def test_gau_matches_the_plain_formula(low, high):
    torch.manual_seed(0)
    m = perturb_bn(GAU(low[1], high_channels=high[1])).eval()
    x, g = _x(*low), _x(*high, seed=1)
    with torch.no_grad():
        y = m(x, g)
        assert y.shape == x.shape
        assert (y - _gau_reference(m, x, g)).abs().max().item() <= 1e-5


def test_fpa_and_gau_train_mode_and_gradients_reach_every_parameter():
    torch.manual_seed(0)
    fpa, gau = FPA(16).train(), GAU(8, high_channels=16).train()
    x, g = _x(2, 16, 9, 11).requires_grad_(), _x(2, 16, 5, 6).requires_grad_()
    (fpa(x).square().sum() + gau(_x(2, 8, 10, 12), g).square().sum()).backward()
    for m in (fpa, gau):
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in m.parameters())


def test_fpa_equals_smp_pan_fpablock():
    """segmentation_models_pytorch's PAN decoder has an FPABlock: with its weights (conv biases zeroed: ours
    have none, BN follows) ours computes the same on sizes that halve exactly three times."""
    from segmentation_models_pytorch.decoders.pan.decoder import FPABlock

    torch.manual_seed(0)
    ref = perturb_bn(FPABlock(16, 16)).eval()
    ours = FPA(16).eval()
    pairs = [(ref.mid[0], ours.master), (ref.branch1[1], ours.gpb), (ref.down1[1], ours.down[0]),
             (ref.down2[1], ours.down[1]), (ref.down3[1], ours.down[2]), (ref.conv1, ours.refine[0]),
             (ref.conv2, ours.refine[1]), (ref.down3[2], ours.refine[2])]
    with torch.no_grad():
        for cbr, seq in pairs:
            cbr.conv.bias.zero_()
            seq[0].weight.copy_(cbr.conv.weight)
            seq[1].load_state_dict(cbr.bn.state_dict())
        for shape in [(2, 16, 16, 16), (2, 16, 24, 32)]:
            x = _x(*shape)
            assert (ours(x) - ref(x)).abs().max().item() <= 1e-5
    biases = sum(cbr.conv.bias.numel() for cbr, _ in pairs)
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in ref.parameters()) - biases


def test_fpa_parameters_from_structure():
    """Derived, not published (PAN gives no per-module count): 1×1 master and global branches at C channels,
    a one-channel 7/5/3 pyramid with a second conv per level, BN after every conv; on ResNet-18's layer4."""
    c = 512
    convs = 2 * c * c + c * 49 + 25 + 9 + (49 + 25 + 9)
    bns = 2 * (2 * c + 6)
    assert sum(p.numel() for p in FPA(c).parameters()) == convs + bns == 551_553
    assert sum(p.numel() for p in FPA(c, identity=True).parameters()) == convs + bns + 1
    wide = FPA(c, mid_channels=8)  # a pyramid of 8 maps and a 1×1 conv back to C
    assert sum(p.numel() for p in wide.parameters()) == 2 * (c * c + 2 * c) + c * 8 * 49 + 64 * (25 + 9) \
        + 64 * (49 + 25 + 9) + 6 * 16 + 8 * c + 2 * c


@pytest.mark.parametrize("bad", [{"mid_channels": 0}, {"kernel_sizes": (7, 4)}, {"kernel_sizes": ()}])
def test_fpa_bad_options_are_option_errors(bad):
    with pytest.raises(OptionError, match=next(iter(bad))):
        FPA(16, **bad)


# -- the `last` kind -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def resnet18():
    return _timm("resnet18")


@pytest.fixture(scope="module")
def convnext_tiny():
    return _timm("convnext_tiny")


@pytest.fixture(scope="module")
def mobilenetv3():
    return _timm("mobilenetv3_small_100")


LAST = {"resnet18": ("layer4", (1, 512, 4, 4)), "convnext_tiny": ("norm_pre", (1, 768, 3, 3)),
        "mobilenetv3": ("blocks", (1, 576, 4, 4))}


# resnet18 in the default run; convnext_tiny and mobilenetv3 trace for 15-40 s on the shared CPU: slow
@pytest.mark.parametrize("model_name", ["resnet18", pytest.param("convnext_tiny", marks=pytest.mark.slow),
                                        pytest.param("mobilenetv3", marks=pytest.mark.slow)])
def test_last_site_and_fpa_identity_on_timm_models(request, model_name):
    model = request.getfixturevalue(model_name)
    x = _x(1, 3, 97, 113)
    sites = surgeon.sites(model, kind="last", example_input=x)
    assert [(s.name, s.shape) for s in sites] == [LAST[model_name]]
    patched = _add(model, "fpa", x)  # output within 1e-5 and gradients reach every new parameter
    assert [e.site for e in surgeon.edits(patched)] == [LAST[model_name][0]]


def test_fpa_at_stage_ends_of_resnet18(resnet18):
    x = _x(1, 3, 81, 67)
    patched = _add(resnet18, "fpa", x, kind="stage")
    assert [e.site for e in surgeon.edits(patched)] == ["layer1", "layer2", "layer3"]
    paper = surgeon.add(resnet18, "fpa", init="paper", kind="stage", at=["layer3"], example_input=x, verify=False)
    (edit,) = surgeon.edits(paper)
    assert edit.params == sum(p.numel() for p in FPA(256).parameters())


def test_last_site_on_u_nets():
    """A U-Net's last stage is its encoder's bottleneck, upsampled by the decoder afterwards."""
    assert [s.name for s in surgeon.sites(unet(), kind="last", input_size=(3, 32, 32))] == ["enc3"]
    assert [s.name for s in surgeon.sites(TinyResNet(), kind="last", input_size=(3, 32, 32))] == ["stage3"]


# -- gau at U-Net skips ----------------------------------------------------------------------------------
def test_gau_identity_and_gradients_on_the_test_unet():
    m, x = unet(), _x(2, 3, 32, 32)
    patched = _add(m, "gau", x)
    assert [(e.site, e.options.get("gating")) for e in surgeon.edits(patched)] == [("enc2", None), ("enc1", None)]
    # the default gating signal is the coarser feature upsampled for the concat: enc3 for enc2, dec2 for enc1
    shapes = {e.site: patched.get_submodule(e.module).high[0].in_channels for e in surgeon.edits(patched)}
    assert shapes == {"enc2": 32, "enc1": 16}


def test_gau_gating_option_and_its_errors():
    m, x = unet(), _x(2, 3, 32, 32)
    patched = surgeon.add(m, "gau", at=["enc1"], gating="enc3", example_input=x, verify=False)
    (edit,) = surgeon.edits(patched)
    assert patched.get_submodule(edit.module).high[0].in_channels == 32
    unknown = r"gau at 'enc1': unknown gating site 'dec3'. Did you mean .*'dec2'.*Valid: 'interpolate', 'dec2'"
    with pytest.raises(OptionError, match=unknown):
        surgeon.add(m, "gau", at=["enc1"], gating="dec3", example_input=x, verify=False)
    with pytest.raises(OptionError, match="gau: gating has no entry for the skip site 'enc2'"):
        surgeon.add(m, "gau", gating={"enc1": "dec2"}, example_input=x, verify=False)


def test_gau_and_fpa_on_an_smp_unet():
    torch.manual_seed(0)
    model = perturb_bn(smp.Unet("resnet18", encoder_weights=None, encoder_depth=3, decoder_channels=(32, 16, 8),
                                classes=3)).eval()
    x = _x(1, 3, 32, 32)
    patched = _add(model, "gau", x)
    assert [e.site for e in surgeon.edits(patched)] == ["encoder.layer1", "encoder.relu"]
    patched = _add(patched, "fpa", x, kind="last")
    assert [e.site for e in surgeon.edits(patched)][-1] == "decoder.center"


def test_cli_lists_the_last_kind_and_rejects_gau_without_skips():
    runner = CliRunner()
    out = runner.invoke(cli, ["sites", "toy_models:tiny_resnet", "--kind", "last", "--input-size", "3,32,32",
                              "--json"])
    assert out.exit_code == 0, out.output
    assert [s["name"] for s in json.loads(out.output)] == ["stage3"]
    bad = runner.invoke(cli, ["add", "gau", "toy_models:tiny_resnet", "--input-size", "3,32,32", "--dry-run"])
    assert bad.exit_code == 2 and len(bad.output.strip().splitlines()) == 1 and "skip" in bad.output
