"""The surgeon command: help, listings, add, and one-line errors with exit code 2."""
import json
import subprocess
import sys

import pytest
from click.testing import CliRunner

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
