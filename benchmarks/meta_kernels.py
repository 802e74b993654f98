"""What surgery's shape-only stand-ins save (`surgery/meta.py: ShapeOnly`): per function, the time of one call on
a (2, 64, 56, 56) meta tensor through torch's meta kernel and through the stand-in; then a shape-only forward of
whole timm models (`meta.run`, as surgery records a model's calls) without and with the stand-ins.

Wall time on one thread, the minimum over ROUNDS interleaved rounds of REPEAT calls each. Meta kernels do no
arithmetic, so this measures Python and dispatch overhead, which a busy machine inflates for both columns alike.
MODELS=a,b sets the models.
"""
import os
import time
import warnings

import timm
import torch
import torch.nn.functional as F

from _common import load_average, report
from surgeon.surgery import meta

warnings.filterwarnings("ignore", category=UserWarning)
torch.set_num_threads(1)
ROUNDS, REPEAT = int(os.environ.get("ROUNDS", 5)), int(os.environ.get("REPEAT", 50))
MODELS = os.environ.get("MODELS", "resnet50,convnext_tiny,efficientnet_b0,mobilenetv3_large_100,regnety_016")

CALLS = {
    "hardswish": lambda x: F.hardswish(x),
    "hardsigmoid": lambda x: F.hardsigmoid(x),
    "relu6": lambda x: F.relu6(x),
    "gelu": lambda x: F.gelu(x),
    "relu (out of place)": lambda x: F.relu(x),
    "x + y": lambda x: x + x,
    "x * (1,C,1,1)": lambda x: x * x[:1, :, :1, :1].contiguous(),
    "mean over H, W": lambda x: x.mean((2, 3), keepdim=True),
    "linear, with bias": lambda x: F.linear(x, x[0, 0, :56, :56].contiguous(), x[0, 0, 0].contiguous()),
    "scaled_dot_product_attention": lambda x: F.scaled_dot_product_attention(x, x, x),
    "bilinear upsampling x2": lambda x: F.interpolate(x, scale_factor=2, mode="bilinear"),
    "batch_norm": lambda x: F.batch_norm(x, None, None, training=True),
    "layer_norm": lambda x: F.layer_norm(x, x.shape[-1:]),
}


def _timed(fn) -> float:
    t = time.perf_counter()
    for _ in range(REPEAT):
        fn()
    return (time.perf_counter() - t) / REPEAT


def per_call() -> list[dict]:
    x = torch.empty(2, 64, 56, 56, device="meta")
    stand_ins = meta.ShapeOnly()

    def through_stand_in(call):
        with stand_ins:
            return call(x)

    rows = []
    for what, call in CALLS.items():
        call(x), through_stand_in(call)  # warm-up: first-call caches
        kernel = stand_in = float("inf")
        for _ in range(ROUNDS):
            kernel = min(kernel, _timed(lambda call=call: call(x)))
            stand_in = min(stand_in, _timed(lambda call=call: through_stand_in(call)))
        rows.append({"what": what, "meta kernel us": kernel * 1e6, "stand-in us": stand_in * 1e6,
                     "kernel / stand-in": kernel / stand_in})
    return rows


def forwards() -> list[dict]:
    rows = []
    fast = meta.ShapeOnly._FAST
    for name in MODELS.split(","):
        model = timm.create_model(name).eval()
        x = torch.randn(2, 3, 224, 224)

        def run(with_stand_ins, model=model, x=x):
            meta.ShapeOnly._FAST = fast if with_stand_ins else {}
            try:
                with torch.no_grad():
                    meta.run([model], model, x)
            finally:
                meta.ShapeOnly._FAST = fast

        run(False), run(True)
        best = {False: float("inf"), True: float("inf")}
        for _ in range(ROUNDS):
            for k in best:
                t = time.perf_counter()
                run(k)
                best[k] = min(best[k], time.perf_counter() - t)
        rows.append({"model": name, "meta kernels ms": best[False] * 1e3, "stand-ins ms": best[True] * 1e3,
                     "ratio": best[False] / best[True]})
    return rows


before = load_average()
calls, models = per_call(), forwards()
setting = f"wall time, 1 thread, min of {ROUNDS} rounds; load average {before} before, {load_average()} after"
report(f"one call on a (2, 64, 56, 56) meta tensor, {setting}", calls)
report(f"shape-only forward of a timm model at 224x224, batch 2, {setting}", models)
