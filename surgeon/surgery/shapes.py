"""Shape propagation: the tensor shape at every node of every traced graph, without real compute.

Runs the model once and records each node's output shape in `node.meta["shape"]` (a torch.Size, a tuple
of them for tuple outputs, or None). Graphs nested in Python modules (piecewise traces) are reached
through forward pre-hooks. Each run is tried on meta tensors first (`meta`: shapes only, whatever the
input size); a model whose forward needs values runs under a FakeTensorMode when it is big (no activation
memory) and on real CPU tensors when it is small or an operator has no fake implementation.
"""
from __future__ import annotations

import collections
import logging
from typing import Any

import torch
import torch.fx as fx
from torch.fx.immutable_collections import immutable_dict, immutable_list

from surgeon.errors import ShapeError, TraceError
from surgeon.surgery import calls, meta, verify
from surgeon.surgery.owned import attr_at, in_mode, structural_copy
from surgeon.surgery.trace import Traced
from surgeon.surgery.verify import tensors

log = logging.getLogger("surgeon")


def _shape_of(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return tuple(value.shape)
    if isinstance(value, (tuple, list)):
        return tuple(_shape_of(v) for v in value)
    return None


def _dtype_of(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.dtype
    if isinstance(value, (tuple, list)):
        return tuple(_dtype_of(v) for v in value)
    return None


def _mutable(a: Any) -> Any:
    """`a` with fx's immutable lists and dicts (a node's arguments) made plain ones, at any depth; any other value
    (a dict subclass such as a ModelOutput) as it is."""
    if type(a) in (immutable_list, list):
        return [_mutable(x) for x in a]
    if type(a) in (immutable_dict, dict):
        return {k: _mutable(v) for k, v in a.items()}
    if type(a) is tuple:
        return tuple(_mutable(x) for x in a)
    return a


class _Recorder(fx.Interpreter):
    def run(self, *args, initial_env=None, **kwargs):
        for n, value in (initial_env or {}).items():  # the inputs, bound by the forward's signature
            n.meta["shape"], n.meta["dtype"] = _shape_of(value), _dtype_of(value)
        return super().run(*args, initial_env=initial_env, **kwargs)

    def call_function(self, target, args, kwargs):
        # the generated code builds a list argument anew at each call; the interpreter would hand over the node's
        # own (immutable) one, which a function that fills it in (torchvision's `_get_window_and_shift_size`) fails on
        return super().call_function(target, _mutable(args), _mutable(kwargs))

    def run_node(self, n: fx.Node) -> Any:
        result = super().run_node(n)
        n.meta["shape"] = _shape_of(result)
        n.meta["dtype"] = _dtype_of(result)
        if type(result) in (int, bool):  # a size or flag computed in the graph (see matching.match)
            n.meta["surgeon_scalar"] = result
        return result


class _InPlace(_Recorder):
    """Runs a module's graph in place of its forward. Modules and attributes are read from the running model's
    module, not from the copy the graph was traced on, so graphs inside it (kept-whole children) run in place
    too; what tracing added to that copy (modularised dropouts, tensors a forward makes) is read from the graph's
    own GraphModule."""

    def __init__(self, module: torch.nn.Module, gm: fx.GraphModule):
        super().__init__(module, graph=gm.graph)
        self._traced = gm

    def fetch_attr(self, target: str) -> Any:
        try:
            return attr_at(self.module, target)
        except AttributeError:
            return attr_at(self._traced, target)


def _run(traced: Traced, inputs: tuple) -> None:
    """One forward of the traced model recording every graph's shapes. The modules traced piecewise run their
    graphs in place of their forwards (the graph is what their forward computes for this call), so each runs
    once; should that fail (a module called in ways its graph was not traced for), the forward runs again
    with each graph recorded beside its module's own forward (on real or fake tensors: on meta tensors the
    failure goes to `propagate`, which runs on those next)."""
    try:
        _run_once(traced, inputs, graphs_run=True)
    except Exception as exc:  # noqa: BLE001 - retried the slower, plainer way; its failure propagates
        if any(x.is_meta for x in tensors(inputs)):  # most likely an op needing values: `propagate` moves on
            raise
        log.debug("shapes: graphs in place of their modules failed (%s: %s); running both", type(exc).__name__, exc)
        _run_once(traced, inputs, graphs_run=False)


def _run_once(traced: Traced, inputs: tuple, *, graphs_run: bool) -> None:
    handles, replaced = [], []
    for path, gm in traced.graphs.items():
        if gm is traced.module:
            continue
        module = traced.module.get_submodule(path)
        if graphs_run:
            def forward(*args, gm=gm, module=module, **kwargs):
                return _InPlace(module, gm).run(initial_env=calls.bind(gm, args, kwargs))
            replaced.append((module, module.__dict__.get("forward", _ABSENT)))
            module.__dict__["forward"] = forward
        else:
            def pre_hook(mod, args, kwargs, gm=gm):
                _Recorder(gm).run(initial_env=calls.bind(gm, args, kwargs))
            handles.append(module.register_forward_pre_hook(pre_hook, with_kwargs=True))
    try:
        with torch.no_grad():
            if isinstance(traced.module, fx.GraphModule):
                _Recorder(traced.module).run(initial_env=calls.bind(traced.module, inputs, {}))
            else:
                traced.module(*inputs)
    finally:
        for h in handles:
            h.remove()
        for module, own in reversed(replaced):
            if own is _ABSENT:
                del module.__dict__["forward"]
            else:
                module.__dict__["forward"] = own


_ABSENT = object()


# Below this many parameters a real CPU forward (no grad) is faster than fake tensors and its
# activations are small; above it, fake tensors keep big models from allocating anything.
SMALL_MODEL_PARAMS = 50_000_000


class _UseReal(Exception):
    pass


def propagate(traced: Traced, example_inputs: tuple, *, model: torch.nn.Module | None = None) -> None:
    """Record shapes on every node of every graph in `traced` (traced from `model`, which errors name).

    Raises:
        ShapeError: when the example input does not go through the model.
        TraceError: when the traced model fails on the example input, and `model` itself runs on it.
    """
    from torch._subclasses.fake_tensor import FakeTensorMode

    small = sum(p.numel() for p in traced.module.parameters()) <= SMALL_MODEL_PARAMS
    with in_mode(traced.module, False):
        try:
            meta.run([traced.module, *traced.graphs.values()], lambda *xs: _run(traced, xs), *example_inputs)
            return
        except meta.NeedsValues as exc:
            log.debug("shapes: not on meta tensors (%s)", exc)
        try:
            if small:  # real tensors are faster here and cost little memory
                raise _UseReal
            mode = FakeTensorMode(allow_non_fake_inputs=True)
            with mode, meta.ShapeOnly():
                fake = tuple(mode.from_tensor(x) if isinstance(x, torch.Tensor) else x for x in example_inputs)
                _run(traced, fake)
            return
        except _UseReal:
            pass
        except Exception as exc:  # an op without a fake kernel: real tensors are exact, only slower
            log.debug("shapes: fake tensors failed (%s: %s); using real CPU tensors", type(exc).__name__, exc)
        try:
            _run(traced, example_inputs)
        except Exception as exc:
            if model is not None and _runs(model, example_inputs):  # the graphs compute something else
                name = type(model).__name__
                raise TraceError(
                    f"The traced {name} fails on the example input {_shapes(example_inputs)}, which {name} itself "
                    f"runs ({_said(exc)}): a graph differs from the model's code there (a decision tracing could "
                    "not see); please report it with the model") from exc
            raise _wrong_input(traced.module if model is None else model, example_inputs, exc) from exc


def shape(node: fx.Node) -> tuple | None:
    """The recorded output shape of a node when it is one tensor, else None."""
    s = node.meta.get("shape")
    if isinstance(s, tuple) and all(isinstance(d, int) for d in s):
        return s
    return None


def _runs(model: torch.nn.Module, inputs: tuple) -> bool:
    """Whether a structural copy of `model` runs on `inputs` (eval mode, no grad)."""
    copy = structural_copy(model)
    try:
        with torch.no_grad(), in_mode(copy, False):
            copy(*inputs)
    except Exception:  # noqa: BLE001 - any failure: the input does not go through the model
        return False
    return True


def _shapes(inputs: tuple) -> str:
    return ", ".join(str(tuple(x.shape)) for x in tensors(inputs)) or "(no tensors)"


def _said(exc: Exception) -> str:
    """`Type: its message's first non-blank line`."""
    first = next((line.strip() for line in str(exc).splitlines() if line.strip()), "")
    return f"{type(exc).__name__}: {first}"


def _wrong_input(model: torch.nn.Module, inputs: tuple, exc: Exception) -> ShapeError:
    shapes, said = _shapes(inputs), _said(exc)
    mixed = _devices_held(model)
    if mixed:
        return ShapeError(f"{type(model).__name__} holds tensors on several devices ({mixed}) and does not run so "
                          f"({said}): put them on one device first (model.to_empty(device=...) "
                          "for a model built without weights; accelerate's init_empty_weights(include_buffers=True))")
    if any(x.is_meta for x in tensors(inputs)):
        return ShapeError(f"{type(model).__name__} on the meta device does not run on the example input "
                          f"{shapes} ({said}): "
                          "pass the input it takes, or build it on the CPU if its forward needs tensor values")
    return ShapeError(
        f"The example input {shapes} does not go through {type(model).__name__} "
        f"({said}). Pass the input the model takes: --input-size C,H,W on the "
        f"command line, example_input= in Python")


def _devices_held(model: torch.nn.Module) -> str:
    """Where the model's parameters and buffers are, when on more than one device: "parameters on meta; buffers on
    cpu ('rope.periods')", naming up to three tensors of each minority device; else ""."""
    where: dict[tuple[str, str], list[str]] = {}
    for kind, named in (("parameters", model.named_parameters()), ("buffers", model.named_buffers())):
        for name, t in named:
            where.setdefault((kind, t.device.type), []).append(name)
    per_device = collections.Counter()
    for (_, device), names in where.items():
        per_device[device] += len(names)
    if len(per_device) < 2:
        return ""
    most = per_device.most_common(1)[0][0]
    parts = []
    for (kind, device), names in where.items():
        named = ", ".join(map(repr, names[:3])) + (", ..." if len(names) > 3 else "")
        parts.append(f"{kind} on {device}" + ("" if device == most else f" ({named})"))
    return "; ".join(parts)


def record_calls(model: torch.nn.Module, inputs: tuple, *, count_flops: bool = False) -> calls.Recorded:
    """How `model` calls each of its modules on `inputs` (see `calls.record`): one forward in eval mode, no grad,
    fake tensors for big models as in `propagate`. With `count_flops`, when that forward runs on meta tensors, it
    also counts the model's FLOPs per sample at the size of `inputs` (`Recorded.flops`, as `verify.counted`; a
    quarter more time): verification on smaller images reports them without another forward at this size.

    Raises:
        ShapeError: when the example input does not go through the model.
    """
    flops: list[int | None] = []
    try:
        recorded = calls.record(model, lambda m: module_outputs(m, inputs, [], flops=flops if count_flops else None))
    except Exception as exc:
        raise _wrong_input(model, inputs, exc) from exc
    recorded.flops = flops[0] if flops else None
    return recorded


def module_outputs(model: torch.nn.Module, inputs: tuple, paths: list[str],
                   flops: list[int | None] | None = None) -> dict[str, tuple]:
    """The output shape of each module at `paths` in one forward of `model` (eval mode; on meta tensors, fake ones
    for big models as in `propagate`, or real ones). `flops`, when given, gets the FLOPs per sample of a forward on
    meta tensors (None when they could not be summed; nothing when the forward needed other tensors)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    got: dict[str, tuple] = {}
    handles = []
    for p in paths:
        def hook(_m, _args, out, p=p):
            if isinstance(out, torch.Tensor):
                got[p] = tuple(out.shape)
        handles.append(model.get_submodule(p).register_forward_hook(hook))
    try:
        with torch.no_grad(), in_mode(model, False):
            try:
                counted = meta.run([model], lambda *xs: verify.counted(model, xs, flops is not None)[1], *inputs)
                if flops is not None:
                    flops.append(counted)
                return got
            except meta.NeedsValues as exc:
                log.debug("shapes: not on meta tensors (%s)", exc)
                got.clear()
            try:
                if sum(p.numel() for p in model.parameters()) <= SMALL_MODEL_PARAMS:
                    raise _UseReal
                mode = FakeTensorMode(allow_non_fake_inputs=True)
                with mode, meta.ShapeOnly():
                    model(*(mode.from_tensor(x) if isinstance(x, torch.Tensor) else x for x in inputs))
            except Exception as exc:  # small model, or an op without a fake kernel (nonzero): real tensors
                if not isinstance(exc, _UseReal):
                    log.debug("shapes: fake tensors failed (%s); using real CPU tensors", type(exc).__name__)
                got.clear()
                # with autograd on, as when tracing: torch's fused inference paths (a TransformerEncoder given a
                # padding mask packs its sequences into nested tensors) run only without it, and tracing never
                # takes them
                with torch.enable_grad():
                    model(*inputs)
    finally:
        for h in handles:
            h.remove()
    return got
