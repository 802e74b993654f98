"""Site finders on hand-built models whose sites are known."""
import pytest
import timm
import torch

import surgeon
from surgeon.errors import NoSitesError, UnknownNameError
from toy_models import DataDependent, PlainCNN, RootDataDependent, SharedConv, TinyResNet


def names(model, kind, **kw):
    return [s.name for s in surgeon.sites(model, kind=kind, input_size=kw.pop("input_size", (3, 32, 32)), **kw)]


def test_plain_cnn():
    m = PlainCNN().eval()
    assert names(m, "residual") == []
    assert names(m, "after_conv") == ["conv1", "conv2", "conv3"]
    # functional max pools and the functional adaptive average pool (with its flatten)
    pools = surgeon.sites(m, kind="pool", input_size=(3, 32, 32))
    assert [s.info["pool"] for s in pools] == ["max", "max", "avg"]
    assert pools[-1].out_shape == (2, 16) and pools[-1].info["global"]
    assert pools[0].info["kernel_size"] == 2
    # after_conv sites sit past the norm and activation
    conv1 = surgeon.sites(m, kind="after_conv", input_size=(3, 32, 32))[0]
    assert conv1.node == "relu" and conv1.shape == (2, 8, 32, 32)


def test_residual_identity_and_downsampling_shortcuts():
    m = TinyResNet().eval()
    res = surgeon.sites(m, kind="residual", input_size=(3, 32, 32))
    assert [s.name for s in res] == ["stage1.0", "stage1.1", "stage2.0", "stage2.1", "stage3.0", "stage3.1"]
    # the site is the deeper branch (bn2), not the shortcut, for both shortcut types
    assert all(s.node.endswith("bn2") for s in res)
    assert res[2].shape == (2, 16, 8, 8)


def test_stage_ends_before_downsampling_not_stem_not_last():
    m = TinyResNet().eval()
    assert names(m, "stage") == ["stage1", "stage2"]


def test_pool_module_and_shapes():
    m = TinyResNet().eval()
    (pool,) = surgeon.sites(m, kind="pool", input_size=(3, 32, 32))
    assert pool.name == "pool" and pool.shape == (2, 32, 4, 4) and pool.out_shape == (2, 32)


def test_conv_called_twice_gives_two_sites():
    m = SharedConv().eval()
    assert names(m, "after_conv", input_size=(4, 16, 16)) == ["conv", "conv#1"]
    patched = surgeon.add(m, "se", kind="after_conv", example_input=torch.randn(2, 4, 16, 16))
    assert {e["module"] for e in patched._surgeon["edits"]} == {"conv_se", "conv_se_1"}


def test_untraceable_inner_module_is_patched_piecewise():
    m = DataDependent().eval()
    res = names(m, "residual")
    assert "body.inner.0" in res and "stage.0" in res
    x = torch.randn(2, 3, 32, 32)
    patched = surgeon.add(m, "cbam", example_input=x)
    assert torch.allclose(patched(x), m(x), atol=1e-6)
    assert "body.inner.0.cbam.channel.gamma" in patched.state_dict()


def test_untraceable_root_is_patched_piecewise():
    m = RootDataDependent().eval()
    x = torch.randn(2, 3, 32, 32)
    assert set(names(m, "residual")) == {"a.1", "b.0"}
    patched = surgeon.add(m, "se", example_input=x)
    assert torch.equal(patched(x), m(x))
    assert {"a.1.se.gamma", "b.0.se.gamma"} <= set(patched.state_dict())


def test_timm_resnet50_sites():
    m = timm.create_model("resnet50").eval()
    sites = surgeon.sites(m, input_size=(3, 64, 64))
    by_kind = {}
    for s in sites:
        by_kind.setdefault(s.kind, []).append(s.name)
    assert len(by_kind["residual"]) == 16
    assert by_kind["stage"] == ["layer1", "layer2", "layer3"]
    assert by_kind["pool"] == ["maxpool", "global_pool"]
    assert len(by_kind["after_conv"]) == 53


def test_at_glob_and_errors():
    m = TinyResNet().eval()
    assert names(m, "residual", at=["stage2.*"]) == ["stage2.0", "stage2.1"]
    with pytest.raises(NoSitesError, match="'nope.*' matches no residual site. Valid sites: 'stage1.0'"):
        names(m, "residual", at=["nope.*"])
    with pytest.raises(UnknownNameError, match="Unknown kind 'residul'. Did you mean 'residual'"):
        names(m, "residul")


