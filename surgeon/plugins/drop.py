"""Attention-based drops: adl."""
from surgeon.hookspecs import hookimpl


@hookimpl
def register_attentions(register):
    from surgeon.plugins._glue import FEATURE_MAPS, feature_map
    from surgeon.layers.drop import ADL

    register("adl", feature_map(ADL, name="adl", natural_identity=True), kinds=("stage", "residual", "after_conv"),
             layouts=FEATURE_MAPS,
             aliases=("attention_dropout",),
             summary="attention-based dropout: drop mask or importance map in training, identity in eval",
             paper="Choe & Shim, Attention-based Dropout Layer for Weakly Supervised Object Localization, "
                   "CVPR 2019 (arXiv:1908.10028)")
