"""Recipes: read and validate `recipe.json`, and replay one onto a base model.

A recipe is a plan as JSON (format "surgeon.recipe", version 1): the base model reference, the input
size, the edits (site, kind, attention, options, init; `step` groups the edits of one `add`), the
versions that wrote it, the gates `surgeon.merge` removed (`merged`) and, in a saved folder, which weights
file holds what. It is validated against
`SCHEMA` before anything is built; paths in it are relative to its folder and cannot leave it; a base
model that is a user factory (`package.module:factory`, `file.py:factory`) imports code and needs
`trust_code=True` (`--trust-code`). A saved folder holds a copy of its base's model file (see
`surgeon.checkpoint.save`), so the recipe names it by its file name.
"""
from __future__ import annotations

import glob
import json
import logging
import os
from pathlib import Path
from typing import Any

from surgeon import record
from surgeon.record import CONFIG_KEY, FORMAT, FORMAT_VERSION, HF_CONFIG
from surgeon.errors import ModelError, RecipeError, SurgeonError

log = logging.getLogger("surgeon")

RECIPE = "recipe.json"
MAX_BYTES = 16 << 20  # a recipe is a few KB; refuse anything absurd before parsing it

_NONE = type(None)
# field: (accepted types, required). A nested dict schema stands for a JSON object with those fields.
_MODEL = {"ref": (str, True), "args": (dict, False), "pretrained": (bool, False), "weights": ((str, _NONE), False)}
_EDIT = {"site": (str, True), "attention": (str, True), "kind": ((str, _NONE), False), "options": (dict, False),
         "init": (str, False), "shape": (list, False), "params": (int, False), "flops": (int, False),
         "module": (str, False), "owner": (str, False), "step": (int, False)}
_WEIGHTS = {"file": (str, True), "adapter": (bool, True), "include": (list, False), "tensors": (int, False),
            "params": (int, False), "bytes": (int, False), "model_params": (int, False),
            "model_bytes": (int, False)}
SCHEMA = {"format": (str, True), "version": (int, True), "model": ((_MODEL, _NONE), False),
          "input_size": ((list, _NONE), False), "edits": (list, True), "versions": (dict, False),
          "example_input": ((list, _NONE), False),
          "weights": (_WEIGHTS, False), "merged": (list, False), "folded_bn": (list, False)}
# model-library arguments that read files or pick weights from elsewhere: a recipe names its base
# weights in `model.weights`, inside its folder
_FILE_ARGS = ("checkpoint_path", "pretrained_cfg", "pretrained_cfg_overlay", "cache_dir")
_TYPE_NAMES = {str: "a string", int: "an integer", bool: "true/false", dict: "an object", list: "a list",
               _NONE: "null"}


# -- validation --------------------------------------------------------------------------------------
MAX_INPUT_DIMS = 5
MAX_INPUT_VALUES = 1 << 27  # per sample: 512 MB of float32, e.g. 3x4096x4096 fits; more is a typo


def check_input_size(size: Any, *, what: str = "input size") -> tuple[int, ...]:
    """A per-sample input shape: 1 to 5 positive integers with at most `MAX_INPUT_VALUES` values.

    Raises:
        OptionError: one line with the value and what is valid.
    """
    from surgeon.errors import OptionError

    example = "e.g. 3,224,224"
    if not isinstance(size, (list, tuple)) or not size or any(not _type_ok(d, int) for d in size):
        raise OptionError(f"{what} must be integers separated by commas, {example}")
    if len(size) > MAX_INPUT_DIMS:
        raise OptionError(f"{what} has {len(size)} dimensions; at most {MAX_INPUT_DIMS} are allowed")
    if any(d <= 0 for d in size):
        raise OptionError(f"{what} must be positive integers, {example}")
    values = 1
    for d in size:
        values *= d
    if values > MAX_INPUT_VALUES:
        count = f"{values:,}" if values < 10**18 else "more than 10^18"
        raise OptionError(f"{what} has {count} values per sample; at most {MAX_INPUT_VALUES:,} "
                          f"are allowed, {example}")
    return tuple(size)


def _type_ok(value: Any, kind: Any) -> bool:
    if isinstance(kind, dict):
        return isinstance(value, dict)
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, kind)


