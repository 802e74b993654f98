"""Fine-tuning: freeze policies, BatchNorm statistics, parameter groups, schedule, resume, metrics and
plot, heads and class counts, data folders, and the `finetune` / `evaluate` commands' errors.

Tiny models (tests/toy_models.py) on a few digits at 16×16, one thread: every run takes a fraction
of a second.
"""
from __future__ import annotations

import json
import math

import pytest
import torch
from click.testing import CliRunner
from torch.utils.data import Dataset

import surgeon
from surgeon import models, training
from surgeon.cli import cli
from surgeon.data import Digits, digits, image_folder
from surgeon.errors import DataError, ModelError, OptionError
from surgeon.surgery.rewrite import edits_of

SIZE = (3, 16, 16)
REF = "toy_models:TinyResNet"
runner = CliRunner()


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: one thread is faster and never fights the other tests
    yield
    torch.set_num_threads(before)


def patched(attention: str = "se", *, num_classes: int = 10, seed: int = 0):
    torch.manual_seed(seed)
    model = models.load(REF, model_args={"num_classes": num_classes})
    return surgeon.add(model, attention, input_size=SIZE)


@pytest.fixture(scope="module")
def data():
    return digits("train", input_size=SIZE, limit=64), digits("test", input_size=SIZE, limit=32)


