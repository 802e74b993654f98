"""The options several `surgeon` commands share (click decorators; no torch import)."""
from __future__ import annotations

from typing import Any, Callable

import click

from surgeon.errors import SurgeonError


def input_size(_ctx, _param, value: str | None) -> tuple[int, ...] | None:
    from surgeon.recipe import check_input_size

    def number(text: str) -> int | str:
        try:
            return int(text)
        except ValueError:
            return text

    if value is None:
        return None
    try:
        return check_input_size([number(v) for v in value.lower().replace("x", ",").split(",")], what=repr(value))
    except SurgeonError as exc:
        raise click.BadParameter(str(exc)) from None


def model_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Options shared by commands that build a model from a reference."""
    for deco in reversed([
        click.option("--model-arg", "model_args", multiple=True, metavar="K=V",
                     help="Keyword argument for the model constructor (repeatable), e.g. num_classes=10."),
        click.option("--pretrained", is_flag=True, help="Use the model library's own pretrained weights."),
        click.option("--weights", type=click.Path(dir_okay=False), help="Load a local weights file "
                     "(.safetensors, or a torch checkpoint read with weights_only=True)."),
        click.option("--allow-pickle", is_flag=True, help="Allow full unpickling of --weights (runs code "
                     "from the file: only for files you trust)."),
        click.option("--input-size", callback=input_size, metavar="C,H,W",
                     help="Per-sample input shape (default: the model's own config)."),
    ]):
        fn = deco(fn)
    return fn


def finetune_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """The options of `surgeon.training.FinetuneConfig`, one per field; the config validates them."""
    from surgeon.training.config import cli_options

    for opt in reversed(cli_options()):
        kw: dict[str, Any] = {"help": opt["help"], "metavar": opt["metavar"]}
        if opt["type"] is bool:
            kw["is_flag"] = True
        else:
            kw.update(type=click.Choice(opt["choices"]) if opt["choices"] else opt["type"], required=opt["required"],
                      default=opt["default"], show_default=opt["default"] is not None)
        fn = click.option(opt["flag"], opt["name"], **kw)(fn)
    return fn


class RawArgsCommand(click.Command):
    """A command that keeps its raw arguments (ctx.meta['raw_args']), to start itself again in other
    processes (`surgeon finetune --nproc N`)."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        ctx.meta["raw_args"] = list(args)
        return super().parse_args(ctx, args)


__all__ = ["RawArgsCommand", "finetune_options", "input_size", "model_options"]
