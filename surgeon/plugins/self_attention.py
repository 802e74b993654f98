"""Self-attention on feature maps: nl (alias nonlocal), danet, ccnet, ema.

The non-local block (zero-scale BN), DANet and CCNet (γ = 0) start as the identity by their papers'
own init, so both inits build the same module; EMANet's does not, so identity init adds a zero gate.
"""
from surgeon.hookspecs import hookimpl

KINDS = ("stage", "residual", "after_conv")


@hookimpl
def register_attentions(register):
    from surgeon.layers.self_attention import CrissCrossAttn, DualAttention, EMAUnit, NonLocal2d
    from surgeon.plugins._glue import FEATURE_MAPS, feature_map

    # "nl" as in timm; also a safe attribute name, where the keyword `nonlocal` would break fx's codegen
    register("nl", feature_map(NonLocal2d, name="nl", ranks=(4,), natural_identity=True), kinds=KINDS,
             layouts=FEATURE_MAPS,
             aliases=("nonlocal", "non_local"),
             summary="non-local block: every position attends to all (embedded Gaussian, dot, concat)",
             paper="Wang et al., Non-local Neural Networks, CVPR 2018 (arXiv:1711.07971)")
    register("danet", feature_map(DualAttention, name="danet", ranks=(4,), natural_identity=True), kinds=KINDS,
             layouts=FEATURE_MAPS,
             aliases=("dual_attention",),
             summary="position + channel self-attention, each with a learned γ from 0, summed",
             paper="Fu et al., Dual Attention Network for Scene Segmentation, CVPR 2019 (arXiv:1809.02983)")
    register("ccnet", feature_map(CrissCrossAttn, name="ccnet", ranks=(4,), natural_identity=True), kinds=KINDS,
             layouts=FEATURE_MAPS,
             aliases=("criss_cross", "cca"),
             summary="criss-cross attention over each position's row and column, applied twice",
             paper="Huang et al., CCNet: Criss-Cross Attention for Semantic Segmentation, ICCV 2019 "
                   "(arXiv:1811.11721)")
    register("ema", feature_map(EMAUnit, name="ema", ranks=(4,)), kinds=KINDS,
             layouts=FEATURE_MAPS, aliases=("emanet",),
             summary="expectation-maximisation attention: low-rank reconstruction from K bases",
             paper="Li et al., Expectation-Maximization Attention Networks for Semantic Segmentation, "
                   "ICCV 2019 (arXiv:1907.13426)")
