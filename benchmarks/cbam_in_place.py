"""What CBAM's in-place second product saves: resnet50 with `cbam --init paper` as surgeon builds it (the spatial
map multiplied into the channel-weighted map in place when autograd is off, `layers/gate.py: mul_own`) against
the same patched model whose CBAM layers allocate a new map for that product, and timm's CBAM resnet50; each
one's overhead over resnet50, at batch 1 and 8, eval and train (in training both variants run out of place).

Then one CBAM alone on resnet50's first-stage maps (256x56x56), surgeon's against timm's, in eval: what the
module costs where no network's freed memory is there to reuse.

Side by side in one process, interleaved rounds, the minimum of each round's median; CPU time on one thread.
ROUNDS and REPEAT set the effort.
"""
import copy
import os
import time
import warnings

import timm
import torch

import surgeon
from _common import load_average, overheads, report, side_by_side
from surgeon.layers.mixed import CBAM

warnings.filterwarnings("ignore", category=UserWarning)
torch.set_num_threads(1)
ROUNDS, REPEAT = int(os.environ.get("ROUNDS", 5)), int(os.environ.get("REPEAT", 3))


class AllocatingCBAM(CBAM):
    """CBAM as it was before the in-place product: the spatial part multiplies out of place."""

    def forward(self, x):
        return self.spatial(self.channel(x))


def compare() -> list[dict]:
    base = timm.create_model("resnet50").eval()
    in_place = surgeon.add(base, "cbam", init="paper", input_size=(3, 224, 224), verify=False)
    allocating = copy.deepcopy(in_place)
    for m in allocating.modules():
        if type(m) is CBAM:
            m.__class__ = AllocatingCBAM
    models = {"resnet50": base, "timm cbam": timm.create_model("resnet50", block_args=dict(attn_layer="cbam")),
              "cbam in place": in_place, "cbam allocating": allocating}
    return overheads(models, rounds=ROUNDS, repeat=REPEAT, clock=time.process_time)


def alone() -> list[dict]:
    from timm.layers.cbam import CbamModule

    torch.manual_seed(0)
    modules = {"surgeon cbam": CBAM(256), "timm cbam": CbamModule(256)}
    rows = []
    for batch in (1, 8):
        times = side_by_side(modules, torch.randn(batch, 256, 56, 56), train=False, rounds=ROUNDS, repeat=REPEAT,
                             clock=time.process_time)
        rows.append({"case": f"b{batch} eval", **{f"{k} ms": t * 1e3 for k, t in times.items()},
                     "surgeon / timm": times["surgeon cbam"] / times["timm cbam"]})
    return rows


before = load_average()
rows = compare()
report(f"CBAM's in-place product, resnet50 224x224, CPU time, 1 thread, min of {ROUNDS} interleaved rounds; "
       f"load average {before} before, {load_average()} after", rows)
before = load_average()
rows = alone()
report(f"one CBAM alone, 256x56x56 maps, CPU time, 1 thread, min of {ROUNDS} interleaved rounds; "
       f"load average {before} before, {load_average()} after", rows)
