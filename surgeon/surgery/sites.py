"""Sites: the insertion points of a traced model, and the built-in finders for each kind.

A finder takes a `GraphView` and returns `Site`s. Built-in kinds:
- residual: on the deeper branch of a residual add, just before the add (SENet's, CBAM's place);
- stage: the end of a resolution stage that a downsampling follows (BAM's place);
- after_conv: after a convolution, past the norm and activation that directly follow it;
- pool: a pooling op (module, function, or mean over spatial dims) with any flatten right after it,
  replaced by the inserted module.
Plugins add kinds through the `register_site_finders` hook.
"""
from __future__ import annotations

import dataclasses
import operator
import fnmatch
import logging
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import networkx as nx
import torch
import torch.fx as fx

from surgeon.errors import NoSitesError, preview, unknown
from surgeon.surgery.graph import (GraphView, is_act, is_add, is_conv, is_dropout, is_flatten, is_norm,
                                   is_weighted, pool_type)

log = logging.getLogger("surgeon")


@dataclass(frozen=True)
class Site:
    """One insertion point.

    Attributes:
        name: stable dotted name in the whole model (e.g. 'layer1.0', 'global_pool').
        kind: 'residual', 'stage', 'after_conv', 'pool', or a plugin's kind.
        shape: shape of the tensor the inserted module receives (batch of the example input first).
        layout: 'nchw' (channels at dim 1, any rank), 'nhwc' (channels last behind two or more positional
            dims), 'nlc' (tokens (N, L, C)), 'lnc' (time-first tokens) or 'unknown': derived from the ops
            that produce the tensor (`surgeon.surgery.layout`).
        graph: path of the GraphModule holding the node ('' for the root).
        node: fx node the module is inserted after ('insert') or whose value it replaces ('replace').
        user: rewire only this user of `node` (None: every user); for 'replace', the module's call then goes
            just before `user`, so its args may include nodes computed after `node`.
        action: 'insert' (module(node) takes node's place) or 'replace' (module(*args) takes node's place).
        args: for 'replace', the node names passed to the module (the first as many as its forward
            takes, or those at the indices in the module's `site_args` attribute when it has one).
        out_shape: for 'replace', the shape the module must return.
        owner, slot: where the module is attached: `owner.attn` or `owner.slot_attn` when slot is set.
        info: kind-specific details (pool type, geometry...).
    """

    name: str
    kind: str
    shape: tuple[int, ...]
    layout: str = "nchw"
    graph: str = ""
    node: str = ""
    user: str | None = None
    action: str = "insert"
    args: tuple[str, ...] = ()
    out_shape: tuple[int, ...] | None = None
    owner: str = ""
    slot: str = ""
    info: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)

    @property
    def channels(self) -> int:
        return self.shape[1] if self.layout == "nchw" else self.shape[-1]

    @property
    def channels_first(self) -> tuple[int, ...]:
        """The shape as an attention over (N, C, ...) sees it: channels-last layouts moved to dim 1."""
        if self.layout in ("nhwc", "nlc"):
            return (self.shape[0], self.shape[-1], *self.shape[1:-1])
        return tuple(self.shape)

    def module_path(self, attention: str) -> str:
        """Where an inserted module goes, relative to its graph."""
        leaf = f"{self.slot}_{attention}" if self.slot else attention
        return f"{self.owner}.{leaf}" if self.owner else leaf

    def describe_shape(self) -> str:
        s = "×".join(str(d) for d in self.shape[1:])
        if self.out_shape is not None and self.out_shape != self.shape:
            s += " → " + "×".join(str(d) for d in self.out_shape[1:])
        return s


def find_residual(view: GraphView) -> list[Site]:
    """Sites on the deeper branch of every residual add (the branch with more conv/linear layers)."""
    sites = []
    for n in view.nodes:
        if not view.is_(is_add, n):
            continue
        ins = [a for a in n.args[:2] if isinstance(a, fx.Node)]
        s = view.shape(n)
        if len(ins) != 2 or s is None or len(s) < 3 or any(view.shape(a) != s for a in ins):
            continue
        a, b = ins
        only_a, only_b = view.branches(a, b)
        wa = sum(view.is_(is_weighted, x) for x in only_a)
        wb = sum(view.is_(is_weighted, x) for x in only_b)
        if wa == wb:
            log.debug("site %s: skipped, both branches of the add have %d layers", view.full_name(n.name), wa)
            continue
        branch, user = (a, n) if wa > wb else (b, n)
        if _mutates(n) and branch is a and any(view.order[u] > view.order[n] for u in a.users if u is not n):
            # `out.add_(z)`: the add changes `out` itself and later code reads `out`, not the add's result;
            # a module put in front of the add would leave what later code reads without attention
            log.debug("site %s: skipped, the in-place add changes a tensor read after it", view.full_name(n.name))
            continue
        # step back over dropout / drop-path / identity so the module sees the branch's features
        while view.is_(is_dropout, branch) and len(branch.users) == 1 and isinstance(branch.args[0], fx.Node):
            user, branch = branch, branch.args[0]
        block = view.enclosing(n)
        sites.append(Site(name=view.full_name(block or view.site_name(n)), kind="residual", shape=view.shape(branch),
                          layout=view.layout(branch), graph=view.prefix, node=branch.name, user=user.name,
                          owner=block, slot="" if block else n.name))
    return sites


