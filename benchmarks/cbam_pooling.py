"""What CBAM's one-pass pooling backward (`layers/pooled.py: mean_max`) saves in training: resnet50 with `cbam
--init paper` as surgeon builds it, against the same patched model whose CBAM parts pool with autograd's own `amax`
and `mean` (as timm's CBAM and surgeon's before it do), and timm's CBAM resnet50; each one's overhead over resnet50
at batch 1 and 8, in train mode (forward and backward) and in eval mode, where the two variants run the same ops
and differ only by the machine's noise.

Then the pooling's backward alone, both ways, on resnet50's first-stage maps (8x256x56x56): over the spatial dims
(CBAM's channel weights) and over the channels (its spatial map).

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
from _common import load_average, median_time, overheads, report
from surgeon.layers.mixed import ChannelAttn
from surgeon.layers.spatial import SpatialAttn

warnings.filterwarnings("ignore", category=UserWarning)
torch.set_num_threads(1)
ROUNDS, REPEAT = int(os.environ.get("ROUNDS", 4)), int(os.environ.get("REPEAT", 3))


class AutogradChannel(ChannelAttn):
    """CBAM's channel part pooling with autograd's own backward."""

    def _attn(self, x):
        dims = tuple(range(2, x.dim()))
        return self.gate(self.fc2(self.act(self.fc1(x.mean(dims)))) + self.fc2(self.act(self.fc1(x.amax(dims)))))


class AutogradSpatial(SpatialAttn):
    """CBAM's spatial part pooling with autograd's own backward."""

    def _attn(self, x):
        return self.gate(self.bn(self.conv(torch.cat([x.amax(1, keepdim=True), x.mean(1, keepdim=True)], dim=1))))


def compare() -> list[dict]:
    base = timm.create_model("resnet50").eval()
    one_pass = surgeon.add(base, "cbam", init="paper", input_size=(3, 224, 224), verify=False)
    autograd = copy.deepcopy(one_pass)
    for m in autograd.modules():
        m.__class__ = {ChannelAttn: AutogradChannel, SpatialAttn: AutogradSpatial}.get(type(m), type(m))
    models = {"resnet50": base, "timm cbam": timm.create_model("resnet50", block_args=dict(attn_layer="cbam")),
              "cbam one-pass": one_pass, "cbam autograd": autograd}
    rows = overheads(models, train_first=True, rounds=ROUNDS, repeat=REPEAT, clock=time.process_time)
    return [{**r, "one-pass / timm overhead": r["cbam one-pass overhead"] / r["timm cbam overhead"]} for r in rows]


def backward_alone() -> list[dict]:
    from surgeon.layers.pooled import mean_max

    x = torch.randn(8, 256, 56, 56, requires_grad=True)
    rows = []
    for dims in ([2, 3], [1]):
        ways = {"one-pass": lambda d=dims: mean_max(x, d),
                "autograd": lambda d=dims: (x.mean(d, keepdim=True), x.amax(d, keepdim=True))}
        best = {}
        for _ in range(ROUNDS):
            for name, pool in ways.items():
                mean, peak = pool()
                grads = (torch.randn_like(mean), torch.randn_like(peak))

                def backward(mean=mean, peak=peak, grads=grads):
                    torch.autograd.grad((mean, peak), x, grads, retain_graph=True)

                t, _ = median_time(backward, repeat=REPEAT, clock=time.process_time)
                best[name] = min(best.get(name, float("inf")), t)
        rows.append({"case": f"over dims {dims}", **{f"{k} ms": v * 1e3 for k, v in best.items()},
                     "one-pass / autograd": best["one-pass"] / best["autograd"]})
    return rows


before = load_average()
rows = compare()
report(f"CBAM's pooling backward, resnet50 224x224, CPU time, 1 thread, min of {ROUNDS} interleaved rounds; "
       f"load average {before} before, {load_average()} after", rows)
before = load_average()
rows = backward_alone()
report(f"the pooling's backward alone, 8x256x56x56, CPU time, 1 thread, min of {ROUNDS} interleaved rounds; "
       f"load average {before} before, {load_average()} after", rows)
