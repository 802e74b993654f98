"""benchmarks/zoo.py, the model-zoo sweep: one model in its own process (rows, timeout), a resumed sweep
skipping what its CSV holds, failure classes grouping errors, the summary's counts."""
import csv
import importlib.util
from pathlib import Path

import pytest

_PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "zoo.py"
_spec = importlib.util.spec_from_file_location("zoo", _PATH)
zoo = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(zoo)


def test_one_model_in_its_own_process_gives_a_row_per_attention():
    rows = zoo.run_isolated("tv:squeezenet1_1", ("se", "bogus"), "3,64,64", timeout=300, memory_gb=8,
                            max_params=4e8)
    assert [(r["attention"], r["status"]) for r in rows] == [("se", "ok"), ("bogus", "refused")]
    assert rows[0]["kind"] == "stage" and rows[0]["edits"] == 2 and float(rows[0]["max_abs_diff"]) <= 1e-5
    assert rows[1]["error"].startswith("UnknownNameError: Unknown attention 'bogus'")


def test_a_model_over_the_time_limit_is_a_timeout_row():
    rows = zoo.run_isolated("tv:squeezenet1_1", ("se", "cbam"), None, timeout=0.01, memory_gb=8, max_params=4e8)
    assert [r["status"] for r in rows] == ["timeout", "timeout"]


def test_models_over_the_size_limit_are_patched_on_the_meta_device():
    rows = zoo.run_isolated("tv:squeezenet1_1", ("se", "cbam"), "3,64,64", timeout=300, memory_gb=8, max_params=1e5)
    real = zoo.run_isolated("tv:squeezenet1_1", ("se", "cbam"), "3,64,64", timeout=300, memory_gb=8, max_params=4e8)
    assert [r["status"] for r in rows] == ["meta", "meta"] and [r["status"] for r in real] == ["ok", "ok"]
    # the same sites, edits and added parameters as the real model's surgery
    assert [(r["kind"], r["edits"], r["params_added"]) for r in rows] == \
        [(r["kind"], r["edits"], r["params_added"]) for r in real] == [("stage", 2, 10650), ("stage", 2, 10852)]
    assert "1M parameters > --max-params 0M: patched on the meta device" in rows[0]["error"]
    assert rows[0].get("max_abs_diff", "") == ""


def test_a_meta_patch_that_changes_the_output_shape_is_a_crash(monkeypatch):
    import torch

    import surgeon.api
    import surgeon.planning
    from surgeon.layers.channel import SEModule

    # an attention that doubles its channels, with surgeon's own shape checks switched off: the sweep's check
    # of the patched model's output shapes is what must catch it
    monkeypatch.setattr(SEModule, "forward", lambda self, x: torch.cat([x, x], 1))
    monkeypatch.setattr(surgeon.planning, "_check_shapes", lambda *a: None)
    monkeypatch.setattr(surgeon.api, "_edit_flops", lambda site, module, attention="": (0, True, None))
    row = zoo.run_model("tv:squeezenet1_1", ("se",), "3,32,32", max_params=1e5)[0]
    assert row["status"] == "crash" and "the patched model fails on meta tensors" in row["error"], row
    monkeypatch.setattr(SEModule, "forward", lambda self, x: torch.cat([x, x], 0))  # runs on: twice the batch
    row = zoo.run_model("tv:squeezenet1_1", ("se",), "3,32,32", max_params=1e5)[0]
    assert row["status"] == "crash" and "output shapes" in row["error"], row


def test_a_patched_model_reading_a_tensor_that_does_not_move_with_it_is_a_crash(monkeypatch):
    """The meta device stands in for a GPU: a tensor the patched forward reads that is neither a parameter nor a
    buffer (here, a plain attribute of the inserted module) would stay on the CPU."""
    import torch

    from surgeon.layers.channel import SEModule

    forward = SEModule.forward

    def reading_a_cpu_tensor(self, x):
        self.__dict__.setdefault("_cpu_zero", torch.zeros(()))
        return forward(self, x) + self._cpu_zero.expand(x.shape[1:])

    monkeypatch.setattr(SEModule, "forward", reading_a_cpu_tensor)
    row = zoo.run_model("tv:squeezenet1_1", ("se",), "3,32,32", max_params=4e8)[0]
    assert row["status"] == "crash" and "would not move with .to()" in row["error"], row


def test_a_timm_model_whose_constructor_needs_real_parameters_is_built_on_meta_whole():
    """timm Swin V2 CR computes a buffer from its parameters' device and copies it in: with parameters moved
    to meta as they are registered, that copy fails; timm's own device='meta' build does not."""
    row = zoo.run_model("timm:swinv2_cr_tiny_ns_224", ("se",), None, max_params=1e5)[0]
    assert row["status"] == "meta" and row["edits"] == 24, row
    assert zoo._count_params("timm:swinv2_cr_tiny_ns_224") == 28_333_468


def test_models_the_meta_device_cannot_build_are_too_big_rows(monkeypatch):
    monkeypatch.setattr(zoo, "_count_params", lambda ref: None)
    rows = zoo.run_model("tv:squeezenet1_1", ("se",), "3,32,32", max_params=1e5)
    assert rows[0]["status"] == "too_big" and "cannot build it on the meta device" in rows[0]["error"]


