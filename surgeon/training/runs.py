"""The run folder of a fine-tuning run: refuse or recover it, write each epoch's checkpoint (the model as
`surgeon.save` writes it, the optimizer and trainer state, metrics.jsonl, curves.png) atomically, read
it back for `resume`; and open the model a run starts from.
"""
from __future__ import annotations

import json
import logging
import math
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import nn

from surgeon import checkpoint
from surgeon.errors import OptionError, OutputError, WeightsError
from surgeon.training.config import run_keys

log = logging.getLogger("surgeon")

METRICS = "metrics.jsonl"
PLOT = "curves.png"
GATES_PLOT = "gates.png"
TRAINER_STATE = "trainer_state.json"
OPTIMIZER_STATE = "optimizer.safetensors"
STATE_FORMAT = "surgeon.trainer"
STATE_VERSION = 1


# -- the output folder -------------------------------------------------------------------------------
def check_output(out: str | os.PathLike | None, *, resume: bool = False, force: bool = False) -> dict[str, Any] | None:
    """The trainer state to resume from (or None), after refusing an existing folder unless asked.

    Raises:
        OutputError: `out` exists and neither resume nor force; nothing to resume in `out`.
    """
    out = Path(out) if out is not None else None
    if out is None:
        if resume:
            raise OptionError("resume needs the output folder of the run (out=..., --out)")
        return None
    if resume and force:
        raise OptionError("Pass either resume (--resume) or force (--force), not both")
    old = out.parent / f".{out.name}.old"
    if not out.exists() and old.is_dir():  # a crash between `write_run`'s two renames
        log.warning("recovering %s from its previous checkpoint %s", out, old)
        os.replace(old, out)
    if not out.exists():
        return None
    if not resume:
        if force:
            return None
        raise OutputError(f"Output folder {str(out)!r} exists; pass --resume to continue its run or --force "
                           f"to replace it")
    state_file = out / TRAINER_STATE
    if not state_file.is_file():
        raise OutputError(f"Output folder {str(out)!r} holds no training run to resume (no {TRAINER_STATE}); "
                           f"pass --force to replace it")
    try:
        state = json.loads(state_file.read_text())
    except (OSError, ValueError) as exc:
        raise OutputError(f"Cannot read {str(state_file)!r} ({exc}); pass --force to start over") from exc
    if state.get("format") != STATE_FORMAT or not isinstance(state.get("version"), int) \
            or state["version"] > STATE_VERSION:
        raise OutputError(f"{str(state_file)!r} is not a trainer state this surgeon reads; pass --force to start over")
    return state


def trainer_state(*, epoch: int, step: int, head: str | None, config: dict[str, Any]) -> dict[str, Any]:
    """The trainer state written with each epoch's checkpoint: where the run is, and its options."""
    return {"format": STATE_FORMAT, "version": STATE_VERSION, "epoch": epoch, "step": step, "head": head,
            "config": config}


def resume(model: nn.Module, opt: torch.optim.Optimizer, out: Path, state: dict[str, Any],
           config: dict[str, Any]) -> tuple[int, int, list[dict[str, Any]]]:
    """Load the run's last checkpoint into `model` and `opt`. Returns (epochs done, global step, metrics so far).

    Raises:
        OptionError: the run was started with other settings (`config`, as `FinetuneConfig.record` gives it).
    """
    old = state.get("config", {})
    diff = [f"{k}: {old.get(k)!r} -> {config.get(k)!r}" for k in run_keys() if old.get(k) != config.get(k)]
    if diff:
        raise OptionError(f"Cannot resume {str(out)!r} with other settings ({'; '.join(diff[:3])}); use the "
                           f"run's own settings, or --force to start a new run")
    checkpoint.fit(model, checkpoint._read_safetensors(out / checkpoint.WEIGHTS), source=str(out / checkpoint.WEIGHTS))
    _load_optimizer(opt, out, state["optimizer"])
    start, step = int(state["epoch"]), int(state["step"])
    history = read_metrics(out)[:start] if (out / METRICS).is_file() else []
    log.info("resuming %s after epoch %d of %d", out, start, config["epochs"])
    return start, step, history


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
        raise WeightsError(f"The optimizer state in {str(out)!r} does not fit this model ({exc}); pass --force "
                           f"to start over") from exc


def write_run(model: nn.Module, out: Path, *, state: dict[str, Any], opt: torch.optim.Optimizer,
               history: list[dict[str, Any]], plot: bool) -> None:
    """Write the model (surgeon.save's format), trainer state, metrics and plot into `out`, replacing it
    as a whole: a crash leaves the previous epoch's folder (or, between two renames, OUT.old)."""
    from safetensors.torch import save_file

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
        if any("gates" in r for r in history):
            plot_gates(history, tmp / GATES_PLOT)
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


def plot_gates(history: list[dict[str, Any]], path: str | os.PathLike) -> bool:
    """Draw mean |γ| and effect size per edit and epoch (the records' "gates") into a PNG; False without
    matplotlib."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
        from matplotlib.ticker import MaxNLocator
    except ImportError:
        return False
    fig = Figure(figsize=(9, 3.5), dpi=100)
    FigureCanvasAgg(fig)
    epochs = [r["epoch"] for r in history]
    sites = list(dict.fromkeys(s for r in history for s in r.get("gates", {})))
    for i, (key, title) in enumerate((("gamma", "mean |γ| per edit"), ("effect", "effect: mean |y − x| / mean |x|"))):
        ax = fig.add_subplot(1, 2, i + 1)
        for site in sites:
            values = [(r.get("gates", {}).get(site) or {}).get(key) for r in history]
            ax.plot(epochs, [math.nan if v is None else v for v in values], marker="o", label=site or "(root)")
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    if len(sites) <= 12:
        fig.axes[0].legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(str(path))
    return True


def open_model(ref: str, *, pretrained: bool = False, weights: str | os.PathLike | None = None,
               model_args: dict[str, Any] | None = None, allow_pickle: bool = False, trust_code: bool = False):
    """A model to fine-tune or evaluate: a folder `surgeon save` wrote (or a training run's output
    folder), else a model reference built by `surgeon.models.load`."""
    from surgeon import models

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
