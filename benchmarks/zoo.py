"""The zoo sweep: every model a library lists, patched as a new user would (fresh weights with perturbed
batch-norm statistics, each model's own input size, se and cbam at their default kinds), verified by
surgeon's own check. Each model runs in its own forked process with a timeout and a memory limit; rows go
to a CSV as they finish, so an interrupted sweep resumes where it stopped.

    python zoo.py                          # everything: timm, torchvision, a few transformers and smp models
    python zoo.py --source tv --sample 20  # 20 torchvision models, drawn with a fixed seed
    python zoo.py --ci                     # the fixed 30-model sample at fast input sizes; exit 1 on any
                                           # crash, identity break, timeout or memory overflow
    python zoo.py --summary zoo.csv        # the table of a CSV written earlier

Statuses: ok (patched, identity verified), refused (a one-line SurgeonError: no site fits, an option the
model cannot take), identity_break (VerificationError), crash (any other exception: a bug), timeout, oom
(the memory limit, at the model's own size and again at half of it), reduced (verified at half the model's
own image size, after the verification at its own size ran out of memory; the row names both), meta (over
--max-params: built and patched on the meta device, the patched model's output shapes checked against the
original's, identity not computed; the row says so), too_big (over --max-params and the library cannot
build it on the meta device), build_failed (the library could not build the model without downloads).
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import multiprocessing as mp
import os
import random
import re
import resource
import sys
import time
import traceback
from collections import Counter, defaultdict
from pathlib import Path

COLUMNS = ["source", "model", "attention", "status", "kind", "edits", "max_abs_diff", "train_diff",
           "params_added", "surgery_s", "input_size", "error"]
FAILING = {"crash", "identity_break", "timeout", "oom"}
ATTENTIONS = ("se", "cbam")

# the CI sample: 30 models across families and layouts, at fast input sizes (None: the model's own)
CI_SAMPLE: list[tuple[str, str | None]] = [
    ("timm:resnet18", "3,64,64"), ("timm:resnet50d", "3,64,64"), ("timm:resnext26ts", "3,64,64"),
    ("timm:mobilenetv3_small_050", "3,64,64"), ("timm:efficientnet_b0", "3,64,64"),
    ("timm:regnetx_002", "3,64,64"), ("timm:densenet121", "3,64,64"), ("timm:dla34", "3,64,64"),
    ("timm:convnext_atto", "3,64,64"), ("timm:ghostnet_050", "3,64,64"), ("timm:dpn48b", "3,64,64"),
    ("timm:hrnet_w18_small", "3,64,64"), ("timm:cspresnet50", "3,64,64"), ("timm:repvgg_a0", "3,64,64"),
    ("timm:lcnet_050", "3,64,64"), ("timm:vgg11", "3,64,64"), ("timm:mixnet_s", "3,64,64"),
    ("timm:resnetv2_50", "3,64,64"), ("timm:fbnetc_100", "3,64,64"), ("timm:inception_v3", "3,96,96"),
    ("tv:resnet18", "3,64,64"), ("tv:mobilenet_v3_small", "3,64,64"), ("tv:regnet_y_400mf", "3,64,64"),
    ("tv:shufflenet_v2_x0_5", "3,64,64"), ("tv:squeezenet1_1", "3,64,64"), ("tv:googlenet", "3,64,64"),
    ("tv:lraspp_mobilenet_v3_large", "3,64,64"), ("tv:r3d_18", "3,4,32,32"),
    ("tv:fasterrcnn_mobilenet_v3_large_320_fpn", None),
    ("smp:Unet", "3,64,64"),
]

HF_MODELS = ["ResNetForImageClassification", "ConvNextForImageClassification", "ViTForImageClassification",
             "BertForSequenceClassification", "Wav2Vec2ForSequenceClassification", "MobileViTForImageClassification",
             # heads that read the hidden states transformers' output capturing collects from the encoder
             "SegformerForSemanticSegmentation", "UperNetForSemanticSegmentation", "DPTForDepthEstimation"]
SMP_MODELS = ["Unet", "UnetPlusPlus", "FPN", "PSPNet", "DeepLabV3Plus", "Linknet", "PAN", "MAnet"]


# -- the model lists -------------------------------------------------------------------------------------
def _tv_names() -> list[str]:
    import torchvision.models as tvm

    names = []
    for module in (tvm, tvm.segmentation, tvm.video, tvm.detection, tvm.optical_flow):
        names += [n for n in tvm.list_models(module=module) if n not in names]
    return names


def model_refs(sources: list[str]) -> list[str]:
    """Every model reference the sweep covers, per source in order."""
    refs: list[str] = []
    if "timm" in sources:
        import timm

        refs += [f"timm:{n}" for n in timm.list_models()]
    if "tv" in sources:
        refs += [f"tv:{n}" for n in _tv_names()]
    if "hf" in sources:
        refs += [f"hf:{n}" for n in HF_MODELS]
    if "smp" in sources:
        refs += [f"smp:{n}" for n in SMP_MODELS]
    return refs


# -- one model, in its own process ---------------------------------------------------------------------
def _build(ref: str, image_size: tuple[int, int] | None = None, device: str | None = None):
    """The model; with `image_size`, a timm model built for that image size where it takes one (ViTs size
    their position embeddings by it), else as it comes (convolutional networks take any size); with `device`,
    a timm model built there by its own constructor."""
    from surgeon import models

    source, name = ref.split(":", 1)
    if source == "smp":
        import segmentation_models_pytorch as smp

        return getattr(smp, name)(encoder_name="resnet18", encoder_weights=None, classes=2).eval()
    if source != "timm":
        return models.load(ref)
    extra = {"device": device} if device else {}
    if image_size:
        try:
            return models.load(name, model_args={"img_size": image_size, **extra})
        except Exception:  # noqa: BLE001 - a model without an img_size argument
            pass
    return models.load(name, model_args=extra) if extra else models.load(name)


def _meta_build(ref: str):
    """The model without weights: parameters moved to meta as they are registered (`_empty_weights`), or, for
    a timm constructor that computes buffers from its parameters' device (Swin V2 CR), built on meta whole."""
    try:
        with _empty_weights():
            return _build(ref)
    except Exception:  # noqa: BLE001 - the whole-meta build below is the last resort
        if not ref.startswith("timm:"):
            raise
        return _build(ref, device="meta")


