"""surgery/verify.py: a patched model passes only when it computes what the original computes — in eval mode
(NaN fails), in train mode under one seed, with the same requires-grad structure of its outputs — and a
backward pass reaches every new parameter; `surgeon.verify_model` turns a failure into a VerificationError."""
import collections
import copy
import dataclasses
import types

import pytest
import torch
from torch import nn

import surgeon
from surgeon.errors import VerificationError
from surgeon.surgery.verify import verify


class Gated(nn.Module):
    """x + γ·f(x): the identity at γ = 0; `how` makes it wrong in one way at a time."""

    def __init__(self, how="identity", gamma=0.0):
        super().__init__()
        self.how = how
        self.gamma = nn.Parameter(torch.tensor(gamma))

    def forward(self, x):
        y = x + self.gamma * torch.tanh(x)
        if self.how == "nan" and not self.training:  # in eval mode only: the eval comparison alone must fail
            y = y + torch.full_like(x, float("nan"))
        if self.how == "detach":
            y = y.detach()
        if self.how == "train_only" and self.training:
            y = y + 1
        if self.how == "inference_only" and not torch.is_grad_enabled():  # as torch's fused inference paths
            y = y + 1
        return y


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.bn = nn.BatchNorm1d(4)
        self.attn = nn.Identity()

    def forward(self, x):
        return self.attn(self.bn(self.fc(x)))


def _pair(how="identity", gamma=0.0):
    """The original and a patched model sharing its modules (as surgery shares parameters and buffers)."""
    torch.manual_seed(0)
    original = Net().eval()
    patched = copy.copy(original)
    patched._modules = {**original._modules, "attn": Gated(how, gamma).eval()}  # in the mode of the model
    return original, patched, (torch.randn(3, 4),)


def _verify(how="identity", gamma=0.0, tolerance=1e-5):
    original, patched, inputs = _pair(how, gamma)
    return verify(original, patched, inputs, ["attn"], tolerance=tolerance)


def test_identical_passes():
    v = _verify()
    assert v.ok and v.problem() is None
    assert v.max_abs_diff == 0.0 and v.train_max_abs_diff == 0.0 and v.same_grad_structure
    assert (v.new_params, v.with_grad, v.nonzero_grad, v.params_added) == (1, 1, 1, 1)
    assert v.flops_after >= v.flops_before > 0


def test_a_module_left_in_another_mode_fails():
    """The checks set both models' modes themselves; a module the patched model holds in train mode inside an
    eval-mode model (a dropout made by tracing) would still compute something else as returned."""
    original, patched, inputs = _pair()
    patched.attn.train()
    v = verify(original, patched, inputs, ["attn"])
    assert not v.ok and v.max_abs_diff == 0.0
    assert v.problem() == ("The patched model's 'attn' is in train mode where the original's is in eval mode, so it "
                           "would not compute what the original does as returned")
    assert patched.attn.training and not patched.training  # verification changes no mode
    patched.attn.eval()
    patched._modules["bn"] = copy.copy(original.bn)  # surgery's copy of the module: its own flag
    original.bn.train()  # a module in its own mode: the patched model's must be in the same
    v = verify(original, patched, inputs, ["attn"])
    assert v.problem() == ("The patched model's 'bn' is in eval mode where the original's is in train mode, so it "
                           "would not compute what the original does as returned")


def test_different_outputs_fail():
    v = _verify(gamma=0.5)
    assert not v.ok and v.max_abs_diff > 1e-5
    assert v.problem().startswith("Identity init changed the output by")


def test_different_outputs_pass_when_no_tolerance_is_asked():
    v = _verify(gamma=0.5, tolerance=None)
    assert v.ok and v.train_max_abs_diff is None and "by design" in v.train_note


def test_nan_fails():
    v = _verify("nan")
    assert v.max_abs_diff != v.max_abs_diff and v.train_max_abs_diff == 0.0  # NaN in eval mode only
    assert not v.ok and "changed the output by nan" in v.problem()


