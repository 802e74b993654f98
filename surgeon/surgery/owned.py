"""The modules scoped surgery puts in a model: each rewritten owner is an instance of a subclass of the
user's own class that carries the new forward (one class per user class and source, so it pickles and
deep-copies by that pair); a `Sequential` keeps its indexing; a stateless layer is replaced outright.
The patched model itself is a structural copy of the user's: its own modules and attributes, the user's
parameter and buffer tensors and hook functions.
"""
from __future__ import annotations

import contextlib
import copy
import itertools
from collections import OrderedDict
from typing import Iterator

import torch
import torch.fx as fx
from torch import nn


HOOK_TABLES = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks",
               "_state_dict_hooks", "_load_state_dict_pre_hooks", "_load_state_dict_post_hooks",
               "_state_dict_pre_hooks")  # a module's tables of hook functions
FLAG_TABLES = ("_forward_hooks_with_kwargs", "_forward_hooks_always_called", "_forward_pre_hooks_with_kwargs")


def structural_copy(module: nn.Module, *, keep_hooks: bool = False) -> nn.Module:
    """A deep copy of the module tree that shares every parameter and buffer with the original (and, with
    `keep_hooks`, the very hook functions, so hooks that write into the user's objects keep doing so)."""
    memo: dict[int, object] = {}
    for t in itertools.chain(module.parameters(), module.buffers()):
        memo[id(t)] = t
    if keep_hooks:
        for m in module.modules():
            for attr in HOOK_TABLES:
                for fn in (m.__dict__.get(attr) or {}).values():
                    memo[id(fn)] = fn
    return _copy_module(module, memo)


_PLAIN: dict[type, bool] = {}


def _plain(cls: type) -> bool:
    """Whether `copy.deepcopy` would copy instances of `cls` as nn.Module does (a new instance whose
    `__setstate__` gets a deep copy of its __dict__ but a compiled call), so that `_copy_module` may do the
    same without the generic reduce machinery."""
    if cls not in _PLAIN:
        _PLAIN[cls] = (getattr(cls, "__deepcopy__", None) is None
                       and cls.__reduce_ex__ in (object.__reduce_ex__, _reduce)
                       and cls.__reduce__ is object.__reduce__
                       and cls.__getstate__ is nn.Module.__getstate__)
    return _PLAIN[cls]


_SHARED_TABLES = ("_parameters", "_buffers")  # their tensors are in the memo: the table's copy shares them
_ATOMIC = (bool, int, float, str, type(None))  # kept as they are, as deepcopy keeps them


def _copy_module(module: nn.Module, memo: dict[int, object]) -> nn.Module:
    """`copy.deepcopy(module, memo)`, with the tables every module has copied directly: a tree of a few hundred
    modules holds thousands of (mostly empty) hook and parameter tables, and the generic path reduces and
    rebuilds each of them."""
    if id(module) in memo:
        return memo[id(module)]
    cls = type(module)
    if not _plain(cls):
        return copy.deepcopy(module, memo)
    new = cls.__new__(cls)
    memo[id(module)] = new
    state = {}
    for k, v in module.__dict__.items():
        if k == "_compiled_call_impl":
            continue
        if type(v) in _ATOMIC or type(v) is tuple and all(type(e) in _ATOMIC for e in v):
            state[k] = v
        elif id(v) in memo:  # an object the tree holds twice stays one object in the copy
            state[k] = memo[id(v)]
        elif k == "_modules" and type(v) in (dict, OrderedDict):
            state[k] = memo[id(v)] = type(v)((n, None if c is None else _copy_module(c, memo)) for n, c in v.items())
        elif type(v) in (dict, OrderedDict) and (not v or k in _SHARED_TABLES and all(
                t is None or id(t) in memo for t in v.values())):
            state[k] = memo[id(v)] = type(v)((n, None if t is None else memo[id(t)]) for n, t in v.items())
        elif type(v) is set and all(type(e) is str for e in v):  # the non-persistent buffers' names
            state[k] = memo[id(v)] = set(v)
        elif isinstance(v, torch.Tensor) and not v.is_leaf:
            # computed from parameters and stored as a plain attribute (torch.nn.utils.prune's `weight`, which its
            # pre-hook recomputes from `weight_orig` and the mask before every forward): deepcopy refuses tensors
            # with a history, and like the parameters it is computed from, the copy shares it
            state[k] = v
        else:
            state[k] = copy.deepcopy(v, memo)
    new.__setstate__(state)
    return new


