"""Scoped surgery: each site is edited inside the smallest module whose own forward holds it.

The whole-model trace (see `trace`) is only a map for finding sites. Rewriting happens per *owner*:
1. For each edit, the owner is the innermost module call (from the nodes' module stacks, `matching`) that
   holds the site's node and every use the edit rewires, or returns the node, and is called once; a
   stateless leaf that the inserted module replaces outright is its own owner. The root is the last resort.
2. Owners are rewritten innermost first. An owner is traced alone (owners and hooked modules inside it
   stay leaves), its nodes are matched one to one with its part of the big graph, and the edits are
   inserted there.
3. The owner is replaced by a copy of itself (`owned`): the same object state (attributes, hooks,
   children), an instance of a subclass of its class whose `forward` is the rewritten graph's code, with
   the inserted modules as children, inside a structural copy of the model that shares the user's
   weights: the root keeps its class, methods, attributes and hooks, and the user's model never changes.
"""
from __future__ import annotations

import keyword
import logging
from dataclasses import dataclass, field

import torch
import torch.fx as fx
from torch.fx._lazy_graph_module import _LazyGraphModule
from torch import nn

from surgeon.errors import InternalError, TraceError
from surgeon.surgery import calls
from surgeon.surgery.matching import ROOT, Scopes, candidates, fits, flat_nodes, match
from surgeon.surgery.owned import (LeafReplacement, attr_at, forward_source, join_path as _join, patched_class,
                                    shallow_copy, structural_copy)
from surgeon.surgery.sites import Site
from surgeon.surgery.trace import Alike, copy_graph, noting_training_reads
from surgeon.surgery.values import IN_PLACE_OPERATORS

log = logging.getLogger("surgeon")



# -- owners ------------------------------------------------------------------------------------------
@dataclass
class Owner:
    """One module to rewrite: its scope in a graph, the edits inside it and the graph it was traced to."""

    graph: str  # prefix of the big graph
    key: str | None
    path: str  # relative to the graph's module
    edits: list = field(default_factory=list)  # (site, module, attention)

    @property
    def full(self) -> str:
        return _join(self.graph, self.path)


def _returns(own: fx.GraphModule, node: fx.Node) -> bool:
    out = next(n for n in own.graph.nodes if n.op == "output")
    return node in flat_nodes(out.args)


def _uses_leave(sc: Scopes, key: str | None, site: Site, nodes: dict[str, fx.Node]) -> bool:
    """Whether the edit rewires uses outside the scope (which then must read the scope's output)."""
    if key is ROOT or site.user is not None:
        return False
    inside = sc.members(key)
    return any(u not in inside for u in nodes[site.node].users)


class _Tracing:
    """Traces of single modules, on structural copies so that tracing never changes the user's model. A module
    like one traced before (the same fingerprint, call and leaves: the repeated blocks of a stage) takes that
    module's graph instead of being traced again."""

    def __init__(self, trace_module, call_of=lambda path: None):
        self._trace = trace_module
        self._call_of = call_of
        self._cache: dict[tuple, tuple[nn.Module, fx.GraphModule]] = {}
        self._alike = Alike()

    def __call__(self, module: nn.Module, leaves: frozenset[str], path: str) -> tuple[nn.Module, fx.GraphModule]:
        k = (id(module), leaves)
        if k not in self._cache:
            twin = structural_copy(module)
            self._cache[k] = (twin, self._alike.trace(module, leaves, self._call_of(path),
                                                      lambda: self._trace(twin, set(leaves), path), onto=twin))
        return self._cache[k]


def choose_owners(sc: Scopes, edits: list, tracing: _Tracing, graph_module: nn.Module, graph: str,
                  leaf_paths: set[str]) -> list[tuple[Owner, tuple]]:
    """The owner of each edit: the innermost scope that fits and whose module traces alone to the same graph."""
    nodes = sc.by_name
    chosen = []
    for edit in edits:
        site = edit[0]
        why: list[str] = []
        if _swappable(sc, site, edit[1], nodes):
            chosen.append((Owner(graph, SWAP, nodes[site.node].target), edit))
            continue
        for key in candidates(sc, site, nodes):
            path = sc.path(key)
            reason = fits(sc, key, site, nodes)
            if reason is None:
                reason = _check_alone(sc, key, site, nodes, tracing, graph_module, graph, leaf_paths)
            if reason is None:
                chosen.append((Owner(graph, key, path), edit))
                if why:
                    log.debug("site %s: rewritten in %r (%s)", site.name, _join(graph, path) or "the root",
                              "; ".join(why))
                break
            why.append(f"not in {_join(graph, path) or 'the root'!r}: {reason}")
        else:
            raise TraceError(f"Site {site.name!r} cannot be rewritten: " + "; ".join(why))
    return chosen


