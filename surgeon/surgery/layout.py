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
NCDHW), 'nhwc' (channels last behind two or more positional dims that form a grid), 'nlc' (tokens or features,
(B, N, C) or (B, C), or channels last behind positional dims that merge image axes, such as windows × positions:
see `mixed_positions`), 'lnc' (time-first tokens), 'unknown' (no op fixes it, or the channels sit elsewhere).
"""
from __future__ import annotations

import math
import operator

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
_RESHAPES = {torch.reshape, torch.flatten, torch.unflatten, torch.squeeze, torch.unsqueeze, torch.Tensor.view,
             torch.Tensor.reshape, torch.Tensor.flatten, torch.Tensor.unflatten}
_RESHAPE_METHODS = {"view", "reshape", "flatten", "unflatten", "squeeze", "unsqueeze", "view_as", "reshape_as"}


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


def _order(node: fx.Node, rank: int) -> tuple[bool, list[int] | None]:
    """Whether `node` is a permute or transpose, and then the input dim each output dim takes (None when its
    dims are not constants)."""
    target, method = node.target, node.op == "call_method"
    if (method and target == "permute") or (node.op == "call_function" and target in _PERMUTES):
        perm = _dims_arg(node)
        return True, [p % rank for p in perm] if perm is not None and len(perm) == rank else None
    if (method and target in ("transpose", "swapaxes", "swapdims")) or \
            (node.op == "call_function" and target in _TRANSPOSES):
        pair = _dims_arg(node)
        if pair is None or len(pair) != 2:
            return True, None
        a, b = (p % rank for p in pair)
        order = list(range(rank))
        order[a], order[b] = b, a
        return True, order
    return False, None


_NOT = object()
_REDUCTIONS = {"sum", "mean", "amax", "amin", "prod", "std", "var", "logsumexp", "nansum", "nanmean"}


def _stacked_or_reduced(node: fx.Node, d: int, rank_in: int, rank_out: int):
    """Where dim `d` lands through `torch.stack` (a new dim in front of it shifts it) or a reduction over
    given dims without keepdim (each reduced dim in front of it shifts it back; reduced itself: None);
    `_NOT` for other ops. timm's parallel ViT blocks sum a stack of their branches."""
    name = node.target if node.op == "call_method" else getattr(node.target, "__name__", None)
    if node.op not in ("call_method", "call_function") or not isinstance(name, str):
        return _NOT
    if name == "stack" and node.op == "call_function" and rank_out == rank_in + 1:
        k = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
        return d + (d >= k % rank_out) if isinstance(k, int) else None
    if name in _REDUCTIONS and rank_out < rank_in and not node.kwargs.get("keepdim", False):
        dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
        dims = [dims] if isinstance(dims, int) else dims
        if not (isinstance(dims, (tuple, list)) and all(isinstance(x, int) for x in dims)):
            return _NOT
        gone = {x % rank_in for x in dims}
        return None if d in gone else d - sum(x < d for x in gone)
    return _NOT


def _moved(node: fx.Node, d: int, s_in: tuple, s_out: tuple, *, batch: bool) -> int | None:
    """Where dim `d` of `node`'s input (of shape `s_in`) lands in its output (of shape `s_out`). A leading
    batch dim stays leading through reshapes, also when they fold windows or heads into it (Swin's
    (B·windows, N, C)) and unfold them again."""
    moves, order = _order(node, len(s_in))
    if moves:
        return order.index(d) if order is not None and d in order else None
    if batch and d == 0:
        return 0
    kept = _stacked_or_reduced(node, d, len(s_in), len(s_out))
    if kept is not _NOT:
        return kept
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


def _tuple_dim(node: fx.Node, dims: dict, tokens: int) -> int | None:
    """For `out[i]` of an op returning a tuple, the tracked dim of `out[i]` taken from the op's first input
    with a known one: `unbind` drops its dim; an output of the input's rank keeps the dims where they are
    (split, chunk, nn.MultiheadAttention's output is its query's layout); (B, N', C') tokens from (B, N, C)
    keep a token layout whose tracked dim is `tokens` (MViT's attention and skip pooling return (tokens, thw));
    a batch at dim 0 stays there when the leading size does (an embedding leaf taking an image and returning
    (tokens, grid)). None when it is not such an element or nothing is known."""
    if not (node.op == "call_function" and node.target is operator.getitem and node.args
            and isinstance(node.args[0], fx.Node) and _shape(node.args[0]) is None):
        return None
    op, s = node.args[0], _shape(node)
    known = [a for a in op.all_input_nodes if dims.get(a) is not None and _shape(a) is not None]
    if not known:
        return None
    first, d = known[0], dims[known[0]]
    if op.target in ("unbind", torch.unbind) and len(_shape(first)) == len(s) + 1:
        gone = (op.args[1] if len(op.args) > 1 else op.kwargs.get("dim", 0)) % (len(s) + 1)
        return None if d == gone else d - (d > gone)
    if len(_shape(first)) == len(s):
        return d
    if tokens == 0 and d == 0 and _shape(first)[0] == s[0]:  # the batch leads on: an image in, (B, N, C) tokens
        return 0                                              # out (timm NaFlexViT's patch embedding leaf)
    return d if len(s) == 3 and len(_shape(first)) == 3 and _shape(first)[0] == s[0] and d == tokens else None