def snapshot(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def changed(before, model) -> set[str]:
    after = model.state_dict()
    return {k for k in before if not torch.equal(before[k], after[k])}


def is_bn_stat(key: str) -> bool:
    return key.rsplit(".", 1)[-1] in ("running_mean", "running_var", "num_batches_tracked")


# -- freeze policies and BatchNorm -------------------------------------------------------------------
def test_freeze_base_trains_only_the_inserted_modules_and_the_head(data):
    model = patched()
    new = [e["module"] for e in edits_of(model)]
    before = snapshot(model)
    surgeon.finetune(model, data[0], epochs=1, lr=1e-2, freeze="base", batch_size=32, progress=False)
    moved = changed(before, model)
    trainable = {k for k in before if training._under(k, new + ["fc"])}
    assert moved - trainable == set(), "frozen parameters or BatchNorm statistics changed"
    assert {"fc.weight", "fc.bias"} <= moved
    gates = {k for k in trainable if k.endswith(".gamma")}
    assert gates and gates <= moved, "every identity gate must have moved"


def test_freeze_none_trains_the_base_too(data):
    model = patched()
    before = snapshot(model)
    surgeon.finetune(model, data[0], epochs=1, lr=1e-2, freeze="none", batch_size=32, progress=False)
    moved = changed(before, model)
    assert "stem.0.weight" in moved and "stage3.1.conv2.weight" in moved
    assert "stem.1.running_mean" in moved  # BatchNorms in training mode update their statistics


class Interrupting(Dataset):
    """A dataset that raises KeyboardInterrupt after `after` images: a run killed part-way."""

    def __init__(self, inner, after: int):
        self.inner, self.after, self.seen = inner, after, 0
        self.classes = inner.classes

    def __len__(self):
        return len(self.inner)

    def __getitem__(self, i):
        self.seen += 1
        if self.seen > self.after:
            raise KeyboardInterrupt
        return self.inner[i]


def test_two_phase_trains_new_modules_first_then_everything(data, tmp_path):
    model = patched()
    before = snapshot(model)
    new = [e["module"] for e in edits_of(model)] + ["fc"]
    # stop at the first image of epoch 2: the model is as phase one left it
    with pytest.raises(KeyboardInterrupt):
        surgeon.finetune(model, Interrupting(data[0], 64), epochs=2, lr=1e-2, freeze="two-phase",
                         batch_size=32, progress=False, out=tmp_path / "run")
    assert all(training._under(k, new) for k in changed(before, model))
    history = training.read_metrics(tmp_path / "run")
    assert len(history) == 1
    result = surgeon.finetune(model, data[0], epochs=2, lr=1e-2, freeze="two-phase", batch_size=32,
                              progress=False, out=tmp_path / "run", resume=True)
    total = sum(p.numel() for p in model.parameters())
    assert result.history[0]["trainable"] < total and result.history[1]["trainable"] == total
    assert "stem.0.weight" in changed(before, model)


@pytest.mark.parametrize("freeze, bn_stats, stats_move", [
    ("base", "auto", False),     # frozen BatchNorms keep their statistics
    ("base", "train", True),     # unless asked to update them
    ("none", "frozen", False),   # or asked to keep them while everything trains
])
def test_batchnorm_statistics(data, freeze, bn_stats, stats_move):
    model = patched()
    before = snapshot(model)
    surgeon.finetune(model, data[0], epochs=1, lr=1e-2, freeze=freeze, bn_stats=bn_stats, batch_size=32,
                     progress=False)
    stats = {k for k in changed(before, model) if is_bn_stat(k) and k.startswith("stage")}
    assert bool(stats) is stats_move
    if freeze == "none":
        assert "stem.1.weight" in changed(before, model)  # their affine parameters still train


def test_frozen_parameters_get_no_weight_decay_with_sgd(data):
    model = patched()
    before = snapshot(model)
    surgeon.finetune(model, data[0], epochs=1, lr=1e-2, freeze="base", optimizer="sgd", weight_decay=0.1,
                     batch_size=32, progress=False)
    assert "stem.0.weight" not in changed(before, model)
    assert "fc.weight" in changed(before, model)


# -- parameter groups and schedule -------------------------------------------------------------------
def test_parameter_groups_new_lr_and_no_decay_on_norms_biases_gates():
    model = patched("cbam")
    new = [e["module"] for e in edits_of(model)]
    groups = training.param_groups(model, lr=1e-3, weight_decay=0.05, new_lr_mult=10, new=new)
    names = {id(p): n for n, p in model.named_parameters()}
    by_name = {names[id(p)]: g for g in groups for p in g["params"]}
    assert len(by_name) == len(names)  # every parameter, once
    assert by_name["fc.weight"]["weight_decay"] == 0.05 and by_name["fc.weight"]["lr"] == 1e-3
    assert by_name["fc.bias"]["weight_decay"] == 0.0
    assert by_name["stem.1.weight"]["weight_decay"] == 0.0  # a norm
    gate = next(n for n in by_name if n.endswith(".gamma"))
    assert by_name[gate]["weight_decay"] == 0.0 and by_name[gate]["lr"] == pytest.approx(1e-2)
    conv = next(n for n in by_name if training._under(n, new) and n.endswith("weight") and "gamma" not in n
                and model.get_parameter(n).ndim > 1)
    assert by_name[conv]["lr"] == pytest.approx(1e-2) and by_name[conv]["weight_decay"] == 0.05


def test_lr_factor_warms_up_then_follows_a_cosine():
    assert training.lr_factor(0, 100, warmup=10) == pytest.approx(0.1)
    assert training.lr_factor(9, 100, warmup=10) == pytest.approx(1.0)
    assert training.lr_factor(10, 100, warmup=10) == pytest.approx(1.0)
    assert training.lr_factor(55, 100, warmup=10) == pytest.approx(0.5)
    assert training.lr_factor(100, 100, warmup=10, min_ratio=0.1) == pytest.approx(0.1)
    values = [training.lr_factor(s, 50) for s in range(50)]
    assert all(a >= b for a, b in zip(values, values[1:]))


# -- resume, metrics, plot, checkpoint ---------------------------------------------------------------
def _timeless(history):
    return [{k: v for k, v in r.items() if k not in training._TIMING_KEYS} for r in history]


def test_resume_after_an_interruption_repeats_the_uninterrupted_run(data, tmp_path):
    settings = dict(epochs=3, lr=3e-3, freeze="two-phase", unfreeze_after=1, batch_size=16, warmup_epochs=0.5,
                    clip_grad=1.0, new_lr_mult=5.0, seed=3, progress=False)
    whole = surgeon.finetune(patched(), data[0], data[1], out=tmp_path / "whole", **settings)

    with pytest.raises(KeyboardInterrupt):  # killed in the middle of epoch 3
        surgeon.finetune(patched(), Interrupting(data[0], 64 * 2 + 20), data[1], out=tmp_path / "cut", **settings)
    assert len(training.read_metrics(tmp_path / "cut")) == 2
    again = surgeon.finetune(patched(seed=7), data[0], data[1], out=tmp_path / "cut", resume=True, **settings)

    assert _timeless(again.history) == _timeless(whole.history)
    assert _timeless(training.read_metrics(tmp_path / "cut")) == _timeless(whole.history)
    a, b = whole.model.state_dict(), again.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_resume_refuses_other_settings_and_a_finished_run_returns_at_once(data, tmp_path):
    out = tmp_path / "run"
    surgeon.finetune(patched(), data[0], epochs=1, lr=1e-3, batch_size=32, out=out, progress=False)
    with pytest.raises(OptionError, match="with other settings.*lr"):
        surgeon.finetune(patched(), data[0], epochs=1, lr=2e-3, batch_size=32, out=out, resume=True, progress=False)
    done = surgeon.finetune(patched(), data[0], epochs=1, lr=1e-3, batch_size=32, out=out, resume=True,
                            progress=False)
    assert len(done.history) == 1


def test_run_folder_holds_metrics_plot_and_a_loadable_checkpoint(data, tmp_path):
    out = tmp_path / "run"
    result = surgeon.finetune(patched("cbam"), data[0], data[1], epochs=2, lr=1e-3, batch_size=32, out=out,
                              progress=False)
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 2
    first = json.loads(lines[0])
    for key in ("epoch", "lr", "trainable", "train_loss", "train_acc", "val_loss", "val_acc", "throughput"):
        assert key in first
    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())  # no temporary folders left
    loaded = surgeon.load(out, trust_code=True)
    x = data[1][0][0][None]
    assert torch.equal(loaded(x), result.model(x))
    assert surgeon.evaluate(loaded, data[1])["accuracy"] == pytest.approx(result.last["val_acc"])


