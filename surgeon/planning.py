"""Planning: from a model to a `Plan` — the example input, the model traced with its shapes, the sites chosen
for an attention (its first kind, or the next kind the model has), and the `Edit`s with their overhead
(parameters, FLOPs). `Plan.apply` performs the edits (`surgery.scope`) and verifies the result
(`surgery.verify`). Nothing here changes the user's model.
"""
from __future__ import annotations

import dataclasses
import functools
import gc
import inspect
import itertools
import logging
from contextlib import ExitStack, contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import torch
from torch import nn

from surgeon import hf, models, record, registry, sizes
from surgeon.errors import (ModelError, NoSitesError, OptionError, ShapeError, SurgeonError, VerificationError,
                            did_you_mean, warn)
from surgeon.references import library_reference
from surgeon.surgery import rewrite as rw
from surgeon.surgery import scope
from surgeon.surgery.owned import in_mode, join_path, structural_copy
from surgeon.surgery import shapes
from surgeon.surgery.graph import GraphView
from surgeon.surgery.sites import Site, find_sites
from surgeon.surgery.trace import Traced, trace, trace_alone
from surgeon.surgery.meta import put_back
from surgeon.surgery.verify import Verification, fixed_generators, verify

log = logging.getLogger("surgeon")

EXAMPLE_BATCH = 2


# -- inputs ------------------------------------------------------------------------------------------
def placement(model: nn.Module) -> tuple[torch.device, torch.dtype]:
    """The device and floating dtype of the model's weights (its first floating parameter or buffer; CPU and
    the default dtype for a model without any). Example inputs and inserted modules follow them."""
    for t in itertools.chain(model.parameters(), model.buffers()):
        if t.is_floating_point():
            return t.device, t.dtype
    return torch.device("cpu"), torch.get_default_dtype()


def on_meta(model: nn.Module) -> bool:
    """Whether the model was built on the meta device (shapes and no values: surgery works, verification
    cannot run)."""
    return placement(model)[0].type == "meta"


def _placed(inputs: tuple, model: nn.Module) -> tuple:
    device, dtype = placement(model)
    return tuple(x.to(device, dtype if x.is_floating_point() else x.dtype) if isinstance(x, torch.Tensor) else x
                 for x in inputs)


def _guess_input(model: nn.Module, generator: torch.Generator) -> tuple[torch.Tensor, ...]:
    if hf.is_hf(model):
        found = hf.example_input(model, generator, EXAMPLE_BATCH)
        if found is not None:
            return found
    for _, m in model.named_modules():
        if isinstance(m, nn.Conv2d):
            return (torch.randn(EXAMPLE_BATCH, m.in_channels, 224, 224, generator=generator),)
        if isinstance(m, nn.Conv1d):
            return (torch.randn(EXAMPLE_BATCH, m.in_channels, 256, generator=generator),)
        if isinstance(m, nn.Conv3d):
            return (torch.randn(EXAMPLE_BATCH, m.in_channels, 16, 112, 112, generator=generator),)
        if isinstance(m, nn.Embedding):
            return (torch.randint(0, m.num_embeddings, (EXAMPLE_BATCH, 32), generator=generator),)
        if isinstance(m, nn.RNNBase):
            shape = (EXAMPLE_BATCH, 32, m.input_size) if m.batch_first else (32, EXAMPLE_BATCH, m.input_size)
            return (torch.randn(*shape, generator=generator),)
        if isinstance(m, nn.Linear):
            return (torch.randn(EXAMPLE_BATCH, m.in_features, generator=generator),)
    raise ShapeError(f"Cannot tell what input {type(model).__name__} takes. Pass example_input= "
                     f"(Python) or --input-size C,H,W (CLI)")


