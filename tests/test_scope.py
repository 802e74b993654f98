"""Scoped surgery: the patched model stays the user's model (class, methods, attributes, hooks, outputs),
on real timm, segmentation_models_pytorch and torchvision detection models."""
import copy

import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn

import surgeon
from surgeon.surgery.owned import rewritten
from toy_models import TinyResNet

SIZE = (3, 64, 64)


def _x(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _snapshot(model):
    return ({k: v.clone() for k, v in model.state_dict().items()},
            [(n, type(m)) for n, m in model.named_modules()])


def _unchanged(model, snap):
    sd, mods = snap
    now = model.state_dict()
    return list(now) == list(sd) and all(torch.equal(now[k], v) for k, v in sd.items()) \
        and [(n, type(m)) for n, m in model.named_modules()] == mods


# -- timm: the model keeps its class and its methods ----------------------------------------------------
TIMM = ["resnet18", "resnet50d", "efficientnet_b0", "mobilenetv3_small_100", "regnety_002", "convnext_atto",
        "densenet121", "resnext26ts", "seresnet18", "mixnet_s"]


def _timm_methods(model, x):
    """Which of timm's model methods work on `model` and agree with its forward."""
    ok = {}
    with torch.no_grad():
        y = model(x)
        try:
            ok["forward_features/forward_head"] = torch.allclose(model.forward_head(model.forward_features(x)), y,
                                                                 atol=1e-5)
        except Exception:  # noqa: BLE001 - the table records what breaks
            ok["forward_features/forward_head"] = False
        for name, call in (("get_classifier", lambda m: isinstance(m.get_classifier(), nn.Module)),
                           ("pretrained_cfg", lambda m: m.pretrained_cfg["architecture"] is not None),
                           ("resolve_data_config", lambda m: timm.data.resolve_data_config(model=m)["input_size"]),
                           ("feature_info", lambda m: len(m.feature_info) > 0),
                           ("forward_intermediates", lambda m: len(m.forward_intermediates(x)[1]) > 0),
                           ("set_grad_checkpointing", lambda m: m.set_grad_checkpointing(False) or True)):
            try:
                ok[name] = bool(call(model))
            except Exception:  # noqa: BLE001
                ok[name] = False
    return ok


@pytest.mark.parametrize("name", ["resnet18", "efficientnet_b0", "convnext_atto"])
def test_timm_model_keeps_class_methods_and_identity(name):
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=7).eval()
    snap = _snapshot(model)
    x = _x(2, *SIZE)
    before = _timm_methods(model, x)
    patched = surgeon.add(model, "se", input_size=SIZE)
    assert type(patched) is type(model) and isinstance(patched, type(model))
    assert _timm_methods(patched, x) == before
    with torch.no_grad():
        assert torch.allclose(patched(x), model(x), atol=1e-5)
    # the edits are really there: forward_features runs the inserted modules
    calls = []
    for e in surgeon.edits(patched):
        patched.get_submodule(e.module).register_forward_hook(lambda *a: calls.append(1))
    with torch.no_grad():
        patched.forward_features(x)
    assert len(calls) == len(surgeon.edits(patched)) > 0
    # reset_classifier replaces the head of the patched model only
    patched.reset_classifier(3)
    with torch.no_grad():
        assert patched(x).shape == (2, 3) and model(x).shape == (2, 7)
    assert _unchanged(model, snap)


def test_edits_record_says_where_each_module_went():
    model = timm.create_model("resnet18").eval()
    patched = surgeon.add(model, "cbam", input_size=SIZE, at=["layer1.*"])
    patched = surgeon.add(patched, "attnpool", input_size=SIZE, at=["global_pool"])
    edits = surgeon.edits(patched)
    assert [(e.site, e.attention, e.module, e.owner, e.step) for e in edits] == [
        ("layer1.0", "cbam", "layer1.0.cbam", "layer1.0", 1),
        ("layer1.1", "cbam", "layer1.1.cbam", "layer1.1", 1),
        ("global_pool", "attnpool", "global_pool.attnpool", "global_pool", 2),
    ]
    assert all(isinstance(e, surgeon.EditRecord) and e.kind in ("residual", "pool") for e in edits)
    assert surgeon.edits(model) == []
    # only the owners changed class; every module keeps the user's parameter tensors (no copy of the weights)
    originals = dict(model.named_modules())
    for name, mod in patched.named_modules():
        if "cbam" in name or "attnpool" in name:
            continue
        rewritten_owner = name in ("layer1.0", "layer1.1", "global_pool")
        assert isinstance(mod, type(originals[name])) and (type(mod) is type(originals[name])) != rewritten_owner
        assert all(p is q for p, q in zip(mod.parameters(recurse=False), originals[name].parameters(recurse=False)))
    # the patched model is its own object tree: switching it to train mode leaves the user's model in eval
    patched.train()
    assert not any(m.training for m in model.modules())
    assert rewritten(patched.layer1[0]) is not None and rewritten(patched.layer2[0]) is None


def test_sequential_owner_keeps_its_indexing():
    model = timm.create_model("resnet18").eval()
    patched = surgeon.add(model, "bam", input_size=SIZE)  # stage sites: the end of layer1, layer2...
    assert [e.module for e in surgeon.edits(patched)][:1] == ["layer1.bam"]
    assert isinstance(patched.layer1, nn.Sequential) and len(patched.layer1) == len(model.layer1) == 2
    assert [type(m) for m in patched.layer1] == [type(m) for m in model.layer1]
    assert patched.layer1[-1].conv1.weight is model.layer1[-1].conv1.weight
    # the rewritten layer1 still calls its blocks as modules: they keep their own names, hooks and sites
    assert 'getattr(self, "0")(' in rewritten(patched.layer1)
    assert [s.name for s in surgeon.sites(patched, kind="residual", input_size=SIZE)] == [
        s.name for s in surgeon.sites(model, kind="residual", input_size=SIZE)]
    assert {"layer1.bam.channel.0.weight", "layer1.bam.gamma"} <= set(patched.state_dict())


