"""Shape-only runs on meta tensors (surgeon.surgery.meta): exact shapes, the model untouched, and a clear
fallback whenever a forward needs values or leaves state behind."""
import pytest
import torch
from torch import nn

import surgeon
from surgeon.surgery import meta
from conftest import perturb_bn


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)

    def forward(self, x):
        return self.bn(self.conv(x)).relu()


class Net(nn.Module):
    """The variants below do at the root what fx cannot trace; the block is traced on its own."""

    def __init__(self):
        super().__init__()
        self.block = Block()

    def forward(self, x):
        return self.block(x)


class DataDependent(Net):
    def forward(self, x):
        y = super().forward(x)
        return y * 2 if y.sum() > 0 else y


class LazyScale(Net):
    """Computes and stores a tensor on its first call (as RoI poolers store their scales)."""

    def forward(self, x):
        if getattr(self, "scale", None) is None:
            self.scale = x.new_ones(()) * 2
        return super().forward(x) * self.scale


class Memo(Net):
    """Fills a dict attribute in place."""

    def __init__(self):
        super().__init__()
        self.memo = {}

    def forward(self, x):
        self.memo.setdefault(x.shape[-1], torch.zeros(1, device=x.device))
        return super().forward(x) + self.memo[x.shape[-1]]


def _state(m):
    return [(k, t) for k, t in list(m.named_parameters()) + list(m.named_buffers())]


def test_meta_run_gives_shapes_and_leaves_the_model_as_it_was():
    m = Net().eval()
    before = _state(m)
    out = meta.run([m], m, torch.randn(2, 3, 16, 16))
    assert out.is_meta and out.shape == (2, 8, 16, 16)
    after = _state(m)
    assert [k for k, _ in after] == [k for k, _ in before]
    assert all(a is b for (_, a), (_, b) in zip(after, before))  # the very same tensors, on the CPU
    assert not any(t.is_meta for _, t in after)


@pytest.mark.parametrize("cls, why", [(DataDependent, "Tensor.item"), (LazyScale, "stored state on LazyScale"),
                                      (Memo, "stored state on Memo")])
def test_meta_run_refuses_what_needs_values_and_undoes_it(cls, why):
    m = cls().eval()
    before = _state(m)
    with pytest.raises(meta.NeedsValues, match=why):
        meta.run([m], m, torch.randn(2, 3, 16, 16))
    assert all(a is b for (_, a), (_, b) in zip(_state(m), before))
    assert getattr(m, "scale", None) is None and getattr(m, "memo", {}) == {}
    m(torch.randn(2, 3, 16, 16))  # the model still runs for real


@pytest.mark.parametrize("cls", [DataDependent, LazyScale, Memo])
def test_surgery_falls_back_to_real_tensors(cls):
    """Models that need values still get exact shapes (from a real run) and an identity patch; the user's
    model keeps no state from surgery."""
    torch.manual_seed(0)
    m = cls().eval()
    patched = surgeon.add(m, "se", kind="after_conv", input_size=(3, 16, 16))
    x = torch.randn(2, 3, 16, 16)
    assert torch.equal(patched(x), m(x))
    assert [(s.name, s.shape) for s in surgeon.sites(cls().eval(), kind="after_conv", input_size=(3, 16, 16))] \
        == [("block.conv", (2, 8, 16, 16))]


# -- models built on the meta device, and models in other dtypes -----------------------------------------
def test_a_model_built_on_the_meta_device_is_patched_and_completed_by_its_weights():
    import timm

    with torch.device("meta"):
        big = timm.create_model("resnet18")
    with pytest.warns(UserWarning, match="not verified: ResNet is on the meta device"):
        patched = surgeon.add(big, "cbam", input_size=(3, 64, 64))
    assert len(surgeon.edits(patched)) == 8 and patched.layer1[0].conv1.weight.is_meta
    # the new modules are real, identity-initialised: loading the original weights completes the model
    assert not any(p.is_meta for p in patched.layer1[0].cbam.parameters())
    real = perturb_bn(timm.create_model("resnet18")).eval()
    missing = patched.load_state_dict(real.state_dict(), strict=False, assign=True).missing_keys
    assert missing and all(".cbam." in k for k in missing)
    x = torch.randn(2, 3, 64, 64)
    assert torch.equal(patched.eval()(x), real(x))


