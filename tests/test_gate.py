"""The zero gate (surgeon/layers/gate.py): identity init of every attention is exact in eval and train mode,
lets gradients reach every new parameter and survives re-initialisation; multiplicative attentions gate
their weights, so identity init does no more work on the feature map than the paper's module; checkpoints
saved with the former output gate still load and compute what they computed."""
import copy
import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import surgeon
from conftest import perturb_bn
from surgeon.layers import (BAM, CBAM, SCSE, SRM, AttentionGate, CoordAttn, EcaModule, FcaModule, GatherExcite,
                            GlobalContext, MultiHeadSelfAttn, SEModule, SpatialAttn, TripletAttention)
from surgeon.layers.gate import GatedResidual, ZeroGate
from surgeon.layers.self_attention import DualAttention
from toy_models import TinyResNet

# every feature-map attention, with the option variants whose gating differs
ATTENTIONS = [("se", {}), ("eca", {}), ("sk", {"groups": 1}), ("ge", {}), ("ge", {"extent": 2}), ("gc", {}),
              ("gc", {"fusion": "mul"}), ("srm", {}), ("fca", {}), ("spatial", {}), ("coord", {}), ("cbam", {}),
              ("bam", {}), ("triplet", {}), ("scse", {}), ("scse", {"fusion": "max"}), ("scse", {"fusion": "mul"}),
              ("adl", {}), ("nl", {}), ("danet", {}), ("ccnet", {}), ("ema", {}), ("stn", {}),
              ("residual_attention", {})]
IDS = [name + "".join(f"-{v}" for v in kw.values()) for name, kw in ATTENTIONS]
# attentions whose gate must not be the output wrapper (their own weights or branch are gated)
OWN_GATE = {"se", "eca", "ge", "ge-2", "gc-mul", "srm", "fca", "spatial", "coord", "cbam", "bam", "triplet", "scse",
            "scse-max", "scse-mul", "ema"}


def _x(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return perturb_bn(TinyResNet()).eval()


def _patched(model, name, kw):
    return surgeon.add(model, name, example_input=_x(2, 3, 32, 32), verify=False, **kw)


@pytest.mark.parametrize("name,kw", ATTENTIONS, ids=IDS)
def test_identity_is_exact_in_eval_and_train_and_gradients_reach_every_new_parameter(model, name, kw):
    x = _x(2, 3, 32, 32)
    patched = _patched(model, name, kw)
    with torch.no_grad():
        assert torch.equal(patched.eval()(x), model.eval()(x))
    if name != "adl":  # ADL drops in training by design (identity_in_train = False)
        torch.manual_seed(1)
        with torch.no_grad():
            want = copy.deepcopy(model).train()(x)
            got = copy.deepcopy(patched).train()(x)
        assert torch.equal(got, want)
    new = [p for e in surgeon.edits(patched) for p in patched.get_submodule(e.module).parameters()]
    grads = torch.autograd.grad(patched.eval()(x).square().sum(), new, allow_unused=True) if new else []
    assert all(g is not None for g in grads)
    gates = [m for e in surgeon.edits(patched) for m in patched.get_submodule(e.module).modules()
             if isinstance(m, ZeroGate) and m.gamma is not None]
    if gates:  # γ gets a gradient at 0: fine-tuning moves it away from the identity
        grads = torch.autograd.grad(patched(x).square().sum(), [g.gamma for g in gates])
        assert all(g.abs().sum() > 0 for g in grads)
    wrapped = any(isinstance(patched.get_submodule(e.module), GatedResidual) for e in surgeon.edits(patched))
    assert wrapped == (name in ("sk", "residual_attention"))
    if "-".join([name, *map(str, kw.values())]) in OWN_GATE:
        assert gates


@pytest.mark.parametrize("name,kw", [a for a, i in zip(ATTENTIONS, IDS) if i in OWN_GATE],
                         ids=[i for i in IDS if i in OWN_GATE])
def test_identity_survives_reinitialisation(model, name, kw):
    x = _x(2, 3, 32, 32)
    base = copy.deepcopy(model)
    patched = _patched(base, name, kw)

    def init_fn(m):
        if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Linear)):
            nn.init.kaiming_normal_(m.weight)
            if m.bias is not None:
                nn.init.normal_(m.bias)

    patched.apply(init_fn)  # the patched model shares the base's tensors: both are re-initialised
    with torch.no_grad():
        assert torch.equal(patched(x), base(x))