def test_hooks_on_the_model_and_inside_owners_keep_firing():
    model = timm.create_model("resnet18").eval()
    fired = []
    model.register_forward_hook(lambda *a: fired.append("root"))
    model.layer1.register_forward_hook(lambda *a: fired.append("layer1"))
    model.layer1[0].bn2.register_forward_pre_hook(lambda *a: fired.append("bn2"))
    # a container inside a block that se rewrites: traced through, its hook would never fire again
    model.layer2[0].downsample.register_forward_hook(lambda *a: fired.append("downsample"))
    patched = surgeon.add(model, "bam", input_size=SIZE)  # rewrites layer1 itself
    patched = surgeon.add(patched, "se", input_size=SIZE, at=["layer2.0"])  # rewrites layer2.0
    assert [e.owner for e in surgeon.edits(patched)][-1] == "layer2.0"
    fired.clear()
    with torch.no_grad():
        patched(_x(1, *SIZE))
    assert sorted(fired) == ["bn2", "downsample", "layer1", "root"]


class _SharedBlockNet(nn.Module):
    """One block called twice, plus plain attributes the forward reads."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.block = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.head = nn.Linear(8, 4)
        self.scale = 0.5

    def forward(self, x):
        x = self.stem(x)
        x = x + self.block(x)
        x = x + self.block(x) * self.scale
        return self.head(x.mean((2, 3)))

    def describe(self):
        return f"scale={self.scale}"


def test_a_module_called_twice_is_edited_in_its_caller_and_attributes_stay():
    model = _SharedBlockNet().eval()
    patched = surgeon.add(model, "se", example_input=_x(2, 3, 16, 16))
    assert isinstance(patched, _SharedBlockNet) and patched.describe() == "scale=0.5"
    owners = {e.owner for e in surgeon.edits(patched)}
    assert owners == {""}  # the block runs twice: only the root's forward can hold the two edits
    with torch.no_grad():
        assert torch.equal(patched(_x(2, 3, 16, 16)), model(_x(2, 3, 16, 16)))


# -- segmentation_models_pytorch (a test dependency: a missing install fails here, it never skips the module) --
import segmentation_models_pytorch as smp  # noqa: E402


@pytest.mark.parametrize("arch", ["Unet", "FPN", "DeepLabV3Plus", "PSPNet"])
def test_smp_models_patch_with_their_encoders_intact(arch):
    torch.manual_seed(0)
    model = getattr(smp, arch)(encoder_name="resnet18", encoder_weights=None, classes=2).eval()
    x = _x(2, 3, 64, 64)
    for attention in ("se", "cbam"):
        patched = surgeon.add(model, attention, example_input=x)
        assert type(patched) is type(model) and type(patched.encoder) is type(model.encoder)
        assert patched.encoder.output_stride == model.encoder.output_stride
        edits = surgeon.edits(patched)
        assert any(e.module.startswith("encoder.") for e in edits)
        with torch.no_grad():
            assert torch.allclose(patched(x), model(x), atol=1e-5)


def test_smp_unet_skips_take_attention_gates():
    torch.manual_seed(0)
    model = smp.Unet(encoder_name="resnet18", encoder_weights=None, classes=2, encoder_depth=3,
                     decoder_channels=(32, 16, 8)).eval()
    x = _x(2, 3, 64, 64)
    plan = surgeon.plan(model, "attention_gate", example_input=x)
    patched = plan.apply()
    assert len(plan.edits) >= 2 and isinstance(patched, type(model))
    with torch.no_grad():
        assert torch.allclose(patched(x), model(x), atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["Unet", "FPN", "DeepLabV3Plus", "PSPNet"])
@pytest.mark.parametrize("encoder", ["efficientnet-b0", "mobilenet_v2"])
def test_smp_other_encoders(arch, encoder):
    torch.manual_seed(0)
    model = getattr(smp, arch)(encoder_name=encoder, encoder_weights=None, classes=2).eval()
    x = _x(2, 3, 64, 64)
    for attention in ("se", "cbam", "eca"):
        patched = surgeon.add(model, attention, example_input=x)
        assert type(patched) is type(model)
        with torch.no_grad():
            assert torch.allclose(patched(x), model(x), atol=1e-5)


# -- torchvision detection ---------------------------------------------------------------------------
def _detector(name, size=128):
    from torchvision.models import detection

    torch.manual_seed(0)
    model = getattr(detection, name)(weights=None, weights_backbone=None, num_classes=3)
    if hasattr(model, "transform"):
        model.transform.min_size, model.transform.max_size = (size,), size
    return model.eval()


def _targets(name=""):
    target = {"boxes": torch.tensor([[10.0, 12.0, 70.0, 90.0]]), "labels": torch.tensor([1])}
    if "mask" in name:
        target["masks"] = torch.zeros(1, 128, 128, dtype=torch.uint8)
        target["masks"][0, 12:90, 10:70] = 1
    if "keypoint" in name:
        target["keypoints"] = torch.tensor([[[20.0, 30.0, 1.0]] * 17])
    return [target]


def _check_detector(name, attention="cbam"):
    size = 300 if "ssd300" in name else 128  # SSD300's VGG needs its own size
    model = _detector(name, size)
    images = [torch.rand(3, size, size, generator=torch.Generator().manual_seed(1))]
    snap = _snapshot(model)
    patched = surgeon.add(model, attention, example_input=(images,))
    assert type(patched) is type(model) and isinstance(patched.backbone, type(model.backbone))
    assert all(e.module.startswith("backbone") for e in surgeon.edits(patched))
    with torch.no_grad():
        got, want = patched(images), model(images)
    assert [sorted(d) for d in got] == [sorted(d) for d in want]
    for g, w in zip(got, want):
        assert all(torch.allclose(g[k], w[k], atol=1e-4) for k in w)
    assert _unchanged(model, snap)  # (train mode below updates the batch-norm statistics both models share)
    # train mode: the same losses under the same seed (the model still calls its own heads' methods)
    model.train(), patched.train()
    torch.manual_seed(0)
    batch = images * 2  # two images: batch norms on 1×1 features (SSDlite) need more than one value
    want_loss = model([i.clone() for i in batch], _targets(name) * 2)
    torch.manual_seed(0)
    got_loss = patched([i.clone() for i in batch], _targets(name) * 2)
    assert set(got_loss) == set(want_loss)
    assert all(torch.allclose(got_loss[k], want_loss[k], atol=1e-4) for k in want_loss)
    sum(got_loss.values()).backward()
    new = [p for e in surgeon.edits(patched) for p in patched.get_submodule(e.module).parameters()]
    assert new and all(p.grad is not None for p in new)
    model.eval()
    return patched


def test_faster_rcnn_patches_inside_its_backbone():
    patched = _check_detector("fasterrcnn_mobilenet_v3_large_fpn")
    assert surgeon.edits(patched)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["fasterrcnn_resnet50_fpn", "maskrcnn_resnet50_fpn", "keypointrcnn_resnet50_fpn",
                                  "retinanet_resnet50_fpn", "fcos_resnet50_fpn", "ssd300_vgg16",
                                  "ssdlite320_mobilenet_v3_large"])
def test_detectors(name):
    _check_detector(name)


def test_surgery_never_changes_the_users_model_even_when_it_fails():
    model = _detector("fasterrcnn_mobilenet_v3_large_fpn")
    pooler = model.roi_heads.box_roi_pool
    before = copy.copy(pooler.__dict__)
    with pytest.raises(surgeon.SurgeonError):
        surgeon.add(model, "cbam", example_input=([torch.rand(3, 128, 128)],), at=["no.such.site"])
    assert pooler.__dict__.keys() == before.keys()
    assert pooler.scales is None or not isinstance(pooler.scales, torch.fx.Proxy)
    with torch.no_grad():
        model([torch.rand(3, 128, 128)])  # still runs


# -- what the original computes, in both modes ----------------------------------------------------------
class _Quirky(nn.Module):
    """In-place ops whose result is not reassigned, a functional norm with training=, a no-grad branch."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.b = nn.Conv2d(8, 8, 3, padding=1)
        self.c = nn.Conv2d(8, 8, 3, padding=1)
        self.frozen = nn.Conv2d(8, 8, 1)
        self.register_buffer("rm", torch.zeros(8))
        self.register_buffer("rv", torch.ones(8))

    def forward(self, x):
        x.sub_(0.5).div_(2.0)  # normalises the caller's tensor in place
        y = self.a(x)
        z = self.b(y)
        out = self.c(z)
        out.add_(z)
        out = F.batch_norm(out, self.rm, self.rv, training=False)
        with torch.no_grad():
            f = self.frozen(out)
        return (out + f).mean((2, 3))


