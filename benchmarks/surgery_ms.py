"""Surgery (cbam, `surgeon.add(verify=False)`) and verified surgery (`surgeon.add`) of timm models, in ms of CPU
time on one thread, the minimum of ROUNDS runs (garbage collected before each), and what checking a forward's
changes costs (`meta.snapshot` and `undo` over every module, once). One JSON line, so that two versions of surgeon
can be compared side by side: run it alternately with PYTHONPATH pointing at each checkout
(`git worktree add /tmp/old <commit>`; `PYTHONPATH=/tmp/old python benchmarks/surgery_ms.py ...`).

Arguments: timm model names, `name@0.2` for one built with that drop_rate.
"""
import gc
import json
import os
import sys
import time
import warnings

import timm
import torch

import surgeon
from surgeon.surgery import meta

warnings.filterwarnings("ignore", category=UserWarning)
torch.set_num_threads(1)
ROUNDS = int(os.environ.get("ROUNDS", 5))


def timed(fn) -> float:
    gc.collect()
    t = time.process_time()
    fn()
    return time.process_time() - t


def measure(spec: str) -> dict:
    name, _, drop = spec.partition("@")
    model = timm.create_model(name, **({"drop_rate": float(drop)} if drop else {})).eval()
    steps = {"surgery": lambda: surgeon.add(model, "cbam", verify=False),
             "verified": lambda: surgeon.add(model, "cbam")}
    for fn in steps.values():  # warm-up
        fn()
    best = {k: min(timed(fn) for _ in range(ROUNDS)) for k, fn in steps.items()}
    modules = list(model.modules())

    def snapshot_undo():
        for m, before in [(m, meta.snapshot(m)) for m in modules]:
            meta.undo(m, before)

    return {"surgery ms": round(best["surgery"] * 1e3), "verified ms": round(best["verified"] * 1e3),
            "verification ms": round((best["verified"] - best["surgery"]) * 1e3),
            "snapshot+undo ms": round(min(timed(snapshot_undo) for _ in range(ROUNDS)) * 1e3, 1)}


print(json.dumps({spec: measure(spec) for spec in sys.argv[1:] or ["resnet50"]}))