def _is_input(n: fx.Node) -> bool:
    """An input of the graph: a placeholder, or an element of one that packs several (`forward(self, *inputs)`,
    as nn.DataParallel's)."""
    return n.op == "placeholder" or (n.op == "call_function" and n.target is operator.getitem
                                     and isinstance(n.args[0], fx.Node) and n.args[0].op == "placeholder")


def _propagate(nodes: list[fx.Node], modules: dict[str, nn.Module], seeds: dict[fx.Node, int],
               learnt: dict[fx.Node, list] | None = None) -> tuple[dict, dict]:
    channel: dict[fx.Node, int | None] = {}
    batch: dict[fx.Node, int | None] = {}
    learnt = learnt or {}
    for n in nodes:
        s = _shape(n)
        if s is None or not s:
            channel[n] = batch[n] = None
            continue
        if _is_input(n):
            channel[n], batch[n] = seeds.get(n), 0
        else:
            batch[n] = _follow(n, batch, batch=True)
            fixed = channel_setter(n, modules)
            channel[n] = fixed % len(s) if fixed is not None else _follow(n, channel)
            # an element of an op's tuple output (an attention's (out, weights)): as the op's input
            for dims, tokens in ((batch, 0), (channel, 2)):
                if dims[n] is None:
                    dims[n] = _tuple_dim(n, dims, tokens)
        for i, dims in enumerate((channel, batch)):  # what an addition taught (see `_from_additions`)
            if dims[n] is None and n in learnt:
                dims[n] = learnt[n][i]
    return channel, batch


_ADDITIONS = {operator.add, operator.sub, operator.iadd, operator.isub, torch.add, torch.sub}


def _from_additions(nodes: list[fx.Node], channel: dict, batch: dict, learnt: dict[fx.Node, list]) -> bool:
    """The operands of an addition of tensors of one shape hold their dims alike: where one side's channel (batch)
    dim is known and another's is not, the other learns it (into `learnt`). A residual whose branch ends in an
    element of a kept-whole attention's tuple output, added to a block input that only traced ops read (Llama's
    RMS norm), takes the dims the next residual's MLP branch fixes. Whether anything was learnt."""
    more = False
    for n in nodes:
        if n.op != "call_function" or n.target not in _ADDITIONS or _shape(n) is None:
            continue
        group = [n, *(a for a in n.args[:2] if isinstance(a, fx.Node))]
        if len(group) != 3 or any(_shape(a) != _shape(n) for a in group):
            continue
        for i, dims in enumerate((channel, batch)):
            known = {dims.get(a) for a in group} - {None}
            if len(known) != 1:
                continue
            for a in group:
                if dims.get(a) is None:
                    learnt.setdefault(a, [None, None])[i] = next(iter(known))
                    more = True
    return more


Pieces = tuple  # one dim's image axes in row-major order: ((axis, size), ...)


