"""Model references to nn.Modules, and weight files into models.

References: a timm name ('resnet50', or 'timm:resnet50'), 'tv:NAME' / 'torchvision:NAME', a plugin's
'prefix:NAME', or a user's factory 'package.module:factory' / 'path/to/file.py:factory'.
Weights: safetensors files, or torch checkpoints read with weights_only=True (never a full unpickle
unless the caller allows it), with the usual wrappers ('state_dict', 'model', 'module.' prefixes).
"""
from __future__ import annotations

import argparse
import ast
import importlib
import importlib.util
import logging
import os
import pickle
import re
import sys
from pathlib import Path
from typing import Any

from surgeon.errors import ModelError, WeightsError, did_you_mean, unknown

log = logging.getLogger("surgeon")

_WRAPPER_KEYS = ("state_dict", "model_state_dict", "model", "module", "state_dict_ema", "model_ema", "net")
_PREFIXES = ("module.", "_orig_mod.", "model.")
_FACTORY = re.compile(r"^[A-Za-z_][\w.]*$")


def parse_value(text: str) -> Any:
    """A command-line value: a Python literal when it parses as one, else the string."""
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        lowered = text.lower()
        if lowered in ("true", "false"):
            return lowered == "true"
        return text


def parse_assignments(items: list[str] | tuple[str, ...], what: str) -> dict[str, Any]:
    """['k=v', ...] to {'k': value}; values parsed by `parse_value`."""
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ModelError(f"{what} {item!r} is not of the form key=value")
        out[key.strip()] = parse_value(value)
    return out


def describe(ref: str) -> tuple[str, str]:
    """Split a reference into (scheme, name); scheme is a source prefix or 'factory'."""
    from surgeon import registry

    sources = registry.model_sources()
    prefix, sep, rest = ref.partition(":")
    if not sep:
        return "timm", ref
    if prefix in sources:
        return sources[prefix].prefix, rest
    if prefix.endswith(".py") or (_FACTORY.match(prefix) and "." in prefix and _FACTORY.match(rest)):
        return "factory", ref
    if _FACTORY.match(prefix) and _FACTORY.match(rest) and importlib.util.find_spec(prefix.split(".")[0]):
        return "factory", ref
    raise unknown("model source", prefix, list(sources),
                  "Use a timm name, 'tv:NAME', or 'package.module:factory' for your own model.")


def _load_factory(ref: str):
    target, _, attr = ref.rpartition(":")
    try:
        if target.endswith(".py"):
            path = Path(target)
            if not path.is_file():
                raise ModelError(f"Model file {target!r} does not exist")
            spec = importlib.util.spec_from_file_location(path.stem, path)
            module = importlib.util.module_from_spec(spec)
            sys.modules.setdefault(path.stem, module)
            spec.loader.exec_module(module)
        else:
            module = importlib.import_module(target)
    except ModelError:
        raise
    except Exception as exc:
        raise ModelError(f"Cannot import {target!r} for model {ref!r}: {type(exc).__name__}: {exc}") from exc
    if not hasattr(module, attr):
        names = [n for n in dir(module) if not n.startswith("_")]
        raise ModelError(f"{target!r} has no {attr!r}.{did_you_mean(attr, names)}")
    return getattr(module, attr)


def load(ref: str, *, pretrained: bool = False, weights: str | Path | None = None,
         model_args: dict[str, Any] | None = None, allow_pickle: bool = False):
    """Build the model a reference names.

    Args:
        ref: 'resnet50', 'tv:resnet50', 'pkg.module:factory', 'file.py:factory', or a plugin's 'prefix:NAME'.
        pretrained: use the model library's own pretrained weights.
        weights: a local weights file loaded after building (safetensors or a torch checkpoint).
        model_args: keyword arguments for the model's constructor or factory.
        allow_pickle: allow full unpickling of `weights` (runs code in the file; only for trusted files).

    Returns:
        nn.Module in eval mode.

    Raises:
        UnknownNameError: unknown name or prefix (with close matches). ModelError: the model cannot be
        built. WeightsError: the weights file cannot be read or does not fit.

    Example:
        >>> model = load("tv:resnet18", weights="my_finetune.safetensors")
    """
    from torch import nn

    from surgeon import registry

    if pretrained and weights:
        raise ModelError("Pass either pretrained=True (--pretrained) or a weights file (--weights), not both")
    if is_folder_reference(ref):
        if pretrained or weights or model_args:
            raise ModelError(f"{ref!r} is a folder, which brings its own configuration and weights: pretrained, "
                             "weights and model arguments do not apply")
        return _from_folder(Path(ref))
    kwargs = dict(model_args or {})
    scheme, name = describe(ref)
    if scheme == "factory":
        factory = _load_factory(name)
        if pretrained:
            kwargs["pretrained"] = True
        try:
            model = factory(**kwargs)
        except TypeError as exc:
            raise ModelError(f"Model factory {ref!r} rejected its arguments {kwargs}: {exc}") from exc
    else:
        source = registry.model_sources()[scheme]
        if source.names is not None:
            names = source.names()
            if name not in names and not (scheme == "timm" and _timm_known(name)):
                raise unknown(f"{source.prefix} model", name, names)
        try:
            model = source.create(name, pretrained=pretrained, **kwargs)
        except TypeError as exc:
            raise ModelError(f"Model {ref!r} rejected its arguments {kwargs}: {exc}") from exc
        except Exception as exc:
            if pretrained:
                raise ModelError(
                    f"Could not get pretrained weights for {ref!r} ({type(exc).__name__}: "
                    f"{str(exc).splitlines()[0] if str(exc) else ''}). Without access to the model hub, "
                    f"download them elsewhere and pass --weights FILE"
                ) from exc
            raise ModelError(f"Could not build {ref!r}: {type(exc).__name__}: {exc}") from exc
    if not isinstance(model, nn.Module):
        raise ModelError(f"{ref!r} returned {type(model).__name__}, not a torch.nn.Module")
    if weights:
        load_weights(model, weights, allow_pickle=allow_pickle)
    # the reference travels with the model, so a recipe can rebuild it; a model file's path is made
    # absolute, so saving from another working directory still finds it (checkpoint.save copies it)
    target, _, attr = ref.rpartition(":")
    if scheme == "factory" and target.endswith(".py"):
        ref = f"{Path(target).resolve()}:{attr}"
    from surgeon import record

    record.ensure(model)
    record.set_base(model, {"ref": ref, "args": dict(model_args or {}), "pretrained": pretrained,
                            "weights": str(weights) if weights else None})
    return model.eval()


