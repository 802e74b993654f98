"""Attention over channel groups: sa (shuffle attention), splat (ResNeSt split attention)."""
from surgeon.hookspecs import hookimpl

KINDS = ("residual", "stage", "after_conv")


@hookimpl
def register_attentions(register):
    from surgeon.layers.grouped import ShuffleAttention, SplitAttn
    from surgeon.plugins._glue import feature_map

    register("sa", feature_map(ShuffleAttention, name="sa", ranks=(4,)), kinds=KINDS, family="mixed",
             aliases=("shuffle_attention",),
             summary="shuffle attention: per group, gated channel and spatial halves, channel shuffle",
             paper="Zhang & Yang, SA-Net: Shuffle Attention for Deep CNNs, ICASSP 2021 (arXiv:2102.00240)")
    register("splat", feature_map(SplitAttn, name="splat", ranks=(4,)), kinds=KINDS, family="channel",
             aliases=("split_attention", "resnest"),
             summary="split attention: radix branches of a grouped conv mixed by a softmax per channel",
             paper="Zhang et al., ResNeSt: Split-Attention Networks, CVPRW 2022 (arXiv:2004.08955)")
