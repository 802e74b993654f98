"""Export a patched model for deployment without surgeon: torch.export (.pt2), TorchScript, ONNX.

Every export is checked by running the written file (ONNX through onnxruntime) on the example input
and comparing with the patched model (max |diff| ≤ tolerance × max(1, max |output|): float32 rounding grows with
the outputs' size); it is written to a temporary file and
moved into place only when the check passes. When a format cannot serve the model, each inserted
module is tried alone, so the error names the module and the reason.
"""
from __future__ import annotations

import contextlib
import io
import logging
import math
import os
import re
import tempfile
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

from surgeon.checkpoint import normal_permissions
from surgeon.errors import ExportError, OptionError

log = logging.getLogger("surgeon")

FORMATS = {"exported": ".pt2", "torchscript": ".pt", "onnx": ".onnx"}
ONNX_HINT = "pip install 'surgeon[export]' (onnx, onnxruntime, onnxscript)"


@dataclass
class Exported:
    """A written, checked export: where, which format and how (e.g. 'trace' for TorchScript), the largest
    |difference| from the patched model on the example input, and the largest allowed (`tolerance` scaled by the
    outputs' largest magnitude when that exceeds 1)."""

    path: Path
    format: str
    method: str
    max_abs_diff: float
    tolerance: float
    allowed: float

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "path": str(self.path)}


@contextlib.contextmanager
def _quiet():
    """Exporters print progress on stdout and warn a lot; stdout is for results."""
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        yield


def _first_line(exc: BaseException) -> str:
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc)).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0] if text else ''}".strip(": ")


def _reason(exc: BaseException) -> str:
    """The root cause of an exporter's error, with the operator it stopped at when it says so
    (exporters wrap the real reason in several generic layers)."""
    chain = [exc]
    while chain[-1].__cause__ is not None and len(chain) < 16:
        chain.append(chain[-1].__cause__)
    op = next((m.group(1) for e in chain if (m := re.search(r"target=torch\.ops\.([\w.]+?)(?:\.default)?\]",
                                                             str(e)))), None)
    text = _first_line(chain[-1])
    return f"{text} (at {op})" if op and op not in text else text


# -- one function per format: write `model` to `path`, return (method, a runner of the written file) --
def _write_exported(model, inputs: tuple, path: Path) -> tuple[str, Callable[..., Any]]:
    import torch

    ep = torch.export.export(model, inputs)
    torch.export.save(ep, str(path))
    loaded = torch.export.load(str(path)).module()
    return "torch.export", loaded


def _write_torchscript(model, inputs: tuple, path: Path) -> tuple[str, Callable[..., Any]]:
    import torch

    try:
        scripted, method = torch.jit.script(model), "script"
    except Exception as exc:  # scripting needs every module to be TorchScript-clean; tracing does not
        log.info("torchscript: script failed (%s); tracing instead (fixed shapes and eval-mode control flow)",
                 _first_line(exc))
        scripted, method = torch.jit.trace(model, inputs, check_trace=False), "trace"
    torch.jit.save(scripted, str(path))
    return method, torch.jit.load(str(path))


def _write_onnx(model, inputs: tuple, path: Path) -> tuple[str, Callable[..., Any]]:
    import torch

    try:
        import onnxruntime as ort
    except ImportError as exc:
        raise ExportError(f"ONNX export needs onnx and onnxruntime, which are not installed: {ONNX_HINT}") from exc
    method = "torch.onnx (dynamo)"
    try:
        torch.onnx.export(model, inputs, str(path), dynamo=True, verbose=False, external_data=False)
    except Exception as exc:
        # the older TorchScript-based exporter still covers ops the dynamo one lacks (e.g. 3-D SDPA)
        log.info("onnx: the dynamo exporter failed (%s); trying the TorchScript-based one", _reason(exc))
        try:
            torch.onnx.export(model, inputs, str(path), dynamo=False)
        except Exception:
            raise exc from None
        method = "torch.onnx (torchscript-based)"
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])

    def run(*args):
        feeds = {i.name: a.detach().numpy() for i, a in zip(session.get_inputs(), args)}
        return [torch.from_numpy(o) for o in session.run(None, feeds)]

    return method, run


_WRITERS = {"exported": _write_exported, "torchscript": _write_torchscript, "onnx": _write_onnx}


# -- diagnosis ---------------------------------------------------------------------------------------
def _module_inputs(model, paths: list[str], inputs: tuple) -> dict[str, tuple]:
    """The positional inputs each inserted module receives on the example input."""
    import torch

    seen: dict[str, tuple] = {}
    handles = []
    for p in paths:
        def hook(_m, args, _p=p):
            seen.setdefault(_p, tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in args))
        handles.append(model.get_submodule(p).register_forward_pre_hook(hook))
    try:
        with torch.no_grad():
            model(*inputs)
    finally:
        for h in handles:
            h.remove()
    return seen


def _culprit(model, fmt: str, inputs: tuple, folder: Path, tolerance: float | None = None) -> str:
    """Which inserted module the format cannot serve, and why ('' when each exports alone). With `tolerance`, a
    module whose export alone computes something else (by more than that) is named too."""
    import torch

    from surgeon.surgery.rewrite import edits_of
    from surgeon.surgery.verify import max_abs_diff

    paths = [e["module"] for e in edits_of(model)]
    for path, args in _module_inputs(model, paths, inputs).items():
        module = model.get_submodule(path)
        try:
            with _quiet(), torch.no_grad():
                method, run = _WRITERS[fmt](module, args, folder / f"part{FORMATS[fmt]}")
                if tolerance is not None:
                    expected = module(*args)
                    diff = max_abs_diff(expected, run(*args))
        except Exception as exc:
            return f"module {path!r} ({type(module).__name__}) cannot be exported: {_reason(exc)}"
        if tolerance is not None and not diff <= _allowed(tolerance, expected):
            return (f"module {path!r} ({type(module).__name__}) cannot be exported: its {fmt} export ({method}) alone "
                    f"differs from it by {diff:.3g}")
    return ""