def _halved(size: tuple[int, ...]) -> tuple[int, ...]:
    """An input size with its image sides halved (channels and a video's frames kept)."""
    return (*size[:-2], *(max(1, d // 2) for d in size[-2:]))


def _perturb_bn(model) -> None:
    """Batch norms get the non-trivial statistics a trained network has (timm zero-inits some), so an
    identity check is not passed by accident on zeros."""
    import torch

    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                if m.weight is not None:
                    m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
                    m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)
                if m.running_var is not None:
                    m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.1)
                    m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)


def _where(exc: BaseException) -> str:
    """The innermost frame of a traceback, as file:line (crashes are bugs: say where)."""
    frames = traceback.extract_tb(exc.__traceback__)
    return f" [{Path(frames[-1].filename).name}:{frames[-1].lineno}]" if frames else ""


def _one_line(text: str) -> str:
    return " ".join(str(text).split())[:300]


@contextlib.contextmanager
def _empty_weights():
    """Build models with their parameters on the meta device: each parameter moves there as it is registered,
    so the constructor's own arithmetic (torchvision's RegNet widths, computed with tensors and `.tolist()`)
    still runs on real tensors, while no weight is kept or initialised. Buffers stay real (small, and some
    constructors read them)."""
    from torch import nn

    register = nn.Module.register_parameter

    def on_meta(self, name, param):
        register(self, name, param if param is None or param.is_meta else
                 nn.Parameter(param.detach().to("meta"), requires_grad=param.requires_grad))

    nn.Module.register_parameter = on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register


def _count_params(ref: str) -> int | None:
    """The model's parameter count from a build without weights (`_empty_weights`), or None when the library
    cannot build it so (then the real build counts)."""
    try:
        return sum(p.numel() for p in _meta_build(ref).parameters())
    except Exception:  # noqa: BLE001 - e.g. a constructor reading a weight's value
        return None


