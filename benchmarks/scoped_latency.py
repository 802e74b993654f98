"""Forward latency of a patched timm resnet50 (se, cbam) as surgery now builds it (the user's model with
only the owning blocks rewritten) and as it used to (the whole model as one fx GraphModule), each as a
ratio to the unpatched model. Batch 1 and 8, 224×224, CPU, 2 threads, eval, no grad; in one process,
interleaved rounds, the minimum over rounds of each round's median."""
import os

import timm
import torch
import torch.fx as fx

import surgeon
from _common import median_time, report
from surgeon.surgery.trace import SurgeonTracer

torch.set_num_threads(2)
ROUNDS, REPEAT = int(os.environ.get("ROUNDS", 3)), int(os.environ.get("REPEAT", 5))


def whole_graph(model):
    """The patched model traced into one GraphModule, inserted modules as leaves: what `add` returned before."""
    return fx.GraphModule(model, SurgeonTracer().trace(model)).eval()


rows = []
base = timm.create_model("resnet50").eval()
for attention in ("se", "cbam"):
    scoped = surgeon.add(base, attention, input_size=(3, 224, 224), verify=False)
    flat = whole_graph(scoped)
    models = {"resnet50 (eager)": base, f"{attention} scoped": scoped, f"{attention} whole GraphModule": flat}
    for batch in (1, 8):
        x = torch.randn(batch, 3, 224, 224)
        times: dict[str, float] = {}
        with torch.no_grad():
            assert torch.equal(scoped(x), flat(x))
            for _ in range(ROUNDS):  # interleaved: drift in machine load hits every model alike
                for name, m in models.items():
                    t, _ = median_time(lambda m=m, x=x: m(x), repeat=REPEAT, warmup=1)
                    times[name] = min(times.get(name, float("inf")), t)
        ref = times["resnet50 (eager)"]
        for name in list(models)[1:]:
            rows.append({"case": f"{name}, batch {batch}", "seconds": times[name], "resnet50 s": ref,
                         "ratio to eager": times[name] / ref})
report("patched resnet50 forward latency: scoped surgery vs the former whole-model GraphModule", rows)
