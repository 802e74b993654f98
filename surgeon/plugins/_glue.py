"""Helpers that turn a plain attention layer into a surgeon `build` function.

Third-party plugins may use them too: `feature_map(MyLayer)` gives a build whose options are the
layer's keyword-only constructor parameters, with identity init by a zero gate.
"""
from __future__ import annotations

import inspect
from typing import Any, Callable

from surgeon.errors import ShapeError


def require_feature_map(site: Any, attention: str, ranks: tuple[int, ...]) -> None:
    """Raise ShapeError unless the site holds a channels-first tensor of one of `ranks`."""
    if site.layout != "nchw" or len(site.shape) not in ranks:
        want = " or ".join({3: "(N, C, L)", 4: "(N, C, H, W)", 5: "(N, C, D, H, W)"}[r] for r in ranks)
        raise ShapeError(f"{attention} needs a channels-first {want} feature map; site {site.name!r} has "
                         f"shape {tuple(site.shape)} ({site.layout})")


def with_options(build: Callable[..., Any], cls: type) -> Callable[..., Any]:
    """Give `build(site, *, init, **options)` the keyword-only parameters of `cls` as its signature."""
    params = [p for p in inspect.signature(cls).parameters.values() if p.kind is inspect.Parameter.KEYWORD_ONLY]
    build.__signature__ = inspect.Signature(
        [inspect.Parameter("site", inspect.Parameter.POSITIONAL_ONLY),
         inspect.Parameter("init", inspect.Parameter.KEYWORD_ONLY, default="identity"), *params])
    return build


def feature_map(cls: type, *, name: str, ranks: tuple[int, ...] = (3, 4, 5)) -> Callable[..., Any]:
    """A build for a shape-preserving layer `cls(channels, **options)` on channels-first feature maps."""
    def build(site, *, init: str = "identity", **options):
        from surgeon.layers.gate import gated

        require_feature_map(site, name, ranks)
        return gated(cls(site.channels, **options), init)

    return with_options(build, cls)
