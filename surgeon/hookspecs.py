"""The pluggy contract: what a surgeon plugin may provide.

Each registration hook receives a `register` callback, so the host can grow the callback's keyword
arguments without changing any hook's signature. A plugin is any module or object with functions decorated
by `surgeon.plugin.hookimpl`; third-party packages expose it under the entry-point group "surgeon". Plugin
authors import everything from `surgeon.plugin`; tests/test_hookspecs.py runs each hook's ``Example::``.
"""
from __future__ import annotations

from typing import Any, Callable

import pluggy

hookspec = pluggy.HookspecMarker("surgeon")
hookimpl = pluggy.HookimplMarker("surgeon")


@hookspec
def register_attentions(register: Callable[..., None]) -> None:
    """Register attention types.

    Call ``register(name, build, *, kinds, summary, paper, aliases=(), layouts=("nchw",), family="")``
    once per attention; ``family`` groups it in ``surgeon list`` (default: the plugin's name).
    ``build(site, *, init, **options) -> nn.Module`` makes the module for one site; its keyword-only
    parameters other than ``init`` are the attention's options, with their defaults.
    ``kinds`` lists the site kinds it serves, the first being its default. ``gated(module, init)`` gives
    identity init by a zero gate; ``feature_map(MySE, name="myse", ranks=(4,))`` writes the build below
    for any layer ``cls(channels, **options)``, and also acts on channels-last sites through ``ChannelsLast``.
    ``layouts`` lists the site layouts it acts on: 'nchw' (channels at dim 1, any rank), 'nhwc' (channels
    last behind positional dims), 'nlc' (tokens), 'lnc' (time-first tokens); a site's layout is derived
    from the ops that produce its tensor.

    Example::

        from torch import nn

        class MySE(nn.Module):  # plain PyTorch, e.g. in mylab/layers.py
            def __init__(self, channels, *, rd_ratio=1 / 16):
                super().__init__()
                hidden = max(1, round(channels * rd_ratio))
                self.fc = nn.Sequential(nn.Conv2d(channels, hidden, 1), nn.ReLU(), nn.Conv2d(hidden, channels, 1))

            def forward(self, x):
                return x * self.fc(x.mean((2, 3), keepdim=True)).sigmoid()

        from surgeon.plugin import gated, hookimpl, require_feature_map

        @hookimpl
        def register_attentions(register):
            def build(site, *, init="identity", rd_ratio: float = 1 / 16):
                require_feature_map(site, "myse", ranks=(4,))
                return gated(MySE(site.channels, rd_ratio=rd_ratio), init)

            register("myse", build, kinds=("residual", "after_conv"),
                     summary="my squeeze-excitation", paper="Me et al., 2026")
    """


@hookspec
def register_site_finders(register: Callable[..., None]) -> None:
    """Register site finders: new site kinds.

    Call ``register(kind, find, *, summary)``. ``find(view) -> list[Site]`` takes the `GraphView` of one
    traced graph and returns the sites of that kind. ``site_after(view, node, kind=...)`` makes the site that
    receives a node's output; the node predicates (``is_conv``, ``is_linear``, ``is_act``, ...) take
    ``(node, view.modules)``, or go through ``view.is_(predicate, node)``.

    Example::

        from surgeon.plugin import hookimpl, is_linear, site_after

        @hookimpl
        def register_site_finders(register):
            def find(view):
                return [site_after(view, n.args[0], kind="before_fc", user=n, name=n.target)
                        for n in view.nodes if n.op == "call_module" and is_linear(n, view.modules)]

            register("before_fc", find, summary="before every linear layer")
    """


@hookspec
def register_model_sources(register: Callable[..., None]) -> None:
    """Register model reference schemes, e.g. a ``mylab:`` prefix.

    Call ``register(prefix, create, *, names=None, aliases=(), summary="")``.
    ``create(name, *, pretrained, **kwargs) -> nn.Module`` builds a model; ``names()`` lists valid
    names (used for "did you mean").

    Example::

        from surgeon.plugin import hookimpl

        def create(name, *, pretrained=False, num_classes=10):
            from torch import nn

            width = {"tiny": 8, "small": 16}[name]
            return nn.Sequential(nn.Conv2d(3, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
                                 nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, num_classes))

        @hookimpl
        def register_model_sources(register):
            register("mylab", create, names=lambda: ["tiny", "small"], summary="our lab's zoo")
    """


@hookspec
def register_commands(cli: Any) -> None:
    """Add commands to the ``surgeon`` click group.

    Example::

        import click

        from surgeon.plugin import hookimpl

        @hookimpl
        def register_commands(cli):
            @cli.command(help="Say hello.")
            def hello():
                click.echo("hello from mylab")
    """
