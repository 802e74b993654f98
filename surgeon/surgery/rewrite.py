"""Rewrite: insert one built module at a site of a traced graph, and the surgery record's accessors.

`insert` adds a call to the module after the site's node (rewiring every user, or only the site's
`user`), or in place of the node for 'replace' sites. Which graph it goes into, under which name, and
what becomes of the replaced nodes is `surgery.scope`'s job.
"""
from __future__ import annotations

import inspect
import logging
from typing import Any

import torch.fx as fx
from torch import nn

from surgeon import record as _record
from surgeon.errors import InternalError
from surgeon.surgery.sites import Site

log = logging.getLogger("surgeon")

RECORD_ATTR = _record.ATTR


def _positional_arity(module: nn.Module) -> int:
    params = inspect.signature(module.forward).parameters.values()
    if any(p.kind is inspect.Parameter.VAR_POSITIONAL for p in params):
        return 1 << 30
    return sum(p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) for p in params)


def arg_indices(module: nn.Module, available: int) -> list[int]:
    """Which of a 'replace' site's args the module receives: the indices it names in `site_args` (e.g. one
    of several candidate gating signals), else the first ones, as many as its forward takes."""
    picks = getattr(module, "site_args", None)
    if picks is not None:
        return list(picks)
    return list(range(min(available, _positional_arity(module))))


def insert(gm: fx.GraphModule, site: Site, module: nn.Module, attention: str,
           replaced: dict[str, fx.Node] | None, path: str) -> str:
    """Insert `module` at `site` in `gm` (without recompiling). Returns its path relative to gm.

    `replaced` maps node names to the nodes that took their place in earlier edits of the same graph,
    so edits at neighbouring sites chain (a pool replaced, then the mean after it replaced too).
    `path`: where to attach the module in gm.
    """
    replaced = {} if replaced is None else replaced
    nodes = {n.name: n for n in gm.graph.nodes}
    if site.node not in nodes:
        raise InternalError(f"Site {site.name!r}: node {site.node!r} is not in the graph (was it already edited?)")

    def resolve(name: str) -> fx.Node:
        return replaced.get(name, nodes[name])

    node = resolve(site.node)
    module._surgeon_leaf = True  # stays one call when the model is traced again
    module.train(gm.training)  # the mode of the module it goes into (built in the model's: a frozen stage differs)
    gm.add_submodule(path, module)
    if site.action == "insert":
        with gm.graph.inserting_after(node):
            new = gm.graph.call_module(path, (node,))
        if site.user is not None:
            resolve(site.user).replace_input_with(node, new)
        else:
            node.replace_all_uses_with(new, delete_user_cb=lambda u: u is not new)
            replaced[site.node] = new
    elif site.action == "replace":
        args = tuple(resolve(site.args[i]) for i in arg_indices(module, len(site.args)))
        user = resolve(site.user) if site.user is not None else None
        # with a `user`, only that use is replaced, and the call goes just before it: the module may read
        # nodes computed after `node` (a skip connection gated by a decoder feature)
        with gm.graph.inserting_before(user) if user is not None else gm.graph.inserting_after(node):
            new = gm.graph.call_module(path, args)
        if user is not None:
            user.replace_input_with(node, new)
        else:
            node.replace_all_uses_with(new, delete_user_cb=lambda u: u is not new)
            replaced[site.node] = new
    else:
        raise InternalError(f"Site {site.name!r}: unknown action {site.action!r}")
    new.meta["surgeon_site"] = site.name
    log.debug("site %s: %s inserted as %s", site.name, attention, path)
    return path


def record(model: nn.Module) -> dict[str, Any]:
    """The surgery record of a model as its JSON-like dict (see `surgeon.record`); created when missing."""
    return _record.ensure(model)


def edits_of(model: nn.Module) -> list[dict[str, Any]]:
    """The edits recorded on a patched model, as dicts ([] for a plain model); `surgeon.edits` for the typed form."""
    return [e.to_dict() for e in _record.edits(model)]