def _output_shapes(model, inputs: tuple) -> list[tuple[int, ...]]:
    """The shapes of a model's output tensors in eval mode, from a run on meta tensors."""
    import torch

    from surgeon.surgery import meta
    from surgeon.surgery.shapes import tensors

    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            return [tuple(t.shape) for t in tensors(meta.run([model], model, *inputs))]
    finally:
        model.train(was)


def _patch(model, attention: str, size: tuple[int, ...] | None, row: dict) -> None:
    """Patch `model` with `attention` and verify it (surgeon's own check; on a meta model, the patched model's
    output shapes against the original's instead), filling `row`."""
    import surgeon
    from surgeon.planning import on_meta
    from surgeon.surgery import meta

    plan = surgeon.plan(model, attention, input_size=size)
    patched = plan.apply()
    edits = surgeon.edits(patched)
    row.update(kind="/".join(sorted({e.kind for e in edits})), edits=len(edits), params_added=plan.params,
               error=_one_line(plan.note))
    if not size:
        row["input_size"] = ",".join(map(str, plan.example_inputs[0].shape[1:]))
    if on_meta(model):
        _alike_on_meta(patched, plan.example_inputs, _output_shapes(model, plan.example_inputs))
        row.update(status="meta")
        return
    # the meta device also stands in for the GPU a user moves the model to: a tensor the patched forward reads that
    # is neither a parameter nor a buffer (a plain attribute) stays behind on the CPU
    try:
        want = _output_shapes(model, plan.example_inputs)
    except meta.NeedsValues:
        pass  # the original does not run there either
    else:
        _alike_on_meta(patched, plan.example_inputs, want, ": a tensor it reads would not move with .to()")
    v = plan.verification
    row.update(status="ok", max_abs_diff=f"{v.max_abs_diff:.3g}",
               train_diff="" if v.train_max_abs_diff is None else f"{v.train_max_abs_diff:.3g}")


def _alike_on_meta(patched, inputs: tuple, want: list, why: str = "") -> None:
    """The patched model runs on meta tensors (parameters and buffers swapped for them) to the original's output
    shapes `want`; `why` says what a failure to run there means."""
    from surgeon.surgery import meta

    try:
        have = _output_shapes(patched, inputs)
    except meta.NeedsValues as exc:
        raise AssertionError(f"the patched model fails on meta tensors where the original runs ({exc}){why}") from exc
    if want != have:
        raise AssertionError(f"the patched model's output shapes {have} differ from the original's {want}")


