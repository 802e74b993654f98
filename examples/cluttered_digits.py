"""Cluttered digits: scikit-learn's 8×8 digits placed at random on a bigger canvas among clutter.

Each canvas (1×S×S, values in [0, 1]) holds one digit scaled ×2 (16×16) at a random place, and `clutter`
fragments (6×6 crops of other digits of the same split) at random places, as in the cluttered MNIST of the
recurrent attention model's paper. Built per split from a fixed seed, so every run sees the same data; another
seed puts the same digits on new canvases (ram_digits and pan_segmentation train on new ones every epoch: 1,438 training
digits are too few canvases to learn from without memorising them).
Used by examples/dcn_digits.py, examples/ram_digits.py and examples/pan_segmentation.py.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from surgeon.data import Digits

DIGIT = 16  # a digit's side on the canvas (8×8 scans, scaled ×2)
FRAGMENT = 6


def cluttered(split: str = "train", *, size: int = 40, clutter: int = 4, copies: int = 1, limit: int | None = None,
              seed: int = 0) -> dict[str, torch.Tensor]:
    """The split's digits on `size`×`size` canvases.

    Args:
        split: 'train' (1,438 digits) or 'test' (359).
        size: canvas side (at least 16).
        clutter: fragments of other digits per canvas.
        copies: canvases per digit (each at another place, with other clutter).
        limit: use the split's first `limit` digits only (quick runs).
        seed: the canvases' seed (the test split adds 10,000).

    Returns:
        {"images": (N, 1, S, S), "labels": (N,), "masks": (N, S, S) long: the digit's class + 1 on its pixels
        (value > 0.25), 0 elsewhere (background and clutter), "boxes": (N, 2) top-left corner (row, col)}.
    """
    if size < DIGIT:
        raise ValueError(f"size must be at least {DIGIT}, got {size}")
    data = Digits(split, limit=limit)
    g = torch.Generator().manual_seed(seed + (0 if split == "train" else 10_000))
    digits = F.interpolate(data.images[:, None], scale_factor=2, mode="bilinear", align_corners=False)[:, 0]
    digits = digits.clamp(0, 1)
    n = len(digits) * copies
    images = torch.zeros(n, 1, size, size)
    masks = torch.zeros(n, size, size, dtype=torch.long)
    labels = data.targets.repeat(copies)
    boxes = torch.zeros(n, 2, dtype=torch.long)
    for i in range(n):
        canvas = images[i, 0]
        for _ in range(clutter):
            other = digits[torch.randint(len(digits), (1,), generator=g).item()]
            r, c = torch.randint(DIGIT - FRAGMENT + 1, (2,), generator=g).tolist()
            y, x = torch.randint(size - FRAGMENT + 1, (2,), generator=g).tolist()
            region = canvas[y:y + FRAGMENT, x:x + FRAGMENT]
            region.copy_(torch.maximum(region, other[r:r + FRAGMENT, c:c + FRAGMENT]))
        digit = digits[i % len(digits)]
        y, x = torch.randint(size - DIGIT + 1, (2,), generator=g).tolist()
        region = canvas[y:y + DIGIT, x:x + DIGIT]
        region.copy_(torch.maximum(region, digit))
        masks[i, y:y + DIGIT, x:x + DIGIT] = torch.where(digit > 0.25, labels[i] + 1, 0)
        boxes[i] = torch.tensor([y, x])
    return {"images": images, "labels": labels, "masks": masks, "boxes": boxes}


def batches(n: int, batch_size: int, *, generator: torch.Generator | None = None):
    """Index batches over n items, shuffled when a generator is given."""
    order = torch.randperm(n, generator=generator) if generator is not None else torch.arange(n)
    for i in range(0, n, batch_size):
        yield order[i:i + batch_size]


def accuracy(predict, data, batch_size: int = 256) -> float:
    """Share of `data`'s canvases whose class `predict` (images -> logits) gets right, without gradients."""
    right = 0
    with torch.no_grad():
        for idx in batches(len(data["labels"]), batch_size):
            right += (predict(data["images"][idx]).argmax(1) == data["labels"][idx]).sum().item()
    return right / len(data["labels"])


def print_results(result: dict, title: str, *, as_json: bool) -> None:
    """The examples' result: JSON, or `title` and a markdown table of accuracy and MFLOPs per row."""
    import json

    if as_json:
        print(json.dumps(result, indent=2))
        return
    print(f"\n{title}\n")
    print("| model | accuracy (%) | MFLOPs / image |")
    print("| --- | ---: | ---: |")
    for name, r in result["rows"].items():
        print(f"| {name} | {100 * r['accuracy']:.1f} | {r['mflops']:.2f} |")
    print(f"\n({result['seconds']} s)")
