"""Layouts derived from the ops (surgery/layout.py), attentions on the channel axis of every layout, and
spatial/mixed attentions on 1-D and 3-D maps (Conv1d networks, video models)."""
import pytest
import timm
import torch
import torch.fx as fx
import torchvision
from torch import nn

import surgeon
from surgeon.errors import NoSitesError, OptionError, ShapeError
from surgeon.layers import (BAM, CBAM, ChannelsLast, CoordAttn, SEModule, SpatialAttn, SpatialTransformer,
                            TripletAttention)
from surgeon.record import verification
from surgeon.surgery import layout
from surgeon.surgery.shapes import _Recorder


class NHWCBlock(nn.Module):
    """A ConvNeXt-style block that works channels last: LayerNorm and an MLP over (N, H, W, C)."""

    def __init__(self, c: int):
        super().__init__()
        self.norm, self.fc1, self.act, self.fc2 = nn.LayerNorm(c), nn.Linear(c, 2 * c), nn.GELU(), nn.Linear(2 * c, c)

    def forward(self, x):
        return x + self.fc2(self.act(self.fc1(self.norm(x))))


class NHWCNet(nn.Module):
    """A conv stem, then channels-last blocks, then a head: the blocks' residual sites are NHWC."""

    def __init__(self, c: int = 16):
        super().__init__()
        self.stem = nn.Conv2d(3, c, 3, padding=1)
        self.blocks = nn.Sequential(NHWCBlock(c), NHWCBlock(c))
        self.head = nn.Linear(c, 10)

    def forward(self, x):
        return self.head(self.blocks(self.stem(x).permute(0, 2, 3, 1)).mean((1, 2)))


class ResBlock(nn.Module):
    def __init__(self, c: int, dims: int):
        super().__init__()
        conv, bn = {1: (nn.Conv1d, nn.BatchNorm1d), 3: (nn.Conv3d, nn.BatchNorm3d)}[dims]
        self.body = nn.Sequential(conv(c, c, 3, padding=1), bn(c), nn.ReLU(), conv(c, c, 3, padding=1), bn(c))

    def forward(self, x):
        return torch.relu(x + self.body(x))


class SmallCNN(nn.Module):
    """A small residual CNN over (N, C, L) sequences (audio features; dims=1) or (N, C, T, H, W) clips (dims=3)."""

    def __init__(self, dims: int, c: int = 16):
        super().__init__()
        conv, bn = {1: (nn.Conv1d, nn.BatchNorm1d), 3: (nn.Conv3d, nn.BatchNorm3d)}[dims]
        self.stem = nn.Sequential(conv(8, c, 5, padding=2), bn(c), nn.ReLU())
        self.blocks = nn.Sequential(ResBlock(c, dims), ResBlock(c, dims))
        self.head = nn.Linear(c, 4)

    def forward(self, x):
        return self.head(self.blocks(self.stem(x)).flatten(2).mean(2))


def _gamma_one(module: nn.Module) -> nn.Module:
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.endswith("gamma"):
                p.fill_(1.0)
            elif p.dim() >= 1 and "bn" not in name:
                p.add_(torch.randn_like(p) * 0.5)  # weights away from their init, so gates differ per channel
    return module.eval()


def _scales_channels(module: nn.Module, shape: tuple, channel_dim: int) -> bool:
    """Whether the module (gates open) scales x by weights that depend on the channel only: constant over every
    position, different across channels."""
    x = torch.rand(shape, generator=torch.Generator().manual_seed(0)) + 0.5
    with torch.no_grad():
        ratio = _gamma_one(module)(x) / x
    per_channel = ratio.movedim(channel_dim, -1).flatten(1, -2)  # (N, positions, C)
    constant_over_positions = torch.allclose(per_channel, per_channel[:, :1], atol=1e-5)
    return constant_over_positions and per_channel[:, 0].std(-1).min() > 1e-4


class _Leaves(fx.Tracer):
    def is_leaf_module(self, m, qualname):
        return "norm" in type(m).__name__.lower() or super().is_leaf_module(m, qualname)


