"""The worked examples of issue 16 on a tiny setting: cluttered digits, Dynamic Capacity Networks, the recurrent
attention model, PAN's attentions in a U-Net. Each runs end to end and reports its numbers; the full runs
(minutes) are `python examples/NAME.py`."""
import importlib
import sys
from pathlib import Path

import pytest
import torch

EXAMPLES = Path(__file__).parent.parent / "examples"
sys.path.insert(0, str(EXAMPLES))


def _example(name):
    return importlib.import_module(name)


def test_cluttered_digits_canvases():
    cluttered = _example("cluttered_digits").cluttered
    d = cluttered("test", size=40, clutter=3, copies=2, limit=5)
    assert d["images"].shape == (10, 1, 40, 40) and d["labels"].tolist() == d["labels"][:5].tolist() * 2
    for img, mask, label, (y, x) in zip(d["images"], d["masks"], d["labels"], d["boxes"]):
        assert set(mask.unique().tolist()) == {0, label.item() + 1}  # background and the digit's class + 1
        ys, xs = (mask > 0).nonzero(as_tuple=True)
        assert ys.min() >= y and ys.max() < y + 16 and xs.min() >= x and xs.max() < x + 16
        assert img[0][mask > 0].min() > 0.25  # the mask marks the digit's strokes
        assert (img[0] > 0).sum() > (mask > 0).sum()  # clutter outside the digit
    again = cluttered("test", size=40, clutter=3, copies=2, limit=5)
    assert torch.equal(d["images"], again["images"])  # fixed seed: the same canvases every run


def _check_rows(result, n_rows):
    assert len(result["rows"]) == n_rows
    for row in result["rows"].values():
        assert 0.0 <= row["accuracy" if "accuracy" in row else "miou"] <= 1.0 and row["mflops"] > 0


def test_dcn_example_tiny():
    result = _example("dcn_digits").main(["--epochs", "1", "--limit", "20", "--k", "2", "--train-cells", "4",
                                          "--json"])
    _check_rows(result, 4)
    flops = [r["mflops"] for r in result["rows"].values()]
    # the fine network on 2 of 25 cells costs less than on all of them, more than the coarse network alone
    assert flops[0] < flops[2] == flops[3] < flops[1]


def test_ram_example_tiny():
    result = _example("ram_digits").main(["--epochs", "1", "--limit", "20", "--glimpses", "2", "--json"])
    _check_rows(result, 2)


@pytest.mark.slow
def test_pan_example_tiny():
    result = _example("pan_segmentation").main(["--epochs", "1", "--budget", "1", "--limit", "16", "--json"])
    assert result["identity_max_diff"] <= 1e-5
    assert [s.split(" ")[1] for s in result["sites"]] == ["(fpa)", "(gau)", "(gau)"]
    _check_rows(result, 3)
