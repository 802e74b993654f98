"""The recurrent attention model on cluttered digits: a recurrent network looks at a few small glimpses
(multi-resolution patches at locations it picks), never the whole canvas at full resolution, and is trained
with REINFORCE for where to look and backpropagation for what it sees.

1. Data: 40×40 cluttered digits (examples/cluttered_digits.py), new canvases of the training digits every epoch.
2. RAM: glimpse sensor (`scales` patches of side `glimpse`·2^i around l, resampled to `glimpse`², stacked as
   channels) → glimpse network (the base model you name, e.g. a timm resnet, on the patch stack; plus an
   embedding of l) → GRU core → location policy N(tanh(W·h), σ²); a classifier reads the core's state.
   Loss: cross-entropy after every glimpse + REINFORCE for the locations (`ram_loss`).
3. For comparison the same base model on the whole canvas, trained on the same canvases.
4. Accuracy and FLOPs per image (`surgeon.surgery.verify.count_flops`); also the same RAM with random glimpse
   locations, which measures what the learned policy adds.

Paper: Mnih et al., Recurrent Models of Visual Attention, NeurIPS 2014 (arXiv:1406.6247).
NOTE: where this differs from the paper, and why (measured on this task: 6 glimpses, 30 epochs):
- The glimpse network is the base model `surgeon.models.load` builds, the core a GRU cell (paper: two linear
  layers, a plain RNN or LSTM). Its BatchNorm uses batch statistics in training (each glimpse step its own
  batch) and running statistics, pooled over the steps, in evaluation: kept in eval mode from init instead,
  the network is never normalised and barely learns (16-px glimpses, 2 scales: 29.5% vs 59.6%).
- Glimpses of 16 px, not 8: timm's resnets shrink 8×8 to 1×1 after the stem (8 px at 3 scales: 20.3%, 16 px at
  2 scales: 59.6%).
- Rewards per glimpse: the reward of the location chosen after glimpse t is the gain in log p(right class) from
  glimpse t to t+1, and log p after glimpse t is its baseline; the paper's reward, 1 at the end when the class
  is right, with a learned baseline, made the policy worse than random locations here (59.6%; trained and
  tested at random locations: 62.4%; per-glimpse rewards: 65.5%). The classifier is trained after every
  glimpse (paper: after the last).
- Training canvases change every epoch: on 1,438 fixed canvases RAM memorises them (train 60%, test 41%).
Evaluation uses the policy's mean locations (no sampling).

Run: .venv/bin/python examples/ram_digits.py [--base resnet10t] [--epochs 60] [--glimpses 3] [--threads 1]
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
from surgeon.surgery.verify import count_flops

sys.path.insert(0, str(Path(__file__).parent))
from cluttered_digits import accuracy, batches, cluttered, print_results  # noqa: E402

SIZE = 40
BASE_ARGS = {"resnet10t": {"channels": (16, 32, 64, 128), "stem_width": 8}}


def glimpse(x: torch.Tensor, loc: torch.Tensor, size: int, scales: int) -> torch.Tensor:
    """(N, scales, size, size): square patches of side size·2^i centred at loc ∈ [-1, 1]² (x, y), resampled."""
    n, _, h, w = x.shape
    out = []
    for i in range(scales):
        s = size * 2 ** i
        theta = torch.zeros(n, 2, 3)
        theta[:, 0, 0], theta[:, 1, 1] = s / w, s / h
        theta[:, :, 2] = loc
        grid = F.affine_grid(theta, (n, 1, size, size), align_corners=False)
        out.append(F.grid_sample(x, grid, align_corners=False, padding_mode="zeros"))
    return torch.cat(out, 1)


class RAM(nn.Module):
    def __init__(self, encoder: nn.Module, *, features: int, hidden: int = 128, glimpse_size: int = 16,
                 scales: int = 3, glimpses: int = 6, std: float = 0.15, classes: int = 10):
        super().__init__()
        self.encoder, self.size, self.scales, self.steps, self.std = encoder, glimpse_size, scales, glimpses, std
        self.where = nn.Linear(2, features)
        self.merge = nn.Linear(2 * features, hidden)
        self.core = nn.GRUCell(hidden, hidden)
        self.locate = nn.Linear(hidden, 2)
        self.classify = nn.Linear(hidden, classes)

    def forward(self, x: torch.Tensor, *, sample: bool = False, random: torch.Generator | None = None):
        """Class logits after the last glimpse. With `sample` (training): the logits after every glimpse
        (N, T, classes) and the log-probabilities of the sampled locations (N, T-1). With `random`: every
        glimpse after the first at a uniform random location (the policy unused)."""
        n = x.shape[0]
        h = x.new_zeros(n, self.core.hidden_size)
        loc = x.new_zeros(n, 2)
        hs, logps = [], []
        for t in range(self.steps):
            what = self.encoder(glimpse(x, loc, self.size, self.scales))
            g = F.relu(self.merge(torch.cat([what, F.relu(self.where(loc))], 1)))
            h = self.core(g, h)
            hs.append(h)
            if t == self.steps - 1:
                break
            mean = torch.tanh(self.locate(h.detach()))
            if random is not None:
                loc = torch.rand(n, 2, generator=random) * 2 - 1
            elif sample:
                loc = (mean + self.std * torch.randn_like(mean)).clamp(-1, 1).detach()
                logps.append(torch.distributions.Normal(mean, self.std).log_prob(loc).sum(1))
            else:
                loc = mean
        if sample:
            return self.classify(torch.stack(hs, 1)), torch.stack(logps, 1)
        return self.classify(h)


def ram_loss(ram: RAM, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Cross-entropy after every glimpse, plus REINFORCE for the locations: the reward of the location chosen
    after glimpse t is what the glimpse there adds to log p(right class), log p after glimpse t+1 minus log p
    after glimpse t (the latter, which the location cannot change, is the baseline)."""
    logits, logp = ram(x, sample=True)
    right = F.log_softmax(logits, 2).gather(2, y[:, None, None].expand(-1, logits.shape[1], 1)).squeeze(2)
    gain = (right[:, 1:] - right[:, :-1]).detach()
    return -right.mean() - (logp * gain).sum(1).mean()


