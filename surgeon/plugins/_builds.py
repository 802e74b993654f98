"""Build helpers beyond `_glue.feature_map`: layers that are already the identity at init, and layers
that need the site's spatial size.
"""
from __future__ import annotations

from typing import Any, Callable

from surgeon.plugins._glue import require_feature_map, with_options


def site_build(cls: type, *, name: str, ranks: tuple[int, ...] = (3, 4, 5),
               natural_identity: bool | Callable[[Any], bool] = False, feat_size: bool = False) -> Callable[..., Any]:
    """A build for a shape-preserving layer `cls(channels, **options)` on channels-first feature maps.

    Args:
        natural_identity: the layer is the identity as constructed (a zero-initialised last layer, or no
            parameters and identity in eval), so init='identity' needs no gate; a callable decides per module.
        feat_size: pass the site's spatial size as the layer's `feat_size` (not a user option).
    """
    def build(site, *, init: str = "identity", **options):
        from surgeon.layers.gate import gated

        require_feature_map(site, name, ranks)
        if feat_size:
            options["feat_size"] = tuple(site.shape[2:])
        module = cls(site.channels, **options)
        natural = natural_identity(module) if callable(natural_identity) else natural_identity
        if natural:
            if init not in ("identity", "paper"):
                raise ValueError(f"init must be 'identity' or 'paper', got {init!r}")
            return module
        return gated(module, init)

    with_options(build, cls)
    if feat_size:
        sig = build.__signature__
        build.__signature__ = sig.replace(parameters=[p for p in sig.parameters.values() if p.name != "feat_size"])
    return build


__all__ = ["site_build"]