@pytest.mark.parametrize("paper", [True, False])
def test_paper_init_has_no_gate(model, paper):
    patched = surgeon.add(model, "cbam", init="paper" if paper else "identity", example_input=_x(2, 3, 32, 32),
                          verify=False)
    gammas = [k for k in patched.state_dict() if k.endswith("gamma")]
    assert (gammas == []) == paper


# -- the work identity init adds on the feature map --------------------------------------------------
class FullMapOps(TorchDispatchMode):
    """Counts the ops that write a tensor of at least `numel` values (views excluded)."""

    def __init__(self, numel: int):
        super().__init__()
        self.numel, self.ops = numel, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if not func.is_view and any(isinstance(t, torch.Tensor) and t.numel() >= self.numel
                                    for t in tree_leaves(out)):
            self.ops.append(str(func.overloadpacket.__name__))
        return out


def _full_map_ops(module: nn.Module, *inputs: torch.Tensor) -> list[str]:
    with torch.no_grad(), FullMapOps(inputs[0].numel()) as counter:
        module.eval()(*inputs)
    return counter.ops


C = 32
LAYERS = [(SEModule, {}), (EcaModule, {}), (GatherExcite, {}), (GatherExcite, {"extent": 2}),
          (GlobalContext, {"fusion": "mul"}), (SRM, {}), (FcaModule, {"feat_size": (9, 11)}), (SpatialAttn, {}),
          (CoordAttn, {}), (CBAM, {}), (BAM, {}), (TripletAttention, {}), (SCSE, {}), (SCSE, {"fusion": "max"})]


@pytest.mark.parametrize("cls,kw", LAYERS, ids=[c.__name__ + "".join(f"-{v}" for v in kw.values()) for c, kw in LAYERS])
def test_multiplicative_identity_does_no_more_work_on_the_map_than_paper(cls, kw):
    x = _x(2, C, 9, 11)
    torch.manual_seed(0)
    paper = cls(C, **kw)
    torch.manual_seed(0)
    identity = cls(C, identity=True, **kw)
    assert identity.state_dict().keys() - paper.state_dict().keys() <= {k for k in identity.state_dict()
                                                                        if k.endswith("gamma")}
    assert len(_full_map_ops(identity, x)) == len(_full_map_ops(paper, x))
    # the former output gate x + γ·(attn(x) − x) costs more passes over the map
    assert len(_full_map_ops(GatedResidual(paper), x)) > len(_full_map_ops(paper, x))


def test_two_input_and_token_gates_do_no_more_work_than_paper():
    x, g = _x(2, C, 16, 16), _x(2, 8, 8, 8, seed=1)
    assert len(_full_map_ops(AttentionGate(C, gating_channels=8, identity=True), x, g)) == \
        len(_full_map_ops(AttentionGate(C, gating_channels=8), x, g))
    t = _x(2, 10, C)
    assert len(_full_map_ops(MultiHeadSelfAttn(C, identity=True), t)) == len(_full_map_ops(MultiHeadSelfAttn(C), t))


@pytest.mark.parametrize("form", ["weights", "add", "mix"])
def test_each_form_is_exact_at_zero_and_ungated_at_one(form):
    w, a = torch.rand(3, 5, 4), _x(3, 5, 4, seed=1)
    gate = ZeroGate()
    call = {"weights": lambda: gate.weights(w), "add": lambda: gate.add(a, w), "mix": lambda: gate.mix(a, w)}[form]
    zero = {"weights": torch.ones_like(w), "add": a, "mix": a}[form]
    one = {"weights": w, "add": a + w, "mix": w}[form]
    assert torch.equal(call(), zero)
    with torch.no_grad():
        gate.gamma.fill_(1.0)
    assert torch.equal(call(), one)
    gate.gamma = None
    assert torch.equal(call(), one)


