"""How a fine-tuning run optimises: the freeze policy per epoch, parameter groups, the learning-rate
schedule, the optimizer, the device and mixed precision.

1. Freeze policy per epoch: 'none', 'base' (only the inserted modules and the head train) or
   'two-phase' (as 'base' for `unfreeze_after` epochs, then everything). Frozen BatchNorm layers stay
   in eval mode, so their running statistics are kept.
2. Parameter groups: inserted modules (and a replaced head) at `lr * new_lr_mult`; no weight decay on
   norms, biases and gates (every parameter with ndim ≤ 1). AdamW or SGD; cosine schedule with linear
   warm-up, set per step.
"""
from __future__ import annotations

import contextlib
import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from surgeon.errors import OptionError
from surgeon.heads import under


# -- freezing ----------------------------------------------------------------------------------------
def trainable_prefixes(freeze: str, *, new: Sequence[str], head: str | None, epoch: int = 0,
                       unfreeze_after: int | None = None) -> list[str] | None:
    """Module paths that train in `epoch` under a freeze policy; None means everything trains."""
    if freeze == "none" or (freeze == "two-phase" and unfreeze_after is not None and epoch >= unfreeze_after):
        return None
    return list(new) + ([head] if head else [])


def apply_freeze(model: nn.Module, prefixes: Sequence[str] | None, *, bn_stats: str = "auto") -> int:
    """Set requires_grad from `prefixes` (None: all) and put frozen BatchNorms in eval mode
    (call after `model.train()`). Returns the number of trainable parameters."""
    n = 0
    for name, p in model.named_parameters():
        p.requires_grad_(prefixes is None or under(name, prefixes))
        n += p.numel() if p.requires_grad else 0
    set_bn_mode(model, prefixes, bn_stats=bn_stats)
    return n


def set_bn_mode(model: nn.Module, prefixes: Sequence[str] | None, *, bn_stats: str = "auto") -> None:
    """BatchNorms keep their running statistics (eval mode) when frozen: 'auto' = when outside the
    trainable modules, 'frozen' = always, 'train' = never."""
    if not model.training or bn_stats == "train":
        return
    for name, m in model.named_modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            if bn_stats == "frozen" or (prefixes is not None and not under(name, prefixes)):
                m.eval()


# -- optimisation ------------------------------------------------------------------------------------
def param_groups(model: nn.Module, *, lr: float, weight_decay: float, new_lr_mult: float = 1.0,
                 new: Sequence[str] = ()) -> list[dict[str, Any]]:
    """Every parameter in one of four groups: (base | new) × (decay | no decay).

    New parameters (under `new`) get `lr * new_lr_mult`; parameters with ndim ≤ 1 (norms, biases,
    gates, scales) get no weight decay. Frozen parameters are included, so a two-phase run unfreezes
    without rebuilding the optimizer. Empty groups are left out.
    """
    groups: dict[tuple[bool, bool], list[nn.Parameter]] = {}
    for name, p in model.named_parameters():
        no_decay = p.ndim <= 1 or name.rsplit(".", 1)[-1] == "gamma"
        groups.setdefault((under(name, new), no_decay), []).append(p)
    out = []
    for is_new in (False, True):
        for no_decay in (False, True):
            params = groups.get((is_new, no_decay))
            if params:
                base_lr = lr * (new_lr_mult if is_new else 1.0)
                out.append({"params": params, "lr": base_lr, "base_lr": base_lr,
                            "weight_decay": 0.0 if no_decay else weight_decay,
                            "name": f"{'new' if is_new else 'base'}/{'no_decay' if no_decay else 'decay'}"})
    return out


def lr_factor(step: int, total: int, *, warmup: int = 0, min_ratio: float = 0.0) -> float:
    """Learning-rate multiplier at `step` (0-based): linear warm-up to 1 over `warmup` steps, then
    cosine decay to `min_ratio` at `total`."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    span = max(total - warmup, 1)
    progress = min(max(step - warmup, 0) / span, 1.0)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def make_optimizer(name: str, groups: list[dict[str, Any]], *, lr: float, momentum: float) -> torch.optim.Optimizer:
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr)
    return torch.optim.SGD(groups, lr=lr, momentum=momentum, nesterov=momentum > 0)


# -- devices, precision ------------------------------------------------------------------------------
def resolve_device(device: str | torch.device) -> torch.device:
    """'cpu', 'cuda', 'cuda:1', 'mps', or 'auto' (cuda when present, else cpu)."""
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise OptionError(f"Unknown device {str(device)!r}; use cpu, cuda, cuda:N, mps or auto") from exc
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise OptionError(f"Device {str(device)!r} asked for, but this torch sees no CUDA device; use --device cpu")
    if dev.type == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        raise OptionError(f"Device {str(device)!r} asked for, but MPS is not available; use --device cpu")
    return dev


def amp_context(device: torch.device, amp: bool):
    """(autocast context factory, GradScaler or None): bfloat16 on CPU and on GPUs that support it,
    float16 with loss scaling on older GPUs."""
    if not amp:
        return contextlib.nullcontext, None
    if device.type == "cpu":
        return (lambda: torch.autocast("cpu", dtype=torch.bfloat16)), None
    if device.type == "cuda":
        if torch.cuda.is_bf16_supported():
            return (lambda: torch.autocast("cuda", dtype=torch.bfloat16)), None
        return (lambda: torch.autocast("cuda", dtype=torch.float16)), torch.amp.GradScaler("cuda")
    raise OptionError(f"Mixed precision is not supported on {device.type!r} here; drop --amp")