def run_model(ref: str, attentions: tuple[str, ...], input_size: str | None, max_params: float,
              reduced: bool = False) -> list[dict]:
    """Patch one model with each attention; one row per attention (run inside the child process). A model over
    `max_params` is built and patched on the meta device: shapes, sites and the rewrite are checked, identity
    cannot be (status meta). With `reduced`, the model is patched and verified at half its own image size
    (status reduced): for models whose verification at their own size ran out of memory."""
    import warnings

    import torch

    from surgeon.errors import SurgeonError, VerificationError

    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    source, name = ref.split(":", 1)
    base = {"source": source, "model": name, "input_size": input_size or ""}
    n_params = _count_params(ref)
    big = n_params is not None and n_params > max_params
    try:
        own = small = None
        if reduced:
            from surgeon import sizes

            # the model's own size is metadata: read it from a build without weights, not a second real build
            own = (tuple(int(d) for d in input_size.split(",")) if input_size
                   else sizes.configured_size(_meta_build(ref)))
            if not own or len(own) < 3:
                return []  # no image size to halve: the out-of-memory rows stand
            small = _halved(own)
            base["input_size"] = ",".join(map(str, small))
        model = _meta_build(ref) if big else _build(ref, small[-2:] if small else None)
    except Exception as exc:  # noqa: BLE001 - a model the library cannot build here is a row, not the end
        return [{**base, "attention": a, "status": "build_failed", "error": _one_line(f"{type(exc).__name__}: {exc}")}
                for a in attentions]
    n_params = sum(p.numel() for p in model.parameters())
    if n_params > max_params and not big:  # could not be built on meta: too big to build twice and verify
        return [{**base, "attention": a, "status": "too_big",
                 "error": f"{n_params / 1e6:.0f}M parameters > --max-params {max_params / 1e6:.0f}M, "
                          "and the library cannot build it on the meta device"}
                for a in attentions]
    if not big:
        _perturb_bn(model)
    size = small or (tuple(int(d) for d in input_size.split(",")) if input_size else None)
    rows = []
    for attention in attentions:
        row = {**base, "attention": attention}
        t = time.perf_counter()
        try:
            _patch(model, attention, size, row)
            if big:
                row["error"] = _one_line(f"{n_params / 1e6:.0f}M parameters > --max-params {max_params / 1e6:.0f}M: "
                                         "patched on the meta device, output shapes checked, identity not computed")
            elif reduced and row["status"] == "ok":
                row.update(status="reduced", error=_one_line(
                    f"verified at {'×'.join(map(str, small))}: at its own {'×'.join(map(str, own))} the "
                    f"verification ran out of memory; {row['error']}".rstrip("; ")))
        except VerificationError as exc:
            row.update(status="identity_break", error=_one_line(exc))
        except SurgeonError as exc:
            row.update(status="refused", error=_one_line(f"{type(exc).__name__}: {exc}"))
        except Exception as exc:  # noqa: BLE001 - a crash is what the sweep exists to find
            out_of_memory = isinstance(exc, MemoryError) or "can't allocate memory" in str(exc)
            row.update(status="oom" if out_of_memory else "crash",
                       error=_one_line(f"{type(exc).__name__}: {exc}{_where(exc)}"))
        row["surgery_s"] = f"{time.perf_counter() - t:.2f}"
        rows.append(row)
    return rows


def _child(conn, ref: str, attentions: tuple[str, ...], input_size: str | None, memory_gb: float,
           max_params: float, reduced: bool) -> None:
    # the limit counts the address space the parent already mapped (the libraries), plus the budget
    with open("/proc/self/statm") as f:
        mapped = int(f.read().split()[0]) * resource.getpagesize()
    limit = mapped + int(memory_gb * 2**30)
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    try:
        conn.send(run_model(ref, attentions, input_size, max_params, reduced))
    except MemoryError:
        conn.send(None)
    conn.close()


def run_isolated(ref: str, attentions: tuple[str, ...], input_size: str | None, *, timeout: float,
                 memory_gb: float, max_params: float, reduced: bool = False) -> list[dict]:
    """`run_model` in a forked process (the parent imported the libraries once), killed after `timeout`."""
    ctx = mp.get_context("fork")
    recv, send = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_child, args=(send, ref, attentions, input_size, memory_gb, max_params, reduced))
    start = time.perf_counter()
    proc.start()
    send.close()
    rows, status, error = None, "", ""
    in_time = recv.poll(timeout)
    if in_time:
        try:
            rows = recv.recv()
        except EOFError:  # the child died without a result
            pass
    proc.join(5 if in_time else 0)
    if not in_time:  # over the limit: stopped, whether or not it would have finished a moment later
        if proc.is_alive():
            proc.kill()
        proc.join()
        status, error = "timeout", f"no result within {timeout:.0f} s"
    elif proc.is_alive():
        proc.kill()
        proc.join()
    if rows is None and not status:
        status = "oom" if proc.exitcode in (0, -9) else "crash"
        error = f"the process ended with code {proc.exitcode} (memory limit {memory_gb:g} GB)"
    if rows is None:
        source, name = ref.split(":", 1)
        rows = [{"source": source, "model": name, "attention": a, "status": status, "error": error,
                 "input_size": input_size or "", "surgery_s": f"{time.perf_counter() - start:.0f}"}
                for a in attentions]
    return rows


