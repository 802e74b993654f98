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
    _check_rows(result, 3)
    learned, random, whole = (r["mflops"] for r in result["rows"].values())
    assert learned == random < whole  # 2 glimpses of 3×16×16 cost less than resnet10t on the 40×40 canvas


@pytest.mark.parametrize("flag, value", [("--glimpses", "1"), ("--scales", "0"), ("--glimpse-size", "0")])
def test_ram_example_rejects_bad_settings(flag, value, capsys):
    with pytest.raises(SystemExit) as exit_:
        _example("ram_digits").main([flag, value])
    assert exit_.value.code == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.endswith(f"error: {flag} must be at least {int(value) + 1}, got {value}")


def test_ram_loss_credits_each_location_with_the_next_glimpses_gain():
    """d loss / d log π(l_t) = −(log p_{t+1}(y) − log p_t(y)) / N: the location chosen after glimpse t is
    rewarded by what glimpse t+1 (taken there) adds to the right class's log-probability."""
    ram_digits = _example("ram_digits")
    y = torch.tensor([3, 5])
    logits = torch.zeros(2, 3, 10)  # 2 canvases, 3 glimpses
    logits[0, 1, 3] = 2.0  # canvas 0: the 2nd glimpse raises log p(3), the 3rd loses it again
    logits[1, 2, 5] = -2.0  # canvas 1: the 2nd glimpse changes nothing, the 3rd lowers log p(5)
    logp = torch.zeros(2, 2, requires_grad=True)
    loss = ram_digits.ram_loss(lambda x, *, sample: (logits, logp), None, y)
    loss.backward()
    right = torch.log_softmax(logits, 2)[torch.arange(2), :, y]  # (2, 3)
    assert torch.allclose(loss, -right.mean())  # at logp = 0 only the cross-entropy after every glimpse is left
    assert torch.allclose(logp.grad, -(right[:, 1:] - right[:, :-1]) / 2)
    assert logp.grad[0, 0] < 0 < logp.grad[0, 1] and logp.grad[1, 0] == 0 < logp.grad[1, 1]


def test_ram_random_locations_ignore_the_policy():
    ram_digits = _example("ram_digits")
    torch.manual_seed(0)
    encoder = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(2 * 8 * 8, 16))
    ram = ram_digits.RAM(encoder, features=16, hidden=32, glimpse_size=8, scales=2, glimpses=3).eval()
    x = torch.rand(4, 1, 40, 40)
    with torch.no_grad():
        a, b = (ram(x, random=torch.Generator().manual_seed(1)) for _ in range(2))
        other = ram(x, random=torch.Generator().manual_seed(2))
        policy = ram(x)
        torch.nn.init.normal_(ram.locate.weight)  # another policy: random locations stay where they were
        again = ram(x, random=torch.Generator().manual_seed(1))
        moved = ram(x)
    assert torch.equal(a, b) and torch.equal(a, again) and not torch.allclose(a, other)
    assert not torch.allclose(policy, moved)


@pytest.mark.slow
def test_pan_example_tiny():
    result = _example("pan_segmentation").main(["--epochs", "1", "--budget", "1", "--limit", "16", "--json"])
    assert result["identity_max_diff"] <= 1e-5
    assert [s.split(" ")[1] for s in result["sites"]] == ["(fpa)", "(gau)", "(gau)"]
    _check_rows(result, 3)
