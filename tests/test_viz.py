"""surgeon.capture / surgeon.gates (viz.py), the layers' `applied` methods, surgeon.maps and the
`surgeon gates` / `surgeon maps` commands."""
from __future__ import annotations

import json

import numpy
import pytest
import torch

import surgeon
from surgeon.cli import cli
from surgeon.layers.applied import KINDS
from surgeon.layers.gate import ZeroGate
from surgeon.viz import attention_layer

from catalogue_models import names, target
from click.testing import CliRunner
from toy_models import TinyResNet

SIGMOID = {"se", "eca", "srm", "fca", "spatial", "cbam", "scse", "coord", "bam", "triplet", "ge", "attention_gate",
           "residual_attention", "adl"}  # weights out of a sigmoid: in [0, 1]
SUMS_TO_ONE = {"pool": (1, 2), "self": None, "tokens": (1,), "series": (1,), "branches": (1,)}  # dims (None: all)


def _sums(kind: str, w: torch.Tensor) -> torch.Tensor:
    dims = SUMS_TO_ONE[kind] or tuple(range(1, w.dim()))
    return w.float().sum(dims)


@pytest.mark.parametrize("name", names())
def test_every_attention_says_what_it_applied(name):
    model, x, kw = target(name)
    patched = surgeon.add(model, name, example_input=x, verify=False, **kw)
    caps = surgeon.capture(patched, *x)
    assert len(caps) == len(surgeon.edits(patched))
    for e in surgeon.edits(patched):
        cap = caps[e.site]
        layer = attention_layer(patched.get_submodule(e.module))
        assert layer is not None and cap.parts, (
            f"attention {name!r}: its layer {type(patched.get_submodule(e.module)).__name__} has no "
            f"applied(*inputs) method; add one (see surgeon/layers/applied.py)")
        n = x[0].shape[0]
        for part in cap.parts.values():
            w = part.weights
            assert part.kind in KINDS and w.shape[0] == n and not w.requires_grad
            assert torch.isfinite(w.float()).all()
            if part.kind == "channel":
                assert w.shape == (n, e.shape[1])
            if part.kind == "spatial" and len(e.shape) == 4:
                assert w.shape == (n, *e.shape[2:])
            if part.kind in SUMS_TO_ONE:
                torch.testing.assert_close(_sums(part.kind, w), torch.ones_like(_sums(part.kind, w)))
            if name in SIGMOID:
                assert 0 <= float(w.min()) and float(w.max()) <= 1
            if part.kind == "selection":
                assert w.dtype == torch.long and w.shape == (n,)
        # identity init: every gate is 0, and the edit changes nothing (effect 0 where measurable)
        assert all(bool((g == 0).all()) for g in cap.gate.values())
        assert cap.effect in (None, 0.0)


def _tiny(attention, **options):
    torch.manual_seed(0)
    model = TinyResNet().eval()
    return surgeon.add(model, attention, example_input=torch.randn(2, 3, 32, 32), **options)


def _set_gates(model, value):
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, ZeroGate) and m.gamma is not None:
                m.gamma.fill_(value)


@pytest.mark.parametrize("attention,expand", [("se", lambda w: w[:, :, None, None]),
                                              ("spatial", lambda w: w[:, None])])
def test_weights_are_what_the_layer_multiplied_by(attention, expand):
    patched = _tiny(attention)
    _set_gates(patched, 1.0)  # the ungated form: y = x · w exactly
    x = torch.randn(2, 3, 32, 32)
    e = surgeon.edits(patched)[0]
    module = patched.get_submodule(e.module)
    seen = {}
    module.register_forward_hook(lambda m, args, out: seen.update(x=args[0], y=out))
    cap = surgeon.capture(patched, x)[e.site]
    torch.testing.assert_close(seen["y"], seen["x"] * expand(cap.weights))
    assert cap.gamma == 1.0 and cap.effect > 0.01


def test_gates_report_gamma_and_effect():
    patched = _tiny("cbam")
    x = torch.randn(2, 3, 32, 32)
    at_init = surgeon.gates(patched, x)
    assert [g.site for g in at_init] == [e.site for e in surgeon.edits(patched)]
    assert all(g.gamma == 0 and g.effect == 0 for g in at_init)
    _set_gates(patched, 0.5)
    later = surgeon.gates(patched, x)
    assert all(g.gamma == 0.5 and g.effect > 0 for g in later)
    patched.train()
    surgeon.gates(patched, x)
    assert patched.training and all(m.training for m in patched.modules())


def test_capture_of_an_unpatched_model_is_one_line():
    with pytest.raises(surgeon.SurgeonError, match="no inserted attention"):
        surgeon.capture(TinyResNet(), torch.randn(1, 3, 32, 32))


def _png(path, seed=0, size=40):
    from PIL import Image

    gen = torch.Generator().manual_seed(seed)
    Image.fromarray((torch.rand(size, size, 3, generator=gen) * 255).to(torch.uint8).numpy()).save(path)
    return path


