"""A networkx view of one fx graph, with the node predicates that site finders use.

`GraphView` wraps one traced GraphModule: its nodes in order, a DiGraph of data flow, recorded
shapes, the module behind each call_module node, and the naming rules that give sites stable dotted
names. Predicates are pure `is_<thing>(node, modules) -> bool` functions.
"""
from __future__ import annotations

import heapq
import operator
from functools import cached_property
from typing import Any

import networkx as nx
import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from surgeon.surgery import layout
from surgeon.surgery.owned import ModeCall
from surgeon.surgery.shapes import shape as _shape

_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
_CONV_FUNCS = {F.conv1d, F.conv2d, F.conv3d, torch.conv1d, torch.conv2d, torch.conv3d}
_LINEAR_FUNCS = {F.linear, torch.matmul, operator.matmul}
_AFFINE_FUNCS = {torch.addmm}
_NORM = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm, nn.LocalResponseNorm)
_ACT_FUNCS = {F.relu, F.relu6, F.silu, F.gelu, F.hardswish, F.leaky_relu, F.elu, F.mish, F.selu, F.celu,
              torch.relu, torch.relu_, F.relu_, torch.nn.functional.hardtanh}
_ACT_METHODS = {"relu", "relu_"}
_ADD_FUNCS = {operator.add, operator.iadd, torch.add}
_POOL_MODULES = (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
                 nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d,
                 nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d)
_POOL_FUNCS = {
    F.max_pool1d: "max", F.max_pool2d: "max", F.max_pool3d: "max", torch.max_pool2d: "max",
    F.avg_pool1d: "avg", F.avg_pool2d: "avg", F.avg_pool3d: "avg", torch.avg_pool1d: "avg",
    F.adaptive_avg_pool1d: "avg", F.adaptive_avg_pool2d: "avg", F.adaptive_avg_pool3d: "avg",
    F.adaptive_max_pool1d: "max", F.adaptive_max_pool2d: "max", F.adaptive_max_pool3d: "max",
}
_FLATTEN_FUNCS = {torch.flatten}
_FLATTEN_METHODS = {"flatten", "view", "reshape", "squeeze"}


def _mod(node: fx.Node, modules: dict[str, nn.Module]) -> nn.Module | None:
    return modules.get(node.target) if node.op == "call_module" else None


