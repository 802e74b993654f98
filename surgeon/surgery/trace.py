"""Tracing: any nn.Module to torch.fx graphs, whole when possible, piecewise otherwise.

1. Trace with a tracer that keeps as leaves: torch.nn layers, timm's not-traceable registrations,
   surgeon's own inserted modules, and modules whose forward reads `self.training` (dropout, drop-path,
   norm-act layers), so their train/eval behaviour survives.
2. Trace again in the other mode; functional dropout whose `training` flag differs between the two
   traces becomes an `nn.Dropout` module, which follows `model.train()` / `model.eval()`; so does a call of a
   plain function given `training=self.training` (EfficientNet's `drop_connect`), which becomes a `ModeCall`
   module. Code that read the flag only as such an argument (`F.dropout(..., training=self.training)` in
   timm's heads) is not traced again: those calls alone would differ (`_dropout_flag`).
3. When a module's forward cannot be traced (data-dependent control flow...), or computes different
   graphs in the two modes (auxiliary heads only in training, layers a random draw skips in training: see
   `_train_graphs`), that module becomes a leaf and its own
   children are traced the same way; when it is the root, the root stays Python and each child is
   traced piecewise.
"""
from __future__ import annotations

import ast
import collections
import contextlib
import copy
import functools
import inspect
import linecache
import logging
import sys
import types
import weakref
from collections import OrderedDict
from dataclasses import dataclass, field

import torch
import torch.fx as fx
from torch import nn
from torch.fx._lazy_graph_module import _LazyGraphModule

from surgeon.errors import InternalError, TraceError
from surgeon.surgery import calls as calls_
from surgeon.surgery.owned import (CONSTANT as _CONSTANT, ModeCall, attr_at, computed_tensor, fingerprint, in_mode,
                                   join_path as _join)
from surgeon.surgery.values import ValueTracing

log = logging.getLogger("surgeon")

_DROPOUT_FUNCTIONS = {
    torch.nn.functional.dropout: nn.Dropout,
    torch.nn.functional.dropout1d: nn.Dropout1d,
    torch.nn.functional.dropout2d: nn.Dropout2d,
    torch.nn.functional.dropout3d: nn.Dropout3d,
    torch.nn.functional.alpha_dropout: nn.AlphaDropout,
    torch.nn.functional.feature_alpha_dropout: nn.FeatureAlphaDropout,
}
_MAX_RETRIES = 64
# plain functions a forward calls with `training=self.training` (`_mode_functions`): traced as calls, each becomes
# a `ModeCall` module, as functional dropout becomes a dropout module
_MODE_FUNCTIONS: weakref.WeakSet = weakref.WeakSet()


def _follows_mode(target) -> bool:
    """Whether a call_function target takes the mode as `training=` and is made a module that follows it."""
    return target in _DROPOUT_FUNCTIONS or target in _MODE_FUNCTIONS


@functools.lru_cache(maxsize=None)
def _mode_functions(cls: type) -> tuple:
    """The functions `cls.forward` calls by a global name with `training=self.training` (smp's and
    efficientnet_pytorch's `drop_connect(x, p=rate, training=self.training)`), other than torch's own (functional
    dropout has its modules; `F.batch_norm` and the like keep their module in Python, see `_node_key`)."""
    forward = getattr(cls, "forward", None)
    if not isinstance(forward, types.FunctionType):
        return ()
    found = []
    for callee in _training_keywords(forward.__code__).values():
        fn = forward.__globals__.get(callee.id) if isinstance(callee, ast.Name) else None
        if isinstance(fn, types.FunctionType) and not (fn.__module__ or "").split(".")[0] == "torch":
            found.append(fn)
    return tuple(found)


@dataclass
class Traced:
    """A traced model: `module` plus every GraphModule in it, by path ("" for a traced root)."""

    module: nn.Module
    graphs: dict[str, fx.GraphModule] = field(default_factory=dict)
    leaves: dict[str, str] = field(default_factory=dict)  # module path -> why it is not traced
    extra_leaves: set[str] = field(default_factory=set)  # paths asked to stay leaves (inserted modules)
    calls: dict[str, calls_.Call] = field(default_factory=dict)  # how each module was called (see calls.py)
    packed: calls_.Recorded | None = None  # which modules take or return tensors in containers (calls.record)
    alike: Alike = field(default_factory=lambda: Alike(), repr=False)  # traces shared by modules alike (defined below)


def _timm_notrace() -> tuple[set[type], set]:
    """The modules and functions timm registers as not traceable; none when timm is not imported (then no timm
    module is in the model, and a model of another library is traced without importing timm's half second)."""
    if "timm" not in sys.modules:
        return set(), set()
    try:
        from timm.layers import _fx as timm_fx
    except Exception:  # timm missing or a version without the registry
        return set(), set()
    return set(timm_fx.get_notrace_modules()), set(timm_fx.get_notrace_functions())


# `with torch.no_grad():` / `torch.enable_grad()` regions are recorded in graphs (see SurgeonTracer.trace);
# these other ways of switching autograd are not, and keep their module Python
_GRAD_MODE = ("set_grad_enabled", "inference_mode")


@functools.lru_cache(maxsize=None)
def _forward_source(cls: type) -> str:
    """The source of a user module class's forward ('' for torch.nn's own classes or when unavailable)."""
    forward = getattr(cls, "forward", None)
    if forward is None or cls.__module__.startswith("torch.nn"):
        return ""
    try:
        return inspect.getsource(forward)
    except (OSError, TypeError):
        return ""


def changes_grad_mode(cls: type) -> bool:
    """Whether a module class's forward switches autograd in a way fx does not record (see `_GRAD_MODE`),
    so that forward must stay Python."""
    return any(word in _forward_source(cls) for word in _GRAD_MODE)


