"""Verify a patched model against its original: outputs, gradients, parameters and FLOPs added."""
from __future__ import annotations

import dataclasses
import logging
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

from surgeon.surgery import meta
from surgeon.surgery.owned import in_mode, set_mode

log = logging.getLogger("surgeon")


@dataclass
class Verification:
    """What `verify` measured.

    max_abs_diff: largest |patched − original| over all output tensors (eval mode).
    new_params: parameter tensors the edits added; with_grad: how many of them a backward pass
    reached; nonzero_grad: how many got a non-zero gradient (at identity init only the gates can:
    the others sit behind a zero gate for the first step; a freshly initialised network whose
    blocks end in zero-initialised norms gives the gates zero gradient too). same_grad_structure: every
    output that requires gradients in the original still does (one that did not may, through the new
    parameters of a model the user froze). outputs: how many output tensors were compared (0 fails: an output
    `tensors` cannot look into is never taken as a match).
    """

    max_abs_diff: float
    tolerance: float | None
    params_added: int
    flops_before: int
    flops_after: int
    new_params: int
    with_grad: int
    nonzero_grad: int
    train_max_abs_diff: float | None = None
    train_note: str = ""
    same_grad_structure: bool = True
    outputs: int | None = None  # output tensors compared (0: nothing could be, see `problem`)
    output_type: str = ""
    wrong_mode: str = ""  # a module of the patched model in another mode than the original's (see `_wrong_mode`)
    smaller: str = ""  # the input shape the models were compared on, when smaller than the example's (`Plan.apply`)

    @property
    def flops_added(self) -> int:
        return self.flops_after - self.flops_before

    @property
    def ok(self) -> bool:
        # written as `<=` so that NaN fails
        exact = self.tolerance is None or self.max_abs_diff <= self.tolerance
        train = self.tolerance is None or self.train_max_abs_diff is None or self.train_max_abs_diff <= self.tolerance
        return exact and train and self.same_grad_structure and self.with_grad == self.new_params \
            and self.outputs != 0 and not self.wrong_mode

    def problem(self) -> str | None:
        """What failed, in one sentence (None when the check passed)."""
        if self.outputs == 0:
            return (f"The model's output ({self.output_type}) holds no tensor to compare: a forward that returns "
                    "tensors, or tuples, lists, dicts or dataclasses of them, can be checked (or patch without "
                    "verification)")
        if self.wrong_mode:
            return f"The patched model's {self.wrong_mode}, so it would not compute what the original does as returned"
        if self.tolerance is not None and not self.max_abs_diff <= self.tolerance:
            return f"Identity init changed the output by {self.max_abs_diff:.3g} (> {self.tolerance:g})"
        if self.tolerance is not None and self.train_max_abs_diff is not None \
                and not self.train_max_abs_diff <= self.tolerance:
            return (f"In train mode the patched model differs from the original by {self.train_max_abs_diff:.3g} "
                    f"(outputs or running statistics; > {self.tolerance:g})")
        if not self.same_grad_structure:
            return ("The patched model's outputs do not require gradients where the original's do (an inserted "
                    "module cuts the autograd graph)")
        if self.with_grad == 0 < self.new_params:
            return (f"A backward pass reached none of the {self.new_params} new parameters: something after them passes "
                    "no gradient back (a detached output, a quantized layer, an op without a backward)")
        if self.with_grad != self.new_params:
            return f"A backward pass reached only {self.with_grad} of {self.new_params} new parameters"
        return None

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "flops_added": self.flops_added, "ok": self.ok}


def tensors(out: Any) -> list[torch.Tensor]:
    """The tensors in a (nested) output or input: tensors, tuples, lists, dicts (a Hugging Face ModelOutput),
    dataclasses, and the containers registered with torch's pytree."""
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):
        out = list(out.values())
    elif dataclasses.is_dataclass(out) and not isinstance(out, type):
        out = [getattr(out, f.name) for f in dataclasses.fields(out)]
    elif not isinstance(out, (tuple, list)) and type(out) in pytree.SUPPORTED_NODES:
        out = pytree.tree_leaves(out)
    if isinstance(out, (tuple, list)):
        return [t for o in out for t in tensors(o)]
    return []


