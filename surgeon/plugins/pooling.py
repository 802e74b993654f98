"""Attention pooling: attnpool replaces average or max pooling."""
from surgeon.hookspecs import hookimpl


def build_attnpool(site, *, init: str = "identity", num_heads: int = 1, score: str | None = None,
                   query: str | None = None, hidden: int | None = None):
    """Dispatches on the site's kind: 'pool' (a feature map) or 'rnn' (a sequence; score/query/hidden)."""
    if site.kind == "rnn":
        from surgeon.plugins.sequence import build_rnn_pool

        if num_heads != 1:
            raise ValueError(f"num_heads applies to pool sites; rnn sites pool with one query, got {num_heads}")
        return build_rnn_pool(site, init=init, score=score or "additive", query=query or "learned", hidden=hidden)
    if (score, query, hidden) != (None, None, None):
        raise ValueError("score, query and hidden apply to rnn sites; pool sites use num_heads")
    from surgeon.layers.gate import GatedReplacement, check_init
    from surgeon.layers.pooling import AttentionPool2d, PoolReplacement
    from surgeon.plugins._glue import require_feature_map

    require_feature_map(site, "attnpool", (4,))
    info = site.info
    out_spatial = site.out_shape[2:] if len(site.out_shape) == 4 else (1, 1)
    if info.get("global", False):
        pool = AttentionPool2d(site.channels, num_heads=num_heads, output_size=1, flatten=False)
    elif "kernel_size" in info:
        pool = AttentionPool2d(site.channels, num_heads=num_heads, kernel_size=info["kernel_size"],
                               stride=info.get("stride"), padding=info.get("padding", 0),
                               ceil_mode=info.get("ceil_mode", False))
    else:
        pool = AttentionPool2d(site.channels, num_heads=num_heads, output_size=tuple(out_spatial))
    module = PoolReplacement(pool, site.out_shape[1:])
    padding = info.get("padding", 0)
    padded = padding not in (0, (0, 0), [0, 0]) and info.get("count_include_pad", True)
    dilated = info.get("dilation", 1) not in (1, (1, 1), [1, 1])
    # zero scores give the plain average: exact for average pooling that does not count padding
    if init == "identity" and (info.get("pool") != "avg" or padded or dilated):
        return GatedReplacement(module)
    check_init(init)
    return module


@hookimpl
def register_attentions(register):
    register("attnpool", build_attnpool, kinds=("pool", "rnn"), aliases=("attention_pool",),
             layouts=("nchw", "nlc", "lnc"),
             summary="softmax attention pooling in place of average/max pooling (zero scores = average), "
                     "or over an RNN's steps in place of its last-step / h_n / mean selection (score=...)",
             paper="Gao et al., LIP: Local Importance-based Pooling, ICCV 2019 (arXiv:1908.04156)")
