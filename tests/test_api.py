"""The public functions (surgeon.add, plan, sites) on the first attentions: paper-exact architectures, identity
init (also across model families), the kind chosen per attention and its fallbacks, options and errors."""
import sys

import pytest
import timm
import torch
import torchvision
from torch import nn

import surgeon
from surgeon.surgery.owned import rewritten
from surgeon.errors import NoSitesError, OptionError, ShapeError, UnknownNameError
from surgeon.layers import BAM, CBAM, AttentionPool2d, EcaModule, SEModule, SpatialAttn
from conftest import perturb_bn
from toy_models import PlainCNN, TinyResNet

RESNET50_PARAMS = 25_557_032


def params(m):
    return sum(p.numel() for p in m.parameters())


@pytest.mark.parametrize("attention,expected", [
    # SE-ResNet-50 as in Hu et al. (and timm's seresnet50): 28,088,024
    ("se", 28_088_024),
    # official CBAM code: MLP with biases, 7x7 spatial conv (no bias) + BN: 28,089,624
    ("cbam", 28_089_624),
    # official BAM code: three modules after layer1, layer2, layer3: 25,915,099
    ("bam", 25_915_099),
])
def test_paper_init_parameter_counts_resnet50(attention, expected):
    model = timm.create_model("resnet50").eval()
    assert params(model) == RESNET50_PARAMS
    patched = surgeon.add(model, attention, init="paper", input_size=(3, 64, 64), verify=False)
    assert params(patched) == expected


def test_se_matches_timm_seresnet50_count():
    assert params(timm.create_model("seresnet50")) == 28_088_024


def test_eca_adaptive_kernel_and_params():
    # ECA-Net: k = |log2(C)/2 + 1/2|_odd -> C=256: 5, 512: 5, 1024: 5, 2048: 7
    assert [EcaModule(c).kernel_size for c in (64, 256, 512, 1024, 2048)] == [3, 5, 5, 5, 7]
    patched = surgeon.add(timm.create_model("resnet50").eval(), "eca", init="paper", input_size=(3, 64, 64))
    assert params(patched) - RESNET50_PARAMS == 3 * 5 + 4 * 5 + 6 * 5 + 3 * 7


@pytest.mark.parametrize("layer", [SEModule(16), EcaModule(16), CBAM(16), BAM(16), SpatialAttn(16)])
def test_layers_preserve_shape_on_odd_sizes(layer):
    x = torch.randn(3, 16, 13, 17)
    assert layer.eval()(x).shape == x.shape


def test_channel_layers_work_on_1d_and_3d():
    for x in (torch.randn(2, 16, 9), torch.randn(2, 16, 3, 5, 7)):
        assert SEModule(16)(x).shape == x.shape and EcaModule(16)(x).shape == x.shape


@pytest.mark.parametrize("attention", ["se", "eca", "cbam", "bam", "spatial", "attnpool"])
def test_identity_init_exact_and_gradients_reach_gates(attention):
    torch.manual_seed(0)
    model = perturb_bn(TinyResNet()).eval()
    x = torch.randn(2, 3, 32, 32)
    plan = surgeon.plan(model, attention, example_input=x)
    patched = plan.apply()
    v = plan.verification
    assert v.max_abs_diff <= 1e-5 and torch.allclose(patched(x), model(x), atol=1e-5)
    assert v.with_grad == v.new_params > 0
    assert v.nonzero_grad >= 1  # the gates (or attention-pool scores) learn from the first step
    assert v.params_added == sum(e.params for e in plan.edits)


def test_identity_survives_global_reinitialisation():
    """A user's `model.apply(init_fn)` re-initialising conv/linear/norm layers keeps the identity."""
    torch.manual_seed(0)
    model = perturb_bn(TinyResNet()).eval()
    x = torch.randn(2, 3, 32, 32)
    patched = surgeon.add(model, "cbam", example_input=x)
    patched = surgeon.add(patched, "attnpool", example_input=x)
    ref = patched(x)

    def init_fn(m):
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            nn.init.normal_(m.weight)
            if m.bias is not None:
                nn.init.normal_(m.bias)

    for name in [e["module"] for e in patched._surgeon["edits"]]:
        patched.get_submodule(name).apply(init_fn)
    assert torch.allclose(patched(x), ref, atol=1e-5)


