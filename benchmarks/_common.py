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
        t.add_column(col, justify="left" if col in ("what", "model", "case") else "right")
    for r in rows:
        t.add_row(*(f"{v:.4g}" if isinstance(v, float) else str(v) for v in r.values()))
    Console().print(t)