def test_nan_in_any_output_fails():
    class TwoOutputs(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)
            self.attn = nn.Identity()

        def forward(self, x):
            h = self.fc(x)
            return h + 1, self.attn(h)  # NaN in the second output only: max() over the diffs would skip it

    original = TwoOutputs().eval()
    patched = copy.copy(original)
    patched._modules = {**original._modules, "attn": Gated("nan").eval()}
    v = verify(original, patched, (torch.randn(3, 4),), ["attn"])
    assert v.max_abs_diff != v.max_abs_diff and not v.ok


@dataclasses.dataclass
class _Output:
    logits: torch.Tensor
    extras: dict


class _Wrapped(nn.Module):
    """Returns its child's output inside `kind`: a dataclass, a pytree-registered container, or an object."""

    def __init__(self, net, kind):
        super().__init__()
        self.net, self.kind = net, kind

    def forward(self, x):
        y = self.net(x)
        if self.kind == "dataclass":
            return _Output(torch.zeros(()), {"y": y})  # the field that differs sits in a dict inside it
        if self.kind == "deque":
            return collections.deque([torch.zeros(()), y])
        return types.SimpleNamespace(y=y)


@pytest.mark.parametrize("kind", ["dataclass", "deque"])
def test_outputs_in_dataclasses_and_pytree_containers_are_compared(kind):
    original, patched, inputs = _pair()
    assert verify(_Wrapped(original, kind), _Wrapped(patched, kind), inputs, ["net.attn"]).ok
    original, patched, inputs = _pair(gamma=0.5)
    v = verify(_Wrapped(original, kind), _Wrapped(patched, kind), inputs, ["net.attn"])
    assert v.outputs == 2 and v.max_abs_diff > 1e-5 and not v.ok


def test_an_output_verification_cannot_look_into_fails_saying_so():
    original, patched, inputs = _pair()
    v = verify(_Wrapped(original, "object"), _Wrapped(patched, "object"), inputs, ["net.attn"])
    assert v.outputs == 0 and not v.ok
    assert not verify(_Wrapped(original, "object"), _Wrapped(patched, "object"), inputs, []).ok  # nothing new
    assert v.problem() == ("The model's output (SimpleNamespace) holds no tensor to compare: a forward that returns "
                           "tensors, or tuples, lists, dicts or dataclasses of them, can be checked (or patch without "
                           "verification)")


def test_the_eval_check_runs_without_autograd_as_inference_does():
    v = _verify("inference_only")
    assert v.max_abs_diff == pytest.approx(1.0) and v.train_max_abs_diff == 0.0 and not v.ok
    assert v.with_grad == v.new_params == 1 and v.same_grad_structure  # from the train-mode forward


class _EvalOnly(Net):
    """Runs in eval mode only (as a detector without targets in train mode)."""

    def forward(self, x):
        if self.training:
            raise ValueError("targets should not be None in training mode")
        return super().forward(x)


@pytest.mark.parametrize("how", ["identity", "detach"])
def test_without_a_train_mode_run_the_eval_check_makes_the_gradient_checks(how):
    torch.manual_seed(0)
    original = _EvalOnly().eval()
    patched = copy.copy(original)
    patched._modules = {**original._modules, "attn": Gated(how).eval()}
    v = verify(original, patched, (torch.randn(3, 4),), ["attn"])
    assert v.train_max_abs_diff is None and "does not run in train mode" in v.train_note
    assert (v.with_grad, v.same_grad_structure, v.ok) == ((1, True, True) if how == "identity" else (0, False, False))


def test_a_different_requires_grad_structure_fails():
    v = _verify("detach")
    assert v.max_abs_diff == 0.0 and not v.same_grad_structure
    assert not v.ok and "do not require gradients where the original's do" in v.problem()


def test_a_difference_only_in_train_mode_fails():
    v = _verify("train_only")
    assert v.max_abs_diff == 0.0 and v.train_max_abs_diff == pytest.approx(1.0)
    assert not v.ok and v.problem().startswith("In train mode the patched model differs")


def test_train_mode_compares_the_running_statistics_and_restores_them():
    original, patched, inputs = _pair()
    bn = copy.copy(original.bn)  # the same parameter and buffer tensors, another momentum: the same outputs in
    bn.momentum = 0.5            # train mode (batch statistics), other running statistics
    patched._modules = {**patched._modules, "bn": bn}
    before = original.bn.running_mean.clone()
    v = verify(original, patched, inputs, ["attn"])
    assert v.max_abs_diff == 0.0 and v.train_max_abs_diff > 1e-5 and not v.ok
    assert torch.equal(original.bn.running_mean, before)
    assert not original.training and not patched.training


