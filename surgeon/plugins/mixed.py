"""Mixed channel + spatial attentions: cbam, bam."""
from surgeon.hookspecs import hookimpl


@hookimpl
def register_attentions(register):
    from surgeon.layers.mixed import BAM, CBAM
    from surgeon.plugins._glue import feature_map

    register("cbam", feature_map(CBAM, name="cbam", ranks=(4,)), kinds=("residual", "stage", "after_conv"),
             summary="channel attention (avg+max MLP), then 7×7 spatial attention",
             paper="Woo et al., CBAM: Convolutional Block Attention Module, ECCV 2018 (arXiv:1807.06521)")
    register("bam", feature_map(BAM, name="bam", ranks=(4,)), kinds=("stage", "residual", "after_conv"),
             summary="channel and dilated spatial branches in parallel, x·(1 + σ(Mc·Ms))",
             paper="Park et al., BAM: Bottleneck Attention Module, BMVC 2018 (arXiv:1807.06514)")
