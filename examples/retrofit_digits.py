"""Retrofit attention into a trained network and fine-tune it, on real data (CPU, a few minutes).

1. Train a small timm ResNet on the digits training split (scikit-learn's 8×8 handwritten scans,
   resized to 32×32): "the pretrained network". Save it as a user's checkpoint (.pth) and load it back
   through `weights=` (`--weights`).
2. Retrofit CBAM and SE with identity init: held-out accuracy equals the base's exactly.
3. Fine-tune each retrofit for a fixed budget, and the base alone for the same budget from the same
   checkpoint; evaluate on the held-out split, over 3 seeds. Same with init='paper'.
4. Print the table (markdown, ready for the README).
5. Where CBAM's spatial attention looks (identity init, first seed): the share of its attention mass on
   ink pixels of held-out digits, before and after fine-tuning (uniform attention would give the ink's
   share of the image), and maps for a few held-out digits (`surgeon.maps`) in OUT/maps.

Run: .venv/bin/python examples/retrofit_digits.py [--budget 3] [--seeds 0 1 2] [--freeze two-phase] [--out DIR]
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import surgeon
from surgeon import models
from surgeon.pictures import SPATIAL, upsampled
from surgeon.surgery.rewrite import edits_of

MODEL = "resnet10t"
# a narrow resnet10t: quick on a CPU, still a real timm ResNet with BatchNorm and residual blocks
MODEL_ARGS = {"num_classes": 10, "channels": (32, 64, 128, 256), "stem_width": 16}
INPUT_SIZE = (3, 32, 32)
PRETRAIN = {"epochs": 6, "lr": 2e-3, "warmup_epochs": 0.5, "seed": 0}
# the fine-tuning budget: the same for the base and the retrofits
FINETUNE = {"lr": 5e-4, "warmup_epochs": 0.0, "freeze": "none"}
NEW_LR_MULT = 10.0  # the inserted modules start from zero gates; let them move faster
INK = 0.5  # a pixel is ink where the digit's scan (scaled to [0, 1], resized to the input) exceeds this
MAP_DIGITS = 4  # held-out digits drawn by surgeon.maps


def ink_share(model: torch.nn.Module, test) -> tuple[float, float]:
    """(share of spatial attention mass on ink pixels, share of pixels that are ink) over the held-out
    split, averaged over every spatial map of every edit; maps are upsampled to the input first."""
    images = torch.stack([test[i][0] for i in range(len(test))])
    ink = F.interpolate(test.images[:, None], size=images.shape[-2:], mode="bilinear", align_corners=False)[:, 0] > INK
    shares = []
    for cap in surgeon.capture(model, images).values():
        for part in cap.parts.values():
            if part.kind in SPATIAL:
                m = upsampled(part.weights, tuple(images.shape[-2:]))
                shares.append(float(((m * ink).sum((1, 2)) / m.sum((1, 2))).mean()))
    return sum(shares) / len(shares), float(ink.float().mean())


def draw_maps(model: torch.nn.Module, test, folder: Path) -> list[Path]:
    """surgeon.maps for the first MAP_DIGITS held-out digits, written as PNG scans first."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(MAP_DIGITS):
        scan = (test.images[i] * 255).to(torch.uint8).numpy()
        path = folder / f"digit{i}-label{int(test.targets[i])}.png"
        Image.fromarray(scan).resize((64, 64), Image.NEAREST).convert("RGB").save(path)
        paths.append(path)
    return surgeon.maps(model, images=paths, out=folder / "maps")


def fmt(values: list[float], scale: float = 100.0, digits: int = 2) -> str:
    """mean ± std (or the value, when every seed gave the same)."""
    xs = [scale * v for v in values]
    if len(set(xs)) == 1:
        return f"{xs[0]:.{digits}f}"
    return f"{statistics.mean(xs):.{digits}f} ± {statistics.stdev(xs):.{digits}f}"