def max_abs_diff(a: Any, b: Any) -> float:
    ta, tb = tensors(a), tensors(b)
    if len(ta) != len(tb) or any(x.shape != y.shape for x, y in zip(ta, tb)):
        return float("inf")
    return max((float((x.double() - y.double()).abs().max()) for x, y in zip(ta, tb) if x.numel()), default=0.0)


def _cpu_sdpa_flops(query, key, value, *args, out_shape=None, **kwargs) -> int:
    from torch.utils.flop_counter import sdpa_flop_count

    return sdpa_flop_count(query, key, value)  # the counter passes shapes, not tensors


class _FlopSum(TorchDispatchMode):
    """The sum of torch's FLOP formulas (torch.utils.flop_counter) over the ops a forward dispatches. It gives
    FlopCounterMode's total without its per-module bookkeeping and without decomposing every op that has no
    formula (elementwise ops, norms) into smaller ones first, which costs more than the forward itself on meta
    tensors; the ops that do carry FLOPs (matrix products, convolutions, attention) reach dispatch as
    themselves."""

    def __init__(self, extra: dict):
        from torch.utils.flop_counter import flop_registry, shape_wrapper

        super().__init__()
        self.formulas = {**flop_registry, **{op: shape_wrapper(f) for op, f in extra.items()}}
        self.total = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        formula = self.formulas.get(func._overloadpacket)
        if formula is not None:
            self.total += formula(*args, **kwargs, out_val=out)
        return out


def _extra_formulas() -> dict:
    # NOTE: the flop counter has no formula for the CPU flash-attention kernel that
    # scaled_dot_product_attention dispatches to, so attention products would count as zero
    return {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_sdpa_flops}


def count_flops(model: nn.Module, inputs: tuple) -> int:
    """FLOPs of one forward (torch.utils.flop_counter's formulas), counting CPU fused attention too."""
    from torch.utils.flop_counter import FlopCounterMode

    extra = _extra_formulas()
    try:
        # without autograd: FLOPs do not depend on it, and on meta tensors the norms' shape-only stand-ins would
        # otherwise be leaves requiring grad, which an in-place activation after them refuses
        with torch.no_grad(), _FlopSum(extra) as total:
            model(*inputs)
        return int(total.total)
    except Exception as exc:  # noqa: BLE001 - an op the plain sum cannot take (a higher-order op): torch's counter
        log.debug("flops: counted with FlopCounterMode (%s: %s)", type(exc).__name__, exc)
    counter = FlopCounterMode(display=False, custom_mapping=extra)
    # NOTE: with autograd on: the counter's module tracker hooks every module input that requires grad, and
    # a view of a parameter made under no_grad (a ViT's expanded class token passed to a child module, as
    # in timm's PiT) requires grad without a gradient function, which the tracker cannot hook
    with counter:
        model(*inputs)
    return int(counter.get_total_flops())


def _flops(model: nn.Module, inputs: tuple) -> int:
    """`count_flops` on meta tensors (resnet50 at batch 1: 12 ms), on real ones when the model's forward needs
    values."""

    try:
        return meta.run([model], lambda *xs: count_flops(model, xs), *inputs)
    except meta.NeedsValues:
        return count_flops(model, _copy_inputs(inputs))


def counted(model: nn.Module, inputs: tuple, count: bool = True) -> tuple[Any, int | None]:
    """The model's output on a fresh copy of `inputs`, and the FLOPs per sample of that forward, summed on the
    way (as `count_flops`, divided by the batch size): the checks' forwards count what a separate run on one
    sample would. None when not asked to count or when they cannot be: inputs without one batch size, or an op the
    plain sum cannot take (the forward then runs again without counting, so the model's own errors come from a
    plain run)."""
    sizes = {x.shape[0] for x in inputs if isinstance(x, torch.Tensor) and x.dim()}
    if not count or len(sizes) != 1 or not next(iter(sizes)):
        return model(*_copy_inputs(inputs)), None
    counter = _FlopSum(_extra_formulas())
    try:
        with counter:
            out = model(*_copy_inputs(inputs))
    except Exception as exc:  # noqa: BLE001 - counted separately (see `_flops`)
        log.debug("flops: not counted on the way (%s: %s)", type(exc).__name__, exc)
        return model(*_copy_inputs(inputs)), None
    return out, round(counter.total / sizes.pop())