def test_per_channel_gamma():
    gate = ZeroGate(channels=4)
    x, w = _x(2, 4, 3, 3), torch.rand(2, 4, 1, 1)
    with torch.no_grad():
        gate.gamma.copy_(torch.tensor([0.0, 1.0, 0.5, 2.0]))
    want = 1 + gate.gamma.view(1, 4, 1, 1) * (w - 1)
    assert torch.allclose(gate.weights(w), want) and torch.allclose(gate.mix(x, w.expand_as(x)),
                                                                     x + gate.gamma.view(1, 4, 1, 1) * (w - x))


# -- checkpoints saved with the former output gate ---------------------------------------------------------
def _to_former_layout(folder, gamma: float) -> None:
    """Rewrite a saved cbam model's weights as the former `GatedResidual(CBAM)` wrapper saved them."""
    sd = load_file(str(folder / "model.safetensors"))
    out = {}
    for k, v in sd.items():
        head, sep, tail = k.partition(".cbam.")
        if not sep:
            out[k] = v
        elif not tail.endswith("gamma"):
            out[f"{head}.cbam.attn.{tail}"] = v
    for k in {k.partition(".cbam.")[0] for k in sd if ".cbam." in k}:
        out[f"{k}.cbam.gamma"] = torch.tensor([gamma])
    save_file(out, str(folder / "model.safetensors"))


def test_a_checkpoint_with_the_former_output_gate_loads_and_computes_as_it_did(model, tmp_path):
    x = _x(2, 3, 32, 32)
    patched = _patched(model, "cbam", {})
    surgeon.save(patched, tmp_path / "old")
    _to_former_layout(tmp_path / "old", 0.25)
    loaded = surgeon.load(tmp_path / "old", base=model)  # strict: every saved key fits
    paths = [e.module for e in surgeon.edits(loaded)]
    assert paths and all(isinstance(loaded.get_submodule(p), GatedResidual) for p in paths)
    # the former function, y = x + γ·(cbam(x) − x) with the paper's CBAM inside and γ as saved
    for p in paths:
        wrapper = loaded.get_submodule(p)
        assert wrapper.gamma.item() == 0.25 and isinstance(wrapper.attn, CBAM)
        assert wrapper.attn.channel.gamma is None and wrapper.attn.spatial.gamma is None
    with torch.no_grad():
        assert not torch.allclose(loaded(x), model(x), atol=1e-4)  # γ = 0.25 is in effect
    # saved again, it keeps the former layout and loads once more
    surgeon.save(loaded, tmp_path / "again")
    assert any(k.endswith(".cbam.attn.channel.fc1.weight") for k in load_file(str(tmp_path / "again" /
                                                                                   "model.safetensors")))
    with torch.no_grad():
        assert torch.equal(surgeon.load(tmp_path / "again", base=model)(x), loaded(x))
    assert json.loads((tmp_path / "again" / "recipe.json").read_text())["edits"][0]["init"] == "identity"