def test_in_place_ops_functional_norms_and_no_grad_survive():
    torch.manual_seed(0)
    model = _Quirky().eval()
    x = _x(2, 3, 16, 16)
    plan = surgeon.plan(model, "se", example_input=x.clone())
    patched = plan.apply()
    v = plan.verification
    assert v.max_abs_diff <= 1e-5 and v.train_max_abs_diff is not None and v.train_max_abs_diff <= 1e-5
    for mode in ("eval", "train"):
        getattr(model, mode)(), getattr(patched, mode)()
        rm = model.rm.clone()
        a, b = x.clone(), x.clone()
        want = model(a)
        model.rm.copy_(rm)
        got = patched(b)
        assert torch.allclose(got, want, atol=1e-5) and torch.equal(a, b)  # the input is normalised in both
        model.rm.copy_(rm)
    assert surgeon.edits(patched)
    # the no_grad branch stays frozen: no gradient reaches its weights, as in the original
    patched.eval()
    patched(x.clone()).sum().backward()
    assert patched.frozen.weight.grad is None and patched.c.weight.grad is not None


class _ModeDependent(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.register_buffer("rm", torch.zeros(8))
        self.register_buffer("rv", torch.ones(8))

    def forward(self, x):
        return F.batch_norm(self.a(x), self.rm, self.rv, training=self.training).mean((2, 3))


def test_functional_ops_that_follow_the_mode_are_not_baked_into_one_graph():
    # one graph would keep eval-mode batch norm for ever; the forward stays Python, so nothing here can be
    # rewritten, and the user is told in one line instead of getting a model that trains differently
    with pytest.raises(surgeon.SurgeonError) as err:
        surgeon.add(_ModeDependent().eval(), "se", example_input=_x(2, 3, 16, 16))
    assert "\n" not in str(err.value)


def test_verification_fails_on_nan():
    from surgeon.surgery.verify import Verification

    v = Verification(max_abs_diff=float("nan"), tolerance=1e-5, params_added=1, flops_before=1, flops_after=1,
                     new_params=1, with_grad=1, nonzero_grad=0)
    assert not v.ok and "changed the output" in v.problem()
    v = Verification(max_abs_diff=0.0, tolerance=1e-5, params_added=1, flops_before=1, flops_after=1,
                     new_params=1, with_grad=1, nonzero_grad=0, train_max_abs_diff=float("nan"))
    assert not v.ok and "train mode" in v.problem()


def test_timm_model_saved_by_the_user_loads_without_base(tmp_path):
    model = timm.create_model("resnet18", num_classes=5).eval()
    patched = surgeon.add(model, "eca", input_size=SIZE)
    surgeon.save(patched, tmp_path / "out")
    loaded = surgeon.load(tmp_path / "out")
    x = _x(2, *SIZE)
    with torch.no_grad():
        assert torch.equal(loaded(x), patched(x))
    assert type(loaded) is type(model) and [e.module for e in surgeon.edits(loaded)] == [
        e.module for e in surgeon.edits(patched)]


# -- saying what was chosen, and why nothing was ----------------------------------------------------------
class _PatchEmbedNet(nn.Module):
    """A transformer-like model: one patch-embedding convolution, then token mixing with linear layers."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Conv2d(3, 16, 4, stride=4)
        self.mix = nn.Linear(16, 16)
        self.head = nn.Linear(16, 3)

    def forward(self, x):
        t = self.embed(x).flatten(2).transpose(1, 2)
        return self.head(torch.relu(self.mix(t)).mean(1))


def test_a_lone_fallback_site_is_refused_and_a_fallback_is_said():
    x = _x(2, 3, 16, 16)
    with pytest.raises(surgeon.errors.NoSitesError, match="only after_conv site is 'embed'.*--kind after_conv"):
        surgeon.plan(_PatchEmbedNet(), "se", example_input=x)
    assert len(surgeon.plan(_PatchEmbedNet(), "se", kind="after_conv", example_input=x).edits) == 1
    dense = timm.create_model("densenet121").eval()
    with pytest.warns(UserWarning, match="no residual site; using its 3 stage sites"):
        plan = surgeon.plan(dense, "se", input_size=SIZE)
    assert "using its 3 stage sites" in str(plan)


def test_sites_say_what_did_not_trace():
    with pytest.warns(UserWarning, match="does not trace .*train\\(\\) and eval\\(\\)"):
        found = surgeon.sites(_ModeDependent(), example_input=_x(2, 3, 16, 16))
    assert found == [] and list(found.untraced) == [""]
    from click.testing import CliRunner

    from surgeon.cli import cli

    result = CliRunner().invoke(cli, ["sites", "resnet18", "--input-size", "3,32,32"])
    assert result.exit_code == 0 and "Kept as Python" not in result.output


def test_cli_bool_options_take_their_command_line_forms():
    from click.testing import CliRunner

    from surgeon.cli import cli

    ok = CliRunner().invoke(cli, ["add", "se", "resnet18", "--input-size", "3,32,32", "--dry-run",
                                  "--option", "bias=false", "--at", "layer1.0"])
    assert ok.exit_code == 0, ok.output
    bad = CliRunner().invoke(cli, ["add", "se", "resnet18", "--dry-run", "--option", "bias=maybe"])
    assert bad.exit_code == 2 and "bias must be true or false" in bad.output


# -- models whose inputs an input size cannot describe --------------------------------------------------
_LOADER = """
import sys, torch, surgeon
sys.path.insert(0, {tests!r})
import seq_models
model = surgeon.load({out!r}, trust_code=True, base=getattr(seq_models, {factory!r})())
inputs = torch.load({inputs!r})
with torch.no_grad():
    print("equal" if torch.equal(model(*inputs), torch.load({expected!r})) else "different")
"""


@pytest.mark.parametrize("factory, attention, inputs", [
    ("tagger", "mhsa", lambda: (torch.randint(1, 40, (3, 9), generator=torch.Generator().manual_seed(2)),)),
    ("with_lengths", "attnpool", lambda: (torch.randint(1, 40, (3, 7), generator=torch.Generator().manual_seed(2)),
                                          torch.tensor([7, 4, 2]), _x(3, 6))),
])
def test_token_and_two_input_models_round_trip_in_a_new_process(tmp_path, factory, attention, inputs):
    import subprocess
    import sys
    from pathlib import Path

    import seq_models

    if not hasattr(seq_models, factory):
        seq_models.with_lengths = lambda: _seeded(seq_models.WithLengths)
    model = getattr(seq_models, factory)().eval()
    xs = inputs()
    from roundtrip import save_trained_looking

    save_trained_looking(surgeon.add(model, attention, example_input=xs), xs, tmp_path)
    tests = str(Path(__file__).parent)
    code = _LOADER.format(tests=tests, out=str(tmp_path / "out"), factory=factory if factory == "tagger"
                          else "WithLengths", inputs=str(tmp_path / "inputs.pt"),
                          expected=str(tmp_path / "expected.pt"))
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.stdout.strip() == "equal", done.stderr[-2000:]


def _seeded(cls):
    torch.manual_seed(0)
    return cls()


def test_a_wrong_input_is_one_line_for_both_audiences():
    from click.testing import CliRunner

    from surgeon.cli import cli

    result = CliRunner().invoke(cli, ["sites", "resnet18", "--input-size", "5,32,32"])
    assert result.exit_code == 2 and len(result.stderr.strip().splitlines()) == 1
    assert "does not go through ResNet" in result.stderr and "--input-size C,H,W" in result.stderr
    with pytest.raises(surgeon.SurgeonError) as err:
        surgeon.sites(timm.create_model("resnet18"), example_input=_x(2, 5, 32, 32))
    assert "\n" not in str(err.value) and "example_input=" in str(err.value)


def test_torchvision_model_saved_by_the_user_loads_without_base(tmp_path):
    import json

    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=5).eval()
    patched = surgeon.add(model, "eca", input_size=SIZE)
    surgeon.save(patched, tmp_path / "out")
    recipe = json.loads((tmp_path / "out" / "recipe.json").read_text())
    assert recipe["model"]["ref"] == "tv:resnet18" and recipe["model"]["args"] == {"num_classes": 5}
    loaded = surgeon.load(tmp_path / "out")
    x = _x(2, *SIZE)
    with torch.no_grad():
        assert torch.equal(loaded(x), patched(x))


def test_torchvision_builders_are_told_apart_by_their_settings():
    """Two detection builders give the same weights and differ only in their input transform's size."""
    from torchvision.models import detection

    from surgeon.references import library_reference

    with torch.device("meta"):
        small = detection.fasterrcnn_mobilenet_v3_large_320_fpn(weights_backbone=None, num_classes=4)
        full = detection.fasterrcnn_mobilenet_v3_large_fpn(weights_backbone=None)
    assert library_reference(small) == {"ref": "tv:fasterrcnn_mobilenet_v3_large_320_fpn",
                                        "args": {"num_classes": 4}, "pretrained": False, "weights": None}
    assert library_reference(full)["ref"] == "tv:fasterrcnn_mobilenet_v3_large_fpn"
    assert library_reference(nn.Sequential(nn.Linear(2, 2))) is None


def test_a_detector_saves_and_loads_on_its_base(tmp_path):
    """A detector whose settings differ from its builder's (a smaller input size) cannot be rebuilt from a
    builder name: the save says so, and loads on the base the user passes, giving the same detections."""
    model = _detector("fasterrcnn_mobilenet_v3_large_fpn")
    images = [torch.rand(3, 128, 128, generator=torch.Generator().manual_seed(1))]
    patched = surgeon.add(model, "cbam", example_input=(images,))
    for p in patched.parameters():
        p.data.add_(0.01 * torch.randn_like(p))
    surgeon.save(patched, tmp_path / "out")
    with pytest.raises(surgeon.SurgeonError, match="base="):
        surgeon.load(tmp_path / "out")
    loaded = surgeon.load(tmp_path / "out", base=_detector("fasterrcnn_mobilenet_v3_large_fpn"))
    assert type(loaded) is type(model)
    with torch.no_grad():
        got, want = loaded(images), patched(images)
    assert all(torch.equal(g[k], w[k]) for g, w in zip(got, want) for k in w)


_NEW_PROCESS = """
import sys, torch, warnings
warnings.simplefilter("ignore")
torch.set_num_threads({threads})  # as the test process: another thread count sums in another order
import surgeon
{imports}
model = surgeon.load({out!r}, base={base})
xs = torch.load({inputs!r})
with torch.no_grad():
    out = model(*xs)
{pick}
print(type(model).__name__, "equal" if torch.equal(out, torch.load({expected!r})) else "different")
"""


@pytest.mark.parametrize("case", ["timm", "torchvision", "smp", "detector"])
def test_libraries_models_load_in_a_new_process_bit_exact(tmp_path, case):
    """Saved by surgeon, loaded in a fresh interpreter: without base= where the library says how the model was
    built (timm, torchvision), on the base the user passes otherwise (smp; a detector with a changed size)."""
    import subprocess
    import sys

    import torchvision
    from roundtrip import save_trained_looking

    torch.manual_seed(0)
    pick, base, imports = "", "None", ""
    if case == "timm":
        model, xs, att = timm.create_model("resnet18", num_classes=4).eval(), (_x(2, *SIZE),), "cbam"
    elif case == "torchvision":
        model, xs, att = torchvision.models.mobilenet_v3_small(num_classes=4).eval(), (_x(2, *SIZE),), "se"
    elif case == "smp":
        model, xs, att = smp.Unet(encoder_name="resnet18", encoder_weights=None, classes=2).eval(), \
            (_x(2, *SIZE),), "attention_gate"
        imports = "import segmentation_models_pytorch as smp"
        base = "smp.Unet(encoder_name='resnet18', encoder_weights=None, classes=2)"
    else:
        model, xs, att = _detector("fasterrcnn_mobilenet_v3_large_fpn"), ([torch.rand(3, 128, 128)],), "cbam"
        imports = "from torchvision.models import detection"
        base, pick = "base", "out = out[0]['boxes']"
        imports += ("\nbase = detection.fasterrcnn_mobilenet_v3_large_fpn(weights=None, weights_backbone=None, "
                    "num_classes=3)\nbase.transform.min_size, base.transform.max_size = (128,), 128")
    patched = surgeon.add(model, att, example_input=xs)
    assert isinstance(patched, type(model)) and surgeon.edits(patched)  # (smp's gates rewrite the root)
    save_trained_looking(patched, xs, tmp_path, (lambda out: out[0]["boxes"]) if case == "detector" else
                         (lambda out: out))
    code = _NEW_PROCESS.format(imports=imports, out=str(tmp_path / "out"), base=base, threads=torch.get_num_threads(),
                               inputs=str(tmp_path / "inputs.pt"), pick=pick, expected=str(tmp_path / "expected.pt"))
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.stdout.strip() == f"{type(model).__name__} equal", done.stderr[-2000:]


# -- blocks passing sizes along (torchvision MViT: `x, thw = block(x, thw)`) --------------------------------
class Pool(nn.Module):
    """A strided conv over tokens (B, N, C) laid out on their grid (H, W); returns the pooled tokens and the
    new grid size, read off the conv's output (MViT's attention pooling)."""

    def __init__(self, c: int):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, stride=2, padding=1, groups=c)

    def forward(self, x, hw):
        b, n, c = x.shape
        grid = self.conv(x.transpose(1, 2).reshape((b, c) + hw))
        return grid.flatten(2).transpose(1, 2), (grid.shape[2], grid.shape[3])


