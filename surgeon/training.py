"""Fine-tune a retrofitted (or plain) classifier with the choices retrofitting needs.

1. The head: timm's `get_classifier()`, the model's `pretrained_cfg['classifier']`, else the last
   Linear outside the inserted modules; replaced by a fresh Linear when `num_classes` asks for it.
2. Freeze policy per epoch: 'none', 'base' (only the inserted modules and the head train) or
   'two-phase' (as 'base' for `unfreeze_after` epochs, then everything). Frozen BatchNorm layers stay
   in eval mode, so their running statistics are kept.
3. Parameter groups: inserted modules (and a replaced head) at `lr * new_lr_mult`; no weight decay on
   norms, biases and gates (every parameter with ndim ≤ 1). AdamW or SGD; cosine schedule with linear
   warm-up, set per step; optional gradient clipping.
4. Each epoch: train, validate, append to OUT/metrics.jsonl, redraw OUT/curves.png, and checkpoint OUT
   (recipe.json + model.safetensors as `surgeon.save` writes them, plus the trainer state), atomically.

Every epoch reseeds torch from (seed, epoch) and the global step sets the learning rate, so a run
resumed from its last checkpoint repeats the uninterrupted run exactly on a deterministic device.
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch
from torch import nn

from surgeon.data import classes_of
from surgeon.errors import DataError, OptionError, SurgeonError, did_you_mean

log = logging.getLogger("surgeon")

FREEZE = ("none", "base", "two-phase")
OPTIMIZERS = ("adamw", "sgd")
BN_STATS = ("auto", "frozen", "train")
DEFAULT_WEIGHT_DECAY = {"adamw": 0.05, "sgd": 1e-4}
METRICS = "metrics.jsonl"
PLOT = "curves.png"
TRAINER_STATE = "trainer_state.json"
OPTIMIZER_STATE = "optimizer.safetensors"
STATE_FORMAT = "surgeon.trainer"
STATE_VERSION = 1
# what must match for `resume` to continue the same run
_RUN_KEYS = ("epochs", "lr", "freeze", "unfreeze_after", "new_lr_mult", "weight_decay", "optimizer", "momentum",
             "warmup_epochs", "min_lr", "clip_grad", "batch_size", "num_classes", "bn_stats", "seed",
             "label_smoothing", "steps_per_epoch")
_TIMING_KEYS = ("seconds", "throughput")


@dataclass
class FinetuneResult:
    """What `finetune` returns: the trained model (eval mode), one metrics dict per epoch, the output folder."""

    model: nn.Module
    history: list[dict[str, Any]] = field(default_factory=list)
    out: Path | None = None
    head: str | None = None

    @property
    def last(self) -> dict[str, Any]:
        return self.history[-1] if self.history else {}


# -- the head ----------------------------------------------------------------------------------------
def inserted_modules(model: nn.Module) -> list[str]:
    """Paths of the modules surgery inserted ([] for a plain model)."""
    from surgeon.surgery.rewrite import edits_of

    return [e["module"] for e in edits_of(model)]


def _under(name: str, prefixes: Iterable[str]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def find_head(model: nn.Module) -> str:
    """The classifier's module path: timm's `get_classifier()`, `pretrained_cfg['classifier']`, else
    the last nn.Linear (in module order) that surgery did not insert.

    Raises:
        SurgeonError: the model has no Linear head.
    """
    names = {id(m): n for n, m in model.named_modules() if n}
    get = getattr(model, "get_classifier", None)
    if callable(get):
        with contextlib.suppress(Exception):
            head = get()
            if isinstance(head, nn.Linear) and id(head) in names:
                return names[id(head)]
    modules = dict(model.named_modules())
    cfg = getattr(model, "pretrained_cfg", None) or {}
    if isinstance(cfg.get("classifier"), str) and isinstance(modules.get(cfg["classifier"]), nn.Linear):
        return cfg["classifier"]
    new = inserted_modules(model)
    linears = [n for n, m in modules.items() if n and isinstance(m, nn.Linear) and not _under(n, new)]
    if not linears:
        raise SurgeonError(f"Cannot find the classifier head of {type(model).__name__}: no nn.Linear outside "
                           f"the inserted modules. Fine-tuning needs a Linear head")
    return linears[-1]


def replace_head(model: nn.Module, num_classes: int, *, head: str | None = None) -> str:
    """Put a fresh nn.Linear with `num_classes` outputs where the head is; returns its path.

    The model's recipe records `num_classes` as a model argument, so `surgeon.load` rebuilds the new
    head (the base model's constructor must accept `num_classes`, as timm's and torchvision's do).
    """
    path = head or find_head(model)
    old = model.get_submodule(path)
    new = nn.Linear(old.in_features, num_classes, bias=old.bias is not None).to(old.weight.device, old.weight.dtype)
    parent, _, leaf = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, new)
    if isinstance(getattr(model, "num_classes", None), int):
        model.num_classes = num_classes
    rec = model.__dict__.get("_surgeon")
    if rec and rec.get("model"):
        rec["model"]["args"] = {**(rec["model"].get("args") or {}), "num_classes": num_classes}
    log.info("head %s: replaced by Linear(%d, %d)", path, old.in_features, num_classes)
    return path


def _head_outputs(model: nn.Module, head: str) -> int:
    return model.get_submodule(head).out_features


def check_classes(model: nn.Module, classes: Sequence[str] | None, *, head: str | None = None,
                  num_classes: int | None = None, offer: bool = True) -> int | None:
    """Check the data's class count against the head. Returns the class count the head must have.

    Raises:
        DataError: the head has another number of outputs than the data has classes (and
        `num_classes` does not ask to replace it), or `num_classes` contradicts the data.
    """
    n_data = len(classes) if classes is not None else None
    if num_classes is not None:
        if num_classes < 2:
            raise OptionError(f"num_classes must be at least 2, got {num_classes}")
        if n_data is not None and n_data != num_classes:
            raise DataError(f"num_classes={num_classes} (--num-classes) but the data has {n_data} classes")
        return num_classes
    if n_data is None or head is None:
        return None
    n_head = _head_outputs(model, head)
    if n_head != n_data:
        fix = (f"; pass num_classes={n_data} (--num-classes {n_data}) to replace the head with a new one"
               if offer else "; evaluate it on data with the classes it was trained for")
        raise DataError(f"The model's head {head!r} has {n_head} outputs but the data has {n_data} classes{fix}")
    return n_data


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
        p.requires_grad_(prefixes is None or _under(name, prefixes))
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
            if bn_stats == "frozen" or (prefixes is not None and not _under(name, prefixes)):
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
        groups.setdefault((_under(name, new), no_decay), []).append(p)
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


def _optimizer(name: str, groups: list[dict[str, Any]], *, lr: float, momentum: float) -> torch.optim.Optimizer:
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


def _amp(device: torch.device, amp: bool):
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


# -- data --------------------------------------------------------------------------------------------
def _loader(data, *, batch_size: int, shuffle: bool, seed: int, num_workers: int, drop_last: bool,
            pin: bool):
    """A DataLoader for a Dataset (shuffled by a generator seeded per epoch); a DataLoader or any other
    iterable of batches as is."""
    from torch.utils.data import DataLoader, Dataset

    if not isinstance(data, Dataset):
        return data
    gen = torch.Generator().manual_seed(seed) if shuffle else None
    return DataLoader(data, batch_size=batch_size, shuffle=shuffle, generator=gen, num_workers=num_workers,
                      drop_last=drop_last and len(data) > batch_size, pin_memory=pin)


def _epoch_seed(seed: int, epoch: int) -> int:
    return seed * 1_000_003 + epoch


def _length(data, what: str) -> int:
    try:
        n = len(data)
    except TypeError as exc:
        raise DataError(f"The {what} has no length; pass a Dataset or a DataLoader") from exc
    if n == 0:
        raise DataError(f"The {what} is empty")
    return n


# -- evaluation --------------------------------------------------------------------------------------
def _run_eval(model: nn.Module, loader, device: torch.device, autocast, criterion) -> dict[str, float]:
    was_training = model.training
    model.eval()
    loss_sum, correct, n = 0.0, 0, 0
    with torch.no_grad():
        for x, y in loader:
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            with autocast():
                logits = model(x)
            loss_sum += float(criterion(logits.float(), y)) * len(y)
            correct += int((logits.argmax(1) == y).sum())
            n += len(y)
    model.train(was_training)
    if n == 0:
        raise DataError("The evaluation data is empty")
    return {"loss": loss_sum / n, "accuracy": correct / n, "samples": n}


def evaluate(model: nn.Module, data, *, batch_size: int = 256, device: str | torch.device = "cpu",
             amp: bool = False, num_workers: int = 0) -> dict[str, float]:
    """Accuracy and mean cross-entropy loss of a classifier on a Dataset or DataLoader.

    Returns:
        {'loss': float, 'accuracy': float (0-1), 'samples': int}

    Raises:
        DataError: empty data, or a head whose outputs do not match the data's classes.

    Example:
        >>> surgeon.evaluate(surgeon.load("out/cbam-ft"), surgeon.data.digits("test", input_size=(3, 32, 32)))
    """
    dev = resolve_device(device)
    classes = classes_of(data)
    if classes is not None:
        try:
            head: str | None = find_head(model)
        except SurgeonError:  # no Linear head: nothing to check the classes against
            head = None
        check_classes(model, classes, head=head, offer=False)
    model.to(dev)
    loader = _loader(data, batch_size=batch_size, shuffle=False, seed=0, num_workers=num_workers, drop_last=False,
                     pin=dev.type == "cuda")
    autocast, _ = _amp(dev, amp)
    return _run_eval(model, loader, dev, autocast, nn.CrossEntropyLoss())


# -- the output folder -------------------------------------------------------------------------------
def check_output(out: str | os.PathLike | None, *, resume: bool = False, force: bool = False) -> dict[str, Any] | None:
    """The trainer state to resume from (or None), after refusing an existing folder unless asked.

    Raises:
        SurgeonError: `out` exists and neither resume nor force; nothing to resume in `out`.
    """
    out = Path(out) if out is not None else None
    if out is None:
        if resume:
            raise OptionError("resume needs the output folder of the run (out=..., --out)")
        return None
    if resume and force:
        raise OptionError("Pass either resume (--resume) or force (--force), not both")
    old = out.parent / f".{out.name}.old"
    if not out.exists() and old.is_dir():  # a crash between `_write_run`'s two renames
        log.warning("recovering %s from its previous checkpoint %s", out, old)
        os.replace(old, out)
    if not out.exists():
        return None
    if not resume:
        if force:
            return None
        raise SurgeonError(f"Output folder {str(out)!r} exists; pass --resume to continue its run or --force "
                           f"to replace it")
    state_file = out / TRAINER_STATE
    if not state_file.is_file():
        raise SurgeonError(f"Output folder {str(out)!r} holds no training run to resume (no {TRAINER_STATE}); "
                           f"pass --force to replace it")
    try:
        state = json.loads(state_file.read_text())
    except (OSError, ValueError) as exc:
        raise SurgeonError(f"Cannot read {str(state_file)!r} ({exc}); pass --force to start over") from exc
    if state.get("format") != STATE_FORMAT or not isinstance(state.get("version"), int) \
            or state["version"] > STATE_VERSION:
        raise SurgeonError(f"{str(state_file)!r} is not a trainer state this surgeon reads; pass --force to start over")
    return state


def _check_same_run(state: dict[str, Any], config: dict[str, Any], out: Path) -> None:
    old = state.get("config", {})
    diff = [f"{k}: {old.get(k)!r} -> {config.get(k)!r}" for k in _RUN_KEYS if old.get(k) != config.get(k)]
    if diff:
        raise SurgeonError(f"Cannot resume {str(out)!r} with other settings ({'; '.join(diff[:3])}); use the "
                           f"run's own settings, or --force to start a new run")


def _optimizer_tensors(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    sd = opt.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, Any] = {}
    for idx, st in sd["state"].items():
        for k, v in st.items():
            if isinstance(v, torch.Tensor):
                tensors[f"state.{idx}.{k}"] = v.detach().cpu().contiguous()
            else:
                scalars[f"{idx}.{k}"] = v
    groups = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()} for g in sd["param_groups"]]
    return tensors, {"param_groups": groups, "scalars": scalars}


def _load_optimizer(opt: torch.optim.Optimizer, out: Path, meta: dict[str, Any]) -> None:
    from safetensors.torch import load_file

    tensors = load_file(str(out / OPTIMIZER_STATE)) if (out / OPTIMIZER_STATE).is_file() else {}
    state: dict[int, dict[str, Any]] = {}
    for key, t in tensors.items():
        _, idx, name = key.split(".", 2)
        state.setdefault(int(idx), {})[name] = t
    for key, v in meta.get("scalars", {}).items():
        idx, name = key.split(".", 1)
        state.setdefault(int(idx), {})[name] = v
    groups = [{k: (tuple(v) if k == "betas" else v) for k, v in g.items()} for g in meta["param_groups"]]
    try:
        opt.load_state_dict({"state": state, "param_groups": groups})
    except (ValueError, KeyError) as exc:
        raise SurgeonError(f"The optimizer state in {str(out)!r} does not fit this model ({exc}); pass --force "
                           f"to start over") from exc


def _write_run(model: nn.Module, out: Path, *, state: dict[str, Any], opt: torch.optim.Optimizer,
               history: list[dict[str, Any]], plot: bool) -> None:
    """Write the model (surgeon.save's format), trainer state, metrics and plot into `out`, replacing it
    as a whole: a crash leaves the previous epoch's folder (or, between two renames, OUT.old)."""
    from safetensors.torch import save_file

    from surgeon import checkpoint

    tmp = out.parent / f".{out.name}.next"
    if tmp.exists():
        shutil.rmtree(tmp)
    checkpoint.save(model, tmp)
    tensors, meta = _optimizer_tensors(opt)
    save_file(tensors, str(tmp / OPTIMIZER_STATE), metadata={"format": STATE_FORMAT})
    (tmp / TRAINER_STATE).write_text(json.dumps({**state, "optimizer": meta}, indent=2) + "\n")
    with open(tmp / METRICS, "w") as f:
        for rec in history:
            f.write(json.dumps(rec) + "\n")
    if plot:
        plot_history(history, tmp / PLOT)
    old = out.parent / f".{out.name}.old"
    if out.exists():
        if old.exists():
            shutil.rmtree(old)
        os.replace(out, old)
    os.replace(tmp, out)
    shutil.rmtree(old, ignore_errors=True)


def read_metrics(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The per-epoch records of a run: OUT/metrics.jsonl (or the file itself)."""
    path = Path(path)
    file = path / METRICS if path.is_dir() else path
    return [json.loads(line) for line in file.read_text().splitlines() if line.strip()]


def plot_history(history: list[dict[str, Any]], path: str | os.PathLike) -> bool:
    """Draw loss and accuracy per epoch (train and validation) into a PNG. Returns False (and logs a
    warning) when matplotlib is missing."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
        from matplotlib.ticker import MaxNLocator
    except ImportError:
        log.warning("matplotlib is missing, so no %s: pip install 'surgeon[finetune]'", PLOT)
        return False
    fig = Figure(figsize=(9, 3.5), dpi=100)
    FigureCanvasAgg(fig)  # Agg, without touching pyplot's global backend
    epochs = [r["epoch"] for r in history]
    for ax, key, title in ((fig.add_subplot(1, 2, 1), "loss", "loss"), (fig.add_subplot(1, 2, 2), "acc", "accuracy")):
        for split in ("train", "val"):
            values = [r.get(f"{split}_{key}") for r in history]
            if any(v is not None for v in values):
                ax.plot(epochs, [math.nan if v is None else v for v in values], marker="o", label=split)
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(str(path))
    return True


# -- progress ----------------------------------------------------------------------------------------
def _progress(enabled: bool):
    from rich.console import Console
    from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                               TimeRemainingColumn)

    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TextColumn("loss {task.fields[loss]:.4f}  acc {task.fields[acc]:6.2%}  "
                               "{task.fields[rate]:.0f} img/s{task.fields[val]}"),
                    TimeElapsedColumn(), TimeRemainingColumn(),
                    console=Console(stderr=True), disable=not enabled)


# -- the loop ----------------------------------------------------------------------------------------
def _check_options(*, epochs, lr, freeze, unfreeze_after, optimizer, bn_stats, batch_size, new_lr_mult,
                   warmup_epochs, clip_grad) -> None:
    def choice(what: str, value: str, valid: Sequence[str]) -> None:
        if value not in valid:
            raise OptionError(f"Unknown {what} {value!r}.{did_you_mean(value, valid)} Valid: {', '.join(valid)}")

    choice("freeze policy", freeze, FREEZE)
    choice("optimizer", optimizer, OPTIMIZERS)
    choice("bn_stats", bn_stats, BN_STATS)
    if not isinstance(epochs, int) or epochs < 1:
        raise OptionError(f"epochs must be a positive integer, got {epochs!r}")
    if not lr > 0:
        raise OptionError(f"lr must be positive, got {lr!r}")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise OptionError(f"batch_size must be a positive integer, got {batch_size!r}")
    if new_lr_mult < 0 or warmup_epochs < 0:
        raise OptionError("new_lr_mult and warmup_epochs must not be negative")
    if clip_grad is not None and not clip_grad > 0:
        raise OptionError(f"clip_grad must be positive, got {clip_grad!r}")
    if unfreeze_after is not None and (freeze != "two-phase" or not 0 < unfreeze_after < epochs):
        raise OptionError(f"unfreeze_after (--unfreeze-after) applies to freeze='two-phase' and must lie "
                          f"between 1 and epochs - 1 ({epochs - 1}), got {unfreeze_after!r}")


def finetune(model: nn.Module, train_data, val_data=None, *, epochs: int, lr: float, freeze: str = "none",
             unfreeze_after: int | None = None, new_lr_mult: float = 1.0, weight_decay: float | None = None,
             optimizer: str = "adamw", momentum: float = 0.9, warmup_epochs: float = 0.0, min_lr: float = 0.0,
             clip_grad: float | None = None, batch_size: int = 64, num_classes: int | None = None,
             bn_stats: str = "auto", label_smoothing: float = 0.0, seed: int = 0,
             device: str | torch.device = "cpu", compile: bool = False, amp: bool = False, num_workers: int = 0,
             out: str | os.PathLike | None = None, resume: bool = False, force: bool = False,
             plot: bool = True, progress: bool = True) -> FinetuneResult:
    """Fine-tune a classifier (patched or plain) on `train_data`, validating on `val_data` every epoch.

    Args:
        model: any nn.Module mapping images to logits; trained in place.
        train_data / val_data: a Dataset of (input, label) (shuffled per epoch with a seeded generator),
            a DataLoader / any iterable of batches with a length, or what `--data` takes: 'digits' or
            a folder (see `surgeon.data.resolve`; its validation split is used when val_data is None).
        epochs, lr: the budget and the peak learning rate.
        freeze: 'none' (everything trains), 'base' (only the inserted modules and the head), or
            'two-phase' ('base' for `unfreeze_after` epochs, default half of them, then everything).
        new_lr_mult: learning-rate multiplier for the inserted modules (and a replaced head).
        weight_decay: default 0.05 (AdamW) or 1e-4 (SGD); never applied to norms, biases and gates.
        optimizer: 'adamw' or 'sgd' (Nesterov momentum `momentum`).
        warmup_epochs, min_lr: linear warm-up (may be fractional), then cosine decay to `min_lr`.
        clip_grad: clip the gradient norm of the trainable parameters to this value.
        num_classes: replace the head with a fresh Linear of this many outputs when it has another count.
        bn_stats: 'auto' (frozen BatchNorms keep their statistics), 'frozen' (all do), 'train' (none do).
        seed: seeds the head, shuffling and every epoch, for a reproducible run.
        device: 'cpu', 'cuda', 'cuda:N', 'mps' or 'auto'. compile: train through torch.compile.
        amp: mixed precision (bfloat16 on CPU and recent GPUs, float16 with loss scaling otherwise).
        out: write OUT/metrics.jsonl, OUT/curves.png and a checkpoint every epoch (a folder that
            `surgeon.load` reads, plus the trainer state for `resume`).
        resume: continue the run in `out` from its last completed epoch. force: replace `out`.
        plot / progress: draw the PNG; show rich progress bars on stderr.

    Returns:
        FinetuneResult: the model (eval mode), the per-epoch metrics, the output folder, the head's path.

    Raises:
        OptionError, DataError (empty data, classes that do not fit the head), SurgeonError (the output
        folder exists without resume/force; a resume with other settings).

    Example:
        >>> patched = surgeon.add(surgeon.load_model("resnet18", weights="mine.safetensors"), "cbam")
        >>> train, val = surgeon.data.resolve("digits", patched, input_size=(3, 32, 32))
        >>> surgeon.finetune(patched, train, val, epochs=3, lr=1e-3, freeze="two-phase", out="runs/cbam")
    """
    if freeze == "two-phase" and unfreeze_after is None and isinstance(epochs, int):
        unfreeze_after = max(1, epochs // 2) if epochs > 1 else None
    _check_options(epochs=epochs, lr=lr, freeze=freeze, unfreeze_after=unfreeze_after, optimizer=optimizer,
                   bn_stats=bn_stats, batch_size=batch_size, new_lr_mult=new_lr_mult, warmup_epochs=warmup_epochs,
                   clip_grad=clip_grad)
    weight_decay = DEFAULT_WEIGHT_DECAY[optimizer] if weight_decay is None else weight_decay
    dev = resolve_device(device)
    out_path = Path(out) if out is not None else None
    state = check_output(out_path, resume=resume, force=force)
    if isinstance(train_data, (str, os.PathLike)):  # 'digits' or a folder, preprocessed for this model
        from surgeon import data

        train_data, default_val = data.resolve(train_data, model)
        val_data = default_val if val_data is None else val_data
    if isinstance(val_data, (str, os.PathLike)):
        from surgeon import data

        val_data = data.evaluation_set(val_data, model)
    _length(train_data, "training data")
    if val_data is not None:
        _length(val_data, "validation data")

    # 1. The head, checked against the data; replaced when asked.
    torch.manual_seed(seed)
    new = inserted_modules(model)
    try:
        head: str | None = find_head(model)
    except SurgeonError:
        if freeze != "none" or num_classes is not None:
            raise
        head = None
    classes = classes_of(train_data)
    if val_data is not None and classes is not None and classes_of(val_data) not in (None, classes):
        raise DataError(f"Training and validation data have other classes ({len(classes)} vs "
                        f"{len(classes_of(val_data))}); both need the same class folders")
    wanted = check_classes(model, classes, head=head, num_classes=num_classes)
    replaced = head is not None and wanted is not None and _head_outputs(model, head) != wanted
    if replaced:
        replace_head(model, wanted, head=head)
    model.to(dev)
    new_params = new + ([head] if replaced else [])

    # 2. Optimizer over every parameter; the freeze policy decides which get gradients.
    groups = param_groups(model, lr=lr, weight_decay=weight_decay, new_lr_mult=new_lr_mult, new=new_params)
    opt = _optimizer(optimizer, groups, lr=lr, momentum=momentum)
    autocast, scaler = _amp(dev, amp)
    criterion = nn.CrossEntropyLoss(label_smoothing=label_smoothing)
    forward = torch.compile(model) if compile else model
    steps_per_epoch = len(_loader(train_data, batch_size=batch_size, shuffle=True, seed=0, num_workers=0,
                                  drop_last=True, pin=False))
    total, warmup = epochs * steps_per_epoch, round(warmup_epochs * steps_per_epoch)
    config = {"epochs": epochs, "lr": lr, "freeze": freeze, "unfreeze_after": unfreeze_after, "new_lr_mult": new_lr_mult,
              "weight_decay": weight_decay, "optimizer": optimizer, "momentum": momentum, "warmup_epochs": warmup_epochs,
              "min_lr": min_lr, "clip_grad": clip_grad, "batch_size": batch_size, "num_classes": wanted,
              "bn_stats": bn_stats, "label_smoothing": label_smoothing, "seed": seed,
              "steps_per_epoch": steps_per_epoch, "device": str(dev), "amp": amp, "compile": compile}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}

    # 3. Resume: weights, optimizer state, step; the metrics so far.
    start, step, history = 0, 0, []
    if state is not None:
        from surgeon import checkpoint

        _check_same_run(state, config, out_path)
        checkpoint.fit(model, checkpoint._read_safetensors(out_path / checkpoint.WEIGHTS),
                       source=str(out_path / checkpoint.WEIGHTS))
        _load_optimizer(opt, out_path, state["optimizer"])
        start, step = int(state["epoch"]), int(state["step"])
        history = read_metrics(out_path)[:start] if (out_path / METRICS).is_file() else []
        log.info("resuming %s after epoch %d of %d", out_path, start, epochs)

    # 4. The epochs.
    pin = dev.type == "cuda"
    loop = _Loop(forward=forward, opt=opt, criterion=criterion, autocast=autocast, scaler=scaler, clip_grad=clip_grad,
                 device=dev, pin=pin, schedule=lambda s: lr_factor(s, total, warmup=warmup, min_ratio=min_lr / lr))
    try:
        with _progress(progress) as bar:
            for epoch in range(start, epochs):
                torch.manual_seed(_epoch_seed(seed, epoch))
                prefixes = trainable_prefixes(freeze, new=new_params, head=head, epoch=epoch,
                                              unfreeze_after=unfreeze_after)
                model.train()
                n_trainable = apply_freeze(model, prefixes, bn_stats=bn_stats)
                loader = _loader(train_data, batch_size=batch_size, shuffle=True, seed=_epoch_seed(seed, epoch),
                                 num_workers=num_workers, drop_last=True, pin=pin)
                task = bar.add_task(f"epoch {epoch + 1}/{epochs}", total=len(loader), loss=0.0, acc=0.0, rate=0.0,
                                    val="")
                rec, step = _train_epoch(loop, loader, step, lambda **kw: bar.update(task, advance=1, **kw))
                rec = {"epoch": epoch + 1, "step": step, "lr": lr * rec.pop("factor"), "trainable": n_trainable, **rec}
                if val_data is not None:
                    vloader = _loader(val_data, batch_size=max(batch_size, 256), shuffle=False, seed=0,
                                      num_workers=num_workers, drop_last=False, pin=pin)
                    val = _run_eval(forward, vloader, dev, autocast, nn.CrossEntropyLoss())
                    rec.update(val_loss=val["loss"], val_acc=val["accuracy"])
                    bar.update(task, val=f"  val {val['accuracy']:.2%}")
                rec.update(seconds=rec.pop("seconds"), throughput=rec.pop("throughput"))  # timings last
                history.append(rec)
                if out_path is not None:
                    _write_run(model, out_path, opt=opt, history=history, plot=plot,
                               state={"format": STATE_FORMAT, "version": STATE_VERSION, "epoch": epoch + 1,
                                      "step": step, "head": head, "config": config})
    finally:
        for n, p in model.named_parameters():
            p.requires_grad_(flags.get(n, True))
    return FinetuneResult(model=model.eval(), history=history, out=out_path, head=head)


@dataclass
class _Loop:
    """What a training step needs besides the batch."""

    forward: Any
    opt: torch.optim.Optimizer
    criterion: nn.Module
    autocast: Any
    scaler: Any
    clip_grad: float | None
    device: torch.device
    pin: bool
    schedule: Any  # global step -> learning-rate factor


def _train_epoch(loop: _Loop, loader, step: int, report) -> tuple[dict[str, Any], int]:
    """One pass over `loader`. Returns the epoch's training metrics and the new global step."""
    params = [p for g in loop.opt.param_groups for p in g["params"] if p.requires_grad]
    loss_sum, correct, seen, t0 = 0.0, 0, 0, time.perf_counter()
    factor = loop.schedule(step)
    for x, y in loader:
        x, y = x.to(loop.device, non_blocking=loop.pin), y.to(loop.device, non_blocking=loop.pin)
        factor = loop.schedule(step)
        for g in loop.opt.param_groups:
            g["lr"] = g["base_lr"] * factor
        with loop.autocast():
            logits = loop.forward(x)
            loss = loop.criterion(logits.float(), y)
        if not torch.isfinite(loss):
            raise SurgeonError(f"The loss became {float(loss)} at step {step}; lower the learning rate (--lr) "
                               f"or clip gradients (--clip-grad)")
        loop.opt.zero_grad(set_to_none=True)
        (loop.scaler.scale(loss) if loop.scaler else loss).backward()
        if loop.clip_grad is not None:
            if loop.scaler:
                loop.scaler.unscale_(loop.opt)
            nn.utils.clip_grad_norm_(params, loop.clip_grad)
        if loop.scaler:
            loop.scaler.step(loop.opt)
            loop.scaler.update()
        else:
            loop.opt.step()
        step += 1
        loss_sum += float(loss.detach()) * len(y)
        correct += int((logits.detach().argmax(1) == y).sum())
        seen += len(y)
        report(loss=loss_sum / seen, acc=correct / seen, rate=seen / max(time.perf_counter() - t0, 1e-9))
    seconds = time.perf_counter() - t0
    return {"factor": factor, "train_loss": loss_sum / max(seen, 1), "train_acc": correct / max(seen, 1),
            "seconds": round(seconds, 3), "throughput": round(seen / max(seconds, 1e-9), 1)}, step


def open_model(ref: str, *, pretrained: bool = False, weights: str | os.PathLike | None = None,
               model_args: dict[str, Any] | None = None, allow_pickle: bool = False, trust_code: bool = False):
    """A model to fine-tune or evaluate: a folder `surgeon save` wrote (or a training run's output
    folder), else a model reference built by `surgeon.models.load`."""
    from surgeon import checkpoint, models

    if ("/" in ref or os.sep in ref) and ":" not in ref and not Path(ref).exists():
        from surgeon.errors import ModelError

        raise ModelError(f"No saved model folder {ref!r}; pass a folder written by `surgeon add --out` or "
                         f"`surgeon finetune --out`, or a model reference such as 'resnet18'")
    if Path(ref).is_dir():
        if pretrained or model_args:
            raise OptionError(f"{ref!r} is a saved folder: its recipe already names the base model, so "
                              f"--pretrained and --model-arg do not apply")
        return checkpoint.load(ref, trust_code=trust_code, weights=weights, allow_pickle=allow_pickle)
    return models.load(ref, pretrained=pretrained, weights=weights, model_args=model_args, allow_pickle=allow_pickle)