def test_gates_take_mixed_dtypes_as_autocast_makes_them():
    gate = ZeroGate()
    a, b = _x(2, 4), _x(2, 4, seed=1).bfloat16()
    with torch.no_grad():
        gate.gamma.fill_(0.5)
    assert gate.mix(a, b).dtype == gate.add(a, b).dtype == torch.float32
    assert gate.weights(b).dtype == torch.bfloat16
    se = SEModule(C, identity=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        se(_x(2, C, 5, 5)).float().sum().backward()
    assert se.gamma.grad is not None


# -- the memory format and torch.compile pass through inserted modules ----------------------------------
_NCHW_OPTIONS = {"sk": {"groups": 1}}
_NO_SITE_HERE = {"attention_gate": "gates U-Net skips; TinyResNet has none (tests/test_scope.py covers smp Unets)",
                 "gau": "U-Net skips too (tests/test_pyramid.py covers the test U-Net and an smp Unet)"}


def test_a_gated_branch_keeps_the_exact_strides_of_its_input_on_1x1_maps():
    # a 1×1 map's strides leave the dims' order open; DANet's branch (token reshapes) lays its result out
    # channels-last there, and a product with it took that layout. The convolution after the module picks its
    # kernel by the strides, so the identity at init was off by rounding (and train-mode batch norm on two
    # values per channel made that 5e-5)
    torch.manual_seed(0)
    x = torch.randn(2, 64, 1, 1)
    conv = nn.Conv2d(64, 64, 1)
    for gamma in (0.0, 0.5):  # at init and after training
        danet = DualAttention(64).eval()
        for m in (danet.position, danet.channel):
            m.gamma.data.fill_(gamma)
        with torch.no_grad():
            out = danet(x)
            mixed = GatedResidual(danet).eval()(x)
        assert out.stride() == x.stride() and mixed.stride() == x.stride()
        if gamma == 0:
            with torch.no_grad():
                assert torch.equal(conv(out), conv(x))
    x = torch.randn(2, 64, 4, 4).to(memory_format=torch.channels_last)  # a real layout is followed too
    with torch.no_grad():
        assert DualAttention(64).eval()(x).stride() == x.stride()


def test_channels_last_stays_channels_last_through_every_inserted_module():
    x = _x(2, 3, 32, 32).to(memory_format=torch.channels_last)
    checked = []
    for att in surgeon.attentions():
        if "nchw" not in att.layouts or att.name in _NO_SITE_HERE:
            continue
        torch.manual_seed(0)
        patched = surgeon.add(TinyResNet(width=16).eval(), att.name, example_input=(x,), init="paper",
                              **_NCHW_OPTIONS.get(att.name, {})).to(memory_format=torch.channels_last)
        outs: dict[str, torch.Tensor] = {}
        for e in surgeon.edits(patched):
            patched.get_submodule(e.module).register_forward_hook(
                lambda m, i, o, name=e.module, outs=outs: outs.__setitem__(name, o))
        with torch.no_grad():
            patched(x)
        maps = {n: o for n, o in outs.items() if isinstance(o, torch.Tensor) and o.dim() == 4}
        assert all(o.is_contiguous(memory_format=torch.channels_last) for o in maps.values()), att.name
        if maps:
            checked.append(att.name)
    # every attention that outputs feature maps here (attnpool outputs pooled vectors)
    assert len(checked) == len([a for a in surgeon.attentions() if "nchw" in a.layouts]) - len(_NO_SITE_HERE) - 1


def test_a_compiled_patched_model_computes_what_eager_does():
    torch.manual_seed(0)
    x = _x(2, 3, 32, 32)
    patched = surgeon.add(TinyResNet(width=16).eval(), "cbam", example_input=(x,), init="paper")
    compiled = torch.compile(patched)
    with torch.no_grad():
        assert (compiled(x) - patched(x)).abs().max() <= 1e-4


def test_mul_own_multiplies_in_place_only_when_nothing_needs_the_map():
    from surgeon.layers.gate import mul_own

    out, w = torch.randn(2, 3, 4, 4), torch.rand(2, 1, 4, 4)
    want = out * w
    with torch.no_grad():
        got = mul_own(out, w)
    assert got is out and torch.equal(got, want)                   # no autograd: into the map itself
    out = torch.randn(2, 3, 4, 4)
    assert mul_own(out, w) is out                                  # autograd on, but nothing requires grad
    w.requires_grad_()
    out = torch.randn(2, 3, 4, 4)
    got = mul_own(out, w)
    assert got is not out and got.grad_fn is not None              # w's gradient needs the map as it was
    with torch.no_grad():
        assert mul_own(out, w) is out
        small = torch.randn(2, 3, 1, 4)
        assert mul_own(small, torch.rand(2, 3, 4, 4)).shape == (2, 3, 4, 4)   # a product larger than the map
        half = torch.randn(2, 3, 4, 4, dtype=torch.bfloat16)
        assert mul_own(half, torch.rand(2, 3, 4, 4)).dtype == torch.float32   # a wider dtype than the map's
