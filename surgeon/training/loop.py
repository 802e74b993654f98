"""The training loop: `finetune` and `evaluate`.

1. The head (`surgeon.heads`): found outside the inserted modules, checked against the data's classes,
   replaced by a fresh Linear when `num_classes` asks for it.
2. The optimizer over every parameter (`training.optim`); the freeze policy decides per epoch which get
   gradients.
3. Resume from the run folder (`training.runs`), refusing other settings.
4. Each epoch: train, validate, record the input size trained at, and checkpoint the run folder.

Every epoch reseeds torch from (seed, epoch) and the global step sets the learning rate, so a run
resumed from its last checkpoint repeats the uninterrupted run exactly on a deterministic device.
Under torchrun the same loop runs data-parallel (`training.distributed`): each process trains on its
shard in DistributedDataParallel, the metrics are summed over the processes, and rank 0 alone writes.
A step is `accum_steps` batches; the global batch (batch_size × processes × accum_steps) and the data
order do not depend on how it is split, so N processes compute what one process computes (up to float
rounding, and BatchNorm statistics, which are per process unless --sync-bn or --bn-stats frozen).
"""
from __future__ import annotations

import contextlib
import itertools
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from surgeon.data import classes_of
from surgeon.errors import DataError, TrainingError
from surgeon.heads import check_classes, find_head, find_head_or_none, head_outputs, inserted_modules, replace_head
from surgeon.training import distributed, runs
from surgeon.training.config import FinetuneConfig
from surgeon.training.optim import (amp_context, apply_freeze, lr_factor, make_optimizer, param_groups,
                                    resolve_device, trainable_prefixes)
from surgeon.record import edits
from surgeon.training.record import set_input_size
from surgeon.viz import gates

log = logging.getLogger("surgeon")

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


# -- data --------------------------------------------------------------------------------------------
def _loader(data, *, batch_size: int, shuffle: bool, seed: int, num_workers: int, drop_last: bool,
            pin: bool, world: distributed.World = distributed.ONE):
    """A DataLoader for a Dataset (shuffled by a permutation seeded per epoch, this process's shard of
    it); a DataLoader or any other iterable of batches as is."""
    from torch.utils.data import DataLoader, Dataset

    if not isinstance(data, Dataset):
        return data
    sampler = distributed.shard(world, data, seed=seed) if shuffle else None
    n = len(sampler) if sampler is not None else len(data)
    return DataLoader(data, batch_size=batch_size, sampler=sampler, num_workers=num_workers,
                      drop_last=drop_last and n > batch_size, pin_memory=pin)


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
def _eval_sums(model: nn.Module, loader, device: torch.device, autocast, criterion) -> list[float]:
    """[loss sum, correct, samples] over `loader` (summed over processes by the caller)."""
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
    return [loss_sum, correct, n]


