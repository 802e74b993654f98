"""Tracing: whole and piecewise, exact outputs with no edits, state-dict keys and train/eval behaviour."""
import copy
import inspect

import pytest
import timm
import torch
import torch.fx as fx
import torchvision

import surgeon
from surgeon.surgery.trace import trace
from toy_models import DataDependent, FunctionalDropout, PlainCNN, RootDataDependent, SharedConv, TinyResNet


@pytest.mark.parametrize("make", [PlainCNN, TinyResNet, SharedConv, DataDependent, RootDataDependent,
                                  FunctionalDropout])
def test_trace_without_edits_is_exact(make, x32):
    torch.manual_seed(0)
    model = make().eval()
    x = x32 if make is not SharedConv else x32[:, :1].repeat(1, 4, 1, 1)
    traced = trace(model).module.eval()
    assert torch.equal(model(x), traced(x))


@pytest.mark.parametrize("name", ["resnet18", "efficientnet_b0", "convnext_tiny"])
def test_trace_timm_models_exact(name):
    model = timm.create_model(name).eval()
    x = torch.randn(1, 3, 64, 64)
    traced = trace(model).module
    assert isinstance(traced, fx.GraphModule)
    assert torch.equal(model(x), traced(x))
    assert list(traced.state_dict()) == list(model.state_dict()) or set(traced.state_dict()) == set(model.state_dict())


def test_trace_does_not_change_the_model():
    model = TinyResNet().eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    names = [n for n, _ in model.named_modules()]
    surgeon.add(model, "se")
    assert [n for n, _ in model.named_modules()] == names
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_piecewise_inner_module():
    model = DataDependent().eval()
    t = trace(model)
    assert isinstance(t.module, fx.GraphModule)
    assert "body" in t.leaves and "data-dependent" not in t.leaves["body"]
    # the untraceable module's children are traced, so their sites are found
    assert "body.inner" in t.graphs


def test_piecewise_root():
    model = RootDataDependent().eval()
    t = trace(model)
    assert not isinstance(t.module, fx.GraphModule)
    assert set(t.graphs) == {"a", "b", "fc"} - {"fc"} or {"a", "b"} <= set(t.graphs)
    assert "" in t.leaves


def test_unused_modules_keep_their_keys():
    class WithSpare(PlainCNN):
        def __init__(self):
            super().__init__()
            self.spare = torch.nn.Linear(3, 3)  # never called in forward

    model = WithSpare().eval()
    traced = trace(model).module
    assert set(traced.state_dict()) == set(model.state_dict())


def test_functional_dropout_follows_train_and_eval():
    torch.manual_seed(0)
    model = FunctionalDropout()
    patched = surgeon.add(copy.deepcopy(model).eval(), "se", kind="after_conv")
    x = torch.randn(8, 3, 16, 16)
    model.train(), patched.train()
    torch.manual_seed(3)
    a = model(x)
    torch.manual_seed(3)
    b = patched(x)
    assert torch.equal(a, b)
    torch.manual_seed(4)
    assert not torch.equal(patched(x), b)  # dropout is live in train mode
    model.eval(), patched.eval()
    assert torch.equal(patched(x), patched(x))
    assert torch.allclose(model(x), patched(x), atol=1e-6)


class _LiteralToo(FunctionalDropout):
    """A read-driven dropout and one written at training=False, which must stay off in train mode."""

    def forward(self, x):
        x = torch.nn.functional.relu(self.conv(x)).mean((2, 3))
        x = torch.nn.functional.dropout(x, p=0.5, training=self.training)
        return self.fc(torch.nn.functional.dropout(x, p=0.9, training=False))


class _Aliased(FunctionalDropout):
    """Dropout through a local name: the read is not followed to the function, so train mode is traced."""

    def forward(self, x):
        drop = torch.nn.functional.dropout
        x = torch.nn.functional.relu(self.conv(x)).mean((2, 3))
        return self.fc(drop(x, p=0.5, training=self.training))


class _Branching(FunctionalDropout):
    """A decision on the flag (whose branches compute alike here, so the module traces in both modes)."""

    def forward(self, x):
        x = torch.nn.functional.relu(self.conv(x)).mean((2, 3))
        x = x * (2.0 if self.training else 2.0)
        return self.fc(x)


@pytest.mark.parametrize("make,train_traced", [(FunctionalDropout, False), (_LiteralToo, True), (_Aliased, True),
                                               (_Branching, True)])
