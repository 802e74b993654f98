"""Shape-only forwards on meta tensors: every shape, dtype and module call of a run, and no value.

Surgery needs a model's shapes and how its modules are called, never the values. With the parameters,
buffers and inputs swapped for meta tensors (and factory calls defaulting to the meta device) a forward
computes exactly those, at a fraction of a real forward's cost and whatever the input size. Anything that
needs values (`.item()`, `if x.sum() > 0`, `nonzero`, a CPU tensor meeting a meta one) raises on meta
tensors, and the caller then runs on real tensors. So does a forward that stores new state on a module (a
lazily computed scale or cache): that state would hold meta tensors, so every such change is undone and
the run counts as failed.
"""
from __future__ import annotations

import copy
from typing import Any, Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils import _pytree as pytree

from surgeon.surgery.owned import FLAG_TABLES, HOOK_TABLES


class NeedsValues(Exception):
    """The run needs real tensors: an op needed values, or the forward stored state on a module."""


_STORES = ("_parameters", "_buffers", "_modules")
_CONTAINERS = (list, dict, set)


def _modules(roots: Iterable[nn.Module]) -> list[nn.Module]:
    seen: dict[int, nn.Module] = {}
    for root in roots:
        for m in root.modules():
            seen.setdefault(id(m), m)
    return list(seen.values())


def snapshot(m: nn.Module) -> dict[str, Any]:
    """What a forward could change on `m`: its attributes, the entries of its stores, its hooks, and the
    sizes of container attributes (a cache filled in place)."""
    d = m.__dict__
    return {"attrs": dict(d), **{s: dict(d.get(s) or {}) for s in _STORES},
            "contents": {k: copy.copy(v) for k, v in d.items() if type(v) in _CONTAINERS and k not in _STORES},
            "meta": _meta_ids(d)}


def undo(m: nn.Module, before: dict[str, Any]) -> bool:
    """Restore what the run changed on `m`; whether anything had changed."""
    d = m.__dict__
    changed = d.keys() != before["attrs"].keys() or any(d[k] is not v for k, v in before["attrs"].items())
    for s in _STORES:
        store = d.get(s)
        if store is not None and (store.keys() != before[s].keys()
                                  or any(store[k] is not v for k, v in before[s].items())):
            changed = True
            store.clear()
            store.update(before[s])
    for k, saved in before["contents"].items():  # containers filled or emptied in place
        now = before["attrs"][k]
        if len(now) != len(saved) or _meta_ids({0: now}) - before["meta"]:
            changed = True
            now.clear()
            (now.extend if isinstance(now, list) else now.update)(saved)
    changed = changed or bool(_meta_ids(d) - before["meta"])
    if changed:
        for k in list(d):
            if k not in before["attrs"]:
                del d[k]
        d.update(before["attrs"])
    return changed


# a module's own tables: the stores are compared entry by entry in `undo`, and the rest hold hooks and names
_TABLES = frozenset((*_STORES, "_non_persistent_buffers_set", *HOOK_TABLES, *FLAG_TABLES))


def _meta_ids(d: dict) -> set[int]:
    """The ids of the meta tensors among `d`'s values (but a module's own tables) and one level into its
    containers: a model built on the meta device holds them from the start, and a run that stores new ones
    changed the module."""
    ids = set()
    for k, v in d.items():
        if k in _TABLES:
            continue
        items = v.values() if isinstance(v, dict) else v if isinstance(v, (list, tuple, set)) else (v,)
        ids.update(id(t) for t in items if isinstance(t, torch.Tensor) and t.is_meta)
    return ids


def _meta(t: torch.Tensor) -> torch.Tensor:
    empty = torch.empty_like(t, device="meta")
    return nn.Parameter(empty, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) else empty


def _to_meta(value: Any) -> Any:
    return pytree.tree_map(lambda v: _meta(v) if isinstance(v, torch.Tensor) else v, value)


class _ShapeOnlyNorms(TorchFunctionMode):
    """Norms on meta tensors return an empty tensor of their input's shape directly: their meta kernels are
    Python decompositions that cost more than the rest of a ResNet's shape-only forward (batch norm: 40 of
    its 57 ms)."""

    _NORMS = {F.batch_norm, torch.batch_norm, F.layer_norm, torch.layer_norm, F.group_norm, torch.group_norm,
              F.instance_norm, torch.instance_norm}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in self._NORMS and isinstance(args[0], torch.Tensor) and args[0].is_meta:
            return torch.empty_like(args[0], requires_grad=args[0].requires_grad)
        return func(*args, **kwargs)


def run(roots: Iterable[nn.Module], fn: Callable[..., Any], *args: Any) -> Any:
    """`fn(*args)` with the tensors of `args` and every parameter and buffer of the modules under `roots`
    on the meta device; the modules are exactly as before afterwards.

    Raises:
        NeedsValues: the run needed real values, or stored state on a module (undone).
    """
    modules = _modules(roots)
    before = [snapshot(m) for m in modules]
    swapped = []
    try:
        for m in modules:
            for store in (m._parameters, m._buffers):
                for k, t in store.items():
                    if t is not None:
                        swapped.append((store, k, t))
                        store[k] = _meta(t)
        with torch.device("meta"), _ShapeOnlyNorms():
            result = fn(*_to_meta(args))
    except Exception as exc:  # noqa: BLE001 - any failure on meta tensors means: run on real ones
        failure: Exception | None = exc
    else:
        failure = None
    finally:
        for store, k, t in swapped:
            store[k] = t
        changed = [type(m).__name__ for m, b in zip(modules, before) if undo(m, b)]
    if failure is not None:
        raise NeedsValues(f"{type(failure).__name__}: {str(failure).splitlines()[0] if str(failure) else ''}") \
            from failure
    if changed:
        raise NeedsValues(f"the forward stored state on {', '.join(sorted(set(changed)))}")
    return result
