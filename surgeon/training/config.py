"""The options of a fine-tuning run, in one place: `FinetuneConfig`.

The dataclass is read by everything that knows the options: `surgeon.finetune(**options)` builds it,
`__post_init__` validates it (one line naming the option, the value and the valid range), the CLI
generates `surgeon finetune`'s options from its fields, and the run folder records it so `resume` can
check that a run continues with its own settings. No torch here: the CLI imports it to build `--help`.
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from surgeon.errors import OptionError, did_you_mean

FREEZE = ("none", "base", "two-phase")
OPTIMIZERS = ("adamw", "sgd")
BN_STATS = ("auto", "frozen", "train")
DEFAULT_WEIGHT_DECAY = {"adamw": 0.05, "sgd": 1e-4}
MAX_SEED = 2**32 - 1
# recorded with the options, but derived from the data and the processes: they must match on resume too
# (batch_size and accum_steps may change with the process count, as long as the global batch stays)
DERIVED_RUN_KEYS = ("steps_per_epoch", "global_batch")
# CLI flags that are not the field's name with dashes
CLI_FLAGS = {"num_workers": "--workers"}


# -- validators --------------------------------------------------------------------------------------
def flag_of(name: str) -> str:
    """The CLI flag of option `name`."""
    return CLI_FLAGS.get(name, "--" + name.replace("_", "-"))


def _label(name: str) -> str:
    return f"{name} ({flag_of(name)})"


def _interval(low: float | None, high: float | None, low_open: bool, high_open: bool) -> str:
    if high is None:
        return f"{'>' if low_open else '≥'} {low:g}"
    return f"in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"


def check_int(name: str, value: Any, low: int, high: int) -> int:
    """`value` as an integer in [low, high], else OptionError naming the option, value and range."""
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise OptionError(f"{_label(name)} must be an integer in [{low}, {high}], got {value!r}")
    return value


def check_number(name: str, value: Any, low: float, high: float | None = None, *, low_open: bool = False,
                 high_open: bool = False) -> float:
    """`value` as a finite float in the interval, else OptionError naming the option, value and range."""
    ok = (not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)
          and (value > low if low_open else value >= low)
          and (high is None or (value < high if high_open else value <= high)))
    if not ok:
        raise OptionError(f"{_label(name)} must be a finite number {_interval(low, high, low_open, high_open)}, "
                          f"got {value!r}")
    return float(value)


def check_choice(name: str, value: Any, valid: Sequence[str]) -> str:
    if value not in valid:
        raise OptionError(f"Unknown {_label(name)} {value!r}.{did_you_mean(str(value), valid)} "
                          f"Valid: {', '.join(valid)}")
    return value


def _option(help: str, *, choices: Sequence[str] | None = None, metavar: str | None = None,
            same_run: bool = True) -> dict[str, Any]:
    """Field metadata: the CLI's help text (choices, metavar), and whether `resume` requires the same value."""
    return {"help": help, "choices": choices, "metavar": metavar, "same_run": same_run}


