"""The plugin manager: built-in and third-party plugins, and lookup of what they registered.

Built-ins (`DEFAULT_PLUGINS`) and entry points in the group "surgeon" load through the same path.
The environment variable SURGEON_LOAD_PLUGINS, when set, is an allow-list of entry-point plugin
names (comma-separated; empty means none). Names registered twice are errors naming both plugins.
"""
from __future__ import annotations

import functools
import importlib
import inspect
import math
import os
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Callable

import pluggy

from surgeon import hookspecs
from surgeon.errors import OptionError, PluginError, did_you_mean, unknown

DEFAULT_PLUGINS = (
    "surgeon.plugins.channel",
    "surgeon.plugins.spatial",
    "surgeon.plugins.mixed",
    "surgeon.plugins.drop",
    "surgeon.plugins.pooling",
    "surgeon.plugins.self_attention",
    "surgeon.plugins.sequence",
    "surgeon.plugins.conv_gates",
    "surgeon.plugins.recalibration",
    "surgeon.plugins.grouped",
    "surgeon.plugins.strip",
    "surgeon.plugins.local_attention",
    "surgeon.plugins.pyramid",
    "surgeon.plugins.hard",
    "surgeon.plugins.sites",
    "surgeon.plugins.conv_sites",
    "surgeon.plugins.sequence_sites",
    "surgeon.plugins.sources",
)
ENTRY_POINT_GROUP = "surgeon"

_pm: pluggy.PluginManager | None = None


@dataclass(frozen=True)
class Attention:
    """An attention type: how to build it for a site, and what it can serve."""

    name: str
    build: Callable[..., Any]
    kinds: tuple[str, ...]
    summary: str
    paper: str
    aliases: tuple[str, ...] = ()
    layouts: tuple[str, ...] = ("nchw",)
    plugin: str = ""
    options: dict[str, Any] = field(default_factory=dict)
    option_types: dict[str, tuple[str, ...]] = field(default_factory=dict)
    family: str = ""

    @property
    def default_kind(self) -> str:
        return self.kinds[0]


@dataclass(frozen=True)
class SiteFinder:
    kind: str
    find: Callable[..., list]
    summary: str = ""
    plugin: str = ""


@dataclass(frozen=True)
class ModelSource:
    prefix: str
    create: Callable[..., Any]
    names: Callable[[], list[str]] | None = None
    aliases: tuple[str, ...] = ()
    summary: str = ""
    plugin: str = ""


def get_plugin_manager() -> pluggy.PluginManager:
    """The process-wide plugin manager, with every plugin loaded (idempotent)."""
    global _pm
    if _pm is None:
        pm = pluggy.PluginManager("surgeon")
        pm.add_hookspecs(hookspecs)
        _load_plugins(pm)
        _pm = pm
    return _pm


def _load_plugins(pm: pluggy.PluginManager) -> None:
    # 1. Built-ins, by module name, exactly as an entry point would be loaded.
    for modname in DEFAULT_PLUGINS:
        _register_module(pm, modname, modname)
    # 2. Third-party entry points, filtered by the allow-list when it is set.
    allow = os.environ.get("SURGEON_LOAD_PLUGINS")
    allowed = None if allow is None else {a.strip() for a in allow.split(",") if a.strip()}
    from importlib.metadata import entry_points

    for ep in entry_points(group=ENTRY_POINT_GROUP):
        if allowed is not None and ep.name not in allowed:
            continue
        if pm.has_plugin(ep.name):
            continue
        try:
            plugin = ep.load()
        except Exception as exc:
            raise PluginError(f"Plugin {ep.name!r} ({ep.value}) failed to import: {exc}") from exc
        pm.register(plugin, name=ep.name)
    pm.check_pending()


def _register_module(pm: pluggy.PluginManager, modname: str, name: str) -> None:
    try:
        module = importlib.import_module(modname)
    except Exception as exc:
        raise PluginError(f"Plugin {name!r} failed to import: {exc}") from exc
    pm.register(module, name=name)


# {hook name: (the implementations it was collected from, the items)}: collected again only when a plugin
# is registered or unregistered (each plan looks its attention up; building the table costs milliseconds)
_COLLECTED: dict[str, tuple[tuple, dict[str, Any]]] = {}