class PoolingBlock(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.norm, self.fc, self.pool = nn.LayerNorm(c), nn.Linear(c, c), Pool(c)

    def forward(self, x, hw):
        x = x + self.fc(self.norm(x))
        return self.pool(x, hw)


class SizesAlong(nn.Module):
    """`x, hw = block(x, hw)`: blocks pass the grid size along as a tuple of ints (torchvision's MViT)."""

    def __init__(self, c: int = 16):
        super().__init__()
        self.stem = nn.Conv2d(3, c, 4, stride=4)
        self.blocks = nn.ModuleList([PoolingBlock(c), PoolingBlock(c)])
        self.head = nn.Linear(c, 5)

    def forward(self, x):
        x = self.stem(x)
        hw = (x.shape[2], x.shape[3])
        x = x.flatten(2).transpose(1, 2)
        for block in self.blocks:
            x, hw = block(x, hw)
        return self.head(x.mean(1))


@pytest.mark.parametrize("attention, kind, edits", [("se", "residual", 2), ("cbam", "after_conv", 3)])
def test_blocks_returning_tokens_and_sizes_are_patched_with_the_root(attention, kind, edits):
    """se: the residuals hold (B, N, C) tokens unpacked from a tuple (channels last, not unknown); cbam: the
    pools are rewritten alone (the model's graph computes the sizes they get, their own traces have them as
    the constants of their recorded call), and the stem in the root, which keeps the edited pools whole and
    unpacks their tuples."""
    model = SizesAlong().eval()
    plan = surgeon.plan(model, attention, input_size=(3, 32, 32))
    patched = plan.apply()
    layout = "nlc" if kind == "residual" else "nchw"
    assert [(e.site.kind, e.site.layout) for e in plan.edits] == [(kind, layout)] * edits
    assert plan.owners() == ({"blocks.0": "blocks.0", "blocks.1": "blocks.1"} if attention == "se" else
                             {"stem": "", "blocks.0.pool.conv": "blocks.0.pool", "blocks.1.pool.conv": "blocks.1.pool"})
    assert plan.verification.max_abs_diff == 0 and plan.verification.with_grad == plan.verification.new_params > 0
    x = _x(2, 3, 32, 32)
    assert torch.equal(patched(x), model(x))


class _Aliased(TinyResNet):
    """A block held under a second name, as models keep `self.encoder = self.backbone`."""

    def __init__(self):
        super().__init__()
        self.first_block = self.stage1[0]


def test_a_module_held_under_two_names_is_one_patched_module_under_both(tmp_path):
    model = _Aliased().eval()
    patched = surgeon.add(model, "se", input_size=(3, 32, 32))
    assert patched.first_block is patched.stage1[0] and any(n.startswith("first_block.") and ".se." in n
                                                            for n in patched.state_dict())
    surgeon.save(patched, tmp_path / "out")
    loaded = surgeon.load(tmp_path / "out", base=_Aliased())
    x = torch.randn(2, 3, 32, 32)
    assert loaded.first_block is loaded.stage1[0] and torch.equal(loaded(x), patched(x))


# -- blocks alike are traced once ---------------------------------------------------------------------
class _FlagBlock(nn.Module):
    """A block whose graph follows a plain flag and the value of a small buffer, not its class."""

    def __init__(self, c, skip, scale):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)
        self.skip = skip
        self.register_buffer("scale", torch.tensor(float(scale)))

    def forward(self, x):
        y = F.relu(self.conv(x))
        if self.scale.item() != 1.0:  # a decision on a buffer's value, taken while tracing
            y = y * 2
        # what tracing makes and stores: a tensor constant, a dropout module following the mode
        y = F.dropout(y + torch.tensor(0.5), p=0.0, training=self.training)
        return y + x if self.skip else y


