"""Rewritten owners (surgery/owned.py) deep-copy: patched models copy after a forward with autograd on (EMA
helpers and load(base=...) copy them)."""
import copy
import pickle

import pytest
import torch

import surgeon
from surgeon.layers.sequence import StructuredSelfAttn, structured_penalty

from catalogue_models import names, target


def _tensor_attrs(module):
    """Plain tensor attributes (not parameters or buffers) a module keeps from its forward."""
    for path, m in module.named_modules():
        for k, v in vars(m).items():
            if isinstance(v, torch.Tensor) and not isinstance(v, torch.nn.Parameter):
                yield f"{path}.{k}" if path else k, v


@pytest.mark.parametrize("name", names())
def test_patched_model_deepcopies_after_a_forward_with_grad(name):
    model, x, kw = target(name)
    patched = surgeon.add(model, name, example_input=x, **kw)
    patched.train()
    torch.manual_seed(1)
    patched(*x).sum().backward()
    patched.eval()
    copied = copy.deepcopy(patched)
    pickle.dumps(patched)  # what torch.save of a whole model does
    with torch.no_grad():
        torch.manual_seed(2)
        ref = patched(*x)
        torch.manual_seed(2)
        assert torch.allclose(copied(*x), ref, atol=1e-6)
    # no module keeps a piece of the autograd graph in a copy
    assert all(v.grad_fn is None for _, v in _tensor_attrs(copied))


def test_structured_penalty_keeps_its_graph_and_copies_keep_its_value():
    torch.manual_seed(0)
    m = StructuredSelfAttn(8, hops=3, hidden=4)
    m(torch.randn(2, 5, 8))
    assert m.penalty.grad_fn is not None  # still usable in the loss
    c = copy.deepcopy(m)
    assert c.penalty.grad_fn is None and torch.equal(c.penalty, m.penalty.detach())
    structured_penalty(m).backward()
    assert m.w1.weight.grad is not None


class _Odd(torch.nn.Module):
    """Everything a module tree may hold beside its tables: a shared child, a plain list naming a child, a
    tensor attribute, a hook, an RNN, a module with its own __setstate__ and one with its own __deepcopy__."""

    def __init__(self):
        super().__init__()
        self.a = torch.nn.Linear(3, 3)
        self.b = self.a                       # the same child twice
        self.rnn = torch.nn.GRU(3, 3)
        self.custom = _CustomCopy()
        self.restores = _Restores()
        self.listed = [self.a, "x", 2]        # a plain attribute that names a child
        self.scale = torch.tensor(2.0)        # a plain tensor attribute (copied, not shared)
        self.cache = {}                       # an empty dict held twice: one dict in the copy too
        self.a.cache = self.cache
        self.a.register_forward_hook(_Count())

    def forward(self, x):
        return self.custom(self.rnn(self.b(x))[0]) * self.scale


class _Count:
    """A hook that is an object (functions are never copied; objects are, unless kept)."""

    def __init__(self):
        self.n = 0

    def __call__(self, module, args, out):
        self.n += 1


class _Restores(torch.nn.Identity):
    def __setstate__(self, state):  # copies and unpickling both come through here
        super().__setstate__(state)
        self.restored = True


class _CustomCopy(torch.nn.Identity):
    def __deepcopy__(self, memo):
        new = _CustomCopy()
        new.copied_by_itself = True
        return new


def test_structural_copy_matches_deepcopy_sharing_only_parameters_and_buffers():
    from surgeon.surgery.owned import structural_copy

    model = _Odd()
    for keep_hooks in (False, True):
        twin = structural_copy(model, keep_hooks=keep_hooks)
        assert twin.a is not model.a and twin.b is twin.a and twin.listed[0] is twin.a
        assert twin.a.weight is model.a.weight and twin.rnn.weight_hh_l0 is model.rnn.weight_hh_l0
        assert twin.rnn._flat_weights[0] is model.rnn.weight_ih_l0
        assert twin.custom.copied_by_itself and twin.restores.restored
        assert twin.scale is not model.scale and torch.equal(twin.scale, model.scale)
        assert twin.cache is twin.a.cache and twin.cache is not model.cache
        assert twin.a._forward_hooks is not model.a._forward_hooks
        hook, = twin.a._forward_hooks.values()
        assert (hook is next(iter(model.a._forward_hooks.values()))) == keep_hooks and isinstance(hook, _Count)
        assert twin.a._non_persistent_buffers_set is not model.a._non_persistent_buffers_set
        x = torch.randn(2, 4, 3)
        assert torch.equal(twin(x), model(x))
        twin.a.extra = 1  # the copy's own tables and attributes
        assert not hasattr(model.a, "extra")