def _check_object(obj: Any, schema: dict[str, tuple], where: str, source: str) -> None:
    if not isinstance(obj, dict):
        raise RecipeError(f"Recipe {source!r}: {where or 'the top level'} must be an object")
    for key in obj:
        if key not in schema:
            from surgeon.errors import did_you_mean

            raise RecipeError(f"Recipe {source!r}: unknown field {_join(where, key)!r}."
                              f"{did_you_mean(key, schema)} Valid fields: {', '.join(schema)}")
    for key, (kinds, required) in schema.items():
        if key not in obj:
            if required:
                raise RecipeError(f"Recipe {source!r}: field {_join(where, key)!r} is missing")
            continue
        kinds = kinds if isinstance(kinds, tuple) else (kinds,)
        value = obj[key]
        matched = next((k for k in kinds if _type_ok(value, k)), None)
        if matched is None:
            want = " or ".join("an object" if isinstance(k, dict) else _TYPE_NAMES[k] for k in kinds)
            raise RecipeError(f"Recipe {source!r}: field {_join(where, key)!r} must be {want}, "
                              f"got {json.dumps(value)[:40]}")
        if isinstance(matched, dict):
            _check_object(value, matched, _join(where, key), source)


def _join(where: str, key: str) -> str:
    return f"{where}.{key}" if where else key


def validate(recipe: Any, *, source: str = "recipe") -> dict[str, Any]:
    """Check a parsed recipe against `SCHEMA` (format and version first).

    Returns:
        the recipe, unchanged.

    Raises:
        RecipeError: one line naming the first problem.
    """
    if not isinstance(recipe, dict):
        raise RecipeError(f"Recipe {source!r} must be a JSON object, got {type(recipe).__name__}")
    if recipe.get("format") != FORMAT:
        raise RecipeError(f"{source!r} is not a surgeon recipe (format {recipe.get('format')!r}, "
                          f"expected {FORMAT!r})")
    version = recipe.get("version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise RecipeError(f"Recipe {source!r} has an unreadable version {version!r}; expected an integer "
                          f"from 1 to {FORMAT_VERSION}")
    if version > FORMAT_VERSION:
        raise RecipeError(f"Recipe {source!r} has version {version}; this surgeon reads versions up to "
                          f"{FORMAT_VERSION}. Upgrade surgeon to read it")
    _check_object(recipe, SCHEMA, "", source)
    bad = next((t for t in _strings(recipe) if "\0" in t), None)
    if bad is not None:
        raise RecipeError(f"Recipe {source!r}: the text {bad!r} holds a NUL character; names and paths cannot")
    if any(not isinstance(v, str) for v in (recipe.get("versions") or {}).values()):
        raise RecipeError(f"Recipe {source!r}: field 'versions' must map library names to version strings")
    for i, edit in enumerate(recipe["edits"]):
        _check_object(edit, _EDIT, f"edits[{i}]", source)
        if edit.get("init", "identity") not in ("identity", "paper"):
            raise RecipeError(f"Recipe {source!r}: edits[{i}].init must be 'identity' or 'paper', "
                              f"got {edit['init']!r}")
    for key in (recipe.get("model") or {}).get("args") or {}:
        if key in _FILE_ARGS:
            raise RecipeError(f"Recipe {source!r}: model argument {key!r} reads files from outside the recipe; "
                              f"put the base weights in the recipe's folder and name them in model.weights")
    if recipe.get("input_size") is not None:
        try:
            check_input_size(recipe["input_size"], what=f"input_size {json.dumps(recipe['input_size'])[:40]}")
        except SurgeonError as exc:
            raise RecipeError(f"Recipe {source!r}: {exc}") from exc
    weights = recipe.get("weights")
    if weights and any(not isinstance(p, str) for p in weights.get("include", [])):
        raise RecipeError(f"Recipe {source!r}: weights.include must list module paths")
    return recipe


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON value")


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out = dict(pairs)
    if len(out) != len(pairs):
        seen: set[str] = set()
        twice = next(k for k, _ in pairs if k in seen or seen.add(k))
        raise ValueError(f"field {twice!r} appears twice in one object")
    return out


def _strings(value: Any):
    """Every string in a parsed JSON value, keys included."""
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for k, v in value.items():
            yield k
            yield from _strings(v)
    elif isinstance(value, list):
        for v in value:
            yield from _strings(v)


