"""Patched models against the hand-written ones, and what torch.compile gives each, CPU, 224x224.

1. Latency at batch 1 and 8, eval (forward, no grad) and train (forward + backward): timm resnet50,
   timm seresnet50 vs `se --init paper` on resnet50, and timm's resnet50 with CBAM blocks
   (`block_args=dict(attn_layer="cbam")`) vs `cbam --init paper`; each attention's overhead over
   resnet50, and surgeon's overhead over the hand-written one's. Goals (issue 12): se within 2% of
   seresnet50; CBAM's overhead at most half of timm's. The hand-written models hold the patched ones'
   weights, and a second seresnet50 (control) shows how far two copies of one model time apart.
2. torch.compile speed-up (eager / compiled, eval, no grad) of resnet50 and of the patched models
   (identity init): the patched models should gain what the base model gains.

All models are timed side by side in one process, in interleaved rounds, the minimum over rounds of each
round's median. ROUNDS, REPEAT set the effort; COMPILE=0 skips part 2 (compiling takes minutes on CPU),
HANDWRITTEN=0 part 1;
CLOCK=cpu measures CPU time on one thread instead of wall time on two.
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
ROUNDS, REPEAT = int(os.environ.get("ROUNDS", 3)), int(os.environ.get("REPEAT", 3))


def _side_by_side(models: dict, x: torch.Tensor, train: bool) -> dict[str, float]:
    return side_by_side(models, x, train=train, rounds=ROUNDS, repeat=REPEAT, clock=CLOCK)


def _same_weights(model: torch.nn.Module, source: torch.nn.Module) -> torch.nn.Module:
    """`model` holding `source`'s tensors under the same names (reshaped where a linear layer is a 1x1 conv)."""
    own = model.state_dict()
    model.load_state_dict({k: v.reshape(own[k].shape) for k, v in source.state_dict().items() if k in own},
                          strict=False)
    return model


def handwritten() -> list[dict]:
    resnet50 = timm.create_model("resnet50")
    se_paper = surgeon.add(resnet50.eval(), "se", init="paper", input_size=(3, 224, 224), verify=False)
    models = {
        "resnet50": resnet50,
        # the hand-written models hold the same weights (timm's SE has 1x1 convs where surgeon's has linear
        # layers; its CBAM's own layers differ and keep theirs): only the code differs
        "seresnet50": _same_weights(timm.create_model("seresnet50"), se_paper),
        "se paper": se_paper,
        "timm cbam": _same_weights(timm.create_model("resnet50", block_args=dict(attn_layer="cbam")), resnet50),
        "cbam paper": surgeon.add(resnet50.eval(), "cbam", init="paper", input_size=(3, 224, 224), verify=False),
        # a second seresnet50 with the same weights: the spread of the measurement itself
        "control": _same_weights(timm.create_model("seresnet50"), se_paper),
    }
    rows = []
    for batch in (1, 8):
        x = torch.randn(batch, 3, 224, 224)
        for train in (False, True):
            t = _side_by_side(models, x, train)
            base = t["resnet50"]
            rows.append({
                "case": f"b{batch} {'train' if train else 'eval'}", "resnet50 s": base,
                "se paper / seresnet50": t["se paper"] / t["seresnet50"],
                "control / seresnet50": t["control"] / t["seresnet50"],
                "cbam paper / timm cbam": t["cbam paper"] / t["timm cbam"],
                "timm cbam overhead": t["timm cbam"] / base - 1,
                "surgeon cbam overhead": t["cbam paper"] / base - 1,
                "overhead ratio": (t["cbam paper"] - base) / (t["timm cbam"] - base),
            })
    return rows


def compiled() -> list[dict]:
    resnet50 = timm.create_model("resnet50").eval()
    eager = {
        "resnet50": resnet50,
        "se identity": surgeon.add(resnet50, "se", input_size=(3, 224, 224), verify=False).eval(),
        "cbam identity": surgeon.add(resnet50, "cbam", input_size=(3, 224, 224), verify=False).eval(),
    }
    rows = []
    for batch in (1, 8):
        x = torch.randn(batch, 3, 224, 224)
        both = {}
        for name, m in eager.items():
            c = torch.compile(m)
            t = time.perf_counter()
            with torch.no_grad():
                c(x)  # compiles
            both[name] = m
            both[f"{name} compiled"] = c
            print(f"compiled {name} at batch {batch} in {time.perf_counter() - t:.0f} s", flush=True)
        t = _side_by_side(both, x, train=False)
        for name in eager:
            rows.append({"case": f"b{batch} {name}", "eager s": t[name], "compiled s": t[f"{name} compiled"],
                         "speed-up": t[name] / t[f"{name} compiled"]})
    return rows


if os.environ.get("HANDWRITTEN", "1") != "0":
    before = load_average()
    rows = handwritten()
    report(f"patched vs hand-written, resnet50, 224x224, CPU, {SETTING}; load average {before} before, "
           f"{load_average()} after", rows)
if os.environ.get("COMPILE", "1") != "0":
    before = load_average()
    rows = compiled()
    report(f"torch.compile speed-up (eval, no grad), CPU, {SETTING}; load average {before} before, "
           f"{load_average()} after", rows)
