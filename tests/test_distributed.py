"""Data-parallel fine-tuning (surgeon.training.distributed): 2 real processes on CPU with gloo, compared
with one process at the same global batch and data order; rank 0 alone writes; an interrupted 2-process
run resumes; the run record; data that cannot be split; accumulation; SyncBatchNorm's limits.

The 2-process runs happen once per module (tests/ddp_worker.py, spawned) on a tiny model: a few seconds.
"""
from __future__ import annotations

import json
import socket

import pytest
import torch

import surgeon
from surgeon import models, training
from surgeon.data import digits
from surgeon.errors import DataError, OptionError, TrainingError
from surgeon.training import distributed
from test_training import one_thread  # noqa: F401 (autouse: one thread per test)

SIZE = (3, 16, 16)
REF = "toy_models:TinyResNet"
# per process: batch 8 (global 16); two-phase (a DDP per phase: the base frozen, then everything), new
# modules ×5, warm-up, clipping; BatchNorm statistics frozen, the one thing that is per process otherwise
SETTINGS = dict(epochs=2, lr=2e-3, batch_size=8, freeze="two-phase", unfreeze_after=1, bn_stats="frozen",
                new_lr_mult=5.0, warmup_epochs=0.5, clip_grad=1.0, seed=3, progress=False)
TOLERANCE = 1e-5


def patched(seed: int = 0):
    torch.manual_seed(seed)
    return surgeon.add(models.load(REF, model_args={"num_classes": 10}), "se", input_size=SIZE)


def data():
    return digits("train", input_size=SIZE, limit=64), digits("test", input_size=SIZE, limit=33)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def two(tmp_path_factory):
    """The reports and weights of the two spawned processes (see tests/ddp_worker.py)."""
    import torch.multiprocessing as mp

    import ddp_worker

    out = tmp_path_factory.mktemp("ddp")
    mp.spawn(ddp_worker.main, args=(2, _free_port(), str(out)), nprocs=2, join=True)
    reports = [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]
    weights = [torch.load(out / f"rank{r}.pt") for r in (0, 1)]
    return out, reports, weights


def _timeless(history):
    return [{k: v for k, v in r.items() if k not in training._TIMING_KEYS} for r in history]


def _max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a)


@pytest.mark.parametrize("batch_size, accum_steps", [(16, 1), (8, 2)])
def test_two_processes_compute_what_one_does_at_the_same_global_batch(two, batch_size, accum_steps):
    _, reports, weights = two
    train, val = data()
    one = surgeon.finetune(patched(), train, val, **(SETTINGS | dict(batch_size=batch_size, accum_steps=accum_steps)))
    draw = torch.rand(1).item()
    # each process draws its own random numbers (dropout, augmentation); rank 0 those of one process
    assert reports[0]["draw"] == draw != reports[1]["draw"]
    assert [r["step"] for r in one.history] == [r["step"] for r in reports[0]["whole"]] == [4, 8]
    ddp = weights[0]["whole"]
    assert _max_diff(ddp, one.model.state_dict()) <= TOLERANCE
    assert _max_diff(ddp, patched().state_dict()) > 1e-3  # it trained: the comparison is not trivially true
    for mine, theirs in zip(reports[0]["whole"], one.history):  # metrics summed over both processes
        assert mine["val_acc"] == theirs["val_acc"] and mine["trainable"] == theirs["trainable"]
        for key in ("train_loss", "train_acc", "val_loss", "lr"):
            assert mine[key] == pytest.approx(theirs[key], abs=TOLERANCE)


def test_processes_end_with_the_same_weights_and_metrics(two):
    _, reports, weights = two
    assert _max_diff(weights[0]["whole"], weights[1]["whole"]) == 0
    assert _timeless(reports[0]["whole"]) == _timeless(reports[1]["whole"])


def test_only_rank_0_writes_the_run_folder(two):
    out, reports, _ = two
    assert reports[1]["writes"] == []
    assert [w.rsplit("/", 1)[-1] for w in reports[0]["writes"]] == ["whole", "whole", "cut", "cut"]
    assert len(training.read_metrics(out / "whole")) == 2 and (out / "whole" / "curves.png").is_file()