def inside(folder: Path, relative: str, *, what: str) -> Path:
    """`folder / relative`, refused when `relative` is absolute or leads outside `folder`."""
    if not relative or os.path.isabs(relative) or Path(relative).drive:
        raise RecipeError(f"Recipe {what} {relative!r} must be a path relative to the recipe's folder")
    root = folder.resolve()
    path = (root / relative).resolve()
    if path != root and root not in path.parents:
        raise RecipeError(f"Recipe {what} {relative!r} leads outside the recipe's folder {str(folder)!r}")
    return path


def _json_file(file: Path, what: str) -> Any:
    if file.stat().st_size > MAX_BYTES:
        raise RecipeError(f"{what} {str(file)!r} is {file.stat().st_size:,} bytes; a recipe is a small JSON file")
    try:
        return json.loads(file.read_text(encoding="utf-8-sig"), parse_constant=_no_constant,
                          object_pairs_hook=_no_duplicates)
    except OSError as exc:
        raise RecipeError(f"Cannot read {what.lower()} {str(file)!r}: {exc.strerror or exc}") from exc
    except UnicodeDecodeError as exc:
        raise RecipeError(f"{what} {str(file)!r} is not UTF-8 text") from exc
    except json.JSONDecodeError as exc:
        raise RecipeError(f"{what} {str(file)!r} is not valid JSON (truncated?): {exc.msg} at line "
                          f"{exc.lineno}, column {exc.colno}") from exc
    except RecursionError as exc:
        raise RecipeError(f"{what} {str(file)!r} is nested too deeply to be a recipe") from exc
    except ValueError as exc:  # _no_constant, _no_duplicates, integers of thousands of digits
        raise RecipeError(f"{what} {str(file)!r} is not valid JSON: {str(exc).split(';')[0]}") from exc


def _from_hf_folder(folder: Path) -> dict[str, Any]:
    """The recipe of a patched Hugging Face model saved with `save_pretrained` (or by a Trainer): its config.json
    carries it (see `record.sync_config`). The base is built from the folder's config, which fine-tuning may have
    changed since the surgery (labels), and the weights are the folder's own, whole or sharded."""
    file = folder / HF_CONFIG
    config = _json_file(file, "Config")
    recipe = config.pop(CONFIG_KEY, None) if isinstance(config, dict) else None
    if not isinstance(recipe, dict):
        raise RecipeError(f"No recipe at {str(folder / RECIPE)!r}, and {str(file)!r} holds none: a Hugging Face "
                          "model saved before surgery (load it with transformers' from_pretrained)")
    model = recipe.get("model")
    if isinstance(model, dict) and str(model.get("ref", "")).startswith("hf:"):
        recipe["model"] = {**model, "args": {**(model.get("args") or {}), "config": config}}
    sharded = "model.safetensors.index.json"
    weights = sharded if (folder / sharded).is_file() and not (folder / "model.safetensors").is_file() \
        else "model.safetensors"
    recipe["weights"] = {"file": weights, "adapter": False}
    return validate(recipe, source=str(file))


def read_recipe(path: str | os.PathLike) -> tuple[Path, dict[str, Any]]:
    """Read and validate a recipe: a folder holding `recipe.json`, a Hugging Face `save_pretrained` folder whose
    config.json carries one, or the JSON file itself.

    Returns:
        (the recipe's folder, the recipe).

    Raises:
        RecipeError: missing, not JSON (e.g. truncated), or not valid against the schema.
    """
    raw = os.fspath(path)
    if not raw or "\0" in raw:
        raise RecipeError(f"No recipe at {raw!r}: not a usable path")
    p = Path(raw)
    if not os.path.lexists(p) and p.suffix != ".json":
        from surgeon.outputs import recover

        recover(p)  # a save killed between its renames leaves the previous save aside
    file = p / RECIPE if p.is_dir() else p
    if not file.is_file() and (p / HF_CONFIG).is_file():
        return p, _from_hf_folder(p)
    if not file.is_file():
        hint = " (a folder written by 'surgeon add --out' or surgeon.save)" if not p.suffix else ""
        raise RecipeError(f"No recipe at {str(file)!r}{hint}")
    recipe = _json_file(file, "Recipe")
    return file.parent, validate(recipe, source=str(file))


