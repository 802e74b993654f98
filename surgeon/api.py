"""The public functions: compose trace → shapes → sites → plan → rewrite → verify.

Every CLI command is one of these calls plus rendering.
"""
from __future__ import annotations

import logging
from typing import Any, Sequence

import torch
from torch import nn

from surgeon import registry
from surgeon.render import human  # noqa: F401  (re-exported: surgeon.api.human)
from surgeon.errors import OptionError, SiteShapeError, SurgeonError, did_you_mean, warn
from surgeon.layers.gate import INITS
# the planning steps, importable from here as before (surgeon.api.Plan, surgeon.api.example_inputs, ...)
from surgeon.planning import (EXAMPLE_BATCH, placement, Edit, Plan, _choose_kind, _edit_flops, _prepare,  # noqa: F401
                              example_inputs, surgery_call, verify_model)
from surgeon.surgery.sites import Site, find_sites

log = logging.getLogger("surgeon")


def sites(model: nn.Module | str, *, kind: str | Sequence[str] | None = None, at: Sequence[str] | None = None,
          example_input: Any = None, input_size: Sequence[int] | None = None) -> list[Site]:
    """The insertion points of a model.

    Args:
        model: an nn.Module, or a reference ('resnet50', 'tv:resnet18', 'pkg.module:factory').
        kind: one kind or several (default: every registered kind).
        at: glob patterns on site names ('layer1.*').
        example_input / input_size: the input used to learn shapes (see `example_inputs`).

    Returns:
        list[Site] in graph order, per kind.

    Raises:
        UnknownNameError: unknown kind. NoSitesError: an `at` pattern matched nothing.

    Example:
        >>> [s.name for s in surgeon.sites("resnet18", kind="stage")]
        ['layer1', 'layer2', 'layer3']
    """
    prep = _prepare(model, example_input=example_input, input_size=input_size)
    kinds = [kind] if isinstance(kind, str) else list(kind or registry.site_finders())
    found = Sites(find_sites(prep.views, kinds, list(at) if at else None,
                                 finders=registry.finders()))
    found.untraced = dict(prep.traced.leaves)
    if not found and found.untraced:
        warn(f"No sites found; {found.why_few()}")
    return found


class Sites(list):
    """The sites of a model (a list of `Site`), with `untraced`: the modules fx could not trace, and why
    (their own code stays Python; sites inside them exist only where their children traced)."""

    untraced: dict[str, str]

    def why_few(self) -> str:
        parts = [f"{p or 'the model itself'!r} does not trace ({why})" for p, why in self.untraced.items()]
        return "; ".join(parts[:3]) + (f"; and {len(parts) - 3} more" if len(parts) > 3 else "")


def _check_options(att: registry.Attention, options: dict[str, Any]) -> None:
    for key in options:
        if key not in att.options:
            valid = ", ".join(att.options) or "none"
            raise OptionError(f"Unknown option {key!r} for {att.name}.{did_you_mean(key, att.options)} "
                              f"Valid options: {valid}")
    # value types before any tracing: a wrong option fails in a moment, not after the model is traced
    registry.check_options(att.name, att.option_types, options)


@surgery_call
def plan(model: nn.Module | str, attention: str, *, kind: str | None = None, at: Sequence[str] | None = None,
         init: str = "identity", example_input: Any = None, input_size: Sequence[int] | None = None,
         **options: Any) -> Plan:
    """Plan inserting `attention` at every matching site, without changing anything.

    Args:
        model: an nn.Module or a reference ('resnet50', 'tv:resnet50', 'pkg.module:factory').
        attention: a registered name or alias ('cbam', 'se', ...).
        kind: the site kind (default: the attention's own, or its next kind the model has).
        at: glob patterns on site names.
        init: 'identity' (starts as the identity) or 'paper' (the module exactly as published).
        **options: the attention's options (see `surgeon list`).

    Returns:
        Plan: prints as a table; `.apply()` performs it.

    Raises:
        UnknownNameError, OptionError, NoSitesError, ShapeError.

    Example:
        >>> p = surgeon.plan("resnet50", "cbam")
        >>> print(p); model = p.apply()
    """
    return _plan(model, attention, kind, at, init, example_input, input_size, options, count_flops=True)


