"""Verify a patched model against its original: outputs, gradients, parameters and FLOPs added."""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn


@dataclass
class Verification:
    """What `verify` measured.

    max_abs_diff: largest |patched − original| over all output tensors (eval mode).
    new_params: parameter tensors the edits added; with_grad: how many of them a backward pass
    reached; nonzero_grad: how many got a non-zero gradient (at identity init only the gates can:
    the others sit behind a zero gate for the first step; a freshly initialised network whose
    blocks end in zero-initialised norms gives the gates zero gradient too).
    """

    max_abs_diff: float
    tolerance: float | None
    params_added: int
    flops_before: int
    flops_after: int
    new_params: int
    with_grad: int
    nonzero_grad: int

    @property
    def flops_added(self) -> int:
        return self.flops_after - self.flops_before

    @property
    def ok(self) -> bool:
        exact = self.tolerance is None or self.max_abs_diff <= self.tolerance
        return exact and self.with_grad == self.new_params

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "flops_added": self.flops_added, "ok": self.ok}


def _tensors(out: Any) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):
        out = list(out.values())
    if isinstance(out, (tuple, list)):
        return [t for o in out for t in _tensors(o)]
    return []


def max_abs_diff(a: Any, b: Any) -> float:
    ta, tb = _tensors(a), _tensors(b)
    if len(ta) != len(tb) or any(x.shape != y.shape for x, y in zip(ta, tb)):
        return float("inf")
    return max((float((x.double() - y.double()).abs().max()) for x, y in zip(ta, tb) if x.numel()), default=0.0)


def _cpu_sdpa_flops(query, key, value, *args, out_shape=None, **kwargs) -> int:
    from torch.utils.flop_counter import sdpa_flop_count

    return sdpa_flop_count(query, key, value)  # the counter passes shapes, not tensors


def count_flops(model: nn.Module, inputs: tuple) -> int:
    """FLOPs of one forward (torch.utils.flop_counter), counting CPU fused attention too."""
    from torch.utils.flop_counter import FlopCounterMode

    # NOTE: the flop counter has no formula for the CPU flash-attention kernel that
    # scaled_dot_product_attention dispatches to, so attention products would count as zero
    extra = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_sdpa_flops}
    counter = FlopCounterMode(display=False, custom_mapping=extra)
    with torch.no_grad(), counter:
        model(*inputs)
    return int(counter.get_total_flops())


def verify(original: nn.Module, patched: nn.Module, inputs: tuple, new_modules: list[str], *,
           tolerance: float | None = 1e-5) -> Verification:
    """Run `inputs` through both models on CPU and compare; backward through the patched one.

    Args:
        new_modules: module paths (in `patched`) the edits inserted.
        tolerance: the max |diff| allowed (identity init), or None when the output may change (paper init).
    """
    modes = (original.training, patched.training)
    original.eval(), patched.eval()
    saved = {p: p.grad for p in patched.parameters()}
    try:
        with torch.no_grad():
            expected = original(*inputs)
        new_params = [p for path in new_modules for p in patched.get_submodule(path).parameters()]
        for p in saved:
            p.grad = None
        out = patched(*inputs)  # one forward serves both the comparison and the backward pass
        diff = max_abs_diff(expected, [t.detach() for t in _tensors(out)])
        loss = sum(t.float().sum() for t in _tensors(out) if t.is_floating_point())
        if isinstance(loss, torch.Tensor) and loss.requires_grad:
            loss.backward()
        with_grad = sum(p.grad is not None for p in new_params)
        nonzero = sum(p.grad is not None and bool(p.grad.abs().sum() > 0) for p in new_params)
        one = tuple(x[:1] if isinstance(x, torch.Tensor) and x.dim() else x for x in inputs)
        flops_before, flops_after = count_flops(original, one), count_flops(patched, one)
    finally:
        for p, g in saved.items():
            p.grad = g
        original.train(modes[0]), patched.train(modes[1])
    return Verification(max_abs_diff=diff, tolerance=tolerance,
                        params_added=sum(p.numel() for p in new_params), flops_before=flops_before,
                        flops_after=flops_after, new_params=len(new_params), with_grad=with_grad,
                        nonzero_grad=nonzero)
