"""Save, load, adapters, recipes and their security: round trips in a new process, bit-exact adapters,
recipe replay from the CLI, and bad input that fails in one line with exit code 2, writing nothing."""
import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file

import surgeon
from surgeon import models
from surgeon.checkpoint import adapter_keys
from surgeon.cli import cli
from surgeon.surgery.rewrite import edits_of
from surgeon.errors import NoSitesError, OptionError, RecipeError, WeightsError
from surgeon.recipe import validate

HERE = Path(__file__).parent
SIZE = (3, 64, 64)
LSTM_REF = "ckpt_models:lstm_classifier"
VIT_ARGS = {"img_size": 32, "patch_size": 8, "depth": 2}

runner = CliRunner()


def run(*args):
    return runner.invoke(cli, [str(a) for a in args], catch_exceptions=False)


def resnet18():
    torch.manual_seed(0)
    return models.load("resnet18")


def scramble(model, seed=1):
    """Give the inserted modules (gates included) non-trivial values, so a wrong or missing weight shows."""
    g = torch.Generator().manual_seed(seed)
    paths = [e["module"] for e in edits_of(model)]
    with torch.no_grad():
        for path in paths:
            for p in model.get_submodule(path).parameters():
                p.add_(torch.randn(p.shape, generator=g) * 0.02 + 0.05)
    return model


def _serving(kind):
    return [a for a in surgeon.attentions() if kind in a.kinds]


# -- round trip in a new process ---------------------------------------------------------------------
def _cases():
    """(case id, build the patched model, input) for every built-in attention at its default kind on
    timm resnet18, plus one ViT-tokens and one LSTM case when such attentions are registered."""
    # every attention that serves feature maps at its default kind; sequence attentions are the two cases
    # after (an attention that finds no site, or a built-in plugin that went missing, fails: no skips)
    cases = [(f"resnet18-{att.name}", att.name) for att in surgeon.attentions()
             if "nchw" in att.layouts and att.default_kind in ("residual", "stage", "after_conv", "pool")]
    cases.append(("vit-tokens", _serving("tokens")[0].name))
    rnn = [a for a in _serving("rnn") if a.name == "attnpool"] or _serving("rnn")
    cases.append(("lstm-rnn", rnn[0].name))
    return cases


CASES = _cases()
# the foundation's attentions and one model per other family run by default; the whole catalogue is slow
FAST = {f"resnet18-{n}" for n in ("se", "eca", "cbam", "bam", "spatial", "attnpool")} | {"vit-tokens", "lstm-rnn"}


def _build(case_id, attention):
    gen = torch.Generator().manual_seed(0)
    if case_id == "vit-tokens":
        torch.manual_seed(0)
        base = models.load("vit_tiny_patch16_224", model_args=VIT_ARGS)
        model = surgeon.plan(base, attention, kind="tokens", input_size=(3, 32, 32)).apply(verify=False)
        return model, torch.randn(2, 3, 32, 32, generator=gen)
    if case_id == "lstm-rnn":
        base = models.load(LSTM_REF)
        model = surgeon.plan(base, attention, kind="rnn").apply(verify=False)
        return model, torch.randn(2, 32, 8, generator=gen)
    model = surgeon.plan(resnet18(), attention, input_size=SIZE).apply(verify=False)
    return model, torch.randn(2, *SIZE, generator=gen)


_LOADER = """
import json, sys, torch, surgeon
from safetensors.torch import load_file
results = {}
torch.set_num_threads(int(sys.argv[2]))  # the parent's: the sums of a conv run in another order elsewhere
for case in json.loads(sys.argv[1]):
    try:
        data = load_file(case["io"])
        model = surgeon.load(case["dir"], trust_code=case["trust"])
        with torch.no_grad():
            out = model(data["input"])
        results[case["id"]] = "equal" if torch.equal(out, data["output"]) else \
            f"differs by {float((out - data['output']).abs().max()):.3g}"
    except Exception as exc:
        results[case["id"]] = f"{type(exc).__name__}: {exc}"
print(json.dumps(results))
"""


