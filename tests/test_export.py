"""Export: torch.export (.pt2), TorchScript and ONNX, each run and compared with the patched model; a
format that cannot serve a module says which module and why, and writes nothing."""
import importlib.util
import json
import os
import re
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from torch import nn

import surgeon
from surgeon import models
from surgeon.cli import cli
from surgeon.errors import ExportError, OptionError, OutputError, UnknownNameError
from surgeon.export import export
from surgeon.surgery.rewrite import edits_of
from toy_models import TinyResNet

HERE = Path(__file__).parent
FORMATS = ["exported", "torchscript", "onnx"]
HAS_ONNX = all(importlib.util.find_spec(m) for m in ("onnx", "onnxruntime", "onnxscript"))
needs_onnx = pytest.mark.skipif(not HAS_ONNX, reason="onnx/onnxruntime/onnxscript not installed: "
                                "pip install 'surgeon[export]'")

runner = CliRunner()


def run(*args):
    return runner.invoke(cli, [str(a) for a in args], catch_exceptions=False)


def _formats():
    return [pytest.param(f, marks=needs_onnx) if f == "onnx" else f for f in FORMATS]


def _scramble(model):
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for e in edits_of(model):
            for p in model.get_submodule(e["module"]).parameters():
                # away from the identity, not so far that outputs grow to 1e8 (lambda, residual_attention)
                p.add_(torch.randn(p.shape, generator=g) * 0.05 + 0.1)
    return model


@pytest.fixture(scope="module")
def cbam(tmp_path_factory):
    """cbam on resnet18 saved to a folder, and the patched model itself."""
    torch.manual_seed(0)
    model = _scramble(surgeon.plan(models.load("resnet18"), "cbam", input_size=(3, 64, 64)).apply(verify=False))
    return surgeon.save(model, tmp_path_factory.mktemp("export") / "cbam"), model


@pytest.fixture
def cbam_dir(cbam):
    return cbam[0]


_RUN_WITHOUT_SURGEON = """
import json, sys, torch
x = torch.load(sys.argv[2])
for fmt, path in json.loads(sys.argv[1]).items():
    if fmt == "exported":
        y = torch.export.load(path).module()(x)
    elif fmt == "torchscript":
        y = torch.jit.load(path)(x)
    else:
        import onnxruntime as ort
        sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
        y = torch.from_numpy(sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0])
    torch.save(y, path + ".y")
assert "surgeon" not in sys.modules
"""


@pytest.fixture(scope="module")
def cli_exports(cbam, tmp_path_factory):
    """Every available format exported through the CLI, then run in ONE process without surgeon on a
    new input: {format: (CLI result, that process's output)}, plus the input under 'x'."""
    import subprocess

    folder, _ = cbam
    root = tmp_path_factory.mktemp("cli_exports")
    results, files = {}, {}
    for fmt in FORMATS:
        if fmt == "onnx" and not HAS_ONNX:
            continue
        files[fmt] = str(root / f"m.{fmt}")
        results[fmt] = run("export", folder, "--format", fmt, "--out", files[fmt], "--json")
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(5))
    torch.save(x, root / "x.pt")
    ok = {f: p for f, p in files.items() if results[f].exit_code == 0}
    proc = subprocess.run([sys.executable, "-c", _RUN_WITHOUT_SURGEON, json.dumps(ok), str(root / "x.pt")],
                          capture_output=True, text=True, cwd=root, timeout=600, env={**os.environ, "PYTHONPATH": ""})
    assert proc.returncode == 0, proc.stderr[-1500:]
    return {f: (results[f], torch.load(ok[f] + ".y") if f in ok else None) for f in files} | {"x": x}


@pytest.mark.parametrize("fmt", _formats())
def test_cli_exports_cbam_resnet18_and_checks_it(cbam, cli_exports, fmt):
    _, model = cbam
    result, y = cli_exports[fmt]
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["max_abs_diff"] <= 1e-5 and Path(data["path"]).stat().st_size > 40e6
    # the written file ran in a process that never imported surgeon, on another input
    with torch.no_grad():
        assert float((y - model(cli_exports["x"])).abs().max()) <= 1e-5


