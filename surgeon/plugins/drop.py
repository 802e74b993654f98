"""Attention-based drops: adl."""
from surgeon.hookspecs import hookimpl


@hookimpl
def register_attentions(register):
    from surgeon.layers.drop import ADL
    from surgeon.plugins._builds import site_build

    register("adl", site_build(ADL, name="adl", natural_identity=True), kinds=("stage", "residual", "after_conv"),
             aliases=("attention_dropout",),
             summary="attention-based dropout: drop mask or importance map in training, identity in eval",
             paper="Choe & Shim, Attention-based Dropout Layer for Weakly Supervised Object Localization, "
                   "CVPR 2019 (arXiv:1908.10028)")
