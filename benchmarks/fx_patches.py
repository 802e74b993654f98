"""Surgery with fx's nn.Module patches set once per step (`surgery/trace.py: _FxPatches`) against fx's own way, a
patch and a revert at every trace: per timm model, `surgeon.plan(model, "cbam").apply(verify=False)` both ways,
side by side in interleaved rounds (the minimum over rounds of each), CPU time on one thread, with the number of
traces a surgery makes.

MODELS=a,b sets the models; ROUNDS the effort.
"""
import os
import time
import warnings

import timm
import torch
import torch.fx as fx

import surgeon
from _common import load_average, report
from surgeon.surgery import trace as trace_module

warnings.filterwarnings("ignore", category=UserWarning)  # "no residual site; using stage sites": expected here
torch.set_num_threads(1)
ROUNDS = int(os.environ.get("ROUNDS", 3))
MODELS = os.environ.get("MODELS", "resnet50,ghostnet_100,densenet121,rexnet_100").split(",")


def traces(model) -> int:
    counted = [0]
    trace = fx.Tracer.trace

    def counting(self, *args, **kwargs):
        counted[0] += 1
        return trace(self, *args, **kwargs)

    fx.Tracer.trace = counting
    try:
        surgeon.plan(model, "cbam").apply(verify=False)
    finally:
        fx.Tracer.trace = trace
    return counted[0]


def row(name: str) -> dict:
    model = timm.create_model(name).eval()
    surgeon.plan(model, "cbam").apply(verify=False)  # warm-up: imports, first-call caches
    best = {True: float("inf"), False: float("inf")}
    try:
        for _ in range(ROUNDS):
            for shared in (True, False):
                trace_module._FxPatches.available = shared
                t = time.process_time()
                surgeon.plan(model, "cbam").apply(verify=False)
                best[shared] = min(best[shared], time.process_time() - t)
    finally:
        trace_module._FxPatches.available = trace_module._FX_SHAREABLE
    return {"model": name, "traces": traces(model), "patched once ms": best[True] * 1e3,
            "fx's own ms": best[False] * 1e3, "ratio": best[True] / best[False]}


before = load_average()
rows = [row(name) for name in MODELS]
report(f"surgery (cbam, no verification) with fx's module patches once per step vs at every trace, CPU time, 1 "
       f"thread, min of {ROUNDS} interleaved rounds; load average {before} before, {load_average()} after", rows)
