"""Classification data for fine-tuning: image folders and a built-in dataset that needs no download.

- `image_folder(PATH)`: the class-per-subfolder layout (torchvision ImageFolder), preprocessed as the
  model's own config says (timm `resolve_data_config` / `create_transform`).
- `digits()`: scikit-learn's handwritten digits (1,797 real 8×8 grey scans, 10 classes), as 3-channel
  images resized to the model's input and normalised with its mean/std; a fixed stratified split.
- `resolve(spec, model)`: what `--data` names ('digits' or a folder) as (train, val) datasets.
Any PyTorch Dataset or DataLoader of (image, label) works through the API as well.
"""
from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from torch.utils.data import Dataset

from surgeon.errors import DataError
from surgeon.training.record import input_size_of

log = logging.getLogger("surgeon")

DIGITS = "digits"
SPLITS = ("train", "test")
# sub-folders that mark a dataset root holding its own splits: PATH/train/CLASS/..., PATH/val/CLASS/...
TRAIN_DIRS = ("train", "training")
VAL_DIRS = ("val", "validation", "valid", "test")
DIGITS_TEST_FRACTION = 0.2
DIGITS_SPLIT_SEED = 0
DEFAULT_INPUT_SIZE = (3, 224, 224)


# -- preprocessing -----------------------------------------------------------------------------------
def data_config(model=None, *, input_size: Sequence[int] | None = None) -> dict[str, Any]:
    """The model's preprocessing: input_size, mean, std, interpolation, crop_pct (timm data config).

    Order for the input size: `input_size`; the surgery record (a patched model's `--input-size`);
    timm's `pretrained_cfg`; 3×224×224.
    """
    from timm.data import resolve_data_config

    cfg = (resolve_data_config({}, model=model) if model is not None
           else resolve_data_config({"input_size": DEFAULT_INPUT_SIZE}))
    size = input_size or input_size_of(model)
    if size:
        size = tuple(int(d) for d in size)
        if len(size) != 3 or any(d <= 0 for d in size):
            raise DataError(f"input size {size} must be C,H,W for images, e.g. 3,224,224")
        cfg["input_size"] = size
    return cfg


# -- digits ------------------------------------------------------------------------------------------
def _load_digits():
    try:
        from sklearn.datasets import load_digits
    except ImportError as exc:
        raise DataError("The 'digits' dataset needs scikit-learn: pip install 'surgeon[finetune]'") from exc
    return load_digits()


class Digits(Dataset):
    """scikit-learn's handwritten digits as a classification Dataset of (C×H×W float tensor, label).

    The 8×8 scans (values 0-16) are scaled to [0, 1], repeated over the model's channels, resized
    (bilinear) to its input size and normalised with its mean and std. The split is stratified and
    fixed (20% test, seed 0), so every run sees the same held-out images.

    Args:
        split: 'train' (1,438 images) or 'test' (359).
        config: a data config (`data_config(model)`); default 3×224×224, ImageNet mean/std.
        limit: keep only the first `limit` images of the split (for quick tests).
    """

    classes = [str(d) for d in range(10)]

    def __init__(self, split: str = "train", *, config: dict[str, Any] | None = None, limit: int | None = None):
        import numpy as np
        import torch

        if split not in SPLITS:
            raise DataError(f"Unknown digits split {split!r}; valid: {', '.join(SPLITS)}")
        raw = _load_digits()
        labels = np.asarray(raw.target)
        rng = np.random.default_rng(DIGITS_SPLIT_SEED)
        test = np.zeros(len(labels), dtype=bool)
        for c in range(10):  # stratified: the same share of every class is held out
            idx = np.flatnonzero(labels == c)
            test[rng.permutation(idx)[: round(len(idx) * DIGITS_TEST_FRACTION)]] = True
        keep = np.flatnonzero(test if split == "test" else ~test)
        if limit is not None:
            keep = keep[:limit]
        cfg = config or data_config()
        self.split = split
        self.input_size = tuple(cfg["input_size"])
        self.images = torch.tensor(raw.images[keep], dtype=torch.float32) / 16.0  # N×8×8 in [0, 1]
        self.targets = torch.tensor(labels[keep], dtype=torch.long)
        c = self.input_size[0]
        self._mean = torch.tensor(_per_channel(cfg["mean"], c)).view(c, 1, 1)
        self._std = torch.tensor(_per_channel(cfg["std"], c)).view(c, 1, 1)

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i: int):
        import torch.nn.functional as F

        c, h, w = self.input_size
        x = self.images[i].view(1, 1, 8, 8)
        x = F.interpolate(x, size=(h, w), mode="bilinear", align_corners=False)[0].expand(c, h, w)
        return (x - self._mean) / self._std, self.targets[i]

    def __repr__(self) -> str:
        return f"Digits(split={self.split!r}, images={len(self)}, input_size={self.input_size})"