def _copy_inputs(inputs: tuple) -> tuple:
    """A fresh copy of the inputs for each run: a model that changes its input in place must not change
    what the other model sees."""
    return tuple(torch.utils._pytree.tree_map(lambda v: v.clone() if isinstance(v, torch.Tensor) else v,
                                              list(inputs)))


def _wrong_mode(original: nn.Module, patched: nn.Module) -> str:
    """Which module of `patched` is not in its original's mode (one surgery added: in its parent's), said as
    "'path' is in train mode where ... is in eval mode"; "" when none. The checks below set both models' modes
    themselves, so they cannot see a module left in another mode (a dropout made in train mode)."""
    flags = {n: m.training for n, m in original.named_modules(remove_duplicate=False)}
    seen: dict[str, bool] = {}
    for name, m in patched.named_modules(remove_duplicate=False):
        parent = name.rpartition(".")[0]
        want, whose = (flags[name], "the original's") if name in flags else (seen.get(parent, m.training), "its parent")
        seen[name] = m.training
        if m.training != want:
            mode = {True: "train", False: "eval"}
            return f"{name or 'root'!r} is in {mode[m.training]} mode where {whose} is in {mode[want]} mode"
    return ""


def _finite(out: Any) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in tensors(out) if t.is_floating_point())


def _grad_structure(out: Any) -> list[bool]:
    return [t.requires_grad for t in tensors(out)]


def _buffers(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: b for k, b in model.named_buffers()}


def _rng_neutral(model: nn.Module, new_modules: list[str]):
    """Hooks that make the inserted modules draw no random numbers from the global generator as seen by the
    rest of the model (its generator state is put back after each of them), so that dropout after an
    inserted module draws what it drew in the original model."""
    handles = []
    for path in new_modules:
        mod = model.get_submodule(path)
        state: list = []
        handles.append(mod.register_forward_pre_hook(lambda m, a, state=state: state.append(torch.get_rng_state())))
        handles.append(mod.register_forward_hook(lambda m, a, o, state=state: torch.set_rng_state(state.pop())))
    return handles


def _seed() -> None:
    """One seed for every generator a model may draw from in train mode: torch's, Python's `random` and
    numpy's (Hugging Face's SpecAugment masks draw from numpy)."""
    import random
    import sys

    torch.manual_seed(0)
    random.seed(0)
    if "numpy" in sys.modules:
        sys.modules["numpy"].random.seed(0)


def _generator_states() -> tuple:
    import random
    import sys

    np = sys.modules.get("numpy")
    return torch.get_rng_state(), random.getstate(), np.random.get_state() if np else None


def _set_generator_states(states: tuple) -> None:
    import random
    import sys

    torch.set_rng_state(states[0])
    random.setstate(states[1])
    if states[2] is not None:
        sys.modules["numpy"].random.set_state(states[2])


@contextmanager
def fixed_generators():
    """Every generator a forward may draw from (see `_seed`) seeded alike for the block, and put back after it.
    Tracing runs a model's Python code, and code that draws random numbers to decide its structure (LayerDrop's
    `if self.training and torch.rand([]) < p`) then traces alike whatever ran before; the caller's own random
    sequence goes on as if surgery had not run."""
    states = _generator_states()
    _seed()
    try:
        yield
    finally:
        _set_generator_states(states)