def example_inputs(model: nn.Module, *, input_size: Sequence[int] | None = None,
                   example_input: Any = None) -> tuple:
    """The example input used for shapes and verification, as a tuple of positional arguments.

    Order: `example_input` (a tensor, a tuple of positional arguments, or a mapping of keyword arguments such as
    a tokenizer's output, placed by the forward's signature); `input_size` (per sample, e.g. (3, 224, 224)); the
    model's own metadata (a surgery record, timm `pretrained_cfg['input_size']`, torchvision weights' crop size and clip
    length: see `surgeon.sizes`); a guess from its first layer; a forward with several required arguments
    (two frames) gets one such tensor each. Made inputs are on the model's device, floating ones in its
    dtype (see `placement`).
    """
    if isinstance(example_input, Mapping):  # keyword arguments (a tokenizer's output): bound by position
        return _by_position(model, example_input)
    if example_input is not None:
        return tuple(example_input) if isinstance(example_input, (tuple, list)) else (example_input,)
    gen = torch.Generator().manual_seed(0)
    size = tuple(input_size) if input_size else sizes.configured_size(model)
    if size:
        if any(not isinstance(d, int) or d <= 0 for d in size):
            raise OptionError(f"input size {size} must be positive integers, e.g. 3,224,224")
        inputs = (torch.randn(EXAMPLE_BATCH, *size, generator=gen),)
    else:
        inputs = _guess_input(model, gen)
    if len(inputs) == 1 and inputs[0].is_floating_point():  # a forward taking two frames (RAFT): one each
        inputs = inputs + tuple(torch.randn(inputs[0].shape, generator=gen) for _ in range(_required(model) - 1))
    return _placed(inputs, model)


def _by_position(model: nn.Module, named: Mapping) -> tuple:
    """Keyword example inputs as the positional arguments of the model's forward (surgery passes inputs by
    position): each name at its parameter's place, the defaults of the parameters left out before the last one.

    Raises:
        OptionError: a name the forward does not take by position, or one left out that has no default.
    """
    what = f"{type(model).__name__}.forward"
    try:
        params = list(inspect.signature(model.forward).parameters.values())
    except (TypeError, ValueError):
        raise OptionError(f"{what} has no signature to bind the example input's names to: pass a tuple") from None
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    names = [p.name for p in positional]
    for key in named:
        if key not in names:
            takes = f"({', '.join(names) or 'none'})"
            if any(p.name == key and p.kind == p.KEYWORD_ONLY for p in params):
                raise OptionError(f"example_input {key!r} is a keyword-only argument of {what}; surgery passes example "
                                  f"inputs by position {takes}")
            raise OptionError(f"example_input {key!r} is not an argument {what} takes by position "
                              f"{takes}.{did_you_mean(str(key), names)}")
    last = max((names.index(k) for k in named), default=-1)
    args = []
    for p in positional[:last + 1]:
        if p.name in named:
            args.append(named[p.name])
        elif p.default is not p.empty:
            args.append(p.default)
        else:
            raise OptionError(f"example_input has no {p.name!r}, which {what} needs before "
                              f"{', '.join(repr(k) for k in names[names.index(p.name) + 1:last + 1] if k in named)}")
    return tuple(args)


def _required(model: nn.Module) -> int:
    """How many positional arguments without a default the model's forward takes."""
    try:
        params = inspect.signature(model.forward).parameters.values()
    except (TypeError, ValueError):
        return 1
    return sum(p.default is p.empty and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) for p in params)


# -- the steps ---------------------------------------------------------------------------------------
@dataclass
class _Prepared:
    model: nn.Module
    traced: Traced
    inputs: tuple
    views: list[GraphView]
    small_images: bool = False  # a detector traced and verified on small images (see sizes.small_images)
    given: bool = False  # the user gave the example input (verification runs on it as given)

    @functools.cached_property
    def dropped_calls(self) -> set[str]:
        """Paths of the modules whose every call in a graph that keeps them whole is dropped (their value does not
        reach that graph's output: blocks an encoder runs past the depth its model uses), so that nothing inside
        them, traced as graphs of their own, is worth editing."""
        live, dropped = set(), set()
        for view in self.views:
            for n in view.nodes:
                if n.op == "call_module":
                    (live if n in view.live else dropped).add(join_path(view.prefix, n.target))
        return dropped - live