# -- the options -------------------------------------------------------------------------------------
@dataclass
class FinetuneConfig:
    """Every option of a fine-tuning run. Defaults that depend on others (weight_decay, unfreeze_after)
    are filled in by `__post_init__`, which also validates every value.

    Raises:
        OptionError: a value outside its range (the message names the option and what is valid).
    """

    epochs: int = field(metadata=_option("Training epochs."))
    lr: float = field(metadata=_option("Peak learning rate."))
    freeze: str = field(default="none", metadata=_option(
        "base: train only the inserted modules and the head; two-phase: base first, then everything.",
        choices=FREEZE))
    unfreeze_after: int | None = field(default=None, metadata=_option(
        "With --freeze two-phase: epochs before everything trains (default: half).", metavar="K"))
    new_lr_mult: float = field(default=1.0, metadata=_option(
        "Learning-rate multiplier for the inserted modules (and a replaced head)."))
    optimizer: str = field(default="adamw", metadata=_option("AdamW or SGD with Nesterov momentum.",
                                                             choices=OPTIMIZERS))
    weight_decay: float | None = field(default=None, metadata=_option(
        "Default 0.05 (adamw) / 1e-4 (sgd); never on norms, biases, gates."))
    momentum: float = field(default=0.9, metadata=_option("SGD (Nesterov) momentum."))
    warmup_epochs: float = field(default=0.0, metadata=_option("Linear warm-up (may be fractional), then cosine."))
    min_lr: float = field(default=0.0, metadata=_option("Learning rate at the end of the cosine."))
    clip_grad: float | None = field(default=None, metadata=_option("Clip the gradient norm to this value."))
    batch_size: int = field(default=64, metadata=_option(
        "Training batch size per process and step; the global batch is batch_size × processes × accum_steps.",
        same_run=False))
    accum_steps: int = field(default=1, metadata=_option(
        "Accumulate gradients over this many batches per optimizer step (keeps the global batch when the "
        "process count changes).", metavar="K", same_run=False))
    sync_bn: bool = field(default=False, metadata=_option(
        "Several CUDA processes: BatchNorm statistics over the global batch (SyncBatchNorm)."))
    num_classes: int | None = field(default=None, metadata=_option(
        "Replace the head with a new one of N outputs.", metavar="N"))
    bn_stats: str = field(default="auto", metadata=_option(
        "auto: frozen BatchNorms keep their running statistics; frozen: all do; train: none do.", choices=BN_STATS))
    label_smoothing: float = field(default=0.0, metadata=_option("Label smoothing of the cross-entropy loss."))
    seed: int = field(default=0, metadata=_option("Seeds the head, shuffling and every epoch."))
    device: str = field(default="cpu", metadata=_option("cpu, cuda, cuda:N, mps or auto.", same_run=False))
    compile: bool = field(default=False, metadata=_option("Train through torch.compile.", same_run=False))
    amp: bool = field(default=False, metadata=_option(
        "Mixed precision (bfloat16 on CPU / recent GPUs, float16 otherwise).", same_run=False))
    num_workers: int = field(default=0, metadata=_option("DataLoader workers.", same_run=False))

    def __post_init__(self) -> None:
        check_choice("freeze", self.freeze, FREEZE)
        check_choice("optimizer", self.optimizer, OPTIMIZERS)
        check_choice("bn_stats", self.bn_stats, BN_STATS)
        check_int("epochs", self.epochs, 1, 1_000_000)
        self.lr = check_number("lr", self.lr, 0, low_open=True)
        self.min_lr = check_number("min_lr", self.min_lr, 0, self.lr)
        self.new_lr_mult = check_number("new_lr_mult", self.new_lr_mult, 0)
        self.momentum = check_number("momentum", self.momentum, 0, 1, high_open=True)
        self.warmup_epochs = check_number("warmup_epochs", self.warmup_epochs, 0, self.epochs)
        self.label_smoothing = check_number("label_smoothing", self.label_smoothing, 0, 1, high_open=True)
        if self.weight_decay is None:
            self.weight_decay = DEFAULT_WEIGHT_DECAY[self.optimizer]
        self.weight_decay = check_number("weight_decay", self.weight_decay, 0, 1)
        if self.clip_grad is not None:
            self.clip_grad = check_number("clip_grad", self.clip_grad, 0, low_open=True)
        check_int("batch_size", self.batch_size, 1, 1_000_000)
        check_int("accum_steps", self.accum_steps, 1, 1_000_000)
        if self.num_classes is not None:
            check_int("num_classes", self.num_classes, 2, 10_000_000)
        check_int("seed", self.seed, 0, MAX_SEED)
        check_int("num_workers", self.num_workers, 0, 1024)
        for name in ("compile", "amp", "sync_bn"):
            if not isinstance(getattr(self, name), bool):
                raise OptionError(f"{_label(name)} must be true or false, got {getattr(self, name)!r}")
        self.device = str(self.device)  # a torch.device too; resolved when the run starts
        if self.freeze == "two-phase" and self.unfreeze_after is None and self.epochs > 1:
            self.unfreeze_after = max(1, self.epochs // 2)
        if self.unfreeze_after is not None and (self.freeze != "two-phase" or self.epochs < 2):
            raise OptionError(f"{_label('unfreeze_after')} applies to freeze='two-phase' with at least 2 epochs, "
                              f"got {self.unfreeze_after!r} with freeze={self.freeze!r}, epochs={self.epochs}")
        if self.unfreeze_after is not None:
            check_int("unfreeze_after", self.unfreeze_after, 1, self.epochs - 1)

    @classmethod
    def from_options(cls, base: FinetuneConfig | None = None, **options: Any) -> FinetuneConfig:
        """A config from keyword options (on top of `base`), with "did you mean" for a misspelt one."""
        names = [f.name for f in dataclasses.fields(cls)]
        for key in options:
            if key not in names:
                raise OptionError(f"Unknown fine-tuning option {key!r}.{did_you_mean(key, names)} "
                                  f"Valid: {', '.join(names)}")
        if base is not None:
            return dataclasses.replace(base, **options)
        missing = [n for n in ("epochs", "lr") if n not in options]
        if missing:
            raise OptionError(f"Fine-tuning needs {' and '.join(missing)} (--{' and --'.join(missing)})")
        return cls(**options)

    def record(self, **derived: Any) -> dict[str, Any]:
        """The options as the run folder records them, with values derived from the data (class count,
        steps per epoch)."""
        return {**dataclasses.asdict(self), **derived}


def run_keys() -> tuple[str, ...]:
    """The recorded values a resumed run must share with the run it continues."""
    return tuple(f.name for f in dataclasses.fields(FinetuneConfig) if f.metadata["same_run"]) + DERIVED_RUN_KEYS


def cli_options() -> list[dict[str, Any]]:
    """One description per option for the CLI: flag, parameter name, Python type, default, help, choices."""
    out = []
    for f in dataclasses.fields(FinetuneConfig):
        meta = f.metadata
        kind = {"int": int, "float": float, "str": str, "bool": bool}[str(f.type).split(" |")[0]]
        required = f.default is dataclasses.MISSING
        out.append({"flag": flag_of(f.name), "name": f.name, "type": kind,
                    "default": None if required else f.default, "required": required, "help": meta["help"],
                    "choices": meta["choices"], "metavar": meta["metavar"]})
    return out