def test_plain_models_fine_tune_too(data):
    torch.manual_seed(0)
    model = models.load(REF)
    result = surgeon.finetune(model, data[0], data[1], epochs=1, lr=1e-3, freeze="base", batch_size=32,
                              progress=False)
    assert result.head == "fc" and result.history[0]["trainable"] == model.fc.weight.numel() + 10


def test_data_by_name_uses_the_model_input_size():
    model = patched()  # its record says 3×16×16
    result = surgeon.finetune(model, "digits", epochs=1, lr=1e-3, batch_size=256, freeze="base", progress=False)
    assert result.last["step"] == 1438 // 256 and "val_acc" in result.last


def test_any_dataloader_works(data):
    loader = torch.utils.data.DataLoader(data[0], batch_size=16, shuffle=True)
    result = surgeon.finetune(patched(), loader, data[1], epochs=1, lr=1e-3, progress=False)
    assert result.history[0]["step"] == len(loader)
    assert 0 <= surgeon.evaluate(result.model, torch.utils.data.DataLoader(data[1], batch_size=8))["accuracy"] <= 1


def test_mixed_precision_on_cpu_trains(data):
    result = surgeon.finetune(patched(), data[0], data[1], epochs=1, lr=1e-3, amp=True, batch_size=32,
                              progress=False)
    assert math.isfinite(result.last["train_loss"]) and result.model.fc.weight.dtype == torch.float32


@pytest.mark.slow
def test_compiled_training_matches_eager_closely(data):
    eager = surgeon.finetune(patched(), data[0], data[1], epochs=1, lr=1e-3, batch_size=32, progress=False)
    compiled = surgeon.finetune(patched(), data[0], data[1], epochs=1, lr=1e-3, batch_size=32, progress=False,
                                compile=True)
    assert compiled.last["train_loss"] == pytest.approx(eager.last["train_loss"], rel=1e-3)


def test_a_crash_between_renames_is_recovered_on_resume(data, tmp_path):
    out = tmp_path / "run"
    surgeon.finetune(patched(), data[0], epochs=2, lr=1e-3, batch_size=32, out=out, progress=False)
    out.rename(tmp_path / ".run.old")
    result = surgeon.finetune(patched(), data[0], epochs=2, lr=1e-3, batch_size=32, out=out, resume=True,
                              progress=False)
    assert len(result.history) == 2 and out.is_dir() and not (tmp_path / ".run.old").exists()


