"""The module calls of one traced graph (`Scopes`), and the match of a module traced alone with its part
of the whole model's graph: what scoped surgery (`surgery.scope`) needs to pick and rewrite owners.
"""
from __future__ import annotations

import operator

import logging
from collections import Counter
from dataclasses import dataclass, field

import torch.fx as fx
from torch import nn

from surgeon.surgery.sites import Site
from surgeon.surgery.trace import has_hooks

log = logging.getLogger("surgeon")

ROOT = None  # the scope key of a graph's own root


# -- scopes of one traced graph ------------------------------------------------------------------------
def _stack(node: fx.Node) -> list[tuple[str, str]]:
    """(scope key, module path) of the module calls a node was created in, outermost first.

    A leaf module's own call node carries its module last; that is not a scope of the node."""
    entries = [(k, v[0]) for k, v in (node.meta.get("nn_module_stack") or {}).items()]
    if entries and node.op == "call_module" and entries[-1][1] == node.target:
        entries = entries[:-1]
    return entries


@dataclass
class Scopes:
    """The module calls of one traced graph: each call's nodes, in order."""

    gm: fx.GraphModule
    root: nn.Module  # the module the graph was traced from (for hooks)
    nodes: dict[str, list[fx.Node]] = field(default_factory=dict)
    paths: dict[str, str] = field(default_factory=dict)
    calls: Counter = field(default_factory=Counter)
    stacks: dict[fx.Node, list[tuple[str, str]]] = field(default_factory=dict)
    returns_packed: set[str] = field(default_factory=set)  # modules returning more than one tensor
    takes_packed: set[str] = field(default_factory=set)  # modules given tensors in lists (see calls.record)
    by_name: dict[str, fx.Node] = field(default_factory=dict)  # the graph's nodes by name

    @classmethod
    def of(cls, gm: fx.GraphModule, root: nn.Module, returns_packed: set[str] = frozenset(),
           takes_packed: set[str] = frozenset()) -> Scopes:
        sc = cls(gm, root, returns_packed=set(returns_packed), takes_packed=set(takes_packed))
        for n in gm.graph.nodes:
            sc.by_name[n.name] = n
            st = _stack(n)
            sc.stacks[n] = st
            for key, path in st:
                if key not in sc.nodes:
                    sc.nodes[key] = []
                    sc.paths[key] = path
                    sc.calls[path] += 1
                sc.nodes[key].append(n)
        return sc

    def members(self, key: str | None) -> set[fx.Node]:
        if key is ROOT:
            return set(self.gm.graph.nodes)
        return set(self.nodes[key])

    def path(self, key: str | None) -> str:
        return "" if key is ROOT else self.paths[key]

    def kept_whole(self, key: str | None, sites: list[Site], nodes: dict[str, fx.Node]) -> dict[str, str]:
        """{scope key: path relative to `key`} of the outermost module calls inside `key` that the edits at
        `sites` do not reach into: they stay calls of their modules when `key` is rewritten (a rewritten
        `layer1` still calls `layer1[0]`, whose hooks, checkpointing and site names stay its own). A call
        may hold a site's value when that value is its one output (the stage end a block returns), and the
        module returns that tensor itself, not a list holding it (timm SelecSLS's blocks)."""
        outer = self.path(key)
        values = {nodes[s.node] for s in sites}
        touched = {nodes[n] for s in sites for n in (s.user, *s.args) if n is not None}
        depth: dict[str, int] = {}
        for n in (self.gm.graph.nodes if key is ROOT else self.nodes[key]):
            st = [k for k, _ in self.stacks[n]]
            start = 0 if key is ROOT else st.index(key) + 1
            for d, k in enumerate(st[start:]):
                depth.setdefault(k, d)
        kept: dict[str, str] = {}
        covered: set[fx.Node] = set()
        for k in sorted(depth, key=depth.get):  # outermost first
            seg = set(self.nodes[k])
            path = self.paths[k]
            if seg & covered or (outer and not path.startswith(outer + ".")):
                continue
            outs = [n for n in self.nodes[k] if any(u not in seg for u in n.users)]
            hit = seg & values
            if seg & touched or (hit and (len(outs) != 1 or hit != set(outs) or path in self.returns_packed)):
                continue
            kept[k] = path[len(outer) + 1:] if outer else path
            covered |= seg
        return kept

    def hooked_inside(self, key: str | None) -> dict[str, str]:
        """{scope key: path relative to `key`} of the module calls inside `key` whose module has hooks: they
        stay whole calls when `key` is rewritten, so their hooks keep firing."""
        outer = self.path(key)
        found = {}
        for k, p in self.paths.items():
            if k == key or (outer and not p.startswith(outer + ".")):
                continue
            try:
                mod = self.root.get_submodule(p)
            except AttributeError:
                continue
            if has_hooks(mod):
                found[k] = p[len(outer) + 1:] if outer else p
        # only the outermost hooked calls: those inside them are inside the collapsed call anyway
        return {k: r for k, r in found.items()
                if not any(r != o and r.startswith(o + ".") for o in found.values())}


