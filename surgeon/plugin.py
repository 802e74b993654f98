"""Everything a plugin author needs, in one import.

    from surgeon.plugin import feature_map, hookimpl

    @hookimpl
    def register_attentions(register):
        from mylab.layers import MyAttention            # MyAttention(channels, *, option=default)
        register("myattn", feature_map(MyAttention, name="myattn"), kinds=("residual",),
                 summary="what it computes", paper="Me et al., 2026")

The hooks and their examples are in `surgeon.hookspecs`. Names load on first use: `hookimpl` and the
build helpers are torch-free, so a plugin file that imports only them at the top stays cheap to load.
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from surgeon.hookspecs import hookimpl

if TYPE_CHECKING:
    from surgeon.layers.gate import ZeroGate, check_init, gated
    from surgeon.plugins._glue import feature_map, require_feature_map, site_after, with_options
    from surgeon.surgery.graph import (GraphView, is_act, is_add, is_conv, is_dropout, is_flatten, is_linear,
                                       is_norm, is_pool, is_weighted, pool_type)
    from surgeon.surgery.sites import Site

_GRAPH = ("GraphView", "is_act", "is_add", "is_conv", "is_dropout", "is_flatten", "is_linear", "is_norm", "is_pool",
          "is_weighted", "pool_type")
_HOME = {
    **{name: "surgeon.surgery.graph" for name in _GRAPH},
    "Site": "surgeon.surgery.sites",
    "gated": "surgeon.layers.gate",
    "ZeroGate": "surgeon.layers.gate",
    "check_init": "surgeon.layers.gate",
    "feature_map": "surgeon.plugins._glue",
    "require_feature_map": "surgeon.plugins._glue",
    "with_options": "surgeon.plugins._glue",
    "site_after": "surgeon.plugins._glue",
}


def __getattr__(name: str) -> Any:
    if name in _HOME:
        value = getattr(importlib.import_module(_HOME[name]), name)
        globals()[name] = value  # later lookups skip this function
        return value
    raise AttributeError(f"module 'surgeon.plugin' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)


__all__ = ["hookimpl", "Site", "site_after", "GraphView", "is_act", "is_add", "is_conv", "is_dropout", "is_flatten",
           "is_linear", "is_norm", "is_pool", "is_weighted", "pool_type", "gated", "ZeroGate", "check_init",
           "feature_map", "require_feature_map", "with_options"]
