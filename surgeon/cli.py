"""The `surgeon` command: parse, call the Python API, render. No logic the API lacks.

torch is imported only inside commands that need it, so `surgeon --help` stays fast.
"""
from __future__ import annotations

import functools
import json
import logging
import os
import sys
from typing import Any, Callable

import click

from surgeon import cli_viz, render
from surgeon.cli_options import RawArgsCommand, finetune_options, model_options
from surgeon.errors import SurgeonError

EXIT_USAGE = 2


def handle_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Turn surgeon's errors into one line on stderr and exit code 2 (under torchrun, processes other
    than rank 0 name their rank)."""
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except SurgeonError as exc:
            rank = os.environ.get("RANK", "0")
            click.echo(f"Error{f' (rank {rank})' if rank != '0' else ''}: {exc}", err=True)
            sys.exit(EXIT_USAGE)
    return wrapper


_NO_ARGS_IS_HELP = getattr(click.exceptions, "NoArgsIsHelpError", ())  # click >= 8.2


def _one_line(exc: click.UsageError) -> click.UsageError:
    """A usage error printed as one 'Error: ...' line (click prints the usage and a hint above it);
    a command given no arguments at all still shows its help."""
    if exc.ctx is None or isinstance(exc, _NO_ARGS_IS_HELP):
        return exc
    one = click.UsageError(f"{exc.format_message().rstrip('.')}. Run '{exc.ctx.command_path} --help' for usage")
    one.exit_code = exc.exit_code
    return one


class SurgeonGroup(click.Group):
    """A click group that lets plugins add commands, loaded on first use, and reports usage errors
    in one line, as every other error."""

    _plugins_loaded = False

    def make_context(self, *args: Any, **kwargs: Any) -> click.Context:
        try:
            return super().make_context(*args, **kwargs)
        except click.UsageError as exc:
            raise _one_line(exc) from exc

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except click.UsageError as exc:
            raise _one_line(exc) from exc

    def _load_plugin_commands(self) -> None:
        if not self._plugins_loaded:
            self._plugins_loaded = True
            from surgeon.registry import get_plugin_manager

            try:
                get_plugin_manager().hook.register_commands(cli=self)
            except SurgeonError as exc:
                click.echo(f"Error: {exc}", err=True)
                sys.exit(EXIT_USAGE)

    def list_commands(self, ctx: click.Context) -> list[str]:
        self._load_plugin_commands()
        return super().list_commands(ctx)

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        self._load_plugin_commands()
        cmd = super().get_command(ctx, name)
        if cmd is None:
            from surgeon.errors import did_you_mean

            ctx.fail(f"No such command {name!r}.{did_you_mean(name, super().list_commands(ctx))}")
        return cmd


@click.group(cls=SurgeonGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="surgeon")
@click.option("-v", "--verbose", is_flag=True, help="Log each decision (sites skipped, leaves, fallbacks).")
def cli(verbose: bool) -> None:
    """Retrofit attention into existing PyTorch models.

    \b
    surgeon list                      attentions you can add
    surgeon sites resnet50            where they can go
    surgeon add cbam resnet50         insert CBAM (identity at init) and verify
    """
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    log = logging.getLogger("surgeon")
    log.handlers[:] = [handler]
    log.setLevel(logging.DEBUG if verbose else logging.INFO)
    log.propagate = False


def _saved(model: str | None) -> bool:
    """Whether MODEL names a surgeon save (a patched model, to patch further)."""
    from surgeon.models import is_folder_reference
    from surgeon.record import holds_recipe

    return bool(model) and is_folder_reference(model) and holds_recipe(model)


def _load(model: str, model_args: tuple[str, ...], pretrained: bool, weights: str | None, allow_pickle: bool,
          trust_code: bool = False):
    from surgeon import models

    if _saved(model):
        from surgeon import checkpoint

        if pretrained or model_args:
            raise click.UsageError(f"{model!r} is a surgeon save, which brings its own base model: --pretrained and "
                                   "--model-arg do not apply (--weights loads other weights of the whole model)")
        with render.stderr().status(f"Loading {model}…"):
            return checkpoint.load(model, weights=weights, allow_pickle=allow_pickle, trust_code=trust_code)
    with render.stderr().status(f"Loading {model}…"):
        return models.load(model, pretrained=pretrained, weights=weights, allow_pickle=allow_pickle,
                           model_args=models.parse_assignments(model_args, "--model-arg"))


@cli.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.option("--refresh", is_flag=True, help="Recompute the ResNet-50 parameter counts instead of using the cache.")
@handle_errors
def list_cmd(as_json: bool, refresh: bool) -> None:
    """List the attentions by family: name, aliases, kinds, parameters added on ResNet-50, published
    figure, summary and paper."""
    from surgeon import catalogue

    with render.stderr().status("Counting parameters on ResNet-50 (cached after the first run)…"):
        if refresh:
            catalogue.r50_params(list(catalogue.registry.attentions().values()), refresh=True)
        entries = catalogue.catalogue()
    if as_json:
        click.echo(json.dumps(entries, indent=2, default=str))
        return
    render.stdout().print(render.attentions_table(entries))


@cli.command("sites")
@click.argument("model")
@click.option("--kind", multiple=True, help="Only sites of this kind (repeatable).")
@click.option("--at", multiple=True, metavar="GLOB", help="Only sites whose name matches (repeatable).")
@model_options
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@handle_errors
def sites_cmd(model: str, kind: tuple[str, ...], at: tuple[str, ...], model_args, pretrained, weights,
              allow_pickle, input_size, as_json: bool) -> None:
    """List the sites of MODEL: name, kind, shape."""
    import surgeon

    m = _load(model, model_args, pretrained, weights, allow_pickle)
    with render.stderr().status("Tracing…"):
        found = surgeon.sites(m, kind=list(kind) or None, at=list(at) or None, input_size=input_size)
    if as_json:
        click.echo(json.dumps([{"name": s.name, "kind": s.kind, "shape": list(s.shape), "layout": s.layout}
                               for s in found], indent=2))
        return
    render.stdout().print(render.sites_table(model, found))


@cli.command("add")
@click.argument("attention", required=False)
@click.argument("model", required=False)
@click.option("--kind", help="Site kind (default: the attention's own).")
@click.option("--at", multiple=True, metavar="GLOB", help="Only sites whose name matches (repeatable).")
@click.option("--option", "options", multiple=True, metavar="K=V", help="Attention option (repeatable).")
@click.option("--init", type=click.Choice(["identity", "paper"]), default="identity", show_default=True,
              help="identity: the model computes exactly what it did; paper: the module as published.")
@model_options
@click.option("--dry-run", is_flag=True, help="Print the plan; change nothing.")
@click.option("--out", type=click.Path(file_okay=False), help="Write recipe.json + model.safetensors here.")
@click.option("--force", is_flag=True, help="Replace --out when it exists.")
@click.option("--json", "as_json", is_flag=True, help="Print plan and verification as JSON on stdout.")
@click.option("--recipe", type=click.Path(dir_okay=True), help="Replay this recipe (recipe.json, or a saved "
              "folder) instead of ATTENTION; MODEL is then optional (default: the recipe's base model).")
@click.option("--trust-code", is_flag=True, help="With --recipe or a saved MODEL folder: allow a base model that is "
              "a user factory (imports and runs its code).")
@click.option("--adapter", is_flag=True, help="With --out: save only the weights the edits added.")
@click.option("--include", multiple=True, metavar="MODULE", help="With --adapter: also save this module's "
              "weights (path, glob, or 'head'; repeatable).")
@click.option("--no-verify", is_flag=True, help="Skip running the example input through both models (for models "
              "too big to run twice here); shapes are still checked.")
@handle_errors
def add_cmd(attention: str | None, model: str | None, kind: str | None, at: tuple[str, ...], options: tuple[str, ...],
            init: str, model_args, pretrained, weights, allow_pickle, input_size, dry_run: bool,
            out: str | None, force: bool, as_json: bool, recipe: str | None = None, trust_code: bool = False,
            adapter: bool = False, include: tuple[str, ...] = (), no_verify: bool = False) -> None:
    """Insert ATTENTION into MODEL, verify it, and optionally save it.

    MODEL may be a folder: a surgeon save (its patched model gets the new edits too) or a Hugging Face
    save_pretrained folder. With --recipe FILE, replay a recipe instead: `surgeon add --recipe recipe.json [MODEL]`.
    """
    import surgeon
    from surgeon import models, outputs

    if recipe:
        return _add_recipe(recipe, attention, model, kind=kind, at=at, options=options, model_args=model_args,
                           pretrained=pretrained, weights=weights, allow_pickle=allow_pickle, input_size=input_size,
                           dry_run=dry_run, out=out, force=force, as_json=as_json, trust_code=trust_code,
                           adapter=adapter, include=include)
    for name, value in (("ATTENTION", attention), ("MODEL", model)):
        if not value:
            raise click.MissingParameter(param_hint=f"'{name}'", param_type="argument")
    if trust_code and not _saved(model):
        raise click.UsageError("--trust-code only applies with --recipe or a saved MODEL folder")
    if (adapter or include) and not out and not dry_run:
        raise click.UsageError("--adapter and --include apply to --out")
    if out and not dry_run:
        outputs.check_folder(out, force=force, reading=outputs.local_inputs(model, weights))
    from surgeon import registry

    # the command line's forms of a bool (--option bias=false) become bools; the API judges the rest
    opts = registry.parse_cli_options(attention, models.parse_assignments(options, "--option"))
    m = _load(model, model_args, pretrained, weights, allow_pickle, trust_code)
    with render.stderr().status("Tracing and planning…"):
        plan = surgeon.plan(m, attention, kind=kind, at=list(at) or None, init=init, input_size=input_size, **opts)
    result: dict[str, Any] = {"model": model, "attention": attention, "plan": plan.to_dict()}
    if not as_json:
        render.stdout().print(render.plan_table(plan))
    if dry_run:
        if as_json:
            click.echo(json.dumps(result, indent=2))
        return
    with render.stderr().status("Rewriting and verifying…"):
        patched = plan.apply(verify=not no_verify)
    v = plan.verification
    result["verification"] = v.to_dict() if v is not None else None
    if out:
        with render.stderr().status(f"Saving to {out}…"):
            surgeon.save(patched, out, force=force, adapter=adapter, include=include)
        result["out"] = out
    if as_json:
        click.echo(json.dumps(result, indent=2))
        return
    if v is not None:
        render.stdout().print(render.verification_table(v, init))
    if out:
        _echo_saved(out)


# -- recipes, saved folders, export (issue 5) ----------------------------------------------------------
def _echo_saved(out: str) -> None:
    import surgeon

    info = surgeon.summary(out)
    click.echo(f"Saved: {out}/recipe.json, {out}/{info['weights']['file']}")
    click.echo(render.weights_line(info["weights"]))


def _add_recipe(recipe: str, first: str | None, second: str | None, *, kind, at, options, model_args, pretrained,
                weights, allow_pickle, input_size, dry_run, out, force, as_json, trust_code, adapter, include) -> None:
    """`surgeon add --recipe FILE [MODEL]`: replay a recipe (see `surgeon.replay`)."""
    import surgeon
    from surgeon import outputs

    ctx = click.get_current_context()
    if second:
        raise click.UsageError("With --recipe, pass at most one argument: MODEL")
    if kind or at or options or ctx.get_parameter_source("init") is not click.core.ParameterSource.DEFAULT:
        raise click.UsageError("--kind, --at, --option and --init come from the recipe; edit the recipe instead")
    if not first and (weights or pretrained or model_args):
        raise click.UsageError("--weights, --pretrained and --model-arg need MODEL with --recipe")
    if (adapter or include) and not out:
        raise click.UsageError("--adapter and --include apply to --out")
    if out and not dry_run:
        outputs.check_folder(out, force=force, reading=outputs.local_inputs(first, weights, recipe))
    info = surgeon.summary(recipe)
    if dry_run:
        if as_json:
            click.echo(json.dumps(info, indent=2))
        else:
            render.stdout().print(render.recipe_table(info))
        return
    base = _load(first, model_args, pretrained, weights, allow_pickle) if first else None
    with render.stderr().status("Replaying the recipe and verifying…"):
        patched = surgeon.replay(recipe, base, trust_code=trust_code, input_size=input_size)
    if out:
        with render.stderr().status(f"Saving to {out}…"):
            surgeon.save(patched, out, force=force, adapter=adapter, include=include)
    if as_json:
        click.echo(json.dumps({"recipe": recipe, "edits": len(info["edits"]), "verified": True, "out": out}, indent=2))
        return
    render.stdout().print(render.recipe_table(info))
    click.echo(f"Replayed {len(info['edits'])} edits from {recipe}; verified at identity init")
    if out:
        _echo_saved(out)


@cli.command("apply")
@click.argument("directory", type=click.Path(file_okay=False))
@click.argument("model")
@model_options
@click.option("--out", type=click.Path(file_okay=False), help="Write the patched model (full) here.")
@click.option("--force", is_flag=True, help="Replace --out when it exists.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@handle_errors
def apply_cmd(directory: str, model: str, model_args, pretrained, weights, allow_pickle, input_size,
              out: str | None, force: bool, as_json: bool) -> None:
    """Put the adapter (or saved model) in DIRECTORY on a freshly built MODEL."""
    import surgeon
    from surgeon import outputs

    if out:
        outputs.check_folder(out, force=force, reading=outputs.local_inputs(model, weights, directory))
    info = surgeon.summary(directory)
    base = _load(model, model_args, pretrained, weights, allow_pickle)
    with render.stderr().status(f"Applying {directory}…"):
        patched = surgeon.load(directory, base=base, input_size=input_size)
    if out:
        with render.stderr().status(f"Saving to {out}…"):
            surgeon.save(patched, out, force=force)
    if as_json:
        click.echo(json.dumps({**info, "base": model, "out": out}, indent=2, default=str))
        return
    render.stdout().print(render.recipe_table(info))
    click.echo(render.weights_line(info["weights"]))
    if out:
        _echo_saved(out)


@cli.command("export")
@click.argument("directory", type=click.Path(file_okay=False))
@click.option("--format", "fmt", type=click.Choice(["exported", "torchscript", "onnx"]), required=True,
              help="exported: torch.export (.pt2); torchscript (.pt); onnx (.onnx, checked with onnxruntime).")
@click.option("--out", type=click.Path(dir_okay=False), help="The file to write (default: DIRECTORY/model.EXT).")
@click.option("--force", is_flag=True, help="Replace --out when it exists.")
@click.option("--tolerance", type=float, default=1e-5, show_default=True,
              help="Largest |export − model| allowed on the example input, times the largest |output| above 1.")
@click.option("--trust-code", is_flag=True, help="Allow a recipe whose base model is a user factory.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@handle_errors
def export_cmd(directory: str, fmt: str, out: str | None, force: bool, tolerance: float, trust_code: bool,
               as_json: bool) -> None:
    """Export the model saved in DIRECTORY, run the export and compare it with the model."""
    import surgeon

    with render.stderr().status(f"Exporting {directory} as {fmt}…"):
        result = surgeon.export_model(directory, fmt, out, tolerance=tolerance, trust_code=trust_code, force=force)
    if as_json:
        click.echo(json.dumps(result.to_dict(), indent=2))
        return
    click.echo(f"Exported: {result.path} ({fmt}, {result.method}); max |export − model| = "
               f"{result.max_abs_diff:.3g} (≤ {result.allowed:.3g})")


@cli.command("merge")
@click.argument("directory", type=click.Path(file_okay=False))
@click.option("--out", type=click.Path(file_okay=False), required=True, help="Write the merged model (full) here.")
@click.option("--force", is_flag=True, help="Replace --out when it exists.")
@click.option("--trust-code", is_flag=True, help="Allow a recipe whose base model is a user factory.")
@click.option("--fold-bn", is_flag=True,
              help="Also fold BatchNorm into the convolution before it (for inference: no BatchNorm left to train).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@handle_errors
def merge_cmd(directory: str, out: str, force: bool, trust_code: bool, fold_bn: bool, as_json: bool) -> None:
    """Fold the identity-init gates of the fine-tuned model in DIRECTORY where that is exact (γ = 1: dropped;
    γ of an additive branch: multiplied into its last layer) and save it to --out."""
    from surgeon import checkpoint

    with render.stderr().status(f"Merging {directory}…"):
        folds, pairs = checkpoint.merge_saved(directory, out, force=force, trust_code=trust_code, fold_bn=fold_bn)
    if as_json:
        click.echo(json.dumps({"out": out, "gates": [f.to_dict() for f in folds], "folded_bn": pairs}, indent=2))
        return
    render.stdout().print(render.merge_table(folds))
    if fold_bn:
        click.echo(f"BatchNorm folded into the convolution before it: {len(pairs)} pairs")
    _echo_saved(out)


@cli.command("show")
@click.argument("directory", type=click.Path())
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@handle_errors
def show_cmd(directory: str, as_json: bool) -> None:
    """Show a saved folder (or a recipe file): base model, edits, parameters added, weights size."""
    import surgeon

    info = surgeon.summary(directory)
    if as_json:
        click.echo(json.dumps(info, indent=2))
        return
    render.stdout().print(render.recipe_table(info))
    click.echo(render.weights_line(info["weights"]))


# -- fine-tuning (issue 6) -----------------------------------------------------------------------------
def _open_model(model: str, model_args, pretrained, weights, allow_pickle, trust_code):
    from surgeon import models, training

    with render.stderr().status(f"Loading {model}…"):
        return training.open_model(model, pretrained=pretrained, weights=weights, allow_pickle=allow_pickle,
                                   trust_code=trust_code,
                                   model_args=models.parse_assignments(model_args, "--model-arg"))


@cli.command("finetune", cls=RawArgsCommand)
@click.argument("model")
@click.option("--data", required=True, metavar="PATH|digits", help="A folder of class sub-folders (with train/ and "
              "val/ inside, or --val-data), or 'digits' (built in, no download).")
@click.option("--val-data", type=click.Path(file_okay=False),
              help="Validation folder (default: DATA/val when present).")
@finetune_options
@click.option("--limit", type=click.IntRange(min=1), help="Use only the first N images of each digits split.")
@click.option("--out", type=click.Path(file_okay=False), required=True,
              help="Run folder: checkpoint every epoch (loadable by surgeon load), metrics.jsonl, curves.png.")
@click.option("--resume", is_flag=True, help="Continue the run in --out from its last completed epoch.")
@click.option("--force", is_flag=True, help="Replace --out when it exists.")
@click.option("--trust-code", is_flag=True, help="MODEL is a saved folder whose base model is a user factory.")
@model_options
@click.option("--no-progress", is_flag=True, help="No progress bars.")
@click.option("--json", "as_json", is_flag=True, help="Print the per-epoch metrics as JSON.")
@click.option("--nproc", type=click.IntRange(min=1), default=1, show_default=True, metavar="N",
              help="Train data-parallel in N processes on this machine (torch.distributed.run, as `torchrun "
                   "--standalone --nproc-per-node N`); for several machines run torchrun yourself.")
@handle_errors
def finetune_cmd(model: str, data: str, val_data: str | None, limit: int | None, out: str, resume: bool, force: bool,
                 trust_code: bool, model_args, pretrained, weights, allow_pickle, input_size, no_progress: bool,
                 as_json: bool, nproc: int, **options: Any) -> None:
    """Fine-tune MODEL (a folder from `surgeon add --out`, or a model reference) on DATA.

    \b
    surgeon add cbam resnet18 --weights mine.pth --out cbam-r18
    surgeon finetune cbam-r18 --data PATH --epochs 5 --lr 1e-3 --freeze two-phase --out cbam-r18-ft
    surgeon finetune cbam-r18 --data PATH --epochs 5 --lr 1e-3 --nproc 4 --out cbam-r18-ft
    """
    import surgeon
    from surgeon import data as data_mod
    from surgeon import outputs, training
    from surgeon.training import distributed

    config = training.FinetuneConfig(**options)  # every option checked before anything is built
    main = distributed.env_rank() == 0  # under torchrun, rank 0 checks the run folder and reports
    if not main:
        logging.getLogger("surgeon").setLevel(logging.WARNING)  # rank 0's log lines, not N copies
    if main:
        reading = outputs.local_inputs(model, weights, val_data, data)
        if force:  # --force may replace only a previous surgeon save; --resume keeps the run in --out
            outputs.check_folder(out, force=True, reading=reading)
        else:
            outputs.check_place(out, reading=reading)
        training.check_output(out, resume=resume, force=force)  # before anything is built
    m = _open_model(model, model_args, pretrained, weights, allow_pickle, trust_code)
    train, val = data_mod.resolve(data, m, input_size=input_size, val=val_data, limit=limit)
    if nproc > 1:  # checked here, started there: the processes run this same command without --nproc
        distributed.check_launch(nproc, train, config)
        _launch(nproc, click.get_current_context())
        return
    result = surgeon.finetune(m, train, val, config=config, out=out, resume=resume, force=force,
                              progress=not no_progress)
    if not main:
        return
    if as_json:
        click.echo(json.dumps({"out": out, "head": result.head, "history": result.history}, indent=2))
        return
    render.stdout().print(render.history_table(result.history, f"{model} fine-tuned on {data}"))
    click.echo(f"Saved: {out} (recipe.json, model.safetensors, metrics.jsonl, curves.png); "
               f"`surgeon evaluate {out} --data {data}` to evaluate it")


def _launch(nproc: int, ctx: click.Context) -> None:
    """Run this command (its raw arguments without --nproc) in `nproc` processes; exit as the worst failed."""
    from surgeon.training import distributed

    verbose = ["-v"] if ctx.parent is not None and ctx.parent.params.get("verbose") else []
    failed = distributed.launch(nproc, [*verbose, ctx.info_name or "finetune",
                                        *distributed.without_option(ctx.meta["raw_args"], "--nproc")])
    if failed:
        rank, code = max(failed.items(), key=lambda kv: kv[1])
        click.echo(f"Error: {len(failed)} of {nproc} processes failed (rank {rank}: exit code {code}); their "
                   f"messages are above", err=True)
        sys.exit(code if code > 0 else 1)


@cli.command("evaluate")
@click.argument("model")
@click.option("--data", required=True, metavar="PATH|digits", help="A folder of class sub-folders (DATA/val when "
              "present), or 'digits' (its held-out test split).")
@click.option("--batch-size", type=click.IntRange(min=1), default=256, show_default=True)
@click.option("--device", default="cpu", show_default=True, help="cpu, cuda, cuda:N, mps or auto.")
@click.option("--amp", is_flag=True, help="Mixed precision.")
@click.option("--workers", type=click.IntRange(min=0), default=0, show_default=True, help="DataLoader workers.")
@click.option("--limit", type=click.IntRange(min=1), help="Use only the first N images of the digits split.")
@click.option("--trust-code", is_flag=True, help="MODEL is a saved folder whose base model is a user factory.")
@model_options
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@handle_errors
def evaluate_cmd(model: str, data: str, batch_size: int, device: str, amp: bool, workers: int, limit: int | None,
                 trust_code: bool, model_args, pretrained, weights, allow_pickle, input_size, as_json: bool) -> None:
    """Accuracy and loss of MODEL (a saved folder or a model reference) on DATA."""
    import surgeon
    from surgeon import data as data_mod

    m = _open_model(model, model_args, pretrained, weights, allow_pickle, trust_code)
    dataset = data_mod.evaluation_set(data, m, input_size=input_size, limit=limit)
    with render.stderr().status(f"Evaluating on {len(dataset)} images…"):
        result = surgeon.evaluate(m, dataset, batch_size=batch_size, device=device, amp=amp, num_workers=workers)
    if as_json:
        click.echo(json.dumps({"model": model, "data": data, **result}, indent=2))
        return
    click.echo(f"{model} on {data}: accuracy {100 * result['accuracy']:.2f}% "
               f"({round(result['accuracy'] * result['samples'])}/{result['samples']}), loss {result['loss']:.4f}")


def _add_commands(*commands: click.Command) -> None:
    for cmd in commands:
        cmd.callback = handle_errors(cmd.callback)
        cli.add_command(cmd)


_add_commands(cli_viz.gates_cmd, cli_viz.maps_cmd)


def main() -> None:
    cli(prog_name="surgeon")


if __name__ == "__main__":
    main()