def check_names(recipe: dict[str, Any], *, source: str = "recipe") -> None:
    """Every attention the recipe names is registered (before anything is built).

    Raises:
        UnknownNameError: with close matches and the hint to check installed plugins.
    """
    from surgeon import registry
    from surgeon.errors import UnknownNameError

    for i, edit in enumerate(recipe["edits"]):
        try:
            registry.get_attention(edit["attention"])
        except UnknownNameError as exc:
            raise UnknownNameError(f"Recipe {source!r}, edits[{i}]: {exc} Is the plugin that provides it "
                                   f"installed?") from exc


# -- the base model ----------------------------------------------------------------------------------
def base_reference(recipe: dict[str, Any], folder: Path | None, *, trust_code: bool, source: str) -> str:
    """The base model reference, checked: user factories need `trust_code`; a `file.py:factory` is
    resolved inside the recipe's folder (a recipe dict with no folder may name an absolute path, as
    `surgeon.recipe_of` records it)."""
    from surgeon import models

    model = recipe.get("model")
    if not model:
        raise RecipeError(f"Recipe {source!r} names no base model; pass the base model (base=model, or "
                          f"MODEL on the command line)")
    ref = model["ref"]
    scheme, _ = models.describe(ref)
    if scheme != "factory":
        return ref
    if not trust_code:
        raise RecipeError(f"Recipe {source!r} builds its base model with the user factory {ref!r}, which "
                          f"imports and runs code; pass --trust-code (trust_code=True) if you trust it")
    target, _, attr = ref.rpartition(":")
    if target.endswith(".py"):
        if folder is None and os.path.isabs(target):  # a recipe dict from Python (recipe_of): no folder
            return ref
        if folder is None:
            raise RecipeError(f"Recipe {source!r}: {target!r} is relative to a recipe folder; read the "
                              f"recipe from its file")
        return f"{inside(folder, target, what='model file')}:{attr}"
    return ref


def build_base(recipe: dict[str, Any], folder: Path | None, *, trust_code: bool, with_weights: bool,
               source: str, allow_pickle: bool = False):
    """Build the recipe's base model. With `with_weights`, also its weights (pretrained, or the file
    the recipe names, which must sit in the recipe's folder)."""
    from surgeon import models

    ref = base_reference(recipe, folder, trust_code=trust_code, source=source)
    spec = recipe["model"]
    weights = None
    if with_weights and spec.get("weights"):
        if folder is None:
            raise RecipeError(f"Recipe {source!r}: base weights {spec['weights']!r} are relative to a recipe folder")
        weights = inside(folder, spec["weights"], what="base weights")
        if not weights.is_file():
            raise RecipeError(f"Recipe {source!r} needs its base weights {spec['weights']!r} beside it in "
                              f"{str(folder)!r}; copy the file there, or pass the base model yourself "
                              f"(surgeon apply DIR MODEL --weights FILE)")
    model = models.load(ref, pretrained=bool(with_weights and spec.get("pretrained")), weights=weights,
                        model_args=spec.get("args") or {}, allow_pickle=allow_pickle)
    # keep the recipe's own reference, with a model file's resolved path (a save copies the file)
    record.set_base(model, {**spec, "ref": ref})
    return model


# -- replay ------------------------------------------------------------------------------------------
def steps(edits: list[dict[str, Any]]) -> list[list[dict[str, Any]]]:
    """Group edits into the `add` calls that made them: runs of equal (step, attention, kind, options,
    init); recipes written by hand may leave `step` out."""
    groups: list[list[dict[str, Any]]] = []
    last = None
    for edit in edits:
        key = (edit.get("step"), edit["attention"], edit.get("kind"),
               json.dumps(edit.get("options", {}), sort_keys=True), edit.get("init", "identity"))
        if groups and key == last:
            groups[-1].append(edit)
        else:
            groups.append([edit])
        last = key
    return groups


def _example_from(spec: Any, source: str) -> tuple:
    """Example inputs from a recipe's `example_input`, with its form checked (one line when it is wrong)."""
    from surgeon import record

    try:
        for item in spec:
            check_input_size(item["shape"], what=f"example_input shape {json.dumps(item['shape'])[:40]}")
            if item["dtype"] not in ("float32", "float16", "bfloat16", "float64", "int64", "int32", "bool"):
                raise RecipeError(f"unsupported dtype {item['dtype']!r}")
        return record.inputs_from_spec(spec)
    except (KeyError, TypeError, ValueError, RuntimeError, RecipeError) as exc:
        raise RecipeError(f"Recipe {source!r}: example_input is not valid ({type(exc).__name__}: {exc})") from exc


