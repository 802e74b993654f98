"""See what inserted attention does: `capture` (the weights every edit applied, its γ, its effect size on a
batch) and `gates` (one row per edit: |γ| and effect size). Pictures are drawn by `surgeon.maps`.

One forward in eval mode without gradients, with hooks: on each edit's inserted module (its input and
output give the effect size) and on the attention layer inside it, whose `applied(*inputs)` method (see
`surgeon.layers.applied`) recomputes the weights it applied to those inputs.
"""
from __future__ import annotations

import inspect
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from surgeon import record
from surgeon.errors import ModelError
from surgeon.layers.applied import Applied
from surgeon.layers.gate import ZeroGate
from surgeon.surgery.owned import in_mode

__all__ = ["Capture", "GateStat", "capture", "gates", "attention_layer"]


@dataclass
class Capture:
    """What one edit applied on a batch.

    site, attention, module: the edit (see `surgeon.edits`). parts: the weights by part name
    (`{'channel': Applied('channel', (N, C))}`; CBAM has 'channel' and 'spatial'); empty when the layer
    has no `applied` method (a plugin's). gate: γ by gate path inside the module ('' = the module
    itself), empty without gates (paper init, merged, or an attention that starts as the identity
    by its own init). effect: mean |y − x| / mean |x| over the batch, x what the model computed at
    this place without the edit's output (the module's input, or the replaced op's result), None when
    that is not available (a replacement of another shape that keeps no original result).
    """

    site: str
    attention: str
    module: str
    parts: dict[str, Applied] = field(default_factory=dict)
    gate: dict[str, torch.Tensor] = field(default_factory=dict)
    effect: float | None = None

    @property
    def kind(self) -> str | None:
        """The first part's kind ('channel', 'spatial', ...), None when nothing was captured."""
        return next(iter(self.parts.values())).kind if self.parts else None

    @property
    def weights(self) -> torch.Tensor | None:
        """The first part's weights (see `surgeon.layers.applied.KINDS` for shapes)."""
        return next(iter(self.parts.values())).weights if self.parts else None

    @property
    def gamma(self) -> float | None:
        """mean |γ| over every gate entry of the edit (None without gates)."""
        if not self.gate:
            return None
        flat = torch.cat([g.flatten().abs() for g in self.gate.values()])
        return float(flat.mean())


@dataclass(frozen=True)
class GateStat:
    """One row of `gates`: the edit, mean |γ| (None: no gate) and the effect size (None: not measurable)."""

    site: str
    attention: str
    gamma: float | None
    effect: float | None

    def to_dict(self) -> dict[str, Any]:
        return {"site": self.site, "attention": self.attention, "gamma": self.gamma, "effect": self.effect}


def attention_layer(module: nn.Module) -> tuple[str, nn.Module] | None:
    """The outermost module inside `module` (itself included) that has an `applied` method, with its path."""
    for name, m in module.named_modules():
        if callable(getattr(m, "applied", None)):
            return name, m
    return None


def _reference_index(module: nn.Module) -> int:
    """Which positional input is what the model computed here without the edit: a replacement's `orig`
    (the replaced op's result), else the first."""
    try:
        names = [p.name for p in inspect.signature(module.forward).parameters.values()]
    except (TypeError, ValueError):
        return 0
    return names.index("orig") if "orig" in names else 0


def _effect(module: nn.Module, args: tuple, out: Any) -> float | None:
    i = _reference_index(module)
    x = args[i] if i < len(args) else None
    if isinstance(out, (tuple, list)) and out:
        out = out[0]
    if not (isinstance(x, torch.Tensor) and isinstance(out, torch.Tensor)) or x.shape != out.shape:
        return None
    x, out = x.detach().float(), out.detach().float()
    scale = float(x.abs().mean())
    return float((out - x).abs().mean()) / scale if scale > 0 else None


def _detached(parts: dict[str, Applied]) -> dict[str, Applied]:
    return {k: Applied(p.kind, p.weights.detach().contiguous().clone()) for k, p in parts.items()}


def _inputs(model: nn.Module, inputs: tuple) -> tuple:
    if inputs:
        return inputs
    recorded = record.example_input(model)
    if recorded:
        return recorded
    from surgeon.planning import example_inputs

    return example_inputs(model)


def capture(model: nn.Module, *inputs: Any, **kwargs: Any) -> dict[str, Capture]:
    """Run `model` once (eval mode, no gradients) and capture, per edit, what its attention applied.

    Args:
        model: a patched model (`surgeon.add`, `surgeon.load`).
        *inputs, **kwargs: the model's inputs (default: the example input recorded at surgery, else
            one from the model's config).

    Returns:
        {site name: Capture} in edit order (an edit at a site that already has one is keyed by its
        module path).

    Raises:
        ModelError: the model has no edits.

    Example:
        >>> caps = surgeon.capture(patched, images)
        >>> caps["layer1.0"].kind, caps["layer1.0"].weights.shape, caps["layer1.0"].gate
        ('channel', torch.Size([8, 64]), {'': tensor([0.])})
    """
    edits = record.edits(model)
    if not edits:
        raise ModelError("This model has no inserted attention to capture; patch it with surgeon.add (or "
                           "load a folder that `surgeon add --out` or `surgeon finetune --out` wrote)")
    found: dict[str, Capture] = {}
    with ExitStack() as stack:
        for e in edits:
            module = model.get_submodule(e.module)
            cap = Capture(site=e.site if e.site not in found else e.module, attention=e.attention, module=e.module,
                          gate={n: m.gamma.detach().clone() for n, m in module.named_modules()
                                if isinstance(m, ZeroGate) and m.gamma is not None})
            found[cap.site] = cap
            stack.enter_context(_hooks(module, cap))
        with in_mode(model, False), torch.no_grad():  # each module's own mode put back after
            model(*_inputs(model, inputs), **kwargs)
    return found


@contextmanager
def _hooks(module: nn.Module, cap: Capture):
    def on_module(mod, args, out):
        if cap.effect is None:
            cap.effect = _effect(mod, args, out)

    def on_layer(mod, args, kwargs, out):
        if not cap.parts:  # the first call (a module called twice in one forward shows its first)
            cap.parts = _detached(mod.applied(*args, **kwargs))

    handles = [module.register_forward_hook(on_module)]
    layer = attention_layer(module)
    if layer is not None:
        handles.append(layer[1].register_forward_hook(on_layer, with_kwargs=True))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def gates(model: nn.Module, *inputs: Any, **kwargs: Any) -> list[GateStat]:
    """|γ| and effect size per edit on a batch (see `Capture`): which edits the network uses.

    Example:
        >>> [(g.site, g.gamma, g.effect) for g in surgeon.gates(finetuned, images)]
    """
    return [GateStat(c.site, c.attention, c.gamma, c.effect) for c in capture(model, *inputs, **kwargs).values()]
