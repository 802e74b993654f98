"""Mixed channel + spatial attentions: cbam, bam, triplet, scse."""
from surgeon.hookspecs import hookimpl


@hookimpl
def register_attentions(register):
    from surgeon.layers.mixed import BAM, CBAM, SCSE, TripletAttention
    from surgeon.plugins._glue import FEATURE_MAPS, feature_map

    register("cbam", feature_map(CBAM, name="cbam"), kinds=("residual", "stage", "after_conv"),
             layouts=FEATURE_MAPS,
             summary="channel attention (avg+max MLP), then 7×7 spatial attention",
             paper="Woo et al., CBAM: Convolutional Block Attention Module, ECCV 2018 (arXiv:1807.06521)")
    register("bam", feature_map(BAM, name="bam"), kinds=("stage", "residual", "after_conv"),
             layouts=FEATURE_MAPS,
             summary="channel and dilated spatial branches in parallel, x·(1 + σ(Mc·Ms))",
             paper="Park et al., BAM: Bottleneck Attention Module, BMVC 2018 (arXiv:1807.06514)")
    register("triplet", feature_map(TripletAttention, name="triplet"),
             kinds=("residual", "stage", "after_conv"), layouts=FEATURE_MAPS, aliases=("triplet_attention",),
             summary="triplet attention: Z-pool + 7×7 conv gates over the (C,W), (H,C) and (H,W) planes",
             paper="Misra et al., Rotate to Attend: Convolutional Triplet Attention Module, WACV 2021 "
                   "(arXiv:2010.03045)")
    register("scse", feature_map(SCSE, name="scse"), kinds=("stage", "residual", "after_conv"), layouts=FEATURE_MAPS,
             summary="concurrent spatial and channel squeeze & excitation, fused by add (or max)",
             paper="Roy et al., Concurrent Spatial and Channel Squeeze & Excitation in FCNs, MICCAI 2018 "
                   "(arXiv:1803.02579)")