@pytest.fixture(scope="module")
def round_trip(request, tmp_path_factory):
    """Build and save every selected case here; load them all in ONE new process; return {case: outcome}."""
    selected = {item.callspec.params["case_id"] for item in request.session.items
                if getattr(item, "originalname", "") == "test_round_trip_in_a_new_process_is_bit_identical"}
    root = tmp_path_factory.mktemp("round_trip")
    outcome, jobs = {}, []
    for case_id, attention in CASES:
        if case_id not in selected:
            continue
        model, x = _build(case_id, attention)
        scramble(model)
        with torch.no_grad():
            y = model(x)
        surgeon.save(model, root / case_id)
        save_file({"input": x.contiguous(), "output": y.contiguous()}, str(root / f"{case_id}.io.safetensors"))
        jobs.append({"id": case_id, "dir": str(root / case_id), "io": str(root / f"{case_id}.io.safetensors"),
                     "trust": case_id == "lstm-rnn"})
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")]),
           "SURGEON_LOAD_PLUGINS": ""}
    proc = subprocess.run([sys.executable, "-c", _LOADER, json.dumps(jobs), str(torch.get_num_threads())],
                          capture_output=True, text=True,
                          env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    outcome.update(json.loads(proc.stdout.strip().splitlines()[-1]))
    return outcome


@pytest.mark.parametrize("case_id", [c[0] if c[0] in FAST else pytest.param(c[0], marks=pytest.mark.slow)
                                     for c in CASES])
def test_round_trip_in_a_new_process_is_bit_identical(round_trip, case_id):
    assert round_trip[case_id] == "equal", round_trip[case_id]


# -- adapters ----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def finetuned(tmp_path_factory):
    """resnet18 from a base weights file + cbam, fine-tuned a few steps (new modules and the head only)."""
    from conftest import perturb_bn

    root = tmp_path_factory.mktemp("adapter")
    base_file = root / "base.safetensors"
    save_file({k: v.contiguous() for k, v in perturb_bn(resnet18()).state_dict().items()}, str(base_file))
    model = surgeon.plan(models.load("resnet18", weights=base_file), "cbam", input_size=SIZE).apply(verify=False)
    for p in model.parameters():
        p.requires_grad_(False)
    trained = [p for e in edits_of(model) for p in model.get_submodule(e["module"]).parameters()]
    trained += list(model.fc.parameters())
    for p in trained:
        p.requires_grad_(True)
    opt = torch.optim.SGD(trained, lr=0.05)
    gen = torch.Generator().manual_seed(3)
    model.eval()  # frozen batch norms: the base's statistics stay those of base.safetensors
    for _ in range(3):
        x, y = torch.randn(4, *SIZE, generator=gen), torch.randint(0, 1000, (4,), generator=gen)
        loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return root, base_file, model


def test_adapter_applies_bit_identically_to_a_fresh_base(finetuned):
    root, base_file, model = finetuned
    out = surgeon.save(model, root / "ad", adapter=True, include=["head"])
    fresh = models.load("resnet18", weights=base_file)
    before = {k: v.clone() for k, v in fresh.state_dict().items()}
    loaded = surgeon.load(out, base=fresh)
    x = torch.randn(2, *SIZE, generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
        assert not torch.allclose(fresh(x), model(x))  # the fine-tuning did change the output
    assert all(torch.equal(v, before[k]) for k, v in fresh.state_dict().items())  # the base is not changed
    info = surgeon.summary(out)
    assert info["weights"]["include"] == ["fc"]


def test_adapter_bytes_are_the_added_parameters(finetuned):
    root, _, model = finetuned
    out = surgeon.save(model, root / "ad-only", adapter=True)
    info = surgeon.summary(out)
    w = info["weights"]
    added = info["params_added"]
    assert w["params"] == added == sum(e["params"] for e in info["edits"]) > 0
    # the file is the added parameters as float32, a few batch-norm statistics, and a JSON header
    assert 0 < w["file_bytes"] - added * 4 <= 160 * w["tensors"] + 1024, (w["file_bytes"], added * 4)
    assert w["file_bytes"] < 0.01 * w["model_bytes"]  # cbam on resnet18: ~0.8% of the full model
    full = surgeon.save(model, root / "full")
    assert (full / "model.safetensors").stat().st_size > 40 * w["file_bytes"]


def test_adapter_without_base_needs_its_base_weights_beside_it(finetuned, tmp_path):
    root, base_file, model = finetuned
    out = surgeon.save(model, tmp_path / "ad", adapter=True, include=["fc"])
    assert json.loads((out / "recipe.json").read_text())["model"]["weights"] == "base.safetensors"
    with pytest.raises(RecipeError, match="needs its base weights 'base.safetensors' beside it"):
        surgeon.load(out)
    shutil.copy(base_file, out / "base.safetensors")
    x = torch.randn(1, *SIZE)
    with torch.no_grad():
        assert torch.equal(surgeon.load(out)(x), model(x))


def test_cli_apply_puts_an_adapter_on_a_model(finetuned, tmp_path):
    root, base_file, model = finetuned
    ad = surgeon.save(model, tmp_path / "ad", adapter=True, include=["head"])
    result = run("apply", ad, "resnet18", "--weights", base_file, "--out", tmp_path / "applied")
    assert result.exit_code == 0, result.output
    assert "% of the full model" in result.output and "layer4.1.cbam" in result.output
    x = torch.randn(1, *SIZE)
    with torch.no_grad():
        assert torch.equal(surgeon.load(tmp_path / "applied")(x), model(x))
    result = run("apply", ad, "resnet34", "--out", tmp_path / "other")  # same site names, another model
    assert result.exit_code == 2 and not (tmp_path / "other").exists()
    assert "was made on a model of" in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_adapter_keys_follow_repeated_adds():
    model = surgeon.plan(resnet18(), "se", input_size=SIZE, at=["layer1.*"]).apply(verify=False)
    model = surgeon.plan(model, "attnpool").apply(verify=False)
    keys = adapter_keys(model)
    assert any(k.startswith("layer1.0.se.") for k in keys) and any("attnpool" in k for k in keys)
    assert not any(k.startswith("fc.") or k.startswith("conv1.") for k in keys)


# -- recipes -----------------------------------------------------------------------------------------
def test_two_step_recipe_replays_to_the_same_keys_and_outputs(tmp_path):
    model = surgeon.plan(resnet18(), "cbam", input_size=SIZE, at=["layer1.*"]).apply(verify=False)
    model = surgeon.plan(model, "eca", kind="stage").apply(verify=False)
    scramble(model)
    out = surgeon.save(model, tmp_path / "two")
    edits = json.loads((out / "recipe.json").read_text())["edits"]
    assert [e["step"] for e in edits] == [1, 1, 2, 2, 2]
    loaded = surgeon.load(out)
    assert list(loaded.state_dict()) == list(model.state_dict())
    x = torch.randn(1, *SIZE)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


def test_cli_add_recipe_replays_a_hand_written_plan(tmp_path):
    recipe = {"format": "surgeon.recipe", "version": 1, "model": {"ref": "resnet18"}, "input_size": list(SIZE),
              "edits": [{"site": "layer2.0", "attention": "se", "options": {"rd_ratio": 0.25}},
                        {"site": "layer3.1", "attention": "se", "options": {"rd_ratio": 0.25}}]}
    (tmp_path / "plan.json").write_text(json.dumps(recipe))
    result = run("add", "--recipe", tmp_path / "plan.json", "--out", tmp_path / "o")
    assert result.exit_code == 0, result.output
    assert "Replayed 2 edits" in result.output
    saved = surgeon.summary(tmp_path / "o")
    assert [(e["site"], e["module"], e["options"]) for e in saved["edits"]] == [
        ("layer2.0", "layer2.0.se", {"rd_ratio": 0.25}), ("layer3.1", "layer3.1.se", {"rd_ratio": 0.25})]
    # with MODEL given, the recipe goes onto that model (here: a factory the user typed, no trust needed)
    again = run("add", "--recipe", tmp_path / "o", "resnet18", "--dry-run")
    assert again.exit_code == 0 and "layer3.1.se" in again.output


def test_cli_add_without_recipe_still_needs_both_arguments():
    result = run("add", "cbam")
    assert result.exit_code == 2 and "Missing argument 'MODEL'" in result.output
    result = run("add", "--recipe", "r.json", "cbam", "resnet18")
    assert result.exit_code == 2 and "at most one argument" in result.output


def test_recipe_sites_must_exist_in_the_model(tmp_path):
    recipe = {"format": "surgeon.recipe", "version": 1, "model": {"ref": "resnet18"}, "input_size": list(SIZE),
              "edits": [{"site": "layer9.0", "kind": "residual", "attention": "se"}]}
    with pytest.raises(NoSitesError, match="layer9.0"):
        surgeon.replay(recipe)


def test_factory_recipe_needs_trust_and_stays_in_its_folder(tmp_path):
    assert _serving("rnn"), "no attention serving kind 'rnn' is registered (a built-in plugin is missing)"
    base = models.load(LSTM_REF)
    out = surgeon.save(surgeon.plan(base, _serving("rnn")[0].name, kind="rnn").apply(verify=False), tmp_path / "lstm")
    with pytest.raises(RecipeError, match=r"user factory 'ckpt_models:lstm_classifier'.*--trust-code"):
        surgeon.load(out)
    assert isinstance(surgeon.load(out, trust_code=True), torch.nn.Module)
    recipe = json.loads((out / "recipe.json").read_text())
    recipe["model"]["ref"] = "../evil.py:build"
    (out / "recipe.json").write_text(json.dumps(recipe))
    with pytest.raises(RecipeError, match="leads outside the recipe's folder"):
        surgeon.load(out, trust_code=True)


@pytest.mark.parametrize("change, message", [
    ({"extra": 1}, "unknown field 'extra'"),
    ({"edits": "layer1"}, "field 'edits' must be a list"),
    ({"edits": [{"attention": "se"}]}, "field 'edits\\[0\\].site' is missing"),
    ({"edits": [{"site": "a", "attention": "se", "init": "zeros"}]}, "init must be 'identity' or 'paper'"),
    ({"edits": [{"site": "a", "attention": "se", "params": True}]}, "must be an integer"),
    ({"model": {"ref": "resnet18", "pretrained": "yes"}}, "'model.pretrained' must be true/false"),
    ({"input_size": [3, -1, 2]}, "input_size \\[3, -1, 2\\] must be positive integers"),
    ({"version": 2}, "this surgeon reads versions up to 1"),
    ({"version": "1"}, "unreadable version '1'"),
    ({"format": "other"}, "is not a surgeon recipe"),
    ({"model": {"ref": "resnet18", "args": {"checkpoint_path": "/tmp/x.pth"}}}, "reads files from outside"),
    ({"weights": {"file": "/etc/passwd", "adapter": False}}, None),
])
def test_schema_rejects_bad_recipes(change, message):
    recipe = {"format": "surgeon.recipe", "version": 1, "model": {"ref": "resnet18"}, "edits": [], **change}
    if message is None:  # valid against the schema; the path is refused when it is used
        validate(recipe)
        from surgeon.recipe import inside

        with pytest.raises(RecipeError, match="relative to the recipe's folder"):
            inside(Path("."), "/etc/passwd", what="weights file")
        return
    with pytest.raises(RecipeError, match=message):
        validate(recipe)


# -- weights from outside ----------------------------------------------------------------------------
def test_a_patched_checkpoint_loads_into_the_patched_model(tmp_path):
    model = scramble(surgeon.plan(resnet18(), "eca", input_size=SIZE).apply(verify=False))
    out = surgeon.save(model, tmp_path / "eca")
    scramble(model, seed=5)  # fine-tuned further, then saved by the user's own training loop
    torch.save({"epoch": 3, "state_dict": {f"module.{k}": v for k, v in model.state_dict().items()}},
               tmp_path / "ckpt.pth")
    loaded = surgeon.load(out, weights=tmp_path / "ckpt.pth")
    x = torch.randn(1, *SIZE)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    with pytest.raises(WeightsError, match="missing"):
        torch.save(resnet18().state_dict(), tmp_path / "base.pth")
        surgeon.load(out, weights=tmp_path / "base.pth")


def test_a_fine_tuned_base_checkpoint_loads_before_surgery(tmp_path):
    import torchvision

    tv = torchvision.models.resnet18()
    torch.save({"model": tv.state_dict(), "optimizer": {}}, tmp_path / "tv.pth")  # torchvision's references
    base = models.load("tv:resnet18", weights=tmp_path / "tv.pth")
    patched = surgeon.plan(base, "se", input_size=SIZE).apply(verify=False)
    assert torch.equal(patched.state_dict()["conv1.weight"], tv.conv1.weight)
    # timm's train.py: state_dict (+ EMA) with its argparse.Namespace args, read with weights_only=True
    timm_model = resnet18()
    torch.save({"epoch": 9, "arch": "resnet18", "state_dict": timm_model.state_dict(),
                "args": argparse.Namespace(lr=0.1, model="resnet18")}, tmp_path / "timm.pth.tar")
    again = models.load("resnet18", weights=tmp_path / "timm.pth.tar")
    assert torch.equal(again.conv1.weight, timm_model.conv1.weight)


# -- bad input from the command line: one line, exit 2, nothing written --------------------------------
@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad")
    model = surgeon.plan(resnet18(), "se", input_size=SIZE, at=["layer1.*"]).apply(verify=False)
    return surgeon.save(model, root / "good")


def _copy(saved, tmp_path):
    return Path(shutil.copytree(saved, tmp_path / "d"))


def _edit_recipe(d, fn):
    recipe = json.loads((d / "recipe.json").read_text())
    fn(recipe)
    (d / "recipe.json").write_text(json.dumps(recipe))


def _corrupt_weights(d, _):
    data = (d / "model.safetensors").read_bytes()
    (d / "model.safetensors").write_bytes(data[:1000] + b"\0garbage" + data[2000:4000])


def _truncate_recipe(d, _):
    text = (d / "recipe.json").read_text()
    (d / "recipe.json").write_text(text[: len(text) // 2])


def _unknown_attention(d, _):
    _edit_recipe(d, lambda r: r["edits"][0].update(attention="cbma"))


def _future_version(d, _):
    _edit_recipe(d, lambda r: r.update(version=7))


def _garbled_version(d, _):
    _edit_recipe(d, lambda r: r.update(version="v1"))


def _other_model_weights(d, _):
    other = surgeon.plan(resnet18(), "se", input_size=SIZE, at=["layer2.*"]).apply(verify=False)
    save_file({k: v.contiguous() for k, v in other.state_dict().items()}, str(d / "model.safetensors"))


def _factory_recipe(d, _):
    _edit_recipe(d, lambda r: r["model"].update(ref="ckpt_models:lstm_classifier"))


def _escaping_weights(d, _):
    _edit_recipe(d, lambda r: r["weights"].update(file="../../model.safetensors"))


BAD = [
    (_corrupt_weights, "Cannot read safetensors file"),
    (_truncate_recipe, "is not valid JSON (truncated?)"),
    (_unknown_attention, "Unknown attention 'cbma'"),
    (_future_version, "has version 7; this surgeon reads versions up to 1"),
    (_garbled_version, "unreadable version 'v1'"),
    (_other_model_weights, "do not fit the model"),
    (_factory_recipe, "--trust-code"),
    (_escaping_weights, "leads outside the recipe's folder"),
]


# `add --recipe` replays the recipe and reads no weights: the damaged weights concern apply and export only
BAD_CASES = [pytest.param(damage, message, command, id=f"{command}-{damage.__name__.strip('_')}")
             for command in ("apply", "export", "add") for damage, message in BAD
             if not (command == "add" and damage in (_corrupt_weights, _other_model_weights))]


@pytest.mark.parametrize("damage, message, command", BAD_CASES)
def test_bad_folders_fail_in_one_line(saved, tmp_path, damage, message, command):
    d = _copy(saved, tmp_path)
    damage(d, tmp_path)
    out = tmp_path / "out"
    args = {"apply": ["apply", d, "resnet18", "--out", out],
            "export": ["export", d, "--format", "exported", "--out", out / "m.pt2"],
            "add": ["add", "--recipe", d / "recipe.json", "--out", out]}[command]
    if command == "apply" and damage is _factory_recipe:
        message = None  # apply builds the base from MODEL: the recipe's factory is never imported
    result = run(*args)
    if message is None:
        assert result.exit_code == 0, result.output
        return
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: ") and message in lines[0], result.stderr
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folder left


class TrainerState:
    """Any class of the user's: unpickling it means importing and running the user's code."""

    def __init__(self, lr):
        self.lr = lr


def test_pickle_needing_full_unpickling_is_refused(tmp_path):
    sd = resnet18().state_dict()
    torch.save({"state_dict": sd, "trainer": TrainerState(lr=0.1)}, tmp_path / "trainer.pth")
    out = tmp_path / "o"
    result = run("add", "se", "resnet18", "--weights", tmp_path / "trainer.pth", "--out", out)
    assert result.exit_code == 2 and not out.exists()
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "needs full unpickling" in lines[0] and "--allow-pickle" in lines[0]


def test_weights_for_another_model_via_model_weights(tmp_path):
    torch.manual_seed(0)
    save_file({k: v.contiguous() for k, v in models.load("resnet34").state_dict().items()},
              str(tmp_path / "r34.safetensors"))
    out = tmp_path / "o"
    result = run("add", "se", "resnet18", "--weights", tmp_path / "r34.safetensors", "--out", out)
    assert result.exit_code == 2 and not out.exists()
    assert len(result.stderr.strip().splitlines()) == 1 and "do not fit" in result.stderr


# -- show, help --------------------------------------------------------------------------------------
def test_show_prints_base_edits_and_sizes(saved):
    result = run("show", saved)
    assert result.exit_code == 0
    assert "resnet18: 2 edits, input 3×64×64" in result.output and "layer1.1.se" in result.output
    assert "model.safetensors (full model)" in result.output
    data = json.loads(run("show", saved, "--json").output)
    assert data["params_added"] == sum(e["params"] for e in data["edits"]) and data["weights"]["file_bytes"] > 0


@pytest.mark.parametrize("cmd", ["apply", "export", "show", "add"])
def test_help(cmd):
    result = run(cmd, "--help")
    assert result.exit_code == 0 and "Usage: " in result.output
    if cmd == "add":
        assert "--recipe" in result.output and "--trust-code" in result.output


def test_a_file_factory_base_loads_from_any_folder_after_saving(tmp_path, monkeypatch):
    """`path/to/file.py:factory`: the file is copied into the save, so it loads (and exports) from
    another working directory, after the original is deleted."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "nets.py").write_text((HERE / "toy_models.py").read_text())
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "saved"
    result = run("add", "se", "src/nets.py:tiny_resnet", "--input-size", "3,32,32", "--out", "saved")
    assert result.exit_code == 0, result.output
    expected = surgeon.load(out, trust_code=True)
    from surgeon.checkpoint import recipe_of  # a recipe dict from Python names the file by its absolute path

    in_memory = recipe_of(surgeon.add("src/nets.py:tiny_resnet", "se", input_size=(3, 32, 32)))
    assert in_memory["model"]["ref"] == f"{src / 'nets.py'}:tiny_resnet"
    assert len(edits_of(surgeon.replay(in_memory, trust_code=True))) == 6
    (src / "nets.py").unlink()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert json.loads((out / "recipe.json").read_text())["model"]["ref"] == "nets.py:tiny_resnet"
    with pytest.raises(RecipeError, match="--trust-code"):
        surgeon.load(out)
    model = surgeon.load(out, trust_code=True)
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(model(x), expected(x))
    again = surgeon.save(model, tmp_path / "again")  # a model loaded from a save saves again
    assert (again / "nets.py").is_file() and torch.equal(surgeon.load(again, trust_code=True)(x), expected(x))
    result = run("export", out, "--format", "torchscript", "--trust-code", "--out", tmp_path / "m.pt")
    assert result.exit_code == 0, result.output


@pytest.mark.parametrize("text, message", [
    ("[" * 100_000 + "]" * 100_000, "nested too deeply"),
    ('{"format": "surgeon.recipe", "version": 1, "edits": [], "input_size": [NaN]}', "NaN is not a JSON value"),
    ('{"format": "surgeon.recipe", "version": 1, "edits": [], "edits": 3}', "field 'edits' appears twice"),
    ('{"format": "surgeon.recipe", "version": 1' + "0" * 5000 + ', "edits": []}', "not valid JSON"),
    ('{"format": "surgeon.recipe", "version": 1, "edits": [{"site": "a\\u0000", "attention": "se"}]}',
     "holds a NUL character"),
    ('{"format": "surgeon.recipe", "version": 1, "edits": [], "input_size": [3, 1000000, 1000000]}',
     "3,000,000,000,000 values per sample"),
    ('{"format": "surgeon.recipe", "version": 1, "edits": [], "versions": {"torch": [2]}}', "version strings"),
], ids=["nested", "nan", "duplicate-field", "huge-integer", "nul", "huge-input-size", "versions-not-strings"])
def test_malformed_recipe_files_fail_in_one_line(tmp_path, text, message):
    (tmp_path / "recipe.json").write_text(text)
    with pytest.raises(RecipeError, match=message):
        surgeon.summary(tmp_path)
    result = run("show", tmp_path)
    assert result.exit_code == 2 and len(result.stderr.splitlines()) == 1
    assert message in result.stderr.replace("\\\\", "")


def test_a_pruned_model_is_not_saved_until_its_pruning_is_made_permanent(tmp_path):
    # torch.nn.utils.prune's weight_orig and weight_mask do not fit the model a recipe rebuilds: the save
    # would be written and then not load; it is refused with nothing written, and saves once pruning is removed
    import timm
    import torch.nn.utils.prune as prune

    torch.manual_seed(0)
    model = timm.create_model("resnet18").eval()
    prune.l1_unstructured(model.layer1[0].conv1, "weight", amount=0.5)
    prune.l1_unstructured(model.layer1[0].conv1, "weight", amount=0.2)  # twice: a container of methods
    patched = surgeon.add(model, "se", input_size=(3, 32, 32))
    with pytest.raises(OptionError, match=r"layer1\.0\.conv1 is pruned .*prune\.remove\(module, 'weight'\)"):
        surgeon.save(patched, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    prune.remove(patched.layer1[0].conv1, "weight")
    surgeon.save(patched, tmp_path / "out")
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(surgeon.load(tmp_path / "out").eval()(x), patched.eval()(x))
