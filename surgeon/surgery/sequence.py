"""Site finders for sequence models: kinds `rnn`, `tokens` and `rnn_input`.

- rnn: an nn.LSTM / nn.GRU / nn.RNN whose output is reduced to one vector per sample: the last time
  step (`out[:, -1]`, `out[-1]`), the final hidden state (`h_n[-1]`, `h_n.squeeze(0)`), both directions'
  final states concatenated (`torch.cat([h_n[-2], h_n[-1]], 1)`), or the mean over time. The site
  replaces that selection; the module receives (sequence, selection, *extra), where `extra` are the
  nodes named by `site.info["extra"]`: the padding mask source first when the model has one
  ('mask'), then the model's other inputs ('input:NAME') and earlier RNN selections ('site:NAME'),
  which an attention with an external query can use.
- tokens: a (B, N, C) sequence: the output of each transformer block (a module whose own code holds a
  residual add), and an RNN output used per step (e.g. by a per-step linear layer). Where the model has
  padding information (a lengths/mask input, pack_padded_sequence's lengths, token ids through an
  embedding with padding_idx), the site is a 'replace' site with args (sequence, mask source) and
  `info["mask"]` its form, as for rnn sites; otherwise an 'insert' site.
- rnn_input: the input sequence of an RNN (the place of DA-RNN's input attention).

Selections of an RNN's output that fit no known form make an `rnn` site whose `info["error"]` says so;
attentions raise that message when asked to build there, so `surgeon sites` still lists the model.
"""
from __future__ import annotations

import logging
import operator
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from surgeon.surgery.graph import GraphView, is_add, is_dropout
from surgeon.surgery.sites import Site
from surgeon.surgery.trace import pack_padded_sequence, pad_packed_sequence

log = logging.getLogger("surgeon")

_LENGTH_NAMES = ("len",)
_MASK_NAMES = ("mask",)
_PADDING_NAMES = ("pad",)


