"""`surgeon gates` and `surgeon maps`: what inserted attention does (thin: parse, call the API, render).

cli.py adds these commands to its group (with its error handling), so this module does not import it."""
from __future__ import annotations

import json

import click

from surgeon import render


def _open(model: str, trust_code: bool):
    from surgeon import training

    with render.stderr().status(f"Loading {model}…"):
        return training.open_model(model, trust_code=trust_code)


def _batch(model, data: str | None, batch: int):
    """The first `batch` images of DATA's evaluation split; none (the recorded example input) without DATA."""
    if data is None:
        return ()
    import torch

    from surgeon import data as data_mod

    dataset = data_mod.evaluation_set(data, model)
    return (torch.stack([dataset[i][0] for i in range(min(batch, len(dataset)))]),)


@click.command("gates")
@click.argument("model")
@click.option("--data", metavar="PATH|digits", help="Measure on the first --batch images of this data's "
              "evaluation split (default: the example input recorded at surgery).")
@click.option("--batch", type=click.IntRange(min=1), default=32, show_default=True, help="Images with --data.")
@click.option("--trust-code", is_flag=True, help="MODEL is a saved folder whose base model is a user factory.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def gates_cmd(model: str, data: str | None, batch: int, trust_code: bool, as_json: bool) -> None:
    """Per edit of MODEL (a saved folder or run): mean |γ| of its identity gates and its effect size,
    mean |y − x| / mean |x| on a batch. A γ near 0 marks an edit the network does not use."""
    import surgeon

    m = _open(model, trust_code)
    stats = surgeon.gates(m, *_batch(m, data, batch))
    if as_json:
        click.echo(json.dumps([s.to_dict() for s in stats], indent=2))
        return
    render.stdout().print(render.gates_table(stats, f"{model}: {len(stats)} edits"))


@click.command("maps")
@click.argument("model")
@click.argument("more", nargs=-1, type=click.Path(), metavar="")
@click.option("--image", "images", multiple=True, type=click.Path(), help="An image; more image paths may "
              "follow it.")
@click.option("--tokens", "tokens", multiple=True, metavar="IDS", help="Token ids, comma-separated, for a "
              "sequence model (repeatable: one sequence each).")
@click.option("--out", type=click.Path(file_okay=False), required=True, help="A new (or empty) folder for the PNGs.")
@click.option("--trust-code", is_flag=True, help="MODEL is a saved folder whose base model is a user factory.")
def maps_cmd(model: str, more: tuple[str, ...], images: tuple[str, ...], tokens: tuple[str, ...], out: str,
             trust_code: bool) -> None:
    """Draw what every edit of MODEL (a saved folder or run) applied: per image each spatial map over the
    input, the channel weights, and a contact sheet; per token sequence a heat strip.

    \b
    surgeon maps runs/cbam --image a.png b.png --out maps/
    """
    import surgeon
    from surgeon.errors import OptionError
    from surgeon.pictures import _check_out

    if more and not images:
        raise OptionError(f"Unexpected argument {more[0]!r}: images follow --image (--image {more[0]})")
    images = images + more
    _check_out(out, list(images))  # before the model is loaded
    ids = []
    for text in tokens:
        try:
            ids.append([int(t) for t in text.replace(" ", "").split(",") if t])
        except ValueError:
            raise OptionError(f"--tokens {text!r} must be comma-separated integer ids, e.g. 5,17,2") from None
    m = _open(model, trust_code)
    written = surgeon.maps(m, images=list(images), tokens=ids, out=out)
    click.echo(f"Wrote {len(written)} pictures to {out}")
