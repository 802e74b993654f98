"""Forward latency on timm resnet50, CPU, 2 threads, eval mode, no grad, 224×224, all in one process.

1. `se --init paper` retrofitted vs timm's own seresnet50 (batch 8).
2. What identity init costs: per attention, the identity-init model's latency over the paper-init
   model's, at batch 1 and 8. Each pair is measured side by side, in interleaved rounds, the minimum
   over rounds of each round's median, so drift in machine load hits both alike; the load average is
   printed with the table. ATTENTIONS=se,cbam limits the list; ROUNDS and REPEAT set the effort.
   CLOCK=cpu measures this process's CPU time on one thread instead of wall time on two: on a machine
   that other jobs keep busy, wall times are mostly their noise, CPU time is the work done.
"""
import os
import time

import timm
import torch

import surgeon
from _common import load_average, report, side_by_side

CPU = os.environ.get("CLOCK", "wall") == "cpu"
torch.set_num_threads(1 if CPU else 2)
CLOCK, SETTING = (time.process_time, "CPU time, 1 thread") if CPU else (time.perf_counter, "wall time, 2 threads")
ROUNDS, REPEAT = int(os.environ.get("ROUNDS", 3)), int(os.environ.get("REPEAT", 5))
ATTENTIONS = os.environ.get("ATTENTIONS", "se,eca,sk,ge,gc,srm,fca,spatial,coord,cbam,bam,triplet,scse,adl").split(",")


# 1. paper init vs the hand-written seresnet50
x8 = torch.randn(8, 3, 224, 224)
models = {
    "timm resnet50": timm.create_model("resnet50").eval(),
    "timm seresnet50 (hand-written)": timm.create_model("seresnet50").eval(),
    "surgeon se --init paper on resnet50": surgeon.add(timm.create_model("resnet50").eval(), "se", init="paper"),
    "surgeon se --init identity on resnet50": surgeon.add(timm.create_model("resnet50").eval(), "se"),
}
params = {k: sum(p.numel() for p in m.parameters()) for k, m in models.items()}
times = side_by_side(models, x8, rounds=2, repeat=7, clock=CLOCK)
ref = times["timm seresnet50 (hand-written)"]
report(f"forward latency, batch 8, 224x224, CPU, {SETTING}", [
    {"model": k, "params": f"{params[k]:,}", "median s": times[k], "vs seresnet50": times[k] / ref} for k in models
])

# 2. identity init over paper init, per attention
base = timm.create_model("resnet50").eval()
rows = []
before = load_average()
for attention in ATTENTIONS:
    pair = {init: surgeon.add(base, attention, init=init, input_size=(3, 224, 224), verify=False).eval()
            for init in ("paper", "identity")}
    row = {"case": attention}
    for batch in (1, 8):
        t = side_by_side(pair, torch.randn(batch, 3, 224, 224), rounds=ROUNDS, repeat=REPEAT, clock=CLOCK)
        row[f"paper s, b{batch}"] = t["paper"]
        row[f"identity/paper, b{batch}"] = t["identity"] / t["paper"]
    rows.append(row)
report(f"identity init over paper init, resnet50, CPU, {SETTING}; load average (1/5/15 min) "
       f"{before} before, {load_average()} after", rows)
