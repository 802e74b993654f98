"""Surgery time against building the model: per timm model, `timm.create_model(name)` vs surgery
(trace + shapes + sites + plan + rewrite of cbam, no verification) vs surgery with verification, measured
side by side in interleaved rounds (the minimum over rounds of each), and the median ratio over the models;
verification/create is verification's own time (with verification minus without) over create; fx/create is
plain `torch.fx.symbolic_trace(model)` over create: one trace of the whole model, which surgery cannot do
without, and a floor for any surgery built on fx. Then surgery of a segmentation and a detection model, in
seconds.

MODELS=a,b limits the list; ROUNDS sets the effort; CLOCK=cpu measures this process's CPU time on one
thread instead of wall time on two (on a machine other jobs keep busy).
"""
import gc
import os
import statistics
import time
import warnings

import timm
import torch
import torch.fx

import surgeon
from _common import load_average, report

warnings.filterwarnings("ignore", category=UserWarning)  # "no residual site; using stage sites": expected here
CPU = os.environ.get("CLOCK", "wall") == "cpu"
torch.set_num_threads(1 if CPU else 2)
CLOCK, SETTING = (time.process_time, "CPU time, 1 thread") if CPU else (time.perf_counter, "wall time, 2 threads")
ROUNDS = int(os.environ.get("ROUNDS", 3))
MODELS = os.environ.get("MODELS", "resnet18,resnet50,resnext50_32x4d,convnext_tiny,efficientnet_b0,"
                        "mobilenetv3_large_100,regnety_016,densenet121,dla34,cspresnet50,ghostnet_100,"
                        "repvgg_a2,mixnet_s,rexnet_100").split(",")


def timed(fn) -> float:
    """fn's time; the garbage of what ran before is collected first, so that no step pays for another's (as
    `timeit` turns collection off)."""
    gc.collect()
    t = CLOCK()
    fn()
    return CLOCK() - t


def surgery_vs_create(name: str, attention: str = "cbam") -> dict:
    base = timm.create_model(name).eval()
    steps = {
        "create": lambda: timm.create_model(name),
        "surgery": lambda: surgeon.add(base, attention, verify=False),
        "verified": lambda: surgeon.add(base, attention),
        "fx": lambda: torch.fx.symbolic_trace(base),
    }
    for fn in steps.values():  # warm-up: imports, first-call caches
        fn()
    best = {k: float("inf") for k in steps}
    for _ in range(ROUNDS):
        for k, fn in steps.items():
            best[k] = min(best[k], timed(fn))
    return {"model": name, "create s": best["create"], "surgery s": best["surgery"],
            "surgery/create": best["surgery"] / best["create"], "verified s": best["verified"],
            "verified/create": best["verified"] / best["create"],
            "verification/create": (best["verified"] - best["surgery"]) / best["create"],
            "fx/create": best["fx"] / best["create"]}


def dense_models() -> list[dict]:
    """Surgery of models users waited minutes for: a U-Net and a detector (seconds, one run each)."""
    import segmentation_models_pytorch as smp
    import torchvision

    cases = [
        ("smp Unet(resnet34), 3x256x256, scse on decoder", lambda: smp.Unet("resnet34", encoder_weights=None),
         "scse", {"input_size": (3, 256, 256)}),
        ("torchvision fasterrcnn_mobilenet_v3_large_fpn, cbam",
         lambda: torchvision.models.detection.fasterrcnn_mobilenet_v3_large_fpn(weights=None, weights_backbone=None),
         "cbam", {}),
    ]
    rows = []
    for what, build, attention, kw in cases:
        model = build().eval()
        t_surgery = timed(lambda m=model, a=attention, kw=kw: surgeon.add(m, a, verify=False, **kw))
        t_verified = timed(lambda m=model, a=attention, kw=kw: surgeon.add(m, a, **kw))
        rows.append({"model": what, "surgery s": t_surgery, "verified s": t_verified})
    return rows


before = load_average()
rows = [surgery_vs_create(name) for name in MODELS]
rows.append({"model": f"median of {len(MODELS)}", "create s": statistics.median(r["create s"] for r in rows),
             "surgery s": statistics.median(r["surgery s"] for r in rows),
             "surgery/create": statistics.median(r["surgery/create"] for r in rows),
             "verified s": statistics.median(r["verified s"] for r in rows),
             "verified/create": statistics.median(r["verified/create"] for r in rows),
             "verification/create": statistics.median(r["verification/create"] for r in rows),
             "fx/create": statistics.median(r["fx/create"] for r in rows)})
report(f"surgery time (cbam) vs timm.create_model, CPU, {SETTING}, min of {ROUNDS} interleaved rounds; "
       f"load average {before} before, {load_average()} after", rows)
if not os.environ.get("MODELS"):
    report(f"surgery of dense models, CPU, {SETTING}, one run", dense_models())
