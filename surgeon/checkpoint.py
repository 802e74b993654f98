"""Save and load patched models: DIR/recipe.json + DIR/model.safetensors, or an adapter.

An adapter (DIR/adapter.safetensors) holds only the parameters and buffers the edits added (and,
when asked, re-trained modules such as the head); `load(DIR, base=model)` puts it on a freshly built
base. Loading rebuilds the base from the recipe, replays the edits (`surgeon.recipe.replay`) and loads
the weights; missing, unexpected or misshapen keys fail loudly. Writes are atomic: everything goes to
a temporary folder beside DIR, renamed into place at the end (`surgeon.outputs.publish`), so a failure or
a kill never leaves a half-written DIR nor loses the previous save; `force` replaces only a previous save.
"""
from __future__ import annotations

import copy
import fnmatch
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any, Sequence

from surgeon import outputs, record
from surgeon.errors import ModelError, OptionError, UnknownNameError, WeightsError
from surgeon.recipe import (FORMAT, FORMAT_VERSION, RECIPE, base_reference, build_base, check_names, inside,
                            read_recipe, replay)

log = logging.getLogger("surgeon")

WEIGHTS = "model.safetensors"
ADAPTER = "adapter.safetensors"
HEAD = "head"

__all__ = ["save", "load", "summary", "recipe_of", "adapter_keys", "RECIPE", "WEIGHTS", "ADAPTER", "FORMAT",
           "FORMAT_VERSION", "merge_saved"]


versions = record.versions


def recipe_of(model) -> dict[str, Any]:
    """The recipe of a patched model: base model reference, input size, edits, versions."""

    base = record.base(model)
    if base is None:  # a model the user built: its library may still say how (torchvision: searched here)
        from surgeon.references import library_reference

        base = library_reference(model)
    return record.recipe(model, base)


# -- which tensors an adapter holds ------------------------------------------------------------------
def _resolve_include(model, include: Sequence[str]) -> list[str]:
    from surgeon.heads import find_head  # the classifier, skipping modules surgery inserted

    names = [n for n, _ in model.named_modules() if n]
    out: list[str] = []
    for item in include:
        matched = [find_head(model)] if item == HEAD else [n for n in names if fnmatch.fnmatchcase(n, item)]
        if not matched:
            from surgeon.errors import did_you_mean

            raise UnknownNameError(f"include {item!r} names no module of the model.{did_you_mean(item, names)} "
                               f"Use a module path such as 'fc', a glob, or 'head'")
        out.extend(m for m in matched if m not in out)
    return out


def adapter_keys(model, include: Sequence[str] = ()) -> list[str]:
    """State-dict keys an adapter holds: everything under the edits' modules and under `include`
    (module paths, globs, or 'head' for the classifier)."""
    from surgeon.surgery.rewrite import edits_of

    prefixes = [e["module"] + "." for e in edits_of(model)] + [p + "." for p in _resolve_include(model, include)]
    return [k for k in model.state_dict() if any(k.startswith(p) for p in prefixes)]


# -- save --------------------------------------------------------------------------------------------
def _nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def _copy_model_file(recipe: dict[str, Any], folder: Path) -> None:
    """A base model built by a 'file.py:factory' travels with the save: the file is copied into the
    folder and the recipe names the copy, so loading works from any working directory, after the
    original moves or changes, and on another machine."""
    base = recipe.get("model") or {}
    target, _, attr = (base.get("ref") or "").rpartition(":")
    if not target.endswith(".py"):
        return
    source = Path(target)
    if not source.is_file():
        raise ModelError(f"The base model's file {target!r} no longer exists, so the saved recipe could not "
                           f"rebuild it; restore the file and save again")
    shutil.copyfile(source, folder / source.name)
    base["ref"] = f"{source.name}:{attr}"


def normal_permissions(path: Path) -> None:
    """Give a folder (made private by mkdtemp) and its files the permissions a plain mkdir/open would
    have under the current umask, so what surgeon writes is as readable as any other file."""
    umask = os.umask(0)
    os.umask(umask)
    path.chmod(0o777 & ~umask)
    for f in path.iterdir() if path.is_dir() else ():
        f.chmod(0o666 & ~umask)