class Row:
    """One line of the table: held-out accuracy and loss at step 0 and after the budget, per seed."""

    def __init__(self, label: str):
        self.label, self.acc0, self.loss0, self.acc, self.loss = label, [], [], [], []

    def add(self, start: dict, end: dict) -> None:
        self.acc0.append(start["accuracy"])
        self.loss0.append(start["loss"])
        self.acc.append(end["val_acc"])
        self.loss.append(end["val_loss"])

    def cells(self) -> list[str]:
        return [self.label, fmt(self.acc0), fmt(self.acc), fmt(self.loss0, 1, 4), fmt(self.loss, 1, 4)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--budget", type=int, default=3, help="fine-tuning epochs (default 3)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--attentions", nargs="+", default=["cbam", "se"])
    ap.add_argument("--freeze", choices=["none", "base", "two-phase"], default=FINETUNE["freeze"],
                    help="freeze policy for every fine-tuning run (default none)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (small models run best on 1)")
    ap.add_argument("--out", type=Path, help="working folder (default: a temporary one)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    FINETUNE["freeze"] = args.freeze
    work = args.out or Path(tempfile.mkdtemp(prefix="retrofit-digits-"))
    work.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()

    # 1. The pretrained network, saved as a user's checkpoint and loaded back through weights=.
    ckpt = work / "pretrained.pth"
    base = models.load(MODEL, model_args=MODEL_ARGS)
    train, test = surgeon.data.resolve("digits", base, input_size=INPUT_SIZE)
    print(f"{MODEL} {MODEL_ARGS}, input {INPUT_SIZE}; digits: {len(train)} training, {len(test)} held-out images")
    torch.manual_seed(PRETRAIN["seed"])
    base = models.load(MODEL, model_args=MODEL_ARGS)
    run = surgeon.finetune(base, train, test, epochs=PRETRAIN["epochs"], lr=PRETRAIN["lr"],
                           warmup_epochs=PRETRAIN["warmup_epochs"], seed=PRETRAIN["seed"], progress=False)
    torch.save({"state_dict": run.model.state_dict()}, ckpt)
    print(f"pretrained {PRETRAIN['epochs']} epochs: held-out accuracy {100 * run.last['val_acc']:.2f}% -> {ckpt}")

    def pretrained():
        return models.load(MODEL, model_args=MODEL_ARGS, weights=ckpt)

    base_eval = surgeon.evaluate(pretrained(), test)
    rows: list[Row] = []
    looks: dict[str, tuple] = {}  # where the first identity retrofit looks, before and after fine-tuning

    # 3a. The base alone, fine-tuned for the budget.
    row = Row("base (no attention)")
    for seed in args.seeds:
        r = surgeon.finetune(pretrained(), train, test, epochs=args.budget, seed=seed, progress=False, **FINETUNE)
        row.add(base_eval, r.last)
    rows.append(row)
    print(f"base: {fmt(row.acc0)}% -> {fmt(row.acc)}% after {args.budget} epochs")

    # 2 + 3b. Each retrofit, identity and paper init.
    for name in args.attentions:
        for init in ("identity", "paper"):
            row = Row(f"+ {name} ({init} init)")
            for seed in args.seeds:
                torch.manual_seed(seed)  # the inserted modules' own initialisation
                patched = surgeon.add(pretrained(), name, init=init, input_size=INPUT_SIZE)
                start = surgeon.evaluate(patched, test)
                if init == "identity" and start["accuracy"] != base_eval["accuracy"]:
                    raise SystemExit(f"{name}: identity init changed the accuracy ({start} vs {base_eval})")
                first = init == "identity" and seed == args.seeds[0] and not looks and _has_spatial(patched)
                before = ink_share(patched, test) if first else None
                r = surgeon.finetune(patched, train, test, epochs=args.budget, seed=seed, progress=False,
                                     new_lr_mult=NEW_LR_MULT, **FINETUNE)
                row.add(start, r.last)
                if before is not None:
                    looks[name] = (before, ink_share(r.model, test), r.last["gates"],
                                   draw_maps(r.model, test, work / f"{name}-maps"))
            row.label += f", +{sum(e['params'] for e in edits_of(patched)):,} params"
            rows.append(row)
            print(f"{name} {init}: {fmt(row.acc0)}% at step 0 -> {fmt(row.acc)}% after {args.budget} epochs")

    # 4. The table.
    print()
    print(f"Held-out accuracy (%) and loss on digits ({len(test)} images), {MODEL} pretrained "
          f"{PRETRAIN['epochs']} epochs; "
          f"budget {args.budget} epochs (AdamW lr {FINETUNE['lr']:g}, cosine, freeze {FINETUNE['freeze']}, "
          f"new modules x{NEW_LR_MULT:g}); mean ± std over seeds {args.seeds}")
    print()
    print(f"| model | accuracy, step 0 | accuracy, +{args.budget} epochs | loss, step 0 | "
          f"loss, +{args.budget} epochs |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for row in rows:
        print("| " + " | ".join(row.cells()) + " |")
    for name, (before, after, gates, written) in looks.items():
        print(f"\nWhere {name}'s spatial attention looks (identity init, seed {args.seeds[0]}; held-out digits, "
              f"{100 * before[1]:.1f}% of pixels are ink): {100 * before[0]:.1f}% of its mass on ink before "
              f"fine-tuning, {100 * after[0]:.1f}% after {args.budget} epochs")
        print("mean |γ| per edit after fine-tuning: " + ", ".join(f"{s} {g['gamma']:.3f}" for s, g in gates.items()))
        print(f"maps: {written[0].parent} ({len(written)} pictures, e.g. {written[-1].name})")
    print(f"\n({time.perf_counter() - t_start:.0f} s; checkpoint in {work})")


def _has_spatial(model: torch.nn.Module) -> bool:
    return any(p.kind in SPATIAL for c in surgeon.capture(model).values() for p in c.parts.values())


if __name__ == "__main__":
    main()
