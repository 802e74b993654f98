"""The failure classes the model-zoo sweep (benchmarks/zoo.py) found, each on a small model of its class:
options that do not fit a site's shape, FLOPs of models passing parameter views to their children (timm's
PiT), detectors (surgery on a model that never ran, at a small image size), input sizes read from
torchvision's weights metadata, and hiera's mask branch."""
import pytest
import timm
import torch
import torchvision
from torch import nn

import surgeon
from surgeon import models, sizes
from surgeon.errors import OptionError
from surgeon.layers.channel import SelectiveKernel
from surgeon.planning import example_inputs
from surgeon.surgery.verify import count_flops

from conftest import perturb_bn


# -- options that cannot fit a site's shape --------------------------------------------------------------
@pytest.fixture(scope="module")
def regnet():
    torch.manual_seed(0)
    return perturb_bn(torchvision.models.regnet_y_400mf()).eval()


def test_sk_groups_default_to_a_divisor_of_the_channels(regnet):
    # regnet_y_400mf's stages have 48, 104, 208 and 440 channels: the paper's 32 groups divide none of them
    patched = surgeon.add(regnet, "sk", example_input=torch.randn(2, 3, 64, 64))
    edits = surgeon.edits(patched)
    assert len(edits) == 16
    sk = {e.shape[1]: next(m for m in patched.get_submodule(e.module).modules() if isinstance(m, SelectiveKernel))
          for e in edits}
    groups = {c: m.branches[0][0].groups for c, m in sk.items()}
    assert groups == {48: 24, 104: 26, 208: 26, 440: 22}  # the largest divisors up to 32
    assert SelectiveKernel(256).branches[0][0].groups == 32  # the paper's, where it divides


class _Block(nn.Module):
    def __init__(self, channels):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x):
        return x + self.conv(x)