# -- facts about nodes ---------------------------------------------------------------------------------
def is_rnn(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    return node.op == "call_module" and isinstance(modules.get(node.target), nn.RNNBase)


def _calls(node: Any, fn: Any) -> bool:
    return isinstance(node, fx.Node) and node.op == "call_function" and node.target is fn


def _arg(node: fx.Node, i: int, name: str, default: Any) -> Any:
    return node.args[i] if len(node.args) > i else node.kwargs.get(name, default)


def _getitem(node: fx.Node, source: fx.Node, index: Any) -> bool:
    return (node.op == "call_function" and node.target is operator.getitem and node.args[0] is source
            and node.args[1] == index)


def _child(node: fx.Node, index: int) -> fx.Node | None:
    """The `node[index]` getitem user of a tuple-valued node, if the graph has one."""
    return next((u for u in node.users if _getitem(u, node, index)), None)


def _int_index(node: fx.Node, source: fx.Node) -> int | None:
    """`i` when `node` is `source[i]` or `source[i, :, :]`-like, else None."""
    if node.op != "call_function" or node.target is not operator.getitem or node.args[0] is not source:
        return None
    idx = node.args[1]
    if isinstance(idx, tuple) and idx and isinstance(idx[0], int) and all(i == slice(None) for i in idx[1:]):
        idx = idx[0]
    return idx if isinstance(idx, int) and not isinstance(idx, bool) else None


def _last_step(node: fx.Node, out: fx.Node, batch_first: bool) -> bool:
    """`out[:, -1]` (batch first) or `out[-1]` (time first), with optional trailing full slices."""
    if node.op == "call_function" and node.target is operator.getitem and node.args[0] is out:
        idx = node.args[1]
        idx = idx if isinstance(idx, tuple) else (idx,)
        t = 1 if batch_first else 0
        lead, rest = idx[:t], idx[t + 1:]
        return (len(idx) > t and idx[t] == -1 and all(i == slice(None) for i in lead)
                and all(i == slice(None) for i in rest))
    if node.op == "call_method" and node.target == "select" and node.args[0] is out:
        return tuple(node.args[1:3]) == ((1, -1) if batch_first else (0, -1))
    return False


def _mean_over_time(node: fx.Node, out: fx.Node, batch_first: bool) -> bool:
    is_mean = ((node.op == "call_method" and node.target == "mean") or
               (node.op == "call_function" and node.target is torch.mean))
    if not is_mean or not node.args or node.args[0] is not out:
        return False
    dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
    dim = dim[0] if isinstance(dim, (tuple, list)) and len(dim) == 1 else dim
    keep = node.args[2] if len(node.args) > 2 else node.kwargs.get("keepdim", False)
    return isinstance(dim, int) and dim % 3 == (1 if batch_first else 0) and not keep


def _squeeze0(node: fx.Node, source: fx.Node) -> bool:
    return (node.op == "call_method" and node.target == "squeeze" and node.args[0] is source
            and tuple(node.args[1:]) in ((0,), ()))


def _is_cat_of(node: fx.Node, parts: list[fx.Node]) -> bool:
    if node.op != "call_function" or node.target is not torch.cat:
        return False
    seq = node.args[0]
    dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
    return list(seq) == parts and dim in (1, -1)


# -- the rnn finder ------------------------------------------------------------------------------------
def _outputs(view: GraphView, rnn: fx.Node) -> tuple[fx.Node | None, fx.Node | None]:
    """(output node, h_n node) of an RNN call; either may be missing from the graph."""
    out = _child(rnn, 0)
    hidden = _child(rnn, 1)
    if hidden is not None and isinstance(view.module(rnn), nn.LSTM):
        hidden = _child(hidden, 0)
    return out, hidden


def _sequence(view: GraphView, rnn: fx.Node) -> tuple[fx.Node | None, bool, fx.Node | None]:
    """(node holding the padded output sequence, whether it is batch first, the pack_padded_sequence call
    feeding the RNN or None). For a packed RNN output that the model never pads, the node is None."""
    out = _child(rnn, 0)
    pack = rnn.args[0] if rnn.args and _calls(rnn.args[0], pack_padded_sequence) else None
    if pack is None:
        return out, view.module(rnn).batch_first, None
    pad = next((u for u in (out.users if out is not None else ()) if _calls(u, pad_packed_sequence)), None)
    if pad is None:
        return None, True, pack
    return _child(pad, 0), bool(_arg(pad, 1, "batch_first", False)), pack


def _selections(view: GraphView, rnn: fx.Node) -> tuple[list[tuple[str, fx.Node]], list[fx.Node], list[fx.Node]]:
    """Classify how the RNN's output is used.

    Returns:
        (selections as (form, node), users that keep the sequence, users no form explains).
    """
    m = view.module(rnn)
    dirs, layers = 2 if m.bidirectional else 1, m.num_layers
    out, bf, _ = _sequence(view, rnn)
    _, hidden = _outputs(view, rnn)
    found: list[tuple[str, fx.Node]] = []
    per_step: list[fx.Node] = []
    unknown: list[fx.Node] = []
    if out is not None:
        users = [(u, out) for u in out.users]
        while users:
            u, src = users.pop(0)
            if view.is_(is_dropout, u) and view.shape(u) == view.shape(out):
                users.extend((w, u) for w in u.users)  # dropout on the sequence: look at what uses it
            elif _last_step(u, src, bf):
                found.append(("last", u))
            elif _mean_over_time(u, src, bf):
                found.append(("mean", u))
            elif view.shape(u) is not None and len(view.shape(u)) == 3 and view.shape(u)[:2] == view.shape(out)[:2]:
                per_step.append(u)  # a per-step layer: the sequence is kept
            else:
                unknown.append(u)
    if hidden is not None:
        last_layer = {i for i in range(-dirs, 0)} | {(layers - 1) * dirs + d for d in range(dirs)}
        picked = {}
        for u in hidden.users:
            i = _int_index(u, hidden)
            if i is not None and i in last_layer:
                picked[u] = i % (layers * dirs)
            elif _squeeze0(u, hidden) and layers * dirs == 1:
                found.append(("h_n", u))
            else:
                unknown.append(u)
        pairs = set()
        for u in picked:
            cats = [c for c in u.users if c.op == "call_function" and c.target is torch.cat]
            for c in cats:
                parts = list(c.args[0])
                if len(parts) == 2 and all(p in picked for p in parts) and _is_cat_of(c, parts) \
                        and sorted(picked[p] for p in parts) == [(layers - 1) * dirs, (layers - 1) * dirs + 1]:
                    if c not in [f[1] for f in found]:
                        found.append(("h_n_cat", c))
                    pairs.update(parts)
        for u, i in picked.items():
            if u in pairs:
                continue
            if dirs == 2 and i == (layers - 1) * dirs:
                found.append(("h_n_forward", u))  # the forward direction only
            else:
                found.append(("h_n", u))
    # unpacking `out, h = rnn(x)` leaves unused getitems; they are not uses
    unknown = [u for u in unknown if u.users or u.op == "output"]
    return found, per_step, unknown


def _mask_source(view: GraphView, rnn: fx.Node) -> tuple[fx.Node | None, dict[str, Any]]:
    """Where the padding mask comes from: a lengths/mask input of the model, or token ids with an
    embedding's padding_idx, or the lengths given to pack_padded_sequence. Returns (node, info) with
    info['mask'] in 'lengths', 'valid' (nonzero keeps), 'padding' (nonzero is padding), 'tokens' (with
    'pad_id'), or None when unknown."""
    _, _, pack = _sequence(view, rnn)
    lengths = _arg(pack, 1, "lengths", None) if pack is not None else None
    if isinstance(lengths, fx.Node):
        return lengths, {"mask": "lengths", "mask_input": lengths.name, "packed": True}
    named = _named_mask_input(view)
    if named[0] is not None:
        return named
    # token ids through an embedding with a padding index
    cur = rnn.args[0] if rnn.args and isinstance(rnn.args[0], fx.Node) else None
    while cur is not None and cur.op != "placeholder":
        m = view.module(cur)
        if isinstance(m, nn.Embedding):
            return _embedding_mask(view, cur)
        ins = [a for a in cur.all_input_nodes if view.shape(a) is not None]
        cur = ins[0] if len(ins) == 1 else None
    return None, {"mask": None}


def _named_mask_input(view: GraphView) -> tuple[fx.Node | None, dict[str, Any]]:
    """A model input named as lengths (B,) or a mask / padding mask (B, T)."""
    for p in (n for n in view.nodes if n.op == "placeholder"):
        name, s = p.name.lower(), view.shape(p)
        if s is None:
            continue
        if any(k in name for k in _LENGTH_NAMES) and len(s) == 1:
            return p, {"mask": "lengths", "mask_input": p.name}
        if any(k in name for k in _MASK_NAMES + _PADDING_NAMES) and len(s) == 2:
            form = "padding" if any(k in name for k in _PADDING_NAMES) else "valid"
            return p, {"mask": form, "mask_input": p.name}
    return None, {"mask": None}


def _embedding_mask(view: GraphView, emb: fx.Node) -> tuple[fx.Node | None, dict[str, Any]]:
    """The token ids of an embedding call with a padding index, when they are a model input."""
    m, src = view.module(emb), emb.args[0] if emb.args else None
    if m.padding_idx is not None and isinstance(src, fx.Node) and src.op == "placeholder":
        return src, {"mask": "tokens", "pad_id": int(m.padding_idx), "mask_input": src.name}
    return None, {"mask": None}


def _block_mask_source(view: GraphView, node: fx.Node) -> tuple[fx.Node | None, dict[str, Any]]:
    """Padding information for tokens computed at `node`: a lengths/mask input of the model, or the token
    ids of the one embedding with a padding index that the tokens come from."""
    named = _named_mask_input(view)
    if named[0] is not None:
        return named
    embs = [a for a in view.ancestors(node) if isinstance(view.module(a), nn.Embedding)]
    found = [r for r in (_embedding_mask(view, e) for e in embs) if r[0] is not None]
    return found[0] if len(found) == 1 else (None, {"mask": None})


def _layout_by_batch(shape: tuple | None, source: tuple | None, layout: str) -> str | None:
    """The tokens' layout told by the batch size of their padding information (lengths (B,), or (B, T) ids or
    masks): 'nlc' when it is dim 0 of the tokens, 'lnc' when dim 1 (a time-first block with no torch
    transformer layer to say so); None when it is neither."""
    if shape is None or source is None or len(shape) != 3 or not source:
        return None
    b = source[0]
    if b == (shape[0] if layout == "nlc" else shape[1]):
        return layout
    if b == (shape[1] if layout == "nlc" else shape[0]):
        return "lnc" if layout == "nlc" else "nlc"
    return None


def _tokens_site(view: GraphView, name: str, node: fx.Node, layout: str, owner: str, slot: str,
                 info: dict[str, Any], mask: fx.Node | None, mask_info: dict[str, Any]) -> Site:
    """A tokens site: 'insert' without padding information; with it, 'replace' with args (node, mask source)
    so the module can leave padded steps out."""
    shape = view.shape(node)
    if mask is not None:
        layout = _layout_by_batch(shape, view.shape(mask), layout)
        if layout is None:
            log.info("site %s: the batch size of %s fits neither dim of the tokens %s; padding is attended",
                     name, mask.name, shape)
            mask, mask_info, layout = None, {"mask": None}, "nlc"
    info = {**info, **mask_info, "padding_known": mask is not None}
    if mask is None:
        return Site(name=name, kind="tokens", shape=shape, layout=layout, graph=view.prefix, node=node.name,
                    owner=owner, slot=slot, info=info)
    log.debug("site %s: tokens attention masks padding from input %s", name, mask.name)
    return Site(name=name, kind="tokens", shape=shape, layout=layout, graph=view.prefix, node=node.name,
                action="replace", args=(node.name, mask.name), out_shape=shape, owner=owner, slot=slot,
                info={**info, "extra": ("mask",), "extra_shapes": (view.shape(mask),)})


def _extras(view: GraphView, rnn: fx.Node, before: fx.Node, mask: fx.Node | None,
            others: dict[str, list[fx.Node]]) -> tuple[list[fx.Node], list[str]]:
    """The extra arguments of an rnn site: its mask source, the model's other inputs, and for each other
    RNN its selection (or else its h_n stack) when defined before `before`, so the module can read it."""
    nodes, roles = [], []
    if mask is not None:
        nodes.append(mask), roles.append("mask")
    ancestors = view.ancestors(rnn)
    for p in view.nodes:
        if p.op == "placeholder" and p is not mask and p not in ancestors and view.shape(p) is not None:
            nodes.append(p), roles.append(f"input:{p.name}")
    for name, candidates in others.items():
        usable = [c for c in candidates if view.order[c] < view.order[before]]
        if usable:
            nodes.append(usable[0]), roles.append(f"site:{name}")
    return nodes, roles


def _rnn_info(m: nn.RNNBase) -> dict[str, Any]:
    return {"rnn": type(m).__name__, "batch_first": m.batch_first, "bidirectional": m.bidirectional,
            "hidden_size": m.hidden_size, "num_layers": m.num_layers,
            "out_features": m.hidden_size * (2 if m.bidirectional else 1)}


def _placement(view: GraphView, node: fx.Node) -> tuple[str, str]:
    owner, _, slot = node.target.rpartition(".")
    return owner, slot


def find_rnn(view: GraphView) -> list[Site]:
    """One site per recognised selection of an RNN's output (see the module docstring)."""
    sites: list[Site] = []
    rnns = [n for n in view.nodes if view.is_(is_rnn, n)]
    queries: dict[str, list[fx.Node]] = {}  # per RNN: what another site's module may read (cross)
    for rnn in rnns:
        found, _, _ = _selections(view, rnn)
        _, hidden = _outputs(view, rnn)
        queries[view.full_name(rnn.target)] = [sel for _, sel in found[:1]] + ([hidden] if hidden is not None else [])
    for rnn in rnns:
        m = view.module(rnn)
        name = view.full_name(rnn.target)
        found, per_step, unknown = _selections(view, rnn)
        out, batch_first, pack = _sequence(view, rnn)
        seq = out if out is not None else rnn  # the module takes the (output, h_n) tuple when no node has it
        if out is not None:
            shape = view.shape(out)
        elif pack is not None:  # the module pads the packed output itself, batch first
            s_in = view.shape(pack.args[0])
            b, t = (s_in[0], s_in[1]) if _arg(pack, 2, "batch_first", False) else (s_in[1], s_in[0])
            shape = (b, t, m.hidden_size * (2 if m.bidirectional else 1))
        else:
            shape = tuple(rnn.meta["shape"][0])
        layout = "nlc" if batch_first else "lnc"
        owner, slot = _placement(view, rnn)
        info = {**_rnn_info(m), "batch_first": batch_first, "packed": pack is not None}
        if not found:
            if per_step and not unknown:
                log.debug("site %s: no rnn site, its output is used per step (a tokens site)", name)
                continue
            what = ", ".join(repr(u.format_node()) for u in unknown) or "nothing (its output is unused)"
            info["error"] = (f"Cannot tell how the output of RNN {name!r} is used: {what}. Known forms: "
                             f"out[:, -1] / out[-1], h_n[-1], torch.cat([h_n[-2], h_n[-1]], 1), out.mean(1). "
                             f"Pick another site with --at, or write the selection in one of these forms")
            log.debug("site %s: unrecognised RNN output use (%s)", name, what)
            sites.append(Site(name=name, kind="rnn", shape=shape, layout=layout, graph=view.prefix,
                              node=rnn.name, action="replace", args=(seq.name,), out_shape=shape,
                              owner=owner, slot=slot, info=info))
            continue
        mask, mask_info = _mask_source(view, rnn)
        if mask is None:
            log.info("site %s: the model passes no lengths or mask; attention will attend to every step, "
                     "padding included, if there is any", name)
        for form, sel in found:
            extra, roles = _extras(view, rnn, sel, mask, {n: q for n, q in queries.items() if n != name})
            sinfo = {**info, **mask_info, "form": form, "padding_known": mask is not None,
                     "extra": tuple(roles), "extra_shapes": tuple(view.shape(e) for e in extra)}
            log.debug("site %s: %s selection %s replaced", name, form, sel.name)
            sites.append(Site(name=name, kind="rnn", shape=shape, layout=layout, graph=view.prefix,
                              node=sel.name, action="replace", args=(seq.name, sel.name, *[e.name for e in extra]),
                              out_shape=view.shape(sel), owner=owner, slot=slot, info=sinfo))
    return sites


# -- the tokens finder ---------------------------------------------------------------------------------
_BLOCK_LEAVES = (nn.TransformerEncoderLayer, nn.TransformerDecoderLayer, nn.TransformerEncoder,
                 nn.TransformerDecoder)


def _block_ends(view: GraphView) -> list[tuple[str, fx.Node]]:
    """(module path, output node) of each transformer-like block: a module with children whose own code
    holds a residual add on (B, N, C) tokens, or a torch transformer layer kept as a leaf."""
    ends = []
    adds_in: dict[str, int] = {}
    for n in view.nodes:
        s = view.shape(n)
        if view.is_(is_add, n) and s is not None and len(s) == 3:
            adds_in[view.enclosing(n)] = adds_in.get(view.enclosing(n), 0) + 1
    for path, last in view._last_node_of.items():
        m = view.modules.get(path)
        s = view.shape(last)
        if m is None or not path or s is None or len(s) != 3:
            continue
        if isinstance(m, _BLOCK_LEAVES):
            ends.append((path, last))
        elif adds_in.get(path) and any(True for _ in m.children()):
            if view.layout(last) == "nchw":  # a 1-D conv block: (B, C, L), channels first, not tokens
                log.debug("site %s: no tokens site, its (B, C, L) output is channels first", path)
                continue
            ends.append((path, last))
    # a block traced as a graph of its own (its parent stays Python): its output, when it returns tokens
    out = next((n for n in view.nodes if n.op == "output"), None)
    res = out.args[0] if out is not None else None
    res = res[0] if isinstance(res, (tuple, list)) and res else res
    if view.prefix and adds_in.get("") and isinstance(res, fx.Node) and res.op != "placeholder" \
            and len(view.shape(res) or ()) == 3 and view.layout(res) != "nchw" \
            and any(True for _ in view.gm.children()):
        ends.append(("", res))
    return sorted(ends, key=lambda e: view.order[e[1]])


def find_tokens(view: GraphView) -> list[Site]:
    """(B, N, C) sequences: after each transformer block, and RNN outputs used per step."""
    sites = []
    for path, node in _block_ends(view):
        m = view.modules[path]
        mha = next((x for x in m.modules() if isinstance(x, nn.MultiheadAttention)), None)
        time_first = isinstance(m, _BLOCK_LEAVES) and mha is not None and not mha.batch_first
        layout = "lnc" if time_first else "nlc"
        owner, slot = (path, "") if node.op != "call_module" else _placement(view, node)
        mask, mask_info = _block_mask_source(view, node)
        sites.append(_tokens_site(view, view.full_name(path), node, layout, owner, slot,
                                  {"block": type(m).__name__}, mask, mask_info))
    for rnn in (n for n in view.nodes if view.is_(is_rnn, n)):
        m = view.module(rnn)
        _, per_step, _ = _selections(view, rnn)
        out, batch_first, _ = _sequence(view, rnn)
        if not per_step or out is None:
            continue
        mask, mask_info = _mask_source(view, rnn)
        owner, slot = _placement(view, rnn)
        sites.append(_tokens_site(view, view.full_name(rnn.target), out, "nlc" if batch_first else "lnc", owner,
                                  slot, _rnn_info(m), mask, mask_info))
    return sites


def find_rnn_input(view: GraphView) -> list[Site]:
    """The input sequence of each RNN (DA-RNN's input attention reweights its features)."""
    sites = []
    for rnn in (n for n in view.nodes if view.is_(is_rnn, n)):
        m = view.module(rnn)
        x = rnn.args[0] if rnn.args else None
        s = view.shape(x) if isinstance(x, fx.Node) else None
        if s is None or len(s) != 3:
            log.debug("site %s: no rnn_input site, its input is not a (B, T, F) tensor", rnn.target)
            continue
        owner, slot = _placement(view, rnn)
        sites.append(Site(name=view.full_name(rnn.target), kind="rnn_input", shape=s,
                          layout="nlc" if m.batch_first else "lnc", graph=view.prefix, node=x.name,
                          user=rnn.name, owner=owner, slot=f"{slot}_in", info=_rnn_info(m)))
    return sites
