"""The surgeon command: help, listings, add, and one-line errors with exit code 2; bad input to every command
changes nothing on disk."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

import surgeon
from surgeon import models
from surgeon.cli import cli

runner = CliRunner()


def run(*args):
    return runner.invoke(cli, list(args), catch_exceptions=False)


@pytest.mark.parametrize("cmd", [[], ["list"], ["sites"], ["add"]])
def test_help(cmd):
    result = run(*cmd, "--help")
    assert result.exit_code == 0 and "Usage: " in result.output


def test_no_arguments_shows_the_help():
    result = runner.invoke(cli, [])
    assert "Usage: " in result.output and "Commands:" in result.output and "Error" not in result.output


def test_usage_errors_are_one_line():
    result = runner.invoke(cli, ["add", "se"])
    assert result.exit_code == 2
    assert result.stderr == "Error: Missing argument 'MODEL'. Run 'cli add --help' for usage\n"


def test_cli_import_does_not_import_torch():
    code = "import sys, surgeon.cli; sys.exit(1 if 'torch' in sys.modules else 0)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0
    out = subprocess.run([sys.executable, "-m", "surgeon.cli", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "add" in out.stdout


def test_list_shows_every_attention_with_kinds_and_paper():
    result = run("list", "--json")
    rows = {r["name"]: r for r in json.loads(result.output)}
    assert {"se", "eca", "cbam", "bam", "spatial", "attnpool"} <= set(rows)
    assert rows["bam"]["kinds"][0] == "stage" and "arXiv:1807.06514" in rows["bam"]["paper"]
    table = run("list").output
    assert "cbam" in table and "residual" in table


def test_sites_table_and_json():
    result = run("sites", "toy_models:tiny_resnet", "--kind", "stage", "--input-size", "3,32,32", "--json")
    assert result.exit_code == 0
    assert [s["name"] for s in json.loads(result.output)] == ["stage1", "stage2"]
    assert "stage1" in run("sites", "toy_models:tiny_resnet", "--input-size", "3,32,32").output


def test_add_dry_run_writes_nothing(tmp_path):
    out = tmp_path / "o"
    result = run("add", "cbam", "toy_models:tiny_resnet", "--input-size", "3,32,32", "--dry-run", "--out", str(out))
    assert result.exit_code == 0 and "stage1.0" in result.output and not out.exists()


def test_add_writes_recipe_and_weights_json(tmp_path):
    out = tmp_path / "o"
    result = run("add", "se", "toy_models:tiny_resnet", "--input-size", "3,32,32", "--option", "rd_ratio=0.5",
                 "--out", str(out), "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert data["verification"]["max_abs_diff"] == 0 and data["verification"]["ok"]
    assert len(data["plan"]["edits"]) == 6 and data["plan"]["edits"][0]["options"] == {"rd_ratio": 0.5}
    recipe = json.loads((out / "recipe.json").read_text())
    assert recipe["model"]["ref"] == "toy_models:tiny_resnet" and len(recipe["edits"]) == 6
    assert (out / "model.safetensors").stat().st_size > 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o"]  # no temporary folder left behind
    again = run("add", "se", "toy_models:tiny_resnet", "--input-size", "3,32,32", "--out", str(out))
    assert again.exit_code == 2 and "exists; pass --force" in again.output


def test_add_to_a_saved_folder_patches_its_patched_model_further(tmp_path):
    first, second = tmp_path / "se", tmp_path / "se-cbam"
    assert run("add", "se", "toy_models:tiny_resnet", "--input-size", "3,32,32", "--out", str(first)).exit_code == 0
    refused = run("add", "cbam", str(first), "--out", str(second))  # its base is a user factory
    assert refused.exit_code == 2 and "--trust-code" in refused.output and not second.exists()
    result = run("add", "cbam", str(first), "--trust-code", "--out", str(second))
    assert result.exit_code == 0, result.output
    model = surgeon.load(second, trust_code=True)
    assert [(e.attention, e.step) for e in surgeon.edits(model)] == [("se", 1)] * 6 + [("cbam", 2)] * 6


@pytest.mark.parametrize("args,message", [
    (["add", "cbma", "resnet18"], "Unknown attention 'cbma'. Did you mean 'cbam'"),
    (["add", "cbam", "resnet5O"], "Unknown timm model 'resnet5O'. Did you mean 'resnet50'"),
    (["add", "cbam", "resnet18", "--kind", "residul"], "Unknown kind 'residul'. Did you mean 'residual'"),
    (["add", "cbam", "resnet18", "--option", "rd_ratoi=0.5"], "Unknown option 'rd_ratoi' for cbam"),
    (["add", "cbam", "resnet18", "--option", "rd_ratio=7"], "rd_ratio must be a number in (0, 1], got 7"),
    (["add", "cbam", "resnet18", "--at", "layer9.*"], "--at 'layer9.*' matches no residual site. Valid sites:"),
    (["add", "se", "resnet18", "--kind", "pool"], "se cannot serve kind 'pool'; it serves residual"),
    (["add", "cbam", "resnet18", "--weights", "/nonexistent.safetensors"], "does not exist"),
])
def test_bad_input_one_line_exit_2(tmp_path, args, message):
    out = tmp_path / "out"
    result = runner.invoke(cli, args + ["--input-size", "3,32,32", "--out", str(out)])
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert lines[-1].startswith("Error: ") and message in lines[-1]
    assert "Traceback" not in result.output
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_mismatched_weights_file(tmp_path):
    from safetensors.torch import save_file

    from toy_models import TinyResNet

    w = tmp_path / "w.safetensors"
    save_file(TinyResNet().state_dict(), str(w))
    result = runner.invoke(cli, ["add", "cbam", "resnet18", "--weights", str(w), "--out", str(tmp_path / "o")])
    assert result.exit_code == 2 and "do not fit ResNet" in result.output and not (tmp_path / "o").exists()


@pytest.mark.parametrize("size, message", [
    ("3,a,2", "must be integers separated by commas"),
    ("0,1", "must be positive integers"),
    ("3,,4", "must be integers separated by commas"),
    ("1,2,3,4,5,6", "has 6 dimensions; at most 5"),
    ("3,100000,100000", "has 30,000,000,000 values per sample"),
    ("9" * 30, "values per sample"),
])
def test_bad_input_size(size, message):
    result = runner.invoke(cli, ["sites", "resnet18", "--input-size", size])
    assert result.exit_code == 2 and result.stdout == ""
    assert len(result.stderr.splitlines()) == 1 and message in result.stderr, result.stderr


def test_saved_files_are_as_readable_as_any_file(tmp_path):
    import os

    umask = os.umask(0o022)
    try:
        out = tmp_path / "o"
        assert run("add", "se", "toy_models:tiny_resnet", "--input-size", "3,32,32", "--out", str(out)).exit_code == 0
    finally:
        os.umask(umask)
    assert out.stat().st_mode & 0o777 == 0o755
    assert {p.name: p.stat().st_mode & 0o777 for p in out.iterdir()} == {"recipe.json": 0o644,
                                                                        "model.safetensors": 0o644}


# -- bad input to every command: one 'Error: ...' line on stderr, exit code 2, no traceback, nothing written
# and nothing deleted (the folders involved are snapshotted before and after) --------------------------------
HERE = Path(__file__).parent
REF = "toy_models:tiny_resnet"
SIZE = ("--input-size", "3,32,32")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A working folder holding a saved model, a folder that is not a save, and broken files."""
    root = tmp_path_factory.mktemp("world")
    saved = root / "saved"
    surgeon.save(surgeon.add(models.load(REF), "se", input_size=(3, 32, 32)), saved)
    (root / "mine").mkdir()
    (root / "mine" / "notes.txt").write_text("the user's own file\n")
    (root / "empty.json").write_text("")
    (root / "corrupt.json").write_text('{"format": "surgeon.recipe", "vers')
    (root / "not-weights.safetensors").write_text("these are not weights\n")
    (root / "empty.pth").write_bytes(b"")
    (root / "a-file").write_text("x\n")
    recipe = json.loads((saved / "recipe.json").read_text())
    for name, change in {"edits-not-list": {"edits": {"site": "stage1.0"}},
                         "options-not-dict": {"edits": [{**recipe["edits"][0], "options": ["rd_ratio", 0.5]}]},
                         "version-str": {"version": "1"},
                         "size-huge": {"input_size": [3, 10**6, 10**6]}}.items():
        d = root / name
        d.mkdir()
        (d / "recipe.json").write_text(json.dumps({**recipe, **change}))
        (d / "model.safetensors").write_bytes((saved / "model.safetensors").read_bytes())
    bad = root / "bad-weights"
    bad.mkdir()
    (bad / "recipe.json").write_text((saved / "recipe.json").read_text())
    (bad / "model.safetensors").write_text("not safetensors\n")
    (root / "empty-dir").mkdir()
    return root