def _eval_metrics(sums: list[float]) -> dict[str, float]:
    loss_sum, correct, n = sums
    if n == 0:
        raise DataError("The evaluation data is empty")
    return {"loss": loss_sum / n, "accuracy": correct / n, "samples": int(n)}


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
        # a model without a Linear head has nothing to check the classes against
        check_classes(model, classes, head=find_head_or_none(model), offer=False)
    model.to(dev)
    loader = _loader(data, batch_size=batch_size, shuffle=False, seed=0, num_workers=num_workers, drop_last=False,
                     pin=dev.type == "cuda")
    autocast, _ = amp_context(dev, amp)
    return _eval_metrics(_eval_sums(model, loader, dev, autocast, nn.CrossEntropyLoss()))


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
def finetune(model: nn.Module, train_data, val_data=None, *, config: FinetuneConfig | None = None,
             out: str | os.PathLike | None = None, resume: bool = False, force: bool = False, plot: bool = True,
             progress: bool = True, **options: Any) -> FinetuneResult:
    """Fine-tune a classifier (patched or plain) on `train_data`, validating on `val_data` every epoch.

    Args:
        model: any nn.Module mapping images to logits; trained in place. The input size it is trained at
            is recorded on it: a saved run is loaded, evaluated and exported at that size.
        train_data / val_data: a Dataset of (input, label) (shuffled per epoch with a seeded generator),
            a DataLoader / any iterable of batches with a length, or what `--data` takes: 'digits' or
            a folder (see `surgeon.data.resolve`; its validation split is used when val_data is None).
        config: the run's options as a `FinetuneConfig`.
        **options: the same options as keywords (FinetuneConfig's fields; they override `config`):
            epochs, lr: the budget and the peak learning rate (required).
            freeze: 'none' (everything trains), 'base' (only the inserted modules and the head), or
                'two-phase' ('base' for `unfreeze_after` epochs, default half of them, then everything).
            new_lr_mult: learning-rate multiplier for the inserted modules (and a replaced head).
            weight_decay: default 0.05 (AdamW) or 1e-4 (SGD); never applied to norms, biases and gates.
            optimizer: 'adamw' or 'sgd' (Nesterov momentum `momentum`).
            warmup_epochs, min_lr: linear warm-up (may be fractional), then cosine decay to `min_lr`.
            clip_grad: clip the gradient norm of the trainable parameters to this value.
            num_classes: replace the head with a fresh Linear of this many outputs when it has another count.
            bn_stats: 'auto' (frozen BatchNorms keep their statistics), 'frozen' (all do), 'train' (none do).
            batch_size (per process and step), label_smoothing, seed (seeds the head, shuffling and every
                epoch; each process of a data-parallel run draws from its own stream).
            accum_steps: batches per optimizer step (global batch = batch_size × processes × accum_steps).
            sync_bn: several CUDA processes share BatchNorm statistics (SyncBatchNorm).
            device: 'cpu', 'cuda', 'cuda:N', 'mps' or 'auto'. compile: train through torch.compile.
            amp: mixed precision (bfloat16 on CPU and recent GPUs, float16 with loss scaling otherwise).
            num_workers: DataLoader workers.
        out: write OUT/metrics.jsonl, OUT/curves.png and a checkpoint every epoch (a folder that
            `surgeon.load` reads, plus the trainer state for `resume`).
        resume: continue the run in `out` from its last completed epoch. force: replace `out`.
            Under torchrun (WORLD_SIZE > 1), or in a process group the caller started, every process calls
            `finetune` with the same arguments: DistributedDataParallel, each process on its shard of the
            data, metrics summed over the processes, and rank 0 alone writes `out` (see
            `surgeon.training.distributed`).
        plot / progress: draw the PNG; show rich progress bars on stderr.

    Returns:
        FinetuneResult: the model (eval mode), the per-epoch metrics, the output folder, the head's path.

    Raises:
        OptionError (an option out of range or misspelt), DataError (empty data, classes that do not fit
        the head, data that cannot be split over the processes), SurgeonError (the output folder exists
        without resume/force; a resume with other settings).

    Example:
        >>> patched = surgeon.add(surgeon.load_model("resnet18", weights="mine.safetensors"), "cbam")
        >>> train, val = surgeon.data.resolve("digits", patched, input_size=(3, 32, 32))
        >>> surgeon.finetune(patched, train, val, epochs=3, lr=1e-3, freeze="two-phase", out="runs/cbam")
    """
    cfg = FinetuneConfig.from_options(config, **options)
    world, dev = distributed.join(cfg.device)
    try:
        return _finetune(model, train_data, val_data, cfg, world, dev, out=Path(out) if out is not None else None,
                         resume=resume, force=force, plot=plot, progress=progress)
    finally:
        distributed.leave(world)


