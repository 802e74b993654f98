"""Site finders for convolutions (`conv`, replaced by e.g. aaconv) and U-Net skip connections (`skip`)."""
from surgeon.hookspecs import hookimpl


@hookimpl
def register_site_finders(register):
    from surgeon.surgery import conv_sites

    register("conv", conv_sites.find_conv, summary="replaces a 2-D convolution (groups 1, output > 1×1)")
    register("skip", conv_sites.find_skip, summary="a skip connection's input to a decoder concat (U-Net)")