def test_run_record_has_world_size_global_batch_and_backend(two):
    out, _, _ = two
    config = json.loads((out / "whole" / "trainer_state.json").read_text())["config"]
    assert (config["world_size"], config["global_batch"], config["backend"]) == (2, 16, "gloo")
    assert config["batch_size"] == 8 and config["accum_steps"] == 1 and config["steps_per_epoch"] == 4


def test_an_interrupted_two_process_run_resumes_to_the_uninterrupted_one(two):
    out, reports, weights = two
    assert [r["cut_epochs"] for r in reports] == [1, 1]
    for r in (0, 1):
        assert _timeless(reports[r]["again"]) == _timeless(reports[0]["whole"])
        assert _max_diff(weights[r]["again"], weights[0]["whole"]) == 0
    assert _timeless(training.read_metrics(out / "cut")) == _timeless(reports[0]["whole"])
    loaded = surgeon.load(out / "cut", trust_code=True)
    assert _max_diff(loaded.state_dict(), weights[0]["whole"]) == 0


def test_fewer_samples_than_processes_is_one_line(two):
    _, reports, _ = two
    for r in reports:
        assert r["error"] == ("DataError: The training data has 1 samples, fewer than the 2 processes; use fewer "
                              "processes (--nproc) or more data")


def test_a_trainable_parameter_the_forward_does_not_use_trains_nothing_and_breaks_nothing(two):
    _, reports, _ = two
    for r in reports:
        assert r["spare"] == [True, True]  # the unused parameter stayed, the others trained


# -- one process: the same options, checked --------------------------------------------------------
def test_a_two_process_run_resumes_on_one_process_at_the_same_global_batch(two, tmp_path):
    out, _, _ = two
    import shutil

    run = tmp_path / "run"
    shutil.copytree(out / "whole", run)
    state = json.loads((run / "trainer_state.json").read_text())
    state["epoch"], state["step"] = 1, 4  # as if it had stopped after epoch 1
    (run / "trainer_state.json").write_text(json.dumps(state))
    train, val = data()
    with pytest.raises(OptionError, match="global_batch: 16 -> 8"):
        surgeon.finetune(patched(), train, val, out=run, resume=True, **SETTINGS)
    result = surgeon.finetune(patched(), train, val, out=run, resume=True, **(SETTINGS | dict(accum_steps=2)))
    assert [r["epoch"] for r in result.history] == [1, 2]
    assert json.loads((run / "trainer_state.json").read_text())["config"]["world_size"] == 1


def test_accumulation_needs_enough_batches():
    train, _ = data()
    with pytest.raises(DataError, match=r"gives 4 batch\(es\) of 16 per process and epoch, fewer than accum_steps=5"):
        surgeon.finetune(patched(), train, epochs=1, lr=1e-3, batch_size=16, accum_steps=5, progress=False)
    with pytest.raises(OptionError, match=r"accum_steps \(--accum-steps\) must be an integer in \[1, 1000000\]"):
        training.FinetuneConfig(epochs=1, lr=1e-3, accum_steps=0)


def test_one_process_run_records_no_backend(tmp_path):
    train, _ = data()
    surgeon.finetune(patched(), train, epochs=1, lr=1e-3, batch_size=16, accum_steps=2, out=tmp_path / "r",
                     progress=False)
    config = json.loads((tmp_path / "r" / "trainer_state.json").read_text())["config"]
    assert (config["world_size"], config["global_batch"], config["backend"], config["steps_per_epoch"]) == \
        (1, 32, None, 2)


def test_sync_bn_needs_cuda_with_several_processes():
    two_cpus = distributed.World(rank=0, size=2, backend="gloo")
    with pytest.raises(OptionError, match=r"sync_bn \(--sync-bn\) needs CUDA devices"):
        distributed.check_sync_bn(two_cpus, torch.device("cpu"))
    distributed.check_sync_bn(distributed.World(), torch.device("cpu"))  # one process: nothing to do


