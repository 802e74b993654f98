"""Shape-only runs on meta tensors (surgeon.surgery.meta): exact shapes, the model untouched, and a clear
fallback whenever a forward needs values or leaves state behind."""
from contextlib import nullcontext

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


# -- the shape-only stand-ins (meta.ShapeOnly): what a meta or fake run computes must not change ------------------
def _m(*shape, grad=False, channels_last=False):
    t = torch.empty(*shape, device="meta")
    if channels_last:
        t = t.contiguous(memory_format=torch.channels_last)
    return t.requires_grad_(grad)


def _like(x, *shape, grad=False, dtype=None):
    """A tensor of x's kind (meta or fake)."""
    return x.new_empty(shape, dtype=dtype).requires_grad_(grad)


F = torch.nn.functional
_CALLS = {
    "hardswish": lambda x: F.hardswish(x), "hardswish in place": lambda x: F.hardswish(x, inplace=True),
    "hardsigmoid in place, positional": lambda x: F.hardsigmoid(x, True), "relu6": lambda x: F.relu6(x),
    "gelu tanh": lambda x: F.gelu(x, approximate="tanh"), "silu in place": lambda x: F.silu(x, inplace=True),
    "leaky_relu in place": lambda x: F.leaky_relu(x, 0.2, True), "hardtanh": lambda x: F.hardtanh(x, -2.0, 2.0),
    "elu": lambda x: F.elu(x), "softplus": lambda x: F.softplus(x, 2.0), "sigmoid": torch.sigmoid,
    "Tensor.relu": lambda x: x.relu(), "Tensor.tanh": lambda x: x.tanh(),
    "x + 1": lambda x: x + 1, "x * 2.5": lambda x: x * 2.5, "3 - x": lambda x: 3 - x, "x / x": lambda x: x / x,
    "x * (1,C,1,1)": lambda x: x * _like(x, 1, x.shape[1], 1, 1, grad=True),
    "x.mul(C,1,1)": lambda x: x.mul(_like(x, x.shape[1], 1, 1)),
    "add, alpha": lambda x: torch.add(x, _like(x, x.shape[-1]), alpha=2),
    "x + channels-last y": lambda x: x + x.contiguous(memory_format=torch.channels_last),
    "(N,1,H,W) * x: broadcast up": lambda x: _like(x, x.shape[0], 1, *x.shape[2:]) * x,
    "x * float64": lambda x: x * _like(x, *x.shape, dtype=torch.float64),
    "int + 1": lambda x: x.long() + 1,
    "mean": lambda x: x.mean((2, 3)), "mean keepdim": lambda x: x.mean((2, 3), keepdim=True),
    "mean all": torch.mean, "mean dtype": lambda x: x.mean(1, dtype=torch.float64),
    "linear 4-D": lambda x: F.linear(x[..., :5], _like(x, 6, 5, grad=True), _like(x, 6, grad=True)),
    "linear no bias": lambda x: F.linear(x[0, 0, 0, :5], _like(x, 6, 5)),
    "sdpa": lambda x: F.scaled_dot_product_attention(x, x, x),
    "sdpa causal, scale": lambda x: F.scaled_dot_product_attention(x, x, x[..., :3], is_causal=True, scale=0.5),
    "sdpa grouped heads": lambda x: F.scaled_dot_product_attention(x, x[:, :2], x[:, :2], enable_gqa=True),
    "bilinear x2": lambda x: F.interpolate(x, scale_factor=2, mode="bilinear"),
    "bilinear size, corners": lambda x: F.interpolate(x, size=(7, 9), mode="bilinear", align_corners=True),
    "bicubic x1.5 recomputed": lambda x: F.interpolate(x, scale_factor=1.5, mode="bicubic",
                                                        recompute_scale_factor=True),
    "linear 1-D": lambda x: F.interpolate(x[0], scale_factor=3, mode="linear"),
    "trilinear": lambda x: F.interpolate(x[None], scale_factor=2, mode="trilinear"),
    "batch_norm": lambda x: F.batch_norm(x, None, None, training=True),
    "layer_norm": lambda x: F.layer_norm(x, x.shape[-1:]), "group_norm": lambda x: F.group_norm(x, 2),
    "instance_norm": lambda x: F.instance_norm(x),
    "batch_norm, affine": lambda x: F.batch_norm(x, None, None, _like(x, x.shape[1], grad=True),
                                                 _like(x, x.shape[1], grad=True), training=True),
    "layer_norm, affine": lambda x: F.layer_norm(x, x.shape[-1:], _like(x, x.shape[-1], grad=True)),
}


def _described(out, x):
    return (tuple(out.shape), out.dtype, out.device, out.requires_grad, out is x,
            tuple(s for s, n in zip(out.stride(), out.shape) if n > 1))


