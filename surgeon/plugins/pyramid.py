"""Pyramid Attention Network: fpa (after the last stage, new kind `last`) and gau (decoder skips, like
attention_gate: `gating` names the coarser decoder feature, default the one upsampled for the concat)."""
from surgeon.hookspecs import hookimpl

PAN_PAPER = "Li et al., Pyramid Attention Network for Semantic Segmentation, BMVC 2018 (arXiv:1805.10180)"


def build_gau(site, *, init: str = "identity", gating=None, mode: str = "bilinear"):
    from surgeon.layers.gate import check_init
    from surgeon.layers.pyramid import GAU
    from surgeon.plugins._glue import gating_input

    check_init(init)
    idx, g_shape = gating_input(site, gating, attention="gau")
    gau = GAU(site.channels, high_channels=g_shape[1], mode=mode, identity=init == "identity")
    gau.site_args = (0, 1 + idx)  # the rewrite passes (skip, the chosen gating signal) only
    return gau


@hookimpl
def register_site_finders(register):
    from surgeon.surgery import last

    register("last", last.find_last, summary="end of the last stage: the coarsest feature map (before pooling)")


@hookimpl
def register_attentions(register):
    from surgeon.layers.pyramid import FPA
    from surgeon.plugins._glue import feature_map

    register("fpa", feature_map(FPA, name="fpa", ranks=(4,)), kinds=("last", "stage"),
             aliases=("feature_pyramid_attention",),
             summary="PAN's feature pyramid attention: 1×1 conv × U-shaped 7/5/3 pyramid + global pooling branch",
             paper=PAN_PAPER)
    register("gau", build_gau, kinds=("skip",), aliases=("global_attention_upsample",),
             summary="PAN's global attention upsample: skip conv × decoder's global context + upsampled decoder",
             paper=PAN_PAPER)