def test_a_forward_reading_training_only_as_dropouts_flag_is_traced_in_eval_mode_alone(make, train_traced,
                                                                                       monkeypatch):
    """`F.dropout(x, training=self.training)` makes the train-mode graph differ from the eval-mode one at that
    dropout alone, which becomes a module following the mode: no second trace. Any other read, or a dropout
    written off, is told apart by tracing in train mode too; either way the patched model computes what the
    original does in both modes."""
    from surgeon.surgery import trace as trace_module

    traced_in_train = []
    train_graphs = trace_module._train_graphs
    monkeypatch.setattr(trace_module, "_train_graphs",
                        lambda module, *a, **k: traced_in_train.append(type(module)) or train_graphs(module, *a, **k))
    torch.manual_seed(0)
    model = make()
    patched = surgeon.add(copy.deepcopy(model).eval(), "se", kind="after_conv")
    assert (make in traced_in_train) is train_traced
    x = torch.randn(8, 3, 16, 16)
    model.train(), patched.train()
    torch.manual_seed(3)
    a = model(x)
    torch.manual_seed(3)
    assert torch.equal(a, patched(x))
    model.eval(), patched.eval()
    assert torch.allclose(model(x), patched(x), atol=1e-6)


def drop_connect(x, p, training):
    """Stochastic depth as smp's and efficientnet_pytorch's EfficientNet blocks write it: a plain function given the
    mode, whose body decides on it."""
    if not training:
        return x
    keep = 1 - p + torch.rand(x.shape[0], 1, 1, 1, dtype=x.dtype, device=x.device)
    return x / (1 - p) * keep.floor()


