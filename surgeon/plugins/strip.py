"""Attention from strips and polarized/external attention: ela, strip, psa, ea."""
from surgeon.hookspecs import hookimpl

KINDS = ("residual", "stage", "after_conv")


@hookimpl
def register_attentions(register):
    from surgeon.layers.external import ExternalAttention
    from surgeon.layers.polarized import PolarizedSelfAttention
    from surgeon.layers.strip import ELA, StripPool
    from surgeon.plugins._glue import feature_map

    register("ela", feature_map(ELA, name="ela", ranks=(4,)), kinds=KINDS, family="spatial",
             aliases=("efficient_local_attention",),
             summary="efficient local attention: 1-D conv + GroupNorm over row and column strips",
             paper="Xu & Wan, ELA: Efficient Local Attention for Deep CNNs, 2024 (arXiv:2403.01123)")
    register("strip", feature_map(StripPool, name="strip", ranks=(4,)), kinds=KINDS, family="spatial",
             aliases=("strip_pooling", "spm"),
             summary="strip pooling: 3×1 and 1×3 convs over row/column means, fused to a sigmoid map",
             paper="Hou et al., Strip Pooling: Rethinking Spatial Pooling for Scene Parsing, CVPR 2020 "
                   "(arXiv:2003.13328)")
    register("psa", feature_map(PolarizedSelfAttention, name="psa", ranks=(4,)), kinds=KINDS, family="mixed",
             aliases=("polarized",),
             summary="polarized self-attention: full-resolution channel-only and spatial-only branches",
             paper="Liu et al., Polarized Self-Attention: Towards High-quality Pixel-wise Regression, 2021 "
                   "(arXiv:2107.00782)")
    register("ea", feature_map(ExternalAttention, name="ea", ranks=(4,)), kinds=("stage", "residual", "after_conv"),
             family="self attention", aliases=("external_attention",),
             summary="external attention: positions attend to a learned 64-unit memory, double normalised",
             paper="Guo et al., Beyond Self-attention: External Attention using Two Linear Layers, TPAMI 2022 "
                   "(arXiv:2105.02358)")