def test_a_new_parameter_the_backward_pass_misses_fails():
    original, patched, inputs = _pair()
    patched.attn.unused = nn.Parameter(torch.zeros(2))
    v = verify(original, patched, inputs, ["attn"])
    assert (v.new_params, v.with_grad) == (2, 1) and not v.ok
    assert v.problem() == "A backward pass reached only 1 of 2 new parameters"


def test_a_model_whose_head_passes_no_gradient_back_fails_saying_what_to_look_for():
    """A dynamically quantized head: its output requires grad, but its backward gives the new parameters nothing."""
    from toy_models import TinyResNet

    model = torch.ao.quantization.quantize_dynamic(TinyResNet().eval(), {nn.Linear}, dtype=torch.qint8)
    with pytest.raises(VerificationError, match=r"^A backward pass reached none of the 30 new parameters: something "
                                                r"after them passes no gradient back \(a detached output, a quantized "
                                                r"layer, an op without a backward\)$"):
        surgeon.add(model, "se", input_size=(3, 32, 32))


def test_verify_model_raises_what_failed():
    original, patched, inputs = _pair(gamma=0.5)
    with pytest.raises(VerificationError, match="Identity init changed the output"):
        surgeon.verify_model(original, patched, inputs, ["attn"])
    assert surgeon.verify_model(*_pair()[:2], inputs, ["attn"]).ok


def test_verification_leaves_no_state_the_originals_forward_stores():
    """RAFT's correlation block keeps its pyramid on itself after each forward: the checks run the original
    with autograd on, and must not leave it holding those tensors (deep copies of it then failed)."""
    class Stores(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
            self.cache = [torch.tensor(0)]

        def forward(self, x):
            y = self.bn(self.conv(x))
            self.cache = [y * 2]
            return y.relu() + y

    model = Stores().eval()
    before = model.cache
    surgeon.add(model, "se", input_size=(3, 8, 8), kind="after_conv")
    assert model.cache is before and copy.deepcopy(model).cache[0].item() == 0


def _torch_counter_total(model, inputs) -> int:
    """FLOPs as torch's FlopCounterMode counts them (with surgeon's formula for CPU flash attention)."""
    from torch.utils.flop_counter import FlopCounterMode

    from surgeon.surgery.verify import _cpu_sdpa_flops

    counter = FlopCounterMode(display=False, custom_mapping={
        torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_sdpa_flops})
    with counter:
        model(*inputs)
    return int(counter.get_total_flops())


@pytest.mark.parametrize("attention", ["cbam", "nl", "lambda", "mhsa"])
def test_flops_are_what_torchs_counter_counts(attention):
    import timm

    from surgeon.surgery.verify import count_flops
    from toy_models import TinyResNet

    torch.manual_seed(0)
    x = torch.randn(1, 3, 32, 32)
    model = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2) if attention == "mhsa" \
        else TinyResNet(width=16)
    patched = surgeon.add(model.eval(), attention, example_input=(x,), verify=False)
    for m in (model, patched):
        with torch.no_grad():
            assert count_flops(m, (x,)) == _torch_counter_total(m, (x,)) > 0