@pytest.mark.parametrize("name,expect", [("convnext_tiny", ["stages.0", "stages.1", "stages.2"]),
                                         ("efficientnet_b0", ["blocks.0", "blocks.1", "blocks.2", "blocks.4"]),
                                         ("densenet121", ["features.denseblock1", "features.denseblock2",
                                                          "features.denseblock3"])])
def test_stage_sites_on_other_families(name, expect):
    assert names(timm.create_model(name).eval(), "stage", input_size=(3, 64, 64)) == expect


def test_vit_residuals_are_channels_last():
    sites = surgeon.sites(timm.create_model("vit_tiny_patch16_224").eval(), kind="residual")
    assert len(sites) == 24 and {s.layout for s in sites} == {"nlc"}
    with pytest.raises(NoSitesError, match="nchw"):
        surgeon.plan(timm.create_model("vit_tiny_patch16_224").eval(), "cbam", kind="residual")


def test_patched_model_keeps_site_names():
    model = TinyResNet().eval()
    patched = surgeon.add(model, "se", input_size=(3, 32, 32))
    for kind in ("residual", "stage", "after_conv", "pool"):
        assert names(patched, kind) == names(model, kind)


def test_meta_and_fake_tensor_shapes_match_real(monkeypatch):
    """Shapes come from meta tensors; a model whose forward needs values falls back to fake tensors (big
    models, no activation memory) or real ones: the sites must be the same every way."""
    from surgeon.surgery import meta, shapes

    model = timm.create_model("resnet18").eval()
    runs = []
    real_run = meta.run
    monkeypatch.setattr(meta, "run", lambda *a, **k: runs.append(1) or real_run(*a, **k))
    on_meta = surgeon.sites(model, input_size=(3, 64, 64))
    assert runs, "the meta-tensor path was not taken"

    def needs_values(*_a, **_k):
        raise meta.NeedsValues("test")

    monkeypatch.setattr(meta, "run", needs_values)
    real = surgeon.sites(model, input_size=(3, 64, 64))
    monkeypatch.setattr(shapes, "SMALL_MODEL_PARAMS", 0)
    calls = []
    from torch._subclasses import fake_tensor

    class Spy(fake_tensor.FakeTensorMode):
        def __init__(self, *a, **kw):
            calls.append(1)
            super().__init__(*a, **kw)

    monkeypatch.setattr(fake_tensor, "FakeTensorMode", Spy)
    fake = surgeon.sites(model, input_size=(3, 64, 64))
    assert calls, "the fake-tensor path was not taken"
    assert [(s.name, s.kind, s.shape) for s in fake] == [(s.name, s.kind, s.shape) for s in real] \
        == [(s.name, s.kind, s.shape) for s in on_meta]


class BroadcastContextConcat(torch.nn.Module):
    """A concat whose inputs both descend from a broadcast add of a (B, C, 1, 1) mean: no upsampling, no skip."""

    def __init__(self):
        super().__init__()
        self.a = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.b = torch.nn.Conv2d(8, 8, 3, padding=1)
        self.c = torch.nn.Conv2d(16, 4, 1)

    def forward(self, x):
        f = self.a(x)
        h = f + f.mean((2, 3), keepdim=True)
        return self.c(torch.cat([h, self.b(h)], 1))


def test_skip_finder_ignores_broadcast_means():
    m = BroadcastContextConcat().eval()
    assert names(m, "skip", input_size=(3, 16, 16)) == []
    # the CLI-facing listing of every kind does not crash on it either
    for kind in ("residual", "after_conv", "pool", "stage", "conv"):
        names(m, kind, input_size=(3, 16, 16))


class SharedCoarseConcat(torch.nn.Module):
    """Both concat inputs descend from the same upsampled coarse feature: the skip is not an encoder's."""

    def __init__(self):
        super().__init__()
        self.a = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.down = torch.nn.Conv2d(8, 8, 3, stride=2, padding=1)
        self.b = torch.nn.Conv2d(8, 8, 3, padding=1)

    def forward(self, x):
        f = self.a(x)
        u = torch.nn.functional.interpolate(self.down(f), scale_factor=2.0)
        return torch.cat([f + u, self.b(u)], 1)


def test_skip_finder_needs_a_skip_apart_from_the_decoder():
    assert names(SharedCoarseConcat().eval(), "skip", input_size=(3, 16, 16)) == []


