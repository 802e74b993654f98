"""The recurrent attention model on cluttered digits: a recurrent network looks at a few small glimpses
(multi-resolution patches at locations it picks), never the whole canvas, and is trained with REINFORCE
for where to look and backpropagation for what it sees.

1. Data: 40×40 cluttered digits (examples/cluttered_digits.py).
2. RAM: glimpse sensor (`scales` patches of side `glimpse`·2^i around l, resampled to `glimpse`², stacked as
   channels) → glimpse network (the base model you name, e.g. a timm resnet, on the patch stack; plus an
   embedding of l) → GRU core → location policy N(tanh(W·h), σ²) and a reward baseline; after T glimpses a
   classifier. Loss: cross-entropy + REINFORCE (reward 1 when the class is right, minus the baseline) + the
   baseline's squared error.
3. For comparison the same base model on the whole canvas, trained for the same epochs.
4. Accuracy and FLOPs per image (`surgeon.surgery.verify.count_flops`) of both.

Paper: Mnih et al., Recurrent Models of Visual Attention, NeurIPS 2014 (arXiv:1406.6247).
NOTE: the paper's glimpse network is two linear layers and its core a plain RNN or LSTM; here the glimpse
network is the base model `surgeon.models.load` builds and the core a GRU cell. Evaluation uses the policy's
mean locations (no sampling).

Run: .venv/bin/python examples/ram_digits.py [--base resnet10t] [--epochs 10] [--glimpses 6]
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
    def __init__(self, encoder: nn.Module, *, features: int, hidden: int = 128, glimpse_size: int = 8,
                 scales: int = 3, glimpses: int = 6, std: float = 0.15, classes: int = 10):
        super().__init__()
        self.encoder, self.size, self.scales, self.steps, self.std = encoder, glimpse_size, scales, glimpses, std
        self.where = nn.Linear(2, features)
        self.merge = nn.Linear(2 * features, hidden)
        self.core = nn.GRUCell(hidden, hidden)
        self.locate = nn.Linear(hidden, 2)
        self.baseline = nn.Linear(hidden, 1)
        self.classify = nn.Linear(hidden, classes)

    def train(self, mode: bool = True):
        """BatchNorm in the glimpse network stays in eval mode: each glimpse step is its own batch, so batch
        statistics would normalise every step separately, which running statistics cannot reproduce."""
        super().train(mode)
        for m in self.encoder.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.eval()
        return self

    def forward(self, x: torch.Tensor, *, sample: bool = False):
        """Class logits; with `sample`, also the log-probabilities of the sampled locations and the
        baselines, (N, T) each."""
        n = x.shape[0]
        h = x.new_zeros(n, self.core.hidden_size)
        loc = x.new_zeros(n, 2)
        logps, bases = [], []
        for _ in range(self.steps):
            what = self.encoder(glimpse(x, loc, self.size, self.scales))
            g = F.relu(self.merge(torch.cat([what, F.relu(self.where(loc))], 1)))
            h = self.core(g, h)
            mean = torch.tanh(self.locate(h.detach()))
            if sample:
                loc = (mean + self.std * torch.randn_like(mean)).clamp(-1, 1).detach()
                logps.append(torch.distributions.Normal(mean, self.std).log_prob(loc).sum(1))
                bases.append(self.baseline(h.detach()).squeeze(1))
            else:
                loc = mean
        logits = self.classify(h)
        return (logits, torch.stack(logps, 1), torch.stack(bases, 1)) if sample else logits



def _train(model, train, loss_fn, epochs, seed, lr=2e-3):
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    steps = max(epochs * -(-len(train["labels"]) // 64), 1)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps)
    g = torch.Generator().manual_seed(seed)
    model.train()
    for epoch in range(epochs):
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
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--glimpses", type=int, default=6)
    ap.add_argument("--copies", type=int, default=1, help="training canvases per digit")
    ap.add_argument("--limit", type=int, help="digits per split (quick runs)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", action="store_true", help="print the results as JSON")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    train = cluttered("train", size=SIZE, copies=args.copies, limit=args.limit)
    test = cluttered("test", size=SIZE, limit=args.limit)
    extra = BASE_ARGS.get(args.base, {})

    # 2. RAM
    torch.manual_seed(args.seed)
    features = 64
    ram = RAM(models.load(args.base, model_args={"in_chans": 3, "num_classes": features, **extra}),
              features=features, glimpses=args.glimpses)

    def ram_loss(x, y):
        logits, logp, base = ram(x, sample=True)
        reward = (logits.argmax(1) == y).float()[:, None]
        reinforce = -(logp * (reward - base).detach()).sum(1).mean()
        return F.cross_entropy(logits, y) + reinforce + F.mse_loss(base, reward.expand_as(base))

    _train(ram, train, ram_loss, args.epochs, args.seed)

    # 3. the base model on the whole canvas
    torch.manual_seed(args.seed)
    full = models.load(args.base, model_args={"in_chans": 1, "num_classes": 10, **extra})
    _train(full, train, lambda x, y: F.cross_entropy(full(x), y), args.epochs, args.seed)

    # 4. numbers
    x1 = test["images"][:1]
    rows = {f"RAM, {args.glimpses} glimpses of 3×8×8 ({args.base})": (accuracy(ram, test), count_flops(ram, (x1,))),
            f"{args.base} on the whole 40×40 canvas": (accuracy(full, test), count_flops(full, (x1,)))}
    result = {"base": args.base, "glimpses": args.glimpses, "epochs": args.epochs, "test_images": len(test["labels"]),
              "rows": {name: {"accuracy": acc, "mflops": fl / 1e6} for name, (acc, fl) in rows.items()},
              "seconds": round(time.perf_counter() - t0)}
    title = (f"Recurrent attention model on {SIZE}×{SIZE} cluttered digits ({len(test['labels'])} test canvases), "
             f"{args.epochs} epochs")
    print_results(result, title, as_json=args.json)
    return result


if __name__ == "__main__":
    main()
