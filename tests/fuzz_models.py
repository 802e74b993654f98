"""Random small models for the property-based test (tests/test_fuzz.py), written as Python source.

A drawn spec becomes the source text of an nn.Module class (so a failure's reproducer is the source
itself), compiled under a linecache entry so that `inspect.getsource` works on it as on a file.

CNN features: residual adds written every way (`x + y`, `x += y`, `torch.add`, `.add_`), channel concats,
a module called twice, module and functional pooling / norm (F.batch_norm with training=self.training as a
keyword) / dropout, `with torch.no_grad():` regions, in-place ops whose results are not reassigned, an
input op (`x = x.sub(self.mean)`), forward hooks on a leaf and on a non-leaf submodule, a second input.
Sequence features: an embedding with or without padding_idx, LSTM/GRU (batch first or not, bidirectional,
packed with lengths or not), readouts (last step, h_n, both directions' h_n, mean, per step), a
transformer-like residual block over the tokens, a second input (a context vector).
"""
from __future__ import annotations

import inspect
import itertools
import linecache

import torch
from hypothesis import strategies as st
from torch import nn

import seq_models

ADD_STYLES = ("plus", "iadd", "torch_add", "add_")
CNN_BLOCKS = ("res", "cat", "shared", "pool_module", "pool_functional", "bn_functional", "dropout_module",
              "dropout_functional", "no_grad", "inplace_unassigned", "conv")
HOOKS = ("none", "leaf", "nonleaf")
HEADS = ("module", "functional", "mean")

_counter = itertools.count()


# -- the spec ---------------------------------------------------------------------------------------------
@st.composite
def cnn_specs(draw):
    return {
        "family": "cnn",
        "width": draw(st.sampled_from([4, 8])),
        "input_op": draw(st.booleans()),
        "two_inputs": draw(st.booleans()),
        "stem_bn": draw(st.booleans()),
        "blocks": draw(st.lists(st.tuples(st.sampled_from(CNN_BLOCKS), st.sampled_from(ADD_STYLES)),
                                min_size=1, max_size=5)),
        "hook": draw(st.sampled_from(HOOKS)),
        "head": draw(st.sampled_from(HEADS)),
        "aux_no_grad": draw(st.booleans()),  # a second output computed under no_grad (requires_grad False)
    }


@st.composite
def seq_specs(draw):
    packed = draw(st.booleans())
    readout = draw(st.sampled_from(["last", "h_n", "h_n_cat", "mean", "per_step"]))
    bidirectional = draw(st.booleans())
    if readout == "h_n_cat" and not bidirectional:
        readout = "h_n"
    if packed and readout == "last":
        readout = "h_n"  # the last padded step of a packed output is padding for shorter samples
    return {
        "family": "seq",
        "cell": draw(st.sampled_from(["LSTM", "GRU"])),
        "batch_first": True if packed else draw(st.booleans()),
        "bidirectional": bidirectional,
        "num_layers": draw(st.sampled_from([1, 2])),
        "packed": packed,
        "padding_idx": draw(st.sampled_from([None, 0])),
        "readout": readout,
        "block": draw(st.booleans()),
        "context": draw(st.booleans()),
    }


specs = st.one_of(cnn_specs(), seq_specs())


# -- source text ------------------------------------------------------------------------------------------
def _combine(style: str, out: str, other: str) -> list[str]:
    """`out` = `out` + `other`, written in one of the ways models write a residual add."""
    return {
        "plus": [f"{out} = {out} + {other}"],
        "iadd": [f"{out} += {other}"],
        "torch_add": [f"{out} = torch.add({out}, {other})"],
        "add_": [f"{out} = {out}.add_({other})"],
    }[style]