def _check_no_pruning(model) -> None:
    """A module pruned with torch.nn.utils.prune holds `weight_orig` and `weight_mask` and recomputes `weight`
    in a hook, which a recipe cannot rebuild: the save would not load. Raises OptionError naming the first."""
    from torch.nn.utils import prune

    for path, m in model.named_modules():
        for hook in m._forward_pre_hooks.values():
            if isinstance(hook, prune.BasePruningMethod):
                name = hook._tensor_name
                raise OptionError(
                    f"{path or type(model).__name__} is pruned with torch.nn.utils.prune ({name}_orig and "
                    f"{name}_mask), which a saved recipe cannot rebuild: make the pruning permanent first "
                    f"(torch.nn.utils.prune.remove(module, {name!r}) on each pruned module), then save")


def save(model, directory: str | os.PathLike, *, adapter: bool = False, include: Sequence[str] = (),
         force: bool = False) -> Path:
    """Write a (patched) model into `directory`, atomically: `recipe.json` plus `model.safetensors`,
    or, with `adapter=True`, `adapter.safetensors` holding only what the edits added.

    Args:
        adapter: store only the parameters and buffers of the inserted modules (plus `include`).
        include: with `adapter`, modules whose weights go in too: paths ('fc'), globs, or 'head'.
        force: replace `directory` when it exists and is a previous surgeon save (or empty); the old
            save is deleted only once the new one is in place.

    Returns:
        Path: the folder. Its recipe's `weights` field says what the file holds and its size against
        the full model (`surgeon.summary(DIR)`).

    Raises:
        OutputError: `directory` exists and force is False, is not a surgeon save, or may not be
            written (see `surgeon.outputs.check_folder`). OptionError: an adapter of a model without edits;
            a model pruned with torch.nn.utils.prune (nothing is written).

    Example:
        >>> surgeon.save(surgeon.add("resnet50", "cbam"), "out/cbam-r50")
        >>> surgeon.save(model, "out/cbam-adapter", adapter=True, include=["head"])
    """
    from safetensors.torch import save_file, save_model

    from surgeon.surgery.rewrite import edits_of

    target = Path(directory)
    if include and not adapter:
        raise OptionError("include= (--include) only applies to adapters; pass adapter=True (--adapter)")
    if adapter and not edits_of(model):
        raise OptionError("The model has no edits, so an adapter would be empty; save the full model")
    _check_no_pruning(model)
    outputs.check_folder(target, force=force)
    recipe = recipe_of(model)
    state = model.state_dict()
    full = {"model_params": sum(p.numel() for p in model.parameters()), "model_bytes": _nbytes(state.values())}
    made = outputs.make_parents(target)
    tmp = outputs.temporary_folder(target)
    try:
        if adapter:
            # convolutions that took in a BatchNorm (`merge(fold_bn=True)`) differ from the base: they go in
            included = _resolve_include(model, include)
            included += [c for c, _ in record.folded_bn(model) if c not in included]
            keys = adapter_keys(model, included)
            tensors = {k: state[k].detach().contiguous() for k in keys}
            save_file(tensors, str(tmp / ADAPTER), metadata={"format": "surgeon.adapter"})
            params = {n for n, _ in model.named_parameters()}
            recipe["weights"] = {"file": ADAPTER, "adapter": True, "include": included, "tensors": len(tensors),
                                 "params": sum(t.numel() for k, t in tensors.items() if k in params),
                                 "bytes": _nbytes(tensors.values()), **full}
        else:
            save_model(model, str(tmp / WEIGHTS))
            recipe["weights"] = {"file": WEIGHTS, "adapter": False, "tensors": len(state),
                                 "params": full["model_params"], "bytes": full["model_bytes"], **full}
        # NOTE: params count parameters only; bytes also cover buffers (batch-norm statistics...)
        _copy_model_file(recipe, tmp)
        (tmp / RECIPE).write_text(json.dumps(recipe, indent=2) + "\n")  # written last: it marks a save
        normal_permissions(tmp)
        outputs.publish(tmp, target, force=force)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        outputs.remove_empty(made)
        raise
    return target