def test_sync_batchnorm_swaps_in_and_back_sharing_parameters():
    model = patched()
    bn = model.stem[1]
    plain = distributed.sync_batchnorm(model, distributed.World(rank=0, size=2, backend="gloo"))
    assert len(plain) == sum(isinstance(m, torch.nn.BatchNorm2d) for m in patched().modules())
    assert isinstance(model.stem[1], torch.nn.SyncBatchNorm) and model.stem[1].weight is bn.weight
    assert model.stem[1].running_mean is bn.running_mean
    with distributed.swapped(model, plain):
        assert model.stem[1] is bn
    assert isinstance(model.stem[1], torch.nn.SyncBatchNorm)
    distributed.swap(model, plain)
    assert not any(isinstance(m, torch.nn.SyncBatchNorm) for m in model.modules())


def test_unreached_names_trainable_parameters_the_forward_skips_and_leaves_no_trace():
    model = patched()
    model.spare = torch.nn.Linear(3, 3)  # never called
    model.stem[0].weight.requires_grad_(False)
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(4, *SIZE)
    state = torch.random.get_rng_state()
    assert distributed.unreached(model, x) == ["spare.weight", "spare.bias"]
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # BatchNorm statistics kept
    assert torch.equal(torch.random.get_rng_state(), state)


def test_ddp_refuses_a_phase_where_nothing_trains():
    model = patched()
    for p in model.parameters():
        p.requires_grad_(False)
    with pytest.raises(TrainingError, match="No parameter trains"):
        distributed.wrap(model, distributed.World(rank=0, size=2, backend="gloo"), torch.device("cpu"), None)


# -- the command ------------------------------------------------------------------------------------
CLI = ("finetune", REF, "--data", "digits", "--epochs", 1, "--lr", 1e-3, "--batch-size", 8, "--input-size", "3,16,16",
       "--no-progress")


def run(*args):
    from click.testing import CliRunner

    from surgeon.cli import cli

    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


def test_cli_nproc_2_trains_in_two_processes(tmp_path, monkeypatch):
    import os
    from pathlib import Path

    tests = str(Path(__file__).parent)  # the processes import toy_models as this one does
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([tests, *filter(None, [os.environ.get("PYTHONPATH")])]))
    out = tmp_path / "o"
    result = run(*CLI, "--limit", 40, "--nproc=2", "--accum-steps", 2, "--out", out)
    assert result.exit_code == 0, result.output
    config = json.loads((out / "trainer_state.json").read_text())["config"]
    assert (config["world_size"], config["global_batch"], config["backend"]) == (2, 32, "gloo")
    history = training.read_metrics(out)
    assert len(history) == 1 and history[0]["step"] == 1  # 40 images: 20 per process, 2 batches of 8 per step
    assert surgeon.load(out, trust_code=True).fc.out_features == 10


@pytest.mark.parametrize("extra, env, message", [
    (("--sync-bn",), {}, "sync_bn (--sync-bn) needs CUDA devices"),
    (("--nproc", 40), {}, "The training data has 16 samples, fewer than the 40 processes"),
    (("--device", "mps"), {}, "Device 'mps' cannot train in 2 processes"),
    ((), {"WORLD_SIZE": "2"}, "already runs under torchrun (WORLD_SIZE=2); drop --nproc"),
])
def test_cli_nproc_refuses_before_starting_processes(tmp_path, monkeypatch, extra, env, message):
    from surgeon.training import optim

    monkeypatch.setattr(optim, "resolve_device", lambda d: torch.device(str(d)))  # mps without an Apple GPU
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setattr(distributed, "launch", lambda *a: pytest.fail("processes were started"))
    result = run(*CLI, "--limit", 16, "--nproc", 2, *extra, "--out", tmp_path / "o")
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: ") and message in lines[0], result.stderr
    assert not (tmp_path / "o").exists()


def test_cli_errors_of_other_ranks_name_them(tmp_path, monkeypatch):
    monkeypatch.setenv("RANK", "1")
    result = run(*CLI, "--limit", 16, "--momentum", 5, "--out", tmp_path / "o")
    assert result.exit_code == 2
    assert result.stderr.strip() == "Error (rank 1): momentum (--momentum) must be a finite number in [0, 1), got 5.0"


def test_cli_help_shows_nproc_and_accumulation():
    result = run("finetune", "--help")
    assert result.exit_code == 0
    assert "--nproc" in result.output and "--accum-steps" in result.output and "--sync-bn" in result.output