_TABLES = frozenset(HOOK_TABLES + FLAG_TABLES)
_SMALL = 8  # buffers and tensors up to this many elements count by value (code may branch on them)


def fingerprint(module: nn.Module) -> tuple:
    """What tracing `module` can depend on, as one hashable value: the classes of the whole tree, every attribute
    (numbers, strings, flags, sizes; tensors by shape and dtype, buffers and tensor attributes also by value
    when small), the hook functions, and which modules the tree holds twice. Two modules with equal fingerprints trace to the same graph (for the same
    call and leaves); any object it cannot look into counts by identity, so it errs towards "different"."""
    seen: dict[int, int] = {}
    return _module_print(module, seen)


def _module_print(module: nn.Module, seen: dict[int, int]) -> tuple:
    if id(module) in seen:  # held twice: fx names it by its first path
        return ("alias", seen[id(module)])
    seen[id(module)] = len(seen)
    parts: list = [type(module)]
    for k, v in module.__dict__.items():
        if k == "_modules":
            parts.append((k, tuple((n, None if c is None else _module_print(c, seen)) for n, c in v.items())))
        elif k in _SHARED_TABLES:  # parameters count by shape (tracing never reads their values), buffers also
            # by value when small (code may branch on them)
            parts.append((k, tuple((n, None if t is None else _tensor_print(t, k == "_buffers"))
                                   for n, t in v.items())))
        elif k in _TABLES:
            parts.append((k, tuple(map(id, v.values())) if isinstance(v, dict) else _value_print(v, seen)))
        else:
            parts.append((k, _value_print(v, seen)))
    return tuple(parts)


def _tensor_print(t: torch.Tensor, values: bool = True) -> tuple:
    key = (type(t), tuple(t.shape), t.dtype, t.device, t.requires_grad, t.layout)
    if values and t.numel() <= _SMALL and t.device.type != "meta" and t.layout == torch.strided:
        return key + (tuple(t.detach().reshape(-1).tolist()),)
    return key


def _value_print(v: object, seen: dict[int, int]) -> object:
    if type(v) in _ATOMIC:
        return (type(v), v)
    if type(v) in (tuple, list, torch.Size):
        return (type(v), tuple(_value_print(e, seen) for e in v))
    if type(v) in (dict, OrderedDict) and all(type(k) in _ATOMIC for k in v):
        return (type(v), tuple((k, _value_print(e, seen)) for k, e in v.items()))
    if type(v) in (set, frozenset) and all(type(e) in _ATOMIC for e in v):
        return (type(v), tuple(sorted(map(repr, v))))
    if isinstance(v, (torch.dtype, torch.device, torch.memory_format, torch.layout)):
        return v
    if isinstance(v, torch.Tensor):
        return _tensor_print(v)
    if isinstance(v, nn.Module):
        return _module_print(v, seen)
    return ("object", id(v))


CONSTANT = "_tensor_constant"  # fx stores the tensors a forward makes on the traced module, named so


def computed_tensor(n: fx.Node) -> bool:
    """Whether `n` reads a tensor the trace computed and stored (`_tensor_constant0`: named per trace)."""
    return n.op == "get_attr" and str(n.target).rpartition(".")[2].startswith(CONSTANT)


def join_path(prefix: str, path: str) -> str:
    """`prefix.path`, either of which may be "" (the root)."""
    return f"{prefix}.{path}" if prefix and path else (prefix or path)


def attr_at(root: object, target: str) -> object:
    """The attribute at a dotted path (`layer1.0.conv1`, `_tensor_constant0`); AttributeError when missing."""
    for part in target.split("."):
        root = getattr(root, part)
    return root


def set_mode(module: nn.Module, training: bool, modules: list[nn.Module] | None = None) -> None:
    """`module.train(training)`; trees whose classes keep nn.Module's `train` get their flags set directly, without
    a `__setattr__` per module (`modules`: the tree's modules, when the caller has them)."""
    modules = list(module.modules()) if modules is None else modules
    if all(type(m).train is nn.Module.train for m in modules):
        for m in modules:
            m.__dict__["training"] = training
    else:
        module.train(training)


@contextlib.contextmanager
def in_mode(module: nn.Module, training: bool) -> Iterator[nn.Module]:
    """`set_mode(module, training)` within the block, and every module's own flag put back after it (a frozen
    norm in eval mode inside a training model stays so)."""
    modules = list(module.modules())
    saved = [m.__dict__.get("training") for m in modules]  # not `m.training`: tracing may be noting reads
    set_mode(module, training, modules)
    try:
        yield module
    finally:
        for m, flag in zip(modules, saved):
            if flag is not None:
                m.__dict__["training"] = flag