SWAP = "<swap>"  # the owner is a stateless leaf module that the inserted module replaces outright


def _swappable(sc: Scopes, site: Site, module: nn.Module, nodes: dict[str, fx.Node]) -> bool:
    """Whether the edit replaces exactly one call of a stateless leaf module (a pooling layer) with the
    same input: then the new module simply takes the leaf's place in the tree."""
    from surgeon.surgery.rewrite import arg_indices

    node = nodes[site.node]
    if site.action != "replace" or site.user is not None or node.op != "call_module":
        return False
    leaf = sc.gm.get_submodule(node.target)
    if any(True for _ in leaf.parameters()) or any(True for _ in leaf.buffers()) or leaf._forward_hooks \
            or leaf._forward_pre_hooks:
        return False
    if sum(n.op == "call_module" and n.target == node.target for n in sc.gm.graph.nodes) != 1:
        return False
    if node.kwargs or len(node.args) != 1 or not isinstance(node.args[0], fx.Node):
        return False
    picked = [site.args[i] for i in arg_indices(module, len(site.args))]
    return picked in ([node.args[0].name], [node.args[0].name, node.name])


def _local_leaves(leaf_paths: set[str], path: str) -> frozenset[str]:
    if not path:
        return frozenset(leaf_paths)
    return frozenset(p[len(path) + 1:] for p in leaf_paths if p.startswith(path + "."))


def _trace_matched(sc: Scopes, key, module: nn.Module, full: str, leaves: frozenset[str], tracing: _Tracing,
                   must: dict[str, str], wanted: dict[str, str], *, fresh: bool = True):
    """Trace `module` (scope `key`) alone with the calls in `must` and, when that traces and matches, those in
    `wanted` kept whole; returns (twin, graph, mapping or None). Keeping a call whole fails where the code
    around it takes its output apart in Python (iterating a dict of features): then it is traced through.
    With `fresh`, the graph is the caller's own copy, to edit (traces are cached)."""
    for whole in ({**must, **wanted}, must) if wanted else (must,):
        try:
            twin, own = tracing(module, frozenset(leaves | set(whole.values())), full)
        except Exception:  # noqa: BLE001 - retried with fewer calls kept whole; the last failure propagates
            if whole is must:
                raise
            continue
        if fresh:
            own = _fresh(own)
        mapping = match(sc, key, own, whole)
        if mapping is not None or whole is must:
            return twin, own, mapping
    raise InternalError("scope: the owner search ended without a result")  # its last round returns or raises


def _check_alone(sc, key, site, nodes, tracing, graph_module, graph, leaf_paths) -> str | None:
    path = sc.path(key)
    module = graph_module.get_submodule(path) if path else graph_module
    try:
        own, mapping = _trace_matched(sc, key, module, _join(graph, path), _local_leaves(leaf_paths, path),
                                      tracing, sc.hooked_inside(key), sc.kept_whole(key, [site], nodes),
                                      fresh=False)[1:]
    except Exception as exc:  # noqa: BLE001 - any failure means: not this scope
        return f"it does not trace alone ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})"
    if mapping is None:
        return "traced alone it gives a different graph"
    if _uses_leave(sc, key, site, nodes) and not _returns(own, mapping[nodes[site.node]]):
        return "the site's value leaves it other than as its output"
    return None


# -- rewriting one owner -----------------------------------------------------------------------------
def _sanitize(name: str) -> str:
    """A child name: no dots; not a Python keyword (fx writes `self.<name>` for identifiers)."""
    name = name.replace(".", "_") or "_"
    return f"{name}_" if keyword.iskeyword(name) else name


def _unique_name(module: nn.Module, name: str, taken: set[str]) -> str:
    base, i = name, 0
    while name in taken or (hasattr(module, name) and module.__dict__.get(name, 0) is not None):
        # an attribute set to None is an empty slot (timm blocks' `self.se = None`): the module may take it
        i += 1
        name = f"{base}_{i}"
    taken.add(name)
    return name


def local_name(site: Site, owner_path: str, attention: str) -> str:
    """The inserted module's name inside its owner: what it would be called next to the site's owner
    (`conv1_se`, `cbam`), relative to the module that holds it."""
    wanted = site.module_path(attention)
    if owner_path and wanted.startswith(owner_path + "."):
        rest = wanted[len(owner_path) + 1:]
    elif not owner_path:
        rest = wanted
    else:  # the owner is deeper than the site's nominal owner (a pooling module replaced inside itself)
        rest = attention
    return _sanitize(rest.replace(".", "_"))


