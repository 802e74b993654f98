"""Shared helpers for the benchmark scripts: timing and table/JSON output."""
from __future__ import annotations

import json
import statistics
import sys
import time
from typing import Any, Callable


def median_time(fn: Callable[[], Any], *, repeat: int, warmup: int = 1,
                clock: Callable[[], float] = time.perf_counter) -> tuple[float, list[float]]:
    """Median seconds per call by `clock` (wall time; `time.process_time` for this process's CPU time)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        t = clock()
        fn()
        times.append(clock() - t)
    return statistics.median(times), times


def step(model, x, train: bool) -> None:
    """One timed step: a forward without autograd (eval), or a forward and backward from zeroed gradients."""
    import torch

    if not train:
        with torch.no_grad():
            model(x)
        return
    model.zero_grad(set_to_none=True)
    model(x).sum().backward()


def side_by_side(models: dict, x, *, train: bool = False, rounds: int, repeat: int,
                 clock: Callable[[], float] = time.perf_counter) -> dict[str, float]:
    """Seconds per step (see `step`) of each model, put in train or eval mode: interleaved rounds, so drift in
    the machine's load hits every model alike, and the minimum of each round's median."""
    for m in models.values():
        m.train(train)
    times: dict[str, float] = {}
    for _round in range(rounds):
        for name, m in models.items():
            t, _ = median_time(lambda m=m: step(m, x, train), repeat=repeat, warmup=1, clock=clock)
            times[name] = min(times.get(name, float("inf")), t)
    return times


def overheads(models: dict, *, train_first: bool = False, rounds: int, repeat: int,
              clock: Callable[[], float] = time.perf_counter) -> list[dict]:
    """For 224x224 images at batch 1 and 8, eval and train: the first model's seconds per step and each other
    model's overhead over it (time / first's time − 1), from `side_by_side`."""
    import torch

    base, *others = models
    rows = []
    for batch in (1, 8):
        x = torch.randn(batch, 3, 224, 224)
        for train in (True, False) if train_first else (False, True):
            times = side_by_side(models, x, train=train, rounds=rounds, repeat=repeat, clock=clock)
            rows.append({"case": f"b{batch} {'train' if train else 'eval'}", f"{base} s": times[base],
                         **{f"{k} overhead": times[k] / times[base] - 1 for k in others}})
    return rows


def load_average() -> str:
    """The 1/5/15-minute load averages, e.g. '0.52/0.61/0.70' (2 cores: above 2 the clock is shared)."""
    import os

    return "/".join(f"{v:.2f}" for v in os.getloadavg())


def report(title: str, rows: list[dict[str, Any]]) -> None:
    """Print rows as a rich table, or as JSON with --json."""
    if "--json" in sys.argv:
        print(json.dumps({"benchmark": title, "rows": rows}, indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    t = Table(title=title, title_justify="left")
    for col in rows[0]:
        t.add_column(col, justify="left" if col in ("what", "model", "case", "step") else "right")
    for r in rows:
        t.add_row(*(f"{v:.4g}" if isinstance(v, float) else str(v) for v in r.values()))
    Console().print(t)