# -- heads and class counts --------------------------------------------------------------------------
def test_class_count_mismatch_offers_num_classes_and_num_classes_replaces_the_head(data, tmp_path):
    model = patched(num_classes=4)
    with pytest.raises(DataError, match=r"has 4 outputs but the data has 10 classes.*--num-classes 10"):
        surgeon.finetune(model, data[0], epochs=1, lr=1e-3, progress=False)
    result = surgeon.finetune(model, data[0], epochs=1, lr=1e-3, num_classes=10, batch_size=32, out=tmp_path / "r",
                              progress=False)
    assert model.fc.out_features == 10 and result.head == "fc"
    assert surgeon.load(tmp_path / "r", trust_code=True).fc.out_features == 10  # the recipe knows the new head
    with pytest.raises(DataError, match="num_classes=3"):
        surgeon.finetune(model, data[0], epochs=1, lr=1e-3, num_classes=3, progress=False)


def test_head_is_found_outside_inserted_modules():
    import timm

    model = timm.create_model("resnet10t", num_classes=3, channels=(8, 8, 8, 8), stem_width=8)
    assert training.find_head(model) == "fc"
    seq = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 5), torch.nn.ReLU(), torch.nn.Linear(5, 2))
    assert training.find_head(seq) == "3"
    with pytest.raises(ModelError, match="Linear head"):
        training.find_head(torch.nn.Conv2d(3, 3, 1))


def test_options_are_checked(data):
    model = patched()
    for kwargs, message in ((dict(freeze="bse"), "Did you mean 'base'"), (dict(optimizer="adam"), "adamw"),
                            (dict(epochs=0), "epochs"), (dict(unfreeze_after=1), "two-phase"),
                            (dict(device="cuda:0" if not torch.cuda.is_available() else "bogus"), "evice")):
        args = dict(epochs=2, lr=1e-3, progress=False) | kwargs
        with pytest.raises(OptionError, match=message):
            surgeon.finetune(model, data[0], **args)


# -- data --------------------------------------------------------------------------------------------
def test_digits_split_is_fixed_stratified_and_resized():
    train, test = Digits("train", config={"input_size": (3, 20, 24), "mean": (0.5,) * 3, "std": (0.5,) * 3}), \
        digits("test")
    assert len(train) + len(test) == 1797 and len(test) == 359
    assert set(train.targets.tolist()) == set(range(10)) == set(test.targets.tolist())
    x, y = train[0]
    assert x.shape == (3, 20, 24) and x.min() >= -1 and x.max() <= 1
    assert torch.equal(digits("test").targets, test.targets)


def _png(path, colour):
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (20, 20), colour).save(path)


def test_image_folder_with_train_and_val_splits(tmp_path):
    for split in ("train", "val"):
        for c, colour in (("cat", (255, 0, 0)), ("dog", (0, 0, 255))):
            for i in range(3):
                _png(tmp_path / split / c / f"{i}.png", colour)
    train, val = surgeon.data.resolve(tmp_path, input_size=SIZE)
    assert train.classes == val.classes == ["cat", "dog"] and len(train) == 6
    assert train[0][0].shape == SIZE


@pytest.mark.parametrize("layout, message", [
    ("missing", "does not exist"),
    ("empty", "has no class sub-folders"),
    ("flat", "has 2 images but no class sub-folders"),
    ("empty_class", "hold no images"),
    ("one_class", "needs at least two"),
])
def test_bad_data_folders(tmp_path, layout, message):
    with pytest.raises(DataError, match=message):
        image_folder(_bad_folder(tmp_path / "d", layout))


def _bad_folder(root, layout: str):
    """A data folder laid out wrongly: missing, empty, images with no class folders, a class without
    images, a single class."""
    if layout != "missing":
        root.mkdir()
    if layout == "flat":
        _png(root / "a.png", (0, 0, 0))
        _png(root / "b.png", (9, 9, 9))
    if layout in ("empty_class", "one_class"):
        _png(root / "a" / "x.png", (0, 0, 0))
    if layout == "empty_class":
        (root / "b").mkdir()
    return root


# -- CLI ---------------------------------------------------------------------------------------------
def run(*args):
    return runner.invoke(cli, [str(a) for a in args], catch_exceptions=False)


def one_line_error(result, message: str) -> None:
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: ") and message in lines[0], result.stderr


TRAIN = ("--epochs", 1, "--lr", 1e-3, "--batch-size", 16, "--input-size", "3,16,16", "--no-progress")


