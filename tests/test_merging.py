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