def test_a_resumed_sweep_runs_only_what_its_csv_lacks(tmp_path, monkeypatch):
    path = tmp_path / "zoo.csv"
    ran, attentions_run = [], []

    def fake(ref, attentions, size, **kw):
        ran.append(ref)
        attentions_run.append(attentions)
        return [{"source": ref.split(":")[0], "model": ref.split(":")[1], "attention": a, "status": "ok"}
                for a in attentions]

    monkeypatch.setattr(zoo, "run_isolated", fake)
    jobs = [("tv:a", None), ("timm:b", None)]
    zoo.sweep(jobs[:1], path, attentions=("se",), timeout=1, memory_gb=1, max_params=1, progress=False)
    zoo.sweep(jobs, path, attentions=("se", "cbam"), timeout=1, memory_gb=1, max_params=1, progress=False)
    assert ran == ["tv:a", "tv:a", "timm:b"]  # tv:a again for cbam only; its se row stays as it was
    assert attentions_run == [("se",), ("cbam",), ("se", "cbam")]
    with path.open() as f:
        rows = [(r["model"], r["attention"]) for r in csv.DictReader(f)]
    assert rows == [("a", "se"), ("a", "cbam"), ("b", "se"), ("b", "cbam")]
    assert zoo.done_keys(path) == {("tv", "a", "se"), ("tv", "a", "cbam"), ("timm", "b", "se"),
                                   ("timm", "b", "cbam")}


def test_out_of_memory_rows_are_retried_at_half_the_image_size(tmp_path, monkeypatch):
    calls = []

    def fake(ref, attentions, size, *, reduced=False, **kw):
        calls.append((attentions, reduced))
        if not reduced:
            return [{"source": "timm", "model": "m", "attention": a, "status": "oom" if a != "eca" else "ok",
                     "error": "own size"} for a in attentions]
        return [{"source": "timm", "model": "m", "attention": a, "status": "reduced" if a == "se" else "oom",
                 "error": "half size"} for a in attentions]

    monkeypatch.setattr(zoo, "run_isolated", fake)
    path = tmp_path / "zoo.csv"
    zoo.sweep([("timm:m", None)], path, attentions=("se", "eca", "cbam"), timeout=1, memory_gb=1, max_params=1,
              progress=False)
    assert calls == [(("se", "eca", "cbam"), False), (("se", "cbam"), True)]  # only the oom rows again
    assert [(r["attention"], r["status"], r["error"]) for r in zoo.read_rows(path)] == \
        [("se", "reduced", "half size"), ("eca", "ok", "own size"), ("cbam", "oom", "own size")]
    # (cbam ran out of memory at half the size too: the row of its own size stands)


def test_a_reduced_row_is_a_model_built_and_verified_at_half_its_size():
    row = zoo.run_model("timm:vit_tiny_patch16_224", ("se",), None, 4e8, reduced=True)[0]
    assert row["status"] == "reduced" and row["input_size"] == "3,112,112", row
    assert row["error"].startswith("verified at 3×112×112: at its own 3×224×224 the verification ran out of memory")
    assert row["edits"] == 24 and float(row["max_abs_diff"]) <= 1e-5
    vit = zoo._build("timm:vit_tiny_patch16_224", (112, 112))  # its position embedding is built for 7×7 patches
    assert vit.pos_embed.shape[1] == 1 + 7 * 7


def test_failure_classes_blank_names_and_numbers():
    a = zoo.failure_class("ShapeError: cbam needs (N, C, H, W); site 'layer1.0' has shape (2, 64, 4, 16, 16)")
    b = zoo.failure_class("ShapeError: cbam needs (N, C, H, W); site 'blocks.3' has shape (1, 8, 2, 7, 7)")
    assert a == b == "ShapeError: cbam needs (N, C, H, W); site '…' has shape (…)"
    assert zoo.failure_class("took 12.5 s") == "took N s"


def test_summary_counts_per_source_and_status():
    rows = [{"source": "tv", "model": "m", "attention": "se", "status": "ok", "error": ""},
            {"source": "tv", "model": "n", "attention": "se", "status": "crash", "error": "KeyError: 'x'"},
            {"source": "timm", "model": "o", "attention": "se", "status": "crash", "error": "KeyError: 'y'"},
            {"source": "timm", "model": "p", "attention": "se", "status": "oom", "error": "[enforce fail at a.cpp:1]"}]
    counts, failures = zoo.summary(rows)
    assert [c.header for c in counts.columns] == ["source", "ok", "crash", "oom", "total"]
    assert list(counts.columns[2].cells) == ["1", "1", "2"]  # timm, tv, all
    assert list(failures.columns[1].cells) == ["2", "1"]
    assert list(failures.columns[3].cells) == ["timm:o, tv:n", "timm:p"]
    assert list(failures.columns[2].cells)[1] == "\\[enforce fail at a.cpp:N]"  # shown as text, not rich markup
    md = zoo.markdown_summary(rows).splitlines()
    assert md[2:8] == ["| source | ok | crash | oom | total |", "|---|---:|---:|---:|---:|", "| timm | 0 | 1 | 1 | 2 |",
                       "| tv | 1 | 1 | 0 | 2 |", "| all | 1 | 2 | 1 | 4 |", ""]
    assert "| oom | 1 | [enforce fail at a.cpp:N] | timm:p |" in md


@pytest.mark.parametrize("ref,size", zoo.CI_SAMPLE)
def test_the_ci_sample_names_models_the_libraries_have(ref, size):
    source, name = ref.split(":")
    known = {"tv": zoo._tv_names, "smp": lambda: zoo.SMP_MODELS}
    if source == "timm":
        import timm

        assert timm.is_model(name)
    else:
        assert name in known[source]()
    assert len(zoo.CI_SAMPLE) == 30
