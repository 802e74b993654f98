"""Channel attentions: se, eca."""
from surgeon.hookspecs import hookimpl


@hookimpl
def register_attentions(register):
    from surgeon.layers.channel import EcaModule, SEModule
    from surgeon.plugins._glue import feature_map

    register("se", feature_map(SEModule, name="se"), kinds=("residual", "stage", "after_conv"),
             aliases=("squeeze_excite",), summary="squeeze-and-excitation channel reweighting",
             paper="Hu et al., Squeeze-and-Excitation Networks, CVPR 2018 (arXiv:1709.01507)")
    register("eca", feature_map(EcaModule, name="eca"), kinds=("residual", "stage", "after_conv"),
             summary="efficient channel attention: 1-D conv across channels, adaptive kernel",
             paper="Wang et al., ECA-Net, CVPR 2020 (arXiv:1910.03151)")
