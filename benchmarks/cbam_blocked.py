"""Whether CBAM's eval forward gains from working on cache-sized pieces of the map: resnet50 with `cbam --init
paper` as surgeon builds it, the same model whose CBAMs run a blocked forward, and timm's CBAM resnet50; each
one's overhead over resnet50 in eval (no autograd) at batch 1 and 8.

The blocked forward pools the channels piece by piece (the max then reads what the mean just read), and writes
the channel-weighted map piece by piece, taking its spatial mean and max from each piece while it is in the
cache: three reads and two writes of the map where surgeon's CBAM makes six reads and two writes. PIECES sets the
piece sizes tried, in KiB of the map. An experiment kept for its answer (README: "Speed"), not surgeon's code.

Side by side in one process, interleaved rounds, the minimum of each round's median; CPU time on one thread.
ROUNDS and REPEAT set the effort.
"""
import copy
import os
import time
import types
import warnings

import timm
import torch

import surgeon
from _common import load_average, report, side_by_side
from surgeon.layers.mixed import CBAM

warnings.filterwarnings("ignore", category=UserWarning)
torch.set_num_threads(1)
ROUNDS, REPEAT = int(os.environ.get("ROUNDS", 3)), int(os.environ.get("REPEAT", 3))
PIECES = [int(k) for k in os.environ.get("PIECES", "64,256,1024").split(",")]


def blocked_forward(piece_bytes: int):
    """CBAM's eval forward on (N, C, H, W) maps in pieces of about `piece_bytes` (same result as CBAM.forward)."""
    def forward(self, x):
        ch, sp = self.channel, self.spatial
        n, c, h, w = x.shape
        per_channel, per_row = h * w * x.element_size(), c * w * x.element_size()
        cb, rb = max(1, min(c, piece_bytes // per_channel)), max(1, min(h, piece_bytes // per_row))
        mean, peak = x.new_empty(n, c), x.new_empty(n, c)
        for i in range(n):
            for c0 in range(0, c, cb):
                torch.mean(x[i, c0:c0 + cb], (1, 2), out=mean[i, c0:c0 + cb])
                torch.amax(x[i, c0:c0 + cb], (1, 2), out=peak[i, c0:c0 + cb])
        mlp = lambda s: ch.fc2(ch.act(ch.fc1(s)))  # noqa: E731
        weights = ch.weights(ch.gate(mlp(mean) + mlp(peak))).view(n, c, 1, 1)
        y, maps = torch.empty_like(x), x.new_empty(n, 2, h, w)
        for i in range(n):
            for r0 in range(0, h, rb):
                piece = y[i, :, r0:r0 + rb]
                torch.mul(x[i, :, r0:r0 + rb], weights[i], out=piece)
                torch.amax(piece, 0, keepdim=True, out=maps[i, 0:1, r0:r0 + rb])
                torch.mean(piece, 0, keepdim=True, out=maps[i, 1:2, r0:r0 + rb])
        return y.mul_(sp.weights(sp.gate(sp.bn(sp.conv(maps)))))
    return forward


def compare() -> list[dict]:
    base = timm.create_model("resnet50").eval()
    patched = surgeon.add(base, "cbam", init="paper", input_size=(3, 224, 224), verify=False)
    models = {"resnet50": base, "timm cbam": timm.create_model("resnet50", block_args=dict(attn_layer="cbam")),
              "surgeon cbam": patched}
    x = torch.randn(2, 3, 224, 224)
    for kib in PIECES:
        blocked = copy.deepcopy(patched)
        for m in blocked.modules():
            if isinstance(m, CBAM):
                m.forward = types.MethodType(blocked_forward(kib * 1024), m)
        with torch.no_grad():  # the same computation: equal outputs
            assert torch.equal(blocked.eval()(x), patched.eval()(x)), "the blocked forward computes something else"
        models[f"blocked {kib} KiB"] = blocked
    rows = []
    for batch in (1, 8):
        times = side_by_side(models, torch.randn(batch, 3, 224, 224), train=False, rounds=ROUNDS, repeat=REPEAT,
                             clock=time.process_time)
        over = {k: t / times["resnet50"] - 1 for k, t in times.items() if k != "resnet50"}
        rows.append({"case": f"b{batch} eval", **{f"{k} overhead": v for k, v in over.items()},
                     **{f"{k} / timm": v / over["timm cbam"] for k, v in over.items() if k != "timm cbam"}})
    return rows


before = load_average()
rows = compare()
report(f"CBAM in eval, blocked forward vs surgeon's vs timm's, overhead over resnet50 at 224x224; CPU time, one "
       f"thread, min of {ROUNDS} interleaved rounds; load average {before} before, {load_average()} after", rows)