def cnn_source(spec: dict, name: str) -> str:
    c = spec["width"]
    init = [f"self.stem = nn.Conv2d(3, {c}, 3, padding=1, bias={not spec['stem_bn']})"]
    if spec["stem_bn"]:
        init.append(f"self.stem_bn = nn.BatchNorm2d({c})")
    fwd = []
    args = "x, y" if spec["two_inputs"] else "x"
    if spec["input_op"]:
        init.append("self.register_buffer('mean', torch.full((1, 3, 1, 1), 0.25))")
        fwd.append("x = x.sub(self.mean)")
    fwd.append("x = self.stem(x)")
    if spec["stem_bn"]:
        fwd.append("x = F.relu(self.stem_bn(x))")
    if spec["two_inputs"]:
        init.append(f"self.stem_y = nn.Conv2d(3, {c}, 1)")
        fwd.append("x = x + self.stem_y(y)")
    size = 16
    nonleaf = None  # the first residual branch (an nn.Sequential): where a non-leaf hook goes
    for i, (kind, style) in enumerate(spec["blocks"]):
        b = f"b{i}"
        if kind == "res":
            init += [f"self.{b} = nn.Sequential(nn.Conv2d({c}, {c}, 3, padding=1, bias=False), nn.BatchNorm2d({c}), "
                     f"nn.ReLU(), nn.Conv2d({c}, {c}, 3, padding=1, bias=False), nn.BatchNorm2d({c}))"]
            fwd += [f"r = self.{b}(x)", *_combine(style, "r", "x"), "x = F.relu(r)"]
            nonleaf = nonleaf or b
        elif kind == "cat":
            init += [f"self.{b}a = nn.Conv2d({c}, {c}, 3, padding=1)", f"self.{b}b = nn.Conv2d({c}, {c}, 1)",
                     f"self.{b}m = nn.Conv2d({2 * c}, {c}, 1)"]
            fwd += [f"x = self.{b}m(torch.cat([self.{b}a(x), F.relu(self.{b}b(x))], 1))"]
        elif kind == "shared":
            init += [f"self.{b} = nn.Conv2d({c}, {c}, 3, padding=1)"]
            fwd += [f"x = F.relu(self.{b}(F.relu(self.{b}(x))))"]
        elif kind in ("pool_module", "pool_functional") and size > 4:
            size //= 2
            if kind == "pool_module":
                init += [f"self.{b} = nn.MaxPool2d(2)"]
                fwd += [f"x = self.{b}(x)"]
            else:
                fwd += ["x = F.avg_pool2d(x, 2)" if style in ("plus", "iadd") else "x = F.max_pool2d(x, 2)"]
        elif kind == "bn_functional":
            init += [f"self.register_buffer('{b}_rm', torch.zeros({c}))",
                     f"self.register_buffer('{b}_rv', torch.ones({c}))",
                     f"self.{b}_w = nn.Parameter(torch.ones({c}))"]
            fwd += [f"x = F.batch_norm(x, self.{b}_rm, self.{b}_rv, self.{b}_w, None, training=self.training)"]
        elif kind == "dropout_module":
            init += [f"self.{b} = nn.Dropout(0.25)"]
            fwd += [f"x = self.{b}(x)"]
        elif kind == "dropout_functional":
            fwd += ["x = F.dropout(x, 0.25, training=self.training)"]
        elif kind == "no_grad":
            init += [f"self.{b} = nn.Conv2d({c}, {c}, 1)"]
            fwd += ["with torch.no_grad():", f"    s = self.{b}(x).sigmoid()", "x = x * s"]
        elif kind == "inplace_unassigned":
            init += [f"self.{b} = nn.Conv2d({c}, {c}, 3, padding=1)"]
            fwd += [f"x = self.{b}(x)", "x.relu_()"]
        else:  # conv (and a pool that would make the map too small)
            init += [f"self.{b} = nn.Conv2d({c}, {c}, 3, padding=1)"]
            fwd += [f"x = F.relu(self.{b}(x))"]
    if spec["head"] == "module":
        init.append("self.pool = nn.AdaptiveAvgPool2d(1)")
        fwd.append("x = self.pool(x).flatten(1)")
    elif spec["head"] == "functional":
        fwd.append("x = F.adaptive_avg_pool2d(x, 1).flatten(1)")
    else:
        fwd.append("x = x.mean((2, 3))")
    init.append(f"self.fc = nn.Linear({c}, 5)")
    if spec.get("aux_no_grad"):
        init.append(f"self.aux = nn.Linear({c}, 2)")
        fwd += ["with torch.no_grad():", "    aux = self.aux(x)", "return self.fc(x), aux"]
    else:
        fwd.append("return self.fc(x)")
    if spec["hook"] == "leaf":
        init.append("self.stem.register_forward_hook(lambda m, i, o: o * 0.5)")
    elif spec["hook"] == "nonleaf" and nonleaf:
        init.append(f"self.{nonleaf}.register_forward_hook(lambda m, i, o: o * 0.5)")
    return _class(name, init, args, fwd)


