"""The pluggy contract: every hook, duplicate names, and a real installed plugin package."""
import importlib.metadata
import json
import os
import subprocess
import sys
import textwrap
import types

import click
import pluggy
import pytest
import torch
from click.testing import CliRunner
from torch import nn

import surgeon
from surgeon import registry
from surgeon.cli import cli
from surgeon.errors import PluginError
from toy_models import TinyResNet
from registered import plugin




class Doubler(nn.Module):
    def __init__(self, channels, *, factor=2.0):
        super().__init__()
        self.factor = factor

    def forward(self, x):
        return x * self.factor


class AttentionPlugin:
    @surgeon.hookimpl
    def register_attentions(self, register):
        def build(site, *, init="identity", factor=2.0):
            from surgeon.layers import gated

            return gated(Doubler(site.channels, factor=factor), init)

        register("doubler", build, kinds=("residual",), summary="multiplies by a factor", paper="none")


def test_register_attentions_hook_api_and_cli():
    with plugin(AttentionPlugin(), "doubler-plugin"):
        assert surgeon.attentions()[[a.name for a in surgeon.attentions()].index("doubler")].options == {"factor": 2.0}
        model = TinyResNet().eval()
        x = torch.randn(2, 3, 32, 32)
        patched = surgeon.add(model, "doubler", example_input=x, factor=3.0)
        assert torch.equal(patched(x), model(x))
        rows = json.loads(CliRunner().invoke(cli, ["list", "--json"]).output)
        assert any(r["name"] == "doubler" and r["plugin"] == "doubler-plugin" for r in rows)
    assert "doubler" not in [a.name for a in surgeon.attentions()]


class FinderPlugin:
    @surgeon.hookimpl
    def register_site_finders(self, register):
        from surgeon.plugin import site_after

        def find(view):
            return [site_after(view, n.args[0], kind="before_fc", user=n, name=n.target)
                    for n in view.nodes if n.op == "call_module" and isinstance(view.module(n), nn.Linear)]

        register("before_fc", find, summary="before every linear layer")


def test_register_site_finders_hook_api_and_cli():
    with plugin(FinderPlugin(), "finder-plugin"):
        sites = surgeon.sites(TinyResNet().eval(), kind="before_fc", input_size=(3, 32, 32))
        assert [(s.name, s.shape) for s in sites] == [("fc", (2, 32))]
        out = CliRunner().invoke(cli, ["sites", "toy_models:tiny_resnet", "--kind", "before_fc",
                                       "--input-size", "3,32,32", "--json"]).output
        assert json.loads(out)[0]["name"] == "fc"


class SourcePlugin:
    @surgeon.hookimpl
    def register_model_sources(self, register):
        register("mylab", lambda name, pretrained=False, **kw: TinyResNet(**kw), names=lambda: ["tiny"],
                 summary="a lab zoo")


def test_register_model_sources_hook_api_and_cli():
    with plugin(SourcePlugin(), "source-plugin"):
        assert isinstance(surgeon.load_model("mylab:tiny", model_args={"num_classes": 4}), TinyResNet)
        result = CliRunner().invoke(cli, ["sites", "mylab:tinny", "--input-size", "3,32,32"])
        assert result.exit_code == 2 and "Unknown mylab model 'tinny'. Did you mean 'tiny'" in result.output


class CommandPlugin:
    @surgeon.hookimpl
    def register_commands(self, cli):
        @cli.command()
        def hello():
            """Say hello."""
            click.echo("hello from a plugin")


def test_register_commands_hook():
    group = type(cli)(name="surgeon-test", commands=dict(cli.commands))
    with plugin(CommandPlugin(), "command-plugin"):
        result = CliRunner().invoke(group, ["hello"])
    assert result.output.strip() == "hello from a plugin"


def test_duplicate_names_are_errors_naming_both_plugins():
    class Clash:
        @surgeon.hookimpl
        def register_attentions(self, register):
            register("cbam", lambda site, *, init="identity": nn.Identity(), kinds=("residual",), summary="", paper="")

    with plugin(Clash(), "clash-plugin"):
        with pytest.raises(PluginError, match="'cbam' is registered twice: by plugin 'surgeon.plugins.mixed' and by "
                                              "plugin 'clash-plugin'"):
            surgeon.attentions()


