"""Spatial attentions: spatial (CBAM's spatial part)."""
from surgeon.hookspecs import hookimpl


@hookimpl
def register_attentions(register):
    from surgeon.layers.spatial import SpatialAttn
    from surgeon.plugins._glue import feature_map

    register("spatial", feature_map(SpatialAttn, name="spatial", ranks=(4,)),
             kinds=("residual", "stage", "after_conv"), aliases=("sam",),
             summary="CBAM's spatial attention alone: k×k conv over channel max and mean",
             paper="Woo et al., CBAM, ECCV 2018 (arXiv:1807.06521)")