class _Branches(nn.Module):
    """torch.cond: a higher-order op the plain sum does not take; torch's counter counts the larger branch."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        return torch.cond(x.sum() > 0, lambda x: self.fc(x), lambda x: self.fc(self.fc(x)), (x,))


def test_flops_of_a_forward_with_higher_order_ops_fall_back_to_torchs_counter():
    from surgeon.surgery.verify import count_flops

    model, x = _Branches(), torch.randn(2, 4)
    assert count_flops(model, (x,)) == _torch_counter_total(model, (x,)) == 2 * (2 * 2 * 4 * 4)


def test_flops_of_norms_followed_by_in_place_activations_are_counted_on_meta_tensors(monkeypatch):
    from surgeon.surgery.verify import _flops

    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(inplace=True), nn.Conv2d(8, 4, 1)).eval()
    x = torch.randn(1, 3, 8, 8)
    want = _torch_counter_total(model, (x,))
    devices = []
    conv = nn.Conv2d._conv_forward
    monkeypatch.setattr(nn.Conv2d, "_conv_forward",
                        lambda self, x, w, b: devices.append(x.device.type) or conv(self, x, w, b))
    assert torch.is_grad_enabled() and _flops(model, (x,)) == want > 0  # as verify calls it: autograd on
    assert devices == ["meta", "meta"]  # no real forward after a failed meta one


def test_flops_per_sample_are_summed_during_the_checks_forwards(monkeypatch):
    # what one sample costs, from the batch-of-3 eval forwards the check runs anyway: no forward of its own
    import surgeon.surgery.verify as verify_module
    from surgeon.surgery.verify import count_flops

    original, patched, inputs = _pair()
    want = [count_flops(m, (inputs[0][:1],)) for m in (original, patched)]
    monkeypatch.setattr(verify_module, "_flops", lambda *a: pytest.fail("a FLOP count ran a forward of its own"))
    v = verify(original, patched, inputs, ["attn"])
    assert [v.flops_before, v.flops_after] == want and want[0] == 2 * 4 * 4 > 0


def test_flops_of_a_forward_the_sum_cannot_take_are_counted_on_one_sample_apart():
    original = _Branches()
    patched = copy.copy(original)
    patched._modules = {**original._modules, "extra": Gated()}
    patched.forward = lambda x: patched.extra(_Branches.forward(patched, x))
    x = torch.randn(2, 4)
    v = verify(original, patched, (x,), ["extra"])
    assert v.ok and v.flops_before == v.flops_after == _torch_counter_total(original, (x[:1],)) > 0


def test_a_frozen_model_whose_new_parameters_train_passes():
    # fine-tuning only the new modules: the user froze every weight, so the original's outputs need no
    # gradients and the patched model's do, through the new parameters; a module that cuts the graph still fails
    original, patched, inputs = _pair()
    for p in original.parameters():
        p.requires_grad_(False)
    v = verify(original, patched, inputs, ["attn"])
    assert v.ok and v.same_grad_structure and v.with_grad == v.new_params == 1
    import timm

    model = timm.create_model("resnet18").train().requires_grad_(False)
    patched = surgeon.add(model, "se", input_size=(3, 32, 32))  # verified
    assert all(p.requires_grad for e in surgeon.edits(patched) for p in patched.get_submodule(e.module).parameters())


class _LayerDrop(nn.Module):
    """An encoder with layer drop that always drops its second layer in train mode (as LayerDrop may)."""

    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList([nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.ReLU()) for _ in range(3)])
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        for i, layer in enumerate(self.layers):
            if self.training and i == 1:
                continue
            x = x + layer(x)
        return self.head(x.mean((2, 3)))


def test_new_parameters_in_a_layer_the_train_forward_drops_count_as_reached_by_an_eval_backward():
    """The backward pass of the train-mode check cannot reach a layer that layer drop skipped (Hugging Face's
    wav2vec2 at the same seed); the parameters it misses are reached by a backward pass from an eval-mode
    forward, so a model with layer drop verifies, and one whose new parameters no pass reaches still fails."""
    torch.manual_seed(0)
    model = _LayerDrop().eval()
    patched = surgeon.add(model, "se", kind="after_conv", input_size=(4, 8, 8))
    assert sum(type(m).__name__ == "SEModule" for m in patched.modules()) == 3
    new = [e.module for e in surgeon.edits(patched)]
    report = verify(model, patched, (torch.randn(2, 4, 8, 8),), new)
    each = len(list(patched.get_submodule(new[0]).parameters()))
    assert report.ok and report.with_grad == report.new_params == 3 * each and report.train_max_abs_diff == 0.0
    # the third layer's SE cut off (its output detached): no backward pass reaches it
    hook = patched.get_submodule(new[2]).register_forward_hook(lambda m, a, out: out.detach())
    report = verify(model, patched, (torch.randn(2, 4, 8, 8),), new)
    hook.remove()
    assert not report.ok and report.problem() == f"A backward pass reached only {2 * each} of {3 * each} new parameters"