def _finetune(model: nn.Module, train_data, val_data, cfg: FinetuneConfig, world: distributed.World,
              dev: torch.device, *, out: Path | None, resume: bool, force: bool, plot: bool,
              progress: bool) -> FinetuneResult:
    """`finetune` in this process, once the world is known."""
    if cfg.sync_bn:
        distributed.check_sync_bn(world, dev)
    # rank 0 checks (and recovers) the run folder first; the others then read what it left
    if not world.is_main:
        distributed.barrier(world)
    try:
        state = runs.check_output(out, resume=resume, force=force)
    finally:
        if world.is_main:
            distributed.barrier(world)
    train_data, val_data = _resolve_data(model, train_data, val_data)
    distributed.check_split(world, train_data, "training data")
    if val_data is not None:
        distributed.check_split(world, val_data, "validation data")

    # 1. The head, checked against the data; replaced when asked.
    torch.manual_seed(cfg.seed)
    new = inserted_modules(model)
    head = find_head_or_none(model)
    if head is None and (cfg.freeze != "none" or cfg.num_classes is not None):
        find_head(model)  # raises: this run needs the head
    classes = classes_of(train_data)
    if val_data is not None and classes is not None and classes_of(val_data) not in (None, classes):
        raise DataError(f"Training and validation data have other classes ({len(classes)} vs "
                        f"{len(classes_of(val_data))}); both need the same class folders")
    wanted = check_classes(model, classes, head=head, num_classes=cfg.num_classes)
    replaced = head is not None and wanted is not None and head_outputs(model, head) != wanted
    if replaced:
        replace_head(model, wanted, head=head)
    model.to(dev)
    new_params = new + ([head] if replaced else [])

    # 2. Optimizer over every parameter; the freeze policy decides which get gradients.
    groups = param_groups(model, lr=cfg.lr, weight_decay=cfg.weight_decay, new_lr_mult=cfg.new_lr_mult,
                          new=new_params)
    opt = make_optimizer(cfg.optimizer, groups, lr=cfg.lr, momentum=cfg.momentum)
    autocast, scaler = amp_context(dev, cfg.amp)
    criterion = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
    probe = _loader(train_data, batch_size=cfg.batch_size, shuffle=True, seed=0, num_workers=0, drop_last=True,
                    pin=False, world=world)
    steps_per_epoch = _steps(len(probe), cfg.accum_steps, cfg.batch_size)
    total, warmup = cfg.epochs * steps_per_epoch, round(cfg.warmup_epochs * steps_per_epoch)
    batch = getattr(probe, "batch_size", None) or cfg.batch_size
    record = cfg.record(num_classes=wanted, steps_per_epoch=steps_per_epoch, device=str(dev),
                        world_size=world.size, global_batch=batch * world.size * cfg.accum_steps,
                        backend=world.backend)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}

    # 3. Resume: weights, optimizer state, step; the metrics so far.
    start, step, history = 0, 0, []
    if state is not None:
        start, step, history = runs.resume(model, opt, out, state, record)

    # 4. The epochs. Each logs the edits' gates on one fixed batch: the first validation images, else the
    # first training batch this run sees (taken from the loader, so the training data is read as before).
    log_gates = bool(edits(model))
    gate_batch = _gate_batch(val_data) if log_gates and val_data is not None else None
    pin = dev.type == "cuda"
    loop = _Loop(forward=None, ddp=None, opt=opt, criterion=criterion, autocast=autocast, scaler=scaler,
                 clip_grad=cfg.clip_grad, device=dev, pin=pin, accum_steps=cfg.accum_steps,
                 schedule=lambda s: lr_factor(s, total, warmup=warmup, min_ratio=cfg.min_lr / cfg.lr))
    plain_bn: dict[str, nn.Module] = {}
    phase: object = None  # the trainable prefixes DDP was built for
    try:
        plain_bn = distributed.sync_batchnorm(model, world) if cfg.sync_bn else {}
        with _progress(progress and world.is_main) as bar:
            for epoch in range(start, cfg.epochs):
                torch.manual_seed(distributed.rank_seed(_epoch_seed(cfg.seed, epoch), world))
                prefixes = trainable_prefixes(cfg.freeze, new=new_params, head=head, epoch=epoch,
                                              unfreeze_after=cfg.unfreeze_after)
                model.train()
                n_trainable = apply_freeze(model, prefixes, bn_stats=cfg.bn_stats)
                loader = _loader(train_data, batch_size=cfg.batch_size, shuffle=True,
                                 seed=_epoch_seed(cfg.seed, epoch), num_workers=cfg.num_workers, drop_last=True,
                                 pin=pin, world=world)
                distributed.set_epoch(loader, epoch)
                batches = iter(loader)
                if loop.forward is None or (world.distributed and prefixes != phase):
                    # DDP synchronises the parameters that train when it is built: a new phase, a new DDP
                    first = next(batches)
                    batches = itertools.chain([first], batches)
                    loop.ddp = loop.forward = None
                    loop.ddp = distributed.wrap(model, world, dev, first[0].to(dev))
                    target = loop.ddp or model
                    loop.forward, phase = torch.compile(target) if cfg.compile else target, prefixes
                task = bar.add_task(f"epoch {epoch + 1}/{cfg.epochs}", total=steps_per_epoch * cfg.accum_steps,
                                    loss=0.0, acc=0.0, rate=0.0, val="")
                rec, step = _train_epoch(loop, batches, steps_per_epoch, step,
                                         lambda task=task, **kw: bar.update(task, advance=1, **kw))
                first = rec.pop("first")
                gate_batch = first if gate_batch is None and log_gates else gate_batch
                if rec["input_size"] is not None:  # what it was trained at is what it is evaluated at
                    set_input_size(model, rec["input_size"])
                loss_sum, correct, seen = distributed.reduce_sums(world, rec["sums"], dev)
                seconds = rec["seconds"]
                rec = {"epoch": epoch + 1, "step": step, "lr": cfg.lr * rec["factor"], "trainable": n_trainable,
                       "train_loss": loss_sum / max(seen, 1), "train_acc": correct / max(seen, 1)}
                if val_data is not None:
                    vloader = _loader(distributed.eval_shard(world, val_data), batch_size=max(cfg.batch_size, 256),
                                      shuffle=False, seed=0, num_workers=cfg.num_workers, drop_last=False, pin=pin)
                    evaluator = model if world.distributed else loop.forward  # no DDP: shards may differ in length
                    sums = _eval_sums(evaluator, vloader, dev, autocast, nn.CrossEntropyLoss())
                    val = _eval_metrics(distributed.reduce_sums(world, sums, dev))
                    rec.update(val_loss=val["loss"], val_acc=val["accuracy"])
                    bar.update(task, val=f"  val {val['accuracy']:.2%}")
                if gate_batch is not None:  # which edits the network uses: mean |γ| and effect size per edit
                    rec["gates"] = {g.site: {"gamma": g.gamma, "effect": g.effect}
                                    for g in gates(model, gate_batch.to(dev))}
                rec.update(seconds=round(seconds, 3), throughput=round(seen / max(seconds, 1e-9), 1))  # timings last
                history.append(rec)
                if out is not None and world.is_main:
                    with distributed.swapped(model, plain_bn):  # saved with the model's own BatchNorms
                        runs.write_run(model, out, opt=opt, history=history, plot=plot,
                                       state=runs.trainer_state(epoch=epoch + 1, step=step, head=head, config=record))
        distributed.barrier(world)  # when any process returns, the run folder is complete
    finally:
        loop.ddp = loop.forward = None
        distributed.swap(model, plain_bn)
        for n, p in model.named_parameters():
            p.requires_grad_(flags.get(n, True))
    return FinetuneResult(model=model.eval(), history=history, out=out, head=head)