def _train(model, loss_fn, epochs, seed, *, copies, limit, same, lr=2e-3):
    """AdamW, one-cycle schedule, batches of 64; every epoch on new canvases unless `same`."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    sched = None
    g = torch.Generator().manual_seed(seed)
    model.train()
    for epoch in range(epochs):
        train = cluttered("train", size=SIZE, copies=copies, limit=limit, seed=0 if same else epoch)
        if sched is None:
            steps = epochs * -(-len(train["labels"]) // 64)
            sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps)
        for idx in batches(len(train["labels"]), 64, generator=g):
            loss = loss_fn(train["images"][idx], train["labels"][idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
        print(f"epoch {epoch + 1}: loss {loss.item():.3f}", file=sys.stderr)
    model.eval()


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", default="resnet10t", help="the glimpse network: a model reference (default resnet10t)")
    ap.add_argument("--epochs", type=int, default=60)
    ap.add_argument("--glimpses", type=int, default=3)
    ap.add_argument("--glimpse-size", type=int, default=16, help="a glimpse's side in pixels (each scale doubles it)")
    ap.add_argument("--scales", type=int, default=3)
    ap.add_argument("--copies", type=int, default=1, help="training canvases per digit and epoch")
    ap.add_argument("--same-canvases", action="store_true",
                    help="train on the same canvases every epoch (default: new canvases every epoch)")
    ap.add_argument("--limit", type=int, help="digits per split (quick runs)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", action="store_true", help="print the results as JSON")
    args = ap.parse_args(argv)
    for flag, value, least in (("--glimpses", args.glimpses, 2), ("--glimpse-size", args.glimpse_size, 1),
                               ("--scales", args.scales, 1), ("--epochs", args.epochs, 1)):
        if value < least:
            ap.error(f"{flag} must be at least {least}, got {value}")
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    test = cluttered("test", size=SIZE, limit=args.limit)
    extra = BASE_ARGS.get(args.base, {})
    data = {"copies": args.copies, "limit": args.limit, "same": args.same_canvases}

    # 2. RAM
    torch.manual_seed(args.seed)
    features = 64
    ram = RAM(models.load(args.base, model_args={"in_chans": args.scales, "num_classes": features, **extra}),
              features=features, glimpse_size=args.glimpse_size, scales=args.scales, glimpses=args.glimpses)
    _train(ram, lambda x, y: ram_loss(ram, x, y), args.epochs, args.seed, **data)

    # 3. the base model on the whole canvas
    torch.manual_seed(args.seed)
    full = models.load(args.base, model_args={"in_chans": 1, "num_classes": 10, **extra})
    _train(full, lambda x, y: F.cross_entropy(full(x), y), args.epochs, args.seed, **data)

    # 4. numbers
    x1 = test["images"][:1]
    side = f"{args.scales}×{args.glimpse_size}×{args.glimpse_size}"
    rnd = torch.Generator().manual_seed(1)
    f_ram = count_flops(ram, (x1,))
    rows = {f"RAM, {args.glimpses} glimpses of {side} ({args.base}), learned locations": (accuracy(ram, test), f_ram),
            "the same RAM, random locations": (accuracy(lambda x: ram(x, random=rnd), test), f_ram),
            f"{args.base} on the whole {SIZE}×{SIZE} canvas": (accuracy(full, test), count_flops(full, (x1,)))}
    result = {"base": args.base, "glimpses": args.glimpses, "glimpse_size": args.glimpse_size, "scales": args.scales,
              "epochs": args.epochs, "test_images": len(test["labels"]),
              "rows": {name: {"accuracy": acc, "mflops": fl / 1e6} for name, (acc, fl) in rows.items()},
              "seconds": round(time.perf_counter() - t0)}
    canvases = "the same canvases every epoch" if args.same_canvases else "new canvases every epoch"
    title = (f"Recurrent attention model on {SIZE}×{SIZE} cluttered digits ({len(test['labels'])} test canvases), "
             f"{args.epochs} epochs on {canvases}")
    print_results(result, title, as_json=args.json)
    return result


if __name__ == "__main__":
    main()
