"""Arguments a forward only hands on, which may come either way: a cache that may be None, a flag.

A forward is traced for the call it got (see `calls.py`): an object argument is checked for its class at every
call and a flag for its value. A Hugging Face decoder block gets the model's cache and `use_cache=True` when the
model generates, and None and False when it trains with gradient checkpointing, and does nothing with either but
pass them to its attention. Such an argument is found by tracing the forward again with the other value (None
for an object, the other value of a flag): when the two graphs differ only where the argument is handed on,
the forward takes both, and its check is widened to both (a flag becomes a graph input where it is handed on).
A forward that decides on the argument (`if cache is not None:`, `if use_cache:`) gives another graph, and
keeps its check.
"""
from __future__ import annotations

import inspect
from typing import Any, Callable

import torch.fx as fx

from surgeon.surgery import calls
from surgeon.surgery.owned import computed_tensor

_MISMATCH = object()


def widen(graph: fx.Graph, fn, call: calls.Call, retrace: Callable[[calls.Call], fx.Graph | None]) -> fx.Graph:
    """`graph` (traced from `fn`, a forward, for `call`) with the checks of the arguments it only hands on widened
    to their other value; `retrace(call)` traces the same forward for another call (None when that fails)."""
    for check in [n for n in graph.nodes if _candidate(n)]:
        ph, value, name = check.args[0], check.args[1], check.args[2]
        other = _with(fn, call, name, None if check.target is calls.expect_class else not value)
        if other is None:
            continue
        alt = retrace(other)
        spots = None if alt is None else _differences(graph, alt, ph)
        if spots is None:
            continue
        if check.target is calls.expect_class:
            check.kwargs = {**check.kwargs, "none_ok": True}
        else:  # the flag is the graph input it was, wherever it is handed on
            check.target, check.args = calls.expect_flag, (ph, name, check.args[3])
            for node, where in spots:
                _put(node, where, ph)
    return graph


def _candidate(n: fx.Node) -> bool:
    """A check of a named argument that is an object (its class) or a flag (its value)."""
    if n.op != "call_function" or n.target not in (calls.expect, calls.expect_class) or not n.meta.get("surgeon_call"):
        return False
    ph = n.args[0]
    if not isinstance(ph, fx.Node) or ph.op != "placeholder" or ph.target != n.args[2]:
        return False
    return n.target is calls.expect_class or type(n.args[1]) is bool


def _with(fn, call: calls.Call, name: str, value: Any) -> calls.Call | None:
    """`call` with argument `name` set to `value` (None when the call did not pass it: its default was used)."""
    try:
        params = list(inspect.signature(inspect.unwrap(fn)).parameters)[1:]
    except (TypeError, ValueError):
        return None
    if name in call.kwargs:
        return calls.Call(call.args, {**call.kwargs, name: value})
    i = params.index(name) if name in params else len(call.args)
    if i < len(call.args):
        return calls.Call((*call.args[:i], value, *call.args[i + 1:]), call.kwargs)
    return None


def _differences(a: fx.Graph, b: fx.Graph, ph: fx.Node) -> list | None:
    """Where graph `b` (the argument at its other value) differs from `a`: the places (node, position) where `a`
    hands on the argument (the placeholder `ph` itself, or the flag's value) and `b` its other value; None when the
    graphs differ anywhere else. The argument's own checks are not compared."""
    mine, theirs = list(a.nodes), list(b.nodes)
    if len(mine) != len(theirs) or any(bool(m.meta.get("surgeon_call")) != bool(t.meta.get("surgeon_call"))
                                       for m, t in zip(mine, theirs)):
        return None
    pair = dict(zip(mine, theirs))
    spots: list = []
    for m, t in pair.items():
        if m.meta.get("surgeon_call"):  # the checks of the call's arguments, this one's among them
            continue
        if m.op != t.op or not _same_target(m, t):
            return None
        for where in ("args", "kwargs"):
            found = _compare(getattr(m, where), getattr(t, where), pair, ph, ())
            if found is _MISMATCH:
                return None
            spots.extend((m, (where, *path)) for path in found)
    return spots


def _same_target(m: fx.Node, t: fx.Node) -> bool:
    if computed_tensor(m):
        return computed_tensor(t)  # named per trace
    return m.target == t.target


def _compare(x: Any, y: Any, pair: dict, ph: fx.Node, path: tuple):
    """The paths within x where x hands on the argument and y has its other value; _MISMATCH elsewhere."""
    if isinstance(x, fx.Node):
        if x is ph and not isinstance(y, fx.Node):
            return [path] if y is None else _MISMATCH  # an object handed on; None in the other trace
        return [] if isinstance(y, fx.Node) and pair.get(x) is y else _MISMATCH
    if type(x) is bool and type(y) is bool and x is not y:
        return [path]  # a flag's value handed on (only this argument's flips between the two traces)
    if isinstance(x, (tuple, list)):
        if type(x) is not type(y) or len(x) != len(y):
            return _MISMATCH
        out = []
        for i, (u, v) in enumerate(zip(x, y)):
            found = _compare(u, v, pair, ph, (*path, i))
            if found is _MISMATCH:
                return _MISMATCH
            out.extend(found)
        return out
    if isinstance(x, dict):
        if not isinstance(y, dict) or list(x) != list(y):
            return _MISMATCH
        out = []
        for k in x:
            found = _compare(x[k], y[k], pair, ph, (*path, k))
            if found is _MISMATCH:
                return _MISMATCH
            out.extend(found)
        return out
    if isinstance(y, fx.Node):
        return _MISMATCH
    try:
        return [] if type(x) is type(y) and bool(x == y) else _MISMATCH
    except Exception:  # noqa: BLE001 - values that do not compare (tensors): different
        return _MISMATCH


def _put(node: fx.Node, where: tuple, value: fx.Node) -> None:
    """Set the argument of `node` at `where` (("args" or "kwargs", index or key, ...)) to `value`."""
    def rebuilt(x, path):
        if not path:
            return value
        head, rest = path[0], path[1:]
        if isinstance(x, dict):
            return {k: rebuilt(v, rest) if k == head else v for k, v in x.items()}
        items = [rebuilt(v, rest) if i == head else v for i, v in enumerate(x)]
        return type(x)(items)
    if where[0] == "args":
        node.args = rebuilt(node.args, where[1:])
    else:
        node.kwargs = rebuilt(node.kwargs, where[1:])


__all__ = ["widen"]