@pytest.mark.parametrize("command", ["finetune", "evaluate"])
def test_help(command):
    result = run(command, "--help")
    assert result.exit_code == 0 and "--data" in result.output


def test_cli_finetune_then_evaluate_a_saved_folder(tmp_path):
    saved = tmp_path / "se"
    assert run("add", "se", REF, "--input-size", "3,16,16", "--out", saved).exit_code == 0
    result = run("finetune", saved, "--trust-code", "--data", "digits", "--limit", 48, *TRAIN[:-3], "--no-progress",
                 "--freeze", "base", "--out", tmp_path / "ft", "--json")
    assert result.exit_code == 0, result.output
    history = json.loads(result.stdout)["history"]
    assert len(history) == 1 and (tmp_path / "ft" / "curves.png").is_file()
    result = run("evaluate", tmp_path / "ft", "--trust-code", "--data", "digits", "--limit", 48, "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["accuracy"] == pytest.approx(history[0]["val_acc"])


def test_cli_output_folder_exists_is_refused_unless_resume_or_force(tmp_path):
    out = tmp_path / "o"
    out.mkdir()
    one_line_error(run("finetune", REF, "--data", "digits", "--limit", 32, *TRAIN, "--out", out),
                   "exists; pass --resume to continue its run or --force")
    one_line_error(run("finetune", REF, "--data", "digits", "--limit", 32, *TRAIN, "--out", out, "--resume"),
                   "holds no training run to resume")
    result = run("finetune", REF, "--data", "digits", "--limit", 32, *TRAIN, "--out", out, "--force")
    assert result.exit_code == 0, result.output
    assert len(training.read_metrics(out)) == 1
    result = run("finetune", REF, "--data", "digits", "--limit", 32, *TRAIN, "--out", out, "--resume")
    assert result.exit_code == 0, result.output  # the run is complete: nothing left to train
    one_line_error(run("finetune", REF, "--data", "digits", "--limit", 32, *TRAIN[:3], 5e-3, *TRAIN[4:], "--out", out,
                       "--resume"), "with other settings (lr: 0.001 -> 0.005)")


def test_cli_class_count_mismatch_offers_num_classes(tmp_path):
    args = ("finetune", REF, "--model-arg", "num_classes=4", "--data", "digits", "--limit", 32, *TRAIN)
    one_line_error(run(*args, "--out", tmp_path / "o"), "pass num_classes=10 (--num-classes 10)")
    assert not (tmp_path / "o").exists()
    assert run(*args, "--num-classes", 10, "--out", tmp_path / "o").exit_code == 0
    one_line_error(run("evaluate", REF, "--model-arg", "num_classes=4", "--data", "digits", "--limit", 8,
                       "--input-size", "3,16,16"), "has 4 outputs but the data has 10 classes")


@pytest.mark.parametrize("layout, message", [
    ("empty", "has no class sub-folders"),
    ("flat", "images but no class sub-folders"),
    ("missing", "does not exist"),
])
def test_cli_bad_data_folders(tmp_path, layout, message):
    root = _bad_folder(tmp_path / "d", layout)
    one_line_error(run("finetune", REF, "--data", root, *TRAIN, "--out", tmp_path / "o"), message)
    one_line_error(run("evaluate", REF, "--data", root, "--input-size", "3,16,16"), message)
    assert not (tmp_path / "o").exists()


def test_cli_finetune_and_evaluate_an_image_folder(tmp_path):
    for split in ("train", "val"):
        for c, colour in (("red", (255, 0, 0)), ("blue", (0, 0, 255))):
            for i in range(4):
                _png(tmp_path / "imgs" / split / c / f"{i}.png", colour)
    args = ("--model-arg", "num_classes=2", "--data", tmp_path / "imgs")
    result = run("finetune", REF, *args, *TRAIN[:4], "--batch-size", 4, *TRAIN[6:], "--out", tmp_path / "o")
    assert result.exit_code == 0, result.output
    assert "fine-tuned on" in result.stdout and len(training.read_metrics(tmp_path / "o")) == 1
    result = run("evaluate", tmp_path / "o", "--trust-code", "--data", tmp_path / "imgs")
    assert result.exit_code == 0 and "accuracy" in result.stdout and "/8)" in result.stdout, result.output
    one_line_error(run("evaluate", tmp_path / "o", "--trust-code", "--data", tmp_path / "imgs", "--limit", 2),
                   "applies to the built-in 'digits' data only")


def test_cli_missing_model_folder(tmp_path):
    one_line_error(run("evaluate", tmp_path / "nope", "--data", "digits"), "No saved model folder")


def test_digits_and_folder_preprocessing_follow_the_model():
    import timm

    model = timm.create_model("resnet10t", num_classes=10, channels=(8, 8, 8, 8), stem_width=8)
    cfg = surgeon.data.data_config(model, input_size=(3, 40, 40))
    assert cfg["input_size"] == (3, 40, 40) and len(cfg["mean"]) == 3
    assert not math.isnan(digits("test", model=model, input_size=(3, 40, 40), limit=1)[0][0].sum().item())


# -- options (FinetuneConfig) ------------------------------------------------------------------------
@pytest.mark.parametrize("flag, value, message", [
    ("--min-lr", -1, "min_lr (--min-lr) must be a finite number in [0, 0.001], got -1.0"),
    ("--min-lr", 0.01, "min_lr (--min-lr) must be a finite number in [0, 0.001], got 0.01"),
    ("--weight-decay", -1, "weight_decay (--weight-decay) must be a finite number in [0, 1], got -1.0"),
    ("--momentum", 5, "momentum (--momentum) must be a finite number in [0, 1), got 5.0"),
    ("--warmup-epochs", "nan", "warmup_epochs (--warmup-epochs) must be a finite number in [0, 1], got nan"),
    ("--label-smoothing", 2, "label_smoothing (--label-smoothing) must be a finite number in [0, 1), got 2.0"),
    ("--seed", 2**70, f"seed (--seed) must be an integer in [0, 4294967295], got {2**70}"),
    ("--seed", -1, "seed (--seed) must be an integer in [0, 4294967295], got -1"),
    ("--lr", "inf", "lr (--lr) must be a finite number > 0, got inf"),
    ("--clip-grad", 0, "clip_grad (--clip-grad) must be a finite number > 0, got 0.0"),
    ("--new-lr-mult", -2, "new_lr_mult (--new-lr-mult) must be a finite number ≥ 0, got -2.0"),
    ("--batch-size", 0, "batch_size (--batch-size) must be an integer in [1, 1000000], got 0"),
    ("--epochs", 0, "epochs (--epochs) must be an integer in [1, 1000000], got 0"),
    ("--workers", -1, "num_workers (--workers) must be an integer in [0, 1024], got -1"),
    ("--num-classes", 1, "num_classes (--num-classes) must be an integer in [2, 10000000], got 1"),
    ("--unfreeze-after", 3, "unfreeze_after (--unfreeze-after) applies to freeze='two-phase'"),
])
def test_cli_option_out_of_range_is_one_line(tmp_path, flag, value, message):
    args = ["finetune", REF, "--data", "digits", "--limit", 16, *TRAIN, "--out", tmp_path / "o"]
    where = args.index(flag) if flag in args else len(args)
    args[where:where + 2] = [flag, value]
    one_line_error(run(*args), message)
    assert not (tmp_path / "o").exists()


def test_config_checks_options_and_misspelt_names():
    cfg = training.FinetuneConfig(epochs=4, lr=1e-3, freeze="two-phase", optimizer="sgd")
    assert cfg.unfreeze_after == 2 and cfg.weight_decay == 1e-4  # defaults that depend on other options
    with pytest.raises(OptionError, match=r"Unknown fine-tuning option 'weight_decy'. Did you mean 'weight_decay'"):
        surgeon.finetune(patched(), [], epochs=1, lr=1e-3, weight_decy=0.1)
    with pytest.raises(OptionError, match=r"Unknown freeze \(--freeze\) 'bse'. Did you mean 'base'"):
        training.FinetuneConfig(epochs=1, lr=1e-3, freeze="bse")
    with pytest.raises(OptionError, match=r"amp \(--amp\) must be true or false, got 'yes'"):
        training.FinetuneConfig(epochs=1, lr=1e-3, amp="yes")
    with pytest.raises(OptionError, match="needs epochs"):
        surgeon.finetune(patched(), [], lr=1e-3)


def test_config_overrides_and_run_record(data, tmp_path):
    base = surgeon.FinetuneConfig(epochs=1, lr=1e-3, batch_size=32)
    result = surgeon.finetune(patched(), data[0], config=base, lr=2e-3, out=tmp_path / "r", progress=False)
    state = json.loads((tmp_path / "r" / "trainer_state.json").read_text())
    assert state["config"]["lr"] == 2e-3 and state["config"]["batch_size"] == 32
    assert state["config"]["steps_per_epoch"] == 2 and result.history[0]["step"] == 2


# -- the input size a run was trained at --------------------------------------------------------------
def test_cli_run_is_evaluated_at_its_training_input_size(tmp_path):
    result = run("finetune", REF, "--data", "digits", "--limit", 48, "--epochs", 1, "--lr", 1e-3, "--batch-size", 16,
                 "--input-size", "3,32,32", "--no-progress", "--out", tmp_path / "o", "--json")
    assert result.exit_code == 0, result.output
    val_acc = json.loads(result.stdout)["history"][-1]["val_acc"]
    assert json.loads((tmp_path / "o" / "recipe.json").read_text())["input_size"] == [3, 32, 32]
    result = run("evaluate", tmp_path / "o", "--trust-code", "--data", "digits", "--limit", 48, "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["accuracy"] == pytest.approx(val_acc)


def test_a_patched_model_trained_at_another_size_loads_and_exports_at_it(tmp_path, data):
    from surgeon.api import example_inputs

    saved = tmp_path / "se"
    assert run("add", "cbam", REF, "--input-size", "3,16,16", "--out", saved).exit_code == 0
    result = run("finetune", saved, "--trust-code", "--data", "digits", "--limit", 48, "--epochs", 1, "--lr", 1e-3,
                 "--batch-size", 16, "--input-size", "3,32,32", "--no-progress", "--out", tmp_path / "o", "--json")
    assert result.exit_code == 0, result.output
    val_acc = json.loads(result.stdout)["history"][-1]["val_acc"]
    loaded = surgeon.load(tmp_path / "o", trust_code=True)  # sites found again at 32×32, shapes checked
    assert training.input_size_of(loaded) == (3, 32, 32)
    assert example_inputs(loaded)[0].shape[1:] == (3, 32, 32)
    shapes = [e["shape"][2:] for e in json.loads((tmp_path / "o" / "recipe.json").read_text())["edits"]]
    assert shapes and [16, 16] in shapes  # stage1 at 32×32 input: was 8×8 at 16×16
    accuracy = surgeon.evaluate(loaded, digits("test", model=loaded, limit=48))["accuracy"]
    assert accuracy == pytest.approx(val_acc)


# -- files in data folders that are not (readable) images -------------------------------------------
def _two_classes(root, n: int = 3):
    for c, colour in (("red", (255, 0, 0)), ("blue", (0, 0, 255))):
        for i in range(n):
            _png(root / c / f"{i}.png", colour)


def test_cli_non_image_files_are_skipped_with_a_count(tmp_path):
    root = tmp_path / "d"
    _two_classes(root)
    (root / "red" / "README.txt").write_text("about the reds")
    (root / "blue" / "notes.md").write_text("about the blues")
    (root / "blue" / ".DS_Store").write_bytes(b"\0")  # dotfiles are not worth a warning
    result = run("evaluate", REF, "--model-arg", "num_classes=2", "--data", root, "--input-size", "3,16,16")
    assert result.exit_code == 0, result.output
    assert "skipped 2 non-image file(s) ('blue/notes.md', 'red/README.txt')" in result.stderr
    assert "/6)" in result.stdout  # the six images, nothing else


def test_cli_corrupt_image_is_one_line_naming_the_file(tmp_path):
    root = tmp_path / "d"
    _two_classes(root)
    (root / "blue" / "9.png").write_bytes(b"not a png")
    bad = str(root / "blue" / "9.png")
    one_line_error(run("evaluate", REF, "--model-arg", "num_classes=2", "--data", root, "--input-size", "3,16,16"),
                   f"Cannot read image {bad!r} (UnidentifiedImageError)")
    one_line_error(run("finetune", REF, "--model-arg", "num_classes=2", "--data", root, *TRAIN, "--batch-size", 64,
                       "--out", tmp_path / "o"), f"Cannot read image {bad!r}")