class _Flags(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.Sequential(_FlagBlock(8, True, 1), _FlagBlock(8, True, 1), _FlagBlock(8, False, 1),
                                    _FlagBlock(8, True, 3), _FlagBlock(8, True, 1))
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        return self.head(self.blocks(x).mean((2, 3)))


def test_blocks_alike_are_traced_once_and_blocks_that_differ_keep_their_own_graph(monkeypatch):
    """Owners with one fingerprint (class, attributes, small buffers' values), call and leaves share one trace;
    a block that differs in a flag or in a buffer's value is traced for itself, so it keeps its own code."""
    from surgeon.surgery import trace as trace_module

    traced = []
    real = trace_module._trace_whole

    def counting(module, *args, **kwargs):
        traced.append(type(module).__name__)
        return real(module, *args, **kwargs)

    monkeypatch.setattr(trace_module, "_trace_whole", counting)
    model = _Flags().eval()
    x = _x(2, 8, 16, 16)
    plan = surgeon.plan(model, "se", kind="after_conv", init="paper")
    traced.clear()
    patched = plan.apply()
    # each edit's owner, its block, is traced alone: blocks 0, 2 and 3; blocks 1 and 4 are like block 0
    assert traced == ["_FlagBlock"] * 3
    blocks = patched.blocks
    assert rewritten(blocks[1]) == rewritten(blocks[4]) == rewritten(blocks[0])
    assert len({rewritten(blocks[i]) for i in range(5)}) == 3
    assert "dropout" in rewritten(blocks[4]) and "_tensor_constant0" in rewritten(blocks[4])
    assert blocks[4]._tensor_constant0 is not blocks[0]._tensor_constant0
    patched.train()
    assert torch.equal(patched(x), patched.eval()(x))  # p = 0: the dropouts follow the mode and change nothing
    # each block computes what it did, with its SE in it: the same as the SE applied by hand
    with torch.no_grad():
        for i, block in enumerate(blocks):
            orig = model.blocks[i]
            y = block.conv_se(F.relu(orig.conv(x)))  # after the conv and its activation
            want = (y * (2 if i == 3 else 1) + 0.5) + (x if orig.skip else 0)
            assert torch.allclose(block(x), want, atol=1e-6), i


def test_a_rewritten_forward_with_functional_dropout_keeps_the_model_s_mode():
    """timm's heads call F.dropout(x, p, self.training); rewriting the root (a site on its stem) turns it into a
    dropout module, which must be in the model's mode: made in train mode, it dropped activations in eval."""
    model = timm.create_model("mobilenetv3_small_100", drop_rate=0.5).eval()
    patched = surgeon.add(model, "se", kind="after_conv", at=["conv_stem"])
    assert rewritten(patched) is not None and "dropout" in rewritten(patched)
    assert not any(m.training for m in patched.modules())
    x = _x(2, 3, 96, 96)
    with torch.no_grad():
        assert torch.equal(patched(x), model(x))
    patched.train()
    assert all(m.training for m in patched.modules())


# -- size arguments: the patched model takes any size the original takes --------------------------------
class _TokenBlock(nn.Module):
    """A block of a pyramid transformer: tokens in, the map's size as arguments (PVT, Twins, SegFormer)."""

    def __init__(self, c, decide=False):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)
        self.fc = nn.Linear(c, c)
        self.decide = decide

    def forward(self, x, size, width):
        h, w = size
        if self.decide and h % 2:  # a decision on the size: traced for the size it was called with
            h = h
        b, n, c = x.shape
        y = self.conv(x.transpose(1, 2).reshape(b, c, h, width)).flatten(2).transpose(1, 2)
        return x + self.fc(y)


