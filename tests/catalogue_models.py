"""One small model per attention of the catalogue: where every built-in attention can be patched in.

`target(name)` gives (model, example input tuple, add() keyword arguments) for an attention's first
kind that one of the tests' tiny models has.
"""
from __future__ import annotations

import torch

import surgeon
from surgeon import registry

from conftest import perturb_bn
from seq_models import WithLengths, readout, tagger
from test_conv_gates import unet
from toy_models import TinyResNet


def _tiny_resnet():
    torch.manual_seed(0)
    return perturb_bn(TinyResNet()).eval(), (torch.randn(2, 3, 32, 32),)


def _tokens(n=10):
    return torch.randint(1, 40, (2, n), generator=torch.Generator().manual_seed(0))


# kind -> factory of (model, example input)
MODELS = {
    "residual": _tiny_resnet, "stage": _tiny_resnet, "after_conv": _tiny_resnet, "pool": _tiny_resnet,
    "conv": _tiny_resnet, "last": _tiny_resnet,
    "skip": lambda: (unet(), (torch.randn(2, 3, 32, 32),)),
    "rnn": lambda: (readout(), (_tokens(),)),
    "rnn_input": lambda: (readout(), (_tokens(),)),
    "tokens": lambda: (tagger(), (_tokens(),)),
}
# attentions that need an option to be built at all (at width 8: aaconv's 8 heads leave no conv channels,
# sk's 32 groups do not divide)
REQUIRED = {"cross": {"query": "ctx"}, "aaconv": {"heads": 2}, "sk": {"groups": 8}}


def _with_lengths():
    torch.manual_seed(0)
    return WithLengths().eval(), (_tokens(), torch.tensor([10, 6]), torch.randn(2, 6))


def target(name: str, kind: str | None = None) -> tuple[torch.nn.Module, tuple, dict]:
    """(model, example input, add() keyword arguments) where attention `name` can be patched in (at sites of
    `kind`, default: its first kind one of the models has)."""
    att = registry.get_attention(name)
    if name == "cross":
        model, x = _with_lengths()
        return model, x, {"kind": "rnn", **REQUIRED[name]}
    kind = kind or next(k for k in att.kinds if k in MODELS)
    model, x = MODELS[kind]()
    return model, x, {"kind": kind, **REQUIRED.get(name, {})}


def names() -> list[str]:
    """Every attention of the catalogue, by its registered name."""
    return [a.name for a in surgeon.attentions()]
