"""surgeon.catalogue and `surgeon list`: families, ResNet-50 parameters (computed, cached), published figures."""
import json

import pytest
from click.testing import CliRunner

from surgeon import catalogue, registry
from surgeon.cli import cli
from surgeon.figures import R50_FIGURES

RESNET50_PARAMS = 25_557_032
RESNET50_BLOCKS = [256] * 3 + [512] * 4 + [1024] * 6 + [2048] * 3


@pytest.fixture(scope="module")
def r50_sites():
    return catalogue.r50_sites()


def _eca_per_stage(att, sites):
    """ECA-Net50 as trained in the official README: `--ksize 3557`, a kernel size per stage."""
    k = {"layer1": 3, "layer2": 5, "layer3": 5, "layer4": 7}
    return sum(catalogue.r50_added(att, {"residual": [s]}, kernel_size=k[s.name.split(".")[0]])["params"]
               for s in sites["residual"])


@pytest.mark.parametrize("name", sorted(R50_FIGURES))
def test_published_resnet50_figures(r50_sites, name):
    """Every figure `surgeon list` marks as published is asserted here, through the count it displays."""
    fig, att = R50_FIGURES[name], registry.get_attention(name)
    added = _eca_per_stage(att, r50_sites) if name == "eca" else catalogue.r50_added(att, r50_sites)["params"]
    assert added == fig.added
    if fig.total_m is not None:
        assert round((RESNET50_PARAMS + added) / 1e6, 2) == fig.total_m
        assert fig.derived  # a rounded total pins the count only with the derivation


def test_resnet50_counts_are_per_site_sums(r50_sites):
    se = catalogue.r50_added(registry.get_attention("se"), r50_sites)
    assert se == {"kind": "residual", "sites": 16,
                  "params": sum(2 * c * (c // 16) + c // 16 + c for c in RESNET50_BLOCKS)}
    assert catalogue.r50_added(registry.get_attention("mhsa"), r50_sites) is None  # tokens: ResNet-50 has none
    assert catalogue.r50_added(registry.get_attention("nl"), r50_sites)["kind"] == "stage"


def _run(*args):
    return CliRunner().invoke(cli, list(args), catch_exceptions=False)


def test_list_json_groups_by_family_with_resnet50_figures(tmp_path, monkeypatch, r50_sites):
    monkeypatch.setenv("SURGEON_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(catalogue, "r50_sites", lambda: r50_sites)  # traced once for the module
    result = _run("list", "--json")
    assert result.exit_code == 0
    rows = json.loads(result.output)
    names = [r["name"] for r in rows]
    assert len(names) == len(set(names)) == len(registry.attentions()) >= 42
    assert [(r["family"], r["name"]) for r in rows] == sorted((r["family"], r["name"]) for r in rows)
    by = {r["name"]: r for r in rows}
    assert {"channel", "spatial", "mixed", "self attention", "sequence"} <= {r["family"] for r in rows}
    assert by["simam"]["family"] == "channel" and by["bot"]["family"] == "self attention"
    assert by["se"]["r50"]["params"] == sum(2 * c * (c // 16) + c // 16 + c for c in RESNET50_BLOCKS)
    assert by["mhsa"]["r50"] is None
    assert by["eca"]["published"]["added"] == 80 and by["se"]["published"] is None
    assert {r["name"] for r in rows if r["published"]} == set(R50_FIGURES)
    for r in rows:
        assert r["kinds"] and r["paper"] and r["summary"] and {"aliases", "options", "plugin"} <= set(r)
    # the cache: one file keyed by the surgeon and torch versions, holding every attention
    from importlib.metadata import version

    import surgeon
    (cached,) = tmp_path.iterdir()
    assert cached.name == f"r50-params-surgeon{surgeon.__version__}-torch{version('torch')}.json"
    assert json.loads(cached.read_text()) == {r["name"]: r["r50"] for r in rows}
    # the table: family headings, the ResNet-50 column and the published one
    table = _run("list").output
    assert "self attention" in table and "+2.53M (residual ×16)" in table and "+80" in table
    assert f"{len(rows)} attentions in" in table


def test_cache_is_read_filled_in_and_refreshed(tmp_path, monkeypatch, r50_sites):
    monkeypatch.setenv("SURGEON_CACHE_DIR", str(tmp_path / "deep" / "er"))
    atts = [registry.get_attention(n) for n in ("se", "simam", "mhsa")]
    calls = []

    def counting():
        calls.append(1)
        return r50_sites

    monkeypatch.setattr(catalogue, "r50_sites", counting)
    first = catalogue.r50_params(atts)
    assert len(calls) == 1 and first["simam"] == {"kind": "residual", "sites": 16, "params": 0}
    assert catalogue.r50_params(atts) == first and len(calls) == 1  # read from the cache
    path = next((tmp_path / "deep" / "er").iterdir())
    data = json.loads(path.read_text())
    data["se"] = {"kind": "residual", "sites": 16, "params": -1}  # a cached value is believed...
    del data["simam"]  # ...and a missing one is computed and added
    path.write_text(json.dumps(data))
    again = catalogue.r50_params(atts)
    assert again["se"]["params"] == -1 and again["simam"] == first["simam"] and len(calls) == 2
    assert "simam" in json.loads(path.read_text())
    assert catalogue.r50_params(atts, refresh=True) == first and len(calls) == 3
    path.write_text("{not json")  # a corrupt cache is recomputed, not an error
    assert catalogue.r50_params(atts) == first and len(calls) == 4


def test_cache_dir_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.delenv("SURGEON_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert catalogue.cache_dir() == tmp_path / "surgeon"
    monkeypatch.setenv("SURGEON_CACHE_DIR", str(tmp_path / "x"))
    assert catalogue.cache_dir() == tmp_path / "x"


def test_family_defaults_to_the_plugin_name():
    assert registry.default_family("surgeon.plugins.self_attention") == "self attention"
    assert registry.default_family("mylab") == "mylab"
    assert registry.get_attention("attnpool").family == "pooling"


def test_an_attention_that_does_not_fit_resnet50_lists_without_a_count(tmp_path, monkeypatch, r50_sites):
    from registered import plugin
    from surgeon.hookspecs import hookimpl
    from surgeon.errors import OptionError

    class Picky:
        @hookimpl
        def register_attentions(self, register):
            def build(site, *, init="identity"):
                raise OptionError(f"needs at most 64 channels, site has {site.channels}")

            register("picky", build, kinds=("residual",), summary="s", paper="p")

    monkeypatch.setenv("SURGEON_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(catalogue, "r50_sites", lambda: r50_sites)
    with plugin(Picky(), "picky_plugin"):
        rows = {e["name"]: e for e in catalogue.catalogue()}
    assert rows["picky"]["r50"] is None and rows["picky"]["family"] == "picky plugin"
    assert rows["se"]["r50"]["params"] == sum(2 * c * (c // 16) + c // 16 + c for c in RESNET50_BLOCKS)