def _regroup(labels: list[Pieces], s_in: tuple, s_out: tuple) -> list[Pieces] | None:
    """The axis pieces each output dim of a reshape from `s_in` to `s_out` holds. Dims are matched in groups
    of equal product; within a group the pieces are dealt out in order by size, so a merged dim holds the
    pieces of the dims it merges and splitting it again gives them back (a window of p×p positions,
    flattened to p·p and unflattened). None when the sizes do not regroup (a reduction)."""
    out: list[Pieces] = [()] * len(s_out)
    i = j = 0
    while i < len(s_in) and j < len(s_out):
        group_in, group_out, p_in, p_out = [i], [j], s_in[i], s_out[j]
        while p_in != p_out:
            if p_in < p_out and i + 1 < len(s_in):
                i += 1
                group_in.append(i)
                p_in *= s_in[i]
            elif p_out < p_in and j + 1 < len(s_out):
                j += 1
                group_out.append(j)
                p_out *= s_out[j]
            else:
                return None
        pieces: list = []
        for axis, size in (piece for k in group_in for piece in labels[k]):
            if pieces and axis is not None and pieces[-1][0] == axis:  # adjacent parts of one axis: one piece
                pieces[-1] = (axis, pieces[-1][1] * size)
            else:
                pieces.append((axis, size))
        for k in group_out:
            need, taken = s_out[k], []
            while need > 1 and pieces:
                axis, size = pieces.pop(0)
                if need % size == 0:
                    taken.append((axis, size))
                    need //= size
                elif size % need == 0:  # the dim takes part of this axis; the rest stays for the next dim
                    taken.append((axis, need))
                    pieces.insert(0, (axis, size // need))
                    need = 1
                else:
                    return None
            out[k] = tuple(taken)
        i, j = i + 1, j + 1
    return out


def _carry(node: fx.Node, labels: list[Pieces], s_in: tuple, s_out: tuple) -> list[Pieces] | None:
    moves, order = _order(node, len(s_in))
    if moves:
        return [labels[k] for k in order] if order is not None else None
    target, method = node.target, node.op == "call_method"
    if len(s_out) == len(s_in) and (s_in == s_out or math.prod(s_in) != math.prod(s_out)):
        return list(labels)  # elementwise ops, concatenation, pooling, padding: the dims keep their meaning
    if (method and target in _RESHAPE_METHODS) or (node.op == "call_function" and target in _RESHAPES):
        return _regroup(labels, s_in, s_out)
    if len(s_out) == len(s_in) and sorted(s_in) == sorted(s_out):  # an opaque op that moves dims (SwapAxes)
        free = list(range(len(s_in)))
        moved = []
        for j, size in enumerate(s_out):
            k = j if j in free and s_in[j] == size else next(k for k in free if s_in[k] == size)
            free.remove(k)
            moved.append(labels[k])
        return moved
    return None  # an opaque function (a window partition written as one) may move dims inside


def mixed_positions(nodes: list[fx.Node], modules: dict[str, nn.Module], channel: dict, batch: dict) -> set[fx.Node]:
    """The nodes with a positional dim (neither batch nor channels) that merges two image axes: a list of
    positions, not a grid. torchvision's MaxViT folds (B, C, H, W) into (B, windows, positions, C), where
    `windows` runs over both H and W; a swin window reversal merging H/p and p back into H stays a grid.

    Each dim is labelled with the axis pieces it holds: a graph input's and a channels-first op's output dims
    are new axes, reshapes split and merge them (`_regroup`); batch dims may absorb axes (windows). Where the
    trail is lost (an op returning a tuple, a reduction) the pieces are unknown and mix with nothing."""
    labels: dict[fx.Node, list[Pieces]] = {}
    mixed = set()
    for n in nodes:
        s = _shape(n)
        if s is None or not s:
            continue
        ins = sorted((a for a in n.all_input_nodes if a in labels), key=lambda a: _shape(a) != s)
        source = n.op == "placeholder" or channel_setter(n, modules) == 1
        carried = None if source or not ins else _carry(n, labels[ins[0]], _shape(ins[0]), s)
        if carried is None:  # new axes where a grid starts; where the trail is lost (tuples, reductions), unknown
            carried = [((f"{n.name}:{d}" if source else None, size),) if size > 1 else () for d, size in enumerate(s)]
        labels[n] = carried
        if channel_setter(n, modules) == -1 and s[-1] > 1:  # a linear layer's outputs: new channels, same positions
            labels[n][-1] = ((None, s[-1]),)
    # a tensor whose trail was lost, added to one with known axes (an attention branch and its residual), holds
    # the same positions: it takes their axes
    for n in nodes:
        same = [a for a in n.all_input_nodes if a in labels and _shape(a) == _shape(n)]
        known = next((a for a in same if _known(labels[a])), None)
        for a in same if known is not None and n.op == "call_function" else ():
            if not _known(labels[a]):
                labels[a] = labels[known]
    for n, lab in labels.items():
        positional = [d for d in range(len(lab)) if d not in (channel.get(n), batch.get(n))]
        if any(len({axis for axis, _ in lab[d]} - {None}) > 1 for d in positional):
            mixed.add(n)
    return mixed


def _known(labels: list[Pieces]) -> bool:
    return any(axis is not None for pieces in labels for axis, _ in pieces)


def derive(nodes: list[fx.Node], modules: dict[str, nn.Module]) -> tuple[dict, dict]:
    """({node: channel dim or None}, {node: batch dim or None}) for every node of one graph."""
    channel, batch = _propagate(nodes, modules, {})
    seeds = {}
    for p in (n for n in nodes if _is_input(n) and channel[n] is None and _shape(n)):
        for u in sorted(p.users, key=nodes.index):
            fixed = channel_setter(u, modules)
            if fixed is not None and u.args and u.args[0] is p:
                seeds[p] = fixed % len(_shape(p))
                break
    if seeds:
        channel, batch = _propagate(nodes, modules, seeds)
    learnt: dict[fx.Node, list] = {}
    for _ in range(8):  # each round may let an addition teach the next one
        if not _from_additions(nodes, channel, batch, learnt):
            break
        channel, batch = _propagate(nodes, modules, seeds, learnt)
    return channel, batch


def layout(shape: tuple | None, channel: int | None, batch: int | None, mixed: bool = False) -> str:
    """The layout name for a tensor of `shape` with channels at dim `channel` and the batch at `batch`;
    `mixed`: its positional dims are a list of positions, not a grid (see `mixed_positions`)."""
    if shape is None or channel is None or batch is None:
        return "unknown"
    rank = len(shape)
    if batch == 0 and channel == 1 and rank >= 3:
        return "nchw"
    if batch == 0 and channel == rank - 1 and rank >= 2:
        return "nhwc" if rank >= 4 and not mixed else "nlc"
    if batch == 1 and channel == 2 and rank == 3:
        return "lnc"
    return "unknown"
