"""The catalogue `surgeon list` shows: every attention with its family, kinds, paper, the parameters it adds
to ResNet-50 (computed once, then cached on disk) and its published ResNet-50 figure, if tests assert one.

The cache is a JSON file per surgeon and torch version in the user's cache dir ($SURGEON_CACHE_DIR, else
$XDG_CACHE_HOME/surgeon, else ~/.cache/surgeon); attentions missing from it (a newly installed plugin) are
computed and added. Reading a full cache imports no torch.
"""
from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from surgeon import registry
from surgeon.errors import SurgeonError
from surgeon.figures import R50_FIGURES

log = logging.getLogger("surgeon")

R50_INPUT = (1, 3, 224, 224)  # its native input: sizes matter only to bot's relative tables


def cache_dir() -> Path:
    """Where surgeon caches computed figures."""
    if os.environ.get("SURGEON_CACHE_DIR"):
        return Path(os.environ["SURGEON_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "surgeon"


def _cache_file() -> Path:
    from surgeon import __version__

    try:
        torch_version = version("torch")
    except PackageNotFoundError:  # a torch built from source: the module knows its version
        import torch

        torch_version = torch.__version__
    return cache_dir() / f"r50-params-surgeon{__version__}-torch{torch_version}.json"


def _read(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _write(path: Path, data: dict[str, Any]) -> None:
    """Write atomically; a cache that cannot be written is only a warning (the figures were computed)."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
        tmp.replace(path)
    except OSError as exc:
        log.warning(f"could not write the cache {path}: {exc}")


def _count(build, site, **options: Any) -> int:
    """Parameters of the paper-init module `build` makes for `site`, built on the meta device (no memory)
    where the layer allows, else on the CPU."""
    import torch

    try:
        with torch.device("meta"):
            module = build(site, init="paper", **options)
    except (RuntimeError, NotImplementedError):
        module = build(site, init="paper", **options)
    return sum(p.numel() for p in module.parameters())


def r50_added(att: registry.Attention, sites_by_kind: dict[str, list], **options: Any) -> dict[str, Any] | None:
    """What `att` adds to ResNet-50 at paper init, on every site of its first kind ResNet-50 has:
    {'kind', 'sites', 'params'}; None when ResNet-50 has no site it serves (sequence attentions)."""
    kind = next((k for k in att.kinds if sites_by_kind.get(k)), None)
    if kind is None:
        return None
    sites = sites_by_kind[kind]
    return {"kind": kind, "sites": len(sites), "params": sum(_count(att.build, s, **options) for s in sites)}


def _r50_or_none(att: registry.Attention, sites_by_kind: dict[str, list]) -> dict[str, Any] | None:
    """`r50_added` with its defaults; None (and a log line) when the attention cannot be built there: one
    plugin's attention that does not fit ResNet-50 must not break the listing."""
    try:
        return r50_added(att, sites_by_kind)
    except (SurgeonError, ValueError, TypeError) as exc:
        log.debug(f"{att.name}: no ResNet-50 count, {exc}")
        return None


def r50_sites() -> dict[str, list]:
    """The sites of a torchvision ResNet-50 (no weights), per kind."""
    import torch
    import torchvision

    import surgeon

    torch.manual_seed(0)
    model = torchvision.models.resnet50().eval()
    found = surgeon.sites(model, example_input=torch.zeros(R50_INPUT))
    by_kind: dict[str, list] = {}
    for s in found:
        by_kind.setdefault(s.kind, []).append(s)
    return by_kind


def r50_params(atts: list[registry.Attention], *, refresh: bool = False) -> dict[str, dict[str, Any] | None]:
    """Per attention name, what it adds to ResNet-50 (see `r50_added`), from the cache where present."""
    path = _cache_file()
    cached = {} if refresh else _read(path)
    missing = [a for a in atts if a.name not in cached]
    if missing:
        by_kind = r50_sites()
        for att in missing:
            cached[att.name] = _r50_or_none(att, by_kind)
        _write(path, cached)
    return {a.name: cached[a.name] for a in atts}


def catalogue(*, params: bool = True) -> list[dict[str, Any]]:
    """Every attention as a dict, sorted by family then name: name, family, aliases, kinds, options, summary,
    paper, plugin, r50 (what it adds to ResNet-50, see `r50_added`; absent with params=False) and published
    (its published ResNet-50 figure that the tests assert, else None)."""
    atts = sorted(registry.attentions().values(), key=lambda a: (a.family, a.name))
    added = r50_params(atts) if params else {}
    out = []
    for a in atts:
        fig = R50_FIGURES.get(a.name)
        entry = {"name": a.name, "family": a.family, "aliases": list(a.aliases), "kinds": list(a.kinds),
                 "options": dict(a.options), "summary": a.summary, "paper": a.paper, "plugin": a.plugin,
                 "published": asdict(fig) if fig else None}
        if params:
            entry["r50"] = added[a.name]
        out.append(entry)
    return out
