"""Pictures of what inserted attention applied (matplotlib, Agg; never pyplot's global state).

`maps(model, images=[...], out=DIR)` writes, per image: each spatial map overlaid on the preprocessed
input (upsampled, colour bar), the channel weights of every edit in one compact plot, and a contact
sheet with the input and all its maps. `maps(model, tokens=[[ids], ...], out=DIR)` draws a token heat
strip per sequence. Everything is computed and drawn before anything is written, and the folder is
moved into place whole, so a bad input writes nothing.
"""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F

from surgeon import outputs
from surgeon.errors import DataError, OptionError

SPATIAL = ("spatial", "maps", "pool", "self")  # kinds drawn over the image
CHANNEL = ("channel", "branches", "series")  # kinds drawn as weights per channel
TOKENS = ("tokens", "self", "selection")  # kinds drawn as a strip over a sequence


def spatial_map(weights: torch.Tensor) -> torch.Tensor:
    """One (N, H, W) map from weights of a spatial kind ('maps': the mean over its K maps)."""
    return weights.float().mean(1) if weights.dim() == 4 else weights.float()


def upsampled(weights: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """A spatial kind's map (N, H, W) resized (bilinear) to the image's `size`."""
    m = spatial_map(weights)
    return F.interpolate(m[:, None], size=size, mode="bilinear", align_corners=False)[:, 0]


def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def _overlay(ax, picture, heat, title: str, fig) -> None:
    ax.imshow(picture)
    im = ax.imshow(heat, cmap="jet", alpha=0.5)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    ax.set_title(title, fontsize=8)
    ax.axis("off")


def _picture(x: torch.Tensor, cfg: dict[str, Any]):
    """The preprocessed image (C, H, W) back in [0, 1] for display (H, W, C)."""
    mean = torch.tensor(cfg.get("mean", (0.0,) * x.shape[0]))[:, None, None]
    std = torch.tensor(cfg.get("std", (1.0,) * x.shape[0]))[:, None, None]
    img = (x * std + mean).clamp(0, 1)
    return img.permute(1, 2, 0).numpy() if img.shape[0] == 3 else img[0].numpy()


def _load_images(paths: Sequence[str], model, input_size) -> tuple[torch.Tensor, dict[str, Any]]:
    from timm.data import create_transform

    from surgeon.data import data_config, read_image

    if not paths:
        raise OptionError("Give at least one image (--image PATH)")
    for p in paths:
        if not Path(p).is_file():
            raise DataError(f"Image {str(p)!r} does not exist or is not a file")
    cfg = data_config(model, input_size=input_size)
    transform = create_transform(**{k: cfg[k] for k in ("input_size", "interpolation", "mean", "std", "crop_pct")
                                    if k in cfg}, is_training=False)
    return torch.stack([transform(read_image(str(p))) for p in paths]), cfg


def _site_label(site: str, part: str, kind: str) -> str:
    return f"{site or '(root)'} {part}" + (f" ({kind})" if kind != part else "")


def _image_figures(stem: str, picture, caps: dict, i: int, size: tuple[int, int]) -> dict[str, Any]:
    figs: dict[str, Any] = {}
    spatial = [(site, name, p) for site, c in caps.items() for name, p in c.parts.items() if p.kind in SPATIAL]
    for site, name, p in spatial:
        fig = _figure(4, 3.4)
        _overlay(fig.add_subplot(1, 1, 1), picture, upsampled(p.weights[i:i + 1], size)[0].numpy(),
                 _site_label(site, name, p.kind), fig)
        fig.tight_layout()
        figs[f"{stem}_{site or 'root'}_{name}.png"] = fig
    channel = [(site, name, p) for site, c in caps.items() for name, p in c.parts.items() if p.kind in CHANNEL]
    if channel:
        fig = _figure(6, 0.9 + 0.9 * len(channel))
        for j, (site, name, p) in enumerate(channel):
            ax = fig.add_subplot(len(channel), 1, j + 1)
            w = p.weights[i].float()
            for row in (w if w.dim() == 2 else w[None]):  # branches: one line per branch
                ax.plot(row.numpy(), linewidth=0.8)
            ax.set_ylabel(_site_label(site, name, p.kind), fontsize=6, rotation=0, ha="right")
            ax.tick_params(labelsize=6)
        fig.axes[-1].set_xlabel("channel", fontsize=7)
        fig.tight_layout()
        figs[f"{stem}_channels.png"] = fig
    cols = min(4, len(spatial) + 1)
    rows = math.ceil((len(spatial) + 1) / cols)
    fig = _figure(3 * cols, 2.8 * rows)
    ax = fig.add_subplot(rows, cols, 1)
    ax.imshow(picture)
    ax.set_title(stem, fontsize=8)
    ax.axis("off")
    for j, (site, name, p) in enumerate(spatial):
        _overlay(fig.add_subplot(rows, cols, j + 2), picture, upsampled(p.weights[i:i + 1], size)[0].numpy(),
                 _site_label(site, name, p.kind), fig)
    fig.tight_layout()
    figs[f"{stem}_sheet.png"] = fig
    return figs


def _token_figure(ids: Sequence[int], caps: dict, i: int):
    rows = [(site, name, p) for site, c in caps.items() for name, p in c.parts.items() if p.kind in TOKENS]
    fig = _figure(max(4.0, 0.35 * len(ids) + 2), 0.6 + 0.6 * len(rows))
    for j, (site, name, p) in enumerate(rows):
        ax = fig.add_subplot(len(rows), 1, j + 1)
        w = p.weights[i]
        strip = F.one_hot(w, len(ids)).float() if p.kind == "selection" else w.float()
        im = ax.imshow(strip[None, : len(ids)].numpy(), cmap="viridis", aspect="auto")
        fig.colorbar(im, ax=ax, fraction=0.02, pad=0.01)
        ax.set_yticks([0], [_site_label(site, name, p.kind)], fontsize=6)
        ax.set_xticks(range(len(ids)), [str(t) for t in ids], fontsize=6)
    fig.tight_layout()
    return fig


def _check_out(out: str | os.PathLike, reading: Sequence[str]) -> Path:
    target = Path(out)
    outputs.check_place(target, reading=reading)
    if os.path.lexists(target) and not (target.is_dir() and not any(target.iterdir())):
        from surgeon.errors import OutputError

        raise OutputError(f"Output folder {str(target)!r} exists; name a new (or empty) folder")
    return target


def maps(model, *, images: Sequence[str | os.PathLike] = (), tokens: Sequence[Sequence[int]] = (),
         out: str | os.PathLike, input_size: Sequence[int] | None = None) -> list[Path]:
    """Draw what every edit of `model` applied, per image (or token sequence), into the folder `out`.

    Args:
        model: a patched model.
        images: image files, preprocessed as the model's data config says (timm `resolve_data_config`;
            the surgery record's input size). Needs an edit with spatial weights.
        tokens: token id sequences (one model input each, batch of 1) for sequence models.
        out: a new (or empty) folder.

    Returns:
        The files written: per image `STEM_SITE_PART.png` (one overlay per spatial map), `STEM_channels.png`
        (channel weights, when an edit has them) and `STEM_sheet.png`; per sequence `tokensK.png`.

    Raises:
        DataError (a missing or unreadable image), OptionError (no inputs, both kinds, or no edit whose
        weights can be drawn for them), OutputError (`out` exists and is not empty). Nothing is written then.
    """
    from surgeon.viz import capture

    if bool(images) == bool(tokens):
        raise OptionError("Give images or token sequences (--image PATH... or --tokens IDS), one of the two")
    target = _check_out(out, [str(p) for p in images])
    figs: dict[str, Any] = {}
    if images:
        batch, cfg = _load_images([str(p) for p in images], model, input_size)
        caps = capture(model, batch)
        _require(caps, SPATIAL, "--image draws spatial maps", "spatial")
        stems = _stems([Path(p).stem for p in images])
        for i, stem in enumerate(stems):
            figs |= _image_figures(stem, _picture(batch[i], cfg), caps, i, tuple(batch.shape[-2:]))
    else:
        for k, ids in enumerate(tokens):
            caps = capture(model, torch.tensor([list(ids)], dtype=torch.long))
            _require(caps, TOKENS, "--tokens draws weights over tokens", "token")
            figs[f"tokens{k}.png"] = _token_figure(list(ids), caps, 0)
    return _write(figs, target)


def _require(caps: dict, kinds: tuple[str, ...], what: str, noun: str) -> None:
    if not any(p.kind in kinds for c in caps.values() for p in c.parts.values()):
        have = ", ".join(sorted({f"{c.attention} ({c.kind or 'nothing captured'})" for c in caps.values()}))
        raise OptionError(f"No edit of this model has {noun} attention weights ({what}); its edits: {have}. "
                          f"`surgeon gates` reports every edit")


def _stems(stems: list[str]) -> list[str]:
    """File stems made unique (two images named a.png in other folders: a, a-2)."""
    seen: dict[str, int] = {}
    out = []
    for s in stems:
        seen[s] = seen.get(s, 0) + 1
        out.append(s if seen[s] == 1 else f"{s}-{seen[s]}")
    return out


def _write(figs: dict[str, Any], target: Path) -> list[Path]:
    made = outputs.make_parents(target)
    tmp = outputs.temporary_folder(target)
    try:
        for name, fig in figs.items():
            fig.savefig(str(tmp / name))
        outputs.publish(tmp, target, force=False)
    except BaseException:
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
        outputs.remove_empty(made)
        raise
    return [target / name for name in figs]
