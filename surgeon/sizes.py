"""The input size a model says it takes, read from the model instead of guessed: a surgery record, timm's
`pretrained_cfg['input_size']`, a torchvision model's own `image_size`, or torchvision's weights metadata
(the transforms' crop size, the minimum image size, a video model's minimum clip length).
"""
from __future__ import annotations

import inspect
import logging
from contextlib import contextmanager
from typing import Iterator

from surgeon import record

log = logging.getLogger("surgeon")

VIDEO_FRAMES = 16  # a clip length video models are trained on, where the weights name no minimum
DETECTOR_SIZE = 320  # the shorter image side surgery runs detectors at (torchvision's smallest detector's)
CHECK_SCALE = 4  # the whole-model check runs on images this many times smaller per side (see `for_checking`)
CHECK_MIN = 32  # ... and never on sides shorter than this


def configured_size(model) -> tuple[int, ...] | None:
    """The per-sample input size the model's own metadata gives, or None when it gives none."""
    if record.input_size(model):
        return record.input_size(model)
    for attr in ("pretrained_cfg", "default_cfg"):
        cfg = getattr(model, attr, None)
        if isinstance(cfg, dict) and cfg.get("input_size"):
            return tuple(cfg["input_size"])
    builders = _torchvision_builders(model)
    own = getattr(model, "image_size", None)
    if builders and isinstance(own, int) and not isinstance(own, bool):
        # the size the model was built for (torchvision's ViT: 224 unless built for weights at 518), which
        # its weights' metadata would contradict when it was built without them
        return (3, own, own)
    sizes = {_torchvision_size(name) for name in builders}
    if len(sizes) == 1:  # every builder of the model's class agrees (or the model's builder is known)
        return sizes.pop()
    return None


def _torchvision_builders(model) -> list[str]:
    """The torchvision builders that may have built `model`: the one its reference names, or else every
    builder returning its class."""
    cls = getattr(type(model), "_surgeon_base", type(model))
    if not cls.__module__.startswith("torchvision.models"):
        return []
    from torchvision.models import get_model_builder, list_models

    ref = (record.base(model) or {}).get("ref") or ""
    if ref.startswith(("tv:", "torchvision:")):
        return [ref.split(":", 1)[1]]
    return [n for n in list_models() if inspect.signature(get_model_builder(n)).return_annotation is cls]


def _torchvision_size(name: str) -> tuple[int, ...] | None:
    """(3, H, W) from a classifier's crop size; (3, T, H, W) for a video classifier; (3, H, W) from the
    minimum size of a model that needs more than 224 pixels; None when the weights say nothing useful."""
    from torchvision.models import get_model_weights

    try:
        weights = get_model_weights(name).DEFAULT
        transform = weights.transforms()
    except Exception as exc:  # noqa: BLE001 - a builder without weights: nothing to read
        log.debug("torchvision %s: no weights metadata (%s)", name, exc)
        return None
    crop = list(getattr(transform, "crop_size", None) or [])
    crop = crop * 2 if len(crop) == 1 else crop  # [299]: a square
    meta = weights.meta
    if crop and type(transform).__name__ == "VideoClassification":
        frames = meta.get("min_temporal_size") or 1
        return (3, max(frames, VIDEO_FRAMES), *crop)
    if crop:
        return (3, *crop)
    min_size = meta.get("min_size")
    if min_size and min(min_size) > 224:
        return (3, *min_size)
    return None


DETECTOR_PROPOSALS = 100  # region proposals per image during surgery (torchvision's own: 1000)


def _resizing_transforms(model) -> list:
    """A detector's own input transforms that resize every image to more than DETECTOR_SIZE pixels."""
    return [m for m in model.modules() if type(m).__name__ == "GeneralizedRCNNTransform"
            and getattr(m, "fixed_size", None) is None and max(m.min_size) > DETECTOR_SIZE]


def resizes_large(model) -> bool:
    """Whether the model resizes its inputs to large images itself (torchvision detectors: 800 pixels)."""
    return bool(_resizing_transforms(model))


def _check_side(side: int) -> int:
    """A side CHECK_SCALE times shorter, rounded up to keep what the side is a multiple of (up to 32: a network
    downsampling five times by two needs that), never below CHECK_MIN: 224 -> 64, 256 -> 64, 299 -> 75."""
    keep = min(32, side & -side)
    return max(CHECK_MIN, -(-side // CHECK_SCALE // keep) * keep if side // CHECK_SCALE >= keep
               else -(-side // CHECK_SCALE))


def for_checking(inputs: tuple) -> tuple | None:
    """Smaller stand-ins for an example input of images (one floating tensor, batch, channels and two or more
    sides): the last two sides `_check_side`, the values picked from the example's own (nearest), or None when
    that would not make the images at least four times smaller."""
    import torch

    if len(inputs) != 1 or not isinstance(inputs[0], torch.Tensor):
        return None
    x = inputs[0]
    if not x.is_floating_point() or x.dim() < 4 or x.is_complex():
        return None
    h, w = x.shape[-2:]
    side = (_check_side(h), _check_side(w))
    if side[0] * side[1] * 4 > h * w:
        return None
    rows = torch.div(torch.arange(side[0]) * h, side[0], rounding_mode="floor").to(x.device)
    cols = torch.div(torch.arange(side[1]) * w, side[1], rounding_mode="floor").to(x.device)
    return (x.index_select(-2, rows).index_select(-1, cols).contiguous(),)


def _smaller(module) -> dict:
    """The settings of a detector part that make surgery cheap without changing which layers run: a
    transform's image size, a region proposal network's number of proposals."""
    if module in _resizing_transforms(module):
        return {"min_size": (DETECTOR_SIZE,), "max_size": round(module.max_size * DETECTOR_SIZE / max(module.min_size))}
    if type(module).__name__ == "RegionProposalNetwork":
        return {k: {mode: min(n, DETECTOR_PROPOSALS) for mode, n in getattr(module, k).items()}
                for k in ("_pre_nms_top_n", "_post_nms_top_n") if isinstance(getattr(module, k, None), dict)}
    return {}


@contextmanager
def small_images(*models) -> Iterator[None]:
    """Within the block, detectors among `models` resize their images to DETECTOR_SIZE pixels (the shorter
    side; the longer one keeps the model's ratio) instead of their own 800, and keep DETECTOR_PROPOSALS
    region proposals per image instead of 1000: every layer runs as before on smaller maps and fewer
    boxes, so tracing, shapes and the identity check hold for the detector at a fraction of the cost.
    The models' own settings are put back on exit."""
    saved = []
    try:
        for model in models:
            for m in model.modules():
                for key, value in _smaller(m).items():
                    saved.append((m, key, getattr(m, key)))
                    setattr(m, key, value)
        if saved:
            log.info("detector: surgery and verification resize images to %d pixels with at most %d proposals",
                     DETECTOR_SIZE, DETECTOR_PROPOSALS)
        yield
    finally:
        for m, key, value in reversed(saved):
            setattr(m, key, value)


__all__ = ["configured_size", "for_checking", "resizes_large", "small_images"]