def is_folder_reference(ref: str) -> bool:
    """Whether a model reference names a folder: an existing one, written as a path (with a '/' or starting with '.'),
    so that a folder in the working directory named like a model ('resnet50') never hides the model."""
    return ":" not in ref and ("/" in ref or os.sep in ref or ref.startswith(".")) and Path(ref).is_dir()


def _from_folder(folder: Path):
    """The model a Hugging Face `save_pretrained` folder holds (transformers' own loading: config, weights whole or
    sharded, tied weights; from the folder only, never the hub)."""
    import json

    from surgeon import record

    if record.holds_recipe(folder):
        raise ModelError(f"{str(folder)!r} is a surgeon save: load it with surgeon.load({str(folder)!r}), then patch "
                         "the model it returns (on the command line, name the folder as the MODEL of 'surgeon add')")
    file = folder / record.HF_CONFIG
    if not file.is_file():
        raise ModelError(f"Folder {str(folder)!r} holds no model: neither a Hugging Face save (config.json) nor a "
                         "surgeon save (recipe.json)")
    try:
        config = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ModelError(f"Cannot read {str(file)!r}: {type(exc).__name__}: {exc}") from exc
    arch = (config.get("architectures") or [None])[0] if isinstance(config, dict) else None
    import transformers

    cls = getattr(transformers, arch, None) if isinstance(arch, str) else None
    if not isinstance(cls, type) or not hasattr(cls, "from_pretrained"):
        raise ModelError(f"{str(file)!r} names no transformers model class in 'architectures' (found {arch!r})")
    try:
        model = cls.from_pretrained(str(folder), local_files_only=True)
    except Exception as exc:
        raise ModelError(f"Could not load {arch} from {str(folder)!r}: {type(exc).__name__}: "
                         f"{str(exc).splitlines()[0] if str(exc) else ''}") from exc
    record.ensure(model)
    record.set_base(model, {"ref": f"hf:{arch}", "args": {"config": config}, "pretrained": False, "weights": None})
    return model.eval()


def _timm_known(name: str) -> bool:
    import timm

    return timm.is_model(name) or timm.is_model(name.split(".")[0])


def read_state_dict(path: str | Path, *, allow_pickle: bool = False) -> dict[str, Any]:
    """Read a weights file into a flat state dict, unwrapping common checkpoint layouts.

    Raises:
        WeightsError: missing, corrupt, or needing a full unpickle without `allow_pickle`.
    """
    import torch

    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"Weights file {str(path)!r} does not exist")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            sd = load_file(str(path), device="cpu")
        except Exception as exc:
            raise WeightsError(f"Cannot read safetensors file {str(path)!r}: {exc}") from exc
    else:
        try:
            # timm's training checkpoints keep their argparse.Namespace `args`: a plain container, allowed
            with torch.serialization.safe_globals([argparse.Namespace]):
                sd = torch.load(str(path), map_location="cpu", weights_only=not allow_pickle)
        except pickle.UnpicklingError as exc:
            raise WeightsError(
                f"{str(path)!r} needs full unpickling, which can run code from the file; surgeon only "
                f"reads weights (weights_only=True). If you trust it, pass --allow-pickle "
                f"(allow_pickle=True), or re-save it as safetensors"
            ) from exc
        except Exception as exc:
            raise WeightsError(f"Cannot read weights file {str(path)!r}: {type(exc).__name__}: "
                               f"{str(exc).splitlines()[0] if str(exc) else ''}") from exc
    return unwrap_state_dict(sd, source=str(path))


