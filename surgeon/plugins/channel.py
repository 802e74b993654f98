"""Channel attentions: se, eca, sk, ge, gc, srm, fca."""
from surgeon.hookspecs import hookimpl

KINDS = ("residual", "stage", "after_conv")


@hookimpl
def register_attentions(register):
    from surgeon.layers.channel import (EcaModule, FcaModule, GatherExcite, GlobalContext, SelectiveKernel, SEModule,
                                        SRM)
    from surgeon.plugins._glue import CHANNELS, FEATURE_MAPS, feature_map

    register("se", feature_map(SEModule, name="se"), kinds=KINDS, layouts=CHANNELS,
             aliases=("squeeze_excite",), summary="squeeze-and-excitation channel reweighting",
             paper="Hu et al., Squeeze-and-Excitation Networks, CVPR 2018 (arXiv:1709.01507)")
    register("eca", feature_map(EcaModule, name="eca"), kinds=KINDS, layouts=CHANNELS,
             summary="efficient channel attention: 1-D conv across channels, adaptive kernel",
             paper="Wang et al., ECA-Net, CVPR 2020 (arXiv:1910.03151)")
    register("sk", feature_map(SelectiveKernel, name="sk", ranks=(4,)), kinds=KINDS, layouts=FEATURE_MAPS,
             aliases=("selective_kernel",),
             summary="selective kernel: dilated grouped-conv branches mixed by softmax channel attention",
             paper="Li et al., Selective Kernel Networks, CVPR 2019 (arXiv:1903.06586)")
    register("ge", feature_map(GatherExcite, name="ge", ranks=(4,), feat_size=True), kinds=KINDS, layouts=FEATURE_MAPS,
             aliases=("gather_excite",),
             summary="gather-excite: x·σ(upsample(gather over an extent)); parameter-free or parametric",
             paper="Hu et al., Gather-Excite, NeurIPS 2018 (arXiv:1810.12348)")
    register("gc", feature_map(GlobalContext, name="gc"), kinds=KINDS, layouts=CHANNELS,
             aliases=("global_context",),
             summary="global context: softmax attention pooling, bottleneck transform with LayerNorm, add",
             paper="Cao et al., GCNet, ICCVW 2019 (arXiv:1904.11492)")
    register("srm", feature_map(SRM, name="srm"), kinds=KINDS, layouts=CHANNELS,
             summary="style-based recalibration: mean+std pooling, channel-wise FC, BN, sigmoid",
             paper="Lee et al., SRM: A Style-based Recalibration Module, ICCV 2019 (arXiv:1903.10829)")
    register("fca", feature_map(FcaModule, name="fca", ranks=(4,), feat_size=True), kinds=KINDS, layouts=FEATURE_MAPS,
             aliases=("fcanet",),
             summary="frequency channel attention: SE squeezed by 2-D DCT components (top16)",
             paper="Qin et al., FcaNet: Frequency Channel Attention Networks, ICCV 2021 (arXiv:2012.11879)")
