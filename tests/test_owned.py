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
