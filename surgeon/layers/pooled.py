"""The mean and the maximum of a map over some dims, as CBAM-style attentions pool (channel weights from the
spatial mean and max, spatial maps from the mean and max over channels), with one backward pass for both.

Autograd's own backward of `amax` is several passes over the whole map (compare, cast the mask to floats, count,
divide, multiply) and `mean`'s another (expand and divide); training a network with a CBAM in every block spends
more time there than in the rest of the module. `mean_max` computes the same forward with the same ops, and its
backward is the same gradient (the max's share split evenly among tied maxima, as `amax`'s) in three passes over
one map it allocates: compare, count the ties, and write the map's gradient in place of the comparison.
"""
from __future__ import annotations

import math

import torch


class _MeanMax(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, dims: tuple[int, ...]):
        mean, peak = x.mean(dims, keepdim=True), x.amax(dims, keepdim=True)
        ctx.dims = dims
        ctx.save_for_backward(x, peak)
        return mean, peak

    @staticmethod
    def backward(ctx, g_mean, g_peak):
        x, peak = ctx.saved_tensors
        spread = None if g_mean is None else g_mean / math.prod(x.shape[d] for d in ctx.dims)
        if g_peak is None:  # the mean's alone: a view, as sum's backward returns
            return (None if spread is None else spread.expand_as(x)), None
        # the maxima as ones in x's dtype: comparing into a float map is faster than into a boolean one, and its
        # sum (the ties to split the max's gradient among) needs no cast; the gradient is then written into it
        at_peak = torch.eq(x, peak, out=torch.empty_like(x))
        share = g_peak / at_peak.sum(ctx.dims, keepdim=True)
        if torch.is_grad_enabled():  # a graph of the backward is being built (double backward): no in-place ops
            return at_peak * share if spread is None else torch.addcmul(spread, at_peak, share), None
        if spread is None:
            return at_peak.mul_(share), None
        return torch.addcmul(spread, at_peak, share, out=at_peak), None


def mean_max(x: torch.Tensor, dims: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(x.mean(dims, keepdim=True), x.amax(dims, keepdim=True)); the one-pass backward (module docstring) where
    autograd will need it, the plain ops elsewhere (no grad, TorchScript, `torch.jit.trace`), so what is exported
    or compiled without autograd holds only the two reductions."""
    if not torch.jit.is_scripting():
        if x.requires_grad and torch.is_grad_enabled() and not torch.jit.is_tracing():
            return _MeanMax.apply(x, tuple(d % x.dim() for d in dims))
    return x.mean(dims, keepdim=True), x.amax(dims, keepdim=True)
