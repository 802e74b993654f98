"""Dynamic Capacity Networks on cluttered digits: a cheap coarse network reads the whole canvas, the
entropy of its prediction says where it is unsure, and a fine network (a timm model you name) is spent
only on the k most salient cells; its features replace the coarse ones there before the shared top layers.

1. Data: 40×40 cluttered digits (examples/cluttered_digits.py), a 5×5 grid of 8×8 cells.
2. Train jointly (the paper's objective, on a budget): cross-entropy of the top layers on coarse features and
   on hybrid features (fine on the k salient cells and on random ones, `--train-cells` in all), plus the hint
   loss ||f_coarse − f_fine||² on those cells, which makes the two interchangeable.
3. Evaluate coarse only, fine everywhere, and DCN: saliency = ||∂H(top(f_coarse))/∂f_coarse|| per cell,
   the top-k cells (`surgeon.layers.hard.topk_mask`, the selection dham uses) get fine features; also k
   random cells, to show what the saliency buys. FLOPs per image by `surgeon.surgery.verify.count_flops`
   (the saliency backward pass included).

Paper: Almahairi et al., Dynamic Capacity Networks, ICML 2016 (arXiv:1511.07838).
NOTE: the paper's coarse and fine layers are conv stacks it designs; here the fine network is any model
`surgeon.models.load` builds (1-channel input, D outputs), run on 16×16 patches (a cell with a 4-pixel margin).

Run: .venv/bin/python examples/dcn_digits.py [--fine resnet10t] [--epochs 8] [--k 3]
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from surgeon import models
from surgeon.layers.hard import topk_mask
from surgeon.surgery.verify import count_flops

sys.path.insert(0, str(Path(__file__).parent))
from cluttered_digits import accuracy, batches, cluttered, print_results  # noqa: E402

SIZE, CELL, MARGIN, DIM = 40, 8, 4, 32
GRID = SIZE // CELL
FINE_ARGS = {"resnet10t": {"channels": (16, 32, 64, 128), "stem_width": 8}}


class Coarse(nn.Module):
    """The canvas at half resolution → three small convs (two strided) → D features per 8×8 cell (5×5)."""

    def __init__(self, dim: int = DIM):
        super().__init__()
        layers = []
        for cin, cout, stride in ((1, 16, 1), (16, 32, 2), (32, dim, 2)):
            layers += [nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]
        self.net = nn.Sequential(*layers)

    def forward(self, x):
        return self.net(F.avg_pool2d(x, 2))


class Top(nn.Module):
    """Shared top layers on a D×5×5 grid of cell features."""

    def __init__(self, dim: int = DIM, classes: int = 10):
        super().__init__()
        self.conv = nn.Sequential(nn.Conv2d(dim, 64, 3, padding=1, bias=False), nn.BatchNorm2d(64), nn.ReLU())
        self.fc = nn.Linear(64, classes)

    def forward(self, f):
        return self.fc(self.conv(f).amax((2, 3)))


def patches(x: torch.Tensor) -> torch.Tensor:
    """Every cell with its margin: (N·25, 1, 16, 16), row-major over the grid."""
    p = F.unfold(F.pad(x, (MARGIN,) * 4), CELL + 2 * MARGIN, stride=CELL)  # (N, 256, 25)
    return p.transpose(1, 2).reshape(-1, 1, CELL + 2 * MARGIN, CELL + 2 * MARGIN)


def fine_grid(fine: nn.Module, x: torch.Tensor, cells: torch.Tensor | None = None) -> torch.Tensor:
    """Fine features (N, D, 5, 5) on every cell, or only where the (N, 25) 0/1 mask `cells` is set (zeros elsewhere)."""
    p = patches(x)
    n = x.shape[0]
    if cells is None:
        return fine(p).view(n, GRID * GRID, -1).transpose(1, 2).reshape(n, -1, GRID, GRID)
    idx = cells.flatten().nonzero().squeeze(1)
    out = torch.zeros(n * GRID * GRID, DIM)
    out[idx] = fine(p[idx])
    return out.view(n, GRID * GRID, DIM).transpose(1, 2).reshape(n, DIM, GRID, GRID)


def saliency(top: nn.Module, fc: torch.Tensor) -> torch.Tensor:
    """||∂H/∂f_c|| per cell (N, 25): H the entropy of the coarse prediction."""
    fc = fc.detach().requires_grad_()
    logp = F.log_softmax(top(fc), 1)
    entropy = -(logp.exp() * logp).sum()
    entropy.backward(inputs=[fc])  # (not autograd.grad: FLOP counting's module hooks reject it)
    return fc.grad.norm(dim=1).flatten(1)


def select(top, fc, k, *, random: torch.Generator | None = None, extra: int = 0) -> torch.Tensor:
    """(N, 25) 0/1: the k most salient cells (or k random ones), and `extra` random cells besides."""
    with torch.enable_grad():
        s = saliency(top, fc)
    if random is not None:
        s = torch.rand(s.shape, generator=random)
    cells = topk_mask(s, k)
    if extra:
        cells = torch.maximum(cells, topk_mask(torch.rand(s.shape) - cells, extra))
    return cells


def hybrid(coarse, fine, top, x, k, *, random: torch.Generator | None = None, extra: int = 0):
    """DCN's prediction: fine features at the selected cells, coarse elsewhere; also (f_c, f_f, cells)."""
    fc = coarse(x)
    cells = select(top, fc, k, random=random, extra=extra)
    ff = fine_grid(fine, x, cells)
    mask = cells.view(-1, 1, GRID, GRID)
    return top(fc * (1 - mask) + ff * mask), (fc, ff, mask)