def _two_widths():
    """Residual blocks at 48 and 64 channels: 32 groups fit only the second."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 48, 3, padding=1), _Block(48), nn.Conv2d(48, 64, 3, padding=1),
                         _Block(64)).eval()


def test_an_option_that_fits_only_some_sites_skips_the_others_with_a_note():
    model = _two_widths()
    with pytest.warns(UserWarning, match=r"sk: skipped '1' \(.*channels \(48\) must be divisible by groups \(32\)"):
        plan = surgeon.plan(model, "sk", groups=32, example_input=torch.randn(2, 3, 16, 16))
    assert [e.site.name for e in plan.edits] == ["3"]
    patched = plan.apply()
    assert plan.verification.max_abs_diff <= 1e-5 and [e.site for e in surgeon.edits(patched)] == ["3"]


def test_an_option_that_fits_no_site_is_an_option_error():
    with pytest.raises(OptionError, match=r"^sk: channels \(48\) must be divisible by groups \(7\)"):
        surgeon.plan(_two_widths(), "sk", groups=7, example_input=torch.randn(2, 3, 16, 16))


# -- FLOPs of a model that passes a view of a parameter to a child (PiT's class tokens) ---------------------
class _Mix(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 8)

    def forward(self, x, cls_tokens):
        return x.flatten(2).mean(-1) + self.fc(cls_tokens[:, 0])


class ClassTokenNet(nn.Module):
    """PiT-like: a class token expanded to the batch and handed to a child module with the feature map."""

    def __init__(self):
        super().__init__()
        self.cls_token = nn.Parameter(torch.randn(1, 1, 8))
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.body = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1))
        self.mix = _Mix()

    def forward(self, x):
        x = self.body(self.stem(x))
        return self.mix(x, self.cls_token.expand(x.shape[0], -1, -1))


def test_flops_are_counted_when_a_child_gets_a_view_of_a_parameter():
    torch.manual_seed(0)
    model = ClassTokenNet().eval()
    x = torch.randn(1, 3, 16, 16)
    stem, body, fc = 2 * 8 * 3 * 9 * 16 * 16, 2 * (2 * 8 * 8 * 9 * 16 * 16), 2 * 8 * 8  # 2 FLOPs per MAC
    assert count_flops(model, (x,)) == stem + body + fc
    patched = surgeon.add(model, "se", kind="after_conv", example_input=torch.randn(2, 3, 16, 16))
    assert len(surgeon.edits(patched)) == 3
    assert surgeon.record.verification(patched).flops_after > surgeon.record.verification(patched).flops_before


@pytest.mark.slow
def test_timm_pit_distilled_patches():
    model = timm.create_model("pit_ti_distilled_224", img_size=64).eval()
    patched = surgeon.add(model, "se", example_input=torch.randn(2, 3, 64, 64))
    edits = surgeon.edits(patched)  # both residual branches of each of the 2 + 6 + 4 transformer blocks, on tokens
    assert len(edits) == 24 and {e.kind for e in edits} == {"residual"} and all(len(e.shape) == 3 for e in edits)


# -- detectors ------------------------------------------------------------------------------------------
def test_a_detector_that_never_ran_patches_on_small_images():
    """A fresh two-stage detector (its RoI pooler's scales not yet set) patches, and surgery runs it on
    320-pixel images with 100 proposals instead of its own 800 and 1000, which it keeps afterwards."""
    torch.manual_seed(0)
    model = torchvision.models.detection.fasterrcnn_mobilenet_v3_large_fpn(
        weights=None, weights_backbone=None).eval()
    assert model.roi_heads.box_roi_pool.scales is None
    seen = []
    model.backbone.register_forward_pre_hook(lambda m, a: seen.append(tuple(a[0].shape[-2:])))
    plan = surgeon.plan(model, "se", input_size=(3, 96, 128))
    patched = plan.apply()
    assert len(surgeon.edits(patched)) == 11 and plan.verification.max_abs_diff <= 1e-5
    assert seen and max(max(s) for s in seen) <= 448  # 96x128 images resized to 320x427, padded to 32s
    for m in (model, patched):
        assert m.transform.min_size == (800,) and m.transform.max_size == 1333
        assert m.rpn._post_nms_top_n == {"training": 2000, "testing": 1000}


def test_small_images_puts_the_settings_back_after_an_error():
    model = torchvision.models.detection.fasterrcnn_mobilenet_v3_large_fpn(weights=None, weights_backbone=None)
    with pytest.raises(RuntimeError, match="boom"), sizes.small_images(model):
        assert model.transform.min_size == (320,) and model.transform.max_size == 533
        assert model.rpn._pre_nms_top_n == {"training": 100, "testing": 100}
        raise RuntimeError("boom")
    assert model.transform.min_size == (800,) and model.rpn._pre_nms_top_n["testing"] == 1000


# -- input sizes from model metadata --------------------------------------------------------------------
@pytest.mark.parametrize("name,size", [
    ("mvit_v2_s", (3, 16, 224, 224)),   # MViT (v1_b and v2_s agree): 16 frames at 224
    ("s3d", (3, 16, 224, 224)),         # at least 14 frames
    ("r3d_18", (3, 16, 112, 112)),      # VideoResNet: r3d, mc3, r2plus1d all 112
    ("inception_v3", (3, 299, 299)),
    ("vit_h_14", (3, 224, 224)),        # built without weights: its own image_size, not the SWAG weights' 518
])
def test_torchvision_input_size_from_the_weights_metadata(name, size):
    with torch.device("meta"):
        model = torchvision.models.get_model(name, weights=None)
    surgeon.record.ensure(model)
    surgeon.record.set_base(model, {"ref": f"tv:{name}"})
    assert sizes.configured_size(model) == size


def test_a_torchvision_model_built_for_another_size_says_so():
    with torch.device("meta"):
        model = torchvision.models.vit_b_16(image_size=384)
    surgeon.record.ensure(model)
    surgeon.record.set_base(model, {"ref": "tv:vit_b_16"})
    assert sizes.configured_size(model) == (3, 384, 384)


def test_torchvision_input_size_from_the_class_when_every_builder_agrees():
    with torch.device("meta"):
        video = torchvision.models.video.r2plus1d_18()
        net = torchvision.models.efficientnet_b3()
    assert sizes.configured_size(video) == (3, 16, 112, 112)
    assert sizes.configured_size(net) is None  # b0..b7 differ: the class alone does not say
    assert example_inputs(video)[0].shape == (2, 3, 16, 112, 112)


def test_a_loaded_torchvision_model_knows_its_size():
    model = models.load("tv:efficientnet_b3")
    assert example_inputs(model)[0].shape == (2, 3, 300, 300)


# -- hiera: the mask branch -----------------------------------------------------------------------------
@pytest.mark.slow
def test_hiera_traces_with_its_mask_left_out():
    model = timm.create_model("hiera_tiny_224", img_size=(64, 64)).eval()
    found = surgeon.sites(model, example_input=torch.randn(2, 3, 64, 64))
    assert not found.untraced
    assert [s.name for s in found if s.kind == "residual"][:2] == ["blocks.0", "blocks.0#1"]


def test_a_residual_named_after_its_block_but_computed_inside_an_edited_child():
    """timm RepGhost: the residual site 'blocks.0.0' sits inside 'blocks.0.0.ghost2', which has an edit of its
    own and is kept whole in its block's trace: the edit goes into ghost2 (it was a KeyError crash)."""
    model = timm.create_model("repghostnet_050").eval()
    plan = surgeon.plan(model, "se", input_size=(3, 32, 32), at=["blocks.0.0*"])
    patched = plan.apply()
    assert plan.owners() == {"blocks.0.0.ghost1": "blocks.0.0.ghost1", "blocks.0.0.ghost2": "blocks.0.0.ghost2",
                             "blocks.0.0": "blocks.0.0.ghost2"}
    assert plan.verification.max_abs_diff == 0
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(patched(x), model(x))


class _ListBlock(nn.Module):
    """A block passing `[x, skip]` lists from block to block, as timm SelecSLS's do."""

    def __init__(self, c: int, first: bool, stride: int = 1):
        super().__init__()
        self.first = first
        self.conv = nn.Sequential(nn.Conv2d(c, c, 3, stride, padding=1), nn.BatchNorm2d(c), nn.ReLU())
        self.mix = nn.Conv2d(c if first else 2 * c, c, 1)

    def forward(self, x):
        if not isinstance(x, list):
            x = [x]
        y = self.conv(x[0])
        if self.first:
            out = self.mix(y)
            return [out, out]
        return [self.mix(torch.cat([y, x[1]], 1)), x[1]]


class _ListSequential(nn.Sequential):
    def forward(self, x):
        for block in self:
            x = block(x)
        return x


class ListNet(nn.Module):
    def __init__(self, c: int = 8):
        super().__init__()
        self.stem = nn.Conv2d(3, c, 3, padding=1)
        self.features = _ListSequential(_ListBlock(c, True), _ListBlock(c, False), _ListBlock(c, True, 2),
                                        _ListBlock(c, False))
        self.head = nn.Sequential(nn.Conv2d(c, c, 3, 2, padding=1), nn.ReLU())
        self.fc = nn.Linear(c, 5)

    def forward(self, x):
        x = self.head(self.features([self.stem(x)])[0])
        return self.fc(x.mean((2, 3)))


@pytest.mark.parametrize("attention", ["se", "cbam"])
def test_stage_sites_of_blocks_passing_lists(attention):
    """timm SelecSLS: blocks take and return `[x, skip]`. The stage end of `features` is one tensor of the last
    block's list: keeping that block whole gave the attention the list, and `features` traced alone gets a
    proxy where its caller passes a list (both crashed). Now the edit goes where the tensor is."""
    model = perturb_bn(ListNet()).eval()
    plan = surgeon.plan(model, attention, kind="stage", input_size=(3, 16, 16))
    assert [e.site.name for e in plan.edits] == ["features.1", "features"]
    patched = plan.apply()
    assert plan.owners() == {"features.1": "", "features": ""}  # every block is given a list
    assert plan.verification.max_abs_diff == 0
    x = torch.randn(2, 3, 16, 16)
    assert torch.equal(patched(x), model(x))
    assert isinstance(patched.features, _ListSequential)


class ConstantScale(nn.Module):
    """A forward that makes a tensor (timm Swin V2 CR clamps its logit scale to `torch.tensor(100).log()`):
    tracing stores it on the traced module as `_tensor_constant0`."""

    def __init__(self, c: int = 8):
        super().__init__()
        self.stem = nn.Conv2d(3, c, 3, padding=1)
        self.body = nn.Sequential(nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c), nn.ReLU())
        self.fc = nn.Linear(c, 5)

    def forward(self, x):
        x = self.stem(x)
        x = x + self.body(x) * torch.tensor(0.01).log().neg()
        return self.fc(x.mean((2, 3)))