def _per_channel(values: Sequence[float], channels: int) -> list[float]:
    values = list(values)
    if len(values) == channels:
        return values
    return [sum(values) / len(values)] * channels


def digits(split: str = "train", *, model=None, input_size: Sequence[int] | None = None,
           limit: int | None = None) -> Digits:
    """scikit-learn's digits, preprocessed for `model` (see `Digits`).

    Example:
        >>> train, test = digits("train", model=m, input_size=(3, 32, 32)), digits("test", model=m)
    """
    return Digits(split, config=data_config(model, input_size=input_size), limit=limit)


# -- image folders -----------------------------------------------------------------------------------
def _class_dirs(path: Path) -> list[Path]:
    return sorted(p for p in path.iterdir() if p.is_dir() and not p.name.startswith("."))


def _check_folder(path: Path) -> None:
    """Explain, in one line, why `path` is not a class-per-subfolder image folder."""
    from torchvision.datasets.folder import IMG_EXTENSIONS

    if not path.exists():
        raise DataError(f"Data folder {str(path)!r} does not exist. Pass a folder of class sub-folders "
                        f"(PATH/CLASS/IMAGE.jpg) or 'digits'")
    if not path.is_dir():
        raise DataError(f"Data {str(path)!r} is a file, not a folder. Pass a folder of class sub-folders "
                        f"(PATH/CLASS/IMAGE.jpg) or 'digits'")
    classes = _class_dirs(path)
    loose = [p.name for p in path.iterdir() if p.is_file() and p.suffix.lower() in IMG_EXTENSIONS]
    if not classes:
        what = f"{len(loose)} images but no class sub-folders" if loose else "no class sub-folders"
        raise DataError(f"Data folder {str(path)!r} has {what}. Expected one sub-folder per class: "
                        f"{path.name}/CLASS/IMAGE.jpg (torchvision ImageFolder layout)")
    empty = [c.name for c in classes if not any(f.is_file() and f.suffix.lower() in IMG_EXTENSIONS
                                                 for f in c.rglob("*"))]
    if empty:
        from surgeon.errors import preview

        raise DataError(f"Data folder {str(path)!r}: {len(empty)} class folder(s) hold no images "
                        f"({preview(empty, 3)}). Each class folder needs image files "
                        f"({', '.join(sorted(IMG_EXTENSIONS)[:4])}, ...)")
    if len(classes) < 2:
        raise DataError(f"Data folder {str(path)!r} has one class ({classes[0].name!r}); classification "
                        f"needs at least two class sub-folders")


def _warn_non_images(path: Path) -> None:
    """Log how many files in the class folders are not images (ImageFolder skips them); dotfiles are ignored."""
    from torchvision.datasets.folder import IMG_EXTENSIONS

    from surgeon.errors import preview

    skipped = [f for c in _class_dirs(path) for f in sorted(c.rglob("*"))
               if f.is_file() and not f.name.startswith(".") and f.suffix.lower() not in IMG_EXTENSIONS]
    if skipped:
        log.warning("Data folder %r: skipped %d non-image file(s) (%s); images end in %s", str(path), len(skipped),
                    preview([str(f.relative_to(path)) for f in skipped], 3), ", ".join(sorted(IMG_EXTENSIONS)))