class _KeepsNormFrozen(torch.nn.Sequential):
    """A model whose `train` keeps its norm in eval mode (as detection backbones do)."""

    def train(self, mode=True):
        super().train(mode)
        self[1].eval()
        return self


def test_in_mode_sets_every_flag_and_puts_each_back():
    from surgeon.surgery.owned import in_mode

    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Sequential(torch.nn.BatchNorm1d(2)))
    model[1][0].eval()  # mixed flags: the root trains, one norm does not
    with in_mode(model, False):
        assert not any(m.training for m in model.modules())
    assert [m.training for m in model.modules()] == [True, True, True, False]
    with in_mode(model, True):
        assert all(m.training for m in model.modules())
    assert [m.training for m in model.modules()] == [True, True, True, False]
    frozen = _KeepsNormFrozen(torch.nn.Linear(2, 2), torch.nn.BatchNorm1d(2)).eval()
    with in_mode(frozen, True):  # a class with its own `train` is asked, not overridden
        assert [m.training for m in frozen.modules()] == [True, True, False]
    assert not any(m.training for m in frozen.modules())


@pytest.mark.parametrize("attention", ["cbam", "attnpool"])  # inserted into blocks; in pooling layers' places
@pytest.mark.parametrize("verify", [False, True])
def test_surgery_keeps_every_modules_own_mode_and_new_modules_take_their_places(attention, verify):
    # fine-tuning often trains a model with some of it frozen in eval mode (its batch norms, a whole stage):
    # surgery, and the verification that switches modes to compare, must leave the user's model and the
    # patched one so, and a module inserted into a frozen stage is frozen with it
    import timm

    model = timm.create_model("resnet18").train()
    model.bn1.eval(), model.maxpool.eval(), model.layer1[0].bn1.eval(), model.layer2.eval(), model.global_pool.eval()
    before = {n: m.training for n, m in model.named_modules()}
    patched = surgeon.add(model, attention, input_size=(3, 64, 64), verify=verify)
    assert {n: m.training for n, m in model.named_modules()} == before
    new = {e.module for e in surgeon.edits(patched)}
    kept = {n: m.training for n, m in patched.named_modules() if n in before and not any(
        n == p or n.startswith(p + ".") for p in new)}
    assert kept == {n: f for n, f in before.items() if n in kept} and len(kept) >= len(before) - 10
    modes = set()
    for path in new:
        place = before.get(path, before[path.rpartition(".")[0]])  # a replaced leaf's, or its parent's
        assert {m.training for m in patched.get_submodule(path).modules()} == {place}, path
        modes.add(place)
    assert modes == ({True, False} if attention == "cbam" else {False})  # cbam in layer1 and layer2


def test_a_pruned_model_is_patched_and_stays_pruned():
    # torch.nn.utils.prune keeps `weight = weight_orig * weight_mask` as a plain attribute with a history,
    # recomputed by a pre-hook before every forward; deepcopy refuses such tensors, and surgery copied with it
    import timm
    import torch.nn.utils.prune as prune

    torch.manual_seed(0)
    model = timm.create_model("resnet18").eval()
    prune.l1_unstructured(model.layer1[0].conv1, "weight", amount=0.5)
    prune.random_unstructured(model.conv1, "weight", amount=0.3)
    x = torch.randn(2, 3, 64, 64)
    patched = surgeon.add(model, "cbam", example_input=x)  # verified: identity in eval and train mode
    with torch.no_grad():
        assert torch.equal(patched(x), model(x))
    assert not model.layer1[0].conv1.weight.is_meta and set(patched.state_dict()) >= set(model.state_dict())
    conv = patched.layer1[0].conv1
    with torch.no_grad():
        conv.weight_orig.add_(1.0)  # shared with the original: the mask still zeroes the pruned half
        patched(x)
    assert float((conv.weight == 0).float().mean()) == 0.5
    patched.train()(x).sum().backward()
    assert conv.weight_orig.grad is not None and bool((conv.weight_orig.grad[conv.weight_mask == 0] == 0).all())
