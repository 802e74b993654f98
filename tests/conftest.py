import os
import sys
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))  # tests/toy_models.py as `toy_models` is importable for factory references

torch.set_num_threads(2)
os.environ.setdefault("SURGEON_LOAD_PLUGINS", "")  # no third-party plugins leak into the tests


def pytest_configure(config):
    # `surgeon list` caches its ResNet-50 counts: in pytest's cache (kept between runs), never the user's
    cache = getattr(config, "cache", None)
    if cache is not None:
        os.environ.setdefault("SURGEON_CACHE_DIR", str(cache.mkdir("surgeon")))


@pytest.fixture
def x32():
    return torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))


def perturb_bn(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Give batch norms non-trivial statistics, as a trained network has (timm zero-inits some)."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            with torch.no_grad():
                if m.weight is not None:
                    m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
                    m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)
                if m.running_var is not None:
                    m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.1)
                    m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
    return model