def _steps(batches: int, accum_steps: int, batch_size: int) -> int:
    """Optimizer steps per epoch: `accum_steps` batches each (the batches left over are not used)."""
    if batches < accum_steps:
        raise DataError(f"The training data gives {batches} batch(es) of {batch_size} per process and epoch, "
                        f"fewer than accum_steps={accum_steps}; lower --accum-steps or --batch-size")
    return batches // accum_steps


GATE_BATCH = 32


def _gate_batch(data) -> torch.Tensor | None:
    """Up to GATE_BATCH inputs of `data` (a Dataset, or the first batch of a loader), for `gates`."""
    try:
        if isinstance(data, torch.utils.data.Dataset) and hasattr(data, "__len__"):
            return torch.stack([data[i][0] for i in range(min(GATE_BATCH, len(data)))])
        x = next(iter(data))[0]
    except (TypeError, IndexError, StopIteration):
        return None
    return x[:GATE_BATCH] if isinstance(x, torch.Tensor) else None


def _resolve_data(model: nn.Module, train_data, val_data):
    """Datasets for 'digits' or a folder (preprocessed for this model); any other data as given."""
    from surgeon import data

    if isinstance(train_data, (str, os.PathLike)):
        train_data, default_val = data.resolve(train_data, model)
        val_data = default_val if val_data is None else val_data
    if isinstance(val_data, (str, os.PathLike)):
        val_data = data.evaluation_set(val_data, model)
    _length(train_data, "training data")
    if val_data is not None:
        _length(val_data, "validation data")
    return train_data, val_data


