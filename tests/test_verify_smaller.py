"""Verification on smaller images: when surgery chose the example's size itself, the whole-model checks run on
images four times smaller per side, each inserted module is checked alone at its site's size and the FLOPs are
the example's; the example's size decides whenever the smaller check cannot."""
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import surgeon
from surgeon import record
from surgeon.errors import VerificationError
from registered import plugin
from toy_models import TinyResNet

SIZE = (3, 128, 128)  # checked on 2x3x32x32


def _new_modules(patched):
    return [e.module for e in record.edits(patched)]


@pytest.mark.parametrize("attention", ["cbam", "se"])
def test_images_are_checked_smaller_with_the_examples_flops(attention):
    model = TinyResNet().eval()
    plan = surgeon.plan(model, attention, input_size=SIZE)
    patched = plan.apply()
    v = plan.verification
    assert v.smaller == "2x3x32x32" and v.ok and v.max_abs_diff == 0.0 and v.train_max_abs_diff == 0.0
    assert v.with_grad == v.new_params > 0
    full = surgeon.verify_model(model, patched, plan.example_inputs, _new_modules(patched))
    assert full.smaller == ""
    assert (v.flops_before, v.flops_after) == (full.flops_before, full.flops_after)
    assert v.flops_after > v.flops_before


def test_an_example_the_user_gives_is_checked_as_given():
    model = TinyResNet().eval()
    plan = surgeon.plan(model, "se", example_input=torch.randn(2, *SIZE))
    plan.apply()
    assert plan.verification.smaller == "" and plan.verification.ok


class _Scaled(nn.Module):
    """Identity on maps up to 32 wide, scaled above: what only the example's size shows."""

    def forward(self, x):
        return x if x.shape[-1] <= 32 else x * 1.5


class _SizedPlugin:
    @surgeon.hookimpl
    def register_attentions(self, register):
        register("sized", lambda site, *, init="identity": _Scaled(), kinds=("residual",), summary="", paper="")


def test_a_module_identity_only_on_small_maps_fails():
    with plugin(_SizedPlugin(), "sized-plugin"):
        with pytest.raises(VerificationError, match="Identity init changed the output"):
            surgeon.add(TinyResNet().eval(), "sized", input_size=SIZE)
        # on the example's own small size it is the identity, and passes
        assert surgeon.add(TinyResNet().eval(), "sized", input_size=(3, 32, 32)) is not None


class _DecidingBlock(nn.Module):
    """Pools its input when it is wide: the rewritten forward guards the decision the example took."""

    def __init__(self, c=8):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(c)

    def forward(self, x):
        if x.shape[-1] > 40:
            x = F.avg_pool2d(x, 2)
        return F.relu(x + self.bn(self.conv(x)))


class _Decides(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1), nn.ReLU())
        self.block = _DecidingBlock()
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        return self.fc(self.block(self.stem(x)).mean((2, 3)))


def test_a_patched_model_that_runs_only_at_the_examples_size_is_checked_there_and_said():
    model = _Decides().eval()
    plan = surgeon.plan(model, "se", input_size=SIZE)
    with pytest.warns(UserWarning, match=r"computes the original at the example's size, not at 2x3x32x32: "
                                         r"_DecidingBlock.forward was rewritten .* `if x.shape\[-1\] > 40:`"):
        patched = plan.apply()
    assert plan.verification.smaller == "" and plan.verification.ok
    x = torch.randn(2, *SIZE)
    assert torch.equal(patched(x), model(x))


class _Fixed(TinyResNet):
    def forward(self, x):
        if x.shape[-1] != 128:
            raise ValueError("this model takes 128x128 images")
        return super().forward(x)


def test_a_model_refusing_smaller_images_is_checked_at_the_examples_size_without_a_warning():
    plan = surgeon.plan(_Fixed().eval(), "se", input_size=SIZE)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        plan.apply()
    assert plan.verification.smaller == "" and plan.verification.ok


class _NoSmallTraining(nn.Module):
    def forward(self, x):
        if self.training and x.shape[-1] < 64:
            raise RuntimeError("too small to train on")
        return x


class _TrainsBig(TinyResNet):
    def __init__(self):
        super().__init__()
        self.check = _NoSmallTraining()

    def forward(self, x):
        return super().forward(self.check(x))


def test_without_a_train_mode_check_on_smaller_images_the_examples_size_decides():
    plan = surgeon.plan(_TrainsBig().eval(), "se", input_size=SIZE)
    plan.apply()
    v = plan.verification
    assert v.smaller == "" and v.train_max_abs_diff == 0.0 and v.ok


@pytest.mark.parametrize("shape,smaller", [((2, 3, 224, 224), (2, 3, 64, 64)), ((1, 3, 299, 299), (1, 3, 75, 75)),
                                           ((2, 3, 256, 192), (2, 3, 64, 64)), ((2, 3, 128, 128), (2, 3, 32, 32)),
                                           ((2, 3, 4, 112, 112), (2, 3, 4, 32, 32)),
                                           ((2, 3, 32, 32), None), ((2, 3, 64, 40), None), ((2, 16, 384), None)])
def test_the_smaller_images_keep_what_the_sides_are_multiples_of(shape, smaller):
    from surgeon.sizes import for_checking

    x = torch.randn(shape)
    got = for_checking((x,))
    assert (None if got is None else tuple(got[0].shape)) == smaller
    if got:  # picked from the example's own values
        assert set(got[0].flatten().tolist()) <= set(x.flatten().tolist())
    assert for_checking((x, x)) is None and for_checking((x.long(),)) is None


@pytest.mark.parametrize("name", ["resnet18", "mobilevit_xxs"])  # convolutions; linear layers and attention
def test_the_flops_counted_while_recording_calls_are_the_originals_at_the_examples_size(name, monkeypatch):
    import timm

    from surgeon.surgery import shapes, verify

    model = timm.create_model(name).eval()
    plan = surgeon.plan(model, "se")
    recorded = plan._prep.traced.packed.flops
    one = torch.randn(1, *plan.example_inputs[0].shape[1:])  # 224 or the model's own size (mobilevit: 256)
    assert recorded == verify.count_flops(model, (one,)) > 0
    # the verification reports them, and does not run the original at the example's size again
    monkeypatch.setattr(verify, "_flops", lambda *a: pytest.fail("the original's FLOPs were counted again"))
    plan.apply()
    assert plan.verification.smaller.startswith("2x3x") and plan.verification.flops_before == recorded
    # unverified, nothing is counted while recording
    asked = []
    counted = verify.counted
    monkeypatch.setattr(shapes.verify, "counted",
                        lambda m, xs, count=True: asked.append(count) or counted(m, xs, count))
    surgeon.add(model, "se", verify=False)
    assert asked == [False]