def _collect(hook_name: str, make: Callable[..., Any], key: Callable[[Any], list[str]]) -> dict[str, Any]:
    """Call one registration hook plugin by plugin; build items with `make`, keyed by `key`."""
    impls = tuple((impl.plugin_name, impl.function)
                  for impl in getattr(get_plugin_manager().hook, hook_name).get_hookimpls())
    cached = _COLLECTED.get(hook_name)
    if cached is None or cached[0] != impls:
        _COLLECTED[hook_name] = (impls, _collect_now(hook_name, make, key))
    return dict(_COLLECTED[hook_name][1])


def _collect_now(hook_name: str, make: Callable[..., Any], key: Callable[[Any], list[str]]) -> dict[str, Any]:
    pm = get_plugin_manager()
    items: dict[str, Any] = {}
    owners: dict[str, str] = {}
    for impl in getattr(pm.hook, hook_name).get_hookimpls():
        plugin_name = impl.plugin_name

        def register(*args: Any, _plugin: str = plugin_name, **kwargs: Any) -> None:
            try:
                item = make(*args, plugin=_plugin, **kwargs)
            except TypeError as exc:
                raise PluginError(f"Plugin {_plugin!r} called register() wrongly in {hook_name}: {exc}") from exc
            for k in key(item):
                if k in owners:
                    raise PluginError(
                        f"{k!r} is registered twice: by plugin {owners[k]!r} and by plugin {_plugin!r}"
                    )
                owners[k] = _plugin
            items[key(item)[0]] = item

        impl.function(register)
    return items


def _make_attention(name: str, build: Callable[..., Any], *, kinds: tuple[str, ...] | list[str], summary: str,
                    paper: str, aliases: tuple[str, ...] | list[str] = (), layouts: tuple[str, ...] | list[str] = ("nchw",),
                    family: str = "", plugin: str = "") -> Attention:
    if not kinds:
        raise PluginError(f"Plugin {plugin!r}: attention {name!r} lists no kinds")
    option_types = build_option_types(build)
    return Attention(name=name, build=_checked(name, build, option_types), kinds=tuple(kinds), summary=summary,
                     paper=paper, aliases=tuple(aliases), layouts=tuple(layouts), plugin=plugin,
                     options=build_options(build), option_types=option_types,
                     family=family or default_family(plugin))


def default_family(plugin: str) -> str:
    """The family of an attention registered without one: its plugin's name, last dotted part, with spaces
    ('surgeon.plugins.self_attention' -> 'self attention')."""
    return plugin.rpartition(".")[2].replace("_", " ") or "other"


def _option_params(build: Callable[..., Any]) -> list[inspect.Parameter]:
    return [p for p in inspect.signature(build).parameters.values()
            if p.kind is inspect.Parameter.KEYWORD_ONLY and p.name != "init"]


def build_options(build: Callable[..., Any]) -> dict[str, Any]:
    """The options of a build function: its keyword-only parameters other than `init`, with defaults."""
    return {p.name: None if p.default is inspect.Parameter.empty else p.default for p in _option_params(build)}


# -- option types ----------------------------------------------------------------------------------------
_TYPE_NAMES = {bool: "bool", int: "int", float: "float", str: "str", type(None): "None"}
_VALID = {"bool": "true or false", "int": "an integer", "float": "a finite number", "None": "None (the default)"}


def _type_names(annotation: Any, default: Any) -> tuple[str, ...]:
    """The checked types an option's annotation names ('int | None' -> ('int', 'None')); () = unchecked.
    Without an annotation, the default's type (a None default says nothing)."""
    if annotation is inspect.Parameter.empty:
        name = _TYPE_NAMES.get(type(default))
        return (name,) if name in ("bool", "int", "float") else ()
    if isinstance(annotation, str):  # `from __future__ import annotations`
        parts = tuple(a.strip() for a in annotation.replace("Optional[", "").rstrip("]").split("|"))
    elif isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        parts = tuple(_TYPE_NAMES.get(a, "?") for a in typing.get_args(annotation))
    else:
        parts = (_TYPE_NAMES.get(annotation, "?"),)
    # a type we do not check (a str, a class, a mapping) leaves the option to the layer's own checks
    return parts if all(p in ("bool", "int", "float", "None") for p in parts) else ()


def build_option_types(build: Callable[..., Any]) -> dict[str, tuple[str, ...]]:
    """The checked types of a build function's options, from its signature's annotations (or defaults)."""
    return {p.name: names for p in _option_params(build) if (names := _type_names(p.annotation, p.default))}