class _DropConnectBlock(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = torch.nn.Conv2d(8, 8, 3, padding=1)
        self.conv2 = torch.nn.Conv2d(8, 8, 3, padding=1)

    def forward(self, x, rate=None):
        y = self.conv2(torch.relu(self.conv1(x)))
        if rate is not None and rate > 0:
            y = drop_connect(y, p=rate, training=self.training)
        return x + y


class _DropConnectNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.blocks = torch.nn.ModuleList(_DropConnectBlock() for _ in range(3))
        self.fc = torch.nn.Linear(8, 4)

    def forward(self, x):
        x = self.stem(x)
        for i, block in enumerate(self.blocks):
            x = block(x, 0.5 * i / len(self.blocks))
        return self.fc(x.mean((2, 3)))


def test_a_function_given_the_mode_becomes_a_module_following_it(monkeypatch):
    """A block calling a plain function with `training=self.training` (drop connect) is traced in eval mode alone,
    the call becoming a module that passes its own flag: the block keeps its residual site, and the patched model
    draws what the original draws in train mode and is deterministic in eval mode."""
    from surgeon.surgery import trace as trace_module
    from surgeon.surgery.owned import ModeCall

    traced_in_train = []
    train_graphs = trace_module._train_graphs
    monkeypatch.setattr(trace_module, "_train_graphs",
                        lambda module, *a, **k: traced_in_train.append(type(module)) or train_graphs(module, *a, **k))
    torch.manual_seed(0)
    model = _DropConnectNet().eval()
    patched = surgeon.add(model, "se", kind="residual", input_size=(3, 16, 16))
    assert [e.site for e in surgeon.edits(patched)] == ["blocks.0.add", "blocks.1.add", "blocks.2.add"]
    assert not traced_in_train
    calls = [m for m in patched.modules() if isinstance(m, ModeCall)]
    assert len(calls) == 2 and all(c.fn is drop_connect for c in calls)  # block 0 runs at rate 0: no call
    x = torch.randn(4, 3, 16, 16)
    model.train(), patched.train()
    assert all(c.training for c in calls)
    outs = []
    for m in (model, patched, patched):
        torch.manual_seed(3)
        outs.append(m(x))
    assert torch.equal(outs[0], outs[1])
    torch.manual_seed(4)
    assert not torch.equal(patched(x), outs[1])  # the drop is live in train mode
    model.eval(), patched.eval()
    assert not any(c.training for c in calls) and torch.equal(model(x), patched(x))


class _DropsItsLastBlock(_DropConnectNet):
    """Runs every block but uses the features of the first two (an encoder run past the depth its decoder takes)."""

    def forward(self, x):
        x, features = self.stem(x), []
        for i, block in enumerate(self.blocks):
            x = block(x, 0.5 * i / len(self.blocks))
            features.append(x)
        return self.fc(features[1].mean((2, 3)))


def test_nothing_is_inserted_in_a_module_whose_output_is_dropped():
    """The blocks that take the mode are graphs of their own; the last one's output reaches nothing, so its residual
    site is not edited (an attention there would learn nothing: verification finds no gradient reaching it)."""
    torch.manual_seed(0)
    model = _DropsItsLastBlock().eval()
    plan = surgeon.plan(model, "se", kind="residual", input_size=(3, 16, 16))
    assert "blocks.2" in plan._prep.traced.graphs  # traced alone, called whole by the root's graph
    assert [e.site.name for e in plan.edits] == ["blocks.0.add", "blocks.1.add"]
    plan.apply()
    assert plan.verification.max_abs_diff == 0 and plan.verification.nonzero_grad == 2


def test_a_wrapped_function_may_fill_in_a_list_the_graph_holds():
    """A list argument is a constant of the graph, which fx keeps immutable; the generated code passes a fresh one
    at each call, and so does the shape-recording run (torchvision's Swin3D fills in its window sizes so)."""
    from toy_models import ClipsAWindow

    torch.manual_seed(0)
    model = ClipsAWindow().eval()
    patched = surgeon.add(model, "se", kind="after_conv", input_size=(3, 5, 9))
    assert len(surgeon.edits(patched)) == 1
    for size in ((5, 9), (12, 12)):  # the window clipped, then not: the constant was not changed by the first call
        x = torch.randn(2, 3, *size)
        assert torch.equal(patched(x), model(x))


def test_efficientnet_train_mode_matches_original():
    """drop_rate (functional dropout in the head) and drop_path_rate (DropPath modules) survive surgery."""
    torch.manual_seed(0)
    model = timm.create_model("efficientnet_b0", drop_rate=0.2, drop_path_rate=0.2).eval()
    reference = copy.deepcopy(model)
    patched = surgeon.add(model, "se", input_size=(3, 96, 96))
    x = torch.randn(4, 3, 96, 96)
    reference.train(), patched.train()
    torch.manual_seed(1)
    a = reference(x)
    torch.manual_seed(1)
    b = patched(x)
    assert torch.equal(a, b)
    torch.manual_seed(2)
    assert not torch.equal(patched(x), b), "dropout / drop-path must be random in train mode"
    # batch-norm running statistics updated the same way (two forwards each)
    torch.manual_seed(2)
    reference(x)
    ref_sd, pat_sd = reference.state_dict(), patched.state_dict()
    stats = [k for k in ref_sd if k.endswith(("running_mean", "running_var", "num_batches_tracked"))]
    assert stats and all(torch.equal(ref_sd[k], pat_sd[k]) for k in stats)
    reference.eval(), patched.eval()
    assert torch.equal(reference(x), patched(x))


def test_torchvision_model_traces():
    model = torchvision.models.mobilenet_v3_small().eval()
    x = torch.randn(1, 3, 64, 64)
    assert torch.equal(model(x), trace(model).module(x))


def test_root_with_train_only_branches_keeps_both_modes():
    """torchvision GoogLeNet computes auxiliary heads only in train(): the root stays Python."""
    torch.manual_seed(0)
    model = torchvision.models.googlenet(init_weights=True).eval()
    patched = surgeon.add(model, "se", input_size=(3, 96, 96))
    x = torch.randn(2, 3, 96, 96)
    assert torch.allclose(model(x), patched(x), atol=1e-5)
    model.train(), patched.train()
    torch.manual_seed(1)
    a = model(x)
    torch.manual_seed(1)
    b = patched(x)
    assert type(a).__name__ == type(b).__name__ == "GoogLeNetOutputs"
    assert all(torch.allclose(u, v, atol=1e-5) for u, v in zip(a, b))


def _shift_in_training(module, x):
    """Reads the mode through a plain function: nothing in the forward's source says `self.training`."""
    return x + 1 if module.training else x


class ModeViaHelper(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3, padding=1)
        self.head = torch.nn.Conv2d(4, 4, 1)

    def forward(self, x):
        return self.head(_shift_in_training(self, self.conv(x)))


class WithModeViaHelper(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = torch.nn.Conv2d(3, 3, 3, padding=1)
        self.block = ModeViaHelper()

    def forward(self, x):
        return self.block(self.stem(x))


def test_mode_read_anywhere_keeps_both_modes():
    """Any read of a `training` flag while tracing makes surgery trace the train mode too, however the
    code reads it; the patched model then computes what the original does in both modes."""
    torch.manual_seed(0)
    model = WithModeViaHelper().eval()
    patched = surgeon.add(model, "se", kind="after_conv", input_size=(3, 8, 8))
    x = torch.randn(2, 3, 8, 8)
    for mode in (False, True):
        model.train(mode), patched.train(mode)
        assert torch.equal(patched(x), model(x)), f"training={mode}"


def test_modules_that_never_read_the_mode_are_traced_once(monkeypatch):
    """Tracing a second time in train mode is only for code that reads the mode (half the tracing time)."""
    from surgeon.surgery import trace as trace_module

    modes = []
    real = trace_module._trace_graph
    monkeypatch.setattr(trace_module, "_trace_graph",
                        lambda m, leaves, training, call, widen=False: modes.append(training)
                        or real(m, leaves, training, call, widen))
    trace(TinyResNet().eval())
    assert modes and not any(modes)
    modes.clear()
    trace(ModeViaHelper().eval())
    assert modes == [False, True]


class _Augmented(torch.nn.Module):
    """`+=` and `*=` on a map another name still holds, on a buffer, and on a size."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 3, 1)
        self.register_buffer("calls", torch.zeros(()))

    def forward(self, x):
        y = self.conv(x)
        held = y
        y += x
        y *= 2
        self.calls += 1
        n = x.shape[0]
        n -= 1
        return held, y.sum() * n


def test_augmented_assignments_trace_in_place():
    # fx's own Proxy records `y += x` as `y + x`: the traced forward allocated a new map, and `held`, which
    # the model's code sees changed, kept the value from before
    model = _Augmented().eval()
    traced = trace(copy.deepcopy(model)).module
    assert isinstance(traced, fx.GraphModule)
    assert "y += x" not in traced.code and "+= " in traced.code and "*= " in traced.code
    x = torch.randn(3, 3, 4, 4)
    want, got = model(x.clone()), traced(x.clone())
    assert torch.equal(want[0], got[0]) and torch.equal(want[1], got[1])
    assert float(model.calls) == float(traced.calls) == 1  # the buffer is updated in place, as in the model


def test_a_rewritten_residual_block_adds_its_shortcut_in_place():
    # timm's Bottleneck ends `x += shortcut; x = self.act3(x)` (an in-place ReLU): the block returns the map
    # bn3 wrote. Rewritten with SE before the add, it returns the map SE wrote: the same number of maps
    # allocated as the hand-written SE-ResNet's block
    model = timm.create_model("resnet50").eval()
    patched = surgeon.add(model, "se", init="paper", input_size=(3, 64, 64), verify=False)
    block = patched.layer1[1]
    seen = {}
    block.se.register_forward_hook(lambda m, i, o: seen.__setitem__("se", o.data_ptr()))
    with torch.no_grad():
        out = block(torch.randn(2, 256, 16, 16))
    assert out.data_ptr() == seen["se"]


class _DrawsWhileTracing(TinyResNet):
    """TinyResNet whose forward draws from the global generator, as LayerDrop's `torch.rand([])` does."""

    def forward(self, x):
        torch.rand(1000)
        return super().forward(x)


def test_tracing_leaves_the_callers_random_sequence_where_it_was():
    # surgery draws only what building the new modules draws: a forward that draws while it is traced (in
    # both modes, and again for each owner) no longer moves the caller's generator, nor does what ran before
    # decide what the trace sees
    states = []
    for make in (TinyResNet, _DrawsWhileTracing):
        torch.manual_seed(0)
        model = make().eval()
        surgeon.add(model, "se", input_size=(3, 32, 32), verify=False)
        states.append(torch.get_rng_state())
    assert torch.equal(states[0], states[1])


class _LayerDrop(torch.nn.Module):
    """Residual layers that training skips at random (LayerDrop, as Wav2Vec2's encoder): the draw is in this
    module's own code, and so are the residual adds."""

    def __init__(self, p=0.2):
        super().__init__()
        self.p = p
        self.stem = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.layers = torch.nn.ModuleList(torch.nn.Sequential(torch.nn.Conv2d(8, 8, 3, padding=1),
                                                              torch.nn.BatchNorm2d(8)) for _ in range(4))

    def forward(self, x):
        x = self.stem(x)
        for layer in self.layers:
            if self.training and torch.rand([]) < self.p:
                continue
            x = x + layer(x)
        return x.mean((2, 3))


@pytest.mark.parametrize("p", [0.0001, 0.9999])  # the trace's draw keeps every layer / skips every layer
def test_a_forward_that_draws_its_structure_in_training_stays_python(p):
    # one traced draw cannot stand for every training step: traced whole, the patched forward would always
    # keep (or always skip) the layers the draw kept; the module stays Python and keeps drawing
    torch.manual_seed(0)
    model = _LayerDrop(p).eval()
    x = torch.randn(2, 3, 16, 16)
    patched = surgeon.add(model, "se", kind="after_conv", example_input=x, verify=False)
    assert "" not in {e.owner for e in surgeon.edits(patched)} and "forward" not in patched.__dict__
    model.p = patched.p = 0.5
    outs = []
    for m in (model, patched):
        torch.manual_seed(3)
        with torch.no_grad():
            outs.append(torch.stack([m.train()(x) for _ in range(8)]))
    assert torch.equal(outs[0], outs[1])  # the same layers dropped, step by step


class _Scaled(torch.nn.Module):
    """A block whose forward calls an autowrapped function (math.sqrt) of its own module's globals, reads a
    parameter and calls a submodule: what fx's module wrappers handle."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(4, 4, 3, padding=1)
        self.scale = torch.nn.Parameter(torch.ones(1))

    def forward(self, x):
        import math

        return x + self.conv(x) * self.scale / math.sqrt(4)


def test_fx_module_patches_are_set_once_per_surgery_step_and_put_back(monkeypatch):
    """fx sets nn.Module's __call__ and __getattr__ at every trace; within a surgery step surgeon's dispatchers
    stand in for them once (each change costs about a millisecond), and fx's originals are back afterwards."""
    import torch.fx._symbolic_trace as fx_internals

    from surgeon.surgery import trace as trace_module

    made = []
    patch = fx_internals._PatchedFnSetAttr.patch
    monkeypatch.setattr(fx_internals._PatchedFnSetAttr, "patch",
                        lambda self: (made.append(self.fn_name), patch(self))[1])
    model = torch.nn.Sequential(_Scaled(), _Scaled(), torch.nn.Conv2d(4, 4, 1)).eval()
    x = torch.randn(2, 4, 8, 8)
    patched = surgeon.add(model, "se", example_input=x)
    assert len(surgeon.edits(patched)) == 2 and torch.equal(patched(x), model(x))
    assert "__call__" not in made and "__getattr__" not in made
    assert torch.nn.Module.__call__ is fx_internals._orig_module_call
    assert torch.nn.Module.__getattr__ is fx_internals._orig_module_getattr
    monkeypatch.setattr(trace_module._FxPatches, "available", False)  # fx's own way: a patch per trace
    again = surgeon.add(model, "se", example_input=x)
    assert "__call__" in made and torch.equal(again(x), patched(x))


def test_an_fx_trace_other_than_surgeons_inside_a_surgery_step_fails_loudly():
    from surgeon.errors import InternalError
    from surgeon.surgery.trace import noting_training_reads

    with noting_training_reads(), pytest.raises(InternalError, match="An fx trace other than surgeon's"):
        fx.symbolic_trace(TinyResNet())
    assert isinstance(fx.symbolic_trace(TinyResNet()), fx.GraphModule)  # and fx's own way after the step


class _ZerosScores(torch.nn.Module):
    """An attention block that makes its scores' buffer from traced sizes as separate arguments, as transformers'
    GPT-NeoX-Japanese does (`torch.zeros(b * h, q, k, dtype=...)`); its noise too."""

    def __init__(self, d=8, noise=False):
        super().__init__()
        self.qk, self.out = torch.nn.Linear(d, 2 * d), torch.nn.Linear(d, d)
        self.noise = noise

    def forward(self, x):
        b, n, d = x.shape
        q, k = self.qk(x).chunk(2, dim=-1)
        scores = torch.baddbmm(torch.zeros(b, n, n, dtype=q.dtype, device=q.device), q, k.transpose(1, 2))
        if self.noise:
            # (products, not sums: no residual sites of their own)
            scores = scores * torch.ones(b, n, 1) * torch.randn(b, n, n).abs().ge(0) * torch.empty(b, n, n).fill_(1)
        return x + self.out(scores.softmax(-1) @ x)


@pytest.mark.parametrize("noise", [False, True])
def test_factories_given_traced_sizes_as_separate_arguments_trace(noise):
    """torch parses `torch.zeros(b, n, n)`'s arguments as ints before a traced size could dispatch it, and the
    block stayed a leaf, its residual no site; the sizes are passed as one tuple, which dispatches."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(_ZerosScores(noise=noise), _ZerosScores(noise=noise)).eval()
    x = torch.randn(2, 5, 8)
    patched = surgeon.add(model, "se", kind="residual", example_input=(x,))
    assert [e.owner for e in surgeon.edits(patched)] == ["0", "1"]
    assert all(getattr(torch, f) is getattr(torch._C._VariableFunctions, f)  # put back
               for f in ("zeros", "ones", "empty", "rand", "randn"))
    with torch.no_grad():
        assert torch.equal(patched(x), model(x))
        y = torch.randn(3, 7, 8)  # the sizes are the call's, not constants
        assert torch.equal(patched(y), model(y))


def test_a_lazy_graph_binds_calls_as_its_code_would_without_writing_it():
    """The whole model's graph writes its code only if it runs (surgery reads the graph and interprets it): binding
    a call to its placeholders takes the signature fx's code would have, from the placeholders."""
    from torch.fx._lazy_graph_module import _LazyGraphModule

    from surgeon import planning
    from surgeon.surgery import calls

    graph = fx.Graph()  # the placeholders of `forward(self, x, y=None, *rest, scale=2.0, **extra)`
    x = graph.placeholder("x")
    for target, default in (("y", None), ("*rest", inspect.Parameter.empty), ("scale", 2.0),
                            ("**extra", inspect.Parameter.empty)):
        graph.placeholder(target, default_value=default)
    graph.output(x)
    for gm in (_LazyGraphModule(torch.nn.Module(), graph), fx.GraphModule(torch.nn.Module(), graph)):
        lazy = isinstance(gm, _LazyGraphModule)
        assert str(calls._signature(gm)) == "(x, y=None, *rest, scale=2.0, **extra)"
        assert gm._needs_recompile() if lazy else True  # (not written by binding)
        bound = calls.bind(gm, (torch.ones(1), None, torch.ones(1)), {"bias": torch.ones(1)})
        one = torch.ones(1)
        assert {n.target: v for n, v in bound.items()} == {"x": one, "y": None, "*rest": (one,), "scale": 2.0,
                                                           "**extra": {"bias": one}}
        _LazyGraphModule.force_recompile(gm)  # the code written: its signature is the one bound to
        assert str(inspect.signature(gm.forward)) == "(x, y=None, *rest, scale=2.0, **extra)"
    prepared = planning._prepare(TinyResNet().eval())
    assert isinstance(prepared.traced.module, _LazyGraphModule) and prepared.traced.module._needs_recompile()


class _BiasOrNone(torch.nn.Module):
    """Returns its bias, or None where it has none; a decision on data keeps it a leaf."""

    def __init__(self, d, bias):
        super().__init__()
        self.fc = torch.nn.Linear(d, d)
        self.bias = torch.nn.Parameter(torch.randn(d)) if bias else None

    def forward(self, x):
        if x.sum() > 1e9:
            x = x * 0
        return self.fc(x), self.bias


class _AddsBiasIfAny(torch.nn.Module):
    def __init__(self, d, bias):
        super().__init__()
        self.attn, self.fc = _BiasOrNone(d, bias), torch.nn.Linear(d, d)

    def forward(self, x):
        out, b = self.attn(x)
        out = out + b.expand_as(out) if b is not None else out  # `b is not None`: no decision a proxy takes
        x = x + out
        return x + self.fc(x)


def test_a_traced_model_failing_where_the_model_runs_is_said_to_be_the_trace_not_the_input():
    """The layer without a bias is traced as if its leaf returned one (a proxy is not None), and its graph fails on
    the example input the model runs: the refusal says so, instead of asking for another input."""
    model = torch.nn.Sequential(_AddsBiasIfAny(8, False), _AddsBiasIfAny(8, True)).eval()
    x = torch.randn(2, 5, 8)
    model(x)
    with pytest.raises(surgeon.errors.TraceError, match=r"^The traced Sequential fails on the example input "
                       r"\(2, 5, 8\), which Sequential itself runs \(AttributeError: 'NoneType' object"):
        surgeon.add(model, "se", example_input=(x,))
    # where the model itself fails too, the input is said to be wrong (the recorded call would have said it first)
    from surgeon.surgery import shapes

    traced = trace(model, calls=shapes.record_calls(model, (x,)).calls)
    with pytest.raises(surgeon.errors.ShapeError, match=r"^The example input \(2, 5, 9\) does not go through "
                                                        r"Sequential"):
        shapes.propagate(traced, (torch.randn(2, 5, 9),), model=model)
    with pytest.raises(surgeon.errors.TraceError, match=r"which Sequential itself runs"):
        shapes.propagate(traced, (x,), model=model)