# -- load --------------------------------------------------------------------------------------------
def _read_safetensors(path: Path) -> dict[str, Any]:
    from safetensors.torch import load_file

    if not path.is_file():
        raise WeightsError(f"Weights file {str(path)!r} is missing")
    if path.name.endswith(".safetensors.index.json"):  # a sharded save_pretrained checkpoint: its shards, merged
        return _read_shards(path)
    try:
        return load_file(str(path), device="cpu")
    except Exception as exc:
        raise WeightsError(f"Cannot read safetensors file {str(path)!r} (corrupt or truncated?): "
                           f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from exc


def _read_shards(index: Path) -> dict[str, Any]:
    from surgeon.recipe import inside

    try:
        shards = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise WeightsError(f"Cannot read the shard index {str(index)!r}: {type(exc).__name__}: {exc}") from exc
    sd: dict[str, Any] = {}
    for name in shards:
        if not str(name).endswith(".safetensors"):
            raise WeightsError(f"The shard index {str(index)!r} names {name!r}, which is not a safetensors file")
        sd.update(_read_safetensors(inside(index.parent, str(name), what="weights shard")))
    return sd


def _tied(own: dict[str, Any]) -> dict[str, set[str]]:
    """Keys that are views of one tensor (tied weights): safetensors stores only one of them."""
    groups: dict[tuple, set[str]] = {}
    for k, t in own.items():
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()))
        groups.setdefault(key, set()).add(k)
    return {k: g - {k} for g in groups.values() for k in g if len(g) > 1}


def fit(model, sd: dict[str, Any], *, expected: Sequence[str] | None = None, source: str) -> None:
    """Load `sd` into `model` in place; it must hold exactly the `expected` keys (default: all).

    Raises:
        WeightsError: missing, unexpected or misshapen keys, or tensors of another type, named in one line.
    """
    from surgeon.models import check_dtypes, key_problems

    own = model.state_dict()
    want = list(own) if expected is None else list(expected)
    problems = key_problems(own, sd, want, tied=_tied(own))
    if problems:
        raise WeightsError(f"Weights {source!r} do not fit the model: " + "; ".join(problems) +
                           " keys. Are they for another model, recipe or --model-arg?")
    check_dtypes(own, sd, source=source)
    model.load_state_dict(sd, strict=False)


def load(directory: str | os.PathLike, *, base=None, trust_code: bool = False, weights: str | os.PathLike | None = None,
         allow_pickle: bool = False, input_size: Sequence[int] | None = None, example_input: Any = None):
    """Rebuild a saved model: read and validate the recipe, build the base (or take `base`), replay the
    edits, load the weights.

    Args:
        directory: a folder written by `save` (or `surgeon add --out`).
        base: the base model to put the edits on, e.g. a fresh pretrained model for an adapter. It is
            copied, never changed.
        trust_code: allow a recipe whose base model is a user factory (imports and runs its code).
        weights: a checkpoint of the whole patched model (safetensors or a torch state dict) to load
            instead of the folder's own weights.
        allow_pickle: allow full unpickling of `weights` (runs code in the file; trusted files only).
        input_size: per-sample input shape for finding the sites again (default: the recipe's).
        example_input: example inputs for models that take several or integer inputs (default: the
            recipe's own, recorded when the model was patched).

    Returns:
        nn.Module: the patched model, in eval mode.

    Raises:
        RecipeError, WeightsError, UnknownNameError, NoSitesError, ShapeError.

    Example:
        >>> model = surgeon.load("out/cbam-r50")
        >>> model = surgeon.load("out/cbam-adapter", base=timm.create_model("resnet50", pretrained=True))
    """
    from surgeon import models
    from surgeon.layers.gate import upgrade_legacy

    folder, recipe = read_recipe(directory)
    source = str(folder / RECIPE)
    _check_versions(recipe)
    spec = recipe.get("weights") or {"file": WEIGHTS, "adapter": False}
    file = inside(folder, spec["file"], what="weights file")
    check_names(recipe, source=source)
    if base is None:
        base_reference(recipe, folder, trust_code=trust_code, source=source)  # refuse untrusted code early
    # 1. Weights first: a bad file fails before any model is built.
    if weights is not None:
        sd, src = models.read_state_dict(weights, allow_pickle=allow_pickle), str(weights)
    else:
        sd, src = _read_safetensors(file), str(file)
    adapter = spec["adapter"] and weights is None
    # 2. The base: for a full checkpoint its own weights are replaced anyway, so it is built bare.
    if base is not None:
        base = copy.deepcopy(base)
    elif adapter:
        base = build_base(recipe, folder, trust_code=trust_code, with_weights=True, source=source)
    else:
        base = build_base(recipe, folder, trust_code=trust_code, with_weights=False, source=source)
    # 3. The edits, then the weights (saved before the weight gates: put back in their old wrappers).
    model = replay(recipe, base, verify=False, input_size=input_size, example_input=example_input, _folder=folder)
    if weights is not None:
        sd = models._strip_prefixes(sd, set(model.state_dict()))
    for path in upgrade_legacy(model, sd):
        log.info("%s: weights saved with the former output gate; loaded in that form", path)
    if adapter:
        have = sum(p.numel() for p in model.parameters())
        if spec.get("model_params") not in (None, have):
            raise WeightsError(f"The adapter {src!r} was made on a model of {spec['model_params']:,} parameters "
                               f"(edits included); this base gives {have:,}. Is it another model or "
                               f"--model-arg?")
        fit(model, sd, expected=adapter_keys(model, spec.get("include", [])), source=src)
    else:
        fit(model, sd, source=src)
    return model.eval()