def _reads_training(cls: type) -> bool:
    """Whether a module class's forward reads `self.training` (its behaviour depends on the mode)."""
    return "self.training" in _forward_source(cls)


def has_hooks(m: nn.Module) -> bool:
    """Whether forward or backward hooks are registered on this module itself."""
    return bool(m._forward_hooks or m._forward_pre_hooks or m._backward_hooks
                or getattr(m, "_backward_pre_hooks", None))


def pack_padded_sequence(*args, **kwargs):
    """torch.nn.utils.rnn.pack_padded_sequence, as one call in traced graphs (see `_PACKING`)."""
    return torch.nn.utils.rnn.pack_padded_sequence(*args, **kwargs)


def pad_packed_sequence(*args, **kwargs):
    """torch.nn.utils.rnn.pad_packed_sequence, as one call in traced graphs (see `_PACKING`)."""
    return torch.nn.utils.rnn.pad_packed_sequence(*args, **kwargs)


# Packing functions trace as single calls, so RNNs fed packed sequences trace. NOTE: only when the model
# imports them by name (`from torch.nn.utils.rnn import ...`). In graphs they call surgeon's aliases:
# fx's generated code re-registers wrapped torch functions under dotted names that break later traces.
_PACKING = {torch.nn.utils.rnn.pack_padded_sequence: pack_padded_sequence,
            torch.nn.utils.rnn.pad_packed_sequence: pad_packed_sequence}

# Factories that take a size as separate arguments (`torch.zeros(b * h, q, k, dtype=...)`, in transformers'
# attentions): torch parses those arguments as ints before any traced size can dispatch the call, and fails; the
# same size as one tuple dispatches (and the graph calls the factory with that tuple)
_SIZED_FACTORIES = ("zeros", "ones", "empty", "rand", "randn")


def _sizes_packed(factory):
    @functools.wraps(factory)
    def call(*args, **kwargs):
        if len(args) > 1 and any(isinstance(a, fx.Proxy) for a in args):
            return factory(args, **kwargs)
        return factory(*args, **kwargs)
    call._surgeon_factory = factory
    return call


class SurgeonTracer(ValueTracing, fx.Tracer):
    """fx tracer with surgeon's leaf rules; records which module was being traced when tracing fails. With
    `values`, it knows each node's value on fake tensors (see values.py)."""

    def __init__(self, leaf_paths: set[str] = frozenset(), leaf_types: tuple[type, ...] = (),
                 call: calls_.Call | None = None, values: bool = False, sizes: bool = False):
        notrace_modules, notrace_functions = _timm_notrace()
        super().__init__(autowrap_functions=tuple(notrace_functions) + tuple(_PACKING))
        self.leaf_paths = set(leaf_paths)
        self.leaf_types = tuple(notrace_modules) + tuple(leaf_types)
        self.call = call
        self.values = values and call is not None
        self.sizes = sizes  # the call's size arguments are graph inputs (see calls.Size)
        self.watch_draws = False  # note which module's code draws from the global generator (train mode)
        self.drew: str | None = None

    def create_arg(self, a):
        """A dict subclass (Hugging Face's ModelOutput) is rebuilt as its own type, not made a plain dict."""
        if isinstance(a, dict) and type(a) not in (dict, OrderedDict) and not isinstance(a, fx.Proxy):
            node = self.create_proxy("call_function", type(a), (), {k: v for k, v in a.items()}).node
            node.meta["surgeon_pack"] = True  # packs results; the caller's code may take them apart unbuilt
            return node
        return super().create_arg(a)

    def create_args_for_root(self, root_fn, is_module, concrete_args=None):
        """With a recorded call (see `calls.py`), the root's inputs are that call's tensors and its other
        arguments are the constants it was called with, checked at every call of the traced forward."""
        if self.call is not None and is_module and concrete_args is None:
            made = calls_.placeholders(self, root_fn, self.call, type(self.root).__name__, sizes=self.sizes)
            if made is not None:
                args, kwargs = made
                return (lambda root: root_fn(root, *args, **kwargs)), [self.root]
        return super().create_args_for_root(root_fn, is_module, concrete_args)

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if module_qualified_name in self.leaf_paths:
            return True
        if getattr(m, "_surgeon_leaf", False):  # modules surgeon inserted
            return True
        if self.leaf_types and isinstance(m, self.leaf_types):
            return True
        if module_qualified_name and (_reads_training(type(m)) or changes_grad_mode(type(m)) or has_hooks(m)):
            # a module with hooks stays one call, so its hooks keep firing; it is traced as a graph of its own
            return True
        return super().is_leaf_module(m, module_qualified_name)

    def trace(self, root, concrete_args=None):
        """Trace `root`; `with torch.no_grad():` and `torch.enable_grad()` blocks become graph nodes that save
        the grad mode, set it, and restore it, so the traced code switches autograd exactly where the
        original does (plain fx would drop the blocks and compute gradients the original never did)."""
        tracer = self
        patched = {}

        def wrap(cm: type, mode: bool) -> None:
            enter, exit_ = cm.__enter__, cm.__exit__

            def recording_enter(cm_self):
                if getattr(tracer, "_computing", False):  # a value computed on the side (values.py): not code
                    return enter(cm_self)
                cm_self._surgeon_prev = tracer.create_proxy("call_function", torch.is_grad_enabled, (), {})
                tracer.create_proxy("call_function", torch._C._set_grad_enabled, (mode,), {})
                return enter(cm_self)

            def recording_exit(cm_self, *exc):
                prev = cm_self.__dict__.pop("_surgeon_prev", None)
                if prev is not None:
                    tracer.create_proxy("call_function", torch._C._set_grad_enabled, (prev,), {})
                return exit_(cm_self, *exc)

            patched[cm] = (enter, exit_)
            cm.__enter__, cm.__exit__ = recording_enter, recording_exit

        wrap(torch.no_grad, False)
        wrap(torch.enable_grad, True)
        factories = {name: getattr(torch, name) for name in _SIZED_FACTORIES
                     if not hasattr(getattr(torch, name), "_surgeon_factory")}  # (a trace inside a trace: set)
        for name, factory in factories.items():
            setattr(torch, name, _sizes_packed(factory))
        if isinstance(root, nn.Module):  # calls of functions taking the mode stay calls (see `_mode_functions`)
            for fn in {fn for m in root.modules() for fn in _mode_functions(type(m))}:
                _MODE_FUNCTIONS.add(fn)
                self._autowrap_function_ids.add(id(fn))
        # every read of a module's `training` flag while tracing is noted (see `_trace_whole`)
        self.read_training = False  # a module's code read a `training` flag (but as below)
        self.dropout_reads = 0  # reads that were a functional dropout's `training=` argument (`_dropout_flag`)
        # fx's module wrappers, when shared (see `_FxPatches`): this trace's patcher and parameter proxies
        self._fx_patcher, self._parameter_proxies = None, {}
        _FxPatches.tracers.append(self)
        try:
            with noting_training_reads(self):
                return super().trace(root, concrete_args)
        finally:
            _FxPatches.tracers.remove(self)
            self._fx_patcher = None
            for cm, (enter, exit_) in patched.items():
                cm.__enter__, cm.__exit__ = enter, exit_
            for name, factory in factories.items():
                setattr(torch, name, factory)

    def call_module(self, m, forward, args, kwargs):
        path = self.path_of_module(m)
        # (not while a value is computed on fake tensors, see values.py: that is no code of the model's)
        before = torch.get_rng_state() if self.watch_draws and not self._computing else None
        try:
            out = super().call_module(m, forward, args, kwargs)
        except Exception as exc:
            if not hasattr(exc, "_surgeon_culprit"):
                exc._surgeon_culprit = path  # innermost module whose forward failed
            raise
        if before is not None and self.drew is None and not torch.equal(before, torch.get_rng_state()):
            self.drew = path  # innermost module whose forward drew random numbers (see `_trace_graph`)
        if isinstance(out, fx.Proxy) and out.node.op == "call_module":  # kept whole: its hooks did not run
            for hook in _capturing_hooks(m):
                hook(m, args, out)
        return out