# -- the sweep -----------------------------------------------------------------------------------------
def done_keys(path: Path) -> set[tuple[str, str, str]]:
    """(source, model, attention) of the rows a CSV already holds: a resumed sweep skips them."""
    if not path.exists():
        return set()
    with path.open(newline="") as f:
        return {(r["source"], r["model"], r["attention"]) for r in csv.DictReader(f)}


def read_rows(path: Path) -> list[dict]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def sweep(jobs: list[tuple[str, str | None]], path: Path, *, attentions: tuple[str, ...], timeout: float,
          memory_gb: float, max_params: float, progress: bool = True) -> None:
    """Run each (model reference, input size) not yet in the CSV at `path`, appending its rows."""
    done = done_keys(path)
    todo = [(ref, size, missing) for ref, size in jobs
            if (missing := tuple(a for a in attentions if (*ref.split(":", 1), a) not in done))]
    new_file = not path.exists()
    # the libraries are imported once here, so every forked child starts with them loaded
    import segmentation_models_pytorch  # noqa: F401
    import timm  # noqa: F401
    import torchvision  # noqa: F401

    import surgeon  # noqa: F401
    import surgeon.registry

    surgeon.registry.attentions()
    with path.open("a", newline="") as f:
        writer = csv.DictWriter(f, COLUMNS)
        if new_file:
            writer.writeheader()
        for i, (ref, size, missing) in enumerate(todo, 1):
            rows = run_isolated(ref, missing, size, timeout=timeout, memory_gb=memory_gb, max_params=max_params)
            rows = _retry_reduced(rows, ref, size, timeout=timeout, memory_gb=memory_gb, max_params=max_params)
            for row in rows:
                writer.writerow({c: row.get(c, "") for c in COLUMNS})
            f.flush()
            if progress:
                line = " ".join(f"{r['attention']}={r['status']}" for r in rows)
                print(f"[{i}/{len(todo)}] {ref} {line}", file=sys.stderr, flush=True)


def _retry_reduced(rows: list[dict], ref: str, size: str | None, **limits) -> list[dict]:
    """The out-of-memory rows run again at half the model's image size; a row that passes there replaces its
    oom row (status reduced, naming both sizes), one that fails again keeps the oom row."""
    oom = tuple(r["attention"] for r in rows if r["status"] == "oom")
    if not oom:
        return rows
    retried = {r["attention"]: r for r in run_isolated(ref, oom, size, reduced=True, **limits)
               if r["status"] not in FAILING}
    return [retried.get(r["attention"], r) if r["status"] == "oom" else r for r in rows]


# -- the summary ---------------------------------------------------------------------------------------
def failure_class(error: str) -> str:
    """An error message with its model-specific parts (names in quotes, numbers, shapes) blanked, so that
    rows failing for the same reason group together."""
    text = re.sub(r"'[^']*'|\"[^\"]*\"", "'…'", error)
    text = re.sub(r"\(\d[\d, ]*\)|\[\d[\d, ]*\]", "(…)", text)
    text = re.sub(r"\d+(\.\d+)?(e-?\d+)?", "N", text)
    return text[:160]


def summary(rows: list[dict]):
    """Two rich tables: counts per source and status, and the failure classes with example models."""
    from rich.markup import escape
    from rich.table import Table

    statuses = sorted({r["status"] for r in rows}, key=lambda s: (s != "ok", s))
    counts = Table(title="zoo sweep: rows per source and status (one row = one model × one attention)",
                   title_justify="left")
    counts.add_column("source")
    for s in [*statuses, "total"]:
        counts.add_column(s, justify="right")
    by_source: dict[str, Counter] = defaultdict(Counter)
    for r in rows:
        by_source[r["source"]][r["status"]] += 1
    for source, c in [*sorted(by_source.items()), ("all", sum(by_source.values(), Counter()))]:
        counts.add_row(source, *(str(c.get(s, 0)) for s in statuses), str(sum(c.values())))
    classes: dict[tuple[str, str], list[dict]] = defaultdict(list)
    for r in rows:
        if r["status"] != "ok":
            classes[(r["status"], failure_class(r["error"]))].append(r)
    failures = Table(title="rows not plainly ok, by class (status, message with names and numbers blanked)",
                     title_justify="left")
    for col in ("status", "rows", "class", "examples"):
        failures.add_column(col, justify="right" if col == "rows" else "left")
    for (status, cls), members in sorted(classes.items(), key=lambda kv: (kv[0][0] != "crash", -len(kv[1]))):
        examples = sorted({f"{m['source']}:{m['model']}" for m in members})
        failures.add_row(status, str(len(members)), escape(cls),  # errors hold [brackets]: not rich markup
                         ", ".join(examples[:3]) + (" …" if len(examples) > 3 else ""))
    return counts, failures


