"""The pluggy contract: what a surgeon plugin may provide.

Each registration hook receives a `register` callback, so the host can grow the callback's keyword
arguments without changing any hook's signature. A plugin is any module or object with functions
decorated by `surgeon.hookimpl`; third-party packages expose it under the entry-point group "surgeon".
"""
from __future__ import annotations

from typing import Any, Callable

import pluggy

hookspec = pluggy.HookspecMarker("surgeon")
hookimpl = pluggy.HookimplMarker("surgeon")


@hookspec
def register_attentions(register: Callable[..., None]) -> None:
    """Register attention types.

    Call ``register(name, build, *, kinds, summary, paper, aliases=(), layouts=("nchw",))`` once per
    attention. ``build(site, *, init, **options) -> nn.Module`` makes the module for one site; its
    keyword-only parameters other than ``init`` are the attention's options, with their defaults.
    ``kinds`` lists the site kinds it serves, the first being its default.

    Example::

        @surgeon.hookimpl
        def register_attentions(register):
            def build(site, *, init, rd_ratio=1 / 16):
                from mylab.layers import MySE
                return surgeon.gated(MySE(site.channels, rd_ratio=rd_ratio), init)
            register("myse", build, kinds=("residual", "after_conv"),
                     summary="my squeeze-excitation", paper="Me et al., 2026")
    """


@hookspec
def register_site_finders(register: Callable[..., None]) -> None:
    """Register site finders: new site kinds.

    Call ``register(kind, find, *, summary)``. ``find(view) -> list[Site]`` takes the
    `surgeon.surgery.graph.GraphView` of one traced graph and returns the sites of that kind.

    Example::

        @surgeon.hookimpl
        def register_site_finders(register):
            def find(view):
                return [view.site_after(n, kind="before_fc") for n in view.nodes if view.is_linear(n)]
            register("before_fc", find, summary="before every linear layer")
    """


@hookspec
def register_model_sources(register: Callable[..., None]) -> None:
    """Register model reference schemes, e.g. a ``mylab:`` prefix.

    Call ``register(prefix, create, *, names=None, aliases=(), summary="")``.
    ``create(name, *, pretrained, **kwargs) -> nn.Module`` builds a model; ``names()`` lists valid
    names (used for "did you mean").

    Example::

        @surgeon.hookimpl
        def register_model_sources(register):
            register("mylab", mylab.zoo.create, names=mylab.zoo.names, summary="our lab's zoo")
    """


@hookspec
def register_commands(cli: Any) -> None:
    """Add commands to the ``surgeon`` click group.

    Example::

        @surgeon.hookimpl
        def register_commands(cli):
            @cli.command()
            def hello():
                click.echo("hi")
    """
