"""Spatial attentions: spatial (CBAM's spatial part), coord, stn."""
from surgeon.hookspecs import hookimpl


@hookimpl
def register_attentions(register):
    from surgeon.layers.spatial import CoordAttn, SpatialAttn, SpatialTransformer
    from surgeon.plugins._glue import FEATURE_MAPS, feature_map

    register("spatial", feature_map(SpatialAttn, name="spatial"),
             kinds=("residual", "stage", "after_conv"), layouts=FEATURE_MAPS, aliases=("sam",),
             summary="CBAM's spatial attention alone: k×k conv over channel max and mean",
             paper="Woo et al., CBAM, ECCV 2018 (arXiv:1807.06521)")
    register("coord", feature_map(CoordAttn, name="coord", ranks=(4, 5)),
             kinds=("residual", "stage", "after_conv"), layouts=FEATURE_MAPS, aliases=("coord_attn",),
             summary="coordinate attention: pooled H and W strips, shared 1×1 conv, two direction gates",
             paper="Hou et al., Coordinate Attention for Efficient Mobile Network Design, CVPR 2021 "
                   "(arXiv:2103.02907)")
    register("stn", feature_map(SpatialTransformer, name="stn", ranks=(4, 5), natural_identity=True),
             kinds=("stage", "after_conv", "residual"), layouts=FEATURE_MAPS, aliases=("spatial_transformer",),
             summary="spatial transformer: localisation net → affine θ → grid sample (starts as identity θ)",
             paper="Jaderberg et al., Spatial Transformer Networks, NeurIPS 2015 (arXiv:1506.02025)")
