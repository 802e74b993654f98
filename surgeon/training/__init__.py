"""Fine-tuning, split by job (the package is not named `finetune`: that would shadow `surgeon.finetune`):

- `config`  FinetuneConfig: every option of a run, validated; the CLI's options are generated from it
- `optim`   freeze policy, parameter groups, learning-rate schedule, optimizer, device, mixed precision
- `loop`    `finetune` and `evaluate`
- `runs`    the run folder: checkpoints, trainer state, metrics, plot, resume
- `record`  the input size and model arguments a run writes into the model's surgery record
- `distributed`  data-parallel runs under torchrun: the process group, shards, DDP, reductions, --nproc
The head (find, check, replace) lives in `surgeon.heads`, which checkpoint shares.

Names resolve on first use, so importing `surgeon.training.config` (the CLI does) stays torch-free.
"""
from __future__ import annotations

import importlib
from typing import Any

_WHERE = {
    "FinetuneConfig": "config", "FREEZE": "config", "OPTIMIZERS": "config", "BN_STATS": "config",
    "DEFAULT_WEIGHT_DECAY": "config",
    "finetune": "loop", "evaluate": "loop", "FinetuneResult": "loop", "_TIMING_KEYS": "loop",
    "trainable_prefixes": "optim", "apply_freeze": "optim", "set_bn_mode": "optim", "param_groups": "optim",
    "lr_factor": "optim", "resolve_device": "optim",
    "check_output": "runs", "read_metrics": "runs", "plot_history": "runs", "open_model": "runs",
    "METRICS": "runs", "PLOT": "runs",
    "input_size_of": "record", "set_input_size": "record",
    "find_head": "heads", "replace_head": "heads", "check_classes": "heads", "inserted_modules": "heads",
    "_under": "heads",
}


def __getattr__(name: str) -> Any:
    where = _WHERE.get(name)
    if where is None:
        raise AttributeError(f"module 'surgeon.training' has no attribute {name!r}")
    module = importlib.import_module("surgeon.heads" if where == "heads" else f"surgeon.training.{where}")
    return getattr(module, "under" if name == "_under" else name)


__all__ = [n for n in _WHERE if not n.startswith("_")]
