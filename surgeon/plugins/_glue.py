"""The implementation of the plugin helpers: builds from plain layers, and sites from fx nodes.

Plugin authors import these from `surgeon.plugin`, the public surface; this module is private and may change.
`feature_map(MyLayer, name=...)` gives a build whose options are the layer's keyword-only constructor
parameters, with identity init by the layer's own zero gate (a keyword `identity`, see
`surgeon.layers.gate.ZeroGate`), else by a zero gate around its output (or none, for layers that
already start as the identity).
"""
from __future__ import annotations

import inspect
from typing import Any, Callable

from surgeon.errors import ShapeError


# the layouts an attention over (N, C, ...) maps can act on: channels first as it is, channels last (NHWC
# maps, and for channel attentions (N, L, C) tokens) through `ChannelsLast`
FEATURE_MAPS = ("nchw", "nhwc")
CHANNELS = ("nchw", "nhwc", "nlc")
_SHAPES = {3: "(N, C, L)", 4: "(N, C, H, W)", 5: "(N, C, D, H, W)"}


def require_feature_map(site: Any, attention: str, ranks: tuple[int, ...],
                        layouts: tuple[str, ...] = ("nchw",)) -> None:
    """Raise ShapeError unless the site holds a feature map of one of `ranks` in one of `layouts`."""
    if site.layout not in layouts or len(site.shape) not in ranks:
        want = " or ".join(_SHAPES[r] for r in ranks)
        order = "channels-first" if layouts == ("nchw",) else "channels-first or channels-last"
        raise ShapeError(f"{attention} needs a {order} {want} feature map; site {site.name!r} has "
                         f"shape {tuple(site.shape)} ({site.layout})")


def site_after(view: Any, node: Any, *, kind: str, user: Any = None, name: str | None = None) -> Any:
    """A `Site` that inserts a module after `node`: the module receives `node`'s output and replaces it.

    Args:
        view: the `GraphView` holding `node`.
        node: the fx node whose output the inserted module receives.
        kind: the site kind (the kind the calling finder registered).
        user: an fx node using `node`; when given, only that use is rewired (e.g. just the linear layer).
        name: the site's name within the graph (default: `node`'s module path, else a stable op name).

    Returns:
        Site with the node's recorded shape and layout, attached next to the module that computes `node`.
    """
    from surgeon.surgery.sites import Site

    if node.op == "call_module":
        owner, _, slot = node.target.rpartition(".")
        local = node.target
    else:
        owner, slot, local = view.enclosing(node), node.name, view.site_name(node)
    return Site(name=view.full_name(name or local), kind=kind, shape=view.shape(node), layout=view.layout(node),
                graph=view.prefix, node=node.name, user=None if user is None else user.name, owner=owner, slot=slot)


def _keyword_only(cls: type) -> list[inspect.Parameter]:
    return [p for p in inspect.signature(cls).parameters.values() if p.kind is inspect.Parameter.KEYWORD_ONLY]


def gates_itself(cls: type) -> bool:
    """Whether `cls` takes `identity=True` to start as the identity by its own zero gate."""
    return any(p.name == "identity" for p in _keyword_only(cls))


def with_options(build: Callable[..., Any], cls: type) -> Callable[..., Any]:
    """Give `build(site, *, init, **options)` the keyword-only parameters of `cls` as its signature
    (`identity` excepted: `init` sets it)."""
    params = [p for p in _keyword_only(cls) if p.name != "identity"]
    build.__signature__ = inspect.Signature(
        [inspect.Parameter("site", inspect.Parameter.POSITIONAL_ONLY),
         inspect.Parameter("init", inspect.Parameter.KEYWORD_ONLY, default="identity"), *params])
    return build


