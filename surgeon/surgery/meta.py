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

import contextlib
import copy
import operator
from typing import Any, Callable, Iterable, Iterator

import torch
import torch.nn.functional as F
from torch import nn
from torch._subclasses.fake_tensor import FakeTensor
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
            "hooks": {k: dict(v) for k in _HOOKS if isinstance(v := d.get(k), dict) and v},
            "meta": _meta_ids(d)}


@contextlib.contextmanager
def put_back(model: nn.Module) -> Iterator[None]:
    """What the block stores on `model`'s modules (see `snapshot`: a forward's cached tensors, a lazily set
    attribute) is undone after it."""
    stored = [(m, snapshot(m)) for m in model.modules()]
    try:
        yield
    finally:
        for m, before in stored:
            undo(m, before)


def undo(m: nn.Module, before: dict[str, Any]) -> bool:
    """Restore what the run changed on `m`; whether anything had changed."""
    # entries compared in order (a table only reordered counts as changed, and is put back as it was)
    d, attrs = m.__dict__, before["attrs"]
    changed = d.keys() != attrs.keys() or not all(map(operator.is_, d.values(), attrs.values()))
    for s in _STORES:
        store = d.get(s)
        if store is not None and (store.keys() != before[s].keys()
                                  or not all(map(operator.is_, store.values(), before[s].values()))):
            changed = True
            store.clear()
            store.update(before[s])
    for k in _HOOKS:
        # hooks a forward registers on itself (transformers' output capturing, installed at the first call under
        # a flag on the model): undone with the flag, or the next forward would register them a second time
        now, saved = d.get(k), before["hooks"].get(k)
        if isinstance(now, dict) and (now.keys() != saved.keys() if saved else bool(now)):
            changed = True
            now.clear()
            now.update(saved or {})
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


_HOOKS = (*HOOK_TABLES, *FLAG_TABLES)
_ATOMS = frozenset((bool, int, float, str, type(None)))
# a module's own tables: the stores are compared entry by entry in `undo`, and the rest hold hooks and names
_TABLES = frozenset((*_STORES, "_non_persistent_buffers_set", *HOOK_TABLES, *FLAG_TABLES))


def _meta_ids(d: dict) -> set[int]:
    """The ids of the meta tensors among `d`'s values (but a module's own tables) and one level into its
    containers: a model built on the meta device holds them from the start, and a run that stores new ones
    changed the module."""
    ids = set()
    for k, v in d.items():
        if k in _TABLES or type(v) in _ATOMS:  # (most of a module's entries: skipped first, this runs per module)
            continue
        if isinstance(v, torch.Tensor):
            if v.is_meta:
                ids.add(id(v))
        elif isinstance(v, (dict, list, tuple, set)) and v:
            for t in v.values() if isinstance(v, dict) else v:
                if isinstance(t, torch.Tensor) and t.is_meta:
                    ids.add(id(t))
    return ids


def _meta(t: torch.Tensor) -> torch.Tensor:
    empty = torch.empty_like(t, device="meta")
    return nn.Parameter(empty, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) else empty


def _to_meta(value: Any) -> Any:
    return pytree.tree_map(lambda v: _meta(v) if isinstance(v, torch.Tensor) else v, value)


def _no_values(t: Any) -> bool:
    """A tensor with a shape and no values: on the meta device, or a fake tensor (FakeTensorMode)."""
    return isinstance(t, torch.Tensor) and (t.is_meta or isinstance(t, FakeTensor))


def _only_input_grad(x: torch.Tensor, args: tuple, kwargs: dict) -> bool:
    """Whether the result requires grad exactly when `x` does: no other tensor argument (a norm's affine weight)
    would make it require grad where `x` does not."""
    return x.requires_grad or not torch.is_grad_enabled() or not any(
        isinstance(a, torch.Tensor) and a.requires_grad for a in (*args, *kwargs.values()))


def _batch_norm(x: torch.Tensor, *args, **kwargs):
    return x.clone() if _only_input_grad(x, args, kwargs) else NotImplemented  # in the input's layout


def _norm(x: torch.Tensor, *args, **kwargs):
    if not _only_input_grad(x, args, kwargs):
        return NotImplemented
    return x.clone(memory_format=torch.contiguous_format)


def _dense(x: torch.Tensor) -> bool:
    return x.is_contiguous() or x.is_contiguous(memory_format=torch.channels_last)


def _elementwise(inplace_at: int | None):
    """A same-shape activation: a copy of its input (an in-place one returns its input, after an in-place op that
    checks what real in-place ops check). `inplace_at`: the position of its `inplace` argument."""
    def fast(x: torch.Tensor, *args, **kwargs):
        if not x.is_floating_point() or not _dense(x):
            return NotImplemented
        inplace = kwargs.get("inplace", args[inplace_at - 1] if inplace_at and len(args) >= inplace_at else False)
        return x.mul_(1) if inplace else x.clone()
    return fast