def _dims_of(fn, *example):
    gm = fx.GraphModule(fn, _Leaves().trace(fn)) if isinstance(fn, nn.Module) else fx.symbolic_trace(fn)
    _Recorder(gm).run(*example)
    nodes, modules = list(gm.graph.nodes), dict(gm.named_modules())
    channel, batch = layout.derive(nodes, modules)
    mixed = layout.mixed_positions(nodes, modules, channel, batch)
    return {n.name: layout.layout(n.meta.get("shape"), channel[n], batch[n], n in mixed) for n in gm.graph.nodes
            if isinstance(n.meta.get("shape"), tuple) and all(isinstance(d, int) for d in n.meta["shape"])}


# -- deriving layouts ----------------------------------------------------------------------------------

def test_layout_follows_the_producing_op_through_permutes_and_reshapes():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.norm, self.fc = nn.Conv2d(3, 8, 1), nn.LayerNorm(8), nn.Linear(8, 8)

        def forward(self, x):
            a = self.conv(x)                       # (N, 8, 4, 6): conv → channels at 1
            b = a.permute(0, 2, 3, 1)              # NHWC
            c = self.fc(self.norm(b))              # still NHWC
            d = c.reshape(2, 24, 8)                # tokens (N, L, C)
            e = d.transpose(0, 1)                  # time first (L, N, C)
            f = c.permute(0, 3, 1, 2)              # back to NCHW
            g = f.flatten(2)                       # (N, C, L)
            return e, g, x + 1

    got = _dims_of(M(), torch.randn(2, 3, 4, 6))
    assert [got[k] for k in ("conv", "permute", "fc", "reshape", "transpose", "permute_1", "flatten")] == \
        ["nchw", "nhwc", "nhwc", "nlc", "lnc", "nchw", "nchw"]
    # a graph input whose first consumer is a conv is channels first; `x + 1` keeps it
    assert got["x"] == got["add"] == "nchw"


