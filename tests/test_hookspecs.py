"""Every hook spec's ``Example::`` block runs: executed as a plugin module, registered for the duration of
the test, and what it registers works through the API and the CLI."""
import inspect
import re
import textwrap
import types

import pytest
import torch
from click.testing import CliRunner
from torch import nn

import surgeon
from surgeon import hookspecs, registry
from surgeon.cli import cli
from surgeon.errors import UnknownNameError
from registered import plugin
from toy_models import PlainCNN, TinyResNet

HOOKS = sorted(name for name, f in inspect.getmembers(hookspecs, inspect.isfunction) if hasattr(f, "surgeon_spec"))


def example(hook: str) -> str:
    """The source of the indented block after ``Example::`` in the hook spec's docstring."""
    lines = inspect.getdoc(getattr(hookspecs, hook)).splitlines()
    start = lines.index("Example::") + 1
    block = []
    for line in lines[start:]:
        if line.strip() and not line.startswith(" "):
            break
        block.append(line)
    return textwrap.dedent("\n".join(block)).strip() + "\n"


def load_example(hook: str) -> types.ModuleType:
    """The example run as the body of a plugin module."""
    module = types.ModuleType(f"{hook}_example")
    exec(compile(example(hook), f"<{hook} example>", "exec"), module.__dict__)
    return module




def test_hooks_are_found():
    assert HOOKS == ["register_attentions", "register_commands", "register_model_sources", "register_site_finders"]


@pytest.mark.parametrize("hook", HOOKS)
def test_example_imports_only_surgeon_plugin_and_implements_its_hook(hook):
    source = example(hook)
    surgeon_imports = re.findall(r"^\s*(?:from|import) (surgeon\S*)", source, flags=re.M)
    assert surgeon_imports == ["surgeon.plugin"], source
    impls = [name for name, value in vars(load_example(hook)).items() if hasattr(value, "surgeon_impl")]
    assert impls == [hook]


def test_register_attentions_example():
    with plugin(load_example("register_attentions"), "attentions-example"):
        att = registry.get_attention("myse")
        assert (att.plugin, att.kinds, att.options) == ("attentions-example", ("residual", "after_conv"),
                                                         {"rd_ratio": 1 / 16})
        plan = surgeon.plan(TinyResNet().eval(), "myse", input_size=(3, 32, 32))
        assert len(plan.edits) == 6 and {e.site.kind for e in plan.edits} == {"residual"}
        model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1)).eval()
        x = torch.randn(2, 3, 16, 16)
        patched = surgeon.add(model, "myse", kind="after_conv", example_input=x, rd_ratio=0.5)
        assert torch.equal(patched(x), model(x))
        assert sum(p.numel() for p in patched.parameters()) > sum(p.numel() for p in model.parameters())
    assert "myse" not in registry.attentions()


class LinearAttention:
    """An attention for the example's kind: a gated linear layer on (N, C) features."""

    @surgeon.hookimpl
    def register_attentions(self, register):
        def build(site, *, init="identity"):
            from surgeon.plugin import gated

            return gated(nn.Linear(site.channels, site.channels), init)

        register("lin", build, kinds=("before_fc",), layouts=("nlc",), summary="", paper="")


def test_register_site_finders_example():
    with plugin(load_example("register_site_finders"), "finders-example"):
        assert registry.site_finders()["before_fc"].plugin == "finders-example"
        sites = surgeon.sites(TinyResNet().eval(), kind="before_fc", input_size=(3, 32, 32))
        assert [(s.name, s.shape, s.layout) for s in sites] == [("fc", (2, 32), "nlc")]
        assert [s.name for s in surgeon.sites(PlainCNN().eval(), kind="before_fc", input_size=(3, 16, 16))] == ["fc"]
        with plugin(LinearAttention(), "lin-plugin"):
            model, x = TinyResNet().eval(), torch.randn(2, 3, 32, 32)
            patched = surgeon.add(model, "lin", example_input=x)
            assert "flatten_lin.attn.weight" in patched.state_dict() and torch.equal(patched(x), model(x))
    assert "before_fc" not in registry.site_finders()


def test_register_model_sources_example():
    with plugin(load_example("register_model_sources"), "sources-example"):
        model = surgeon.load_model("mylab:small", model_args={"num_classes": 4})
        assert isinstance(model, nn.Sequential) and model[-1].out_features == 4
        with pytest.raises(UnknownNameError, match="Did you mean 'tiny'"):
            surgeon.load_model("mylab:tinny")
        plan = surgeon.plan("mylab:tiny", "se", kind="after_conv", input_size=(3, 8, 8))
        assert [e.site.name for e in plan.edits] == ["0"]


def test_register_commands_example():
    group = type(cli)(name="surgeon-test", commands=dict(cli.commands))
    with plugin(load_example("register_commands"), "commands-example"):
        runner = CliRunner()
        assert runner.invoke(group, ["hello"]).output.strip() == "hello from mylab"
        assert "Say hello." in runner.invoke(group, ["--help"]).output