def test_maps_writes_overlays_channels_and_sheet(tmp_path):
    from PIL import Image

    patched = _tiny("cbam")
    _set_gates(patched, 1.0)
    images = [_png(tmp_path / "a.png"), _png(tmp_path / "b.png", seed=1)]
    written = surgeon.maps(patched, images=images, out=tmp_path / "maps", input_size=(3, 32, 32))
    sites = [e.site for e in surgeon.edits(patched)]
    expected = {f"{stem}_{site}_spatial.png" for stem in ("a", "b") for site in sites}
    expected |= {f"{stem}_{k}.png" for stem in ("a", "b") for k in ("channels", "sheet")}
    assert {p.name for p in written} == expected == {p.name for p in (tmp_path / "maps").iterdir()}
    sheet = torch.tensor(numpy.asarray(Image.open(tmp_path / "maps" / "a_sheet.png").convert("L")), dtype=torch.float)
    assert sheet.std() > 10  # a picture, not a blank page
    caps = surgeon.capture(patched, torch.randn(2, 3, 32, 32))
    assert all(float(c.parts["spatial"].weights.std()) > 0 for c in caps.values())  # the maps are not constant


def test_maps_of_tokens(tmp_path):
    from seq_models import tagger

    model = tagger()
    patched = surgeon.add(model, "mhsa", kind="tokens", example_input=(torch.randint(1, 40, (2, 10)),))
    written = surgeon.maps(patched, tokens=[[3, 5, 7, 9], [1, 2]], out=tmp_path / "m")
    assert [p.name for p in written] == ["tokens0.png", "tokens1.png"] and all(p.stat().st_size > 1000 for p in written)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    base = tmp_path_factory.mktemp("saved")
    for attention in ("cbam", "se"):
        patched = surgeon.add("toy_models:tiny_resnet", attention, input_size=(3, 32, 32))
        surgeon.save(patched, base / attention)
    return base


def _run(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def test_cli_maps_and_gates(saved, tmp_path):
    images = [_png(tmp_path / "a.png"), _png(tmp_path / "b.png")]
    out = tmp_path / "maps"
    result = _run("maps", saved / "cbam", "--image", *images, "--out", out, "--trust-code")
    assert result.exit_code == 0, result.output
    assert "Wrote" in result.output and (out / "a_sheet.png").is_file() and (out / "b_sheet.png").is_file()
    result = _run("gates", saved / "cbam", "--trust-code", "--json")
    assert result.exit_code == 0, result.output
    rows = json.loads(result.output)
    assert len(rows) == 6 and all(r["gamma"] == 0 and r["effect"] == 0 for r in rows)
    table = _run("gates", saved / "cbam", "--trust-code", "--data", "digits", "--batch", "4")
    assert table.exit_code == 0 and "stage1.0" in table.output and "effect" in table.output


@pytest.mark.parametrize("case,message", [
    ("missing", "does not exist"), ("unreadable", "Cannot read image"), ("channel-only", "No edit of this model has "
     "spatial"), ("no-image", "Give images or token sequences"), ("bad-tokens", "comma-separated integer ids"),
])
def test_cli_maps_bad_input_is_one_line_and_writes_nothing(saved, tmp_path, case, message):
    good = _png(tmp_path / "a.png")
    bad = tmp_path / "b.png"
    bad.write_text("not an image")
    args = {"missing": [saved / "cbam", "--image", good, tmp_path / "nope.png"],
            "unreadable": [saved / "cbam", "--image", good, bad],
            "channel-only": [saved / "se", "--image", good],
            "no-image": [saved / "cbam"],
            "bad-tokens": [saved / "cbam", "--tokens", "1,x"]}[case]
    result = _run("maps", *args, "--out", tmp_path / "out", "--trust-code")
    assert result.exit_code == 2, result.output
    assert message in result.output and len(result.output.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary folder left


def test_cli_help():
    for cmd in ("maps", "gates"):
        result = _run(cmd, "--help")
        assert result.exit_code == 0 and "MODEL" in result.output


def test_finetune_logs_gates_per_epoch_and_plots_them(tmp_path):
    from surgeon import models, training
    from surgeon.data import digits

    torch.manual_seed(0)
    model = surgeon.add(models.load("toy_models:TinyResNet", model_args={"num_classes": 10}), "cbam",
                        input_size=(3, 16, 16))
    train, val = digits("train", input_size=(3, 16, 16), limit=64), digits("test", input_size=(3, 16, 16), limit=40)
    run = surgeon.finetune(model, train, val, epochs=2, lr=1e-2, batch_size=32, out=tmp_path / "run", progress=False)
    history = training.read_metrics(tmp_path / "run")
    sites = [e.site for e in surgeon.edits(model)]
    assert [list(r["gates"]) for r in history] == [sites, sites]
    assert all(g["gamma"] > 0 and g["effect"] > 0 for g in history[-1]["gates"].values())  # γ left 0
    batch = torch.stack([val[i][0] for i in range(32)])  # the logged batch: the first 32 validation images
    now = {g.site: {"gamma": g.gamma, "effect": g.effect} for g in surgeon.gates(run.model, batch)}
    assert now == history[-1]["gates"]
    assert (tmp_path / "run" / "gates.png").stat().st_size > 1000
