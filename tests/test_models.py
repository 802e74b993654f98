"""Model references and weight files."""
import pickle

import pytest
import torch
from safetensors.torch import save_file

from surgeon import models
from surgeon.errors import ModelError, UnknownNameError, WeightsError
from toy_models import TinyResNet


def test_timm_torchvision_and_factory_references():
    assert type(models.load("resnet18")).__name__ == "ResNet"
    assert type(models.load("timm:resnet18")).__module__.startswith("timm")
    assert type(models.load("tv:resnet18")).__module__.startswith("torchvision")
    assert type(models.load("torchvision:resnet18")).__module__.startswith("torchvision")
    m = models.load("toy_models:tiny_resnet", model_args={"num_classes": 3})
    assert m.fc.out_features == 3 and not m.training


def test_file_factory_reference(tmp_path):
    f = tmp_path / "mynet.py"
    f.write_text("import torch\ndef build(width=4):\n    return torch.nn.Conv2d(3, width, 3)\n")
    assert models.load(f"{f}:build", model_args={"width": 5}).out_channels == 5


def test_model_args_reach_the_constructor():
    assert models.load("resnet18", model_args={"num_classes": 7}).fc.out_features == 7


@pytest.mark.parametrize("ref,message", [
    ("resnet5O", "Unknown timm model 'resnet5O'. Did you mean 'resnet50'"),
    ("tv:resnet5O", "Unknown tv model 'resnet5O'. Did you mean 'resnet50'"),
    ("tvv:resnet50", "Unknown model source 'tvv'. Did you mean 'tv'"),
])
def test_unknown_names(ref, message):
    with pytest.raises(UnknownNameError, match=message):
        models.load(ref)


def test_factory_errors():
    with pytest.raises(ModelError, match="has no 'tiny_resnte'. Did you mean 'tiny_resnet'"):
        models.load("toy_models:tiny_resnte")
    with pytest.raises(ModelError, match="rejected its arguments"):
        models.load("toy_models:tiny_resnet", model_args={"bogus": 1})


def test_pretrained_without_hub_is_explained(monkeypatch):
    import timm

    def offline(*args, **kwargs):
        raise OSError("We couldn't connect to the hub")

    monkeypatch.setattr(timm, "create_model", offline)
    with pytest.raises(ModelError, match="Could not get pretrained weights for 'resnet18'.*--weights FILE"):
        models.load("resnet18", pretrained=True)


@pytest.fixture
def trained(tmp_path):
    torch.manual_seed(1)
    return TinyResNet(num_classes=3).eval()


def _same(a, b):
    return all(torch.equal(x, b.state_dict()[k]) for k, x in a.state_dict().items())


@pytest.mark.parametrize("layout", ["plain", "state_dict", "model", "module_prefix"])
def test_weights_files_in_common_layouts(tmp_path, trained, layout):
    sd = trained.state_dict()
    obj = {"plain": sd, "state_dict": {"state_dict": sd, "epoch": 3}, "model": {"model": sd},
           "module_prefix": {"module." + k: v for k, v in sd.items()}}[layout]
    path = tmp_path / "ckpt.pth"
    torch.save(obj, path)
    fresh = models.load("toy_models:tiny_resnet", model_args={"num_classes": 3}, weights=path)
    assert _same(fresh, trained)


def test_safetensors_weights(tmp_path, trained):
    path = tmp_path / "w.safetensors"
    save_file(trained.state_dict(), str(path))
    assert _same(models.load("toy_models:tiny_resnet", model_args={"num_classes": 3}, weights=path), trained)


def test_mismatched_weights(tmp_path, trained):
    path = tmp_path / "w.safetensors"
    save_file(trained.state_dict(), str(path))
    with pytest.raises(WeightsError, match="do not fit ResNet: .*missing.*unexpected"):
        models.load("resnet18", weights=path)
    with pytest.raises(WeightsError, match="of another shape.*num_classes"):
        models.load("toy_models:tiny_resnet", weights=path)  # 10 classes vs 3


def test_unreadable_weights(tmp_path):
    bad = tmp_path / "w.safetensors"
    bad.write_bytes(b"not a safetensors file")
    with pytest.raises(WeightsError, match="Cannot read safetensors file"):
        models.read_state_dict(bad)
    with pytest.raises(WeightsError, match="does not exist"):
        models.read_state_dict(tmp_path / "missing.pt")


class Evil:
    def __reduce__(self):
        return (print, ("this ran code",))


def test_full_unpickle_is_refused_by_default(tmp_path):
    path = tmp_path / "evil.pt"
    with open(path, "wb") as f:
        pickle.dump({"weights": Evil()}, f)
    with pytest.raises(WeightsError, match="needs full unpickling.*--allow-pickle"):
        models.read_state_dict(path)


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.bool, torch.uint8])
def test_weights_of_integer_or_bool_type_are_refused(tmp_path, dtype):
    sd = {k: v.to(dtype) if v.is_floating_point() else v for k, v in TinyResNet().state_dict().items()}
    save_file(sd, str(tmp_path / "w.safetensors"))
    model = TinyResNet()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(WeightsError, match=rf"tensors of another type .*{str(dtype)[6:]} vs float32"):
        models.load_weights(model, tmp_path / "w.safetensors")
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # nothing loaded


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_float_weights_of_another_precision_load_with_a_log_line(tmp_path, caplog, dtype):
    trained = TinyResNet()
    save_file({k: v.to(dtype) if v.is_floating_point() else v for k, v in trained.state_dict().items()},
              str(tmp_path / "w.safetensors"))
    model = TinyResNet()
    with caplog.at_level("INFO", logger="surgeon"):
        models.load_weights(model, tmp_path / "w.safetensors")
    assert f"{str(dtype)[6:]} tensors converted to the model's float32" in caplog.text
    assert torch.allclose(model.fc.weight, trained.fc.weight, atol=1e-2)