@contextmanager
def gc_paused():
    """No cyclic garbage collection inside: tracing and copying make hundreds of thousands of small objects,
    and each collection they trigger walks every object the user's process holds (3-50% of a surgery's time
    in a process holding five timm models). What the block leaves behind is collected after it; a caller's
    own `gc.disable()` stays."""
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


@contextmanager
def surgery_mode():
    """What surgery runs under, whatever the caller's settings: `gc_paused`, and inference mode off (which turns
    autograd on too), so that inserted modules get trainable parameters and verification its backward pass when
    the caller is inside `torch.no_grad()` or `torch.inference_mode()` (an evaluation script's setup)."""
    with gc_paused(), torch.inference_mode(False):
        yield


def surgery_call(fn):
    """`fn` run inside `surgery_mode`."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with surgery_mode():
            return fn(*args, **kwargs)
    return wrapper


def _prepare(model: nn.Module | str, *, example_input: Any = None, input_size: Sequence[int] | None = None,
             small_images: bool | None = None, count_flops: bool = True) -> _Prepared:
    """The model (loaded from a reference), its example inputs, and its trace with shapes. `count_flops`: count the
    model's FLOPs at the example's size in the forward that records its calls (`shapes.record_calls`), for a
    verification on smaller images to report."""
    if isinstance(model, str):
        model = models.load(model)
    if not isinstance(model, nn.Module):
        raise ModelError(f"Expected a torch.nn.Module or a model reference string, got {type(model).__name__}")
    if isinstance(model, torch.jit.ScriptModule):
        raise ModelError(f"{type(model).__name__} is TorchScript (torch.jit.script or trace), which surgery cannot "
                         "edit: patch the nn.Module it was made from, then script the patched model")
    lazy = next((path for path, m in model.named_modules()
                 if isinstance(m, nn.modules.lazy.LazyModuleMixin) and m.has_uninitialized_params()), None)
    if lazy is not None:
        # the copies surgery runs share the parameters, and running them would initialise the user's own
        raise ModelError(f"{type(model.get_submodule(lazy)).__name__} at {lazy or 'the root'!r} has uninitialised "
                         "(lazy) parameters: run the model once on an example input to initialise them, then patch it")
    if any(t.is_inference() for t in itertools.chain(model.parameters(), model.buffers())):
        raise ModelError(f"{type(model).__name__} holds tensors made under torch.inference_mode, which can be neither "
                         "trained nor checked with a backward pass: build or load the model outside inference_mode")
    inputs = example_inputs(model, input_size=input_size, example_input=example_input)
    leaf_paths = {e["module"] for e in rw.edits_of(model)}
    # tracing runs the model's Python code on proxies, and that code may store what it computes on the
    # module (lazily set scales, caches): trace a structural copy so the user's model is never changed
    copy = structural_copy(model)
    # a detector that resizes every image to 800 pixels runs on small ones, unless the user gave the input
    small = sizes.resizes_large(model) and example_input is None if small_images is None else small_images
    with ExitStack() as smaller:
        smaller.enter_context(fixed_generators())  # what tracing draws does not depend on what ran before
        if small:
            smaller.enter_context(sizes.small_images(copy))
        # (only where verification will run on smaller images, see `Plan._verify`)
        count_flops = count_flops and _checked_smaller(inputs, example_input is not None, small) is not None
        recorded = shapes.record_calls(copy, inputs, count_flops=count_flops)
        traced = trace(copy, leaf_paths=leaf_paths, calls=recorded.calls)
        traced.extra_leaves = set(leaf_paths)
        traced.packed = recorded
        if not isinstance(traced.module, torch.fx.GraphModule):
            # the Python parts around the graphs run for real when shapes are recorded: on a fresh copy, since
            # tracing may have left proxies in lazily set attributes of the traced copy (RoI poolers' scales)
            traced.module = structural_copy(model)
            if small:
                smaller.enter_context(sizes.small_images(traced.module))
        shapes.propagate(traced, inputs, model=model)
    views = [GraphView(gm, prefix) for prefix, gm in traced.graphs.items()]
    return _Prepared(model, traced, inputs, views, small_images=small, given=example_input is not None)

@dataclass
class Edit:
    """One (site, attention, options) choice with its built module and overhead."""

    site: Site
    attention: str
    options: dict[str, Any]
    init: str
    module: nn.Module = field(repr=False)
    params: int = 0
    flops: int = 0
    shape_checked: bool = field(default=False, repr=False)  # the module alone returned its site's shape
    # max |module(x) - x| of the module alone on a random x of its site's shape (one sample, eval mode): an
    # insertion at identity init must return its input (see `Plan._verify`); None when not run
    alone_diff: float | None = field(default=None, repr=False)

    def to_dict(self) -> dict[str, Any]:
        return {"site": self.site.name, "kind": self.site.kind, "shape": list(self.site.shape),
                "attention": self.attention, "options": self.options, "init": self.init,
                "params": self.params, "flops": self.flops}


def _edit_flops(site: Site, module: nn.Module, attention: str = "") -> tuple[int, bool, float | None]:
    """The module's FLOPs on its site's shapes (batch 1); whether that run showed it returns the site's shape
    (then the patched model need not run to check it; see `Plan.apply`); and, for an insertion, max |output −
    input| of that run, on a random input (see `Edit.alone_diff`).

    Raises:
        ShapeError: the module ran and returned another shape than its site's.
    """
    from surgeon.surgery.verify import count_flops, max_abs_diff

    if site.action == "insert":
        shapes_in = [site.shape]
    else:  # the module gets the site's args it reads (see rewrite.arg_indices)
        every = site.info.get("arg_shapes") or (
            [site.shape, *site.info["extra_shapes"]] if site.info.get("extra_shapes") else [site.shape, site.out_shape])
        shapes_in = [every[i] for i in rw.arg_indices(module, len(every)) if i < len(every)]
    out: list = []
    hook = module.register_forward_hook(lambda _m, _a, y: out.append(y))
    device, dtype = placement(module)
    if site.action == "insert":  # random values: what the module must return unchanged at identity init
        inputs = (torch.randn((1, *site.shape[1:]), generator=torch.Generator().manual_seed(0)).to(device, dtype),)
    else:  # ones: a mask of ones keeps every step, so masked attentions count their full cost
        inputs = tuple(torch.ones(1, *s[1:], device=device, dtype=dtype) for s in shapes_in)
    try:
        with in_mode(module, False):  # the module keeps the model's mode (see api.plan)
            # (on meta tensors the counter's dispatch is slower than this); on a copy: a module may write its input
            flops = count_flops(module, tuple(x.clone() for x in inputs))
    except Exception as exc:  # FLOPs are informative; never fail a plan on them
        log.debug("site %s: FLOPs not counted (%s)", site.name, exc)
        return 0, False, None
    finally:
        hook.remove()
    want = tuple(site.shape if site.action == "insert" else site.out_shape)
    if not (out and isinstance(out[0], torch.Tensor) and want):
        return flops, False, None
    have = (want[0], *out[0].shape[1:])
    if have != want:
        raise ShapeError(f"{attention or type(module).__name__} at {site.name!r} changed the shape {want} to {have}")
    alone = None
    if site.action == "insert" and device.type != "meta":
        alone = 0.0 if torch.equal(inputs[0], out[0]) else max_abs_diff(inputs[0], out[0])
    return flops, True, alone


def _worth_editing(prep: _Prepared, site: Site) -> bool:
    """Whether an edit at the site can do anything: its value must reach its graph's output (not an encoder
    stage the decoder drops), in a module whose call reaches the output of the graph calling it (`dropped_calls`),
    and be computed with gradients (not inside `torch.no_grad()`)."""
    view = next(v for v in prep.views if v.prefix == site.graph)
    node = next((n for n in view.nodes if n.name == site.node), None)
    if node is not None and node in view.without_grad:
        log.info("site %s: skipped, it is computed without gradients (torch.no_grad)", site.name)
        return False
    if node is not None and node not in view.live:
        log.info("site %s: skipped, its value does not reach the output", site.name)
        return False
    # the site's graph, or a module holding it, called whole where its value is dropped
    holders = itertools.accumulate(site.graph.split("."), join_path) if site.graph else ()
    dropped = next((p for p in holders if p in prep.dropped_calls), None)
    if dropped is not None:
        log.info("site %s: skipped, what %r returns does not reach the output", site.name, dropped)
        return False
    return True


def _choose_kind(att: registry.Attention, kind: str | None, prep: _Prepared,
                 at: Sequence[str] | None) -> tuple[list[Site], str]:
    """The sites to edit, and a note when they are not of the attention's first kind (why, and what instead).

    Raises:
        NoSitesError: no site fits; or the only fallback is a single convolution (a transformer's
        patch-embedding), which would be an edit in name only.
    """
    if kind is not None:
        registry.check_kind(kind)
        if kind not in att.kinds:
            raise OptionError(f"{att.name} cannot serve kind {kind!r}; it serves {', '.join(att.kinds)}")
        candidates = [kind]
    else:
        candidates = list(att.kinds)
    unmatched: NoSitesError | None = None
    elsewhere: list[Site] = []  # sites of the attention's kinds in a layout it does not act on
    for k in candidates:
        try:
            every = find_sites(prep.views, [k], list(at) if at else None, finders=registry.finders())
        except NoSitesError as exc:  # --at matched no site of this kind: try the attention's next kind
            unmatched = unmatched or exc
            continue
        found = [s for s in every if s.layout in att.layouts and _worth_editing(prep, s)]
        elsewhere += [s for s in every if s.layout not in att.layouts]
        if found:
            if k == candidates[0]:
                return found, ""
            model_name = type(prep.model).__name__
            tried = "/".join(candidates[:candidates.index(k)])
            if len(found) == 1 and k == "after_conv" and not at:
                raise NoSitesError(
                    f"{att.name} found no {tried} site {_fitting(att, elsewhere, model_name) or f'in {model_name}'}"
                    f", and its only {k} site is {found[0].name!r}: one edit there would not be a meaningful "
                    f"retrofit. Pass --kind {k} (kind={k!r}) to insert it anyway, or run 'surgeon sites MODEL' "
                    f"to see the model's sites")
            note = f"{att.name}: {model_name} has no {tried} site; using its {len(found)} {k} sites instead"
            log.info(note)
            return found, note
    if unmatched is not None:
        raise unmatched
    model_name = type(prep.model).__name__
    where = _fitting(att, elsewhere, model_name)
    raise NoSitesError(f"{att.name} found no {'/'.join(candidates)} site with a {'/'.join(att.layouts)} layout "
                       + (where if where else f"in {model_name}") + (f" matching {list(at)}" if at else "") +
                       ". Run 'surgeon sites MODEL' to see the model's sites")


def _fitting(att: registry.Attention, elsewhere: list[Site], model_name: str) -> str:
    """'in ViT (its 24 residual sites are nlc: se, eca, gc, srm act there)': the attentions that fit the sites
    of `att`'s kinds that `att` cannot act on (a transformer's token residuals for a spatial attention)."""
    if not elsewhere:
        return ""
    pairs = [(s.kind, s.layout) for s in elsewhere]  # the most common known layout; unknown only when all are
    kind, layout = max(pairs, key=lambda pair: (pair[1] != "unknown", pairs.count(pair)))
    count = sum((s.kind, s.layout) == (kind, layout) for s in elsewhere)
    fits = [a.name for a in registry.attentions().values() if layout in a.layouts and kind in a.kinds]
    return (f"in {model_name} (its {count} {kind} sites are {layout}: "
            + (f"{', '.join(fits)} act there)" if fits else "no attention acts there)"))


class Plan:
    """The ordered edits for one model, printable before anything changes; `apply()` performs them."""

    def __init__(self, prep: _Prepared, edits: list[Edit]):
        self._prep = prep
        self.edits = edits
        self.verification: Verification | None = None
        self._applied = False
        self._choice: scope.Choice | None = None
        self.note = ""  # why the sites are not of the attention's first kind, when they are not

    @property
    def model(self) -> nn.Module:
        return self._prep.model

    @property
    def example_inputs(self) -> tuple:
        return self._prep.inputs

    def owners(self) -> dict[str, str]:
        """{site name: the module whose forward the edit rewrites ('' = the model's own forward)}."""
        return self._chosen().by_site()

    @surgery_call
    def _chosen(self) -> scope.Choice:
        if self._choice is None:  # decided once: the table, --json and apply() share it
            calls = self._prep.traced.calls
            with fixed_generators():  # owners trace as the model did (see `_prepare`)
                self._choice = scope.choose(self.model, self._prep.traced,
                                            [(e.site, e.module, e.attention) for e in self.edits],
                                            lambda m, leaves, path: trace_alone(m, leaves, calls.get(path)),
                                            calls.get)
        return self._choice

    @property
    def params(self) -> int:
        return sum(e.params for e in self.edits)

    @property
    def flops(self) -> int:
        return sum(e.flops for e in self.edits)

    def to_dict(self) -> dict[str, Any]:
        owners = self.owners()
        return {"model": (record.base(self.model) or {}).get("ref") or type(self.model).__name__,
                "edits": [{**e.to_dict(), "owner": owners.get(e.site.name, "")} for e in self.edits],
                "params_added": self.params,
                "flops_added": self.flops}

    def table(self):
        """The plan as a rich Table (see `surgeon.render.plan_table`)."""
        from surgeon import render

        return render.plan_table(self)

    def __rich__(self):
        return self.table()

    def __str__(self) -> str:
        from surgeon import render

        return render.plan_text(self)

    @surgery_call
    def apply(self, *, verify: bool = True, tolerance: float = 1e-5) -> nn.Module:
        """Perform the edits. Returns the patched model: an instance of the model's own class in which only
        the modules whose forward holds a site are rewritten (see `surgery.scope`), sharing the original's
        parameter and buffer tensors. The model it was made from is not changed.

        Raises:
            VerificationError: identity init changed the output beyond `tolerance`, or gradients do
            not reach the new parameters.
        """
        if self._applied:  # the traced copy is consumed; plan again on a fresh trace
            fresh = _prepare(self.model, example_input=self._prep.inputs, small_images=self._prep.small_images)
            self._prep = _Prepared(self.model, fresh.traced, fresh.inputs, fresh.views, fresh.small_images,
                                   self._prep.given)
            self._choice = None
        self._applied = True
        patched, paths, owners = scope.rewrite(self.model, self._chosen(), rw.insert)
        rec = record.detach(patched, self.model)  # never share the record with the input model
        if rec["model"] is None:
            record.set_base(patched, library_reference(self.model, search=False))
        x = self._prep.inputs[0]
        if rec["input_size"] is None and isinstance(x, torch.Tensor) and x.is_floating_point():
            record.set_input_size(patched, x.shape[1:])
        if not rec.get("example_input") and (len(self._prep.inputs) > 1 or not x.is_floating_point()
                                             if isinstance(x, torch.Tensor) else False):
            # several inputs, or integer ones (token ids): an input size cannot rebuild them
            record.set_example_input(patched, self._prep.inputs)
        # edits of one apply() share a step: a recipe replays each step as one plan, in order
        step = 1 + max((e.step for e in record.edits(patched)), default=0)
        record.add_edits(patched, [record.EditRecord(
            site=e.site.name, kind=e.site.kind, shape=tuple(e.site.shape), attention=e.attention,
            options=dict(e.options), init=e.init, module=paths[e.site.name], owner=owners[e.site.name],
            params=e.params, flops=e.flops, step=step) for e in self.edits])
        with sizes.small_images(self.model, patched) if self._prep.small_images else nullcontext():
            _check_shapes(patched, self._prep.inputs, [e for e in self.edits if not e.shape_checked], paths)
            if verify and on_meta(self.model):  # nothing to compare: say so, never pass silently
                unverified = (f"not verified: {type(self.model).__name__} is on the meta device (shapes, no values); "
                              "load its weights, then check with surgeon.verify_model")
                self.note = "; ".join(filter(None, [self.note, unverified]))
                warn(unverified)
            elif verify:
                inits = {e.init for e in self.edits}
                self.verification = self._verify(patched, paths, tolerance if inits == {"identity"} else None)
                record.set_verification(patched, self.verification)
        return patched

    def _verify(self, patched: nn.Module, paths: dict[str, str], tolerance: float | None) -> Verification:
        """`verify_model` on the example input; or, on images the example's size was chosen for (not given by the
        user), on images four times smaller per side (`sizes.for_checking`: the same graph on smaller maps; a
        decision on sizes is guarded), when each inserted module returned its input alone at its site's size
        (`Edit.alone_diff`), with the FLOPs counted at the example's. When the smaller check cannot decide (the
        original does not run on smaller images, or not in train mode) or fails, the example's size decides; a pass
        there after a failure on smaller images is said in a warning: the patched model then differs from the
        original at other sizes."""
        inputs, new = self._prep.inputs, list(paths.values())
        smaller = _checked_smaller(inputs, self._prep.given, self._prep.small_images)
        if smaller is None or any(e.site.action != "insert" for e in self.edits) or (
                tolerance is not None and not all(e.alone_diff is not None and e.alone_diff <= tolerance
                                                  for e in self.edits)):
            return verify_model(self.model, patched, inputs, new, tolerance=tolerance)
        shape = "x".join(map(str, smaller[0].shape))
        try:
            counted = all(e.shape_checked for e in self.edits)  # each module's FLOPs were counted alone
            v = verify(self.model, patched, smaller, new, tolerance=tolerance, flops_at=inputs,
                       flops_added=sum(e.flops for e in self.edits) if counted else None,
                       flops_original=self._prep.traced.packed.flops if self._prep.traced.packed else None)
            problem = v.problem() or ("" if tolerance is None or v.train_max_abs_diff is not None else None)
        except Exception as exc:  # noqa: BLE001 - decided on the example's size below
            problem = None if not _runs(self.model, smaller) else \
                str(exc) if isinstance(exc, SurgeonError) else f"{type(exc).__name__}: {exc}"
        if problem == "":
            return dataclasses.replace(v, smaller=shape)
        log.info("verification: on %s %s; checking on the example's size", shape, problem or "it cannot decide")
        v = verify_model(self.model, patched, inputs, new, tolerance=tolerance)
        if problem:
            warn(f"The patched model computes the original at the example's size, not at {shape}: {problem}")
        return v


def _checked_smaller(inputs: tuple, given: bool, small_images: bool) -> tuple | None:
    """The smaller images verification checks the whole model on (`sizes.for_checking`), or None: not when the
    user gave the example input, nor for a model traced on small images already (a detector)."""
    return None if given or small_images else sizes.for_checking(inputs)


def _check_shapes(patched: nn.Module, inputs: tuple, edits: list[Edit], paths: dict[str, str]) -> None:
    """Run the patched model once; every inserted module in `edits` must return the shape its site had."""
    if not edits:
        return
    got = shapes.module_outputs(patched, inputs, [paths[e.site.name] for e in edits])
    for e in edits:
        want = e.site.shape if e.site.action == "insert" else e.site.out_shape
        have = got.get(paths[e.site.name])
        if have is not None and have != tuple(want):
            raise ShapeError(f"{e.attention} at {e.site.name!r} changed the shape {tuple(want)} to {have}")


def _runs(model: nn.Module, inputs: tuple) -> bool:
    """Whether the model's eval-mode forward runs on `inputs` (what it stores on its modules is put back)."""
    try:
        with put_back(model), torch.no_grad(), in_mode(model, False):
            model(*inputs)
        return True
    except Exception:  # noqa: BLE001 - the model's own refusal of these inputs
        return False


@surgery_call
def verify_model(original: nn.Module, patched: nn.Module, inputs: tuple, new_modules: list[str], *,
                 tolerance: float | None = 1e-5) -> Verification:
    """Check a patched model against the model it was made from (see `surgery.verify`).

    Raises:
        VerificationError: when the check fails.
    """
    v = verify(original, patched, inputs, new_modules, tolerance=tolerance)
    problem = v.problem()
    if problem is not None:
        raise VerificationError(problem)
    return v