@pytest.mark.parametrize("fmt", _formats())
def test_lstm_with_attention_pooling_exports(tmp_path, fmt):
    sys.path.insert(0, str(HERE))  # attnpool is built in: without it this fails, it never skips
    model = _scramble(surgeon.plan(models.load("ckpt_models:lstm_classifier"), "attnpool", kind="rnn").apply())
    result = export(model, fmt, tmp_path / f"lstm.{fmt}")
    assert result.max_abs_diff <= 1e-5 and result.path.exists()


class DataDependent(nn.Module):
    """A module torch.export cannot capture: its control flow depends on the values of its input."""

    def forward(self, x):
        if x.sum() > 0:
            return x * 2
        return x


def test_a_module_the_format_cannot_serve_is_named(tmp_path):
    torch.manual_seed(0)
    model = surgeon.plan(models.load("toy_models:tiny_resnet"), "se", input_size=(3, 32, 32)).apply(verify=False)
    path = edits_of(model)[0]["module"]
    owner, _, name = path.rpartition(".")
    setattr(model.get_submodule(owner), name, DataDependent())
    out = tmp_path / "m.pt2"
    with pytest.raises(ExportError, match=rf"module '{path}' \(DataDependent\) cannot be exported: .*"):
        export(model, "exported", out)
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_an_export_that_computes_something_else_is_refused(tmp_path, monkeypatch):
    from surgeon import export as export_module

    torch.manual_seed(0)
    model = surgeon.plan(models.load("toy_models:tiny_resnet"), "se", input_size=(3, 32, 32)).apply(verify=False)
    real = export_module._WRITERS["torchscript"]

    def off_by_one(m, inputs, path):
        method, runner_ = real(m, inputs, path)
        return method, lambda *a: runner_(*a) + 1

    monkeypatch.setitem(export_module._WRITERS, "torchscript", off_by_one)
    with pytest.raises(ExportError, match="differs from the patched model by 1"):
        export(model, "torchscript", tmp_path / "m.pt")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("error, passes", [(1.0, True), (100.0, False)])
def test_the_tolerance_grows_with_the_outputs_magnitude(tmp_path, monkeypatch, error, passes):
    """float32 results of 1e6 are exact to about 0.1 in any runtime: the allowed difference is the tolerance times
    the largest |output| above 1 (here 1e-5 × ~3e6 ≈ 30), so a rounding-sized difference passes and a larger one
    does not."""
    from surgeon import export as export_module

    torch.manual_seed(0)
    model = nn.Linear(4, 3)
    with torch.no_grad():
        model.weight.mul_(1e6)
    x = torch.ones(2, 4)
    peak = model(x).abs().max().item()
    real = export_module._WRITERS["torchscript"]
    def off(m, inputs, path):
        method, runner_ = real(m, inputs, path)
        return method, lambda *a: runner_(*a) + error

    monkeypatch.setitem(export_module._WRITERS, "torchscript", off)
    if passes:
        result = export(model, "torchscript", tmp_path / "m.pt", example_input=x)
        assert result.max_abs_diff == pytest.approx(error, rel=1e-3) and result.allowed == pytest.approx(1e-5 * peak)
        return
    with pytest.raises(ExportError, match=rf"differs from the patched model by 100 \(> {1e-5 * peak:.3g}\)"):
        export(model, "torchscript", tmp_path / "m.pt", example_input=x)
    assert list(tmp_path.iterdir()) == []


def test_export_errors(cbam_dir, tmp_path):
    with pytest.raises(UnknownNameError, match="Unknown export format 'tflite'"):
        export(cbam_dir, "tflite")
    result = run("export", cbam_dir, "--format", "tflite")
    assert result.exit_code == 2 and "tflite" in result.output
    (tmp_path / "x.pt2").write_text("keep me")
    result = run("export", cbam_dir, "--format", "exported", "--out", tmp_path / "x.pt2")
    assert result.exit_code == 2 and "exists; pass --force" in result.stderr
    assert (tmp_path / "x.pt2").read_text() == "keep me"
    result = run("export", tmp_path / "nowhere", "--format", "onnx")
    assert result.exit_code == 2 and "No recipe at" in result.stderr


