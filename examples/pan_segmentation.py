"""PAN's attentions retrofitted into a trained U-Net: segment the digit (its class per pixel) among clutter.

1. Data: 40×40 cluttered digits (examples/cluttered_digits.py), new canvases of the training digits every
   epoch; per pixel 11 classes: background (and clutter) or the digit's class on its strokes.
2. Train a small segmentation_models_pytorch U-Net (timm's resnet10t encoder, 3 levels, no pretrained weights):
   "the trained network".
3. Retrofit Feature Pyramid Attention after its last stage (kind `last`) and Global Attention Upsample on its
   skips (kind `skip`), identity init: the output is the trained network's exactly.
4. Fine-tune the retrofit and, for the same budget from the same weights, the U-Net alone; report mean IoU
   over the 11 classes and the digit pixels' accuracy on the test canvases, with the parameters and FLOPs added.
   Both fine-tunes see the same canvases in the same order.

Paper: Li et al., Pyramid Attention Network for Semantic Segmentation, BMVC 2018 (arXiv:1805.10180).

Run: .venv/bin/python examples/pan_segmentation.py [--epochs 20] [--budget 10] [--threads 1]
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import segmentation_models_pytorch as smp
import torch
import torch.nn.functional as F

import surgeon
from surgeon.surgery.verify import count_flops

sys.path.insert(0, str(Path(__file__).parent))
from cluttered_digits import batches, cluttered  # noqa: E402

SIZE, CLASSES = 40, 11


def unet() -> torch.nn.Module:
    return smp.Unet("tu-resnet10t", encoder_weights=None, encoder_depth=3, decoder_channels=(32, 16, 8),
                    in_channels=1, classes=CLASSES)


def train(model, epochs, seed, lr=3e-3, *, start=0, limit=None):
    """Train for `epochs` epochs with AdamW and a one-cycle schedule; epoch e on new canvases (seed start + e)."""
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=1e-4)
    sched = None
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model.train()
    for epoch in range(epochs):
        data = cluttered("train", size=SIZE, limit=limit, seed=start + epoch)
        if sched is None:
            steps = epochs * -(-len(data["labels"]) // 32)
            sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps)
        for idx in batches(len(data["labels"]), 32, generator=g):
            loss = F.cross_entropy(model(data["images"][idx]), data["masks"][idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
        print(f"epoch {epoch + 1}: loss {loss.item():.3f}", file=sys.stderr)
    return model.eval()


def evaluate(model, data) -> dict:
    """Mean IoU over the classes present, and the accuracy on the digit's pixels."""
    inter, union = torch.zeros(CLASSES), torch.zeros(CLASSES)
    right = total = 0
    with torch.no_grad():
        for idx in batches(len(data["labels"]), 128):
            pred, true = model(data["images"][idx]).argmax(1), data["masks"][idx]
            for c in range(CLASSES):
                inter[c] += ((pred == c) & (true == c)).sum()
                union[c] += ((pred == c) | (true == c)).sum()
            fg = true > 0
            right += (pred[fg] == true[fg]).sum().item()
            total += fg.sum().item()
    present = union > 0
    return {"miou": (inter[present] / union[present]).mean().item(), "digit_pixel_acc": right / max(total, 1)}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=20, help="training epochs of the U-Net")
    ap.add_argument("--budget", type=int, default=10, help="fine-tuning epochs, the same for both")
    ap.add_argument("--limit", type=int, help="digits per split (quick runs)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", action="store_true", help="print the results as JSON")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    test = cluttered("test", size=SIZE, limit=args.limit)
    x1 = test["images"][:1]

    # 2. the trained network
    torch.manual_seed(args.seed)
    trained = train(unet(), args.epochs, args.seed, limit=args.limit)
    before = evaluate(trained, test)

    # 3. retrofit fpa + gau, identity init
    patched = surgeon.add(copy.deepcopy(trained), "fpa", kind="last", example_input=test["images"][:2])
    patched = surgeon.add(patched, "gau", kind="skip", example_input=test["images"][:2])
    with torch.no_grad():
        diff = (patched(test["images"][:64]) - trained(test["images"][:64])).abs().max().item()
    if diff > 1e-5:
        raise SystemExit(f"identity init changed the output by {diff}")
    edits = surgeon.edits(patched)

    # 4. the same budget for both
    base = train(copy.deepcopy(trained), args.budget, args.seed, lr=5e-4, start=args.epochs, limit=args.limit)
    pan = train(patched, args.budget, args.seed, lr=5e-4, start=args.epochs, limit=args.limit)
    rows = {"U-Net, trained": (before, trained, 0),
            f"U-Net, +{args.budget} epochs": (evaluate(base, test), base, 0),
            f"U-Net + fpa + gau (identity init), +{args.budget} epochs": (evaluate(pan, test), pan, len(edits))}
    base_params = sum(p.numel() for p in trained.parameters())
    result = {"epochs": args.epochs, "budget": args.budget, "test_images": len(test["labels"]),
              "identity_max_diff": diff, "sites": [f"{e.site} ({e.attention})" for e in edits],
              "rows": {name: {**r, "params": sum(p.numel() for p in m.parameters()),
                              "mflops": count_flops(m, (x1,)) / 1e6} for name, (r, m, _) in rows.items()},
              "seconds": 0}
    result["seconds"] = round(time.perf_counter() - t0)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(f"\nPAN's attentions in a U-Net on {SIZE}×{SIZE} cluttered digits ({len(test['labels'])} test canvases; "
              f"identity init max |diff| {diff:.1e}; sites {', '.join(result['sites'])})\n")
        print("| model | mean IoU (%) | digit pixels (%) | params | MFLOPs / image |")
        print("| --- | ---: | ---: | ---: | ---: |")
        for name, r in result["rows"].items():
            extra = f" (+{r['params'] - base_params:,})" if r["params"] != base_params else ""
            print(f"| {name} | {100 * r['miou']:.1f} | {100 * r['digit_pixel_acc']:.1f} | {r['params']:,}{extra} | "
                  f"{r['mflops']:.1f} |")
        print(f"\n({result['seconds']} s)")
    return result


if __name__ == "__main__":
    main()