def _fits(value: Any, type_name: str) -> bool:
    if type_name == "None":
        return value is None
    if type_name == "bool":
        return isinstance(value, bool)
    if isinstance(value, bool):
        return False
    if type_name == "int":
        return isinstance(value, int)
    return isinstance(value, (int, float)) and math.isfinite(value)  # float: ints are fine, nan/inf are not


def check_options(attention: str, option_types: dict[str, tuple[str, ...]], options: dict[str, Any]) -> None:
    """Check option values against the types their signature names.

    Raises:
        OptionError: one line naming the attention, the option, its value and what is valid.
    """
    for key, value in options.items():
        names = option_types.get(key)
        if names and not any(_fits(value, t) for t in names):
            valid = " or ".join(_VALID[t] for t in names)
            raise OptionError(f"{attention}: option {key}={value!r} is not valid; {key} must be {valid}")


def _checked(attention: str, build: Callable[..., Any], option_types: dict[str, tuple[str, ...]]) -> Callable[..., Any]:
    """`build`, checking its options' types first (the same signature, so options still read from it); a layer's
    OptionError gets the attention's name in front, as the type checks have it."""
    @functools.wraps(build)
    def checked(*args: Any, **options: Any) -> Any:
        check_options(attention, option_types, {k: v for k, v in options.items() if k != "init"})
        try:
            return build(*args, **options)
        except OptionError as exc:
            if str(exc).startswith(attention):
                raise
            raise type(exc)(f"{attention}: {exc}") from exc  # the same class: SiteShapeError stays one

    return checked


def parse_cli_options(attention: str, options: dict[str, Any]) -> dict[str, Any]:
    """Options as `--option k=v` parsed them, with the command line's forms of a bool ('true'/'false'/'1'/'0',
    parsed as True/False/1/0) turned into bools for options whose type is bool; anything else unchanged, for
    `check_options` to judge."""
    types_ = get_attention(attention).option_types
    forms = {1: True, 0: False, "1": True, "0": False, "true": True, "false": False}
    out = dict(options)
    for key, value in options.items():
        if types_.get(key) == ("bool",) and not isinstance(value, bool):
            lowered = value.lower() if isinstance(value, str) else value
            if isinstance(lowered, (str, int)) and lowered in forms:
                out[key] = forms[lowered]
    return out


def attentions() -> dict[str, Attention]:
    """Every registered attention, by name."""
    return _collect("register_attentions", _make_attention, lambda a: [a.name, *a.aliases])


def get_attention(name: str) -> Attention:
    """Look an attention up by name or alias.

    Raises:
        UnknownNameError: with close matches when nothing has that name.
    """
    table = attentions()
    for att in table.values():
        if name == att.name or name in att.aliases:
            return att
    names = [n for a in table.values() for n in (a.name, *a.aliases)]
    raise unknown("attention", name, names, "Run 'surgeon list' for all attentions.")


def site_finders() -> dict[str, SiteFinder]:
    """Every registered site finder, by kind."""
    return _collect("register_site_finders",
                    lambda kind, find, *, summary="", plugin="": SiteFinder(kind, find, summary, plugin),
                    lambda f: [f.kind])


def finders() -> dict[str, Callable[..., list]]:
    """Every registered site finder's function, by kind: what `surgery.sites.find_sites` is handed."""
    return {kind: f.find for kind, f in site_finders().items()}


def model_sources() -> dict[str, ModelSource]:
    """Every registered model source, by prefix (aliases resolve to the same source)."""
    def make(prefix: str, create: Callable[..., Any], *, names: Callable[[], list[str]] | None = None,
             aliases: tuple[str, ...] | list[str] = (), summary: str = "", plugin: str = "") -> ModelSource:
        return ModelSource(prefix, create, names, tuple(aliases), summary, plugin)

    found = _collect("register_model_sources", make, lambda s: [s.prefix, *s.aliases])
    table = dict(found)
    for src in found.values():
        for alias in src.aliases:
            table[alias] = src
    return table


def check_kind(kind: str) -> None:
    """Raise UnknownNameError if no finder serves `kind`."""
    kinds = site_finders()
    if kind not in kinds:
        raise unknown("kind", kind, kinds, f"Valid kinds: {', '.join(sorted(kinds))}.")


__all__ = ["Attention", "SiteFinder", "ModelSource", "get_plugin_manager", "attentions", "get_attention",
           "site_finders", "finders", "model_sources", "check_kind", "check_options", "parse_cli_options", "did_you_mean",
           "DEFAULT_PLUGINS"]