def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--fine", default="resnet10t", help="the fine network: a model reference (default resnet10t)")
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--k", type=int, default=3, help="cells that get fine features (of 25)")
    ap.add_argument("--train-cells", type=int, default=8, help="cells with fine features per training canvas")
    ap.add_argument("--copies", type=int, default=1, help="training canvases per digit")
    ap.add_argument("--limit", type=int, help="digits per split (quick runs)")
    ap.add_argument("--hint", type=float, default=1.0, help="weight of the hint loss")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", action="store_true", help="print the results as JSON")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    train = cluttered("train", size=SIZE, copies=args.copies, limit=args.limit)
    test = cluttered("test", size=SIZE, limit=args.limit)
    torch.manual_seed(args.seed)
    coarse, top = Coarse(), Top()
    fine = models.load(args.fine, model_args={"in_chans": 1, "num_classes": DIM, **FINE_ARGS.get(args.fine, {})})
    params = [*coarse.parameters(), *top.parameters(), *fine.parameters()]
    opt = torch.optim.AdamW(params, lr=2e-3, weight_decay=1e-4)
    steps = args.epochs * -(-len(train["labels"]) // 64)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=max(steps, 1))
    g = torch.Generator().manual_seed(args.seed)
    for m in (coarse, top, fine):
        m.train()
    for epoch in range(args.epochs):
        for idx in batches(len(train["labels"]), 64, generator=g):
            x, y = train["images"][idx], train["labels"][idx]
            logits, (fc, ff, mask) = hybrid(coarse, fine, top, x, args.k, extra=args.train_cells - args.k)
            hint = ((fc - ff.detach()) * mask).square().sum() / (mask.sum() * DIM)
            loss = F.cross_entropy(top(fc), y) + F.cross_entropy(logits, y) + args.hint * hint
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
        print(f"epoch {epoch + 1}: loss {loss.item():.3f}", file=sys.stderr)
    for m in (coarse, top, fine):
        m.eval()

    # FLOPs per image: coarse + top; fine per patch; the saliency's forward and backward through top
    x1 = test["images"][:1]
    f_coarse = count_flops(coarse, (x1,)) + count_flops(top, (coarse(x1),))
    f_patch = count_flops(fine, (patches(x1)[:1],))
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        saliency(top, coarse(x1))
    f_saliency = counter.get_total_flops()
    rnd = torch.Generator().manual_seed(1)
    rows = {
        "coarse only": (accuracy(lambda x: top(coarse(x)), test, 128), f_coarse),
        "fine everywhere": (accuracy(lambda x: top(fine_grid(fine, x)), test, 128), count_flops(top, (coarse(x1),))
                            + GRID * GRID * f_patch),
        f"DCN, fine on the {args.k} most salient cells": (
            accuracy(lambda x: hybrid(coarse, fine, top, x, args.k)[0], test, 128),
            f_coarse + f_saliency + count_flops(top, (coarse(x1),)) + args.k * f_patch),
        f"fine on {args.k} random cells": (
            accuracy(lambda x: hybrid(coarse, fine, top, x, args.k, random=rnd)[0], test, 128),
            f_coarse + f_saliency + count_flops(top, (coarse(x1),)) + args.k * f_patch),
    }
    result = {"fine": args.fine, "k": args.k, "epochs": args.epochs, "test_images": len(test["labels"]),
              "rows": {name: {"accuracy": acc, "mflops": fl / 1e6} for name, (acc, fl) in rows.items()},
              "seconds": round(time.perf_counter() - t0)}
    title = (f"Dynamic Capacity Network on {SIZE}×{SIZE} cluttered digits ({len(test['labels'])} test canvases), "
             f"fine network {args.fine}, {args.epochs} epochs")
    print_results(result, title, as_json=args.json)
    return result


if __name__ == "__main__":
    main()