def test_a_meta_model_whose_forward_needs_values_is_refused_in_one_line():
    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 8, 3)

        def forward(self, x):
            y = self.conv(x)
            return y * 2 if y.sum() > 0 else y

    with torch.device("meta"):
        model = Branchy()
    want = (r"Branchy on the meta device does not run on the example input \(2, 3, 16, 16\) \(RuntimeError: "
            r"Tensor.item\(\) cannot be called on meta tensors\): pass the input it takes, or build it on the CPU")
    with pytest.raises(surgeon.SurgeonError, match=want) as info:
        surgeon.add(model, "se", input_size=(3, 16, 16))
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_inserted_modules_and_example_inputs_take_the_models_dtype(dtype):
    import timm

    model = perturb_bn(timm.create_model("resnet18")).to(dtype).eval()
    plan = surgeon.plan(model, "cbam", input_size=(3, 32, 32))
    patched = plan.apply()
    assert plan.example_inputs[0].dtype == dtype and plan.verification.max_abs_diff == 0
    assert {p.dtype for e in surgeon.edits(patched) for p in patched.get_submodule(e.module).parameters()} == {dtype}
    x = torch.randn(2, 3, 32, 32, dtype=dtype)
    assert torch.equal(patched(x), model(x))


def test_a_shape_run_of_a_meta_model_is_not_taken_for_one_that_stored_state():
    with torch.device("meta"):
        model = Net()
    assert meta.run([model], model, torch.randn(1, 3, 8, 8)).shape == (1, 8, 8, 8)


class _Hooked(nn.Module):
    """Kept whole in its parent's graph for its hook, so it gets a graph of its own."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(8, 8, 3, padding=1)
        self.register_forward_hook(lambda m, i, o: None)

    def forward(self, x):  # a dropout following the mode: tracing makes it a module of the traced copy's graph
        return torch.nn.functional.dropout(self.conv(x), 0.1, self.training).relu()


class _Pieces(nn.Module):
    """A root fx cannot trace (a decision on data) holding a traceable head with a hooked child."""

    def __init__(self):
        super().__init__()
        self.block = Block()
        self.head = nn.Sequential(_Hooked(), nn.Conv2d(8, 4, 1))

    def forward(self, x):
        y = self.head(self.block(x))
        return y * 2 if y.sum() > 0 else y


def test_piecewise_graphs_run_in_place_of_their_modules_once_and_record_every_shape(monkeypatch):
    from surgeon.surgery import shapes
    from surgeon.surgery.owned import structural_copy
    from surgeon.surgery.trace import trace

    model = _Pieces().eval()
    x = torch.randn(2, 3, 12, 12)
    recorded = shapes.record_calls(model, (x,))
    traced = trace(structural_copy(model), calls=recorded.calls)
    traced.module = structural_copy(model)  # as planning does: the Python parts run on a fresh copy
    assert {"block", "head", "head.0"} <= set(traced.graphs) and not isinstance(traced.module, torch.fx.GraphModule)
    calls = []  # every 8-to-8 convolution run, whichever copy of the model it belongs to
    conv = nn.Conv2d._conv_forward

    def counted(self, x, weight, bias):
        if weight.shape[:2] == (8, 8):
            calls.append(x.device.type)
        return conv(self, x, weight, bias)
    monkeypatch.setattr(nn.Conv2d, "_conv_forward", counted)
    shapes.propagate(traced, (x,))
    # the root needs values, so shapes come from a real run after the meta one; in each, the hooked child's
    # graph ran in place of its forward, not beside it
    assert calls == ["meta", "cpu"]
    for path, gm in traced.graphs.items():
        got = {n.name: n.meta.get("shape") for n in gm.graph.nodes if n.op in ("call_module", "call_function")}
        assert got and all(s is not None for s in got.values()), path
    assert next(n for n in traced.graphs["head.0"].graph.nodes if n.op == "call_module").meta["shape"] == (2, 8, 12, 12)
