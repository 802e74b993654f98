"""Rendering: the rich tables and one-line summaries the `surgeon` command prints, and the number formatters.

Torch-free (the CLI imports it), and no logic: every function turns what the API returned into text.
"""
from __future__ import annotations

from typing import Any


def stderr():
    """A console for progress and warnings."""
    from rich.console import Console

    return Console(stderr=True)


def stdout():
    """A console for results, wide enough that tables do not wrap."""
    from rich.console import Console

    return Console(soft_wrap=False, width=max(120, Console().width))


def human(n: float) -> str:
    """1234567 -> '1.23M'."""
    for unit, div in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.2f}{unit}"
    return str(int(n))


def size(n: int) -> str:
    """A byte count: 1234567 -> '1.23 MB'."""
    for unit, div in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if n >= div:
            return f"{n / div:.2f} {unit}"
    return f"{n} B"


def r50_cell(r50: dict | None) -> str:
    """What an attention adds to ResNet-50: '+2.53M (residual ×16)', or '—' where ResNet-50 has no site for it."""
    if not r50:
        return "—"
    return f"+{human(r50['params'])} ({r50['kind']} ×{r50['sites']})"


def attentions_table(entries: list[dict]) -> Any:
    """`surgeon list`: attentions grouped by family, with kinds, ResNet-50 parameters, published figure, paper
    (aliases and summaries are in `surgeon list --json`)."""
    from rich.table import Table

    families = sorted({e["family"] for e in entries})
    t = Table(title=f"{len(entries)} attentions in {len(families)} families", title_justify="left")
    for col, just in (("name", "left"), ("kinds", "left"), ("ResNet-50", "right"), ("published", "right"),
                      ("paper", "left")):
        t.add_column(col, justify=just, overflow="fold", no_wrap=col in ("name", "ResNet-50"))
    for family in families:
        t.add_row(f"[bold]{family}[/bold]")
        for e in (e for e in entries if e["family"] == family):
            fig = e.get("published")
            published = f"+{human(fig['added'])}" if fig else ""
            t.add_row(e["name"], ", ".join(e["kinds"]), r50_cell(e.get("r50")), published, e["paper"])
        t.add_section()
    t.caption = ("ResNet-50: parameters added at paper init on every site of the first kind ResNet-50 has (computed, "
                 "cached); published: the paper's figure, asserted by the tests")
    t.caption_justify = "left"
    return t


def sites_table(model: str, found: list) -> Any:
    """`surgeon sites`: name, kind, shape, layout, and the modules kept as Python."""
    from rich.table import Table

    t = Table(title=f"{model}: {len(found)} sites", title_justify="left")
    for col in ("site", "kind", "shape", "layout"):
        t.add_column(col)
    for s in found:
        t.add_row(s.name, s.kind, s.describe_shape(), s.layout)
    if found.untraced:
        t.caption = "Kept as Python (not traced): " + found.why_few()
        t.caption_justify = "left"
    return t


def plan_table(plan: Any) -> Any:
    """A `surgeon.Plan` as a rich Table: per edit its site, shape, attention, the module it rewrites, params and
    FLOPs."""
    from rich.table import Table

    from surgeon.errors import SurgeonError

    t = Table(title=f"Plan: {len(plan.edits)} edits", title_justify="left")
    try:
        owners = plan.owners()
    except SurgeonError as exc:  # the table still shows the plan; apply() will raise the same error
        owners = {e.site.name: f"cannot rewrite: {exc}" for e in plan.edits}
    for col, just in (("#", "right"), ("site", "left"), ("kind", "left"), ("shape", "left"),
                      ("attention", "left"), ("rewrites", "left"), ("params", "right"), ("FLOPs", "right")):
        t.add_column(col, justify=just)
    for i, e in enumerate(plan.edits, 1):
        owner = owners.get(e.site.name, "")
        t.add_row(str(i), e.site.name, e.site.kind, e.site.describe_shape(), f"{e.attention} ({e.init})",
                  owner if owner else f"{type(plan.model).__name__}.forward", f"{e.params:,}", human(e.flops))
    t.add_row("", "total", "", "", "", "", f"{plan.params:,}", human(plan.flops), style="bold")
    t.caption = ((f"{plan.note}.\n" if plan.note else "") +
                 "rewrites: the module whose forward now calls the inserted module; every other module, the "
                 "model's class and methods are kept")
    t.caption_justify = "left"
    return t


def plan_text(plan: Any) -> str:
    """A plan's table as plain text, 120 columns wide."""
    import io

    from rich.console import Console

    console = Console(width=120, file=io.StringIO())
    console.print(plan_table(plan))
    return console.file.getvalue()