def _plan(model: nn.Module | str, attention: str, kind: str | None, at: Sequence[str] | None, init: str,
          example_input: Any, input_size: Sequence[int] | None, options: dict[str, Any], *, count_flops: bool) -> Plan:
    """`plan`; `count_flops`: count the model's FLOPs while recording its calls, for a verification to report
    (see `_prepare`)."""
    att = registry.get_attention(attention)
    if init not in INITS:
        raise OptionError(f"Unknown init {init!r}.{did_you_mean(init, INITS)} Valid: {', '.join(INITS)}")
    _check_options(att, options)
    prep = _prepare(model, example_input=example_input, input_size=input_size, count_flops=count_flops)
    chosen, note = _choose_kind(att, kind, prep, at)
    edits, unfit, counted = [], {}, {}
    device, dtype = placement(prep.model)
    # new modules live where the model's weights do, in their dtype; on a meta model they are real (on the CPU), so
    # that loading the original weights into the patched model (`load_state_dict(..., assign=True)`) completes it
    device = torch.device("cpu") if device.type == "meta" else device
    for site in chosen:
        try:
            module = att.build(site, init=init, **options).to(device, dtype).train(prep.model.training)
        except SiteShapeError as exc:  # the options do not fit this site's shape: skipped, unless none fits
            unfit[site.name] = exc
            log.info("site %s: skipped, %s", site.name, exc)
            continue
        except SurgeonError:
            raise
        except (ValueError, TypeError) as exc:
            raise OptionError(f"{att.name}: {exc}") from exc
        # modules built for sites of the same shapes are the same computation: count (and check alone) one
        same = (site.kind, site.action, site.layout, tuple(site.shape), tuple(site.out_shape or ()),
                repr(site.info.get("arg_shapes")), repr(site.info.get("extra_shapes")), type(module))
        if same not in counted:
            counted[same] = _edit_flops(site, module, att.name)
        flops, checked, alone = counted[same]
        edits.append(Edit(site=site, attention=att.name, options=dict(options), init=init, module=module,
                          params=sum(p.numel() for p in module.parameters()), flops=flops, shape_checked=checked,
                          alone_diff=alone))
    if unfit and not edits:
        raise next(iter(unfit.values()))
    if unfit:
        first, exc = next(iter(unfit.items()))
        more = f" and {len(unfit) - 1} more" if len(unfit) > 1 else ""
        note = "; ".join(filter(None, [note, f"{att.name}: skipped {first!r}{more} ({exc})"]))
    if note:
        warn(note)
    plan = Plan(prep, edits)
    plan.note = note
    return plan


def add(model: nn.Module | str, attention: str, *, kind: str | None = None, at: Sequence[str] | None = None,
        init: str = "identity", example_input: Any = None, input_size: Sequence[int] | None = None,
        verify: bool = True, **options: Any) -> nn.Module:
    """Insert `attention` into `model` and return the patched model.

    The result is the user's model: the same class, methods, attributes and hooks, with only the modules
    whose own forward holds a site rewritten (`surgeon.edits(patched)` says which). It shares the
    original's parameters: every original state-dict key is kept, the new modules sit next to their
    owners (`layer1.0.cbam`), and with init='identity' it computes exactly what the original computed.

    Args: as `plan`; verify: check the result against the original (see `verify_model`).

    Returns:
        nn.Module: the patched model.

    Example:
        >>> model = surgeon.add(torchvision.models.resnet50(), "se", kind="residual")
    """
    # unverified, nothing reports the original's FLOPs: the forward recording its calls need not count them
    return _plan(model, attention, kind, at, init, example_input, input_size, options,
                 count_flops=verify).apply(verify=verify)


def attentions() -> list[registry.Attention]:
    """Every registered attention, sorted by name.

    Example:
        >>> [a.name for a in surgeon.attentions()][:3]
    """
    return sorted(registry.attentions().values(), key=lambda a: a.name)