def is_conv(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    if node.op == "call_function":
        return node.target in _CONV_FUNCS
    return isinstance(_mod(node, modules), _CONV)


def is_linear(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    if node.op == "call_function":
        return node.target in _LINEAR_FUNCS
    return isinstance(_mod(node, modules), nn.Linear)


def is_weighted(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    """A layer with learned weights that transforms features: a convolution, a linear layer, or an
    untraced module holding parameters (an attention block kept as a leaf), but not a norm."""
    if is_conv(node, modules) or is_linear(node, modules):
        return True
    if node.op == "call_function" and node.target in _AFFINE_FUNCS:  # Hugging Face's Conv1D (GPT-2): bias + x @ W
        return True
    m = _mod(node, modules)
    return m is not None and not is_norm(node, modules) and any(True for _ in m.parameters())


def is_norm(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    m = _mod(node, modules)
    if m is None:
        return node.op == "call_function" and node.target in {F.batch_norm, F.layer_norm, F.group_norm}
    return isinstance(m, _NORM) or type(m).__name__.lower().endswith(("norm", "norm2d", "normact2d", "normact"))


def is_act(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    if node.op == "call_function":
        return node.target in _ACT_FUNCS
    if node.op == "call_method":
        return node.target in _ACT_METHODS
    m = _mod(node, modules)
    if m is None:
        return False
    if type(m).__module__ == "torch.nn.modules.activation":
        return not isinstance(m, (nn.Softmax, nn.Softmin, nn.LogSoftmax, nn.MultiheadAttention, nn.Sigmoid))
    return type(m).__module__.startswith("timm.layers.activations") and "sigmoid" not in type(m).__name__.lower()


def is_dropout(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    """Dropout, drop-path and identity modules: shape-preserving, the identity in eval mode."""
    m = _mod(node, modules)
    if m is None:
        return False
    return isinstance(m, (nn.Identity, nn.modules.dropout._DropoutNd)) or "drop" in type(m).__name__.lower() \
        or isinstance(m, ModeCall) and "drop" in m.fn.__name__.lower()


def is_add(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    if node.op == "call_function":
        return node.target in _ADD_FUNCS
    return node.op == "call_method" and node.target in ("add", "add_")


def pool_type(node: fx.Node, modules: dict[str, nn.Module]) -> str | None:
    """'avg' or 'max' for a pooling op (module, function, or mean over spatial dims), else None."""
    m = _mod(node, modules)
    if m is not None:
        if isinstance(m, _POOL_MODULES):
            return "max" if "Max" in type(m).__name__ else "avg"
        return None
    if node.op == "call_function" and node.target in _POOL_FUNCS:
        return _POOL_FUNCS[node.target]
    if (node.op == "call_method" and node.target == "mean") or (node.op == "call_function" and node.target is torch.mean):
        dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
        s = _shape(node.args[0]) if isinstance(node.args[0], fx.Node) else None
        if s is None or dims is None or len(s) < 3:
            return None
        dims = (dims,) if isinstance(dims, int) else tuple(dims)
        spatial = set(range(2, len(s)))
        return "avg" if {d % len(s) for d in dims} == spatial else None
    return None


def is_pool(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    return pool_type(node, modules) is not None


def is_flatten(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    m = _mod(node, modules)
    if m is not None:
        return isinstance(m, (nn.Flatten, nn.Identity))
    if node.op == "call_function":
        return node.target in _FLATTEN_FUNCS
    return node.op == "call_method" and node.target in _FLATTEN_METHODS


class GraphView:
    """One traced graph, seen by site finders.

    Attributes:
        gm: the GraphModule. prefix: its path in the whole model ("" for the root).
        nodes: its nodes in order. modules: its named modules. nx: data-flow DiGraph keyed by node.
    """

    def __init__(self, gm: fx.GraphModule, prefix: str = ""):
        self.gm = gm
        self.prefix = prefix
        self.nodes: list[fx.Node] = list(gm.graph.nodes)
        self.modules: dict[str, nn.Module] = dict(gm.named_modules())
        self.order = {n: i for i, n in enumerate(self.nodes)}

    @cached_property
    def nx(self) -> nx.DiGraph:
        g = nx.DiGraph()
        for n in self.nodes:
            g.add_node(n)
            for inp in n.all_input_nodes:
                g.add_edge(inp, n)
        return g

    @cached_property
    def live(self) -> set[fx.Node]:
        """The nodes whose value reaches the graph's output."""
        outs = [n for n in self.nodes if n.op == "output"]
        return set(outs).union(*(nx.ancestors(self.nx, o) for o in outs))

    @cached_property
    def without_grad(self) -> set[fx.Node]:
        """The nodes computed between a recorded `set grad enabled(False)` (a `torch.no_grad()` block, see
        `SurgeonTracer.trace`) and the restore after it."""
        inside, depth = set(), 0
        for n in self.nodes:
            if n.op == "call_function" and n.target is torch._C._set_grad_enabled:
                depth += 1 if n.args[0] is False else -1 if isinstance(n.args[0], fx.Node) else 0
            elif depth > 0:
                inside.add(n)
        return inside

    # -- facts about nodes ---------------------------------------------------------------------------
    def shape(self, node: fx.Node) -> tuple | None:
        return _shape(node)

    def module(self, node: fx.Node) -> nn.Module | None:
        return _mod(node, self.modules)

    def is_(self, predicate: Any, node: fx.Node) -> bool:
        return predicate(node, self.modules)

    def stack(self, node: fx.Node) -> list[str]:
        """Module paths enclosing the node, outermost first (its own module last for call_module)."""
        paths = [v[0] if isinstance(v, tuple) else str(v) for v in node.meta.get("nn_module_stack", {}).values()]
        if node.op == "call_module" and (not paths or paths[-1] != node.target):
            paths.append(node.target)
        return paths

    @cached_property
    def _last_node_of(self) -> dict[str, fx.Node]:
        last: dict[str, fx.Node] = {}
        for n in self.nodes:
            for p in self.stack(n):
                last[p] = n
        return last

    @cached_property
    def _nodes_of(self) -> dict[str, list[fx.Node]]:
        members: dict[str, list[fx.Node]] = {}
        for n in self.nodes:
            for p in self.stack(n):
                members.setdefault(p, []).append(n)
        return members

    def name_for(self, node: fx.Node, within: set[fx.Node] | None = None) -> str:
        """The outermost module whose output is this node (e.g. 'layer1' for the last node of layer1),
        optionally only among modules whose every node is in `within`; the node's own name when it is
        no such module's output."""
        for p in self.stack(node):
            if self._last_node_of.get(p) is not node:
                continue
            if within is None or all(m in within for m in self._nodes_of.get(p, ()) if m.op != "get_attr"):
                return p
        return node.name

    def site_name(self, node: fx.Node) -> str:
        """A stable name for a site at this node: the outermost module whose output it is, else the
        enclosing module plus the op ('blocks.1.0.se.mean'), so names do not depend on graph counters."""
        name = self.name_for(node)
        if name in self.modules and name:
            return name
        op = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", node.op)
        enclosing = self.enclosing(node)
        return f"{enclosing}.{op}" if enclosing else op

    def enclosing(self, node: fx.Node) -> str:
        """The innermost module that contains this node's computation ('' for the root's own code)."""
        st = self.stack(node)
        if node.op == "call_module" and st:
            st = st[:-1]
        return st[-1] if st else ""

    @cached_property
    def _dims(self) -> tuple[dict, dict, set]:
        channel, batch = layout.derive(self.nodes, self.modules)
        return channel, batch, layout.mixed_positions(self.nodes, self.modules, channel, batch)

    def channel_dim(self, node: fx.Node) -> int | None:
        """The dim of the node's tensor that holds channels, derived from the ops that produce it (see
        `surgeon.surgery.layout`); None when no op fixes it."""
        return self._dims[0].get(node)

    def layout(self, node: fx.Node) -> str:
        """'nchw' (channels at dim 1), 'nhwc' (channels last behind a grid of positional dims), 'nlc' (tokens, or
        channels last behind positions that are not a grid), 'lnc' (time-first tokens) or 'unknown', derived from the ops that produce the node (`surgery.layout`)."""
        return layout.layout(self.shape(node), self._dims[0].get(node), self._dims[1].get(node), node in self._dims[2])

    def ancestors(self, node: fx.Node) -> set[fx.Node]:
        return nx.ancestors(self.nx, node)

    def descendants(self, node: fx.Node) -> set[fx.Node]:
        return nx.descendants(self.nx, node)

    def branches(self, a: fx.Node, b: fx.Node) -> tuple[set[fx.Node], set[fx.Node]]:
        """(`a` and its ancestors that are neither `b` nor b's ancestors, the same for `b`): the two branches
        that meet at an op taking `a` and `b`. Walks back from both in reverse graph order and stops once
        everything left to visit leads to both, so a residual block costs its own nodes, not the whole graph."""
        A, B, BOTH = 1, 2, 3
        if a is b:
            return set(), set()
        label = {a: A, b: B}
        heap = sorted([(-self.order[a], a.name), (-self.order[b], b.name)])
        by_name = {a.name: a, b.name: b}
        one_sided = 2  # nodes waiting in the heap that lead to one of the two only
        only: dict[int, set[fx.Node]] = {A: set(), B: set()}
        while heap and one_sided:
            _, name = heapq.heappop(heap)
            n = by_name[name]
            mark = label[n]  # final: every node after n in graph order that leads to n was visited before it
            if mark != BOTH:
                one_sided -= 1
                only[mark].add(n)
            for p in n.all_input_nodes:
                old = label.get(p, 0)
                new = old | mark
                if new == old:
                    continue
                label[p] = new
                if not old:
                    by_name[p.name] = p
                    heapq.heappush(heap, (-self.order[p], p.name))
                    one_sided += new != BOTH
                elif new == BOTH:
                    one_sided -= 1
        return only[A], only[B]

    def full_name(self, local: str) -> str:
        return f"{self.prefix}.{local}" if self.prefix and local else (self.prefix or local)