class _Pyramid(nn.Module):
    def __init__(self, decide=False):
        super().__init__()
        self.embed = nn.Conv2d(3, 8, 4, stride=4)
        self.blocks = nn.ModuleList([_TokenBlock(8, decide), _TokenBlock(8, decide)])
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        x = self.embed(x)
        size = tuple(x.shape[2:])
        x = x.flatten(2).transpose(1, 2)
        for blk in self.blocks:
            x = blk(x, size, width=size[1])
        return self.head(x.mean(1))


def test_size_arguments_are_graph_inputs_so_the_patched_model_takes_any_size():
    """Blocks called with the map's size (`blk(x, (H, W), width=W)`) are rewritten for any size: the sizes are
    graph inputs, not the example's constants; a call with another kind of size fails naming it."""
    model = _Pyramid().eval()
    patched = surgeon.add(model, "se", kind="residual", input_size=(3, 32, 32))
    assert all(rewritten(b) is not None and "expect_size" in rewritten(b) for b in patched.blocks)
    for shape in [(3, 3, 48, 24), (1, 3, 16, 64)]:
        x = _x(*shape)
        with torch.no_grad():
            assert torch.equal(patched(x), model(x)), shape
        patched.train(), model.train()
        assert torch.equal(patched(x), model(x)), shape
        patched.eval(), model.eval()
    x8 = _x(2, 8 * 6, 8)
    with pytest.raises(surgeon.errors.CallError, match=r"with size a tuple of 2 ints, and was called with "
                                                       r"size=\[6, 8\]"):
        patched.blocks[0](x8, [6, 8], 8)
    assert patched.blocks[0](x8, (6, 8), 8).shape == x8.shape


