"""Cheap channel recalibration: simam, gct, ese, ceca."""
from surgeon.hookspecs import hookimpl

KINDS = ("residual", "stage", "after_conv")


@hookimpl
def register_attentions(register):
    from surgeon.layers.recalibration import GCT, CecaModule, EffectiveSE, SimAM
    from surgeon.plugins._glue import feature_map

    register("simam", feature_map(SimAM, name="simam"), kinds=KINDS, family="channel",
             summary="parameter-free: x·σ(inverse neuron energy), from each channel's mean and variance",
             paper="Yang et al., SimAM: A Simple, Parameter-Free Attention Module for CNNs, ICML 2021")
    register("gct", feature_map(GCT, name="gct", natural_identity=True), kinds=KINDS, family="channel",
             aliases=("gated_channel_transformation",),
             summary="gated channel transformation: ℓ2 embedding, channel normalisation, 1 + tanh gate",
             paper="Yang et al., Gated Channel Transformation for Visual Recognition, CVPR 2020 (arXiv:1909.11519)")
    register("ese", feature_map(EffectiveSE, name="ese"), kinds=KINDS, family="channel",
             aliases=("effective_se",),
             summary="effective SE: one C→C fully connected layer, hard sigmoid (VoVNetV2)",
             paper="Lee & Park, CenterMask: Real-Time Anchor-Free Instance Segmentation, CVPR 2020 "
                   "(arXiv:1911.06667)")
    register("ceca", feature_map(CecaModule, name="ceca"), kinds=KINDS, family="channel",
             aliases=("eca_circular",),
             summary="ECA with circular padding across channels (timm's CecaModule)",
             paper="Wang et al., ECA-Net, CVPR 2020 (arXiv:1910.03151); circular padding as timm")