def _resolves(module: nn.Module, target: str) -> bool:
    obj = module
    for part in target.split("."):
        if isinstance(obj, nn.Module) and part in obj._modules:
            obj = obj._modules[part]
        elif hasattr(obj, part):
            obj = getattr(obj, part)
        else:
            return False
    return obj is not None


def _pure_module(m: nn.Module) -> bool:
    """A stateless torch.nn layer that draws no random numbers (a pooling or flatten layer)."""
    return (type(m).__module__.startswith("torch.nn.modules") and not isinstance(m, nn.modules.dropout._DropoutNd)
            and not any(True for _ in m.parameters()) and not any(True for _ in m.buffers()))


def prune(owner: fx.GraphModule, nodes: list[fx.Node]) -> None:
    """Erase replaced nodes that lost every use, and what only they used, except for calls that may have
    side effects (in-place methods and functions, module calls): dead-code elimination would remove
    `out.add_(x)` whose result is not reassigned."""
    graph = owner.graph
    todo = list(nodes)
    while todo:
        n = todo.pop()
        if n.users or n.graph is not graph or n.op not in ("call_function", "call_method", "get_attr", "call_module"):
            continue
        if n.op == "call_module" and not _pure_module(owner.get_submodule(n.target)):
            continue
        name = n.target if isinstance(n.target, str) else getattr(n.target, "__name__", "")
        if name.endswith("_") and not name.endswith("__"):
            continue
        if n.op == "call_function" and (n.is_impure() or n.target in IN_PLACE_OPERATORS):
            continue
        ins = [a for a in n.all_input_nodes]
        graph.erase_node(n)
        todo.extend(ins)


def rewrite_owner(module: nn.Module, twin: nn.Module, own: fx.GraphModule, edits: list,
                  mapping: dict[fx.Node, fx.Node], owner_path: str, insert) -> tuple[nn.Module, dict[str, str]]:
    """Insert `edits` into `own` (the owner's graph, traced from `twin`, a structural copy of `module`)
    and return the owner's replacement and {site name: path of the inserted module relative to the owner}.

    `module` is the owner as it stands in the patched model being built (inner owners already replaced).
    """
    by_name = {n.name: m for n, m in mapping.items()}
    taken: set[str] = set()
    replaced: dict[str, fx.Node] = {}
    paths: dict[str, str] = {}
    dead: list[fx.Node] = []
    added: list[str] = []
    for site, mod, attention in edits:
        local_site = _localize(site, by_name)
        name = _unique_name(module, local_name(site, owner_path, attention), taken)
        gone = replaced.get(local_site.node, by_name[site.node])
        insert(own, local_site, mod, attention, replaced, path=name)
        if site.action == "replace":
            dead.append(gone)
        paths[site.name] = name
        added.append(name)
    prune(own, dead)
    own.graph.lint()
    new = shallow_copy(module)
    # every module or attribute the graph reads that the user's module does not have goes on the copy (tracing
    # stores the tensors a forward makes, `torch.tensor(100.).log()`, on the traced twin as `_tensor_constant0`):
    # a tensor as a buffer outside the state dict, so that it moves with the model (`.to("cuda")`, `.half()`) as
    # what it was made from does (Swin V2's window mask, reshaped from a buffer, met the attention scores on the
    # GPU while it stayed on the CPU)
    for n in own.graph.nodes:
        if n.op not in ("call_module", "get_attr") or (_resolves(twin, n.target) and _resolves(module, n.target)):
            continue
        obj = attr_at(own, n.target)
        name = n.target if "." not in n.target and n.target in added else _unique_name(
            module, _sanitize(n.target.replace(".", "_")), taken)
        if new.__dict__.get(name, 0) is None:
            del new.__dict__[name]
        if isinstance(obj, nn.Module):
            new.add_module(name, obj)
        elif isinstance(obj, nn.Parameter):
            new.register_parameter(name, obj)
        elif isinstance(obj, torch.Tensor):
            new.register_buffer(name, obj, persistent=False)
        else:
            new.__dict__[name] = obj
        if name != n.target:
            n.target = name
        added.append(name)

    def compiled():
        own.recompile()
        _LazyGraphModule.force_recompile(own)  # a lazy one only notes that it must, and its forward is a stand-in
        return type(own).forward

    new.__class__ = patched_class(type(module), forward_source(own), compiled)
    new.__dict__["_surgeon_added"] = set(new.__dict__.get("_surgeon_added", ())) | set(added)
    return new, paths


