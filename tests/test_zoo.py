"""Identity init across model families: every built-in attention at its default kind.

The full sweep (the issue's zoo at 224×224) is marked slow (`make test-slow`); a fast sample at a small
input size runs by default.
"""
import pytest
import timm
import torch
import torchvision

import surgeon
from conftest import perturb_bn

BUILTIN = ["se", "eca", "cbam", "bam", "spatial", "attnpool"]
ZOO = ["timm:resnet18", "timm:resnet50", "timm:convnext_tiny", "timm:efficientnet_b0", "timm:mobilenetv3_small_100",
       "timm:densenet121", "timm:regnety_002", "tv:resnet50", "tv:mobilenet_v3_small"]
FAST = ["timm:resnet18", "timm:mobilenetv3_small_100", "tv:mobilenet_v3_small", "timm:regnety_002"]


def build(ref):
    source, name = ref.split(":")
    model = timm.create_model(name) if source == "timm" else torchvision.models.get_model(name)
    return perturb_bn(model).eval()


def check(ref, attention, size):
    torch.manual_seed(0)
    model = build(ref)
    x = torch.randn(2, 3, size, size)
    plan = surgeon.plan(model, attention, example_input=x)
    patched = plan.apply()
    v = plan.verification
    assert v.max_abs_diff <= 1e-5, (ref, attention, v.max_abs_diff)
    assert v.new_params > 0 and v.with_grad == v.new_params
    assert v.nonzero_grad >= 1
    assert set(model.state_dict()) <= set(patched.state_dict())


@pytest.mark.parametrize("attention", BUILTIN)
@pytest.mark.parametrize("ref", FAST)
def test_identity_init_fast_sample(ref, attention):
    check(ref, attention, 64)


@pytest.mark.slow
@pytest.mark.parametrize("attention", BUILTIN)
@pytest.mark.parametrize("ref", ZOO)
def test_identity_init_zoo(ref, attention):
    check(ref, attention, 224)