def _arithmetic(x: torch.Tensor, other: Any = None, *args, **kwargs):
    """x ∘ other where the result is a copy of x: a number, or a tensor of x's dtype that broadcasts into x's
    shape (x laid out densely in a standard order, which then decides the result's layout)."""
    if not x.is_floating_point() or not _dense(x):
        return NotImplemented
    if isinstance(other, torch.Tensor):
        if other.dtype != x.dtype or other.device != x.device \
                or other.dim() > x.dim() or (other.requires_grad and not x.requires_grad) \
                or any(o != 1 and o != s for o, s in zip(reversed(other.shape), reversed(x.shape))):
            return NotImplemented
    elif not isinstance(other, (int, float)):
        return NotImplemented
    return x.clone()


def _mean(x: torch.Tensor, *args, **kwargs):
    # the same reduction's shape and dtype: torch.sum takes mean's arguments
    return torch.sum(x, *args, **kwargs) if x.is_floating_point() else NotImplemented


def _linear(x: torch.Tensor, weight: Any = None, bias: Any = None):
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2 or weight.dtype != x.dtype or x.dim() == 0 \
            or (bias is not None and (not isinstance(bias, torch.Tensor) or bias.shape != weight.shape[:1]
                                      or bias.dtype != x.dtype
                                      or bias.requires_grad and not (x.requires_grad or weight.requires_grad))):
        return NotImplemented
    return torch.matmul(x, weight.t())


def _attention(q: torch.Tensor, k: Any = None, v: Any = None, attn_mask: Any = None, *args, **kwargs):
    if attn_mask is not None or kwargs.get("enable_gqa") \
            or not isinstance(k, torch.Tensor) or not isinstance(v, torch.Tensor) or q.dim() < 2 \
            or not (q.dtype == k.dtype == v.dtype) or not (q.shape[:-2] == k.shape[:-2] == v.shape[:-2]) \
            or q.shape[-1] != k.shape[-1] or k.shape[-2] != v.shape[-2]:
        return NotImplemented
    return torch.matmul(torch.matmul(q, k.transpose(-2, -1)), v)


_INTERPOLATED = {"linear": 3, "bilinear": 4, "bicubic": 4, "trilinear": 5}


def _interpolate(x: torch.Tensor, size: Any = None, scale_factor: Any = None, mode: str = "nearest",
                 align_corners: Any = None, recompute_scale_factor: Any = None, antialias: bool = False):
    # the output size is worked out in F.interpolate alike for every mode; "nearest" has a fast meta kernel
    if _INTERPOLATED.get(mode) != x.dim():
        return NotImplemented
    return F.interpolate(x, size, scale_factor, "nearest", None, recompute_scale_factor)


def _fast_functions() -> dict:
    import inspect

    table: dict = {F.batch_norm: _batch_norm, torch.batch_norm: _batch_norm, **dict.fromkeys(
        (F.layer_norm, torch.layer_norm, F.group_norm, torch.group_norm, F.instance_norm, torch.instance_norm), _norm)}
    for f in (F.relu, F.relu6, F.hardswish, F.hardsigmoid, F.hardtanh, F.silu, F.mish, F.gelu, F.elu, F.selu,
              F.celu, F.leaky_relu, F.softplus, F.logsigmoid):
        try:
            params = list(inspect.signature(f).parameters)
        except ValueError:  # a builtin (gelu, softplus, logsigmoid): no inplace argument
            params = []
        table[f] = _elementwise(params.index("inplace") if "inplace" in params else None)
    for f in (torch.relu, torch.sigmoid, torch.tanh, torch.Tensor.relu, torch.Tensor.sigmoid, torch.Tensor.tanh):
        table[f] = _elementwise(None)
    for name in ("add", "sub", "mul", "div", "__add__", "__radd__", "__sub__", "__rsub__", "__mul__", "__rmul__",
                 "__truediv__", "__rtruediv__"):
        table[getattr(torch.Tensor, name)] = _arithmetic
        if hasattr(torch, name):
            table[getattr(torch, name)] = _arithmetic
    table.update({torch.mean: _mean, torch.Tensor.mean: _mean, F.linear: _linear,
                  F.scaled_dot_product_attention: _attention, F.interpolate: _interpolate})
    return table


class ShapeOnly(TorchFunctionMode):
    """Functions whose meta kernels are Python decompositions, computed by cheaper functions that give the same
    shape, dtype, layout and autograd flags (a meta run needs nothing else): norms, activations and arithmetic
    that keep their input's shape give a copy of it, a mean the sum, attention two matrix products, smooth
    upsampling the nearest one. Their meta kernels cost more than a real CPU forward of a small network: batch
    norm 40 of a ResNet's 57 ms, hardswish 0.9 ms a call (30 of MobileNetV3's 46 ms), bilinear upsampling 3.5 ms
    a call (fake tensors run the same kernels, more slowly). Anything these cannot vouch for runs as itself."""

    _FAST = _fast_functions()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        fast = self._FAST.get(func)
        if fast is not None and args and _no_values(args[0]) and "out" not in kwargs:
            out = fast(*args, **kwargs)
            if out is not NotImplemented:
                return out
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
        with torch.device("meta"), ShapeOnly():
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