def _name(model) -> str:
    """The model's reference ('resnet18') when surgeon built it, else its class name."""
    from surgeon import record

    base = record.base(model) or {}
    return repr(base["ref"]) if base.get("ref") else type(model).__name__


# -- the public function -----------------------------------------------------------------------------
def export(model, format: str, out: str | os.PathLike | None = None, *, example_input: Any = None,
           tolerance: float = 1e-5, trust_code: bool = False, force: bool = False) -> Exported:
    """Export a patched model (or a saved folder) and check the written file against it. What is
    exported is the merged form (`surgeon.merge`: gates folded where exact), the model itself is unchanged.

    Args:
        model: an nn.Module, or a folder written by `surgeon.save` (loaded with `surgeon.load`).
        format: 'exported' (torch.export, .pt2), 'torchscript' (script, else trace; .pt) or 'onnx'.
        out: the file to write (default for a folder: DIR/model.pt2, DIR/model.pt or DIR/model.onnx).
        example_input: the input to export with and check on (default: the model's example input,
            from its recipe's input size).
        tolerance: the largest |difference| allowed between the export and the model, for outputs up to 1 in
            magnitude; larger outputs allow it times their largest magnitude.
        trust_code: see `surgeon.load`. force: replace `out` when it exists.

    Returns:
        Exported: path, format, method and the measured max |diff|.

    Raises:
        ExportError: the format cannot serve a module (named, with the reason), or the export's
        output differs by more than `tolerance`. OutputError: `out` exists (without force), is a
        folder, or may not be written (see `surgeon.outputs.check_file`). OptionError: a tolerance
        that is negative or not a finite number.

    Example:
        >>> surgeon.export_model("out/cbam-r50", "onnx").max_abs_diff
    """
    from surgeon import api, checkpoint, outputs
    from surgeon.merging import merge

    if format not in FORMATS:
        from surgeon.errors import unknown

        raise unknown("export format", format, FORMATS, f"Valid formats: {', '.join(FORMATS)}.")
    if isinstance(tolerance, bool) or not isinstance(tolerance, (int, float)) or not 0 <= tolerance < math.inf:
        raise OptionError(f"tolerance must be a number ≥ 0 (the largest |export − model| allowed), got {tolerance!r}")
    folder = Path(model) if isinstance(model, (str, os.PathLike)) else None
    if out is None and folder is None:
        raise OptionError("Pass out= (the file to write) when exporting a model object")
    out = Path(out) if out is not None else folder / f"model{FORMATS[format]}"
    # the folder's own files (recipe, weights, model code) are inputs; earlier exports may be replaced
    reading = [p for p in folder.iterdir() if p.suffix not in FORMATS.values()] if folder and folder.is_dir() else []
    outputs.check_file(out, force=force, reading=reading)
    if folder is not None:
        model = checkpoint.load(folder, trust_code=trust_code)
    from surgeon.surgery.owned import in_mode

    # in eval mode, and afterwards each module in its own mode again (a frozen norm inside a training model)
    with in_mode(model, False):  # the deployed form: gates folded where exact (a copy; see `surgeon.merge`)
        return _export(merge(model), format, out, api.example_inputs(model, example_input=example_input), tolerance)


def _export(model, format: str, out: Path, inputs: tuple, tolerance: float) -> Exported:
    import torch

    from surgeon import outputs

    with torch.no_grad():
        expected = model(*inputs)
    made = outputs.make_parents(out)
    try:
        return _write_checked(model, format, out, inputs, tolerance, expected)
    except BaseException:
        outputs.remove_empty(made)
        raise


def _write_checked(model, format: str, out: Path, inputs: tuple, tolerance: float, expected) -> Exported:
    import torch

    with tempfile.TemporaryDirectory(prefix=f".{out.name}.", dir=out.parent) as tmp:
        tmp_file = Path(tmp) / f"model{FORMATS[format]}"  # torch.export.save wants its own suffix
        try:
            with _quiet(), torch.no_grad():
                method, run = _WRITERS[format](model, inputs, tmp_file)
                got = run(*inputs)
        except ExportError:
            raise
        except Exception as exc:
            why = _culprit(model, format, inputs, Path(tmp)) or f"the model cannot be exported: {_reason(exc)}"
            raise ExportError(f"{format} export of {_name(model)} failed: {why}") from exc
        from surgeon.surgery.verify import max_abs_diff

        diff, allowed = max_abs_diff(expected, got), _allowed(tolerance, expected)
        if not diff <= allowed:
            culprit = _culprit(model, format, inputs, Path(tmp), tolerance)
            raise ExportError(f"The {format} export ({method}) differs from the patched model by {diff:.3g} "
                              f"(> {allowed:.3g}) on the example input; nothing written"
                              + (f". The {culprit}" if culprit else ""))
        normal_permissions(Path(tmp))
        os.replace(tmp_file, out)
    return Exported(path=out, format=format, method=method, max_abs_diff=diff, tolerance=tolerance, allowed=allowed)


def _allowed(tolerance: float, expected) -> float:
    """The largest |export − model| allowed: `tolerance`, times the outputs' largest magnitude when above 1 (a
    float32 result of 2e8 is only exact to about 16, in any runtime)."""
    from surgeon.surgery.verify import tensors

    peak = max((t.detach().abs().max().item() for t in tensors(expected) if t.is_floating_point() and t.numel()),
               default=0.0)
    return tolerance * max(1.0, peak)