def _capturing_hooks(module: nn.Module) -> list:
    """The forward hooks transformers' output capturing put on `module` (from version 5: a model's forward that
    asks for its submodels' hidden states or attentions sets up a collector, and these hooks append each layer's
    output to it; outside such a forward they do nothing). A module that a graph keeps whole is called without its
    hooks while tracing, so the tracer calls these on its output's proxy: the graph then hands the layers' outputs
    to what reads them (SegFormer's decode head, the encoder's hidden states), as the model's own forward does."""
    hooks = module.__dict__.get("_forward_hooks")
    return [h for h in hooks.values() if getattr(h, "__module__", None) == "transformers.utils.output_capturing"] \
        if hooks else []


_NOTING: list = []  # one entry per active `noting_training_reads`: the tracer noting reads (or None)


def _read_training(module: nn.Module) -> bool:
    tracer = next((t for t in reversed(_NOTING) if t is not None), None)
    if tracer is not None:
        if isinstance(tracer, SurgeonTracer) and _dropout_flag(sys._getframe(1)):
            tracer.dropout_reads += 1
        else:
            tracer.read_training = True
    try:
        return module.__dict__["training"]
    except KeyError:
        raise AttributeError("training") from None


def _write_training(module: nn.Module, value: bool) -> None:
    module.__dict__["training"] = value


def _dropout_flag(frame: types.FrameType) -> bool:
    """Whether the read of a `training` flag that `frame` is executing is written as the `training=` argument of
    a call to one of torch's functional dropouts or to a function of `_mode_functions`, named through the frame's
    globals (`F.dropout(x, p, training=self.training)`, in timm's heads). Such a read changes nothing in the graph
    but that argument, which the module the call becomes follows (see `_dropouts_of_reads`), so it needs no trace
    in train mode."""
    func = _dropout_call_at(frame.f_code, frame.f_lasti)
    if func is None:
        return False
    names = []
    while isinstance(func, ast.Attribute):
        names.append(func.attr)
        func = func.value
    if not isinstance(func, ast.Name) or func.id not in frame.f_globals:
        return False  # a local or an attribute of an object: not followed
    obj = frame.f_globals[func.id]
    for name in reversed(names):
        if not isinstance(obj, types.ModuleType) or not hasattr(obj, name):
            return False  # through modules only: nothing is run to find the function
        obj = getattr(obj, name)
    # (a function the trace records as a call is, while tracing, fx's wrapper of it in those globals)
    return _follows_mode(obj) or _follows_mode(getattr(obj, "__wrapped__", None))