def _mutates(n: fx.Node) -> bool:
    """An in-place add (`a.add_(b)`, `a += b`) that changes its first operand."""
    return (n.op == "call_method" and n.target == "add_") or (n.op == "call_function" and n.target is operator.iadd)


def _spatial(s: tuple | None) -> tuple | None:
    return tuple(s[2:]) if s is not None and len(s) >= 3 else None


def find_stage(view: GraphView) -> list[Site]:
    """Sites at the end of each stage followed by a downsampling (not the stem, not the last stage).

    1. The chain of nodes every input-to-output path passes through (dominators of the output).
    2. Group it by spatial size; a group ends a stage when the next group is smaller but not global (1×1).
    3. The stage end is the last node of the group that is the output of a container module holding
       convolutions and not holding the downsampling op (`layer1`, `stages.0`, `features.denseblock1`).
       Models written as one flat forward have no such modules: there, the last node of a group whose
       resolution holds at least two convolutions that keep it.
    """
    nodes = view.nodes
    placeholders = [n for n in nodes if n.op == "placeholder"]
    outputs = [n for n in nodes if n.op == "output"]
    if not placeholders or not outputs:
        return []
    g = view.nx.copy()
    source = "__source__"
    g.add_edges_from((source, p) for p in placeholders)
    idom = nx.immediate_dominators(g, source)
    chain = []
    cur = outputs[0]
    while cur != source and cur in idom and idom[cur] != cur:
        chain.append(cur)
        cur = idom[cur]
    chain = [c for c in reversed(chain) if c != source and _spatial(view.shape(c)) and view.layout(c) == "nchw"]
    keeps: dict[tuple, int] = {}
    for n in nodes:
        if view.is_(is_conv, n) and n.args and isinstance(n.args[0], fx.Node):
            sp_in, sp_out = _spatial(view.shape(n.args[0])), _spatial(view.shape(n))
            if sp_in is not None and sp_in == sp_out:
                keeps[sp_out] = keeps.get(sp_out, 0) + 1
    groups: list[list[fx.Node]] = []
    for c in chain:
        if groups and _spatial(view.shape(groups[-1][-1])) == _spatial(view.shape(c)):
            groups[-1].append(c)
        else:
            groups.append([c])
    sites = []
    for group, nxt in zip(groups, groups[1:]):
        sp, sp_next = _spatial(view.shape(group[-1])), _spatial(view.shape(nxt[0]))
        if len(sp) != len(sp_next) or not all(a >= b for a, b in zip(sp, sp_next)) or all(d == 1 for d in sp_next):
            continue
        here = _stage_end(view, group, nxt[0]) or (group[-1] if keeps.get(sp, 0) >= 2 else None)
        if here is None:
            log.debug("site at %s: no stage end (no block of convolutions ends there)", "×".join(map(str, sp)))
            continue
        name = view.name_for(here)
        owner, slot = (name, "") if name in view.modules else (view.enclosing(here), here.name)
        sites.append(Site(name=view.full_name(view.site_name(here)), kind="stage", shape=view.shape(here),
                          layout="nchw", graph=view.prefix, node=here.name, owner=owner, slot=slot))
    return sites


def _stage_end(view: GraphView, group: list[fx.Node], down: fx.Node) -> fx.Node | None:
    inside_down = set(view.stack(down))
    for n in reversed(group):
        name = view.name_for(n)
        m = view.modules.get(name) if name in view.modules and name else None
        if m is None or name in inside_down or not any(True for _ in m.children()):
            continue
        convs = [c for c in view.nodes if view.is_(is_conv, c) and name in view.stack(c)]
        if convs:  # it must hold convolutions working at this resolution (the stem does not)
            sp = _spatial(view.shape(n))
            if any(_spatial(view.shape(c)) == sp and _spatial(view.shape(c.args[0])) == sp for c in convs):
                return n
        elif any(isinstance(sub, (torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d)) for sub in m.modules()):
            return n  # its convolutions sit inside modules that were not traced
    return None


