"""Patch a torchvision ResNet and a small model of your own through the Python API, and show what changed.

Run: .venv/bin/python examples/patch_models.py
"""
import torch
import torchvision
from rich.console import Console
from torch import nn

import surgeon
from surgeon.surgery.owned import rewritten

console = Console(width=120)

# 1. A torchvision model: CBAM on every residual branch, identity at init.
resnet = torchvision.models.resnet50().eval()
plan = surgeon.plan(resnet, "cbam")
console.print(plan.table())
patched = plan.apply()
v = plan.verification
console.print(f"torchvision resnet50 + cbam: max |diff| = {v.max_abs_diff:.2g}, "
              f"+{v.params_added:,} params, +{v.flops_added / 1e6:.1f} MFLOPs per image\n")


# 2. A model you wrote yourself: any nn.Module works, no registration needed.
class SmallNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
            nn.Conv2d(32, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(),
            nn.Conv2d(64, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(), nn.MaxPool2d(2),
        )
        self.head = nn.Linear(64, 10)

    def forward(self, x):
        return self.head(self.features(x).mean((2, 3)))


net = SmallNet().eval()
x = torch.randn(4, 3, 32, 32)
for s in surgeon.sites(net, example_input=x):
    console.print(f"  site {s.name:<14} {s.kind:<11} {s.describe_shape()}")
net2 = surgeon.add(net, "eca", kind="after_conv", example_input=x)     # ECA after every conv block
net3 = surgeon.add(net2, "attnpool", example_input=x)                  # attention pooling for the pools
edits = surgeon.edits(net3)
console.print(f"\nSmallNet: {len(edits)} edits; same output at init: "
              f"{torch.allclose(net(x), net3(x), atol=1e-6)}; still a {type(net3).__name__}")
console.print("inserted modules:", ", ".join(e.module for e in edits))
owner = edits[0].owner
console.print(f"\nThe rewritten forward of {owner or type(net3).__name__!r} (torch.fx):")
print("\n".join(rewritten(net3.get_submodule(owner)).strip().splitlines()[-14:]))