def _localize(site: Site, by_name: dict[str, fx.Node]) -> Site:
    import dataclasses

    def loc(name: str | None) -> str | None:
        return None if name is None else by_name[name].name

    return dataclasses.replace(site, graph="", node=loc(site.node), user=loc(site.user),
                               args=tuple(loc(a) for a in site.args), owner="", slot="")


# -- the driver --------------------------------------------------------------------------------------
def rewrite(model: nn.Module, choice: Choice, insert) -> tuple[nn.Module, dict[str, str], dict[str, str]]:
    """Apply the edits of `choice` (see `choose`) to a copy of `model`, each inside its owner.

    Args:
        insert: the graph insertion of one edit (`rewrite.insert`).

    Returns:
        (patched model, {site name: full path of its inserted module}, {site name: full path of the owner}).
    """
    with noting_training_reads():  # one change of nn.Module for all the traces below
        return _rewrite(model, choice, insert)


def _rewrite(model: nn.Module, choice: Choice, insert) -> tuple[nn.Module, dict[str, str], dict[str, str]]:
    owners, scopes, tracing, leaf_paths = choice.owners, choice.scopes, choice.tracing, choice.leaf_paths
    # the patched model is a structural copy: its own modules, attributes and training flags, the user's
    # parameter and buffer tensors (no copy of the weights) and the user's hook functions
    result = structural_copy(model, keep_hooks=True)
    aliased = _aliased(result)
    done: set[str] = set()
    paths: dict[str, str] = {}
    owner_of: dict[str, str] = {}
    for full in sorted(owners, key=lambda p: (-(p.count(".") + 1) if p else 0)):  # innermost first
        o = owners[full]
        g = o.graph
        if o.key == SWAP:
            (site, module, _), = o.edits
            module._surgeon_leaf = True
            leaf = result.get_submodule(full)
            if _arity(module) >= 2:
                module = LeafReplacement(leaf, module)
            module.train(leaf.training)  # the mode of the leaf whose place it takes
            result = _install(result, full, module, aliased)
            done.add(full)
            paths[site.name] = owner_of[site.name] = full
            log.debug("site %s: %s takes the place of %r", site.name, type(module).__name__, full)
            continue
        sc = scopes[g]
        same_graph = {owners[p].key: (p[len(full) + 1:] if full else p) for p in done
                      if _inside(p, full) and owners[p].graph == g and owners[p].key != SWAP}
        same_graph.update(sc.hooked_inside(o.key))
        nodes = sc.by_name
        leaves = set(_local_leaves(leaf_paths, full))
        leaves.discard("")
        current = result.get_submodule(full) if full else result
        # with nothing replaced inside it, the owner is still the user's module as traced while choosing owners
        source = current if any(_inside(p, full) for p in done) else (model.get_submodule(full) if full else model)
        twin, own, mapping = _trace_matched(sc, o.key, source, full, frozenset(leaves), tracing, same_graph,
                                            sc.kept_whole(o.key, [e[0] for e in o.edits], nodes))
        if mapping is None:
            raise TraceError(f"{full or 'the root'!r} cannot be rewritten: traced alone, with the modules edited "
                             f"inside it kept whole, it gives a different graph")
        new, local = rewrite_owner(current, twin, own, o.edits, mapping, o.path, insert)
        result = _install(result, full, new, aliased)
        done.add(full)
        for site_name, rel in local.items():
            paths[site_name] = _join(full, rel)
            owner_of[site_name] = full
    return result, paths, owner_of


@dataclass
class Choice:
    """Which module each edit rewrites: what `rewrite` performs and `surgeon add --dry-run` shows. It keeps
    the scopes and the single-module traces it was decided on, so rewriting does not trace them again."""

    owners: dict[str, Owner]
    scopes: dict[str, Scopes]
    tracing: _Tracing
    leaf_paths: set[str]

    def by_site(self) -> dict[str, str]:
        """{site name: path of the module whose forward is rewritten for it} ('' for the root)."""
        return {e[0].name: full for full, o in self.owners.items() for e in o.edits}