def test_a_decision_on_a_size_is_guarded_where_the_other_way_would_compute_something_else():
    """Code that decides on a size (`if h % 2:`) is traced for the way its example took; the rewritten forward
    runs wherever the decision goes that way, and fails naming the line where it would go the other."""
    model = _Pyramid(decide=True).eval()
    patched = surgeon.add(model, "se", kind="residual", input_size=(3, 32, 32))
    for shape in [(2, 3, 32, 32), (1, 3, 48, 24)]:  # h = 8 and 12: even, as traced
        x = _x(*shape)
        with torch.no_grad():
            assert torch.equal(patched(x), model(x))
    with pytest.raises(surgeon.errors.CallError, match=r"on which `if self.decide and h % 2:.*` \(test_scope.py:\d+\) "
                                                       r"is False, and on this call it is True"):
        patched(_x(2, 3, 36, 24))  # h = 9


def test_timm_pvt_v2_patched_runs_at_other_sizes_and_after_save_and_load(tmp_path):
    model = timm.create_model("pvt_v2_b0", num_classes=4).eval()
    patched = surgeon.add(model, "se", input_size=(3, 64, 64))
    surgeon.save(patched, tmp_path / "out")
    loaded = surgeon.load(tmp_path / "out")
    x = _x(1, 3, 96, 64)
    with torch.no_grad():
        want = model(x)
        assert torch.equal(patched(x), want) and torch.equal(loaded(x), want)


# -- object and packed arguments -------------------------------------------------------------------------
class _Cache:
    """An object a model hands to its blocks (a key/value cache): they call its methods."""

    def __init__(self):
        self.seen = []

    def note(self, x):
        self.seen.append(x.shape[1])
        return x


