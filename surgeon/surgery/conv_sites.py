"""Site finders for convolutions and skip connections: kinds `conv` and `skip`.

- conv: one 'replace' site per 2-D convolution module (a plain zero-padded nn.Conv2d, groups == 1) with a
  spatial output bigger than 1×1; args = (conv input, conv output), so a replacement can read both; `info` holds the
  conv's geometry, its module path and the nn.Conv2d itself (`info["module"]`), so a builder can copy it.
  NOTE: a conv that reads a model input directly (the stem) is not a site: self-attention over every input
  pixel costs N² at full resolution (12,544² logits per head for ResNet's 112×112 stem output, hundreds of
  GFLOPs) and the paper augments feature maps, not the stem.
- skip: a U-Net skip connection: a feature map concatenated along channels with a decoder feature
  that was upsampled from a coarser one. The site replaces the skip input of that concat only (`user`
  is the concat; the encoder's own use of the feature is untouched). The module receives (skip,
  *candidates): the candidates are the gating signals it may read, named in `info["extra"]` as
  'site:NAME' (module outputs on the decoder side, computed before the concat); `info["gating"]` is
  the paper's default, the coarser feature the decoder input was upsampled from; `info["arg_shapes"]`
  the shapes of all args (the plan counts FLOPs with the ones a module picks by its `site_args`).
"""
from __future__ import annotations

import logging

import torch
import torch.fx as fx
from torch import nn

from surgeon.surgery.graph import GraphView
from surgeon.surgery.sites import Site

log = logging.getLogger("surgeon")


def _spatial(s) -> tuple | None:
    return tuple(s[2:]) if s is not None and len(s) == 4 else None


def find_conv(view: GraphView) -> list[Site]:
    """Every nn.Conv2d (groups == 1) with a spatial output bigger than 1×1, as a 'replace' site."""
    sites = []
    for n in view.nodes:
        m = view.module(n)
        if n.op != "call_module" or not isinstance(m, nn.Conv2d):
            continue
        x = n.args[0] if n.args else None
        s_in, s_out = (view.shape(x) if isinstance(x, fx.Node) else None), view.shape(n)
        sp = _spatial(s_out)
        if sp is None or _spatial(s_in) is None or all(d == 1 for d in sp):
            continue
        if x.op == "placeholder":
            log.debug("site %s: no conv site, it reads the model input (a stem)", n.target)
            continue
        if type(m).forward is not nn.Conv2d.forward or m.padding_mode != "zeros":
            # timm's Conv2dSame / StdConv2d pad or standardise in forward: a copy would not compute the same
            log.debug("site %s: no conv site, %s is not a plain zero-padded Conv2d", n.target, type(m).__name__)
            continue
        if m.groups != 1:
            log.debug("site %s: no conv site, a grouped conv (groups=%d)", n.target, m.groups)
            continue
        owner, _, slot = n.target.rpartition(".")
        info = {"path": view.full_name(n.target), "module": m, "in_channels": m.in_channels,
                "out_channels": m.out_channels, "kernel_size": m.kernel_size, "stride": m.stride,
                "padding": m.padding, "dilation": m.dilation, "bias": m.bias is not None,
                "padding_mode": m.padding_mode}
        sites.append(Site(name=view.full_name(n.target), kind="conv", shape=s_in, layout="nchw",
                          graph=view.prefix, node=n.name, action="replace", args=(x.name, n.name),
                          out_shape=s_out, owner=owner, slot=slot, info=info))
    return sites


def _is_channel_cat(n: fx.Node) -> bool:
    if n.op != "call_function" or n.target is not torch.cat or not n.args:
        return False
    dim = n.args[1] if len(n.args) > 1 else n.kwargs.get("dim", 0)
    return dim in (1, -3) and isinstance(n.args[0], (list, tuple))