def test_attnpool_zero_scores_is_the_average():
    x = torch.randn(2, 8, 7, 5)
    pool = AttentionPool2d(8, num_heads=2, flatten=True)
    assert torch.allclose(pool(x), x.mean((2, 3)), atol=1e-6)
    windowed = AttentionPool2d(8, kernel_size=2, stride=2)
    assert torch.allclose(windowed(x), nn.functional.avg_pool2d(x, 2), atol=1e-6)
    # non-zero scores concentrate the weights
    with torch.no_grad():
        pool.score.fill_(5.0)
    assert not torch.allclose(pool(x), x.mean((2, 3)), atol=1e-3)


def test_attnpool_replaces_global_avg_pool_without_a_gate():
    model = TinyResNet().eval()
    patched = surgeon.add(model, "attnpool", input_size=(3, 32, 32))
    mod = patched.get_submodule("pool_attnpool")
    assert type(mod).__name__ == "PoolReplacement"  # plain average at init: no gate needed
    code = rewritten(patched)  # the pooling sat in the root's own forward: the root was rewritten
    assert "self.pool(" not in code and "self.pool_attnpool(" in code  # op is gone
    assert isinstance(patched, TinyResNet)


def test_attnpool_on_max_pool_is_gated_and_exact():
    model = PlainCNN().eval()
    x = torch.randn(2, 3, 32, 32)
    plan = surgeon.plan(model, "attnpool", example_input=x)
    assert [e.site.info["pool"] for e in plan.edits] == ["max", "max", "avg"]
    patched = plan.apply()
    assert torch.equal(patched(x), model(x)) or torch.allclose(patched(x), model(x), atol=1e-6)
    kinds = [type(patched.get_submodule(e["module"])).__name__ for e in patched._surgeon["edits"]]
    assert kinds == ["GatedReplacement", "GatedReplacement", "PoolReplacement"]


def test_paper_init_changes_output_and_is_not_gated():
    model = TinyResNet().eval()
    patched = surgeon.add(model, "se", init="paper", input_size=(3, 32, 32))
    se = patched.get_submodule("stage1.0.se")
    assert isinstance(se, SEModule) and se.gamma is None


def test_inserted_modules_have_readable_names_and_original_keys_survive():
    model = timm.create_model("resnet18").eval()
    patched = surgeon.add(model, "cbam", input_size=(3, 64, 64))
    keys = set(patched.state_dict())
    assert set(model.state_dict()) <= keys
    assert {"layer1.0.cbam.channel.fc1.weight", "layer1.0.cbam.channel.gamma", "layer1.0.cbam.spatial.gamma"} <= keys
    # the user's checkpoint loads with strict=False, reporting only the new keys as missing
    result = patched.load_state_dict(model.state_dict(), strict=False)
    assert not result.unexpected_keys and all(".cbam." in k for k in result.missing_keys)


def test_adding_twice_records_both_edits():
    model = TinyResNet().eval()
    x = torch.randn(2, 3, 32, 32)
    once = surgeon.add(model, "se", example_input=x)
    twice = surgeon.add(once, "bam", example_input=x)
    assert [e["attention"] for e in twice._surgeon["edits"]] == ["se"] * 6 + ["bam"] * 2
    assert len(once._surgeon["edits"]) == 6  # the first model's record is untouched
    assert torch.allclose(twice(x), model(x), atol=1e-5)


def test_default_kind_falls_back_when_model_has_none():
    model = PlainCNN().eval()  # no residual adds
    plan = surgeon.plan(model, "se", input_size=(3, 32, 32))
    assert {e.site.kind for e in plan.edits} == {"stage"} or {e.site.kind for e in plan.edits} == {"after_conv"}


# -- the kind chosen per attention --------------------------------------------------------------------------
def _kinds(plan):
    return [(e.site.name, e.site.kind) for e in plan.edits]


@pytest.mark.parametrize("attention, kind, names", [
    ("se", "residual", ["stage1.0", "stage1.1", "stage2.0", "stage2.1", "stage3.0", "stage3.1"]),
    ("bam", "stage", ["stage1", "stage2"]),  # bam's first kind is stage, BAM's place
])
def test_the_default_kind_is_the_attention_first_kind(attention, kind, names):
    plan = surgeon.plan(TinyResNet().eval(), attention, input_size=(3, 32, 32))
    assert _kinds(plan) == [(n, kind) for n in names] and plan.note == ""


