"""Which dim of each traced tensor holds the channels and which the batch: derived from the ops, not assumed.

1. The op that produces a tensor fixes its channel dim: a convolution, batch/group/instance norm or a norm
   named `...1d/2d/3d` (timm's LayerNorm2d) treats dim 1 as channels; a linear layer, an embedding, a layer
   or RMS norm treats the last dim.
2. Every other op carries the dims of its input: permutes and transposes move them, reshapes and flattens
   keep a dim whose size and the product of the sizes before it survive, and ops that keep the rank (adds,
   activations, dropout, scaling, concatenation, padding, pooling) keep them where they are.
3. Graph inputs hold the batch at dim 0 (surgeon's example inputs are batch first); an input's channel dim
   is taken from the first consumer that fixes it (a conv reading it: dim 1), then step 2 runs again.

`layout(shape, channel, batch)` names the result: 'nchw' (channels at dim 1, any rank ≥ 3: NCL, NCHW,
NCDHW), 'nhwc' (channels last behind two or more positional dims), 'nlc' (tokens or features, (B, N, C) or
(B, C)), 'lnc' (time-first tokens), 'unknown' (no op fixes it, or the channels sit elsewhere).
"""
from __future__ import annotations

import math

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from surgeon.surgery.shapes import shape as _shape

_CHANNELS_FIRST_FUNCS = {F.conv1d, F.conv2d, F.conv3d, torch.conv1d, torch.conv2d, torch.conv3d, F.batch_norm,
                         F.group_norm, F.instance_norm, torch.batch_norm, torch.group_norm}
_CHANNELS_LAST_FUNCS = {F.linear, F.layer_norm, torch.layer_norm, F.embedding, F.rms_norm}
_CONVS = (nn.modules.conv._ConvNd,)
_FIRST_NORMS = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LocalResponseNorm)
_LAST_LAYERS = (nn.Linear, nn.LayerNorm, nn.Embedding, nn.RMSNorm)
_PERMUTES = {torch.permute, torch.Tensor.permute}
_TRANSPOSES = {torch.transpose, torch.swapaxes, torch.swapdims, torch.Tensor.transpose}


def channel_setter(node: fx.Node, modules: dict[str, nn.Module]) -> int | None:
    """The dim the op at `node` treats as channels (1, or -1 for the last), or None when it fixes none."""
    if node.op == "call_module":
        m = modules.get(node.target)
        if isinstance(m, _CONVS) or isinstance(m, _FIRST_NORMS):
            return 1
        name = type(m).__name__.lower()
        if "norm" in name and name.endswith(("1d", "2d", "3d")):  # LayerNorm2d, RmsNorm2d: channels first
            return 1
        if isinstance(m, _LAST_LAYERS) or ("norm" in name and ("layer" in name or "rms" in name)):
            return -1
        return None
    if node.op == "call_function":
        if node.target in _CHANNELS_FIRST_FUNCS:
            return 1
        if node.target in _CHANNELS_LAST_FUNCS:
            return -1
    return None


def _dims_arg(node: fx.Node) -> list | None:
    rest = list(node.args[1:]) or list(node.kwargs.get("dims", ()))
    if len(rest) == 1 and isinstance(rest[0], (tuple, list)):
        rest = list(rest[0])
    return rest if rest and all(isinstance(d, int) for d in rest) else None


def _moved(node: fx.Node, d: int, s_in: tuple, s_out: tuple, *, batch: bool) -> int | None:
    """Where dim `d` of `node`'s input (of shape `s_in`) lands in its output (of shape `s_out`). A leading
    batch dim stays leading through reshapes, also when they fold windows or heads into it (Swin's
    (B·windows, N, C)) and unfold them again."""
    target = node.target
    method = node.op == "call_method"
    if (method and target == "permute") or (node.op == "call_function" and target in _PERMUTES):
        perm = _dims_arg(node)
        if perm is None or len(perm) != len(s_in):
            return None
        perm = [p % len(s_in) for p in perm]
        return perm.index(d) if d in perm else None
    if (method and target in ("transpose", "swapaxes", "swapdims")) or \
            (node.op == "call_function" and target in _TRANSPOSES):
        pair = _dims_arg(node)
        if pair is None or len(pair) != 2:
            return None
        a, b = (p % len(s_in) for p in pair)
        return b if d == a else a if d == b else d
    if batch and d == 0:
        return 0
    # reshapes, flattens, reductions: the dim whose size and leading product survive
    lead = math.prod(s_in[:d])
    for j, size in enumerate(s_out):
        if size == s_in[d] and math.prod(s_out[:j]) == lead:
            return j
    if len(s_out) == len(s_in):  # concatenation, slicing, padding, pooling: the dims stay where they are
        return d
    return None


def _follow(node: fx.Node, dims: dict[fx.Node, int | None], *, batch: bool = False) -> int | None:
    """The dim of `node`'s output that its input's tracked dim became (the input of the same shape first)."""
    s_out = _shape(node)
    if s_out is None:
        return None
    ins = [a for a in node.all_input_nodes if dims.get(a) is not None and _shape(a) is not None]
    ins.sort(key=lambda a: _shape(a) != s_out)  # stable: the first input of the output's shape leads
    for a in ins:
        moved = _moved(node, dims[a], _shape(a), s_out, batch=batch)
        if moved is not None:
            return moved
    return None


def _propagate(nodes: list[fx.Node], modules: dict[str, nn.Module], seeds: dict[fx.Node, int]) -> tuple[dict, dict]:
    channel: dict[fx.Node, int | None] = {}
    batch: dict[fx.Node, int | None] = {}
    for n in nodes:
        s = _shape(n)
        if s is None or not s:
            channel[n] = batch[n] = None
            continue
        if n.op == "placeholder":
            channel[n], batch[n] = seeds.get(n), 0
            continue
        batch[n] = _follow(n, batch, batch=True)
        fixed = channel_setter(n, modules)
        channel[n] = fixed % len(s) if fixed is not None else _follow(n, channel)
    return channel, batch


def derive(nodes: list[fx.Node], modules: dict[str, nn.Module]) -> tuple[dict, dict]:
    """({node: channel dim or None}, {node: batch dim or None}) for every node of one graph."""
    channel, batch = _propagate(nodes, modules, {})
    seeds = {}
    for p in (n for n in nodes if n.op == "placeholder" and channel[n] is None and _shape(n)):
        for u in sorted(p.users, key=nodes.index):
            fixed = channel_setter(u, modules)
            if fixed is not None and u.args and u.args[0] is p:
                seeds[p] = fixed % len(_shape(p))
                break
    if seeds:
        channel, batch = _propagate(nodes, modules, seeds)
    return channel, batch


def layout(shape: tuple | None, channel: int | None, batch: int | None) -> str:
    """The layout name for a tensor of `shape` with channels at dim `channel` and the batch at `batch`."""
    if shape is None or channel is None or batch is None:
        return "unknown"
    rank = len(shape)
    if batch == 0 and channel == 1 and rank >= 3:
        return "nchw"
    if batch == 0 and channel == rank - 1 and rank >= 2:
        return "nhwc" if rank >= 4 else "nlc"
    if batch == 1 and channel == 2 and rank == 3:
        return "lnc"
    return "unknown"