def find_after_conv(view: GraphView) -> list[Site]:
    """Sites after each convolution with a spatial output, past a directly following norm and activation."""
    sites = []
    for n in view.nodes:
        if not view.is_(is_conv, n):
            continue
        s = view.shape(n)
        sp = _spatial(s)
        if sp is None or all(d == 1 for d in sp):
            continue
        end = n
        for pred in (is_norm, is_act):
            users = list(end.users)
            if len(users) == 1 and view.is_(pred, users[0]) and view.shape(users[0]) == s:
                end = users[0]
        if n.op == "call_module":
            owner, _, slot = n.target.rpartition(".")
            name = n.target
        else:
            owner, slot, name = view.enclosing(n), n.name, view.site_name(n)
        sites.append(Site(name=view.full_name(name), kind="after_conv", shape=s, layout="nchw",
                          graph=view.prefix, node=end.name, owner=owner, slot=slot))
    return sites


def _pool_info(view: GraphView, n: fx.Node, kind: str) -> dict[str, Any]:
    s_in, s_out = view.shape(n.args[0]), view.shape(n)
    info: dict[str, Any] = {"pool": kind, "global": all(d == 1 for d in _spatial(s_out) or (1,))}
    m = view.module(n)
    if m is not None:
        src = {k: getattr(m, k) for k in ("kernel_size", "stride", "padding", "dilation", "ceil_mode",
                                           "count_include_pad") if hasattr(m, k)}
    elif n.op == "call_function" and "adaptive" not in n.target.__name__:
        names = ("kernel_size", "stride", "padding", "dilation", "ceil_mode")
        if kind == "avg":
            names = ("kernel_size", "stride", "padding", "ceil_mode", "count_include_pad")
        src = dict(zip(names, n.args[1:]))
        src.update({k: v for k, v in n.kwargs.items() if k in names})
    else:
        src = {}
    info.update(src)
    if s_in and not info["global"] and "kernel_size" not in info:
        info["adaptive"] = True  # adaptive pooling to an output size bigger than 1×1
    return info


def find_pool(view: GraphView) -> list[Site]:
    """Pooling ops, with a flatten directly after them; the inserted module replaces both."""
    sites = []
    for n in view.nodes:
        kind = view.is_(pool_type, n)
        if kind is None or not isinstance(n.args[0], fx.Node) or view.shape(n) is None:
            continue
        end = n
        while len(end.users) == 1 and view.is_(is_flatten, next(iter(end.users))):
            nxt = next(iter(end.users))
            if view.shape(nxt) is None:
                break
            end = nxt
        # named after the largest module that does nothing but this pooling (timm's global_pool holding
        # pool + flatten), else the pool op itself
        chain = {n, end} | (view.descendants(n) & view.ancestors(end))
        name = view.name_for(end, within=chain)
        name = name if name in view.modules and name else view.site_name(n)
        if name in view.modules and name:
            owner, _, slot = name.rpartition(".")
        else:
            owner, slot = view.enclosing(end), end.name
        sites.append(Site(name=view.full_name(name), kind="pool", shape=view.shape(n.args[0]),
                          layout="nchw", graph=view.prefix, node=end.name, action="replace",
                          args=(n.args[0].name, end.name), out_shape=view.shape(end), owner=owner, slot=slot,
                          info=_pool_info(view, n, kind)))
    return sites


def _unique(sites: list[Site]) -> list[Site]:
    seen: dict[str, int] = {}
    out = []
    for s in sites:
        k = seen.get(s.name, 0)
        seen[s.name] = k + 1
        if k:
            s = dataclasses.replace(s, name=f"{s.name}#{k}")
        out.append(s)
    return out


def find_sites(views: list[GraphView], kinds: list[str], at: list[str] | None = None, *,
               finders: Mapping[str, Callable[[GraphView], list[Site]]]) -> list[Site]:
    """Every site of the given kinds in every graph, optionally filtered by --at globs.

    Args:
        finders: {kind: finder}, a finder taking a `GraphView` and returning its sites (the registry's
            `finders()`: surgery knows no plugin, it is handed what plugins registered).

    Raises:
        UnknownNameError: for a kind no finder serves.
        NoSitesError: when an --at glob matches no site.
    """
    found: list[Site] = []
    for kind in kinds:
        if kind not in finders:
            raise unknown("kind", kind, finders, f"Valid kinds: {', '.join(sorted(finders))}.")
        per_kind: list[Site] = []
        for view in views:
            per_kind.extend(finders[kind](view))
        found.extend(_unique(per_kind))
    if at:
        keep = []
        for pattern in at:
            matched = [s for s in found if fnmatch.fnmatchcase(s.name, pattern)]
            if not matched:
                names = [s.name for s in found]
                raise NoSitesError(
                    f"--at {pattern!r} matches no {'/'.join(kinds)} site. Valid sites: {preview(names)}"
                    if names else f"--at {pattern!r}: the model has no {'/'.join(kinds)} sites"
                )
            keep.extend(s for s in matched if s not in keep)
        found = [s for s in found if s in keep]
    return found