def choose(model: nn.Module, traced, edits: list, trace_module, call_of=lambda path: None) -> Choice:
    """Pick the owner of every (site, module, attention) edit, changing nothing.

    Args:
        traced: the `Traced` map of `model` the sites were found in.
        trace_module: (module, leaf paths, its path in the model) -> GraphModule, how one module is traced
            alone.
        call_of: path -> the call a module is traced for (see `calls`), which its graph depends on.
    """
    tracing = _Tracing(trace_module, call_of)
    # a module with a graph of its own is one call in the graph around it (its hooks, its `training` reads): it
    # stays one when an owner around it is traced alone, also once rewritten (a rewritten forward reads no flag)
    leaf_paths = set(traced.leaves) | set(traced.extra_leaves) | {p for p in traced.graphs if p}
    by_graph: dict[str, list] = {}
    for e in edits:
        by_graph.setdefault(e[0].graph, []).append(e)
    owners: dict[str, Owner] = {}
    scopes: dict[str, Scopes] = {}
    with noting_training_reads():  # one change of nn.Module for all the traces below
        _choose_all(model, traced, by_graph, tracing, leaf_paths, owners, scopes)
    return Choice(owners, scopes, tracing, leaf_paths)


def _choose_all(model, traced, by_graph, tracing, leaf_paths, owners, scopes) -> None:
    for g, group in by_graph.items():
        user_module = model.get_submodule(g) if g else model
        packed = traced.packed or calls.Recorded({}, set(), set())
        sc = scopes[g] = Scopes.of(traced.graphs[g], user_module, _below(packed.returns_packed, g),
                                   _below(packed.takes_packed, g))
        local_leaves = set(_local_leaves(leaf_paths, g)) if g else set(leaf_paths)
        local_leaves.discard("")
        mine: dict[str, Owner] = {}
        for owner, edit in choose_owners(sc, group, tracing, user_module, g, local_leaves):
            mine.setdefault(owner.full, owner).edits.append(edit)
        owners.update(_absorb(mine, sc))


def _absorb(owners: dict[str, Owner], sc: Scopes) -> dict[str, Owner]:
    """Owners of one graph, where an owner whose edit lies inside another owner also takes that owner's edits.
    Each edit's owner is chosen on its own: an edit can go to `stages.3` while another edit inside
    `stages.3.blocks.0` only matches from the root. Rewriting the root keeps the rewritten `stages.3` whole, so
    the root's edit would have nothing to reach (timm MViTv2: a KeyError); the outer owner rewrites both."""
    nodes = sc.by_name
    merged = True
    while merged:
        merged = False
        for full, o in sorted(owners.items(), key=lambda kv: kv[1].path.count(".") if kv[1].path else -1):
            touched = {nodes[n] for site, _m, _a in o.edits for n in (site.node, site.user) if n is not None}
            for inner_full, inner in list(owners.items()):
                if inner is o or SWAP in (o.key, inner.key) or not (o.key is ROOT or _inside(inner.path, o.path)):
                    continue
                if inner.key is not ROOT and touched & sc.members(inner.key):
                    log.debug("owner %r takes the edits of %r, inside which one of its edits lies",
                              full or "the root", inner_full)
                    o.edits.extend(inner.edits)
                    del owners[inner_full]
                    merged = True
            if merged:
                break
    return owners


def _install(root: nn.Module, path: str, module: nn.Module, aliased: set[int]) -> nn.Module:
    """Put `module` at `path` in `root` (surgery's own copy); returns the root (`module` itself for path ''). A module
    the tree holds under several names (`self.encoder = self.backbone`; `aliased`: their ids) is replaced under
    every one of them, so the names keep naming one module."""
    if not path:
        return module
    parent, _, name = path.rpartition(".")
    holder = root.get_submodule(parent) if parent else root
    old = holder._modules[name]
    holder._modules[name] = module
    if id(old) in aliased:
        for other, key in [(m, k) for m in root.modules() for k, c in m._modules.items() if c is old]:
            other._modules[key] = module
    return root


def _aliased(root: nn.Module) -> set[int]:
    """The ids of the modules `root` holds under more than one name."""
    seen: set[int] = set()
    twice: set[int] = set()
    for m in root.modules():
        for c in m._modules.values():
            if c is not None:
                (twice if id(c) in seen else seen).add(id(c))
    return twice


def _arity(module: nn.Module) -> int:
    from surgeon.surgery.rewrite import arg_indices

    return len(arg_indices(module, 2))


def _below(paths: set[str], outer: str) -> set[str]:
    """`paths` inside `outer`, relative to it."""
    return {p[len(outer) + 1:] if outer else p for p in paths if _inside(p, outer)}


def _inside(path: str, outer: str) -> bool:
    return path != outer and (not outer or path.startswith(outer + "."))


def _fresh(gm: fx.GraphModule) -> fx.GraphModule:
    """A GraphModule with its own copy of the graph (a cached trace may serve several owners' checks)."""
    return _LazyGraphModule(gm, copy_graph(gm), class_name=gm.__class__.__name__)  # its code is written once, when edited