def snapshot(root: Path) -> dict[str, tuple]:
    return {str(p.relative_to(root)): (p.is_dir(), p.stat().st_size if p.is_file() else 0, p.stat().st_mtime_ns)
            for p in sorted(root.rglob("*"))}


CASES = {
    "list": [["list", "--bogus"], ["list", "extra"]],
    "sites": [["sites"], ["sites", REF, *SIZE, "--weights", "missing.safetensors"],
              ["sites", REF, *SIZE, "--weights", "not-weights.safetensors"],
              ["sites", REF, *SIZE, "--weights", "empty.pth"],
              ["sites", REF, "--input-size", "3,a,4"], ["sites", REF, "--input-size", "3,100000,100000"],
              ["sites", "missing/folder"]],
    "add": [["add"], ["add", "se"], ["add", "se", REF, *SIZE, "--weights", "not-weights.safetensors", "--out", "o"],
            ["add", "--recipe", "missing", "--out", "o"], ["add", "--recipe", "empty.json", "--out", "o"],
            ["add", "--recipe", "corrupt.json", "--out", "o"], ["add", "--recipe", "edits-not-list", "--out", "o"],
            ["add", "--recipe", "options-not-dict", "--trust-code", "--out", "o"],
            ["add", "--recipe", "size-huge", "--out", "o"],
            ["add", "se", REF, *SIZE, "--out", "a-file/o"], ["add", "se", REF, *SIZE, "--out", "a-file"],
            ["add", "se", REF, *SIZE, "--out", "mine", "--force"], ["add", "se", REF, *SIZE, "--out", ".", "--force"],
            ["add", "se", REF, *SIZE, "--out", "..", "--force"], ["add", "se", REF, *SIZE, "--out", "saved"],
            ["add", "se", REF, *SIZE, "--out", "/proc/o"]],
    "apply": [["apply", "missing", REF], ["apply", "empty-dir", REF], ["apply", "version-str", REF],
              ["apply", "bad-weights", REF, *SIZE], ["apply", "saved", REF, "--out", "saved", "--force"],
              ["apply", "saved", REF, "--out", ".", "--force"]],
    "show": [["show", "missing"], ["show", "empty.json"], ["show", "corrupt.json"], ["show", "edits-not-list"],
             ["show", "mine"], ["show", "a-file"]],
    "export": [["export", "missing", "--format", "onnx"], ["export", "saved", "--format", "bogus"],
               ["export", "bad-weights", "--format", "exported", "--trust-code", "--out", "m.pt2"],
               ["export", "saved", "--format", "exported", "--tolerance", "nan", "--out", "m.pt2"],
               ["export", "saved", "--format", "exported", "--tolerance", "-1", "--out", "m.pt2"],
               ["export", "saved", "--format", "exported", "--out", "saved/recipe.json", "--force"],
               ["export", "saved", "--format", "exported", "--out", "a-file/m.pt2"]],
    "finetune": [["finetune", "missing", "--data", "digits", "--epochs", "1", "--lr", "1e-3", "--out", "o"],
                 ["finetune", "saved", "--data", "digits", "--epochs", "0", "--lr", "1e-3", "--out", "o"],
                 ["finetune", REF, *SIZE, "--weights", "empty.pth", "--data", "digits", "--epochs", "1", "--lr",
                  "1e-3", "--out", "o"],
                 ["finetune", "saved", "--data", "digits", "--epochs", "1", "--lr", "1e-3", "--out", "a-file/o"],
                 ["finetune", "saved", "--data", "missing", "--trust-code", "--epochs", "1", "--lr", "1e-3",
                  "--out", "o"],
                 ["finetune", "saved", "--data", "digits", "--epochs", "1", "--lr", "1e-3", "--out", "mine", "--force"],
                 ["finetune", "saved", "--data", "digits", "--epochs", "1", "--lr", "1e-3", "--out", "saved",
                  "--force", "--trust-code"]],
    "evaluate": [["evaluate", "missing", "--data", "digits"], ["evaluate", "version-str", "--data", "digits"],
                 ["evaluate", REF, *SIZE, "--weights", "not-weights.safetensors", "--data", "digits"],
                 ["evaluate", "saved", "--trust-code", "--data", "missing"]],
}
PARAMS = [(cmd, args) for cmd, cases in CASES.items() for args in cases]


