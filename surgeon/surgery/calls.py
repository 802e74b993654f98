"""How each module is called, so that a module is traced for the call it actually gets.

fx traces a forward from its signature alone: every parameter becomes a graph input, whatever the caller
passes. For code written against real calls that fails or goes wrong: `if output_hidden_states:` on an
input, `forward(self, *args, **kwargs)` wrappers (Hugging Face's decorators), `mask=None` defaults taking
the `is not None` branch. So surgery first runs the model once with the example input and records, for
every module, the arguments of its call: tensors become the graph's inputs, everything else (None,
flags, sizes, strings) is a constant the trace follows, exactly as the real call did.

A forward traced this way keeps the module's own signature, and checks at every call that those
constants are still what they were: a call the graph was not traced for fails loudly, naming the argument,
instead of computing something else.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
from torch.fx._lazy_graph_module import _LazyGraphModule
from torch import nn
from torch.fx.immutable_collections import immutable_list

from surgeon.errors import CallError

_SIMPLE = (type(None), bool, int, float, str, torch.dtype, torch.device)


@dataclass(frozen=True)
class Slot:
    """A tensor argument of a recorded call: an input of the traced graph."""

    shape: tuple[int, ...]
    dtype: torch.dtype


@dataclass(frozen=True)
class Size:
    """A size argument of a recorded call: an int, or a tuple or list of ints (`height, width`, `feat_size`). A
    forward that only computes with it (reshapes, pads, loops by it) is traced with it as a graph input, so the
    rewritten forward takes any size as the original does; one that decides on it (`if H % window:`) is traced
    for this value, as for any constant."""

    value: Any

    @property
    def structure(self) -> tuple:
        """(type name,) for an int, (type name, length) for a tuple, list or torch.Size: what each call must pass."""
        v = self.value
        return ("int",) if type(v) is int else (_SIZE_NAMES[type(v)], len(v))


# the kinds of size a call may pass (fx's interpreter passes a list written in a graph as its immutable_list)
_SIZE_NAMES = {int: "int", tuple: "tuple", list: "list", immutable_list: "list", torch.Size: "torch.Size"}


def _kind(value: Any) -> str | None:
    """'tuple' or 'list' for a plain tuple or list (fx's interpreter passes a list as its immutable_list), else
    None (a named tuple is not taken apart: its fields are read by name)."""
    if type(value) is tuple:
        return "tuple"
    return "list" if type(value) in (list, immutable_list) else None


@dataclass(frozen=True)
class Opaque:
    """An object argument that is neither a tensor nor a constant (a Hugging Face cache): a graph input that the
    forward may hand on to the modules it calls or call methods of, checked for its class at every call. While
    tracing it passes `isinstance` checks as an instance of that class."""

    cls: str  # module-qualified class name (node arguments cannot hold classes)
    type_: type = field(compare=False, repr=False, default=object)

    @staticmethod
    def of(value: Any) -> Opaque:
        return Opaque(_qualname(type(value)), type(value))


def _qualname(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


_TYPED: dict[type, type] = {}


def typed(proxy: fx.Proxy, cls: type) -> fx.Proxy:
    """`proxy`, seen by `isinstance` (through `__class__`) as an instance of `cls`: code that checks the class of an
    argument (`isinstance(past_key_values, Cache)`) takes the branch the real object takes."""
    base = type(proxy)
    if base not in _TYPED:
        _TYPED[base] = type(f"Typed{base.__name__}", (base,), {
            "__class__": property(lambda self: self.__dict__["_surgeon_class"])})
    proxy.__class__ = _TYPED[base]
    proxy.__dict__["_surgeon_class"] = cls
    return proxy


def _opaque(value: Any) -> bool:
    """An object a trace can take as an input: not a tensor or a container (whose tensors it would not see), not a
    module or a function (code the trace would have to look into)."""
    return not isinstance(value, (torch.Tensor, tuple, list, dict, set, nn.Module)) and not callable(value) \
        and not _constant(value)


@dataclass(frozen=True)
class Packed:
    """A tuple or list of tensors (and constants) in a recorded call (Llama's `position_embeddings=(cos, sin)`):
    one graph input whose items the forward gets one by one, as its caller's graph has them."""

    kind: str  # "tuple" or "list"
    items: tuple


def _size(value: Any) -> bool:
    if type(value) is int:
        return True
    return (type(value) is torch.Size or _kind(value) is not None) and len(value) > 0 \
        and all(type(v) is int for v in value)


def _constant(value: Any) -> bool:
    if isinstance(value, _SIMPLE):
        return True
    return isinstance(value, (tuple, list)) and all(_constant(v) for v in value)


def _describe(value: Any) -> Any:
    """A tensor as a Slot, a size as a Size, a constant as itself, an object as Opaque, a tuple or list holding
    tensors as Packed; anything else (a dict of tensors, a module, a function) cannot be described."""
    if isinstance(value, torch.Tensor):
        return Slot(tuple(value.shape), value.dtype)
    if _size(value):
        return Size(value)
    if _constant(value):
        return value
    if _opaque(value):
        return Opaque.of(value)
    if _kind(value) is not None and value and _packs_tensors(value):
        return Packed(_kind(value), tuple(_describe(v) for v in value))
    raise _NotSpecialisable


class _NotSpecialisable(Exception):
    pass


@dataclass
class Call:
    """The arguments one module was called with: Slots for tensors, and Sizes, constants, Opaque objects and
    Packed tuples for the rest (see `_describe`)."""

    args: tuple
    kwargs: dict[str, Any]

    @property
    def has_sizes(self) -> bool:
        return any(isinstance(v, Size) for v in (*self.args, *self.kwargs.values()))

    @staticmethod
    def of(args: tuple, kwargs: dict[str, Any]) -> Call | None:
        try:
            return Call(tuple(_describe(a) for a in args), {k: _describe(v) for k, v in kwargs.items()})
        except _NotSpecialisable:
            return None

    def same(self, other: Call) -> bool:
        """Whether two calls give the same graph: the same constants and the same tensor positions."""
        def key(v):
            if isinstance(v, Slot):
                return "tensor", v.dtype, len(v.shape)
            if isinstance(v, Opaque):
                return "object", v.cls
            if isinstance(v, Packed):
                return "packed", v.kind, tuple(key(i) for i in v.items)
            return ("size", type(v.value), v.value) if isinstance(v, Size) else ("const", type(v), v)
        return ([key(a) for a in self.args] == [key(a) for a in other.args]
                and {k: key(v) for k, v in self.kwargs.items()} == {k: key(v) for k, v in other.kwargs.items()})


@dataclass
class Recorded:
    """What one forward showed of how each module is called."""

    calls: dict[str, Call]  # {path: its call} where a trace can follow it (see `record`)
    returns_packed: set[str]  # paths of modules returning something other than one tensor (a list of features)
    takes_packed: set[str]  # paths of modules given tensors inside a list, tuple or dict
    # FLOPs per sample of that forward (see `shapes.record_calls`), or None when they were not counted
    flops: int | None = None


def _packs_tensors(value: Any) -> bool:
    if isinstance(value, (tuple, list)):
        return any(isinstance(v, torch.Tensor) or _packs_tensors(v) for v in value)
    if isinstance(value, dict):
        return _packs_tensors(list(value.values()))
    return False


def record(model: nn.Module, run) -> Recorded:
    """How `run(model)` calls each module: the call of every module called with arguments a trace can follow
    (tensors and constants), and with the same constants every time; and which modules take or return
    tensors packed in containers. A module traced alone gets a proxy where its caller passes a list (timm
    SelecSLS's `[x, skip]`), so it cannot stand in for its real calls; a graph keeping a call whole that
    returns a list cannot take one tensor of it as a site's value."""
    calls: dict[str, Call | None] = {}
    returns: set[str] = set()
    takes: set[str] = set()
    handles = []
    for path, m in model.named_modules(remove_duplicate=False):
        def pre_hook(_m, args, kwargs, path=path):
            call = Call.of(args, kwargs)
            if path not in calls:
                calls[path] = call
            elif calls[path] is not None and (call is None or not calls[path].same(call)):
                calls[path] = None  # called in different ways: traced for its signature, as plain fx does
            if any(_packs_tensors(a) and (call is None or _kind(a) != "tuple") for a in (*args, *kwargs.values())):
                # (a tuple described item by item gives the trace its items, see `Packed`; a list stays a reason
                # not to trace the module alone: blocks passing `[x, skip]` along test `isinstance(x, list)`,
                # which the list a kept-whole block returns fails while tracing)
                takes.add(path)

        def hook(_m, _args, out, path=path):
            if not isinstance(out, torch.Tensor):
                returns.add(path)
        handles.append(m.register_forward_pre_hook(pre_hook, with_kwargs=True, prepend=True))
        handles.append(m.register_forward_hook(hook))
    try:
        run(model)
    finally:
        for h in handles:
            h.remove()
    return Recorded({p: c for p, c in calls.items() if c is not None}, returns, takes)


# -- the checks a specialised forward makes at every call ---------------------------------------------
@fx.node.has_side_effect
def expect(value: Any, expected: Any, name: str, owner: str) -> None:
    """Fail when a traced argument is not the constant the graph was traced for."""
    if value is expected or (type(value) is type(expected) and value == expected):
        return
    raise CallError(
        f"{owner}.forward was rewritten by surgeon for calls with {name}={expected!r}, and was called with "
        f"{name}={_short(value)}. Patch the model with an example input that calls it this way")


# Keyword arguments a library documents as reaching only its loss functions, which stay the user's code:
# a rewritten forward that passed **kwargs on may receive them (Hugging Face's Trainer adds
# `num_items_in_batch` to every call of a model that takes **kwargs)
LOSS_ONLY_KWARGS = frozenset({"num_items_in_batch"})
# Hugging Face's output-selection flags, which transformers hands down to every layer through **kwargs when a
# caller passes them (`generate` passes both, False, to an encoder's layers): False asks a layer for what the
# flag's absence does (its outputs are captured by hooks at the model, or not at all), so a rewritten forward
# traced without them takes them at False; True still fails the call, naming them
FALSE_AS_ABSENT_KWARGS = frozenset({"output_attentions", "output_hidden_states"})


@fx.node.has_side_effect
def expect_size(value: Any, structure: tuple, name: str, owner: str) -> None:
    """Fail when a size argument traced as a graph input is not of the kind it was traced for: an int, or a tuple
    (list) of as many ints."""
    if _SIZE_NAMES.get(type(value)) == structure[0] and (type(value) is int or len(value) == structure[1] and all(
            type(v) is int for v in value)):
        return
    kind = "an int" if structure[0] == "int" else f"a {structure[0]} of {structure[1]} ints"
    raise CallError(
        f"{owner}.forward was rewritten by surgeon for calls with {name} {kind}, and was called with "
        f"{name}={_short(value)}. Patch the model with an example input that calls it this way")


@fx.node.has_side_effect
def expect_class(value: Any, cls: str, name: str, owner: str, none_ok: bool = False) -> None:
    """Fail when an object argument (see `Opaque`) is not of the class the graph was traced for (or None, where
    the forward only hands it on: see `passing.py`)."""
    if _qualname(type(value)) != cls and not (none_ok and value is None):
        kind = f"a {cls.rsplit('.', 1)[-1]}" + (" or None" if none_ok else "")
        raise CallError(
            f"{owner}.forward was rewritten by surgeon for calls with {name} {kind}, and was "
            f"called with {name}={_short(value)}. Patch the model with an example input that calls it this way")


@fx.node.has_side_effect
def expect_flag(value: Any, name: str, owner: str) -> None:
    """Fail when a flag the forward only hands on (see `passing.py`) is not a bool."""
    if type(value) is not bool:
        raise CallError(
            f"{owner}.forward was rewritten by surgeon for calls with {name} True or False, and was called with "
            f"{name}={_short(value)}. Patch the model with an example input that calls it this way")


@fx.node.has_side_effect
def expect_packed(value: Any, kind: str, n: int, name: str, owner: str) -> None:
    """Fail when a packed argument (see `Packed`) is not a tuple (list) of as many items as traced."""
    if _kind(value) != kind or len(value) != n:
        raise CallError(
            f"{owner}.forward was rewritten by surgeon for calls with {name} a {kind} of {n} items, and was "
            f"called with {name}={_short(value)}. Patch the model with an example input that calls it this way")


@fx.node.has_side_effect
def expect_decision(value: Any, taken: bool, where: str, owner: str) -> None:
    """Fail when a decision the trace took on a size or dtype (see values.py) goes the other way on this call."""
    if bool(value) is not taken:
        raise CallError(
            f"{owner}.forward was rewritten by surgeon for inputs on which {where} is {taken}, and on this call it "
            f"is {not taken}. Patch the model with an example input of this size")


@fx.node.has_side_effect
def expect_keys(kwargs: dict, constants: dict, tensors: tuple, owner: str) -> None:
    """Fail when **kwargs differ from the call the graph was traced for."""
    ignored = LOSS_ONLY_KWARGS | {k for k in FALSE_AS_ABSENT_KWARGS if kwargs.get(k, True) is False}
    if set(kwargs) - (ignored - set(constants) - set(tensors)) != set(constants) | set(tensors):
        raise CallError(
            f"{owner}.forward was rewritten by surgeon for calls with keyword arguments "
            f"{sorted(set(constants) | set(tensors))}, and was called with {sorted(kwargs)}. Patch the model "
            f"with an example input that calls it this way")
    for k, v in constants.items():
        expect(kwargs[k], v, k, owner)


@fx.node.has_side_effect
def expect_len(args: tuple, n: int, owner: str) -> None:
    """Fail when *args has another length than in the call the graph was traced for."""
    if len(args) != n:
        raise CallError(f"{owner}.forward was rewritten by surgeon for calls with {n} extra positional "
                           f"arguments, and was called with {len(args)}")


def _short(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f"a tensor of shape {tuple(value.shape)}"
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _literal(value: Any) -> bool:
    """Whether fx can write the value as a default in generated code."""
    return isinstance(value, (type(None), bool, int, float, str)) or (
        isinstance(value, tuple) and all(_literal(v) for v in value))


def placeholders(tracer: fx.Tracer, fn, call: Call, owner: str, *, sizes: bool = False) -> tuple[list, dict] | None:
    """Create the graph inputs of `fn` (a forward, self first) for `call`: one placeholder per parameter of
    its signature, with a check per constant. Returns the (args, kwargs) to call `fn` with (after self), or
    None when the signature cannot be followed (then the forward is traced as plain fx does).

    With `sizes`, size arguments (see `Size`) are graph inputs too, checked for their kind at every call; the
    forward gets an int as the placeholder itself and a tuple or list as one of its items each (so that
    `H, W = size`, `size[0]` and `*size` trace). Without, they are constants like the rest."""
    try:
        sig = inspect.signature(inspect.unwrap(fn))
        params = list(sig.parameters.values())[1:]  # without self
        bound = inspect.Signature(params).bind(*call.args, **call.kwargs)
    except (TypeError, ValueError):
        return None
    if any(p.default is not p.empty and not _literal(p.default) for p in params):
        return None
    bound.apply_defaults()
    args: list = []
    kwargs: dict[str, Any] = {}

    def boundary(proxy):
        proxy.node.meta["surgeon_call"] = True
        return proxy

    def value(name: str, v: Any, ph):
        if isinstance(v, Slot):
            return ph
        if isinstance(v, Size) and sizes:
            boundary(tracer.create_proxy("call_function", expect_size, (ph, v.structure, name, owner), {}))
            if type(v.value) is int:
                return ph
            items = [boundary(ph[i]) for i in range(len(v.value))]  # each item is one input, as in the caller's graph
            return items if _kind(v.value) == "list" else tuple(items)  # a torch.Size cannot hold proxies
        if isinstance(v, Size):
            v = v.value
        if isinstance(v, Opaque):
            boundary(tracer.create_proxy("call_function", expect_class, (ph, v.cls, name, owner), {}))
            return typed(ph, v.type_)
        if isinstance(v, Packed):
            boundary(tracer.create_proxy("call_function", expect_packed, (ph, v.kind, len(v.items), name, owner), {}))
            items = [value(f"{name}[{i}]", item, boundary(ph[i])) for i, item in enumerate(v.items)]
            return items if v.kind == "list" else tuple(items)
        boundary(tracer.create_proxy("call_function", expect, (ph, v, name, owner), {}))
        return v

    phs = {}
    for p in params:  # every input first, as fx's own graphs have them
        star = "*" if p.kind is p.VAR_POSITIONAL else "**" if p.kind is p.VAR_KEYWORD else ""
        default = () if star or p.default is p.empty else (p.default,)
        phs[p.name] = tracer.create_proxy("placeholder", star + p.name, default, {})
        phs[p.name].node.meta["surgeon_example"] = bound.arguments[p.name]  # for values.py
    for p in params:
        v, ph = bound.arguments[p.name], phs[p.name]
        if p.kind is p.VAR_POSITIONAL:
            boundary(tracer.create_proxy("call_function", expect_len, (ph, len(v), owner), {}))
            args.extend(value(f"{p.name}[{i}]", item, boundary(ph[i])) for i, item in enumerate(v))
        elif p.kind is p.VAR_KEYWORD:
            inputs = {k: x for k, x in v.items()
                      if isinstance(x, (Slot, Opaque, Packed)) or isinstance(x, Size) and sizes}
            consts = {k: x.value if isinstance(x, Size) else x for k, x in v.items() if k not in inputs}
            boundary(tracer.create_proxy("call_function", expect_keys, (ph, consts, tuple(inputs), owner), {}))
            kwargs.update((k, value(f"{p.name}[{k!r}]", x, boundary(ph[k])) if k in inputs else consts[k])
                          for k, x in v.items())
        else:
            got = value(p.name, v, ph)
            # passed as the recorded call passed it (decorators read positions and names); an argument
            # the call left out is left out, so the forward takes its own default
            if p.kind is not p.KEYWORD_ONLY and len(args) < len(call.args):
                args.append(got)
            elif p.name in call.kwargs:
                kwargs[p.name] = got
    return args, kwargs


def bind(gm: fx.GraphModule, args: tuple, kwargs: dict[str, Any]) -> dict[fx.Node, Any]:
    """The value of each placeholder of `gm` for a call with `args` and `kwargs`."""
    bound = _signature(gm).bind(*args, **kwargs)
    bound.apply_defaults()
    return {n: bound.arguments[n.target.lstrip("*")] for n in gm.graph.nodes if n.op == "placeholder"}


def _signature(gm: fx.GraphModule) -> inspect.Signature:
    """The signature of gm's forward; for a lazy GraphModule that has not written its code yet, the one fx's code
    would have, from the placeholders (`x`, `y=None`, `*args`, keyword-only ones after it, `**kwargs`), so that
    binding a call does not make it write its code."""
    if not (isinstance(gm, _LazyGraphModule) and gm._needs_recompile() and type(gm.graph._codegen) is fx.graph.CodeGen):
        return inspect.signature(gm.forward)
    p = inspect.Parameter
    params, kind = [], p.POSITIONAL_OR_KEYWORD
    for n in gm.graph.find_nodes(op="placeholder"):
        if n.target.startswith("**"):
            params.append(p(n.target[2:], p.VAR_KEYWORD))
        elif n.target.startswith("*"):
            params.append(p(n.target[1:], p.VAR_POSITIONAL))
            kind = p.KEYWORD_ONLY
        else:
            params.append(p(n.target, kind, default=n.args[0] if n.args else p.empty))
    return inspect.Signature(params)


__all__ = ["Call", "Opaque", "Packed", "Size", "Slot", "bind", "record", "placeholders"]
