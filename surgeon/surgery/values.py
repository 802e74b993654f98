"""Tracing that knows the shapes: every node of a graph being traced also gets its value on fake tensors
(shapes and dtypes, no data), computed from the recorded call's inputs (see calls.py).

Plain fx cannot take a decision on a traced value: `if x.shape[1] != self.num_channels: raise`,
`(*x.shape[:-1], -1, d)` or `len(x.shape)` stop the trace. With values known, a decision on sizes, dtypes
or other non-tensor results is taken as the real call takes it (the graph is then for those sizes, as
every surgeon graph already is for its example's layout); a decision on tensor data still stops the trace.
"""
from __future__ import annotations

import logging
import operator
from typing import Any

import torch
import torch.fx as fx

from surgeon.surgery import calls, meta
from surgeon.surgery.calls import Opaque, Packed, Size, Slot

log = logging.getLogger("surgeon")

_MISSING = object()
_DECIDABLE = (bool, int, float, str, type(None), torch.dtype, torch.device, torch.Size)


# Python's augmented assignments (`x += y`), which fx's own Proxy records as `x + y`: a new tensor where the
# model's code changed one in place. Recorded as themselves, the generated code writes `x += y` again, so a
# rewritten forward allocates what the original did, and a `+=` on a tensor that other names still hold
# changes it for them too.
IN_PLACE_OPERATORS = {getattr(operator, f"i{op}") for op in (
    "add", "sub", "mul", "truediv", "floordiv", "mod", "pow", "and", "or", "xor", "lshift", "rshift")}


def _augmented(op):
    def method(self, other):
        return self.tracer.create_proxy("call_function", op, (self, other), {})
    method.__name__ = f"__{op.__name__}__"
    return method


class ValueProxy(fx.Proxy):
    """A Proxy whose length is known when its value is, and which records `x += y` as itself."""

    def __len__(self) -> int:
        value = self.tracer.value(self.node)
        if isinstance(value, (tuple, list, dict, torch.Size)):
            return len(value)
        return super().__len__()


for _op in IN_PLACE_OPERATORS:
    setattr(ValueProxy, f"__{_op.__name__}__", _augmented(_op))


def _where() -> str:
    """The model's line being traced (the innermost frame outside torch and surgeon), as `file:line (code)`."""
    import traceback

    for frame in reversed(traceback.extract_stack()[:-2]):
        if "/torch/" not in frame.filename and "/surgeon/surgery/" not in frame.filename:
            name = frame.filename.rsplit("/", 1)[-1]
            return f"`{frame.line}` ({name}:{frame.lineno})" if frame.line else f"{name}:{frame.lineno}"
    return "a decision of its code"


class ValueTracing:
    """Mixin for an fx.Tracer: `values=True` computes each node's value on fake tensors while tracing."""

    values = False
    _computing = False
    _fake_mode = None

    def value(self, node: fx.Node) -> Any:
        """The node's value on fake tensors, or _MISSING when it is not known."""
        if not self.values:
            return _MISSING
        if "surgeon_value" not in node.meta:
            node.meta["surgeon_value"] = self._compute(node)
        return node.meta["surgeon_value"]

    def _mode(self):
        if self._fake_mode is None:
            from torch._subclasses.fake_tensor import FakeTensorMode

            self._fake_mode = FakeTensorMode(allow_non_fake_inputs=True)
        return self._fake_mode

    def _example(self, value: Any) -> Any:
        if isinstance(value, Slot):
            with self._mode():
                return torch.empty(value.shape, dtype=value.dtype)
        if isinstance(value, Size):
            return value.value
        if isinstance(value, Opaque):
            return _MISSING  # no object to compute with: decisions on it stop the trace
        if isinstance(value, Packed):
            items = [self._example(v) for v in value.items]
            return _MISSING if any(i is _MISSING for i in items) else (items if value.kind == "list" else tuple(items))
        if isinstance(value, tuple):
            return tuple(self._example(v) for v in value)
        if isinstance(value, dict):
            return {k: self._example(v) for k, v in value.items()}
        return value

    def _compute(self, node: fx.Node) -> Any:
        if node.op == "placeholder":
            return self._example(node.meta.get("surgeon_example", _MISSING))
        missing = []

        def val(a):
            v = self.value(a)
            if v is _MISSING:
                missing.append(a)
            return v

        args = fx.node.map_arg(node.args, val)
        kwargs = fx.node.map_arg(node.kwargs, val)
        if missing:
            return _MISSING
        self._computing = True
        try:
            with self._mode(), meta.ShapeOnly(), torch.no_grad():  # shapes only: the cheap kernels will do
                if node.op == "get_attr":
                    obj = self.root
                    for part in node.target.split("."):
                        obj = getattr(obj, part)
                    return obj
                if node.op == "call_function":
                    return node.target(*args, **kwargs)
                if node.op == "call_method":
                    return getattr(args[0], node.target)(*args[1:], **kwargs)
                if node.op == "call_module":
                    return self.root.get_submodule(node.target).forward(*args, **kwargs)
        except Exception as exc:  # noqa: BLE001 - a value that cannot be computed is simply not known
            log.debug("trace: no value for %s (%s: %s)", node.name, type(exc).__name__, exc)
        finally:
            self._computing = False
        return _MISSING

    # -- fx.Tracer overrides --------------------------------------------------------------------------
    def proxy(self, node: fx.Node) -> fx.Proxy:
        return ValueProxy(node, self)

    def to_bool(self, obj: fx.Proxy) -> bool:
        value = self.value(obj.node)
        if isinstance(value, _DECIDABLE):
            # the graph holds the branch taken; a guard fails any call that would take the other (a padding
            # decided by the size, at another size)
            guard = self.create_proxy("call_function", calls.expect_decision,
                                      (obj, bool(value), _where(), type(self.root).__name__), {})
            guard.node.meta["surgeon_guard"] = True
            return bool(value)
        return super().to_bool(obj)

    def iter(self, obj: fx.Proxy):
        value = self.value(obj.node)
        if isinstance(value, (tuple, list, torch.Size)):
            return iter([obj[i] for i in range(len(value))])
        return super().iter(obj)

    def keys(self, obj: fx.Proxy):
        value = self.value(obj.node)
        if isinstance(value, dict):
            return value.keys()
        return super().keys(obj)

    def getattr(self, attr: str, attr_val: Any, parameter_proxy_cache: dict[str, Any]):
        if self._computing:  # computing a value: parameters are themselves, not graph nodes
            return attr_val
        return super().getattr(attr, attr_val, parameter_proxy_cache)

    def call_module(self, m, forward, args, kwargs):
        if self._computing:  # computing a value: run the module (without hooks), record nothing
            return m.forward(*args, **kwargs)
        return super().call_module(m, forward, args, kwargs)


__all__ = ["IN_PLACE_OPERATORS", "ValueProxy", "ValueTracing"]
