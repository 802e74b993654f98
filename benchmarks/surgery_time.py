"""Surgery time for cbam on timm resnet50 (trace + shapes + sites + plan + rewrite; model loading
excluded), against timm.create_model("resnet50") in the same run. Median of repeated runs, CPU."""

import timm
import torch

import surgeon
from _common import median_time, report

torch.set_num_threads(2)
base = timm.create_model("resnet50").eval()
create, _ = median_time(lambda: timm.create_model("resnet50"), repeat=5)
surgery, _ = median_time(lambda: surgeon.plan(base, "cbam").apply(verify=False), repeat=5)
verified, _ = median_time(lambda: surgeon.plan(base, "cbam").apply(verify=True), repeat=3)
report("surgery time: cbam on resnet50", [
    {"what": "timm.create_model('resnet50')", "median s": create, "ratio": 1.0},
    {"what": "surgery (trace+sites+plan+rewrite)", "median s": surgery, "ratio": surgery / create},
    {"what": "surgery + verify (2 forwards, backward, FLOPs)", "median s": verified, "ratio": verified / create},
])