@pytest.mark.parametrize("command, args", PARAMS,
                         ids=[" ".join(x for x in a if x not in (REF, *SIZE)) for _, a in PARAMS])
def test_bad_input_is_one_line_exit_2_and_changes_nothing(world, monkeypatch, command, args):
    cwd = world / "cwd"
    cwd.mkdir(exist_ok=True)
    monkeypatch.chdir(world)
    if "." in args or ".." in args:
        monkeypatch.chdir(cwd)
        args = [a if a in (".", "..") or a.startswith("-") or a in (REF, "se") else
                (f"../{a}" if (world / a).exists() or a in ("o", "missing") else a) for a in args]
    before = snapshot(world)
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 2, (result.output, result.exception)
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.stderr
    assert "Traceback" not in result.output and result.stdout == ""
    assert snapshot(world) == before


def test_outputs_are_checked_before_the_model_is_built(world, monkeypatch):
    """A refused --out costs nothing: no model is built (fail fast)."""
    import surgeon.models

    def refuse(*_a, **_k):
        raise AssertionError("the model was built before --out was checked")

    monkeypatch.setattr(surgeon.models, "load", refuse)
    monkeypatch.chdir(world)
    for args in (["add", "se", REF, "--out", "mine", "--force"], ["add", "se", REF, "--out", "a-file/o"],
                 ["apply", "saved", REF, "--out", "saved", "--force"]):
        result = CliRunner().invoke(cli, args)
        assert result.exit_code == 2 and "Error: " in result.stderr, (args, result.output, result.exception)