def test_an_owner_whose_forward_makes_a_tensor_keeps_it():
    model = perturb_bn(ConstantScale()).eval()
    plan = surgeon.plan(model, "se", kind="residual", input_size=(3, 16, 16))
    patched = plan.apply()  # was AttributeError: no attribute '_tensor_constant0'
    assert plan.owners() == {"add": ""}
    assert plan.verification.max_abs_diff == 0
    x = torch.randn(2, 3, 16, 16)
    assert torch.equal(patched(x), model(x))
    assert not hasattr(model, "_tensor_constant0")  # the user's model is left as it was


class _SkipBlock(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.block = nn.Sequential(nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c), nn.ReLU())

    def forward(self, x, skip=None):
        x = self.block(x)
        if skip is not None and skip.shape[1] != 0:  # smp Linknet: a decision on a size, traced with values
            x = x + skip
        return x


class SizeDecisions(nn.Module):
    def __init__(self, c: int = 8):
        super().__init__()
        self.stem = nn.Conv2d(3, c, 3, padding=1)
        self.blocks = nn.ModuleList([_SkipBlock(c), _SkipBlock(c)])

    def forward(self, x):
        x = self.stem(x)
        for block in self.blocks:
            x = block(x, x)
        return x.mean((2, 3))


def test_values_computed_while_tracing_leave_no_grad_mode_nodes():
    """Values are computed under no_grad; that block was recorded into the graph being traced (smp Linknet:
    150 grad-mode nodes in `decoder.blocks.0`, so no owner matched its trace and the add was refused)."""
    model = perturb_bn(SizeDecisions()).eval()
    plan = surgeon.plan(model, "se", kind="residual", input_size=(3, 16, 16))
    patched = plan.apply()
    assert plan.owners() == {"blocks.0": "blocks.0", "blocks.1": "blocks.1"}
    assert plan.verification.max_abs_diff == 0
    x = torch.randn(2, 3, 16, 16)
    assert torch.equal(patched(x), model(x))


def test_an_owner_holding_another_owners_edit_rewrites_both():
    """timm MViTv2: `stages.1` could own the edits of its second block, while its first block's edits only
    match from the root, which then kept the rewritten `stages.1` whole and could not reach them (a KeyError
    crash on all 8 MViTv2s). The root now takes the inner owner's edits too."""
    model = perturb_bn(timm.create_model("mvitv2_tiny", img_size=64)).eval()
    plan = surgeon.plan(model, "cbam", input_size=(3, 64, 64))
    patched = plan.apply()
    assert len(plan.edits) == 10 and set(plan.owners().values()) == {""}
    assert plan.verification.max_abs_diff == 0
    x = torch.randn(2, 3, 64, 64)
    assert torch.equal(patched(x), model(x))
