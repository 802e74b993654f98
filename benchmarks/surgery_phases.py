"""Where surgery's time goes: per timm model, the CPU time (one thread) of each step of `surgeon.plan(model,
"cbam").apply()` with verification, the minimum over ROUNDS runs, next to `timm.create_model`.

Planning: the structural copy, the recorded call (a shape-only forward on meta tensors, which also counts the
original's FLOPs at the example's size for the verification to report), fx tracing, shape propagation (a second
meta forward, over the graph), and the rest (finding sites, building the modules, checking each one's shape).
Apply: choosing each edit's owner (owners traced alone and matched), rewriting them. Verification (on images 4x
smaller per side, see `Plan._verify`): the train-mode check (two forwards with autograd, and the backward pass),
and the rest (eval forwards without autograd; the backward pass too for a model that does not run in train mode;
the FLOPs where they were not counted on the way).

MODELS=a,b sets the models; ROUNDS the effort. The steps are timed by wrapping surgeon's own functions, so a
renamed function shows up here as a KeyError, not as a wrong number.
"""
import collections
import functools
import gc
import os
import time
import warnings

import timm
import torch

import surgeon
from _common import load_average, report
from surgeon import planning
from surgeon.surgery import scope, shapes
from surgeon.surgery import verify as verify_module

warnings.filterwarnings("ignore", category=UserWarning)  # "no residual site; using stage sites": expected here
torch.set_num_threads(1)
ROUNDS = int(os.environ.get("ROUNDS", 3))
MODELS = os.environ.get("MODELS", "resnet50,convnext_tiny,efficientnet_b0,regnety_016,densenet121,"
                        "ghostnet_100").split(",")
SPENT: collections.Counter = collections.Counter()

# (module, function name, step): each call's CPU time goes to its step
STEPS = [(planning, "structural_copy", "copy"), (shapes, "record_calls", "record calls"),
         (planning, "trace", "trace"), (shapes, "propagate", "shapes"), (scope, "choose", "owners"),
         (scope, "rewrite", "rewrite"), (planning.Plan, "_verify", "verify"),
         (verify_module, "_train_check", "verify: train check")]


def _timed(fn, step: str):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        t = time.process_time()
        try:
            return fn(*args, **kwargs)
        finally:
            SPENT[step] += time.process_time() - t
    return wrapper


for owner, name, step in STEPS:
    setattr(owner, name, _timed(getattr(owner, name), step))


def phases(name: str) -> dict[str, float]:
    """{step: milliseconds} for one model, each the minimum over the rounds."""
    base = timm.create_model(name).eval()
    surgeon.plan(base, "cbam").apply()  # warm-up: imports, first-call caches
    best: dict[str, float] = {}
    for _ in range(ROUNDS):
        gc.collect()  # what ran before is collected first: no step pays for another's garbage
        t = time.process_time()
        timm.create_model(name)
        create = time.process_time() - t
        gc.collect()
        SPENT.clear()
        t = time.process_time()
        plan = surgeon.plan(base, "cbam")
        planned = time.process_time() - t
        plan.apply()
        total = time.process_time() - t
        prepared = sum(SPENT[k] for k in ("copy", "record calls", "trace", "shapes"))
        row = {"timm.create_model": create, **{k: SPENT[k] for k in ("copy", "record calls", "trace", "shapes")},
               "sites, modules": planned - prepared, "owners": SPENT["owners"], "rewrite": SPENT["rewrite"],
               "verify: train check": SPENT["verify: train check"],
               "verify: eval": SPENT["verify"] - SPENT["verify: train check"],
               "total": total}
        best = {k: min(best.get(k, float("inf")), v * 1e3) for k, v in row.items()}
    return best


before = load_average()
by_model = {name: phases(name) for name in MODELS}
report(f"surgery (cbam, verified) step by step, ms of CPU time, 1 thread, min of {ROUNDS} runs; load average "
       f"{before} before, {load_average()} after",
       [{"step": step, **{name: times[step] for name, times in by_model.items()}} for step in by_model[MODELS[0]]])