@dataclass
class _Compared:
    """One mode's comparison: max |diff| (None when not run: `note` says why), and, from a forward with autograd,
    whether every output that required gradients still does and the new parameters' gradients (None: no
    backward pass ran here)."""

    diff: float | None
    note: str = ""
    same_grad: bool = True
    grads: list | None = None


def _same_grad(structure: list[bool], out: Any) -> bool:
    """Every output that required gradients in the original still does (nothing inserted cuts the graph); one that
    did not may now: the new parameters are trainable where the user froze the model (a frozen backbone's output)."""
    got = _grad_structure(out)
    return len(got) == len(structure) and all(p or not o for o, p in zip(structure, got))


def _backward(out: Any, new_params: list) -> list:
    """The gradients of the new parameters (None where the backward pass does not reach one) from the sum of the
    outputs; the original's weight gradients are not computed."""
    loss = sum(t.float().sum() for t in tensors(out) if t.is_floating_point())
    grads: list = [None] * len(new_params)
    trainable = [i for i, p in enumerate(new_params) if p.requires_grad]
    if isinstance(loss, torch.Tensor) and loss.requires_grad and trainable:
        got = torch.autograd.grad(loss, [new_params[i] for i in trainable], allow_unused=True)
        for i, g in zip(trainable, got):
            grads[i] = g
    return grads


def _train_check(original: nn.Module, patched: nn.Module, inputs: tuple, new_modules: list[str],
                 new_params: list) -> _Compared:
    """Both models in train mode under one seed, with autograd as in training: max |diff| over outputs and the
    original's buffers (running statistics), the gradient structure and a backward pass through the patched
    model; or None and why when the original cannot run in train mode on these inputs."""
    shared = _buffers(original)
    saved = {k: b.clone() for k, b in shared.items()}

    def restore():
        with torch.no_grad():
            for k, b in shared.items():
                b.copy_(saved[k])

    handles = _rng_neutral(patched, new_modules)
    try:
        with fixed_generators():  # both runs draw from one seed; the caller's generators are put back
            set_mode(original, True), set_mode(patched, True)
            try:
                expected = original(*_copy_inputs(inputs))
            except Exception as exc:  # noqa: BLE001 - e.g. detectors need targets in train mode
                return _Compared(None, f"the model does not run in train mode on the example input "
                                       f"({type(exc).__name__})")
            structure = _grad_structure(expected)
            expected = [t.detach() for t in tensors(expected)]
            after = {k: b.clone() for k, b in shared.items()}
            restore()
            _seed()
            out = patched(*_copy_inputs(inputs))
        got = [t.detach() for t in tensors(out)]
        diff = max_abs_diff(expected, got)
        for k, b in shared.items():
            if b.is_floating_point():
                diff = max(diff, float((after[k].double() - b.double()).abs().max()) if b.numel() else 0.0)
            elif not torch.equal(after[k], b):
                diff = float("inf")
        if not _finite(got) and _finite(expected):
            diff = float("nan")
        return _Compared(diff, "", _same_grad(structure, out), _backward(out, new_params))
    finally:
        restore()
        for h in handles:
            h.remove()