@dataclass
class _Loop:
    """What a training step needs besides the batch."""

    forward: Any  # the model, in DDP with several processes, compiled when asked
    ddp: Any  # the DistributedDataParallel wrapper (None in one process): its no_sync while accumulating
    opt: torch.optim.Optimizer
    criterion: nn.Module
    autocast: Any
    scaler: Any
    clip_grad: float | None
    device: torch.device
    pin: bool
    accum_steps: int
    schedule: Any  # global step -> learning-rate factor


def _train_epoch(loop: _Loop, batches, steps: int, step: int, report) -> tuple[dict[str, Any], int]:
    """`steps` optimizer steps of `accum_steps` batches each from the iterator `batches`. Returns this
    process's [loss sum, correct, samples], the last learning-rate factor, the seconds taken,
    `input_size` (the per-sample shape of a floating-point input, else None) and `first` (up to GATE_BATCH
    inputs of its first batch); and the new global step."""
    params = [p for g in loop.opt.param_groups for p in g["params"] if p.requires_grad]
    loss_sum, correct, seen, t0 = 0.0, 0, 0, time.perf_counter()
    factor, size, first = loop.schedule(step), None, None
    for _ in range(steps):
        factor = loop.schedule(step)
        for g in loop.opt.param_groups:
            g["lr"] = g["base_lr"] * factor
        loop.opt.zero_grad(set_to_none=True)
        for k in range(loop.accum_steps):
            x, y = next(batches)
            if size is None and isinstance(x, torch.Tensor) and x.is_floating_point():
                size, first = list(x.shape[1:]), x[:GATE_BATCH].clone()
            x, y = x.to(loop.device, non_blocking=loop.pin), y.to(loop.device, non_blocking=loop.pin)
            # gradients are averaged over the processes once per step, at its last batch
            accumulating = loop.ddp is not None and k < loop.accum_steps - 1
            with loop.ddp.no_sync() if accumulating else contextlib.nullcontext():
                with loop.autocast():
                    logits = loop.forward(x)
                    loss = loop.criterion(logits.float(), y)
                if not torch.isfinite(loss):
                    raise TrainingError(f"The loss became {float(loss)} at step {step}; lower the learning rate "
                                        f"(--lr) or clip gradients (--clip-grad)")
                part = loss / loop.accum_steps if loop.accum_steps > 1 else loss
                (loop.scaler.scale(part) if loop.scaler else part).backward()
            loss_sum += float(loss.detach()) * len(y)
            correct += int((logits.detach().argmax(1) == y).sum())
            seen += len(y)
            report(loss=loss_sum / seen, acc=correct / seen, rate=seen / max(time.perf_counter() - t0, 1e-9))
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
    return {"factor": factor, "input_size": size, "first": first, "sums": [loss_sum, correct, seen],
            "seconds": time.perf_counter() - t0}, step