@pytest.mark.parametrize("fake", [False, True], ids=["meta", "fake"])
@pytest.mark.parametrize("grad", [False, True], ids=["no grad", "grad"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["contiguous", "channels last"])
@pytest.mark.parametrize("call", list(_CALLS), ids=list(_CALLS))
def test_the_shape_only_stand_ins_give_what_the_kernels_give(call, channels_last, grad, fake):
    """Shape, dtype, device, layout, requires_grad, and the same tensor back from an in-place call, on meta tensors
    and on fake ones."""
    from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode

    def run(stand_ins):
        with FakeTensorMode() if fake else nullcontext():
            x = _m(2, 4, 6, 5, grad=grad, channels_last=channels_last)
            if fake:
                x = torch.empty_strided(x.shape, x.stride()).requires_grad_(grad)
                assert isinstance(x, FakeTensor)
            x = x.clone()  # not a leaf: in place is allowed
            with meta.ShapeOnly() if stand_ins else nullcontext():
                return _described(_CALLS[call](x), x)

    assert run(True) == run(False)


@pytest.mark.parametrize("fake", [False, True], ids=["meta", "fake"])
def test_the_stand_ins_are_taken_for_the_slow_kernels(monkeypatch, fake):
    """The functions whose meta kernels are slow Python run as the stand-ins (not as themselves)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    seen = []
    clone = torch.Tensor.clone
    monkeypatch.setattr(torch.Tensor, "clone", lambda self, *a, **k: seen.append("clone") or clone(self, *a, **k))
    with FakeTensorMode() if fake else nullcontext():
        x = torch.empty(2, 3) if fake else _m(2, 3)
        with meta.ShapeOnly():
            F.hardswish(x), F.gelu(x), x * 2, F.batch_norm(x, None, None, training=True)
    assert seen == ["clone"] * 4


def test_an_in_place_stand_in_refuses_a_leaf_that_requires_grad_as_the_real_op_does():
    for fast in (True, False):
        with meta.ShapeOnly() if fast else nullcontext():
            with pytest.raises(RuntimeError, match="leaf Variable that requires grad"):
                F.hardswish(_m(2, 3, grad=True), inplace=True)


def test_a_meta_run_of_mobilenet_v3_records_the_same_shapes_as_a_real_one():
    timm = pytest.importorskip("timm")
    model = timm.create_model("mobilenetv3_small_050").eval()
    x = torch.randn(2, 3, 96, 96)
    shapes: dict[str, tuple] = {}
    hooks = [m.register_forward_hook(lambda m, a, o, n=n: shapes.setdefault(n, []).append(tuple(o.shape)))
             for n, m in model.named_modules()]
    with torch.no_grad():
        model(x)
        real = {k: list(v) for k, v in shapes.items()}
        shapes.clear()
        meta.run([model], model, x)
    for h in hooks:
        h.remove()
    assert shapes == real and len(real) > 100


def test_a_stand_in_does_not_take_a_call_the_real_function_refuses():
    """Bilinear upsampling of a 3-D input is refused; the nearest one would not be."""
    for fast in (True, False):
        with meta.ShapeOnly() if fast else nullcontext():
            with pytest.raises(NotImplementedError, match="bilinear"):
                F.interpolate(_m(2, 3, 8), scale_factor=2, mode="bilinear")


def test_a_stand_in_does_not_take_tensors_on_two_devices():
    """A meta map times a CPU tensor is refused by the kernel; a copy of the map would pass it."""
    for fast in (True, False):
        with meta.ShapeOnly() if fast else nullcontext():
            with pytest.raises(RuntimeError, match="device"):
                _m(2, 3, 4, 4) * torch.ones(3, 1, 1)


def test_a_model_holding_tensors_on_several_devices_is_refused_naming_them():
    class Mixed(nn.Module):  # as accelerate's init_empty_weights leaves a model: weights on meta, buffers real
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 8, 3)
            self.register_buffer("scale", torch.ones(8, 1, 1))

        def forward(self, x):
            return self.conv(x) * self.scale.to(device="cpu")  # a table computed on the buffer's device

    model = Mixed()
    model.conv.to("meta")
    want = (r"^Mixed holds tensors on several devices \(parameters on meta; buffers on cpu \('scale'\)\) and does "
            r"not run so \(RuntimeError: .*\): put them on one device first \(model.to_empty\(device=...\)")
    with pytest.raises(surgeon.SurgeonError, match=want) as info:
        surgeon.add(model, "se", input_size=(3, 16, 16))
    assert "\n" not in str(info.value)
    # on one device, as the message says, the same model patches
    model.to_empty(device="cpu").conv.reset_parameters()  # (to_empty leaves the memory as it finds it)
    model.scale.fill_(1.0)
    patched = surgeon.add(model, "se", kind="after_conv", input_size=(3, 16, 16))
    assert len(surgeon.edits(patched)) == 1
