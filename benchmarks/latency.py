"""Forward latency: `se --init paper` retrofitted into timm resnet50 vs timm's own seresnet50.
Batch 8, 224×224, CPU, 2 threads, eval mode, no grad; median of repeated runs, in one run."""
import timm
import torch

import surgeon
from _common import median_time, report

torch.set_num_threads(2)
x = torch.randn(8, 3, 224, 224)
models = {
    "timm resnet50": timm.create_model("resnet50").eval(),
    "timm seresnet50 (hand-written)": timm.create_model("seresnet50").eval(),
    "surgeon se --init paper on resnet50": surgeon.add(timm.create_model("resnet50").eval(), "se", init="paper"),
    "surgeon se --init identity on resnet50": surgeon.add(timm.create_model("resnet50").eval(), "se"),
}
params = {k: sum(p.numel() for p in m.parameters()) for k, m in models.items()}
times = {}
with torch.no_grad():
    for _round in range(2):  # interleave rounds so drift in machine load hits every model alike
        for name, m in models.items():
            t, _ = median_time(lambda m=m: m(x), repeat=7, warmup=2)
            times[name] = min(times.get(name, float("inf")), t)
ref = times["timm seresnet50 (hand-written)"]
report("forward latency, batch 8, 224x224, CPU, 2 threads", [
    {"model": k, "params": f"{params[k]:,}", "median s": times[k], "vs seresnet50": times[k] / ref} for k in models
])