def test_a_model_without_the_first_kinds_gets_the_next_kind_with_a_note_and_a_warning():
    with pytest.warns(UserWarning, match="se: PlainCNN has no residual/stage site; using its 3 after_conv sites"):
        plan = surgeon.plan(PlainCNN().eval(), "se", input_size=(3, 32, 32))
    assert _kinds(plan) == [("conv1", "after_conv"), ("conv2", "after_conv"), ("conv3", "after_conv")]
    assert plan.note == "se: PlainCNN has no residual/stage site; using its 3 after_conv sites instead"
    assert plan.note in str(plan)


def test_a_lone_after_conv_fallback_is_refused_unless_asked_for():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2)).eval()
    with pytest.raises(NoSitesError, match="its only after_conv site is '0': one edit there would not be a "
                                           "meaningful retrofit. Pass --kind after_conv"):
        surgeon.plan(model, "se", input_size=(3, 8, 8))
    assert _kinds(surgeon.plan(model, "se", kind="after_conv", input_size=(3, 8, 8))) == [("0", "after_conv")]


def test_at_matching_no_site_of_the_first_kind_tries_the_next():
    with pytest.warns(UserWarning, match="no residual site; using its 1 stage sites"):
        plan = surgeon.plan(TinyResNet().eval(), "se", at=["stage1"], input_size=(3, 32, 32))
    assert _kinds(plan) == [("stage1", "stage")]
    with pytest.raises(NoSitesError, match="--at 'nothing' matches no residual site"):  # the first kind's error
        surgeon.plan(TinyResNet().eval(), "se", at=["nothing"], input_size=(3, 32, 32))


def test_a_model_without_any_kind_of_the_attention():
    with pytest.raises(NoSitesError,
                       match="se found no residual/stage/after_conv site with a nchw/nhwc/nlc layout in Linear"):
        surgeon.plan(nn.Linear(4, 2), "se", input_size=(4,))


@pytest.mark.parametrize("kwargs,error,message", [
    (dict(attention="cbma"), UnknownNameError, "Unknown attention 'cbma'. Did you mean 'cbam'"),
    (dict(attention="se", rd_ratoi=0.5), OptionError, "Unknown option 'rd_ratoi' for se. Did you mean 'rd_ratio'"),
    (dict(attention="se", rd_ratio=-3), OptionError, "rd_ratio must be a number in \\(0, 1\\], got -3"),
    (dict(attention="eca", kernel_size=4), OptionError, "kernel_size must be a positive odd integer, got 4"),
    (dict(attention="cbam", act_layer="relu9"), OptionError, "act_layer 'relu9' is not known. Did you mean 'relu'"),
    (dict(attention="se", kind="pool"), OptionError, "se cannot serve kind 'pool'"),
    (dict(attention="se", kind="residul"), UnknownNameError, "Did you mean 'residual'"),
    (dict(attention="se", at=["layer9.*"]), NoSitesError, "matches no residual site"),
    (dict(attention="se", init="papr"), OptionError, "Unknown init 'papr'. Did you mean 'paper'"),
])
def test_bad_input_errors(kwargs, error, message):
    with pytest.raises(error, match=message):
        surgeon.plan(TinyResNet().eval(), input_size=(3, 32, 32), **kwargs)


def test_unknown_input_size_is_explained():
    class NoHint(nn.Module):
        def forward(self, x):
            return x * 2

    with pytest.raises(ShapeError, match="Cannot tell what input NoHint takes"):
        surgeon.sites(NoHint())


# -- identity init across model families: every built-in attention at its default kind --------------------
# (the full zoo sweep at 224x224 is marked slow: `make test-slow`; a fast sample at a small size runs by default)
BUILTIN = ["se", "eca", "cbam", "bam", "spatial", "attnpool"]
ZOO = ["timm:resnet18", "timm:resnet50", "timm:convnext_tiny", "timm:efficientnet_b0", "timm:mobilenetv3_small_100",
       "timm:densenet121", "timm:regnety_002", "tv:resnet50", "tv:mobilenet_v3_small"]
FAST = ["timm:resnet18", "timm:mobilenetv3_small_100", "tv:mobilenet_v3_small", "timm:regnety_002"]


def build(ref):
    source, name = ref.split(":")
    model = timm.create_model(name) if source == "timm" else torchvision.models.get_model(name)
    return perturb_bn(model).eval()


