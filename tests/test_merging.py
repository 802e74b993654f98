"""surgeon.merge (surgeon/merging.py): after training steps the merged model computes what the unmerged one
does, gates at γ = 1 are dropped bit for bit, additive branches take γ into their last layer, merged models
save, load and export, and `surgeon merge DIR --out DIR2` on the command line."""
import copy
import json

import pytest
import torch
from click.testing import CliRunner

import surgeon
from conftest import perturb_bn
from seq_models import Tagger
from surgeon.cli import cli
from surgeon.layers.gate import ZeroGate
from surgeon.merging import bn_pairs
from toy_models import TinyResNet

ATTENTIONS = [("se", {}), ("cbam", {}), ("bam", {}), ("triplet", {}), ("scse", {}), ("scse", {"fusion": "mul"}),
              ("coord", {}), ("sk", {"groups": 1}), ("danet", {}), ("ccnet", {}), ("ema", {}),
              ("gc", {"fusion": "mul"})]
FOLDED = {"danet", "ccnet", "ema"}  # additive branches ending in an affine layer


def _x(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _gates(model):
    return [m for m in model.modules() if isinstance(m, ZeroGate) and m.gamma is not None]


def _train(model, x, steps=3):
    """A few SGD steps on a random target: every γ moves away from 0."""
    torch.manual_seed(0)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    model.train()
    for _ in range(steps):
        opt.zero_grad()
        (model(x) - 1).square().mean().backward()
        opt.step()
    return model.eval()


@pytest.fixture(scope="module")
def base():
    torch.manual_seed(0)
    return perturb_bn(TinyResNet()).eval()


@pytest.mark.parametrize("name,kw", ATTENTIONS, ids=[n + "".join(f"-{v}" for v in kw.values()) for n, kw in ATTENTIONS])
def test_merged_model_computes_the_same_after_training_steps(base, name, kw):
    x = _x(4, 3, 32, 32)
    patched = _train(surgeon.add(copy.deepcopy(base), name, example_input=x, verify=False, **kw), x)
    assert all(float(g.gamma.detach().abs().min()) > 0 for g in _gates(patched))
    before = patched(x).detach()
    plan = surgeon.merge_plan(patched)
    merged = surgeon.merge(patched)
    with torch.no_grad():
        assert (merged(x) - patched(x)).abs().max() <= 1e-5
        assert torch.equal(patched(x), before)  # the model itself is unchanged
    actions = {f.action for f in plan}
    assert actions == ({"folded", "kept"} if name == "danet" else {"folded"} if name in FOLDED else {"kept"})
    assert len(_gates(merged)) == sum(f.action == "kept" for f in plan)
    assert surgeon.record.merged(merged) == [f.gate for f in plan if f.action != "kept"]


def test_gamma_one_is_dropped_bit_for_bit_and_the_result_is_the_paper_module(base):
    x = _x(2, 3, 32, 32)
    patched = surgeon.add(base, "cbam", example_input=x, verify=False)
    paper = surgeon.add(base, "cbam", init="paper", example_input=x, verify=False)
    paper.load_state_dict({k: v for k, v in patched.state_dict().items() if not k.endswith("gamma")})
    with torch.no_grad():
        for g in _gates(patched):
            g.gamma.fill_(1.0)
    merged = surgeon.merge(patched)
    assert {f.action for f in surgeon.merge_plan(patched)} == {"dropped"}
    assert not [k for k in merged.state_dict() if k.endswith("gamma")] and not _gates(merged)
    with torch.no_grad():
        assert torch.equal(merged(x), patched(x)) and torch.equal(merged(x), paper(x))


def test_at_init_nothing_is_merged_and_identity_still_holds(base):
    x = _x(2, 3, 32, 32)
    merged = surgeon.merge(surgeon.add(base, "se", example_input=x, verify=False))
    assert {f.action for f in surgeon.merge_plan(merged)} == {"kept"} and surgeon.record.merged(merged) == []
    with torch.no_grad():
        assert torch.equal(merged(x), base(x))


def test_token_attention_branch_takes_gamma_into_its_projection():
    torch.manual_seed(0)
    model = Tagger().eval()
    x = torch.randint(1, 40, (2, 12), generator=torch.Generator().manual_seed(0))
    patched = surgeon.add(model, "mhsa", kind="tokens", example_input=x, verify=False, heads=2)
    with torch.no_grad():
        for g in _gates(patched):
            g.gamma.fill_(0.3)
        merged = surgeon.merge(patched)
        assert [f.action for f in surgeon.merge_plan(patched)] == ["folded"]
        assert (merged(x) - patched(x)).abs().max() <= 1e-6 and not _gates(merged)


def test_merged_model_saves_loads_and_exports(base, tmp_path):
    x = _x(4, 3, 32, 32)
    patched = _train(surgeon.add(copy.deepcopy(base), "danet", example_input=x, verify=False), x)
    merged = surgeon.merge(patched)
    surgeon.save(merged, tmp_path / "m")
    recipe = json.loads((tmp_path / "m" / "recipe.json").read_text())
    assert recipe["merged"] == surgeon.record.merged(merged) and recipe["merged"]
    loaded = surgeon.load(tmp_path / "m", base=base)
    with torch.no_grad():
        assert torch.equal(loaded(x), merged(x))
    # an export is of the merged form: only the gates merge keeps are in it
    result = surgeon.export_model(patched, "exported", tmp_path / "u.pt2")
    gammas = [k for k in torch.export.load(str(result.path)).state_dict if k.endswith("gamma")]
    assert len(gammas) == sum(f.action == "kept" for f in surgeon.merge_plan(patched)) < len(_gates(patched))


# -- the command line ------------------------------------------------------------------------------------
runner = CliRunner()


def test_cli_merge_writes_the_merged_model_and_a_table(base, tmp_path):
    x = _x(4, 3, 32, 32)
    patched = surgeon.add("toy_models:tiny_resnet", "se", example_input=x, verify=False).eval()
    with torch.no_grad():
        gates = _gates(patched)
        gates[0].gamma.fill_(1.0)
        for g in gates[1:]:
            g.gamma.fill_(0.5)
    surgeon.save(patched, tmp_path / "ft")
    result = runner.invoke(cli, ["merge", str(tmp_path / "ft"), "--out", str(tmp_path / "merged"), "--trust-code"])
    assert result.exit_code == 0, result.output
    assert f"{len(gates)} gates: 1 merged, {len(gates) - 1} kept" in result.output and "dropped" in result.output
    loaded = surgeon.load(tmp_path / "merged", trust_code=True)
    with torch.no_grad():
        assert torch.equal(loaded(x), patched(x))
    assert len(_gates(loaded)) == len(gates) - 1
    as_json = runner.invoke(cli, ["merge", str(tmp_path / "ft"), "--out", str(tmp_path / "merged"), "--force",
                                  "--trust-code", "--json"])
    assert as_json.exit_code == 0
    assert [g["action"] for g in json.loads(as_json.output)["gates"]].count("dropped") == 1


def test_cli_merge_errors_are_one_line(tmp_path):
    assert runner.invoke(cli, ["merge", "--help"]).exit_code == 0
    missing = runner.invoke(cli, ["merge", str(tmp_path / "nope"), "--out", str(tmp_path / "o")])
    assert missing.exit_code == 2 and missing.stderr.startswith("Error: ") and len(missing.stderr.splitlines()) == 1
    no_out = runner.invoke(cli, ["merge", str(tmp_path)])
    assert no_out.exit_code == 2 and "--out" in no_out.stderr


# -- BatchNorm folding (deployment) ---------------------------------------------------------------------
class ConvUsedTwice(torch.nn.Module):
    """conv → bn, and the conv's output also added back: that BN cannot fold."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 3, 3, padding=1)
        self.bn = torch.nn.BatchNorm2d(3)
        self.conv2 = torch.nn.Conv2d(3, 4, 3, padding=1)
        self.bn2 = BatchNormRelu(4)

    def forward(self, x):
        y = self.conv(x)
        return self.bn2(self.conv2(self.bn(y) + y))


class BatchNormRelu(torch.nn.BatchNorm2d):
    """A BatchNorm subclass that computes more (as timm's BatchNormAct2d): not folded."""

    def forward(self, x):
        return super().forward(x).relu()


def test_fold_bn_folds_every_conv_bn_pair_and_computes_the_same(base):
    x = _x(4, 3, 32, 32)
    patched = _train(surgeon.add(copy.deepcopy(base), "se", example_input=x, verify=False), x)
    merged = surgeon.merge(patched, fold_bn=True)
    pairs = surgeon.record.folded_bn(merged)
    # stem 1, six blocks x 2, two downsampling shortcuts
    assert len(pairs) == 15 and ["stage2.0.conv1", "stage2.0.bn1"] in pairs and ["stem.0", "stem.1"] in pairs
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in merged.modules())
    assert all(merged.get_submodule(c).bias is not None for c, _ in pairs)
    with torch.no_grad():
        assert (merged(x) - patched(x)).abs().max() <= 1e-5
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in patched.modules())  # the model itself unchanged


