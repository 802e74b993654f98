"""Self-attention blocks in place of a convolution: bot, halo, lambda."""
from surgeon.hookspecs import hookimpl


@hookimpl
def register_attentions(register):
    from surgeon.layers.local_attention import BottleneckMHSA, HaloAttn, LambdaLayer
    from surgeon.plugins._glue import feature_map

    register("bot", feature_map(BottleneckMHSA, name="bot", ranks=(4,), feat_size=True),
             kinds=("stage", "residual", "after_conv"), family="self attention",
             aliases=("bottleneck", "bot_mhsa"),
             summary="BoT's global multi-head self-attention with 2-D relative position logits",
             paper="Srinivas et al., Bottleneck Transformers for Visual Recognition, CVPR 2021 (arXiv:2101.11605)")
    register("halo", feature_map(HaloAttn, name="halo", ranks=(4,)), kinds=("residual", "stage", "after_conv"),
             family="self attention", aliases=("halo_attention",),
             summary="blocked local self-attention: 8×8 query blocks attend to their window with a 3-pixel halo",
             paper="Vaswani et al., Scaling Local Self-Attention for Parameter Efficient Visual Backbones, "
                   "CVPR 2021 (arXiv:2103.12731)")
    register("lambda", feature_map(LambdaLayer, name="lambda", ranks=(4,)), kinds=("residual", "stage", "after_conv"),
             family="self attention", aliases=("lambda_layer",),
             summary="lambda layer: content and local position lambdas applied to each query",
             paper="Bello, LambdaNetworks: Modeling Long-Range Interactions Without Attention, ICLR 2021 "
                   "(arXiv:2102.08602)")