class _UsesCache(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 8)

    def forward(self, x, cache, pair):
        if isinstance(cache, _Cache):  # the branch the real object takes, also while tracing
            x = cache.note(x)
        a, b = pair
        return x + self.fc(x * a + b)


class _CacheNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList([_UsesCache(), _UsesCache()])

    def forward(self, x):
        cache = _Cache()
        pair = (torch.ones_like(x), torch.zeros_like(x))
        for blk in self.blocks:
            x = blk(x, cache, pair)
        return x.mean(1), cache


def test_object_and_packed_arguments_are_graph_inputs_checked_at_every_call():
    model = _CacheNet().eval()
    x = _x(2, 5, 8)
    patched = surgeon.add(model, "se", kind="residual", example_input=x)
    blk = patched.blocks[0]
    assert rewritten(blk) is not None and "cache.note" in rewritten(blk)
    with torch.no_grad():
        (got, cache), (want, _) = patched(x), model(x)
    assert torch.equal(got, want) and cache.seen == [5, 5]  # the method ran on this call's object
    pair = (torch.ones_like(x), torch.zeros_like(x))
    with pytest.raises(surgeon.errors.CallError, match=r"for calls with cache a _Cache, and was called with "
                                                       r"cache=None"):
        blk(x, None, pair)
    with pytest.raises(surgeon.errors.CallError, match=r"for calls with pair a tuple of 2 items"):
        blk(x, _Cache(), pair[:1])


class _MaskedBlock(nn.Module):
    """A residual block adding a buffer reshaped in its forward (Swin V2's window mask): tracing computes the
    reshape once and stores the result on the graph's module."""

    def __init__(self, c: int = 8):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)
        self.register_buffer("bias_map", torch.randn(c * 4 * 4), persistent=False)

    def forward(self, x):
        return x + self.conv(x) + self.bias_map.view(1, -1, 4, 4)


class _Masked(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.blocks = nn.Sequential(_MaskedBlock(), _MaskedBlock())

    def forward(self, x):
        return self.blocks(self.stem(x))


def test_what_tracing_computed_from_a_buffer_moves_with_the_patched_model():
    """The reshaped buffer a rewritten forward reads is a buffer of the rewritten module, outside the state dict:
    `.to()` moves it as it moves the buffer it came from (the meta device stands in for a GPU here), and `.double()`
    converts it."""
    torch.manual_seed(0)
    model = _Masked().eval()
    patched = surgeon.add(model, "se", input_size=(3, 4, 4))
    assert [e.owner for e in surgeon.edits(patched)] == ["blocks.0", "blocks.1"]
    assert set(patched.state_dict()) - set(model.state_dict()) == {
        k for k in patched.state_dict() if ".se." in k}
    x = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    want = copy.deepcopy(model).double()(x)
    got = copy.deepcopy(patched).double()(x)
    assert got.dtype == torch.float64 and torch.equal(want, got)
    on_meta = copy.deepcopy(patched).to("meta")
    assert on_meta(torch.randn(2, 3, 4, 4, device="meta")).shape == (2, 8, 4, 4)


# -- a module traced as a graph of its own, inside an owner ----------------------------------------------------
class _DroppingLayer(nn.Module):
    """Reads its training flag (functional dropouts) and holds a module of the model's own: a graph of its own."""

    def __init__(self, d):
        super().__init__()
        self.attn, self.fc = nn.Sequential(nn.Linear(d, d)), nn.Linear(d, d)

    def forward(self, x):
        x = x + F.dropout(self.attn(x), 0.1, training=self.training)
        return x + F.dropout(self.fc(x), 0.1, training=self.training)


class _LayerDropEncoder(nn.Module):
    """FSMT's and BART's encoders: embeddings added in the encoder itself, and layer drop that reads the flag."""

    def __init__(self, d=16, layerdrop=0.0):
        super().__init__()
        self.embed, self.positions = nn.Embedding(50, d), nn.Parameter(torch.randn(8, d))
        self.layers = nn.ModuleList([_DroppingLayer(d), _DroppingLayer(d)])
        self.layerdrop = layerdrop
        self.head = nn.Linear(d, 3)

    def forward(self, ids):
        x = self.embed(ids) * 4.0 + F.embedding(ids.ne(0).long().cumsum(1) % 8, self.positions)
        for layer in self.layers:
            if self.training and self.layerdrop > 0.0 and torch.rand([]) < self.layerdrop:
                continue
            x = layer(x)
        return self.head(x)


def test_an_owner_around_a_rewritten_module_with_a_graph_of_its_own_keeps_it_one_call():
    """The layers, graphs of their own, are single calls in the encoder's graph (their training flag). Rewritten
    first (innermost first), their new forwards read no flag, and the encoder traced alone (for its own embedding
    site) traced through them: "'encoder' cannot be rewritten" (FSMT for one)."""
    torch.manual_seed(0)
    model = nn.Sequential(_LayerDropEncoder()).eval()
    ids = torch.randint(1, 50, (2, 6))
    patched = surgeon.add(model, "se", example_input=(ids,))
    assert sorted(e.owner for e in surgeon.edits(patched)) == ["0", "0.layers.0", "0.layers.0", "0.layers.1",
                                                               "0.layers.1"]
    with torch.no_grad():
        assert torch.equal(patched(ids), model(ids))
    patched.train(), model.train()
    torch.manual_seed(1)
    want = model(ids)
    torch.manual_seed(1)
    assert torch.equal(patched(ids), want)