def test_misspelt_hook_fails_loudly(monkeypatch):
    # a third-party plugin with a typo, loaded by the loader from its entry point into a fresh plugin manager
    typo = types.ModuleType("surgeon_typo")

    @surgeon.hookimpl
    def register_attentons(register):
        pass

    typo.register_attentons = register_attentons
    monkeypatch.setitem(sys.modules, "surgeon_typo", typo)
    ep = importlib.metadata.EntryPoint(name="typo", value="surgeon_typo", group=registry.ENTRY_POINT_GROUP)
    monkeypatch.setattr(importlib.metadata, "entry_points", lambda group: [ep] if group == ep.group else [])
    monkeypatch.setenv("SURGEON_LOAD_PLUGINS", "typo")
    monkeypatch.setattr(registry, "_pm", None)
    with pytest.raises(pluggy.PluginValidationError, match="unknown hook 'register_attentons' in plugin"):
        registry.get_plugin_manager()


@pytest.fixture(scope="module")
def installed_plugin(tmp_path_factory):
    """Build and install a real throw-away plugin package into a target folder."""
    root = tmp_path_factory.mktemp("plugin")
    src = root / "src"
    (src / "surgeon_halve").mkdir(parents=True)
    (src / "surgeon_halve" / "__init__.py").write_text(textwrap.dedent('''
        from surgeon.plugin import hookimpl

        @hookimpl
        def register_attentions(register):
            def build(site, *, init="identity"):
                import torch
                from surgeon.plugin import gated
                class Halve(torch.nn.Module):
                    def forward(self, x):
                        return x / 2
                return gated(Halve(), init)
            register("halve", build, kinds=("residual",), summary="halves", paper="none")
    '''))
    (src / "pyproject.toml").write_text(textwrap.dedent('''
        [build-system]
        requires = ["setuptools>=64"]
        build-backend = "setuptools.build_meta"
        [project]
        name = "surgeon-halve"
        version = "0.1"
        [project.entry-points.surgeon]
        halve = "surgeon_halve"
    '''))
    target = root / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                    "--target", str(target), str(src)], check=True)
    return target


def test_installed_plugin_package_is_found_by_entry_point(installed_plugin, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(installed_plugin)}
    env.pop("SURGEON_LOAD_PLUGINS", None)
    surgeon_bin = [sys.executable, "-m", "surgeon.cli"]
    listing = subprocess.run(surgeon_bin + ["list", "--json"], env=env, capture_output=True, text=True)
    assert any(r["name"] == "halve" and r["plugin"] == "halve" for r in json.loads(listing.stdout))
    factory = f"{os.path.join(os.path.dirname(__file__), 'toy_models.py')}:tiny_resnet"
    added = subprocess.run(surgeon_bin + ["add", "halve", factory, "--input-size",
                                          "3,32,32", "--json"], env=env, capture_output=True, text=True)
    assert added.returncode == 0, added.stderr
    assert json.loads(added.stdout)["verification"]["max_abs_diff"] == 0
    # the allow-list keeps it out
    blocked = subprocess.run(surgeon_bin + ["list", "--json"], env={**env, "SURGEON_LOAD_PLUGINS": ""},
                             capture_output=True, text=True)
    assert "halve" not in [r["name"] for r in json.loads(blocked.stdout)]


def test_attention_named_like_a_python_keyword_still_inserts():
    class Keyword:
        @surgeon.hookimpl
        def register_attentions(self, register):
            def build(site, *, init="identity"):
                from surgeon.layers import gated

                return gated(Doubler(site.channels), init)

            register("yield", build, kinds=("residual",), summary="", paper="")

    with plugin(Keyword(), "keyword-plugin"):
        x = torch.randn(2, 3, 32, 32)
        model = TinyResNet().eval()
        patched = surgeon.add(model, "yield", example_input=x)
        assert "stage1.0.yield_.gamma" in patched.state_dict() and torch.equal(patched(x), model(x))


def test_surgeon_plugin_exports_everything_and_its_light_names_stay_torch_free():
    import surgeon.plugin

    assert all(getattr(surgeon.plugin, name) is not None for name in surgeon.plugin.__all__)
    assert surgeon.plugin.hookimpl is surgeon.hookimpl and surgeon.plugin.is_conv.__module__ == "surgeon.surgery.graph"
    code = ("import sys, surgeon, surgeon.plugin; from surgeon.plugin import hookimpl, feature_map, site_after; "
            "sys.exit(1 if 'torch' in sys.modules else 0)")
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0
