"""Published ResNet-50 figures of the attentions, each asserted by tests/test_figures.py.

Torch-free (`surgeon list` reads it). `added` is the parameter count the attention adds to ResNet-50 as its
paper places it; `total_m` the paper's total in millions where that is what it prints. `derived` says how
the exact count was obtained when the paper prints only a rounded total.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Figure:
    added: int
    source: str
    total_m: float | None = None
    derived: str = ""


R50_FIGURES: dict[str, Figure] = {
    "eca": Figure(80, "ECA-Net abstract: 80 parameters vs 24.37M (k = 3, 5, 5, 7 per stage, official README)"),
    "simam": Figure(0, "SimAM title and abstract: parameter-free"),
    "ge": Figure(0, "Gather-Excite Sec. 3: GE-θ⁻ is parameter-free"),
    "adl": Figure(0, "ADL (Choe & Shim, CVPR 2019) Sec. 3: no parameters"),
    "sa": Figure(708, "SA-Net official README: sa_resnet50 25.56M", total_m=25.56,
                 derived="3C/G per block (G = 64) on the 16 bottleneck outputs, official sa_resnet.py"),
    "srm": Figure(60_416, "SRM (Lee et al., ICCV 2019): SRM-ResNet-50 25.62M", total_m=25.62,
                  derived="4C per block: channel-wise FC (2C) + BN (2C)"),
    "fca": Figure(2_514_944, "FcaNet (Qin et al., ICCV 2021): FcaNet-50 28.07M", total_m=28.07,
                  derived="SE's two FC layers without biases, r = 16; DCT bases are buffers"),
}
