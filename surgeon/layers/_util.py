"""Small helpers shared by the attention layers: option checks, reductions, activations.

The checks raise `OptionError` (a ValueError, so hand-written models may catch either) with one line:
the option, the value, what is valid.
"""
from __future__ import annotations

import math
from typing import Any, Sequence

from torch import nn

from surgeon.errors import OptionError, SiteShapeError, did_you_mean

_ACTS: dict[str, type[nn.Module]] = {
    "relu": nn.ReLU, "relu6": nn.ReLU6, "silu": nn.SiLU, "swish": nn.SiLU, "gelu": nn.GELU,
    "hardswish": nn.Hardswish, "hard_swish": nn.Hardswish, "mish": nn.Mish, "leaky_relu": nn.LeakyReLU,
    "elu": nn.ELU, "tanh": nn.Tanh, "sigmoid": nn.Sigmoid, "hard_sigmoid": nn.Hardsigmoid,
    "hardsigmoid": nn.Hardsigmoid, "identity": nn.Identity,
}


def check_act(layer: Any, what: str = "act_layer") -> type[nn.Module] | None:
    """The activation class a name ('relu', 'sigmoid', ...) or module class stands for (None: none)."""
    if layer is None:
        return None
    if isinstance(layer, str):
        key = layer.lower()
        if key not in _ACTS:
            raise OptionError(f"{what} {layer!r} is not known.{did_you_mean(key, _ACTS)} Valid: {', '.join(_ACTS)}")
        return _ACTS[key]
    if isinstance(layer, type) and issubclass(layer, nn.Module):
        return layer
    raise OptionError(f"{what} must be a name or an nn.Module class, got {layer!r}")


def get_act(layer: str | type[nn.Module] | None, what: str = "act_layer") -> nn.Module:
    """An activation module from a name ('relu', 'sigmoid', ...) or a module class."""
    cls = check_act(layer, what)
    return nn.Identity() if cls is None else cls()


def _bad(name: str, value: Any, valid: str) -> OptionError:
    return OptionError(f"{name} must be {valid}, got {value!r}")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def check_int(name: str, value: Any, *, low: int = 1) -> int:
    """`value` as an int of at least `low` (1: a positive integer; 0: a non-negative one)."""
    if not _is_int(value) or value < low:
        valid = {1: "a positive integer", 0: "a non-negative integer"}.get(low, f"an integer >= {low}")
        raise _bad(name, value, valid)
    return value


def check_positive_int(name: str, value: Any) -> int:
    return check_int(name, value, low=1)


def check_optional_int(name: str, value: Any, *, low: int = 1) -> int | None:
    """None, or an int of at least `low`."""
    return None if value is None else check_int(name, value, low=low)


def check_odd_kernel(name: str, value: Any) -> int:
    """A positive odd kernel size (the padding k // 2 keeps the size only for odd k)."""
    if not _is_int(value) or value < 1 or value % 2 == 0:
        raise _bad(name, value, "a positive odd integer")
    return value


def check_number(name: str, value: Any, *, low: float | None = None, high: float | None = None,
                 low_open: bool = False, high_open: bool = False) -> float:
    """`value` as a finite float within [low, high] (open ends where told)."""
    ok = _is_number(value)
    if ok and low is not None:
        ok = value > low if low_open else value >= low
    if ok and high is not None:
        ok = value < high if high_open else value <= high
    if not ok:
        if low is not None and high is not None:
            valid = f"a number in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
        elif low is not None:
            valid = f"a number {'>' if low_open else '>='} {low:g}"
        else:
            valid = "a finite number"
        raise _bad(name, value, valid)
    return float(value)


def check_ratio(name: str, value: Any) -> float:
    """A fraction of channels: a number in (0, 1]."""
    return check_number(name, value, low=0, high=1, low_open=True)


def check_fraction(name: str, value: Any) -> float:
    """A probability or fraction: a number in [0, 1]."""
    return check_number(name, value, low=0, high=1)