def markdown_summary(rows: list[dict]) -> str:
    """The summary's two tables as Markdown (for the README)."""
    lines = []
    for table in summary(rows):
        cols = [c.header for c in table.columns]
        cells = [list(c.cells) for c in table.columns]
        lines += [f"{table.title}:", "", "| " + " | ".join(cols) + " |",
                  "|" + "|".join("---:" if c.justify == "right" else "---" for c in table.columns) + "|"]
        lines += ["| " + " | ".join(str(col[i]).replace("\\[", "[").replace("|", "\\|") for col in cells) + " |"
                  for i in range(len(cells[0]) if cells else 0)]
        lines.append("")
    return "\n".join(lines)


def print_summary(rows: list[dict]) -> None:
    from rich.console import Console

    console = Console(width=int(os.environ.get("COLUMNS", 160)))
    for table in summary(rows):
        console.print(table)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--source", default="timm,tv,hf,smp", help="comma-separated: timm, tv, hf, smp")
    ap.add_argument("--sample", type=int, help="this many models per source, drawn with a fixed seed")
    ap.add_argument("--match", help="only models whose reference matches this regular expression")
    ap.add_argument("--ci", action="store_true", help="the fixed 30-model CI sample at fast input sizes")
    ap.add_argument("--csv", type=Path, help="rows go here (default: zoo.csv, or zoo-ci.csv with --ci)")
    ap.add_argument("--attentions", default=",".join(ATTENTIONS))
    ap.add_argument("--timeout", type=float, default=300, help="seconds per model (default 300)")
    ap.add_argument("--memory-gb", type=float, default=8, help="address space per model process (default 8)")
    ap.add_argument("--max-params", type=float, default=400e6,
                    help="models with more parameters are recorded as too_big, not built twice (default 4e8)")
    ap.add_argument("--summary", type=Path, metavar="CSV", help="only print the summary of a CSV")
    ap.add_argument("--markdown", action="store_true", help="with --summary: the tables as Markdown")
    args = ap.parse_args(argv)
    if args.summary:
        rows = read_rows(args.summary)
        if args.markdown:
            print(markdown_summary(rows))
        else:
            print_summary(rows)
        return 0
    attentions = tuple(a for a in args.attentions.split(",") if a)
    path = args.csv or Path("zoo-ci.csv" if args.ci else "zoo.csv")
    if args.ci:
        jobs = list(CI_SAMPLE)
    else:
        sources = [s for s in args.source.split(",") if s]
        refs = model_refs(sources)
        if args.match:
            refs = [r for r in refs if re.search(args.match, r)]
        if args.sample:
            rng = random.Random(0)
            per_source = [[r for r in refs if r.startswith(s + ":")] for s in sources]
            refs = [r for group in per_source for r in sorted(rng.sample(group, min(args.sample, len(group))))]
        jobs = [(r, None) for r in refs]
    sweep(jobs, path, attentions=attentions, timeout=args.timeout, memory_gb=args.memory_gb,
          max_params=args.max_params)
    wanted = {(*ref.split(":", 1), a) for ref, _ in jobs for a in attentions}
    rows = [r for r in read_rows(path) if (r["source"], r["model"], r["attention"]) in wanted]
    print_summary(rows)
    bad = [r for r in rows if r["status"] in FAILING]
    for r in bad:
        print(f"FAILED {r['source']}:{r['model']} {r['attention']}: {r['status']}: {r['error']}", file=sys.stderr)
    return 1 if args.ci and bad else 0


if __name__ == "__main__":
    sys.exit(main())
