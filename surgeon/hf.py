"""Hugging Face transformers models: their input conventions, and how to rebuild one from its config.

transformers is optional and imported only for models that come from it. Models are built from configs
(`hf:ClassName` with `config=` or config keyword arguments); `surgeon.references` records a model's class
and config, so a saved surgery loads without `base=`.
"""
from __future__ import annotations

import inspect
from typing import Any

EXAMPLE_TOKENS = 16
EXAMPLE_AUDIO = 16_000


def is_hf(model: Any) -> bool:
    """Whether `model` is a transformers PreTrainedModel (checked without importing transformers)."""
    return any(c.__module__.startswith("transformers.") and c.__name__ == "PreTrainedModel"
               for c in type(model).__mro__)


def example_input(model, generator, batch: int) -> tuple | None:
    """The positional example input for a transformers model, from its `main_input_name` and config:
    images at the config's size, token ids with an attention mask (the last sample padded, so masks are
    exercised), raw audio, or log-mel features at the length the encoder expects. None when unknown."""
    import torch

    cfg = model.config
    name = getattr(model, "main_input_name", None)
    values: dict[str, Any] = {}
    if name == "pixel_values":
        size = getattr(cfg, "image_size", 224)
        h, w = (size, size) if isinstance(size, int) else tuple(size)
        values[name] = torch.randn(batch, getattr(cfg, "num_channels", 3), h, w, generator=generator)
    elif name == "input_ids":
        values[name] = torch.randint(1, max(2, cfg.vocab_size), (batch, EXAMPLE_TOKENS), generator=generator)
        mask = torch.ones(batch, EXAMPLE_TOKENS, dtype=torch.long)
        mask[-1, EXAMPLE_TOKENS * 3 // 4:] = 0
        values["attention_mask"] = mask
    elif name == "input_values":
        values[name] = torch.randn(batch, EXAMPLE_AUDIO, generator=generator)
    elif name == "input_features":
        frames = 2 * getattr(cfg, "max_source_positions", 1500)
        values[name] = torch.randn(batch, getattr(cfg, "num_mel_bins", 80), frames, generator=generator)
    else:
        return None
    params = inspect.signature(model.forward).parameters
    if getattr(cfg, "is_encoder_decoder", False) and "decoder_input_ids" in params:
        # an encoder-decoder's decoder needs its own tokens (T5 has no default); half as many as the encoder's, so
        # that cross-attention is not square
        vocab = getattr(cfg, "decoder_vocab_size", None) or cfg.vocab_size
        values["decoder_input_ids"] = torch.randint(1, max(2, vocab), (batch, EXAMPLE_TOKENS // 2), generator=generator)
    # positional, in the forward's order, up to the first parameter not given (one defaulting to None in between
    # is passed as None)
    out = []
    for p in params.values():
        if not values:
            break
        if p.name not in values and p.default is not None:
            break
        out.append(values.pop(p.name, None))
    return tuple(out) if not values else None


def create(name: str, *, pretrained: bool = False, config: dict[str, Any] | None = None, **kwargs):
    """A transformers model class by name, built from `config` (a config dict) or from config keyword
    arguments (`num_labels=3`), with fresh weights."""
    import transformers

    cls = getattr(transformers, name, None)
    if not isinstance(cls, type) or not hasattr(cls, "config_class"):
        raise ValueError(f"{name!r} is not a transformers model class")
    if pretrained:
        raise ValueError("hf: models are built from configs here; load trained weights with --weights FILE")
    cfg = cls.config_class.from_dict({**(config or {}), **kwargs})
    return cls(cfg)


def names() -> list[str]:
    """The transformers model classes (for "did you mean")."""
    import transformers

    return [n for n in dir(transformers) if ("For" in n or n.endswith("Model")) and n[:1].isupper()
            and not n.startswith(("TF", "Flax"))]


__all__ = ["create", "example_input", "is_hf", "names"]