@pytest.mark.parametrize("args, message", [
    (["show", "missing"], "No recipe at 'missing'"),
    (["add", "se", REF, *SIZE, "--out", ".", "--force"], "is the working directory or one of its parents"),
])
def test_real_process_prints_one_line(world, args, message):
    before = snapshot(world)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE.parent), str(HERE)])}
    proc = subprocess.run([sys.executable, "-m", "surgeon.cli", *args], cwd=world, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.splitlines() == [proc.stderr.strip()] and message in proc.stderr, proc.stderr
    assert snapshot(world) == before


def test_a_folder_named_like_a_model_does_not_hide_the_model(tmp_path, monkeypatch):
    """A save in ./resnet18 is reached as ./resnet18; the bare name stays timm's resnet18."""
    monkeypatch.chdir(tmp_path)
    assert run("add", "se", "resnet18", "--input-size", "3,64,64", "--out", "resnet18").exit_code == 0
    assert run("add", "cbam", "resnet18", "--input-size", "3,64,64", "--out", "plain").exit_code == 0
    assert run("add", "cbam", "./resnet18", "--input-size", "3,64,64", "--out", "both").exit_code == 0
    assert [e.attention for e in surgeon.edits(surgeon.load("plain"))] == ["cbam"] * 8
    assert [e.attention for e in surgeon.edits(surgeon.load("both"))] == ["se"] * 8 + ["cbam"] * 8
