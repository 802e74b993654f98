"""surgery/rewrite.py on tiny hand-built fx graphs: `insert` after a node (every user, or one), in place of a
node ('replace'), chained edits at one node, which args a module receives, and the internal errors."""
import pytest
import torch
import torch.fx as fx
from torch import nn

from surgeon.errors import InternalError
from surgeon.surgery.rewrite import arg_indices, insert
from surgeon.surgery.sites import Site


class Scale(nn.Module):
    def __init__(self, factor):
        super().__init__()
        self.factor = factor

    def forward(self, x):
        return x * self.factor


class Sum(nn.Module):
    def forward(self, a, b):
        return a + b


class TwoUsers(nn.Module):
    """relu's value is read twice: by the add and by the mul."""

    def forward(self, x):
        r = torch.relu(x)
        return (r + 1) * r


def _graph():
    return fx.symbolic_trace(TwoUsers())


def _run(gm):
    gm.graph.lint()
    gm.recompile()
    x = torch.tensor([-1.0, 2.0, 3.0])
    return gm(x), x


def test_the_graph_is_what_the_tests_assume():
    gm = _graph()
    assert [n.name for n in gm.graph.nodes] == ["x", "relu", "add", "mul", "output"]


def test_insert_rewires_every_user():
    gm = _graph()
    path = insert(gm, Site("r", "after_conv", (3,), node="relu"), Scale(2.0), "scale", None, "r_scale")
    out, x = _run(gm)
    r = torch.relu(x) * 2
    assert path == "r_scale" and isinstance(gm.get_submodule("r_scale"), Scale)
    assert torch.equal(out, (r + 1) * r)
    new = next(n for n in gm.graph.nodes if n.op == "call_module")
    assert new.meta["surgeon_site"] == "r" and new.args[0].name == "relu"


def test_insert_with_a_user_rewires_only_that_user():
    gm = _graph()
    insert(gm, Site("r", "residual", (3,), node="relu", user="add"), Scale(2.0), "scale", None, "scale")
    out, x = _run(gm)
    r = torch.relu(x)
    assert torch.equal(out, (2 * r + 1) * r)


def test_edits_at_one_node_chain_through_replaced():
    gm = _graph()
    replaced = {}
    site = Site("r", "after_conv", (3,), node="relu")
    insert(gm, site, Scale(2.0), "a", replaced, "a")
    assert replaced["relu"].target == "a"
    insert(gm, site, Scale(3.0), "b", replaced, "b")
    out, x = _run(gm)
    r = torch.relu(x) * 6
    assert torch.equal(out, (r + 1) * r)


def test_replace_takes_the_node_place_with_the_site_args():
    gm = _graph()
    # the module replaces relu's value, reading x and relu (as a pool replacement reads input and output)
    site = Site("r", "pool", (3,), node="relu", action="replace", args=("x", "relu"), out_shape=(3,))
    insert(gm, site, Sum(), "sum", None, "sum")
    out, x = _run(gm)
    s = x + torch.relu(x)
    assert torch.equal(out, (s + 1) * s)


def test_replace_with_a_user_goes_just_before_it_and_reads_later_nodes():
    gm = _graph()
    # only the mul's use of relu is replaced, by a module that also reads the add, computed after relu
    site = Site("r", "skip", (3,), node="relu", user="mul", action="replace", args=("relu", "add"), out_shape=(3,))
    insert(gm, site, Sum(), "sum", None, "sum")
    out, x = _run(gm)
    r = torch.relu(x)
    assert torch.equal(out, (r + 1) * (r + r + 1))
    new = next(n for n in gm.graph.nodes if n.op == "call_module")
    assert new.next.name == "mul"


def test_a_module_receives_the_args_its_forward_takes_or_those_it_names():
    class One(nn.Module):
        def forward(self, x):
            return x

    class Any_(nn.Module):
        def forward(self, *xs):
            return xs[0]

    picky = Sum()
    picky.site_args = (2, 0)
    assert arg_indices(One(), 3) == [0]
    assert arg_indices(Sum(), 3) == [0, 1]
    assert arg_indices(Sum(), 1) == [0]
    assert arg_indices(Any_(), 3) == [0, 1, 2]
    assert arg_indices(picky, 3) == [2, 0]


def test_a_node_not_in_the_graph_is_an_internal_error():
    gm = _graph()
    with pytest.raises(InternalError, match="node 'conv' is not in the graph.*bug in surgeon"):
        insert(gm, Site("c", "after_conv", (3,), node="conv"), Scale(2.0), "scale", None, "scale")


def test_an_unknown_action_is_an_internal_error():
    gm = _graph()
    with pytest.raises(InternalError, match="unknown action 'swap'.*bug in surgeon"):
        insert(gm, Site("r", "after_conv", (3,), node="relu", action="swap"), Scale(2.0), "scale", None, "s")
