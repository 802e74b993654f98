"""Sequence attentions: attnpool over RNN outputs (with the pooling plugin), hard, local, mhsa,
structured, cross, inputattn. Thin glue around `surgeon.layers.sequence`."""
from __future__ import annotations

from surgeon.hookspecs import hookimpl

SEQUENCE_LAYOUTS = ("nlc", "lnc")


def _require(site, attention: str, kinds: tuple[str, ...]) -> None:
    from surgeon.errors import ShapeError

    if site.info.get("error"):
        raise ShapeError(f"{attention}: {site.info['error']}")
    if site.kind not in kinds or site.layout not in SEQUENCE_LAYOUTS or len(site.shape) != 3:
        raise ShapeError(f"{attention} needs a {'/'.join(kinds)} site holding a (B, T, C) sequence; site "
                         f"{site.name!r} is a {site.kind} site of shape {tuple(site.shape)} ({site.layout})")


def _check_init(init: str) -> None:
    from surgeon.layers.gate import check_init  # torch stays out of plugin import time

    check_init(init)


def _external(site, query: str) -> tuple[int, int]:
    """(index in the site's extra arguments, size) of the external query a user named."""
    from surgeon.errors import OptionError, did_you_mean

    roles = [r for r in site.info.get("extra", ()) if r != "mask"]
    names = {r: r for r in roles} | {r.split(":", 1)[1]: r for r in roles}
    if query not in names:
        valid = ", ".join(repr(r) for r in roles) or "none (the model has no other input, and no earlier RNN)"
        hint = did_you_mean(query, names) if isinstance(query, str) else ""
        raise OptionError(f"cross at {site.name!r}: unknown query {query!r}.{hint} Valid: {valid}")
    idx = list(site.info["extra"]).index(names[query])
    shape = site.info["extra_shapes"][idx]
    if shape is None or len(shape) not in (2, 3):  # 3: another RNN's h_n stack, read as h_n[-1]
        raise OptionError(f"cross at {site.name!r}: the query {query!r} must be a (B, D) vector, "
                          f"got shape {shape}")
    return idx, shape[-1]


def rnn_replacement(site, pool, init: str, *, out_dim: int | None = None, query_at: int | None = None):
    """Wrap a (B, T, C) -> (B, D) pool as the module that replaces an rnn site's selection."""
    from surgeon.layers.sequence import SequenceReplacement

    _check_init(init)
    info = site.info
    roles = list(info.get("extra", ()))
    mask_at = roles.index("mask") if "mask" in roles else None
    in_features = out_dim or site.channels
    out_features = site.out_shape[-1]
    # mean over time with uniform weights at init is the mean already; a gate there would never move
    exact = (info.get("form") == "mean" and mask_at is None and getattr(pool, "uniform_at_init", False)
             and in_features == out_features)
    return SequenceReplacement(pool, out_features=out_features, in_features=in_features,
                               batch_first=info.get("batch_first", True), gate=init == "identity" and not exact,
                               mask_at=mask_at, mask_form=info.get("mask"), pad_id=info.get("pad_id"),
                               query_at=query_at)


def build_rnn_pool(site, *, init: str = "identity", score: str = "additive", query: str = "learned",
                   hidden: int | None = None):
    from surgeon.layers.sequence import SeqAttnPool

    _require(site, "attnpool", ("rnn",))
    return rnn_replacement(site, SeqAttnPool(site.channels, score=score, query=query, hidden=hidden), init)


def build_hard(site, *, init: str = "identity", score: str = "additive", query: str = "learned",
               hidden: int | None = None, temperature: float = 1.0):
    from surgeon.layers.sequence import HardAttnPool

    _require(site, "hard", ("rnn",))
    pool = HardAttnPool(site.channels, score=score, query=query, hidden=hidden, temperature=temperature)
    return rnn_replacement(site, pool, init)


def tokens_module(site, module):
    """A module for a tokens site: (B, T, C) or time-first, and given the padding
    mask where the site has padding information (a 'replace' site with args (tokens, mask source))."""
    from surgeon.layers.sequence import SequenceFirst, TokenMask

    module = SequenceFirst(module) if site.layout == "lnc" else module
    if not site.info.get("mask"):
        return module
    return TokenMask(module, form=site.info["mask"], pad_id=site.info.get("pad_id"), batch_first=site.layout != "lnc")