def seq_source(spec: dict, name: str) -> str:
    cell, bf, bi, layers = spec["cell"], spec["batch_first"], spec["bidirectional"], spec["num_layers"]
    hidden, dim, vocab = 8, 6, 20
    out_w = hidden * (2 if bi else 1)
    init = [f"self.emb = nn.Embedding({vocab}, {dim}, padding_idx={spec['padding_idx']})",
            f"self.rnn = nn.{cell}({dim}, {hidden}, num_layers={layers}, batch_first={bf}, bidirectional={bi})"]
    args = ["tokens"]
    fwd = ["e = self.emb(tokens)"]
    if not bf:
        fwd.append("e = e.transpose(0, 1)")
    if spec["packed"]:
        args.append("lengths")
        fwd += ["p = pack_padded_sequence(e, lengths, batch_first=True, enforce_sorted=False)",
                "out, h = self.rnn(p)"]
    else:
        fwd.append("out, h = self.rnn(e)")
    if cell == "LSTM":
        fwd.append("h = h[0]")
    readout = spec["readout"]
    if spec["packed"] and readout in ("mean", "per_step"):
        fwd.append("out, _ = pad_packed_sequence(out, batch_first=True)")
    t = 1 if bf else 0
    width = out_w if readout in ("last", "mean", "per_step", "h_n_cat") else hidden
    if readout == "last":
        fwd.append("z = out[:, -1]" if bf else "z = out[-1]")
    elif readout == "h_n":
        fwd.append("z = h[-1]")
    elif readout == "h_n_cat":
        fwd.append("z = torch.cat([h[-2], h[-1]], 1)")
    elif readout == "mean":
        fwd.append(f"z = out.mean({t})")
    else:  # a per-step layer (a tokens site), maybe a transformer-like block, then the mean
        init.append(f"self.step = nn.Linear({out_w}, {out_w})")
        fwd.append("out = F.relu(self.step(out))")
        if spec["block"]:
            init.append(f"self.blk = Block({out_w})")
            fwd.append("out = self.blk(out)")
        fwd.append(f"z = out.mean({t})")
    if spec["context"]:
        args.append("ctx")
        init.append(f"self.ctx = nn.Linear(4, {width})")
        fwd.append("z = z + self.ctx(ctx)")
    init.append(f"self.fc = nn.Linear({width}, 3)")
    fwd.append("return self.fc(z)")
    return _class(name, init, ", ".join(args), fwd)


BLOCK_SOURCE = inspect.getsource(seq_models.Block) + "\n\n"  # written into the source: reproducers stand alone


def _class(name: str, init: list[str], args: str, fwd: list[str]) -> str:
    lines = [f"class {name}(nn.Module):", "    def __init__(self):", "        super().__init__()"]
    lines += [f"        {ln}" for ln in init]
    lines += ["", f"    def forward(self, {args}):"]
    lines += [f"        {ln}" for ln in fwd]
    return "\n".join(lines) + "\n"


def source(spec: dict, name: str = "Fuzz") -> str:
    """The module source for a spec: imports, helpers and the class `name`."""
    head = ("import torch\nimport torch.nn.functional as F\nfrom torch import nn\n"
            "from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence\n\n\n")
    if spec["family"] == "cnn":
        return head + cnn_source(spec, name)
    return head + BLOCK_SOURCE + seq_source(spec, name)


def build(spec: dict, seed: int = 0) -> tuple[nn.Module, tuple, str]:
    """(model in eval mode, example inputs, its source) for a spec."""
    src = source(spec)
    filename = f"<fuzz-model-{next(_counter)}>"
    linecache.cache[filename] = (len(src), None, src.splitlines(True), filename)
    namespace: dict = {"__name__": "fuzz_generated"}
    exec(compile(src, filename, "exec"), namespace)
    torch.manual_seed(seed)
    model = namespace["Fuzz"]()
    for m in model.modules():  # non-trivial statistics, as a trained network has
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 1.5)
    return model.eval(), example_inputs(spec), src


def example_inputs(spec: dict) -> tuple:
    g = torch.Generator().manual_seed(1)
    if spec["family"] == "cnn":
        x = (torch.randn(2, 3, 16, 16, generator=g),)
        return x + (torch.randn(2, 3, 16, 16, generator=g),) if spec["two_inputs"] else x
    tokens = torch.randint(1, 20, (2, 7), generator=g)
    out = [tokens]
    if spec["packed"]:
        tokens[1, 5:] = 0 if spec["padding_idx"] == 0 else tokens[1, 5:]
        out.append(torch.tensor([7, 5]))
    if spec["context"]:
        out.append(torch.randn(2, 4, generator=g))
    return tuple(out)


def kinds_of(spec: dict) -> set[str]:
    """Site kinds the model may have (an attention is tried when one of its kinds is here)."""
    if spec["family"] == "cnn":
        return {"residual", "stage", "after_conv", "pool", "conv", "skip"}
    kinds = {"rnn", "rnn_input"}
    if spec["readout"] == "per_step":
        kinds.add("tokens")
    return kinds