def summary(directory: str | os.PathLike) -> dict[str, Any]:
    """What a saved folder holds, without building anything: base, edits, parameters added, weights
    file and its size against the full model.

    Example:
        >>> surgeon.summary("out/cbam-adapter")["weights"]["bytes"]
    """
    folder, recipe = read_recipe(directory)
    spec = recipe.get("weights")
    out: dict[str, Any] = {"path": str(folder), "model": recipe.get("model"), "input_size": recipe.get("input_size"),
                           "edits": recipe["edits"], "params_added": sum(e.get("params", 0) for e in recipe["edits"]),
                           "versions": recipe.get("versions", {}), "weights": None}
    if spec:
        file = inside(folder, spec["file"], what="weights file")
        out["weights"] = {**spec, "file_bytes": file.stat().st_size if file.is_file() else None}
    return out


def _check_versions(recipe: dict[str, Any]) -> None:
    """Warn when the recipe was written with another major.minor of a library that defines the model."""
    now = versions()
    for lib, then in (recipe.get("versions") or {}).items():
        if lib in now and str(then).split(".")[:2] != now[lib].split(".")[:2]:
            log.warning("recipe written with %s %s, running %s: if keys do not match, the model definition "
                        "changed between them", lib, then, now[lib])


def merge_saved(directory, out, *, force: bool = False, trust_code: bool = False,
                fold_bn: bool = False) -> tuple[list, list]:
    """Load the model saved in `directory`, merge it and save it (in full) to `out`.

    Args:
        directory: a folder written by `surgeon.save` (or `surgeon finetune --out`).
        out: the folder to write; checked before any work (see `surgeon.outputs.check_folder`).
        force: replace `out` when it is a previous save. trust_code: see `surgeon.load`.
        fold_bn: also fold BatchNorm into the convolutions before it (see `surgeon.merge`).

    Returns:
        (what was done with each gate (see `merge_plan`), the (conv, BatchNorm) pairs folded).

    Raises:
        OutputError: `out` may not be written. RecipeError, WeightsError: as `surgeon.load`.

    Example:
        >>> folds, pairs = surgeon.checkpoint.merge_saved("runs/cbam", "runs/cbam-merged")
    """
    from surgeon import outputs
    from surgeon.merging import merge, merge_plan

    outputs.check_folder(out, force=force, reading=outputs.local_inputs(directory))
    model = load(directory, trust_code=trust_code)
    folds = merge_plan(model)
    before = len(record.folded_bn(model))
    merged = merge(model, inplace=True, fold_bn=fold_bn)
    save(merged, out, force=force)
    return folds, record.folded_bn(merged)[before:]