def replay(recipe: dict[str, Any] | str | os.PathLike, base=None, *, trust_code: bool = False,
           verify: bool = True, input_size=None, allow_pickle: bool = False, example_input=None,
           _folder: Path | None = None):
    """Rebuild a patched model from a recipe: build (or take) the base model, then redo each step's
    edits at the same sites, in order.

    Args:
        recipe: a recipe dict, a recipe.json file, or a folder holding one.
        base: the base model to patch (not changed; the result shares its parameters). Default: built
            from the recipe's reference, with its pretrained or local weights.
        trust_code: allow a recipe whose base is a user factory (imports and runs its code).
        verify: check each step at identity init (see `surgeon.verify_model`).
        input_size: per-sample input shape (default: the recipe's).
        example_input: the model's example inputs (default: rebuilt from the recipe's `example_input`, for
            models with several or integer inputs, else made from the input size).
        allow_pickle: allow full unpickling of the base weights file the recipe names (trusted files only).

    Returns:
        nn.Module: the patched model, in eval mode.

    Raises:
        RecipeError: invalid recipe, untrusted factory. UnknownNameError: an attention that is not
        installed. NoSitesError / ShapeError: the recipe's sites are not in this model.

    Example:
        >>> model = surgeon.replay("my-plan.json", trust_code=False)
    """
    from torch import nn

    from surgeon import api
    from surgeon.errors import NoSitesError, ShapeError

    if isinstance(recipe, dict):
        folder, source = _folder, "recipe"
        recipe = validate(recipe, source=source)
    else:
        given = Path(recipe)
        folder, recipe = read_recipe(given)
        source = str(given / RECIPE if given.is_dir() else given)
    check_names(recipe, source=source)
    if base is None:
        model = build_base(recipe, folder, trust_code=trust_code, with_weights=True, source=source,
                           allow_pickle=allow_pickle)
    elif not isinstance(base, nn.Module):
        raise ModelError(f"base must be a torch.nn.Module, got {type(base).__name__}")
    else:
        from surgeon.surgery.rewrite import edits_of

        if edits_of(base):
            raise RecipeError(f"The base model already has {len(edits_of(base))} edits; pass the model "
                              f"before surgery")
        model = base
    size = input_size or recipe.get("input_size")
    example = example_input
    if example is not None:
        size = None
    elif recipe.get("example_input") and not input_size:  # several or integer inputs, recorded as they were
        example = _example_from(recipe["example_input"], source)
        size = None
    for group in steps(recipe["edits"]):
        first = group[0]
        names = [e["site"] for e in group]
        try:
            plan = api.plan(model, first["attention"], kind=first.get("kind"), at=[glob.escape(n) for n in names],
                            init=first.get("init", "identity"), input_size=size, example_input=example,
                            **first.get("options", {}))
        except NoSitesError as exc:
            raise NoSitesError(f"Recipe {source!r}: sites {names[:3]} of {first['attention']} are not all in "
                               f"this model ({exc})") from exc
        got = {e.site.name: e for e in plan.edits}
        for edit in group:
            shape = edit.get("shape")
            found = got[edit["site"]]
            if shape and list(found.site.shape[1:]) != list(shape[1:]):
                raise ShapeError(f"Recipe {source!r}: site {edit['site']!r} has shape "
                                 f"{list(found.site.shape[1:])} here, {list(shape[1:])} in the recipe "
                                 f"(another model, or another input size?)")
        model = plan.apply(verify=verify)
        log.debug("replayed step: %s at %d sites", first["attention"], len(group))
    if recipe.get("merged"):
        from surgeon.merging import drop_gates

        if not all(isinstance(p, str) for p in recipe["merged"]):
            raise RecipeError(f"Recipe {source!r}: field 'merged' must list gate module paths")
        drop_gates(model, recipe["merged"])
        record.set_merged(model, recipe["merged"])
    if recipe.get("folded_bn"):
        from surgeon.merging import fold_bn_pairs

        pairs = recipe["folded_bn"]
        if not all(isinstance(p, list) and len(p) == 2 and all(isinstance(x, str) for x in p) for p in pairs):
            raise RecipeError(f"Recipe {source!r}: field 'folded_bn' must list [conv, batchnorm] module path pairs")
        fold_bn_pairs(model, pairs, structure_only=True)
        record.set_folded_bn(model, pairs)
    return model.eval()