def test_batch_stays_leading_through_window_folds():
    """Swin-style windows fold the batch into dim 0 ((B·windows, N, C)) and unfold it again: the result is
    still NHWC with the batch first."""
    class Windows(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(8, 8)

        def forward(self, x):  # (2, 4, 6, 8) channels last
            w = self.fc(x).view(2, 2, 2, 3, 2, 8).permute(0, 1, 3, 2, 4, 5).reshape(-1, 4, 8)  # (12, 4, 8)
            w = w * 2
            return w.view(2, 2, 3, 2, 2, 8).permute(0, 1, 3, 2, 4, 5).reshape(2, 4, 6, 8)

    got = _dims_of(Windows(), torch.randn(2, 4, 6, 8))
    assert (got["mul"], got["reshape_1"]) == ("nlc", "nhwc")


class TvWindows(nn.Module):
    """torchvision MaxViT's partition: (B, C, H, W) → (B, windows, positions, C), where `windows` runs over
    both H and W: a list of positions, not a grid; its departition gives the grid back."""

    def __init__(self, p: int = 2, grid_swap: bool = False):
        super().__init__()
        self.p, self.grid_swap = p, grid_swap
        self.conv, self.fc = nn.Conv2d(3, 8, 1), nn.Linear(8, 8)

    def forward(self, x):
        x = self.conv(x)
        b, c, h, w = x.shape
        p = self.p
        t = x.reshape(b, c, h // p, p, w // p, p).permute(0, 2, 4, 3, 5, 1).reshape(b, (h // p) * (w // p), p * p, c)
        if self.grid_swap:
            t = t.swapaxes(-2, -3)
        first, second, third = self.fc(t).split(3, -1)  # 8 channels in 3 parts
        t = t + torch.cat([first, second, third], -1)
        if self.grid_swap:
            t = t.swapaxes(-2, -3)
        back = t.reshape(b, h // p, w // p, p, p, c).permute(0, 5, 1, 3, 2, 4).reshape(b, c, h, w)
        return back.permute(0, 2, 3, 1) * 2


@pytest.mark.parametrize("grid_swap", [False, True])
def test_windows_merging_both_image_axes_are_positions_not_a_grid(grid_swap):
    got = _dims_of(TvWindows(grid_swap=grid_swap), torch.randn(2, 3, 4, 6))
    # (2, 6, 4, 8): windows × positions, channels last; the branch whose trail is lost (an op returning a tuple,
    # as an attention does) takes the positions of what it is added to
    assert got["reshape_1"] == got["cat"] == got["add"] == "nlc"
    assert (got["reshape_2"], got["reshape_3"], got["mul_1"]) == ("nhwc", "nchw", "nhwc")  # the grid is back


def test_windows_of_another_size_after_a_departition_are_positions_too():
    """Partition 6×6 into 2×2 windows, merge back, partition into 3×3 windows: the merged H is one axis again
    (its parts 3 and 2 coalesce), so the second partition's windows are seen to mix H and W as well."""
    def part(x, p):
        b, c, h, w = x.shape
        return x.reshape(b, c, h // p, p, w // p, p).permute(0, 2, 4, 3, 5, 1).reshape(b, (h // p) * (w // p), p * p, c)

    def unpart(t, p, h, w):
        b, _, _, c = t.shape
        return t.reshape(b, h // p, w // p, p, p, c).permute(0, 5, 1, 3, 2, 4).reshape(b, c, h, w)

    def fn(x):
        y = torch.nn.functional.conv2d(x, torch.ones(4, 3, 1, 1))
        return part(unpart(part(y, 2) * 2, 2, 6, 6), 3) * 3

    got = _dims_of(fn, torch.randn(2, 3, 6, 6))
    assert (got["mul_1"], got["reshape_3"], got["mul_3"]) == ("nlc", "nchw", "nlc")


def test_a_window_grid_reversed_by_merging_parts_of_one_axis_stays_a_grid():
    """(B, H/p, W/p, p, p, C) merged back to (B, H, W, C) after the window dims were split and moved: every
    merged dim holds parts of one axis only."""
    def fn(x):  # (2, 4, 6, 8) channels last, made so by the linear layer below
        y = torch.nn.functional.linear(x, torch.eye(8))
        w = y.view(2, 2, 2, 3, 2, 8).permute(0, 1, 3, 2, 4, 5)                 # (2, 2, 3, 2, 2, 8)
        return w.reshape(2, 6, 4, 8), w.permute(0, 1, 3, 2, 4, 5).reshape(2, 4, 6, 8)

    got = _dims_of(fn, torch.randn(2, 4, 6, 8))
    assert (got["reshape"], got["reshape_1"]) == ("nlc", "nhwc")


class MHAEncoder(nn.Module):
    """torchvision's ViT encoder block in small: nn.MultiheadAttention returns (out, weights)."""

    def __init__(self, c: int = 16):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(c), nn.LayerNorm(c)
        self.attn = nn.MultiheadAttention(c, 2, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(c, 2 * c), nn.GELU(), nn.Linear(2 * c, c))

    def forward(self, x):
        y = self.norm1(x)
        y, _ = self.attn(y, y, y, need_weights=False)
        x = x + y
        return x + self.mlp(self.norm2(x))


def test_an_attention_returning_a_tuple_keeps_its_query_layout():
    model = MHAEncoder().eval()
    assert list(_layouts(model, None, example_input=torch.randn(2, 5, 16)).values()) == ["nlc", "nlc"]
    assert len(surgeon.edits(surgeon.add(model, "se", example_input=torch.randn(2, 5, 16)))) == 2


class _RmsBlock(nn.Module):
    """Llama's block in small: a traced RMS norm (no op fixing the channels) before an attention returning a tuple,
    then an MLP whose linear layer fixes them: both residuals are token residuals."""

    def __init__(self, c: int = 16):
        super().__init__()
        self.attn, self.fc = nn.MultiheadAttention(c, 2, batch_first=True), nn.Linear(c, c)

    def forward(self, x):
        h = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.fc(x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6))


def test_the_operands_of_an_addition_learn_each_others_dims():
    got = _dims_of(_RmsBlock(), torch.randn(2, 5, 16))
    assert (got["x"], got["mul"], got["getitem"], got["add_1"], got["add_3"]) == ("nlc",) * 5
    sites = surgeon.sites(_RmsBlock().eval(), kind="residual", example_input=torch.randn(2, 5, 16))
    assert [s.layout for s in sites] == ["nlc", "nlc"]


def test_nothing_fixes_a_layout_it_is_unknown_not_assumed():
    got = _dims_of(lambda x: torch.sigmoid(x) * 2, torch.randn(2, 3, 4, 5))
    assert set(got.values()) == {"unknown"}


def test_norm_named_2d_is_channels_first():
    norm = timm.layers.LayerNorm2d(8)  # a subclass of nn.LayerNorm that normalises dim 1
    got = _dims_of(nn.Sequential(norm, nn.LayerNorm(8)), torch.randn(2, 8, 5, 8))
    assert (got["_0"], got["_1"]) == ("nchw", "nhwc")


# -- attentions act on the channel axis of the site's layout -------------------------------------------

def test_nhwc_toy_se_reduces_positions_and_weights_channels():
    model = NHWCNet().eval()
    sites = surgeon.sites(model, kind="residual", input_size=(3, 8, 12))
    assert [(s.name, s.layout, s.shape) for s in sites] == [("blocks.0", "nhwc", (2, 8, 12, 16)),
                                                              ("blocks.1", "nhwc", (2, 8, 12, 16))]
    patched = surgeon.add(model, "se", input_size=(3, 8, 12))
    assert verification(patched).max_abs_diff == 0
    edits = surgeon.edits(patched)
    assert len(edits) == 2
    for e in edits:
        se = patched.get_submodule(e.module)
        assert isinstance(se, ChannelsLast) and isinstance(se.module, SEModule)
        assert se.module.fc1.in_features == 16  # the channel dim, not H (8) or W (12)
        assert _scales_channels(se, (2, 8, 12, 16), channel_dim=3)


@pytest.mark.parametrize("attention", ["cbam", "spatial", "coord", "triplet", "bam", "scse"])
def test_nhwc_toy_spatial_and_mixed_attentions_stay_identity(attention):
    model = NHWCNet().eval()
    patched = surgeon.add(model, attention, input_size=(3, 8, 12))
    assert verification(patched).max_abs_diff == 0
    inner = patched.get_submodule(surgeon.edits(patched)[0].module)
    assert isinstance(inner, ChannelsLast)


def _layouts(model, input_size, kind="residual", **kw):
    return {s.name: s.layout for s in surgeon.sites(model, kind=kind, input_size=input_size, **kw)}


def test_convnext_nhwc_inside_its_blocks():
    """timm's ConvNeXt (conv_mlp=False, as convnext_tiny and up) computes its MLP channels last (permute,
    LayerNorm, Linear), then permutes back: the residual sites are NCHW, the MLP's values NHWC; with
    conv_mlp=True (convnext_atto's default) the MLP is 1×1 convs and stays NCHW."""
    from surgeon.planning import _prepare
    from surgeon.surgery.sites import find_residual

    for conv_mlp, inside in ((False, ("nhwc", 3)), (True, ("nchw", 1))):
        model = timm.create_model("convnext_atto", conv_mlp=conv_mlp).eval()
        view = next(v for v in _prepare(model, example_input=None, input_size=(3, 32, 32)).views if v.prefix == "")
        fc1 = next(n for n in view.nodes if n.target == "stages.1.blocks.0.mlp.fc1")
        assert (view.layout(fc1), view.channel_dim(fc1)) == inside
        assert {s.layout for s in find_residual(view)} == {"nchw"}


def test_maxvit_channels_last_sites_are_nhwc_and_se_gates_channels():
    model = timm.create_model("maxvit_nano_rw_256", img_size=64).eval()
    lay = _layouts(model, (3, 64, 64))
    # MBConv blocks are NCHW; the block and grid attention blocks work on (N, H, W, C)
    assert {k: v for k, v in lay.items() if k.endswith(".conv")} == {f"stages.{i}.blocks.{j}.conv": "nchw"
                                                                    for i, j in ((0, 0), (1, 0), (1, 1), (2, 0),
                                                                                 (2, 1), (2, 2), (3, 0))}
    assert sum(v == "nhwc" for v in lay.values()) == 28 and len(lay) == 35
    patched = surgeon.add(model, "se", input_size=(3, 64, 64), at=["stages.1.blocks.1*"])
    assert verification(patched).max_abs_diff <= 1e-5
    checked = 0
    for e in surgeon.edits(patched):
        se = patched.get_submodule(e.module)
        channel_dim = 3 if isinstance(se, ChannelsLast) else 1
        assert channel_dim == {"nhwc": 3, "nchw": 1}[lay[e.site]]
        assert _scales_channels(se, e.shape, channel_dim)
        checked += 1
    assert checked == 5


@pytest.mark.slow
def test_torchvision_maxvit_window_tensors_get_channel_attention_only():
    """Its 44 attention residuals hold (B, windows, positions, C): se acts there on channels, cbam's spatial
    convolution (a grid op) does not; the 11 MBConv residuals are NCHW."""
    model = torchvision.models.maxvit_t().eval()
    lay = _layouts(model, (3, 224, 224))
    assert sum(v == "nlc" for v in lay.values()) == 44 and "nhwc" not in lay.values()
    se = surgeon.plan(model, "se", input_size=(3, 224, 224))
    cbam = surgeon.plan(model, "cbam", input_size=(3, 224, 224))
    assert sorted(e.site.layout for e in se.edits) == ["nchw"] * 11 + ["nlc"] * 44
    assert [e.site.layout for e in cbam.edits] == ["nchw"] * 11


def test_swin_torchvision_residuals_are_nhwc():
    model = torchvision.models.swin_t().eval()
    lay = _layouts(model, (3, 64, 64))
    assert len(lay) == 24 and set(lay.values()) == {"nhwc"}


@pytest.mark.slow
def test_swin_timm_cbam_on_its_nhwc_residuals():
    model = timm.create_model("swin_tiny_patch4_window7_224", img_size=128).eval()
    lay = _layouts(model, (3, 128, 128))
    assert sorted(lay.values()).count("nhwc") == 12
    patched = surgeon.add(model, "cbam", input_size=(3, 128, 128))
    assert len(surgeon.edits(patched)) == 12 and verification(patched).max_abs_diff <= 1e-5


# -- tokens: channel attentions in every block, others named ---------------------------------------------

def test_vit_se_in_every_block_over_the_embedding_dim():
    model = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=3).eval()
    patched = surgeon.add(model, "se", input_size=(3, 32, 32))
    edits = surgeon.edits(patched)
    assert [e.site for e in edits] == [f"blocks.{i}{s}" for i in range(3) for s in ("", "#1")]
    assert verification(patched).max_abs_diff <= 1e-5
    se = patched.get_submodule(edits[0].module)
    assert isinstance(se, ChannelsLast) and se.module.fc1.in_features == 192
    assert _scales_channels(se, edits[0].shape, channel_dim=2)  # the same weight for every token


def test_vit_cbam_names_the_attentions_that_fit():
    model = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2).eval()
    with pytest.raises(NoSitesError, match=r"its 4 residual sites are nlc: se, eca, gc, srm act there"):
        surgeon.plan(model, "cbam", input_size=(3, 32, 32))


def test_cli_cbam_on_tokens_is_one_line(tmp_path):
    from click.testing import CliRunner

    from surgeon.cli import cli

    res = CliRunner().invoke(cli, ["add", "cbam", "vit_tiny_patch16_224", "--model-arg", "depth=1",
                                    "--model-arg", "img_size=32", "--model-arg", "patch_size=8",
                                    "--input-size", "3,32,32", "--dry-run"])
    assert res.exit_code == 2
    assert "se, eca, gc, srm act there" in res.output and "Traceback" not in res.output


# -- 1-D and 3-D maps --------------------------------------------------------------------------------------

@pytest.mark.parametrize("dims, attention", [(1, "cbam"), (1, "bam"), (1, "spatial"), (1, "scse"), (1, "triplet"),
                                             (3, "cbam"), (3, "coord"), (3, "stn"), (3, "triplet")])
def test_conv1d_and_conv3d_networks(dims, attention):
    torch.manual_seed(0)
    size = {1: (8, 40), 3: (8, 4, 6, 10)}[dims]
    patched = surgeon.add(SmallCNN(dims).eval(), attention, kind="residual", input_size=size)
    edits = surgeon.edits(patched)
    assert [e.site for e in edits] == ["blocks.0", "blocks.1"] and edits[0].shape == (2, 16, *size[1:])
    assert verification(patched).max_abs_diff <= 1e-5
    convs = [m for m in patched.get_submodule(edits[0].module).modules() if isinstance(m, nn.modules.conv._ConvNd)]
    conv = {1: nn.Conv1d, 3: nn.Conv3d}[dims]
    assert all(isinstance(c, conv) for c in convs) and (convs or attention == "scse")  # scSE: linear maps


@pytest.mark.parametrize("attention", ["coord", "stn"])
def test_conv1d_network_refuses_what_does_not_carry(attention):
    with pytest.raises(ShapeError, match=r"needs a .*\(N, C, H, W\) or \(N, C, D, H, W\) feature map; "
                                         r"site .blocks.0. has shape \(2, 16, 40\)"):
        surgeon.add(SmallCNN(1).eval(), attention, kind="residual", input_size=(8, 40), at=["blocks.0"])


VIDEO = {"r3d_18": (3, 4, 32, 32), "mc3_18": (3, 4, 32, 32), "r2plus1d_18": (3, 4, 32, 32),
         "swin3d_t": (3, 4, 64, 64), "s3d": (3, 16, 224, 224), "mvit_v2_s": (3, 16, 224, 224)}


def _video(name: str, attention: str) -> nn.Module:
    torch.manual_seed(0)
    model = getattr(torchvision.models.video, name)().eval()
    patched = surgeon.add(model, attention, input_size=VIDEO[name])
    assert verification(patched).max_abs_diff <= 1e-5
    return patched


@pytest.mark.slow
def test_video_r3d_cbam_3d():
    patched = _video("r3d_18", "cbam")
    edits = surgeon.edits(patched)
    assert len(edits) == 8 and edits[0].shape == (2, 64, 4, 16, 16)
    cbam = patched.get_submodule(edits[0].module)
    assert isinstance(cbam, CBAM) and isinstance(cbam.spatial.conv, nn.Conv3d)


@pytest.mark.slow
@pytest.mark.parametrize("name", list(VIDEO))
@pytest.mark.parametrize("attention", ["cbam", "bam", "spatial"])
def test_video_models(name, attention):
    assert surgeon.edits(_video(name, attention))


# -- the layers themselves ---------------------------------------------------------------------------------

@pytest.mark.parametrize("dims", [1, 2, 3])
@pytest.mark.parametrize("cls", [CBAM, BAM, SpatialAttn, TripletAttention])
def test_layers_by_rank_start_as_identity(cls, dims):
    x = torch.randn(2, 16, *([5] * dims))
    m = cls(16, dims=dims, identity=True).eval()
    assert torch.equal(m(x), x)
    convs = [c for c in m.modules() if isinstance(c, nn.modules.conv._ConvNd)]
    assert convs and all(c.weight.dim() == dims + 2 for c in convs)


def test_triplet_branches_by_rank():
    assert [n for _, n in TripletAttention(8, dims=2).branches] == ["cw", "hc", "hw"]  # the 2-D names, kept
    assert [n for _, n in TripletAttention(8, dims=1).branches] == ["c", "l"]
    assert [n for _, n in TripletAttention(8, dims=3).branches] == ["chw", "dcw", "dhc", "dhw"]


def test_triplet_3d_pools_each_axis():
    m = _gamma_one(TripletAttention(4, dims=3, identity=True))
    x = torch.rand(1, 4, 3, 5, 6) + 0.5
    w = {name: getattr(m, name)(x.transpose(1, a)).transpose(1, a).shape for a, name in m.branches}
    assert w == {"dhw": (1, 1, 3, 5, 6), "chw": (1, 4, 1, 5, 6), "dcw": (1, 4, 3, 1, 6), "dhc": (1, 4, 3, 5, 1)}


def test_coord_3d_gates_each_direction():
    m = CoordAttn(16, dims=3, identity=True).eval()
    assert [n for n, _ in m.named_children() if n.startswith("conv_")] == ["conv_d", "conv_h", "conv_w"]
    x = torch.randn(2, 16, 3, 4, 5)
    assert torch.equal(m(x), x)
    with pytest.raises(OptionError, match="dims=1"):
        CoordAttn(16, dims=1)


def test_stn_3d_starts_at_the_identity_transform():
    m = SpatialTransformer(8, dims=3).eval()
    assert m.theta.out_features == 12
    x = torch.randn(2, 8, 4, 6, 6)
    assert torch.equal(m(x), x)
    with pytest.raises(OptionError, match="dims"):
        SpatialTransformer(8, dims=4)


def test_channels_last_wrapper_is_exact_and_moves_the_channel_dim():
    se = SEModule(6, identity=True)
    x = torch.randn(2, 3, 4, 6)
    assert torch.equal(ChannelsLast(se)(x), x)
    assert _scales_channels(ChannelsLast(SEModule(6, identity=True)), (2, 3, 4, 6), channel_dim=3)


def test_tokens_from_an_opaque_embedding_that_returns_a_tuple():
    """timm NaFlexViT embeds the image in a leaf module returning (tokens, grid): the batch stays at dim 0 of
    the tokens, so its residuals are nlc and se acts there (all 14 NaFlexViTs were refused: 'unknown')."""
    model = timm.create_model("naflexvit_base_patch16_gap", depth=2, embed_dim=64, num_heads=2, img_size=64).eval()
    plan = surgeon.plan(model, "se", input_size=(3, 64, 64))
    assert [(e.site.name, e.site.layout) for e in plan.edits] == [
        ("blocks.0", "nlc"), ("blocks.0#1", "nlc"), ("blocks.1", "nlc"), ("blocks.1#1", "nlc")]
    patched = plan.apply()
    assert plan.verification.max_abs_diff == 0
    x = torch.randn(2, 3, 64, 64)
    assert torch.equal(patched(x), model(x))


class _ParallelTokens(nn.Module):
    """Two branches summed from a stack, as timm's parallel ViT blocks (vit_base_patch16_18x2_224) do."""

    def __init__(self, c: int = 16):
        super().__init__()
        self.embed = nn.Linear(8, c)
        self.branches = nn.ModuleList([nn.Sequential(nn.LayerNorm(c), nn.Linear(c, c)) for _ in range(2)])
        self.head = nn.Linear(c, 3)

    def forward(self, x):
        x = self.embed(x)
        x = x + torch.stack([b(x) for b in self.branches], dim=1).sum(dim=1)
        return self.head(x.mean(1))


def test_layouts_go_through_stack_and_a_reduction_over_the_stacked_dim():
    plan = surgeon.plan(_ParallelTokens().eval(), "se", kind="residual", example_input=torch.randn(2, 10, 8))
    assert [(e.site.name, e.site.layout) for e in plan.edits] == [("add", "nlc")]
    patched = plan.apply()
    assert plan.verification.max_abs_diff == 0
    x = torch.randn(2, 10, 8)
    assert torch.equal(patched(x), plan.model(x))