def verify(original: nn.Module, patched: nn.Module, inputs: tuple, new_modules: list[str], *,
           tolerance: float | None = 1e-5, flops_at: tuple | None = None,
           flops_added: int | None = None, flops_original: int | None = None) -> Verification:
    """Run `inputs` through both models on CPU and compare, each on its own copy of the inputs.

    1. Train mode under one seed, with autograd, inserted modules made neutral to the random generator: outputs
       and the running statistics the original updates (restored afterwards); that every output requiring grad
       in the original still does; and a backward pass from the patched output: which new parameters it reaches.
    2. Eval mode: max |diff|, NaN/inf where the original is finite. Without autograd, as inference runs (torch's
       fused inference paths run only there), when 1 ran; with it, and the gradient checks of 1, when it did not
       (a detector needs targets in train mode; paper init changes the output by design).
    3. FLOPs per sample of each, summed during the eval forwards (on one sample apart, when they cannot be summed
       on the way).

    Args:
        new_modules: module paths (in `patched`) the edits inserted.
        tolerance: the max |diff| allowed (identity init), or None when the output may change (paper init).
        flops_at: the inputs to count FLOPs at, when `inputs` are smaller stand-ins for them (on one sample, on
            meta tensors where the forward allows).
        flops_added: with `flops_at`, what the new modules add per sample there, counted on each alone (edits that
            only insert modules): the patched model's FLOPs are the original's plus these.
        flops_original: with `flops_at`, the original's FLOPs per sample there when they are known (counted while
            surgery recorded the model's calls at that size, see `shapes.record_calls`), else counted here.
    """
    wrong_mode = _wrong_mode(original, patched)
    saved = {p: p.grad for p in patched.parameters()}
    # what the original's own forward stores on its modules (RAFT's correlation pyramid) is put back: checking
    # must not leave the user's model holding this run's tensors (and their autograd graph); and every module's
    # own mode is put back afterwards, not the root's spread over all (a frozen norm in eval mode inside a
    # training model stays frozen)
    with meta.put_back(original), in_mode(original, False), in_mode(patched, False):
        try:
            new_params = [p for path in new_modules for p in patched.get_submodule(path).parameters()]
            for p in saved:
                p.grad = None
            train_only = [p for p in new_modules
                          if any(getattr(m, "identity_in_train", True) is False for m in patched.get_submodule(p).modules())]
            if tolerance is None:
                train = _Compared(None, "not compared: the edits change the output by design")
            elif train_only:
                train = _Compared(None, f"not compared: {train_only[0]!r} acts in training by design")
            else:
                train = _train_check(original, patched, inputs, new_modules, new_params)
            set_mode(original, False), set_mode(patched, False)
            with_autograd = train.grads is None  # the gradient checks are made here
            with nullcontext() if with_autograd else torch.no_grad():
                expected, flops_before = counted(original, inputs, flops_at is None)
                output_type = type(expected).__name__
                structure = _grad_structure(expected)
                expected = [t.detach() for t in tensors(expected)]
                # one forward serves the comparison, the gradient checks and the FLOPs
                out, flops_after = counted(patched, inputs, flops_at is None)
            diff = max_abs_diff(expected, [t.detach() for t in tensors(out)])
            if not _finite(out) and all(bool(torch.isfinite(t).all()) for t in expected if t.is_floating_point()):
                diff = float("nan")
            if with_autograd:
                same_grad, grads = _same_grad(structure, out), _backward(out, new_params)
            else:
                same_grad, grads = train.same_grad, train.grads
            del out
            if any(g is None for g in grads) and not with_autograd:
                # the train-mode forward skipped some (LayerDrop draws which layers run): an eval-mode forward with
                # autograd runs every layer, and what either backward pass reaches counts as reached
                with torch.enable_grad():
                    again = _backward(patched(*_copy_inputs(inputs)), new_params)
                grads = [g if g is not None else h for g, h in zip(grads, again)]
            with_grad = sum(g is not None for g in grads)
            nonzero = sum(g is not None and bool(g.abs().sum() > 0) for g in grads)
            one = tuple(x[:1] if isinstance(x, torch.Tensor) and x.dim() else x for x in flops_at or inputs)
            if flops_at is not None:
                flops_before = _flops(original, one) if flops_original is None else flops_original
                flops_after = _flops(patched, one) if flops_added is None else flops_before + flops_added
            elif flops_before is None or flops_after is None:
                flops_before, flops_after = _flops(original, one), _flops(patched, one)
        finally:
            for p, g in saved.items():
                p.grad = g
    return Verification(max_abs_diff=diff, tolerance=tolerance,
                        params_added=sum(p.numel() for p in new_params), flops_before=flops_before,
                        flops_after=flops_after, new_params=len(new_params), with_grad=with_grad,
                        nonzero_grad=nonzero, train_max_abs_diff=train.diff, train_note=train.note,
                        same_grad_structure=same_grad, outputs=len(expected), output_type=output_type,
                        wrong_mode=wrong_mode)