def unwrap_state_dict(obj: Any, *, source: str = "checkpoint") -> dict[str, Any]:
    """Find the state dict in a checkpoint object ('state_dict', 'model', ... wrappers)."""
    import torch
    from torch import nn

    if isinstance(obj, nn.Module):
        return obj.state_dict()
    for _ in range(3):
        if isinstance(obj, dict) and obj and not any(isinstance(v, torch.Tensor) for v in obj.values()):
            inner = next((obj[k] for k in _WRAPPER_KEYS if isinstance(obj.get(k), (dict, nn.Module))), None)
            if inner is None:
                break
            obj = inner.state_dict() if isinstance(inner, nn.Module) else inner
    if not isinstance(obj, dict) or not any(isinstance(v, torch.Tensor) for v in obj.values()):
        raise WeightsError(f"{source!r} holds no state dict (found {type(obj).__name__}); expected a mapping "
                           f"of parameter names to tensors, possibly under 'state_dict' or 'model'")
    return {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}


def _strip_prefixes(sd: dict[str, Any], expected: set[str]) -> dict[str, Any]:
    for prefix in _PREFIXES:
        if sd and all(k.startswith(prefix) for k in sd) and not any(k.startswith(prefix) for k in expected):
            sd = {k[len(prefix):]: v for k, v in sd.items()}
    return sd


def load_weights(model, path: str | Path, *, allow_pickle: bool = False, strict: bool = True) -> None:
    """Load a weights file into `model` (in place).

    Raises:
        WeightsError: unreadable, or its keys/shapes do not fit the model (names a few of each).
    """
    sd = read_state_dict(path, allow_pickle=allow_pickle)
    fit_state_dict(model, sd, source=str(path), strict=strict)


def key_problems(own: dict[str, Any], sd: dict[str, Any], want: list[str] | None = None, *, strict: bool = True,
                 tied: dict[str, set[str]] | None = None) -> list[str]:
    """What keeps `sd` from loading into a model whose state dict is `own`: missing, unexpected and
    misshapen keys, each with a short preview ([] when it fits). `want`: the keys required (default all);
    `tied`: keys that share a tensor, any one of which may stand for the others."""
    from surgeon.errors import preview

    want = list(own) if want is None else want
    tied = tied or {}
    missing = [k for k in want if k not in sd and not (tied.get(k, set()) & set(sd))]
    unexpected = [k for k in sd if k not in want]
    wrong = [f"{k} {tuple(sd[k].shape)} vs {tuple(own[k].shape)}" for k in want
             if k in sd and k in own and tuple(sd[k].shape) != tuple(own[k].shape)]
    problems = []
    if strict and missing:
        problems.append(f"{len(missing)} missing ({preview(missing, 3)})")
    if strict and unexpected:
        problems.append(f"{len(unexpected)} unexpected ({preview(unexpected, 3)})")
    if wrong:
        problems.append(f"{len(wrong)} of another shape ({preview(wrong, 2)})")
    return problems


def check_dtypes(own: dict[str, Any], sd: dict[str, Any], *, source: str) -> None:
    """Refuse tensors whose dtype would change meaning when copied into the model: anything but one
    floating-point type into another (float16/bfloat16 into float32 is logged, not refused). An
    integer or bool tensor copied into a float parameter, or a float into an integer buffer, is
    silently cast by `load_state_dict`.

    Raises:
        WeightsError: names the first keys and both dtypes.
    """
    from surgeon.errors import preview

    def name(dtype) -> str:
        return str(dtype).removeprefix("torch.")

    import torch

    wrong, cast = [], {}
    for k, t in sd.items():
        mine = own.get(k)
        if mine is None or t.dtype == mine.dtype:
            continue
        if t.dtype.is_floating_point and mine.dtype.is_floating_point:
            cast.setdefault((t.dtype, mine.dtype), []).append(k)
        else:
            wrong.append(f"{k} {name(t.dtype)} vs {name(mine.dtype)}")
    if wrong:
        raise WeightsError(f"Weights {source!r} hold {len(wrong)} tensors of another type than the model's "
                           f"({preview(wrong, 2)}): they would be converted silently. Save the weights "
                           f"with the model's own types")
    for (have, want), keys in cast.items():
        lossy = torch.finfo(have).bits > torch.finfo(want).bits
        log.log(logging.WARNING if lossy else logging.INFO, "weights %s: %d %s tensors converted to the model's %s%s",
                source, len(keys), name(have), name(want), " (precision is lost)" if lossy else "")


def fit_state_dict(model, sd: dict[str, Any], *, source: str, strict: bool = True) -> None:
    """Load `sd` into `model`, explaining any mismatch in one line."""
    own = model.state_dict()
    sd = _strip_prefixes(sd, set(own))
    problems = key_problems(own, sd, strict=strict)
    if problems:
        raise WeightsError(f"Weights {source!r} do not fit {type(model).__name__}: " + "; ".join(problems) +
                           " keys. Is the file for another model or another --model-arg (e.g. num_classes)?")
    check_dtypes(own, sd, source=source)
    model.load_state_dict(sd, strict=strict)