def verification_table(v, init: str):
    """The check `Plan.apply` ran: max |diff|, train mode, gradients, params and FLOPs added."""
    from rich.table import Table

    on = (f"on {v.smaller.replace('x', '×')} images, each new module alone and the FLOPs at the example's size"
          if v.smaller else "example input")
    t = Table(title=f"Verification (CPU, {on})", title_justify="left", show_header=False)
    t.add_column("check")
    t.add_column("value", justify="right")
    bound = f" (≤ {v.tolerance:g} required at identity init)" if v.tolerance is not None else f" ({init} init)"
    t.add_row("max |patched − original|", f"{v.max_abs_diff:.3g}{bound}")
    if v.train_max_abs_diff is not None:
        t.add_row("train mode: max |diff| (outputs, running stats)", f"{v.train_max_abs_diff:.3g}")
    elif v.train_note:
        t.add_row("train mode", v.train_note)
    t.add_row("new parameter tensors reached by backward", f"{v.with_grad}/{v.new_params}"
              f" ({v.nonzero_grad} with non-zero gradient)")
    if v.nonzero_grad == 0 and v.tolerance is not None:
        t.caption = ("At identity init only the zero gates can get a gradient, and it is zero where a branch "
                     "outputs zeros (the zero-initialised last norms of an untrained timm ResNet); trained "
                     "weights give the gates a gradient.")
        t.caption_justify = "left"
    t.add_row("parameters added", f"{v.params_added:,}")
    t.add_row("FLOPs (per sample) before → after", f"{human(v.flops_before)} → {human(v.flops_after)} "
              f"(+{human(v.flops_added)}, {100 * v.flops_added / max(v.flops_before, 1):.2f}%)")
    t.add_row("status", "[green]ok[/green]" if v.ok else "[red]FAILED[/red]")
    return t


def weights_line(w: dict[str, Any] | None) -> str:
    """What a saved folder's weights file holds, in one line."""
    if not w:
        return "weights: none (a recipe only)"
    share = 100 * w.get("bytes", 0) / max(w.get("model_bytes", 0), 1)
    what = "adapter" if w["adapter"] else "full model"
    if w.get("file_bytes", 0) is None:
        return f"weights: {w['file']} ({what}) is missing from the folder"
    line = f"weights: {w['file']} ({what}) {size(w.get('file_bytes', w.get('bytes', 0)))} on disk"
    if w["adapter"]:
        line += (f", {w.get('params', 0):,} parameters = {share:.2f}% of the full model's "
                 f"{w.get('model_params', 0):,} ({size(w.get('model_bytes', 0))})")
        if w.get("include"):
            line += f"; includes {', '.join(w['include'])}"
    return line


def recipe_table(info: dict[str, Any]):
    """A recipe (or saved folder) as `surgeon.summary` describes it: base model, input size, edits."""
    from rich.table import Table

    base = info.get("model") or {}
    ref = base.get("ref", "(no base reference)")
    extras = [f"{k}={v!r}" for k, v in (base.get("args") or {}).items()]
    if base.get("pretrained"):
        extras.append("pretrained")
    if base.get("weights"):
        extras.append(f"weights {base['weights']}")
    input_size = "×".join(str(d) for d in info["input_size"]) if info.get("input_size") else "model default"
    title = f"{ref}{' (' + ', '.join(extras) + ')' if extras else ''}: {len(info['edits'])} edits, input {input_size}"
    t = Table(title=title, title_justify="left")
    for col, just in (("#", "right"), ("site", "left"), ("kind", "left"), ("attention", "left"),
                      ("options", "left"), ("module", "left"), ("params", "right")):
        t.add_column(col, justify=just)
    for i, e in enumerate(info["edits"], 1):
        opts = ", ".join(f"{k}={v!r}" for k, v in (e.get("options") or {}).items())
        t.add_row(str(i), e["site"], e.get("kind") or "", f"{e['attention']} ({e.get('init', 'identity')})", opts,
                  e.get("module", ""), f"{e['params']:,}" if "params" in e else "")
    t.add_row("", "total", "", "", "", "", f"{info['params_added']:,}", style="bold")
    return t


def history_table(history: list[dict[str, Any]], title: str):
    """A fine-tuning run's history, one row per epoch."""
    from rich.table import Table

    t = Table(title=title, title_justify="left")
    for col in ("epoch", "lr", "trainable", "train loss", "train acc", "val loss", "val acc", "img/s"):
        t.add_column(col, justify="right")
    for r in history:
        val = ("val_loss" in r)
        t.add_row(str(r["epoch"]), f"{r['lr']:.3g}", f"{r['trainable']:,}", f"{r['train_loss']:.4f}",
                  f"{100 * r['train_acc']:.2f}%", f"{r['val_loss']:.4f}" if val else "-",
                  f"{100 * r['val_acc']:.2f}%" if val else "-", f"{r['throughput']:.0f}")
    return t


def merge_table(folds: list) -> Any:
    """What `surgeon merge` did with each gate: dropped, folded into a layer, or kept (and why)."""
    from rich.table import Table

    done = sum(f.action != "kept" for f in folds)
    t = Table(title=f"{len(folds)} gates: {done} merged, {len(folds) - done} kept", title_justify="left")
    for col in ("gate", "form", "γ", "action", "why"):
        t.add_column(col)
    for f in folds:
        lo, hi = f.gamma
        t.add_row(f.gate, f.form, f"{lo:.4g}" if lo == hi else f"{lo:.4g} … {hi:.4g}", f.action, f.why)
    return t


def gates_table(stats: list, title: str) -> Any:
    """`surgeon gates`: mean |γ| and effect size (mean |y − x| / mean |x|) per edit."""
    from rich.table import Table

    t = Table(title=title, title_justify="left")
    for col, justify in (("site", "left"), ("attention", "left"), ("|γ|", "right"), ("effect", "right")):
        t.add_column(col, justify=justify)
    for s in stats:
        t.add_row(s.site or "(root)", s.attention, "—" if s.gamma is None else f"{s.gamma:.4g}",
                  "—" if s.effect is None else f"{s.effect:.4g}")
    return t