def read_image(path: str):
    """An image file as RGB (torchvision's loader), or one line naming the file that cannot be read.

    Raises:
        DataError: the file is corrupt, truncated or not an image.
    """
    from torchvision.datasets.folder import default_loader

    try:
        return default_loader(path)
    except (OSError, ValueError, SyntaxError) as exc:  # PIL's errors for unreadable files
        raise DataError(f"Cannot read image {path!r} ({type(exc).__name__}): corrupt, truncated or not an "
                        f"image; remove or replace the file") from exc


def image_folder(path: str | os.PathLike, *, model=None, train: bool = False,
                 input_size: Sequence[int] | None = None):
    """A torchvision ImageFolder with the model's own preprocessing (timm `create_transform`).

    Args:
        path: a folder with one sub-folder of images per class.
        train: use the training transform (random resized crop, flip) instead of the eval transform.

    Raises:
        DataError: the folder is missing, empty, or not laid out as one sub-folder per class. Files
        that are not images are skipped with a warning; a corrupt image fails when read, naming the file.
    """
    from timm.data import create_transform
    from torchvision.datasets import ImageFolder

    path = Path(path)
    _check_folder(path)
    _warn_non_images(path)
    cfg = data_config(model, input_size=input_size)
    transform = create_transform(**{k: cfg[k] for k in ("input_size", "interpolation", "mean", "std", "crop_pct")
                                    if k in cfg}, is_training=train)
    return ImageFolder(str(path), transform=transform, loader=read_image)


def split_folders(path: Path) -> tuple[Path, Path | None]:
    """(train, val) folders of a dataset root: PATH/train + PATH/val (or validation/valid/test) when
    present, else PATH itself for training and no validation."""
    names = {p.name.lower(): p for p in _class_dirs(path)} if path.is_dir() else {}
    train = next((names[n] for n in TRAIN_DIRS if n in names), None)
    if train is None:
        return path, None
    return train, next((names[n] for n in VAL_DIRS if n in names), None)


def resolve(spec: str | os.PathLike, model=None, *, input_size: Sequence[int] | None = None,
            val: str | os.PathLike | None = None, limit: int | None = None):
    """What `--data` names, as (train, val) datasets preprocessed for `model`.

    'digits' gives its train and test splits; a folder with train/ and val/ sub-folders gives both;
    any other folder is the training set (and `val`, when given, the validation set).
    """
    if str(spec) == DIGITS:
        return (digits("train", model=model, input_size=input_size, limit=limit),
                digits("test", model=model, input_size=input_size, limit=limit))
    _no_limit(limit)
    train_dir, val_dir = split_folders(Path(spec))
    if val is not None:
        val_dir = Path(val)
    train = image_folder(train_dir, model=model, train=True, input_size=input_size)
    val_ds = image_folder(val_dir, model=model, train=False, input_size=input_size) if val_dir else None
    if val_ds is not None and val_ds.classes != train.classes:
        raise DataError(f"Validation folder {str(val_dir)!r} has other classes than {str(train_dir)!r} "
                        f"({len(val_ds.classes)} vs {len(train.classes)}); both need the same class sub-folders")
    return train, val_ds


def evaluation_set(spec: str | os.PathLike, model=None, *, input_size: Sequence[int] | None = None,
                   limit: int | None = None):
    """What `--data` names for evaluation: digits' test split; a root's val/ folder; else the folder."""
    if str(spec) == DIGITS:
        return digits("test", model=model, input_size=input_size, limit=limit)
    _no_limit(limit)
    train_dir, val_dir = split_folders(Path(spec))
    return image_folder(val_dir or train_dir, model=model, train=False, input_size=input_size)


def _no_limit(limit: int | None) -> None:
    if limit is not None:
        raise DataError("limit (--limit) applies to the built-in 'digits' data only; make a smaller folder instead")


def classes_of(data) -> list[str] | None:
    """The class names of a Dataset or DataLoader (its `.classes`), or None when it does not say."""
    dataset = getattr(data, "dataset", data)
    classes = getattr(dataset, "classes", None)
    return list(classes) if classes is not None else None