def test_a_model_wrapped_in_data_parallel_gets_the_wrapped_models_sites():
    # nn.DataParallel's forward takes `*inputs`: the input is an element of a packed placeholder, and the
    # layouts (hence which attention acts where) follow from it as from a plain input
    model = torch.nn.DataParallel(timm.create_model("resnet18").eval())
    x = torch.randn(2, 3, 64, 64)
    sites = surgeon.sites(model, kind="residual", example_input=x)
    assert len(sites) == 8 and {s.layout for s in sites} == {"nchw"}
    patched = surgeon.add(model, "se", example_input=x)  # residual, as for the bare model; verified
    assert type(patched) is torch.nn.DataParallel and [e.site for e in surgeon.edits(patched)][:2] == [
        "module.layer1.0", "module.layer1.1"] and len(surgeon.edits(patched)) == 8


def _random_graph_view(seed: int, size: int):
    """A GraphView of a random data-flow DAG: each node adds one or two earlier nodes."""
    import operator
    import random

    import torch.fx as fx

    from surgeon.surgery.graph import GraphView

    rng = random.Random(seed)
    g = fx.Graph()
    nodes = [g.placeholder("x"), g.placeholder("y")]
    for _ in range(size):
        ins = rng.sample(nodes, k=min(len(nodes), rng.choice((1, 2))))
        nodes.append(g.call_function(operator.add, tuple(ins) if len(ins) == 2 else (ins[0], 1)))
    g.output(nodes[-1])
    return GraphView(fx.GraphModule(torch.nn.Module(), g)), nodes


@pytest.mark.parametrize("seed", range(8))
def test_branches_are_the_ancestors_one_side_has_and_the_other_lacks(seed):
    import random

    view, nodes = _random_graph_view(seed, 60)
    rng = random.Random(seed)
    for _ in range(40):
        a, b = rng.sample(nodes, 2)
        anc_a, anc_b = view.ancestors(a) | {a}, view.ancestors(b) | {b}
        assert view.branches(a, b) == (anc_a - anc_b, anc_b - anc_a)
    assert view.branches(nodes[5], nodes[5]) == (set(), set())


class _DropLayer(torch.nn.Module):
    """torchvision's dense layer in small: its forward reads `self.training` (functional dropout), and it makes
    a tensor constant."""

    def __init__(self, c):
        super().__init__()
        self.conv = torch.nn.Conv2d(c, c, 3, padding=1)
        self.bn = torch.nn.BatchNorm2d(c)

    def forward(self, x):
        y = torch.relu(self.bn(self.conv(x))) * torch.tensor(0.5)
        return x + torch.nn.functional.dropout(y, p=0.1, training=self.training)


class _DropNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.layers = torch.nn.Sequential(_DropLayer(8), _DropLayer(8))
        self.head = torch.nn.Linear(8, 2)

    def forward(self, x):
        return self.head(self.layers(self.stem(x)).mean((2, 3)))


def test_layers_inside_a_module_that_reads_its_training_flag_are_sites():
    """A module whose forward reads `self.training` is traced alone in both modes; the convolutions it holds are
    sites like any other (they were hidden inside it: torchvision's densenet121 showed 4 of its 120)."""
    m = _DropNet().eval()
    assert names(m, "after_conv") == ["stem", "layers.0.conv", "layers.1.conv"]
    assert names(m, "residual") == ["layers.0.add", "layers.1.add"]  # each layer is a graph of its own
    patched = surgeon.add(m, "se", kind="after_conv", input_size=(3, 16, 16))  # verified: identity at init
    x = torch.randn(2, 3, 16, 16)
    assert torch.equal(patched(x), m(x))
    assert sum(type(mod).__name__ == "SEModule" for mod in patched.modules()) == 3
    patched.train()
    torch.manual_seed(0)
    a = patched(x)
    torch.manual_seed(0)
    assert torch.equal(a, m.train()(x))  # the dropouts still follow the mode (and draw as the original's)


def test_torchvision_densenet_layers_are_sites():
    import torchvision

    m = torchvision.models.densenet121().eval()
    convs = [n for n, mod in m.named_modules() if isinstance(mod, torch.nn.Conv2d)]
    assert sorted(names(m, "after_conv", input_size=(3, 64, 64))) == sorted(convs)


def test_modules_traced_alone_that_are_alike_are_traced_once(monkeypatch):
    """The two identical dense layers of `_DropNet` are traced alone (they read their training flag): the second
    takes the first one's graph on itself (a ViT's twelve attentions cost one trace), and both have their sites."""
    from surgeon.surgery import trace as trace_module

    traced = []
    real = trace_module._trace_whole
    monkeypatch.setattr(trace_module, "_trace_whole",
                        lambda module, *a, **k: traced.append(type(module).__name__) or real(module, *a, **k))
    found = surgeon.sites(_DropNet().eval(), kind="after_conv", input_size=(3, 16, 16))
    assert traced.count("_DropLayer") == 1
    assert [s.name for s in found] == ["stem", "layers.0.conv", "layers.1.conv"]