class CalledTwice(torch.nn.Module):
    """One conv → bn pair applied twice: folding the BN would still be right, but the conv is shared."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 3, 3, padding=1)
        self.bn = torch.nn.BatchNorm2d(3)

    def forward(self, x):
        return self.bn(self.conv(self.bn(self.conv(x))))


@pytest.mark.parametrize("cls", [ConvUsedTwice, CalledTwice])
def test_fold_bn_leaves_what_cannot_fold(cls):
    """A conv output used twice, a BatchNorm subclass that computes more, modules called twice: unfolded."""
    torch.manual_seed(0)
    model = perturb_bn(cls()).eval()
    assert bn_pairs(model) == []
    x = _x(2, 3, 8, 8)
    merged = surgeon.merge(model, fold_bn=True)
    with torch.no_grad():
        assert torch.equal(merged(x), model(x))


def test_fold_bn_saves_and_loads(base, tmp_path):
    x = _x(4, 3, 32, 32)
    patched = surgeon.add(base, "cbam", example_input=x, verify=False)
    with torch.no_grad():  # as after fine-tuning the new modules only: the base's weights are the saved base's
        for g in _gates(patched):
            g.gamma.fill_(0.5)
    merged = surgeon.merge(patched, fold_bn=True)
    for adapter in (False, True):  # an adapter holds the folded convolutions too
        surgeon.save(merged, tmp_path / f"m{adapter}", adapter=adapter)
        recipe = json.loads((tmp_path / f"m{adapter}" / "recipe.json").read_text())
        assert recipe["folded_bn"] == surgeon.record.folded_bn(merged)
        loaded = surgeon.load(tmp_path / f"m{adapter}", base=base)
        with torch.no_grad():
            assert torch.equal(loaded(x), merged(x)), f"adapter={adapter}"


def test_cli_merge_fold_bn(base, tmp_path):
    x = _x(4, 3, 32, 32)
    patched = surgeon.add("toy_models:tiny_resnet", "se", example_input=x, verify=False).eval()
    surgeon.save(patched, tmp_path / "ft")
    result = runner.invoke(cli, ["merge", str(tmp_path / "ft"), "--out", str(tmp_path / "merged"), "--trust-code",
                                 "--fold-bn"])
    assert result.exit_code == 0, result.output
    assert "BatchNorm folded into the convolution before it: 15 pairs" in result.output
    loaded = surgeon.load(tmp_path / "merged", trust_code=True)
    with torch.no_grad():
        assert (loaded(x) - patched(x)).abs().max() <= 1e-5