def candidates(sc: Scopes, site: Site, nodes: dict[str, fx.Node]) -> list[str | None]:
    """Scope keys that could own the edit, innermost first, the root last."""
    seen: list[str | None] = []
    for name in (site.user, site.node):
        if name is None:
            continue
        for key, _ in reversed(sc.stacks[nodes[name]]):
            if key not in seen:
                seen.append(key)
    # the module the site is named after (a stage's `layer1`) comes first when it can hold the edit, unless the
    # site and the use it rewires both sit deeper inside it (a residual named after its block, computed and
    # used inside a child that may be edited and kept whole: RepGhost's ghost2)
    named = [k for k in seen if k is not ROOT and sc.paths[k] == site.owner]
    if named and site.user is not None:
        node_keys = {k for k, _ in sc.stacks[nodes[site.node]]}
        common = next((k for k, _ in reversed(sc.stacks[nodes[site.user]]) if k in node_keys), ROOT)
        if common is not ROOT and common != named[0] and sc.paths[common].startswith(sc.paths[named[0]] + "."):
            named = []
    return named + [k for k in seen if k not in named] + [ROOT]


def fits(sc: Scopes, key: str | None, site: Site, nodes: dict[str, fx.Node]) -> str | None:
    """Why scope `key` cannot own the edit at `site` (None: it can, pending the match of its graph)."""
    node = nodes[site.node]
    for hk, rel in sc.hooked_inside(key).items():
        seg = sc.members(hk)
        if node in seg or (site.user is not None and nodes[site.user] in seg):
            return f"the site is inside {rel!r}, which has hooks"
    if key is ROOT:
        return None
    path = sc.paths[key]
    if sc.calls[path] > 1:
        return f"{path!r} is called {sc.calls[path]} times"
    if path in sc.takes_packed:  # traced alone it would get a proxy where its caller passes a list
        return f"{path!r} is given tensors in a list or tuple"
    inside = sc.members(key)

    def available(n: fx.Node) -> bool:  # computed inside, or one of the scope's inputs
        return n in inside or any(u in inside for u in n.users)

    if site.user is not None:
        if nodes[site.user] not in inside:
            return "the rewired use is outside it"
        if not available(node):
            return "the site's value is not one of its inputs"
    elif node not in inside:
        return "the site is outside it"
    if site.action == "replace" and not all(available(nodes[a]) for a in site.args):
        return "the module's inputs are not available in it"
    return None


# -- matching the big graph with an owner's own graph ------------------------------------------------
def _strip(target: str, prefix: str) -> str | None:
    if not prefix:
        return target
    return target[len(prefix) + 1:] if target.startswith(prefix + ".") else None


def _sig(n: fx.Node, prefix: str) -> tuple:
    if n.op in ("call_module", "get_attr"):
        local = _strip(n.target, prefix)
        return (n.op, local if local is not None else "?")
    return (n.op, n.target)


def flat_nodes(args) -> list:
    out: list = []
    fx.node.map_aggregate(args, out.append)
    return out


def _boundary(n: fx.Node) -> bool:
    """Nodes that traces of the same code have or lack depending on the caller: the checks of a forward traced
    for its recorded call, results packed into their output type, and the guards of decisions a trace knowing
    the sizes took (an owner traced for constant sizes takes them without)."""
    return bool(n.meta.get("surgeon_call") or n.meta.get("surgeon_pack") or n.meta.get("surgeon_guard"))


def _input(n: fx.Node) -> bool:
    """A graph input, or an argument taken out of `*args`/`**kwargs` (see calls.py)."""
    return n.op == "placeholder" or bool(n.meta.get("surgeon_call"))