@pytest.mark.parametrize("tolerance", [float("nan"), -1.0, float("inf"), "1e-5", True])
def test_tolerance_must_be_a_number_at_least_zero(tmp_path, tolerance):
    """Refused before anything is loaded or exported (nan would compare false and pass nothing)."""
    model = nn.Linear(2, 2)
    with pytest.raises(OptionError, match=r"tolerance must be a number ≥ 0"):
        export(model, "torchscript", tmp_path / "m.pt", example_input=torch.zeros(1, 2), tolerance=tolerance)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("out, message", [
    ("a-file/m.pt", "which is a file, not a folder"),
    ("folder", "is a folder; name the file to write in it"),
    ("/proc/m.pt", "is in the system folder '/proc'"),
])
def test_export_output_is_checked_first(tmp_path, monkeypatch, out, message):
    (tmp_path / "a-file").write_text("x")
    (tmp_path / "folder").mkdir()
    monkeypatch.chdir(tmp_path)
    with pytest.raises(OutputError, match=message):
        export(nn.Linear(2, 2), "torchscript", out, example_input=torch.zeros(1, 2), force=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file", "folder"]


def test_missing_onnxruntime_is_a_clear_error(tmp_path, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_ort(name, *args, **kwargs):
        if name == "onnxruntime":
            raise ImportError("No module named 'onnxruntime'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_ort)
    model = surgeon.plan(models.load("toy_models:tiny_resnet"), "se", input_size=(3, 32, 32)).apply(verify=False)
    with pytest.raises(ExportError, match=r"pip install 'surgeon\[export\]'"):
        export(model, "onnx", tmp_path / "m.onnx")


def _catalogue():
    return [a.name for a in surgeon.attentions() if "nchw" in a.layouts]


def _small_unet():
    import segmentation_models_pytorch as smp

    return smp.Unet(encoder_name="resnet18", encoder_weights=None, classes=2, encoder_depth=3,
                    decoder_channels=(32, 16, 8))


# the feature-map attentions that need another model than the toy ResNet (at 32x32), and its input size
OTHER_MODEL = {"aaconv": (lambda: TinyResNet(width=40), (3, 32, 32)),  # its default 8 heads need 40 channels
               "attention_gate": (_small_unet, (3, 64, 64)), "gau": (_small_unet, (3, 64, 64))}  # skip sites


@pytest.mark.slow
@pytest.mark.parametrize("fmt", _formats())
@pytest.mark.parametrize("attention", _catalogue())
def test_every_attention_exports_or_names_its_module(tmp_path, attention, fmt):
    """Each feature-map attention on a small ResNet (a small U-Net for the skip attentions): the export matches,
    or the error names the module that cannot be exported (a refusal, which passes). An export that computes
    something else fails."""
    torch.manual_seed(0)
    make, size = OTHER_MODEL.get(attention, (TinyResNet, (3, 32, 32)))
    plan = surgeon.plan(make().eval(), attention, input_size=size)
    model = _scramble(plan.apply(verify=False))
    try:
        result = export(model, fmt, tmp_path / f"m.{fmt}")
    except ExportError as exc:
        assert re.search(r"module '[\w.]+' \(\w+\) cannot be exported: ", str(exc)), exc
        return
    with torch.no_grad():  # within the tolerance, scaled by the outputs' magnitude above 1
        peak = model(*surgeon.api.example_inputs(model, input_size=size)).abs().max().item()
    assert result.max_abs_diff <= result.allowed == pytest.approx(1e-5 * max(1.0, peak))


def test_the_reason_is_the_root_cause_and_its_operator():
    from surgeon.export import _reason

    try:
        try:
            try:
                raise AssertionError("only 4D query, key, and value are supported")
            except AssertionError as root:
                raise RuntimeError("Error when translating node %sdpa : call_function[target=torch.ops."
                                   "aten.scaled_dot_product_attention.default](args = (%q,))") from root
        except RuntimeError as mid:
            raise RuntimeError("\x1b[96mFailed to convert the exported program\x1b[0m. Next steps: ...") from mid
    except RuntimeError as exc:
        assert _reason(exc) == ("AssertionError: only 4D query, key, and value are supported "
                                "(at aten.scaled_dot_product_attention)")


def test_export_leaves_every_module_in_its_own_mode(tmp_path):
    # exporting runs the model in eval mode; a training model with frozen norms must come back so
    torch.manual_seed(0)
    model = surgeon.add(nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3)),
                        "se", example_input=torch.randn(2, 3, 16, 16)).train()
    model[1].eval()
    before = {n: m.training for n, m in model.named_modules()}
    result = export(model, "torchscript", tmp_path / "m.pt")
    assert result.max_abs_diff <= 1e-5
    assert {n: m.training for n, m in model.named_modules()} == before and not before["1"] and before[""]
