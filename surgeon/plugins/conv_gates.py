"""aaconv (replaces a conv), residual_attention (insertable block), attention_gate (U-Net skip gate).

attention_gate is a two-input edit. At a `skip` site (a skip connection's input to a decoder concat)
the gating signal g is named by the option `gating`:
- omitted: the paper's choice, the coarser decoder feature that was upsampled for this concat;
- a name, `gating="dec2"` (or "site:dec2"): that feature for every planned site (use with `at=`);
- a mapping, `gating={"enc1": "dec2", "enc2": "dec3"}`: per skip site; every planned site needs a key.
Valid names are the decoder-side module outputs computed before the concat, nearest first (in Python:
a skip site's `info["extra"]`); a misspelt name is an OptionError with a "did you mean" and the valid names.
The rewrite passes the module only (skip, chosen gating signal): see `site_args` in `surgery/rewrite.py`.
CLI: `--option gating=dec2 --at enc1`, or `--option "gating={'enc1': 'dec2'}"`.
"""
from surgeon.hookspecs import hookimpl

CONV_PAPER = "Bello et al., Attention Augmented Convolutional Networks, ICCV 2019 (arXiv:1904.09925)"
RAN_PAPER = "Wang et al., Residual Attention Network for Image Classification, CVPR 2017 (arXiv:1704.06873)"
GATE_PAPER = ("Oktay et al., Attention U-Net: Learning Where to Look for the Pancreas, MIDL 2018 "
              "(arXiv:1804.03999)")


def _check_init(init: str) -> None:
    from surgeon.layers.gate import check_init  # torch stays out of plugin import time

    check_init(init)


def build_aaconv(site, *, init: str = "identity", heads: int = 8, key_ratio: float = 0.2,
                 value_ratio: float = 0.1, key_channels: int | None = None, value_channels: int | None = None,
                 relative: bool = True):
    from surgeon.errors import ShapeError
    from surgeon.layers.augmented import AAConvPaper, AAConvReplacement, AAConv2d, from_conv

    _check_init(init)
    conv = site.info.get("module")
    if site.kind != "conv" or conv is None:
        raise ShapeError(f"aaconv replaces a convolution: it needs a conv site, not the {site.kind} site "
                         f"{site.name!r}")
    options = dict(heads=heads, key_ratio=key_ratio, value_ratio=value_ratio, key_channels=key_channels,
                   value_channels=value_channels, relative=relative, size=tuple(site.out_shape[2:]))
    if init == "paper":
        aa = AAConv2d(conv.in_channels, out_channels=conv.out_channels, kernel_size=conv.kernel_size,
                      stride=conv.stride, padding=conv.padding, dilation=conv.dilation,
                      bias=conv.bias is not None, **options)
        return AAConvPaper(aa)
    return AAConvReplacement(from_conv(conv, **options))


def build_residual_attention(site, *, init: str = "identity", p: int = 1, t: int = 2, r: int = 1,
                             depth: int | None = None):
    from surgeon.layers.gate import gated
    from surgeon.layers.residual_attention import ResidualAttention, auto_depth
    from surgeon.plugins._glue import require_feature_map

    require_feature_map(site, "residual_attention", (4,))
    _check_init(init)
    depth = auto_depth(*site.shape[2:]) if depth is None else depth
    return gated(ResidualAttention(site.channels, p=p, t=t, r=r, depth=depth), init)


def build_attention_gate(site, *, init: str = "identity", gating=None, inter_channels: int | None = None,
                         mode: str = "bilinear"):
    from surgeon.layers.attention_gate import AttentionGate
    from surgeon.plugins._glue import gating_input

    _check_init(init)
    idx, g_shape = gating_input(site, gating, attention="attention_gate")
    gate = AttentionGate(site.channels, gating_channels=g_shape[1], inter_channels=inter_channels, mode=mode,
                         identity=init == "identity")
    gate.site_args = (0, 1 + idx)  # the rewrite passes (skip, the chosen gating signal) only
    return gate


@hookimpl
def register_attentions(register):
    register("aaconv", build_aaconv, kinds=("conv",), aliases=("attention_augmented", "aa_conv"),
             summary="conv output concatenated with multi-head self-attention (relative logits)",
             paper=CONV_PAPER)
    register("residual_attention", build_residual_attention, kinds=("stage", "residual"),
             aliases=("ran", "attention_module"),
             summary="(1 + M(x))·T(x): trunk units times a bottom-up top-down soft mask",
             paper=RAN_PAPER)
    register("attention_gate", build_attention_gate, kinds=("skip",), aliases=("ag", "attention_unet"),
             summary="additive gate on a U-Net skip connection, driven by a coarser decoder feature",
             paper=GATE_PAPER)