def build_local(site, *, init: str = "identity", window: int = 8, mode: str = "m", score: str | None = None,
                query: str = "last"):
    from surgeon.layers.sequence import LocalAttnPool, LocalSelfAttn

    _require(site, "local", ("rnn", "tokens"))
    if site.kind == "rnn":
        pool = LocalAttnPool(site.channels, score=score or "general", query=query, window=window, mode=mode)
        return rnn_replacement(site, pool, init)
    _check_init(init)
    module = LocalSelfAttn(site.channels, window=window, mode=mode, score=score or "scaled_dot",
                           identity=init == "identity")
    return tokens_module(site, module)


def build_mhsa(site, *, init: str = "identity", heads: int | None = None, qkv_bias: bool = True):
    from surgeon.layers.sequence import MultiHeadSelfAttn

    _require(site, "mhsa", ("tokens",))
    _check_init(init)
    c = site.channels
    if heads is None:  # the most heads with at least 32 channels each
        heads = next((h for h in (8, 4, 2) if c % h == 0 and c // h >= 32), 1)
    return tokens_module(site, MultiHeadSelfAttn(c, heads=heads, qkv_bias=qkv_bias, identity=init == "identity"))


def build_structured(site, *, init: str = "identity", hops: int = 4, hidden: int = 64):
    from surgeon.layers.sequence import StructuredSelfAttn

    _require(site, "structured", ("rnn",))
    pool = StructuredSelfAttn(site.channels, hops=hops, hidden=hidden)
    return rnn_replacement(site, pool, init, out_dim=hops * site.channels)


def build_cross(site, *, init: str = "identity", query: str | None = None, score: str = "additive",
                hidden: int | None = None):
    from surgeon.errors import OptionError
    from surgeon.layers.sequence import SeqAttnPool

    _require(site, "cross", ("rnn",))
    if query is None:
        roles = [r for r in site.info.get("extra", ()) if r != "mask"]
        raise OptionError(f"cross needs query=NAME: another model input or an earlier RNN site; at "
                          f"{site.name!r} valid names are {', '.join(repr(r) for r in roles) or 'none'}")
    idx, q_dim = _external(site, query)
    pool = SeqAttnPool(site.channels, score=score, query="external", query_dim=q_dim, hidden=hidden)
    return rnn_replacement(site, pool, init, query_at=idx)


def build_inputattn(site, *, init: str = "identity", hidden: int = 32):
    from surgeon.layers.sequence import InputAttn

    _require(site, "inputattn", ("rnn_input", "tokens"))
    _check_init(init)
    steps = site.shape[1] if site.layout == "nlc" else site.shape[0]
    return tokens_module(site, InputAttn(site.channels, steps=steps, hidden=hidden))


@hookimpl
def register_attentions(register):
    luong = "Luong et al., Effective Approaches to Attention-based NMT, EMNLP 2015 (arXiv:1508.04025)"
    register("hard", build_hard, kinds=("rnn",), layouts=SEQUENCE_LAYOUTS, aliases=("hard_attention",),
             summary="picks one time step: straight-through Gumbel-softmax in training, argmax in eval",
             paper="Jang et al., Categorical Reparameterization with Gumbel-Softmax, ICLR 2017 (arXiv:1611.01144)")
    register("local", build_local, kinds=("rnn", "tokens"), layouts=SEQUENCE_LAYOUTS,
             summary="attention within a window around the last step (local-m) or a predicted one (local-p)",
             paper=luong)
    register("mhsa", build_mhsa, kinds=("tokens",), layouts=SEQUENCE_LAYOUTS,
             summary="residual multi-head self-attention over tokens (scaled_dot_product_attention)",
             paper="Vaswani et al., Attention Is All You Need, NeurIPS 2017 (arXiv:1706.03762)")
    register("structured", build_structured, kinds=("rnn",), layouts=SEQUENCE_LAYOUTS,
             summary="r-hop structured self-attentive embedding; .penalty = ‖AAᵀ − I‖²_F for the loss",
             paper="Lin et al., A Structured Self-attentive Sentence Embedding, ICLR 2017 (arXiv:1703.03130)")
    register("cross", build_cross, kinds=("rnn",), layouts=SEQUENCE_LAYOUTS,
             summary="attention pooling whose query is another model input or an earlier RNN site (query=NAME)",
             paper="Bahdanau et al., NMT by Jointly Learning to Align and Translate, ICLR 2015 (arXiv:1409.0473)")
    register("inputattn", build_inputattn, kinds=("rnn_input",), layouts=SEQUENCE_LAYOUTS,
             aliases=("input_attention",),
             summary="DA-RNN input attention: reweights the input series of an RNN (uniform = identity)",
             paper="Qin et al., A Dual-Stage Attention-Based RNN for Time Series Prediction, IJCAI 2017 "
                   "(arXiv:1704.02971)")