def check(ref, attention, size):
    torch.manual_seed(0)
    model = build(ref)
    x = torch.randn(2, 3, size, size)
    plan = surgeon.plan(model, attention, example_input=x)
    patched = plan.apply()
    v = plan.verification
    assert v.max_abs_diff <= 1e-5, (ref, attention, v.max_abs_diff)
    assert v.new_params > 0 and v.with_grad == v.new_params
    assert v.nonzero_grad >= 1
    assert set(model.state_dict()) <= set(patched.state_dict())


@pytest.mark.parametrize("attention", BUILTIN)
@pytest.mark.parametrize("ref", FAST)
def test_identity_init_fast_sample(ref, attention):
    check(ref, attention, 64)


@pytest.mark.slow
@pytest.mark.parametrize("attention", BUILTIN)
@pytest.mark.parametrize("ref", ZOO)
def test_identity_init_zoo(ref, attention):
    check(ref, attention, 224)


def test_each_edit_counts_the_flops_of_its_own_module():
    """Counted once per distinct site shape: every edit's figure is its module's own count on its site."""
    from surgeon.surgery.verify import count_flops

    model = timm.create_model("resnet18").eval()
    plan = surgeon.plan(model, "cbam", input_size=(3, 64, 64))
    own = [count_flops(e.module.eval(), (torch.ones(1, *e.site.shape[1:]),)) for e in plan.edits]
    assert [e.flops for e in plan.edits] == own
    assert len(set(own)) == 4 and len(own) == 8  # two blocks per stage, four stages


def test_a_forward_taking_two_frames_gets_two_example_inputs():
    class TwoFrames(nn.Module):  # RAFT's signature: forward(image1, image2, num_flow_updates=12)
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 8, 3, padding=1)
            self.body = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())

        def forward(self, image1, image2, steps: int = 2):
            x = self.conv(image1) - self.conv(image2)
            return x + self.body(x)

    model = TwoFrames().eval()
    plan = surgeon.plan(model, "se", input_size=(3, 16, 16))
    assert [tuple(x.shape) for x in plan.example_inputs] == [(2, 3, 16, 16)] * 2
    assert not torch.equal(*plan.example_inputs)
    plan.apply()
    assert plan.verification.max_abs_diff == 0 and len(plan.edits) == 1


def test_surgery_pauses_garbage_collection_and_restores_it(monkeypatch):
    import gc

    from surgeon.surgery import scope

    seen = []
    real = scope.rewrite
    monkeypatch.setattr(scope, "rewrite", lambda *a, **k: (seen.append(gc.isenabled()), real(*a, **k))[1])
    model = torchvision.models.resnet18().eval()
    plan = surgeon.plan(model, "se", input_size=(3, 32, 32))
    assert gc.isenabled()
    plan.apply(verify=False)
    assert seen == [False] and gc.isenabled()
    with pytest.raises(UnknownNameError):
        surgeon.plan(model, "sse", input_size=(3, 32, 32))
    assert gc.isenabled()  # back on after an error too
    gc.disable()
    try:
        surgeon.plan(model, "se", input_size=(3, 32, 32))
        assert not gc.isenabled()  # a caller's own choice is left alone
    finally:
        gc.enable()


def test_warnings_point_at_the_users_line():
    model = torchvision.models.squeezenet1_1().eval()
    with pytest.warns(UserWarning, match="has no residual site; using its 2 stage sites") as got:
        surgeon.add(model, "se", input_size=(3, 64, 64), verify=False)
    assert [(w.filename, w.lineno) for w in got] == [(__file__, sys._getframe().f_lineno - 1)]  # the add line


class _Masked(TinyResNet):
    def forward(self, x, mask=None, *, scale=1.0):
        return super().forward(x if mask is None else x * mask) * scale


def test_keyword_example_inputs_fill_their_places_and_refuse_what_cannot_be_placed():
    x, mask = torch.randn(2, 3, 32, 32), torch.ones(2, 1, 32, 32)
    assert surgeon.example_inputs(_Masked(), example_input={"mask": mask, "x": x}) == (x, mask)
    with pytest.raises(OptionError, match=r"^example_input 'scale' is a keyword-only argument of _Masked.forward; "
                                          r"surgery passes example inputs by position \(x, mask\)$"):
        surgeon.add(_Masked(), "se", example_input={"x": x, "scale": 2.0})
    with pytest.raises(OptionError, match=r"^example_input has no 'x', which _Masked.forward needs before 'mask'$"):
        surgeon.add(_Masked(), "se", example_input={"mask": mask})