def _upsampled_from(view: GraphView, node: fx.Node, size: tuple) -> fx.Node | None:
    """Walk back from `node` along tensor inputs at `size` to the coarser feature map it was upsampled
    from: an op whose every feature-map input is coarser (interpolate, transposed conv). A broadcast
    (`x + x.mean((2, 3), keepdim=True)`) keeps an input at `size` and is walked through; a global
    (1×1) feature is a broadcast context, never an upsampling source."""
    cur, seen = node, set()
    while isinstance(cur, fx.Node) and cur not in seen:
        seen.add(cur)
        ins = [a for a in cur.all_input_nodes if _spatial(view.shape(a)) is not None]
        if not ins:
            return None
        same = [a for a in ins if _spatial(view.shape(a)) == size]
        if same:
            cur = same[0]
            continue
        sp = _spatial(view.shape(ins[0]))
        if all(d == 1 for d in sp) or not all(a <= b for a, b in zip(sp, size)):
            return None
        return ins[0]
    return None


def _feature_ancestors(view: GraphView, node: fx.Node) -> set[fx.Node]:
    """`node` and its ancestors through feature maps only: a crop sized by `d.shape` does not make the
    decoder feature `d` an ancestor of the cropped skip."""
    seen, todo = {node}, [node]
    while todo:
        for a in todo.pop().all_input_nodes:
            if a not in seen and (_spatial(view.shape(a)) is not None or a.op == "placeholder"):
                seen.add(a)
                todo.append(a)
    return seen


def _skip_name(view: GraphView, skip: fx.Node) -> str:
    """The module whose feature is skipped: through a crop or other ops on it ('enc1', not 'getitem')."""
    cur = skip
    while isinstance(cur, fx.Node) and not (view.name_for(cur) in view.modules and view.name_for(cur)):
        ins = [a for a in cur.all_input_nodes if _spatial(view.shape(a)) is not None]
        if len(ins) != 1:
            return view.site_name(skip)
        cur = ins[0]
    return view.name_for(cur)


def find_skip(view: GraphView) -> list[Site]:
    """U-Net skip connections: concat inputs other than the upsampled decoder feature (see module doc)."""
    sites = []
    for cat in view.nodes:
        if not _is_channel_cat(cat):
            continue
        ins = [a for a in cat.args[0] if isinstance(a, fx.Node)]
        shapes = [view.shape(a) for a in ins]
        if len(ins) < 2 or any(_spatial(s) is None for s in shapes) or len({_spatial(s) for s in shapes}) != 1:
            continue
        size = _spatial(shapes[0])
        # the decoder input: upsampled from a coarser feature (the latest such input when several are)
        ups = [(a, c) for a in ins if (c := _upsampled_from(view, a, size)) is not None]
        if not ups:
            log.debug("site %s: no skip site, no input of the concat is upsampled", view.site_name(cat))
            continue
        decoder, coarse = max(ups, key=lambda ac: view.order[ac[0]])
        dec_anc = view.ancestors(decoder) | {decoder}
        for skip in ins:
            if skip is decoder:
                continue
            before = _feature_ancestors(view, skip)
            cands: dict[str, fx.Node] = {}
            for c in sorted(dec_anc - before, key=lambda a: -view.order[a]):  # nearest first
                sp = _spatial(view.shape(c))
                if sp is None or view.layout(c) != "nchw" or not all(a <= b for a, b in zip(sp, size)):
                    continue
                name = view.name_for(c)
                if (c is coarse or c is decoder or (name in view.modules and name)) and c.op != "placeholder":
                    cands.setdefault(view.full_name(view.site_name(c)), c)
            gating = next((f"site:{k}" for k, c in cands.items() if c is coarse), None)
            if gating is None:  # the skip itself descends from the coarse feature: not an encoder's skip
                log.debug("site %s: no skip site, %s also feeds the decoder input", view.site_name(skip),
                          coarse.name)
                continue
            roles = tuple(f"site:{k}" for k in cands)
            skip_name = _skip_name(view, skip)
            owner = view.enclosing(cat)
            sites.append(Site(name=view.full_name(skip_name), kind="skip", shape=view.shape(skip), layout="nchw",
                              graph=view.prefix, node=skip.name, user=cat.name, action="replace",
                              args=(skip.name, *[c.name for c in cands.values()]), out_shape=view.shape(skip),
                              owner=owner, slot=skip_name.replace(".", "_"),
                              info={"concat": view.full_name(view.site_name(cat)), "extra": roles,
                                    "extra_shapes": tuple(view.shape(c) for c in cands.values()),
                                    "arg_shapes": (view.shape(skip), *(view.shape(c) for c in cands.values())),
                                    "gating": gating}))
    return sites
