"""Site finder for kind `last`: the end of the last (deepest) stage, Feature Pyramid Attention's place.

The site is the last node, in graph order, of the model's coarsest feature map larger than 1×1 that
convolutions computed: ResNet's `layer4`, ConvNeXt's `stages.3`, a U-Net encoder's bottleneck (whose
output the decoder then upsamples). A classifier's global pooling (1×1) comes after it and is not a site.
NOTE: a model traced piecewise gets one `last` site per traced piece that computes feature maps.
"""
from __future__ import annotations

import logging
import math

import torch.fx as fx

from surgeon.surgery.graph import GraphView, is_conv
from surgeon.surgery.sites import Site

log = logging.getLogger("surgeon")


def _feature_map(view: GraphView, n: fx.Node) -> bool:
    s = view.shape(n)
    return (s is not None and len(s) == 4 and n.op not in ("placeholder", "output", "get_attr")
            and any(d > 1 for d in s[2:]) and view.layout(n) == "nchw")


def find_last(view: GraphView) -> list[Site]:
    """One site after the last node at the coarsest convolved feature map size (see the module doc).

    1. The feature maps (N, C, H, W) larger than 1×1 with a convolution among their ancestors.
    2. The smallest spatial area among them.
    3. The last node in graph order with that area: the end of the last stage.
    """
    after_conv: set[fx.Node] = set()  # nodes with a convolution among their ancestors (or one themselves)
    for n in view.nodes:
        if view.is_(is_conv, n) or any(a in after_conv for a in n.all_input_nodes):
            after_conv.add(n)
    convolved = [n for n in view.nodes if n in after_conv and _feature_map(view, n)]
    if not convolved:
        return []
    area = min(math.prod(view.shape(n)[2:]) for n in convolved)
    here = [n for n in convolved if math.prod(view.shape(n)[2:]) == area][-1]
    name = view.name_for(here)
    owner, slot = (name, "") if name in view.modules and name else (view.enclosing(here), here.name)
    log.debug("site %s: the last stage ends here (%s)", view.site_name(here), "×".join(map(str, view.shape(here)[1:])))
    return [Site(name=view.full_name(view.site_name(here)), kind="last", shape=view.shape(here), layout="nchw",
                 graph=view.prefix, node=here.name, owner=owner, slot=slot)]
