"""Differentiable hard attention (dham): top-k spatial selection with a straight-through gradient."""
from surgeon.hookspecs import hookimpl


@hookimpl
def register_attentions(register):
    from surgeon.layers.hard import HardAttn
    from surgeon.plugins._glue import feature_map

    register("dham", feature_map(HardAttn, name="dham", ranks=(4,)), kinds=("residual", "stage", "after_conv"),
             aliases=("differentiable_hard_attention", "hard_topk"),
             summary="keeps the top-k scoring positions (1×1 conv scores), zeros the rest; straight-through backward",
             paper="Malinowski et al., Learning Visual Question Answering by Bootstrapping Hard Attention, "
                   "ECCV 2018 (arXiv:1808.00300)")
