"""dham (differentiable hard attention): exact top-k forward, straight-through backward, identity init and
gradient reach on timm models, learning which positions to keep."""
import math

import pytest
import torch

import surgeon
from surgeon.errors import OptionError
from surgeon.layers.hard import HardAttn

from test_channel_spatial_mixed import _add, _timm


def _x(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("shape,keep", [((2, 8, 6, 7), 0.25), ((3, 4, 5, 5), 0.1), ((2, 8, 1, 1), 0.5),
                                        ((1, 16, 9, 4), 1.0)])
def test_forward_keeps_exactly_the_top_k_scored_positions(shape, keep):
    torch.manual_seed(0)
    m = HardAttn(shape[1], keep=keep)
    x = _x(*shape)
    y = m(x)
    # the plain formula: s = w·x + b per position; keep the ⌈keep·H·W⌉ largest per image
    s = torch.einsum("nchw,c->nhw", x, m.score.weight.view(-1)) + m.score.bias
    k = max(1, math.ceil(keep * shape[2] * shape[3]))
    for i in range(shape[0]):
        thresh = s[i].flatten().topk(k).values[-1]
        kept = s[i] >= thresh
        assert int(kept.sum()) == k
        assert torch.equal(y[i], x[i] * kept)  # exactly x where kept, exactly 0 elsewhere


def test_backward_is_the_straight_through_estimate():
    """∂L/∂s = Σ_c x·∂L/∂y · σ'(s): the gradient of x·σ(s), although the forward used the hard mask."""
    torch.manual_seed(0)
    m = HardAttn(8, keep=0.3)
    x, r = _x(2, 8, 5, 6), _x(2, 8, 5, 6, seed=1)
    (m(x) * r).sum().backward()
    w, b = m.score.weight.detach().clone().requires_grad_(), m.score.bias.detach().clone().requires_grad_()
    s = torch.einsum("nchw,c->nhw", x, w.view(-1)) + b
    (x * torch.sigmoid(s)[:, None] * r).sum().backward()
    assert torch.allclose(m.score.weight.grad, w.grad, atol=1e-6) and torch.allclose(m.score.bias.grad, b.grad)


def test_identity_gate_and_options():
    m = HardAttn(8, identity=True)
    x = _x(2, 8, 5, 6)
    assert torch.equal(m(x), x)
    with torch.no_grad():
        m.gamma.fill_(1.0)
    paper = HardAttn(8)
    paper.load_state_dict({k: v for k, v in m.state_dict().items() if k != "gamma"})
    assert torch.equal(m(x), paper(x))
    assert sum(p.numel() for p in paper.parameters()) == 8 + 1  # the 1×1 score conv: C weights and a bias
    for bad in (0, 1.5, "half"):
        with pytest.raises(OptionError, match="keep must be"):
            HardAttn(8, keep=bad)


def test_scores_learn_which_positions_to_keep():
    """Rewarding the kept values of channel 1 teaches the scores to rank positions by channel 1 alone."""
    torch.manual_seed(0)
    m = HardAttn(4, keep=0.25)
    opt = torch.optim.Adam(m.parameters(), lr=0.1)
    for step in range(40):
        x = _x(8, 4, 8, 8, seed=step)
        loss = -m(x)[:, 1].sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    x = _x(8, 4, 8, 8, seed=999)
    chosen = m.mask(x).detach().flatten(1) > 0.5
    best = torch.zeros_like(chosen).scatter_(1, x[:, 1].flatten(1).topk(16, dim=1).indices, True)
    assert (chosen & best).sum().item() / best.sum().item() >= 0.9


# -- surgery: identity ≤ 1e-5 and gradients on timm models ------------------------------------------------
@pytest.fixture(scope="module")
def resnet18():
    return _timm("resnet18")


def test_dham_model_wide_on_resnet18(resnet18):
    x = _x(1, 3, 81, 67)
    patched = _add(resnet18, "dham", x)
    assert len(surgeon.edits(patched)) == 8
    paper = surgeon.add(resnet18, "dham", init="paper", kind="stage", example_input=x, verify=False)
    assert [e.params for e in surgeon.edits(paper)] == [64 + 1, 128 + 1, 256 + 1]


@pytest.mark.slow
@pytest.mark.parametrize("model_name,at,count", [("convnext_tiny", ["stages.0.blocks.0", "stages.3.blocks.2"], 2),
                                                 ("mobilenetv3_small_100", None, 6)])
def test_dham_on_convnext_and_mobilenetv3(model_name, at, count):
    x = _x(1, 3, 97, 113)
    patched = _add(_timm(model_name), "dham", x, at=at)
    assert len(surgeon.edits(patched)) == count