class ModeCall(nn.Module):
    """A call of a function that takes the mode as an argument, `drop_connect(x, p, training=self.training)` in
    EfficientNet's blocks as smp and efficientnet_pytorch write them: tracing records the call with the flag it
    had, and this module makes the call with its own flag, so the graph follows train()/eval() as the code did."""

    def __init__(self, fn):
        super().__init__()
        self.fn = fn
        self._surgeon_leaf = True

    def forward(self, *args, **kwargs):
        return self.fn(*args, **kwargs, training=self.training)

    def extra_repr(self) -> str:
        return f"{self.fn.__module__}.{self.fn.__qualname__}"


class LeafReplacement(nn.Module):
    """Takes the place of a stateless leaf module: runs `original` and hands its output to `attn`
    beside the input (for modules that start as the identity of the original's output)."""

    def __init__(self, original: nn.Module, attn: nn.Module):
        super().__init__()
        self.original = original
        self.attn = attn
        self._surgeon_leaf = True

    def forward(self, x):
        return self.attn(x, self.original(x))


def _filtered(self) -> list[tuple[str, nn.Module]]:
    added = self.__dict__.get("_surgeon_added", ())
    return [(k, m) for k, m in self._modules.items() if k not in added]


def _seq_iter(self):
    return iter(m for _, m in _filtered(self))


def _seq_len(self) -> int:
    return len(_filtered(self))


def _seq_getitem(self, idx):
    items = _filtered(self)
    if isinstance(idx, slice):
        return nn.Sequential(OrderedDict(items[idx]))
    return items[idx][1]


_CLASSES: dict[tuple[type, str], type] = {}


def patched_class(cls: type, source: str, compiled) -> type:
    """A subclass of the user's class `cls` whose forward is compiled from `source` (which pickling keeps);
    containers keep their indexing. One class per (user's class, source): `compiled()` gives the forward
    and is called only for a new pair (the repeated blocks of a stage share their class and its code)."""
    base = cls.__dict__.get("_surgeon_base", cls)
    key = (base, source)
    if key not in _CLASSES:
        ns = {"forward": compiled(), "__module__": base.__module__, "__qualname__": base.__qualname__,
              "_surgeon_base": base, "_surgeon_source": source, "__doc__": base.__doc__,
              "__reduce_ex__": _reduce}
        if issubclass(base, nn.Sequential):  # iteration and indexing see the user's layers only
            ns.update(__iter__=_seq_iter, __len__=_seq_len, __getitem__=_seq_getitem)
        _CLASSES[key] = type(base.__name__, (base,), ns)
    return _CLASSES[key]


def _reduce(self, protocol):
    """Pickle and deepcopy a rewritten module by its user's class and its forward's source (the class itself
    is made at run time and cannot be found by name)."""
    return _rebuild, (type(self)._surgeon_base, type(self)._surgeon_source), dict(self.__dict__)


def _rebuild(base: type, source: str) -> nn.Module:
    from torch.fx.graph_module import _forward_from_src

    key = (base, source)
    cls = _CLASSES.get(key) or patched_class(base, source, lambda: _forward_from_src(source, {}))
    return cls.__new__(cls)


def shallow_copy(module: nn.Module) -> nn.Module:
    """A copy sharing parameters, buffers, children and hooks, whose own tables can change independently."""
    new = copy.copy(module)
    for attr in ("_modules", "_parameters", "_buffers", *HOOK_TABLES, *FLAG_TABLES):
        if attr in module.__dict__:
            new.__dict__[attr] = copy.copy(module.__dict__[attr])
    for attr in ("_surgeon_added",):
        if attr in module.__dict__:
            new.__dict__[attr] = set(module.__dict__[attr])
    return new


def forward_source(gm: fx.GraphModule) -> str:
    """The forward's code with the imports it needs, as GraphModule pickles it."""
    from torch.fx.graph_module import _format_import_block
    from torch.package import sys_importer

    code = gm.graph.python_code(root_module="self")
    return _format_import_block(code.globals, sys_importer) + code.src


def rewritten(module: nn.Module) -> str | None:
    """The source of the forward surgery wrote for a module it rewrote (None for any other module)."""
    return type(module).__dict__.get("_surgeon_source")