@functools.lru_cache(maxsize=None)
def _dropout_call_at(code: types.CodeType, offset: int) -> ast.expr | None:
    """The called expression of the call whose `training=` keyword is the `….training` read at `offset` of
    `code`, or None (another read, or source that cannot be found)."""
    positions = list(code.co_positions())
    if not 0 <= offset // 2 < len(positions) or None in positions[offset // 2]:
        return None
    line = positions[offset // 2][0]
    if "training=" not in linecache.getline(code.co_filename, line).replace(" ", ""):
        return None  # (most reads: `if self.training:`), without parsing anything
    return _training_keywords(code).get(positions[offset // 2])


@functools.lru_cache(maxsize=None)
def _training_keywords(code: types.CodeType) -> dict[tuple, ast.expr]:
    """{(line, end line, column, end column) of `X.training` in a `training=X.training` keyword: the called
    expression} over the source of `code`'s function."""
    try:
        lines, first = inspect.getsourcelines(code)
    except (OSError, TypeError):
        return {}
    # as it is, or (an indented method) under an `if`, where it parses with its own columns; ast counts lines from 1
    for head in ("", "if 1:\n"):
        try:
            tree = ast.parse(head + "".join(lines))
            break
        except (SyntaxError, ValueError):
            continue
    else:
        return {}
    first -= 1 + head.count("\n")
    found = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            for kw in node.keywords:
                v = kw.value
                if kw.arg == "training" and isinstance(v, ast.Attribute) and v.attr == "training":
                    found[(v.lineno + first, v.end_lineno + first, v.col_offset, v.end_col_offset)] = node.func
    return found


@contextlib.contextmanager
def noting_training_reads(tracer: fx.Tracer | None = None):
    """While active, reads of any module's `training` flag set `tracer.read_training` (the innermost tracer
    given): a data descriptor on nn.Module takes precedence over the instance attribute it reads.
    Re-entrant; the outermost use installs it, and fx's module patches for every trace inside (see
    `_FxPatches`): changing nn.Module costs about a millisecond, so wrap a whole surgery step in one."""
    outermost = not _NOTING
    if outermost:
        nn.Module.training = property(_read_training, _write_training)
        _FxPatches.install()
    _NOTING.append(tracer)
    try:
        yield
    finally:
        _NOTING.pop()
        if outermost:
            _FxPatches.remove()
            del nn.Module.training


_FX_INTERNALS = sys.modules.get("torch.fx._symbolic_trace")
_FX_SHAREABLE = all(hasattr(_FX_INTERNALS, n) for n in ("CURRENT_PATCHER", "_autowrap_check", "_orig_module_call",
                                                        "_orig_module_getattr"))


class _FxPatches:
    """fx's tracer sets `nn.Module.__call__` and `__getattr__` to wrappers of its own at the start of every trace
    and puts them back at its end; each change of a class that has 1300 subclasses costs about a millisecond
    (their type caches), 6-14% of a surgery of 5 to 60 traces. Within `noting_training_reads` these two are set
    once, to dispatchers marked as fx's own (so fx's tracer does not set its wrappers), that do what fx's
    wrappers do for the SurgeonTracer whose trace is running (known by fx's current patcher, see `_tracer`),
    and call the originals when none is. Not installed where fx lacks what they stand on."""

    _internals = _FX_INTERNALS
    available = _FX_SHAREABLE
    installed: tuple | None = None
    tracers: list = []  # SurgeonTracers tracing now, innermost last (each with the fx patcher its trace made)

    @classmethod
    def install(cls) -> None:
        if not cls.available or nn.Module.__call__ is not cls._internals._orig_module_call \
                or nn.Module.__getattr__ is not cls._internals._orig_module_getattr:
            return  # another patcher (an fx trace running outside surgeon) holds them: leave fx its own way
        call, getattr_ = cls._dispatch_call, cls._dispatch_getattr
        for fn in (call, getattr_):  # fx's patch_method skips functions so marked (setattr: no name mangling here)
            setattr(fn, "__fx_already_patched", True)
        cls.installed = (nn.Module.__call__, nn.Module.__getattr__)
        nn.Module.__call__, nn.Module.__getattr__ = call, getattr_

    @classmethod
    def remove(cls) -> None:
        if cls.installed is not None:
            nn.Module.__call__, nn.Module.__getattr__ = cls.installed
            cls.installed = None

    @classmethod
    def _tracer(cls):
        """The SurgeonTracer whose trace made fx's current patcher (the innermost one without a patcher takes a new
        one: fx makes it right after the trace starts), or None outside any trace's body. Another fx tracer's trace
        (whose wrappers the dispatchers keep out) is a bug, said as one."""
        patcher = cls._internals.CURRENT_PATCHER
        if patcher is None:
            return None
        for tracer in reversed(cls.tracers):  # the innermost first: almost always the one
            if tracer._fx_patcher is patcher:
                return tracer
        fresh = [t for t in cls.tracers if t._fx_patcher is None]
        if not fresh:
            raise InternalError("An fx trace other than surgeon's ran inside surgery's tracing, with "
                                "nn.Module's calls dispatched to surgeon's tracers")
        fresh[-1]._fx_patcher = patcher
        return fresh[-1]

    @staticmethod
    def _dispatch_call(mod, *args, **kwargs):
        tracer = _FxPatches._tracer()
        original = _FxPatches._internals._orig_module_call
        if tracer is None:
            return original(mod, *args, **kwargs)

        def forward(*args, **kwargs):
            return original(mod, *args, **kwargs)

        scope = getattr(getattr(mod, "forward", mod), "__globals__", {})
        _FxPatches._internals._autowrap_check(tracer._fx_patcher, scope, tracer._autowrap_function_ids)
        return tracer.call_module(mod, forward, args, kwargs)

    @staticmethod
    def _dispatch_getattr(mod, attr):
        value = _FxPatches._internals._orig_module_getattr(mod, attr)
        tracer = _FxPatches._tracer()
        return value if tracer is None else tracer.getattr(attr, value, tracer._parameter_proxies)


@dataclass(frozen=True)
class _Reads:
    """What a trace read of modules' `training` flags: any read but the ones counted, and how many were a
    functional dropout's `training=` argument (see `_dropout_flag`)."""

    other: bool
    dropout: int


def _trace_graph(module: nn.Module, leaf_paths: set[str], training: bool,
                 call: calls_.Call | None, widen: bool = False) -> tuple[fx.Graph, _Reads, str | None]:
    """The graph of `module` in the given mode, and what tracing read of modules' `training` flags.

    Also, in train mode, where the code drew from the global generator while it was traced (the innermost module
    whose code drew, '' for the module's own code; None when nothing drew): see `_train_graphs`."""
    with in_mode(module, training), _constants_apart(module, training):
        state = torch.get_rng_state() if training else None
        # size arguments as graph inputs, so the forward takes any size; else as the constants they were (the
        # code decides on them); else knowing every value's shape, for decisions on sizes the code computes
        # (`if x.shape[1] != self.num_channels`, `(*x.shape[:-1], -1)`), which is slower: with the size arguments
        # as inputs first (transformers' SegFormer attention unpacks its input's shape, then reshapes by its
        # `height, width` arguments)
        sizes = call is not None and call.has_sizes
        attempts = [{"sizes": True}] if sizes else []
        attempts += [{}, *([{"sizes": True, "values": True}] if sizes else []), {"values": True}] \
            if call is not None else [{}]
        before = set(module.__dict__)
        for i, how in enumerate(attempts):
            tracer = SurgeonTracer(leaf_paths, call=call, **how)
            tracer.watch_draws = training
            try:
                graph = tracer.trace(module)
                break
            except Exception:
                if i == len(attempts) - 1:
                    raise
                _drop_constants(module, before)  # the failed attempt's: the next one names its own alike
        drew = (tracer.drew or "") if state is not None and not torch.equal(state, torch.get_rng_state()) else None
        if widen and call is not None and not tracer.values:
            graph = _widened(module, leaf_paths, call, graph, how)
    for n in graph.nodes:
        if n.op == "call_function" and n.target in _PACKING:
            n.target = _PACKING[n.target]
    return graph, _Reads(tracer.read_training, tracer.dropout_reads), drew


def _widened(module: nn.Module, leaf_paths: set[str], call: calls_.Call, graph: fx.Graph, how: dict) -> fx.Graph:
    """`graph` with the checks of arguments the forward only hands on widened (see `passing.py`); the traces
    this takes leave the module, its stored constants and the global generator as they were."""
    from surgeon.surgery import passing

    before, state = set(module.__dict__), torch.get_rng_state()

    def retrace(other: calls_.Call) -> fx.Graph | None:
        tracer = SurgeonTracer(leaf_paths, call=other, **how)
        try:
            return tracer.trace(module)
        except Exception:  # noqa: BLE001 - the forward does not take the other value: the check stays
            return None
        finally:
            _drop_constants(module, before)

    try:
        return passing.widen(graph, type(module).forward, call, retrace)
    finally:
        torch.set_rng_state(state)




def _drop_constants(module: nn.Module, before: set[str]) -> None:
    """Remove the tensor constants tracing stored on `module` since its attributes were `before`."""
    for k in [k for k in module.__dict__ if k.startswith(_CONSTANT) and k not in before]:
        del module.__dict__[k]


@contextlib.contextmanager
def _constants_apart(module: nn.Module, apart: bool):
    """With `apart` (a train-mode trace, made only to be compared with the eval-mode one): the tensor constants
    earlier traces stored on `module` are set aside, so this trace names its own as they were named (rather
    than `_tensor_constant1` for the eval trace's `_tensor_constant0`, which would make the graphs differ), and
    the ones it stores are dropped afterwards."""
    if not apart:
        yield
        return
    d = module.__dict__
    saved = {k: d.pop(k) for k in [k for k in d if k.startswith(_CONSTANT)]}
    before = set(d)
    try:
        yield
    finally:
        _drop_constants(module, before)
        d.update(saved)


_BELOW_ONE = 1 - 2 ** -24  # the largest float32 torch.rand returns


@contextlib.contextmanager
def _rand_returning(value: float):
    """`torch.rand` with constant sizes returns `value` everywhere within the block (with traced sizes it draws
    as always, recorded in the graph)."""
    rand = torch.rand

    def constant(*size, generator=None, out=None, **kwargs):
        if any(isinstance(a, fx.Proxy) for a in (*size, *kwargs.values())) or out is not None:
            return rand(*size, generator=generator, out=out, **kwargs)
        shape = tuple(size[0]) if len(size) == 1 and isinstance(size[0], (list, tuple, torch.Size)) else size
        return torch.full(shape, value, **{k: v for k, v in kwargs.items() if k in ("dtype", "device", "requires_grad")})

    torch.rand = constant
    try:
        yield
    finally:
        torch.rand = rand


def _train_graphs(module: nn.Module, leaf_paths: set[str], call: calls_.Call | None,
                  widen: bool = False) -> list[fx.Graph]:
    """`module`'s graph in train mode; and when its code drew random numbers while traced (LayerDrop: `if
    self.training and torch.rand([]) < p: skip the layer`), its graphs with every such draw at either end of
    [0, 1), each of which must equal the eval graph: one draw cannot stand for every step of training, so a
    module whose structure follows the draw stays Python, and one whose never does (p = 0) is traced.
    Draws from anything but `torch.rand` leave the module that made them Python."""
    graph, _, drew = _trace_graph(module, leaf_paths, training=True, call=call, widen=widen)
    graphs = [graph]
    if drew is None:
        return graphs
    for value in (0.0, _BELOW_ONE):
        with _rand_returning(value):
            extreme, _, again = _trace_graph(module, leaf_paths, training=True, call=call, widen=widen)
        if again is not None:
            exc = TraceError(f"The forward of {again or type(module).__name__!r} draws random numbers while it is "
                             "traced in train mode, so its graph would hold one draw")
            exc._surgeon_culprit = again
            raise exc
        graphs.append(extreme)
    return graphs


@functools.lru_cache(maxsize=None)
def _own_training(cls: type) -> bool:
    """Whether a class defines `training` itself (a property): reads of it would not be noted."""
    return any("training" in c.__dict__ for c in cls.__mro__ if c is not nn.Module)


def _node_key(node: fx.Node) -> tuple:
    def norm(a):
        return fx.node.map_arg(a, lambda n: n.name)
    # only functional dropout and the functions of `_mode_functions` may differ in their training flag (they become
    # modules); any other op that takes `training=self.training` (F.batch_norm, F.rrelu...) makes the two modes'
    # graphs differ
    skip = "training" if node.op == "call_function" and _follows_mode(node.target) else None
    return node.op, node.target, norm(node.args), norm({k: v for k, v in node.kwargs.items() if k != skip})


def _mode_dependent_dropouts(g_eval: fx.Graph, g_train: fx.Graph, owner: str) -> list[str]:
    """Names of functional-dropout nodes whose training flag follows the mode.

    Raises TraceError when the two graphs differ in anything else.
    """
    ev, tr = list(g_eval.nodes), list(g_train.nodes)
    if len(ev) != len(tr) or any(_node_key(a) != _node_key(b) for a, b in zip(ev, tr)):
        where = next((a for a, b in zip(ev, tr) if _node_key(a) != _node_key(b)), ev[-1])
        stack = [v[0] for v in where.meta.get("nn_module_stack", {}).values()]
        if where.op == "call_module" and stack and stack[-1] == where.target:
            stack = stack[:-1]
        culprit = stack[-1] if stack else ""
        exc = TraceError(
            f"The forward of {culprit or owner!r} computes different graphs in train() and eval() mode "
            f"(near node {where.name!r}), so one traced graph cannot keep both behaviours"
        )
        exc._surgeon_culprit = culprit  # that module stays Python (a leaf), so both modes keep working
        raise exc
    return [a.name for a, b in zip(ev, tr)
            if a.op == "call_function" and _follows_mode(a.target)
            and a.kwargs.get("training") != b.kwargs.get("training")]


def _dropouts_of_reads(graph: fx.Graph, reads: int) -> list[str] | None:
    """The functional-dropout nodes of an eval-mode graph that `reads` reads of `training=self.training` gave
    their flag: the ones at training=False, when there are as many (else None: one was written False, or a read's
    dropout ran on a value the graph does not hold, and a trace in train mode tells them apart)."""
    names = [n.name for n in graph.nodes
             if n.op == "call_function" and _follows_mode(n.target) and n.kwargs.get("training") is False]
    return names if len(names) == reads else None


def _modularise_dropouts(gm: fx.GraphModule, names: list[str]) -> None:
    """Replace functional dropout nodes by nn.Dropout modules, and calls of functions given the mode by `ModeCall`
    modules, that follow gm.train()/eval()."""
    by_name = {n.name: n for n in gm.graph.nodes}
    for name in names:
        node = by_name[name]
        stack = list(node.meta.get("nn_module_stack", {}).values())
        owner = stack[-1][0] if stack else ""
        path = unique_path(gm, owner, name)
        if node.target in _DROPOUT_FUNCTIONS:
            p = node.kwargs.get("p", node.args[1] if len(node.args) > 1 else 0.5)
            module, args, kwargs = _DROPOUT_FUNCTIONS[node.target](p=p), (node.args[0],), {}
        else:  # the function itself, called with the module's flag
            module, args = ModeCall(node.target), node.args
            kwargs = {k: v for k, v in node.kwargs.items() if k != "training"}
        # in the mode of the module it was traced from (a new module is in train mode: an eval-mode model would
        # drop activations)
        gm.add_submodule(path, module.train(gm.training))
        with gm.graph.inserting_after(node):
            new = gm.graph.call_module(path, args, kwargs)
        new.meta = dict(node.meta)
        node.replace_all_uses_with(new)
        gm.graph.erase_node(node)
        log.debug("trace: functional dropout %s -> module %s (follows train/eval)", name, path)
    if names:
        gm.graph.lint()
        gm.recompile()


def unique_path(gm: nn.Module, owner: str, name: str) -> str:
    """A module path `owner.name` not yet used in gm (suffix _1, _2... when taken)."""
    base = f"{owner}.{name}" if owner else name
    path, i = base, 0
    while _has_attr_path(gm, path):
        i += 1
        path = f"{base}_{i}"
    return path


def _has_attr_path(root: nn.Module, path: str) -> bool:
    try:
        attr_at(root, path)
    except AttributeError:
        return False
    return True


def _restore_unused(gm: fx.GraphModule, original: nn.Module) -> None:
    """Attach modules, parameters and buffers the graph does not use, so every state-dict key survives."""
    have = set(gm.state_dict().keys())
    for key in original.state_dict().keys():
        if key in have:
            continue
        parts = key.split(".")
        # find the shortest missing prefix and copy that object by reference
        for i in range(1, len(parts) + 1):
            prefix = ".".join(parts[:i])
            if not _has_attr_path(gm, prefix):
                parent = gm.get_submodule(".".join(parts[: i - 1])) if i > 1 else gm
                src = original.get_submodule(".".join(parts[: i - 1])) if i > 1 else original
                obj = getattr(src, parts[i - 1])
                if isinstance(obj, nn.Module):
                    parent.add_module(parts[i - 1], obj)
                elif isinstance(obj, nn.Parameter):
                    parent.register_parameter(parts[i - 1], obj)
                else:
                    parent.register_buffer(parts[i - 1], obj)
                break
        have = set(gm.state_dict().keys())


_KEEP_ATTRS = ("pretrained_cfg", "default_cfg", "num_classes", "num_features", "_surgeon")


def copy_graph(gm: fx.GraphModule) -> fx.Graph:
    """A copy of an existing graph; node metadata (module stacks, hence site names) comes along."""
    graph = fx.Graph()
    out = graph.graph_copy(gm.graph, {})
    graph.output(out)
    return graph


def _trace_whole(module: nn.Module, leaf_paths: set[str], call: calls_.Call | None = None, *,
                 lazy: bool = False, widen: bool = False) -> fx.GraphModule:
    """`module`'s graph (see `trace_alone`); with `widen`, the checks of arguments it only hands on take their other
    value too (`passing.py`): for the owners surgery rewrites, whose code the patched model runs (the graphs sites
    are found on never run, and need no second trace per flag)."""
    if isinstance(module, fx.GraphModule):
        # already traced (e.g. patched before): reuse its graph rather than tracing its generated code,
        # which would lose which module each node came from
        return _graph_module(module, copy_graph(module), lazy=lazy)
    if changes_grad_mode(type(module)):
        raise TraceError(f"The forward of {type(module).__name__} switches autograd on or off, which a traced "
                         f"graph would lose")
    g_eval, reads, _ = _trace_graph(module, leaf_paths, training=False, call=call, widen=widen)
    # read only as functional dropouts' flags, the train graph differs from this one at those dropouts alone
    dropouts = _dropouts_of_reads(g_eval, reads.dropout) if reads.dropout and not reads.other else []
    if reads.other or dropouts is None or any(_own_training(type(m)) for m in module.modules()):
        # the code depends on the mode: trace it in train mode too, and keep what differs (or refuse)
        for g_train in reversed(_train_graphs(module, leaf_paths, call, widen)):  # the plain trace's dropouts last
            dropouts = _mode_dependent_dropouts(g_eval, g_train, type(module).__name__)
    gm = _graph_module(module, g_eval, lazy=lazy)
    _modularise_dropouts(gm, dropouts)
    return gm


def trace_alone(module: nn.Module, leaf_paths: set[str], call: calls_.Call | None = None) -> fx.GraphModule:
    """One module traced whole, in both modes (see the module docstring), for `call` when given (see
    `calls.py`); raises when it does not trace. Its Python code is generated only when it runs or is read:
    surgery compares such graphs and writes its own code from them."""
    return _trace_whole(module, leaf_paths, call, lazy=True, widen=True)


def traced_like(done: fx.GraphModule, module: nn.Module) -> fx.GraphModule:
    """What tracing `module` returns, from `done`, the result of tracing a module with the same fingerprint
    (`owned.fingerprint`) for the same call and leaves: its graph on `module`. What tracing made and stored (a
    tensor constant, a dropout module) the new GraphModule holds a copy of; `module` is left as it was."""
    graph = copy_graph(done)
    made = []
    for n in graph.nodes:
        if n.op in ("get_attr", "call_module") and not _has_attr_path(module, n.target):
            parent, _, name = n.target.rpartition(".")
            holder = module.get_submodule(parent) if parent else module
            obj = copy.deepcopy(attr_at(done, n.target))
            if isinstance(obj, nn.Module):
                holder.add_module(name, obj)
            else:
                setattr(holder, name, obj)
            made.append((holder, name))
    try:
        return _graph_module(module, graph, lazy=isinstance(done, _LazyGraphModule))
    finally:
        for holder, name in made:
            delattr(holder, name)


class Alike:
    """Traces by what tracing depends on (`owned.fingerprint`, the leaves and the call): a module like one traced
    before (the repeated blocks of a stage) takes that module's graph (`traced_like`) instead of being traced
    again."""

    def __init__(self):
        self._done: dict[tuple, fx.GraphModule] = {}
        self._computed: dict[tuple, nn.Module] = {}  # the module traced, for graphs holding computed tensors

    def trace(self, module: nn.Module, leaves, call: calls_.Call | None, trace_fn, *,
              onto: nn.Module | None = None) -> fx.GraphModule:
        """`trace_fn()`, the trace of `module` (or of `onto`, a structural copy of it) for `call` with `leaves`, or
        the graph of a module alike on it. (The user's module is the one compared: a copy holds copies of the
        objects it shares with its siblings.)"""
        key = (fingerprint(module), frozenset(leaves), repr(call))
        done = self._done.get(key)
        # a tensor the trace computed and stored may come from the module's buffers (a mask reshaped), which a
        # fingerprint counts by shape when they are big: then only a module holding equal buffers takes it
        if done is not None and (key not in self._computed or _same_buffers(self._computed[key], module)):
            return traced_like(done, module if onto is None else onto)
        done = trace_fn()
        if key not in self._done:
            self._done[key] = done
            if any(map(computed_tensor, done.graph.nodes)):
                self._computed[key] = module
        return done


def _same_buffers(a: nn.Module, b: nn.Module) -> bool:
    """Whether two modules alike (one fingerprint: the same buffer names, shapes and dtypes) hold equal buffers."""
    try:
        return all(x is y or torch.equal(x, y) for (_, x), (_, y) in zip(a.named_buffers(), b.named_buffers()))
    except (RuntimeError, NotImplementedError):  # values that cannot be compared (meta tensors): different
        return False


def _graph_module(module: nn.Module, graph: fx.Graph, *, lazy: bool = False) -> fx.GraphModule:
    """A GraphModule for `module` that keeps all its state-dict keys, its mode and its config attributes
    (with `lazy`, one that generates its code when first run or read)."""
    gm = (_LazyGraphModule if lazy else fx.GraphModule)(module, graph, class_name=type(module).__name__)
    _restore_unused(gm, module)
    gm.train(module.training)
    for attr in _KEEP_ATTRS:
        if attr in module.__dict__:
            setattr(gm, attr, copy.deepcopy(module.__dict__[attr]))
    # plain attributes (smp's `encoder.output_stride`): the Python code around a traced part reads them
    for attr, value in module.__dict__.items():
        if not attr.startswith("_") and attr not in gm.__dict__ and attr != "training":
            gm.__dict__[attr] = value
    return gm


def trace(model: nn.Module, *, leaf_paths: set[str] | None = None,
          calls: dict[str, calls_.Call] | None = None) -> Traced:
    """Trace `model` with fx, piecewise where needed.

    Args:
        model: any nn.Module. It is not changed; leaf modules of the result share its parameters.
        leaf_paths: module paths to keep as leaves (not traced into).
        calls: how each module is called ({path: Call}, see `calls.record`); each module whose call is known
            is traced for that call.

    Returns:
        Traced: the traced model, its GraphModules by path, and the modules left untraced with why.

    Raises:
        TraceError: when no part of the model can be traced.
    """
    result = Traced(module=model, calls=dict(calls or {}))
    with noting_training_reads():
        result.module = _trace_into(model, "", set(leaf_paths or ()), result)
    return result


def _trace_into(module: nn.Module, prefix: str, leaf_paths: set[str], result: Traced) -> nn.Module:
    local_leaves = {p[len(prefix) + 1:] if prefix else p for p in leaf_paths
                    if not prefix or p.startswith(prefix + ".")}
    culprits: dict[str, str] = {}
    for _ in range(_MAX_RETRIES):
        try:
            leaves, call = local_leaves | set(culprits), result.calls.get(prefix)
            # (a GraphModule that writes its code only if it runs: surgery reads its graph, runs it through an
            # interpreter, and rewrites owners traced alone; compiling a mobile network's whole graph cost 10%)
            whole = functools.partial(_trace_whole, module, leaves, call, lazy=True)
            # (the root has no sibling alike: its fingerprint, the whole model's, would cost for nothing)
            gm = result.alike.trace(module, leaves, call, whole) if prefix else whole()
        except Exception as exc:
            culprit = getattr(exc, "_surgeon_culprit", "")
            reason = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}".strip()
            if not culprit or culprit in culprits:
                return _trace_children(module, prefix, leaf_paths, result, reason)
            culprits[culprit] = reason
            log.debug("trace: %s does not trace (%s); kept as a leaf", _join(prefix, culprit), reason)
            continue
        break
    else:
        raise TraceError(f"Tracing {type(module).__name__} did not converge after {_MAX_RETRIES} leaves")
    result.graphs[prefix] = gm
    # modules kept whole for their hooks get graphs of their own (surgery then rewrites them, hooks kept), and
    # so do the ones kept whole because their forward reads `self.training` and that hold blocks of their own
    # (an encoder with layer drop), or layers, when called once (torchvision's dense layer with its functional
    # dropout; not ALBERT's attention, shared by every layer): traced alone in both modes, or piecewise. (A norm
    # with its activation inside, timm's BatchNormAct2d, holds none.)
    called = collections.Counter(n.target for n in gm.graph.nodes if n.op == "call_module")
    for n in gm.graph.nodes:
        if n.op != "call_module" or n.target in culprits:
            continue
        sub = gm.get_submodule(n.target)
        full = _join(prefix, n.target)
        if _builtin(sub) or full in result.graphs or full in leaf_paths or getattr(sub, "_surgeon_leaf", False):
            continue
        reads = _reads_training(type(sub))
        if has_hooks(sub) or reads and any(not _builtin(c) for c in sub.children()) \
                or reads and called[n.target] == 1 and _holds_layers(sub):
            _trace_into(sub, full, leaf_paths, result)
    # trace inside the modules that had to become leaves, so their own sites are found
    for path, reason in culprits.items():
        full = _join(prefix, path)
        result.leaves[full] = reason
        _trace_children(gm.get_submodule(path), full, leaf_paths, result, reason)
    return gm


def _trace_children(module: nn.Module, prefix: str, leaf_paths: set[str], result: Traced, reason: str) -> nn.Module:
    """Keep `module` as Python; trace each of its children piecewise (their graphs go to `result.graphs`;
    the module tree itself is left as it is, so the Python code around the graphs keeps every attribute,
    property and method it reads)."""
    result.leaves[prefix] = reason
    for name, child in module.named_children():
        full = _join(prefix, name)
        if full in leaf_paths or getattr(child, "_surgeon_leaf", False):
            continue
        if isinstance(child, (nn.ModuleList, nn.ModuleDict)):  # containers have no forward: look inside
            _trace_children(child, full, leaf_paths, result, reason)
            result.leaves.pop(full, None)
            continue
        if not _builtin(child):
            _trace_into(child, full, leaf_paths, result)
    return module


def _holds_layers(m: nn.Module) -> bool:
    """Whether `m` holds modules of the model's own or layers with weights (where sites can be)."""
    return any(not _builtin(c) or next(c.parameters(recurse=False), None) is not None
               for c in m.modules() if c is not m)


def _builtin(m: nn.Module) -> bool:
    """A torch.nn layer (not a container whose contents are the model's own)."""
    return type(m).__module__.startswith("torch.nn") and not isinstance(m, (nn.Sequential, nn.ModuleList,
                                                                            nn.ModuleDict))


__all__ = ["Traced", "SurgeonTracer", "copy_graph", "trace", "trace_alone", "traced_like", "unique_path", "Alike"]