def _unpacks(node: fx.Node, calls: set[fx.Node]) -> bool:
    """Whether `node` takes an element out of one of `calls`' tuple outputs."""
    return node.op == "call_function" and node.target is operator.getitem and node.args[0] in calls


def _same_scalar(node: fx.Node, value: object) -> bool:
    """Whether `node` computed the int or bool `value` when shapes were recorded. An owner traced alone for its
    recorded call has its arguments' sizes as constants (checked at every call), where the whole model's
    graph computes them from tensor shapes (MViT passes (T, H, W) from block to block)."""
    return type(value) in (int, bool) and node.meta.get("surgeon_scalar", None) == value \
        and type(node.meta["surgeon_scalar"]) is type(value)


def match(sc: Scopes, key: str | None, own: fx.GraphModule,
          inner: dict[str, str]) -> dict[fx.Node, fx.Node] | None:
    """Map the nodes of scope `key` in the big graph (and the inputs they read) to the nodes of `own`, the
    scope's module traced alone; scopes in `inner` ({key: local path}) are single leaf calls in `own`.

    Returns None when the two graphs differ.
    """
    prefix = sc.path(key)
    body = [n for n in (sc.gm.graph.nodes if key is ROOT else sc.nodes[key])
            if n.op not in ("placeholder", "output") and not _boundary(n)]
    # (the checks a forward traced for its recorded call makes on its arguments count as its inputs)
    inside = set(body)
    units: list[tuple[str, object]] = []  # ("node", n) or ("call", inner key)
    for n in body:
        st = [k for k, _ in sc.stacks[n]]
        hit = next((k for k in st if k in inner), None)
        if hit is not None:
            if not units or units[-1] != ("call", hit):
                units.append(("call", hit))
        else:
            units.append(("node", n))
    calls = {m for m in own.graph.nodes if m.op == "call_module" and m.target in inner.values()}
    # an inner call returning a tuple is unpacked in `own` (`x, thw = block(x, thw)`): those getitems belong to
    # the call, whose body the model's graph inlines
    mine = [m for m in own.graph.nodes if m.op not in ("placeholder", "output") and not _boundary(m)
            and not _unpacks(m, calls)]
    if len(units) != len(mine):
        log.debug("scope %r: %d nodes in the model's graph, %d traced alone", prefix, len(units), len(mine))
        return None
    mapping: dict[fx.Node, fx.Node] = {}
    if key is ROOT:  # the same module traced twice: the same inputs
        big_in = [n for n in sc.gm.graph.nodes if n.op == "placeholder"]
        own_in = [n for n in own.graph.nodes if n.op == "placeholder"]
        if len(big_in) != len(own_in):
            return None
        mapping.update(zip(big_in, own_in))
    for (what, item), m in zip(units, mine):
        if what == "call":
            if m.op != "call_module" or m.target != inner[item]:
                return None
            seg = set(sc.nodes[item])
            outs = [n for n in sc.nodes[item] if any(u not in seg for u in n.users)]
            if len(outs) > 1 and not (m.users and all(_unpacks(u, calls) for u in m.users)):
                return None
            if len(outs) == 1:
                mapping[outs[0]] = m
            continue
        n = item
        if _sig(n, prefix) != _sig(m, ""):
            if not (n.op == m.op == "get_attr"):  # tensor constants are named per graph
                log.debug("scope %r: %s differs from %s", prefix, n.format_node(), m.format_node())
                return None
        mapping[n] = m
        a_args, m_args = flat_nodes((n.args, n.kwargs)), flat_nodes((m.args, m.kwargs))
        if len(a_args) != len(m_args):
            return None
        for a, b in zip(a_args, m_args):
            if isinstance(a, fx.Node) and not isinstance(b, fx.Node) and _same_scalar(a, b):
                continue  # a size the big graph computes, a constant of the call the owner was traced for
            if not isinstance(a, fx.Node) and isinstance(b, fx.Node) and _input(b) and type(a) is bool:
                continue  # a flag the owner only hands on (an input of its graph), a constant in the big graph
            if isinstance(a, fx.Node) != isinstance(b, fx.Node):
                return None
            if isinstance(a, fx.Node) and a not in inside:
                if not _input(b) or mapping.setdefault(a, b) is not b:
                    return None
    return mapping
