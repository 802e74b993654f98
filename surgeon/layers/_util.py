"""Small helpers shared by the attention layers: option checks, reductions, activations."""
from __future__ import annotations

from typing import Any

from torch import nn

_ACTS: dict[str, type[nn.Module]] = {
    "relu": nn.ReLU, "relu6": nn.ReLU6, "silu": nn.SiLU, "swish": nn.SiLU, "gelu": nn.GELU,
    "hardswish": nn.Hardswish, "hard_swish": nn.Hardswish, "mish": nn.Mish, "leaky_relu": nn.LeakyReLU,
    "elu": nn.ELU, "tanh": nn.Tanh, "sigmoid": nn.Sigmoid, "hard_sigmoid": nn.Hardsigmoid,
    "hardsigmoid": nn.Hardsigmoid, "identity": nn.Identity,
}


def get_act(layer: str | type[nn.Module] | None, what: str = "act_layer") -> nn.Module:
    """An activation module from a name ('relu', 'sigmoid', ...) or a module class."""
    if layer is None:
        return nn.Identity()
    if isinstance(layer, str):
        key = layer.lower()
        if key not in _ACTS:
            from surgeon.errors import did_you_mean

            raise ValueError(f"{what} {layer!r} is not known.{did_you_mean(key, _ACTS)} Valid: {', '.join(_ACTS)}")
        return _ACTS[key]()
    if isinstance(layer, type) and issubclass(layer, nn.Module):
        return layer()
    raise ValueError(f"{what} must be a name or an nn.Module class, got {layer!r}")


def check_positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return value


def check_ratio(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 1:
        raise ValueError(f"{name} must be a number in (0, 1], got {value!r}")
    return float(value)


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