def check_positive(name: str, value: Any) -> float:
    """A positive finite number."""
    return check_number(name, value, low=0, low_open=True)


def check_bool(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise _bad(name, value, "true or false")
    return value


def check_choice(name: str, value: Any, choices: Sequence[str]) -> str:
    """One of `choices`, with a "did you mean" for a near miss."""
    if not isinstance(value, str) or value not in choices:
        hint = did_you_mean(value, choices) if isinstance(value, str) else ""
        raise OptionError(f"{name} must be one of {', '.join(map(repr, choices))}, got {value!r}"
                          + (f".{hint}" if hint else ""))
    return value


def check_feat_size(value: Any, name: str = "feat_size") -> tuple[int, int]:
    """The (H, W) of a feature map: two positive integers."""
    if not isinstance(value, (tuple, list)) or len(value) != 2 or not all(_is_int(v) and v > 0 for v in value):
        raise _bad(name, value, "two positive integers (H, W)")
    return tuple(value)


def check_divisible(name: str, value: int, by_name: str, by: int) -> None:
    if value % by:
        raise SiteShapeError(f"{name} ({value}) must be divisible by {by_name} ({by})")


def check_groups(channels: int, groups: int) -> None:
    """Grouped layers: the site's channels must split into `groups` (SiteShapeError: another site may fit)."""
    if channels % groups:
        raise SiteShapeError(f"channels ({channels}) must be divisible by groups ({groups}); pass groups=1 "
                             f"or a divisor of {channels}")


def make_divisible(v: float, divisor: int = 1, min_value: int | None = None, round_limit: float = 0.9) -> int:
    """Round `v` to a multiple of `divisor`, not below `round_limit`·v (as timm rounds widths)."""
    min_value = min_value or divisor
    new_v = max(min_value, int(v + divisor / 2) // divisor * divisor)
    if new_v < round_limit * v:
        new_v += divisor
    return new_v


def reduced_channels(channels: int, rd_ratio: float, rd_channels: int | None, rd_divisor: int) -> int:
    """The hidden width of a bottleneck: rd_channels when given, else channels·rd_ratio rounded."""
    check_positive_int("channels", channels)
    if rd_channels is not None:
        return check_positive_int("rd_channels", rd_channels)
    check_ratio("rd_ratio", rd_ratio)
    check_positive_int("rd_divisor", rd_divisor)
    return make_divisible(channels * rd_ratio, rd_divisor, round_limit=0.0)


def spatial_dims(x) -> tuple[int, ...]:
    """The spatial dims of a channels-first tensor: (2, 3) for NCHW, (2,) for NCL."""
    return tuple(range(2, x.dim()))


_CONVS = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
_BATCH_NORMS = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}
_ADAPTIVE_AVG_POOLS = {1: nn.AdaptiveAvgPool1d, 2: nn.AdaptiveAvgPool2d, 3: nn.AdaptiveAvgPool3d}


def check_dims(dims: Any) -> int:
    """The number of positional dims of a feature map: 1 (N, C, L), 2 (N, C, H, W) or 3 (N, C, D, H, W)."""
    if not _is_int(dims) or dims not in _CONVS:
        raise _bad("dims", dims, "1, 2 or 3 (positional dims of (N, C, L), (N, C, H, W), (N, C, D, H, W))")
    return dims


def conv_nd(dims: int) -> type[nn.Module]:
    """nn.Conv1d, nn.Conv2d or nn.Conv3d for a map with `dims` positional dims."""
    return _CONVS[check_dims(dims)]


def batch_norm_nd(dims: int) -> type[nn.Module]:
    return _BATCH_NORMS[check_dims(dims)]


def adaptive_avg_pool_nd(dims: int) -> type[nn.Module]:
    return _ADAPTIVE_AVG_POOLS[check_dims(dims)]