def feature_map(cls: type, *, name: str, ranks: tuple[int, ...] = (3, 4, 5),
                natural_identity: bool | Callable[[Any], bool] = False, feat_size: bool = False) -> Callable[..., Any]:
    """A build for a shape-preserving layer `cls(channels, **options)` on feature maps (N, C, ...).

    The site's layout says where its channels are: at a channels-last site (NHWC maps, (N, L, C) tokens)
    the layer is wrapped in `ChannelsLast`, so it reduces over the positions and weights the channels
    there too. A layer with a keyword-only `dims` parameter is built for the site's number of positional
    dims (1, 2 or 3: Conv1d/2d/3d inside); like `feat_size` it is no user option.

    Args:
        natural_identity: the layer is already the identity as constructed (a zero-initialised last
            layer, or no parameters and identity in eval), so init='identity' needs no gate; a callable
            decides per built module.
        feat_size: pass the site's spatial size as the layer's `feat_size` (not a user option).

    A layer with a keyword-only `identity` parameter gates itself (cheaply, on its weights): it is
    built with `identity=(init == 'identity')`. Any other layer is wrapped in `GatedResidual` for
    init='identity' (unless naturally the identity), which costs one more pass over the feature map.
    """
    own_gate = gates_itself(cls)

    by_rank = any(p.name == "dims" for p in _keyword_only(cls))

    def build(site, *, init: str = "identity", **options):
        from surgeon.layers.layout import ChannelsLast

        require_feature_map(site, name, ranks, CHANNELS)
        module = _build(site, init, options)
        return ChannelsLast(module) if site.layout != "nchw" else module

    def _build(site, init, options):
        from surgeon.layers.gate import check_init, gated
        shape = site.channels_first
        if feat_size:
            options["feat_size"] = tuple(shape[2:])
        if by_rank:
            options["dims"] = len(shape) - 2
        if own_gate:
            return cls(site.channels, identity=check_init(init) == "identity", **options)
        module = cls(site.channels, **options)
        natural = natural_identity(module) if callable(natural_identity) else natural_identity
        if natural:
            check_init(init)
            return module
        return gated(module, init)

    with_options(build, cls)
    hidden = {"feat_size"} if feat_size else set()
    hidden |= {"dims"} if by_rank else set()
    if hidden:
        sig = build.__signature__
        build.__signature__ = sig.replace(parameters=[p for p in sig.parameters.values() if p.name not in hidden])
    return build


def gating_input(site: Any, gating: Any, *, attention: str) -> tuple[int, tuple[int, ...]]:
    """For a two-input attention at a `skip` site: which of the site's gating candidates it reads.

    Args:
        gating: None (the coarser decoder feature upsampled for this concat, the default of Attention U-Net
            and PAN), a site name ("dec2" or "site:dec2"), or a mapping {skip site: gating site}.
        attention: the attention's name, for messages.

    Returns:
        (index of the chosen signal in `site.info["extra"]`, its shape).

    Raises:
        ShapeError: the site is not a skip site; OptionError: an unknown or missing gating name.
    """
    from surgeon.errors import OptionError, did_you_mean, preview

    if site.kind != "skip" or "extra" not in site.info:
        raise ShapeError(f"{attention} needs a skip site (a skip connection's input to a decoder concat), "
                         f"not the {site.kind} site {site.name!r}")
    roles = list(site.info["extra"])
    names = {r: r for r in roles} | {r.split(":", 1)[1]: r for r in roles}
    short = [r.split(":", 1)[1] for r in roles]
    if gating is None:
        role = site.info["gating"]
    else:
        if isinstance(gating, dict):
            if site.name not in gating:
                raise OptionError(f"{attention}: gating has no entry for the skip site {site.name!r}."
                                  f"{did_you_mean(site.name, [str(k) for k in gating])} Add one, or limit the "
                                  f"sites with at=")
            gating = gating[site.name]
        if not isinstance(gating, str):
            raise OptionError(f"{attention}: gating must be a site name or a mapping {{skip site: gating "
                              f"site}}, got {gating!r}")
        if gating not in names:
            raise OptionError(f"{attention} at {site.name!r}: unknown gating site {gating!r}."
                              f"{did_you_mean(gating, short)} Valid: {preview(short)}")
        role = names[gating]
    idx = roles.index(role)
    return idx, tuple(site.info["extra_shapes"][idx])
