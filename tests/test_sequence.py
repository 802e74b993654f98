"""Sequence attention: the rnn / tokens / rnn_input finders, score functions against their formulas,
identity init on every rnn and tokens edit, hard attention, padding masks, errors, and the CLI."""
from __future__ import annotations

import math

import pytest
import torch
from click.testing import CliRunner
from torch import nn

import surgeon
from seq_models import Block, Packed, QuestionPassage, Readout, Tagger, WithLengths, readout, tagger
from surgeon.cli import cli
from surgeon.errors import OptionError, ShapeError
from surgeon.layers.sequence import (SCORES, HardAttnPool, LocalAttnPool, MultiHeadSelfAttn, SeqAttnPool,
                                     StructuredSelfAttn, key_mask, make_score, structured_penalty)

TOL = 1e-5


def _tokens(model: Readout | Tagger, batch: int = 2, steps: int = 12, low: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    shape = (batch, steps) if getattr(model, "batch_first", True) else (steps, batch)
    return torch.randint(low, 40, shape, generator=g)


def _diff(a: nn.Module, b: nn.Module, *x) -> float:
    with torch.no_grad():
        return float((a(*x) - b(*x)).abs().max())


# -- the rnn finder ------------------------------------------------------------------------------------
CASES = [  # (cell, form, batch_first, bidirectional, num_layers, expected form)
    ("lstm", "last", True, False, 1, "last"),
    ("lstm", "last", False, False, 1, "last"),
    ("gru", "last", True, True, 1, "last"),
    ("lstm", "h_n", True, False, 2, "h_n"),
    ("gru", "h_n", False, False, 1, "h_n"),
    ("rnn", "h_n", True, False, 1, "h_n"),
    ("lstm", "cat", True, True, 2, "h_n_cat"),
    ("gru", "cat", False, True, 1, "h_n_cat"),
    ("gru", "mean", True, False, 1, "mean"),
    ("lstm", "mean", False, True, 1, "mean"),
]


@pytest.mark.parametrize("cell,form,batch_first,bidirectional,layers,expected", CASES,
                         ids=[f"{c}-{f}-{'bf' if b else 'tf'}{'-bi' if bi else ''}-{n}" for c, f, b, bi, n, _ in CASES])
def test_rnn_finder_and_identity_init(cell, form, batch_first, bidirectional, layers, expected):
    model = readout(cell=cell, form=form, batch_first=batch_first, bidirectional=bidirectional, num_layers=layers)
    x = _tokens(model)
    (site,) = surgeon.sites(model, kind="rnn", example_input=x)
    dirs = 2 if bidirectional else 1
    assert site.name == "rnn" and site.action == "replace"
    assert site.info["form"] == expected
    assert site.info["batch_first"] is batch_first and site.info["bidirectional"] is bidirectional
    assert site.info["hidden_size"] == 16 and site.info["rnn"] == {"lstm": "LSTM", "gru": "GRU", "rnn": "RNN"}[cell]
    assert site.layout == ("nlc" if batch_first else "lnc")
    assert site.shape == ((2, 12, 16 * dirs) if batch_first else (12, 2, 16 * dirs))
    assert site.info["padding_known"] is False and site.info["mask"] is None
    patched = surgeon.add(model, "attnpool", kind="rnn", example_input=x)
    assert _diff(model, patched, x) <= TOL


@pytest.mark.parametrize("attention,options", [
    ("attnpool", {}), ("attnpool", {"score": "dot", "query": "last"}), ("attnpool", {"score": "cosine"}),
    ("attnpool", {"score": "general", "query": "last"}), ("attnpool", {"score": "concat"}),
    ("attnpool", {"score": "mlp", "hidden": 8}), ("attnpool", {"score": "scaled_dot"}),
    ("hard", {"temperature": 0.5}), ("local", {"window": 3}), ("local", {"mode": "p", "window": 3}),
    ("structured", {"hops": 3, "hidden": 8}),
])
@pytest.mark.parametrize("form", ["cat", "mean"])
def test_identity_init_every_rnn_attention(attention, options, form):
    model = readout(cell="gru", form=form, batch_first=False, bidirectional=True)
    x = _tokens(model)
    patched = surgeon.add(model, attention, kind="rnn", example_input=x, **options)
    assert _diff(model, patched, x) <= TOL
    # paper init is the attention alone: a different function, same shapes, gradients reach it
    paper = surgeon.plan(model, attention, kind="rnn", init="paper", example_input=x, **options).apply(verify=False)
    assert paper(x).shape == model(x).shape


def test_at_without_kind_finds_the_rnn_site():
    model = readout(cell="gru", form="h_n")
    patched = surgeon.add(model, "attnpool", at=["rnn"])  # attnpool's first kind is 'pool'; none matches
    assert surgeon.edits(patched)[0].kind == "rnn"


def test_mean_selection_with_uniform_scores_needs_no_gate():
    model = readout(cell="gru", form="mean")
    patched = surgeon.add(model, "attnpool", kind="rnn")
    mod = patched.get_submodule(surgeon.edits(patched)[0].module)
    assert mod.gamma is None  # zero scores give exactly the mean, so the scores can learn at once


def test_a_per_step_rnn_is_a_tokens_site_and_not_an_rnn_site():
    model = tagger()
    x = _tokens(model)
    assert surgeon.sites(model, kind="rnn", example_input=x) == []
    (site,) = surgeon.sites(model, kind="tokens", example_input=x)
    assert (site.name, site.shape, site.layout) == ("gru", (2, 12, 16), "nlc")
    for attention, options in (("mhsa", {"heads": 2}), ("local", {"window": 2}), ("local", {"mode": "p"})):
        patched = surgeon.add(model, attention, kind="tokens", example_input=x, **options)
        assert _diff(model, patched, x) <= TOL


def test_a_time_first_bidirectional_per_step_rnn_is_a_tokens_site():
    class Tagger2(nn.Module):
        def __init__(self):
            super().__init__()
            self.lstm = nn.LSTM(6, 8, bidirectional=True)
            self.fc = nn.Linear(16, 3)

        def forward(self, x):
            out, _ = self.lstm(x)
            return self.fc(out)

    torch.manual_seed(0)
    model = Tagger2().eval()
    x = torch.randn(11, 2, 6)
    (site,) = surgeon.sites(model, kind="tokens", example_input=x)
    assert (site.shape, site.layout) == ((11, 2, 16), "lnc")
    for attention in ("mhsa", "local"):
        patched = surgeon.add(model, attention, kind="tokens", example_input=x)
        assert _diff(model, patched, x) <= TOL


def test_rnn_input_site_with_da_rnn_input_attention():
    model = readout(cell="gru", form="h_n")
    x = _tokens(model)
    (site,) = surgeon.sites(model, kind="rnn_input", example_input=x)
    assert site.shape == (2, 12, 12) and site.user == "rnn"
    patched = surgeon.add(model, "inputattn", example_input=x)
    assert _diff(model, patched, x) <= TOL


def test_unrecognised_rnn_use_names_the_module():
    model = readout(cell="lstm", form="first")
    x = _tokens(model)
    (site,) = surgeon.sites(model, kind="rnn", example_input=x)  # listed, so `surgeon sites` still works
    assert "error" in site.info
    with pytest.raises(ShapeError, match=r"Cannot tell how the output of RNN 'rnn' is used: .*getitem.*out\[:, -1\]"):
        surgeon.add(model, "attnpool", kind="rnn", example_input=x)


# -- tokens on transformers ------------------------------------------------------------------------------
def test_vit_tiny_tokens_after_every_block():
    import timm
    torch.manual_seed(0)
    vit = timm.create_model("vit_tiny_patch16_224", img_size=32).eval()
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    found = surgeon.sites(vit, kind="tokens", example_input=x)
    assert [s.name for s in found] == [f"blocks.{i}" for i in range(12)]
    assert all(s.shape == (2, 5, 192) and s.layout == "nlc" for s in found)
    patched = surgeon.add(vit, "mhsa", at=["blocks.11"], example_input=x)
    assert _diff(vit, patched, x) <= TOL
    assert isinstance(patched.get_submodule("blocks.11.mhsa").qkv, nn.Linear)


def test_a_1d_conv_residual_block_is_not_a_tokens_site():
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv1d(8, 8, 3, padding=1)
            self.bn = nn.BatchNorm1d(8)

        def forward(self, x):
            return x + self.bn(self.conv(x))

    model = nn.Sequential(nn.Conv1d(4, 8, 3, padding=1), Block(), Block()).eval()
    assert surgeon.sites(model, kind="tokens", example_input=torch.randn(2, 4, 20)) == []


@pytest.mark.parametrize("batch_first", [True, False])
def test_torch_transformer_encoder_is_a_tokens_site(batch_first):
    class Enc(nn.Module):
        def __init__(self):
            super().__init__()
            self.inp = nn.Linear(8, 32)
            layer = nn.TransformerEncoderLayer(32, 4, 64, batch_first=batch_first, dropout=0.0)
            self.enc = nn.TransformerEncoder(layer, 1, enable_nested_tensor=False)
            self.fc = nn.Linear(32, 3)

        def forward(self, x):
            return self.fc(self.enc(self.inp(x)).mean(1 if batch_first else 0))

    torch.manual_seed(0)
    model = Enc().eval()
    x = torch.randn(2, 10, 8) if batch_first else torch.randn(10, 2, 8)
    (site,) = surgeon.sites(model, kind="tokens", example_input=x)
    assert site.layout == ("nlc" if batch_first else "lnc")
    patched = surgeon.add(model, "mhsa", example_input=x)
    assert _diff(model, patched, x) <= TOL


# -- score functions against their formulas ----------------------------------------------------------------
def _reference(name, score, q, k):
    if name == "dot":
        return torch.einsum("bqd,btd->bqt", q, k)
    if name == "scaled_dot":
        return torch.einsum("bqd,btd->bqt", q, k) / math.sqrt(k.shape[-1])
    if name == "cosine":
        return torch.einsum("bqd,btd->bqt", q, k) / (q.norm(dim=-1)[:, :, None] * k.norm(dim=-1)[:, None, :])
    if name == "general":
        return torch.einsum("bqd,de,bte->bqt", q, score.weight, k)
    if name == "concat":
        w = score.weight
        out = torch.empty(q.shape[0], q.shape[1], k.shape[1])
        for b in range(q.shape[0]):
            for i in range(q.shape[1]):
                for t in range(k.shape[1]):
                    out[b, i, t] = w @ torch.cat([q[b, i], k[b, t]])
        return out
    # additive / mlp: v · tanh(W q + U k)
    out = torch.empty(q.shape[0], q.shape[1], k.shape[1])
    for b in range(q.shape[0]):
        for i in range(q.shape[1]):
            for t in range(k.shape[1]):
                out[b, i, t] = score.v @ torch.tanh(score.w.weight @ q[b, i] + score.u.weight @ k[b, t] + score.u.bias)
    return out


@pytest.mark.parametrize("name", list(SCORES))
def test_score_function_matches_its_formula_and_passes_gradients(name):
    g = torch.Generator().manual_seed(0)
    same = name in ("dot", "scaled_dot", "cosine")
    q = torch.randn(2, 3, 5, generator=g, requires_grad=True)
    k = torch.randn(2, 7, 5 if same else 6, generator=g, requires_grad=True)
    score = make_score(name, 5, k.shape[-1], hidden=4)
    with torch.no_grad():  # the zero-initialised last weights would hide mistakes
        for p in score.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    got = score(q, k)
    assert got.shape == (2, 3, 7)
    torch.testing.assert_close(got, _reference(name, score, q, k), rtol=1e-5, atol=1e-5)
    got.square().sum().backward()
    assert q.grad is not None and k.grad is not None and torch.isfinite(k.grad).all()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in score.parameters())


def test_dot_scores_need_equal_sizes():
    with pytest.raises(ValueError, match="one size"):
        make_score("dot", 4, 5)
    with pytest.raises(ValueError, match="Did you mean 'additive'"):
        make_score("additve", 4, 4)


def test_zero_scores_pool_is_the_mean():
    x = torch.randn(2, 9, 6)
    for name in ("dot", "scaled_dot", "general", "concat", "additive"):
        pool = SeqAttnPool(6, score=name)
        torch.testing.assert_close(pool(x), x.mean(1), rtol=0, atol=1e-6)


# -- hard attention --------------------------------------------------------------------------------------
def test_hard_attention_picks_one_step_in_eval_and_learns_in_training():
    torch.manual_seed(0)
    pool = HardAttnPool(6, score="general", temperature=0.5)
    with torch.no_grad():
        pool.score.weight.normal_()
    x = torch.randn(4, 9, 6)
    pool.eval()
    y = pool(x)
    a = pool.attn_weights
    assert ((a != 0).sum(1) == 1).all() and torch.allclose(a.sum(1), torch.ones(4))
    torch.testing.assert_close(y, x[torch.arange(4), a.argmax(1)])
    pool.train()
    y = pool(x)
    assert ((pool.attn_weights != 0).sum(1) == 1).all()
    (y * torch.randn_like(y)).sum().backward()
    assert pool.score.weight.grad is not None and pool.score.weight.grad.abs().sum() > 0
    assert pool.query.grad is not None and pool.query.grad.abs().sum() > 0


def test_hard_attention_in_a_patched_model_trains():
    model = readout(cell="lstm", form="last")
    x = _tokens(model)
    patched = surgeon.add(model, "hard", kind="rnn", example_input=x)
    patched.train()
    patched(x).sum().backward()
    mod = patched.get_submodule(surgeon.edits(patched)[0].module)
    assert mod.gamma.grad is not None and mod.gamma.grad.abs() > 0


# -- padding ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("make", [
    lambda: SeqAttnPool(6, score="additive"), lambda: SeqAttnPool(6, score="dot", query="last"),
    lambda: HardAttnPool(6, score="general"), lambda: LocalAttnPool(6, window=2),
    lambda: LocalAttnPool(6, window=2, mode="p"), lambda: StructuredSelfAttn(6, hops=2, hidden=4),
], ids=["soft", "soft-last", "hard", "local-m", "local-p", "structured"])
def test_padded_values_never_change_the_output(make):
    torch.manual_seed(0)
    pool = make().eval()
    with torch.no_grad():
        for p in pool.parameters():
            p.normal_()
    x = torch.randn(3, 8, 6)
    lengths = torch.tensor([8, 5, 1])
    mask = key_mask(lengths, "lengths", 8)
    x2 = x.clone()
    x2[~mask] = torch.randn(int((~mask).sum()), 6) * 100
    assert torch.equal(pool(x, mask), pool(x2, mask))


def test_mask_forms():
    lengths = torch.tensor([3, 1])
    want = torch.tensor([[True, True, True, False], [True, False, False, False]])
    assert torch.equal(key_mask(lengths, "lengths", 4), want)
    assert torch.equal(key_mask(want.long(), "valid", 4), want)
    assert torch.equal(key_mask((~want).long(), "padding", 4), want)
    assert torch.equal(key_mask(torch.tensor([[5, 6, 7, 0], [5, 0, 0, 0]]), "tokens", 4, pad_id=0), want)


def test_lengths_input_masks_a_patched_model():
    torch.manual_seed(0)
    model = WithLengths().eval()
    g = torch.Generator().manual_seed(0)
    x, lengths, ctx = torch.randint(1, 40, (2, 10), generator=g), torch.tensor([10, 4]), torch.randn(2, 6)
    (site,) = surgeon.sites(model, kind="rnn", example_input=(x, lengths, ctx))
    assert site.info["mask"] == "lengths" and site.info["padding_known"]
    assert site.info["extra"] == ("mask", "input:ctx")
    assert _diff(model, surgeon.add(model, "attnpool", example_input=(x, lengths, ctx)), x, lengths, ctx) <= TOL
    patched = surgeon.add(model, "attnpool", init="paper", example_input=(x, lengths, ctx))
    x2 = x.clone()
    x2[1, 4:] = 7
    with torch.no_grad():
        assert torch.equal(patched(x, lengths, ctx), patched(x2, lengths, ctx))
        assert not torch.equal(model(x, lengths, ctx), model(x2, lengths, ctx))  # the base model does see it


@pytest.mark.parametrize("form,bidirectional", [("h_n", False), ("h_n", True), ("mean", False)])
def test_packed_sequences_are_masked_by_their_lengths(form, bidirectional):
    torch.manual_seed(0)
    model = Packed(form, bidirectional=bidirectional).eval()
    g = torch.Generator().manual_seed(0)
    x, lengths = torch.randint(1, 40, (3, 10), generator=g), torch.tensor([7, 10, 3])
    (site,) = surgeon.sites(model, kind="rnn", example_input=(x, lengths))
    assert site.info["packed"] and site.info["mask"] == "lengths" and site.info["form"] == form
    assert site.shape == (3, 10, 32 if bidirectional else 16)
    assert _diff(model, surgeon.add(model, "attnpool", example_input=(x, lengths)), x, lengths) <= TOL
    patched = surgeon.add(model, "attnpool", init="paper", score="dot", query="last", example_input=(x, lengths))
    x2 = x.clone()
    x2[0, 7:], x2[2, 3:] = 5, 9
    with torch.no_grad():
        torch.testing.assert_close(patched(x, lengths), patched(x2, lengths), rtol=0, atol=1e-6)


def test_padding_idx_gives_the_mask_and_unknown_padding_is_said(caplog):
    model = readout(cell="gru", form="h_n", padding_idx=0)
    (site,) = surgeon.sites(model, kind="rnn")
    assert site.info["mask"] == "tokens" and site.info["pad_id"] == 0
    with caplog.at_level("INFO", logger="surgeon"):
        (site,) = surgeon.sites(readout(cell="gru", form="h_n"), kind="rnn")
    assert site.info["padding_known"] is False
    assert "passes no lengths or mask" in caplog.text


# -- structured and cross --------------------------------------------------------------------------------
def test_structured_penalty_is_the_frobenius_norm():
    torch.manual_seed(0)
    layer = StructuredSelfAttn(6, hops=3, hidden=5)
    x = torch.randn(2, 7, 6)
    y = layer(x)
    assert y.shape == (2, 18)
    a = torch.softmax(layer.w2(torch.tanh(layer.w1(x))).transpose(1, 2), -1)
    want = torch.stack([torch.linalg.matrix_norm(ai @ ai.T - torch.eye(3)) ** 2 for ai in a]).mean()
    torch.testing.assert_close(layer.penalty, want)
    model = readout(cell="lstm", form="last")
    patched = surgeon.add(model, "structured", kind="rnn", hops=2, hidden=4)
    patched(_tokens(model))
    p = structured_penalty(patched)
    assert p.requires_grad and p > 0


def test_cross_attention_takes_a_named_model_input():
    torch.manual_seed(0)
    model = WithLengths().eval()
    x, lengths, ctx = torch.randint(1, 40, (2, 10)), torch.tensor([10, 4]), torch.randn(2, 6)
    patched = surgeon.add(model, "cross", query="ctx", example_input=(x, lengths, ctx))
    assert _diff(model, patched, x, lengths, ctx) <= TOL
    with pytest.raises(OptionError, match=r"unknown query 'ctxx'. Did you mean 'ctx'\?"):
        surgeon.plan(model, "cross", query="ctxx", example_input=(x, lengths, ctx))
    with pytest.raises(OptionError, match="cross needs query=NAME"):
        surgeon.plan(model, "cross", example_input=(x, lengths, ctx))


def test_cross_attention_takes_an_earlier_rnn_site():
    torch.manual_seed(0)
    model = QuestionPassage().eval()
    g = torch.Generator().manual_seed(0)
    p, q = torch.randint(1, 40, (2, 15), generator=g), torch.randint(1, 40, (2, 6), generator=g)
    found = {s.name: s for s in surgeon.sites(model, kind="rnn", example_input=(p, q))}
    assert found["q_gru"].info["form"] == found["p_gru"].info["form"] == "h_n"
    assert "site:q_gru" in found["p_gru"].info["extra"]
    patched = surgeon.add(model, "cross", at=["p_gru"], query="q_gru", score="general", example_input=(p, q))
    assert _diff(model, patched, p, q) <= TOL
    # q_gru's selection comes after p_gru's h_n in the graph, so p_gru's h_n stack is a valid query there
    assert "site:p_gru" in found["q_gru"].info["extra"]
    with pytest.raises(OptionError, match="Valid: 'input:passage', 'site:p_gru'"):
        surgeon.plan(model, "cross", at=["q_gru"], query="answer", example_input=(p, q))


# -- CLI ---------------------------------------------------------------------------------------------------
def test_cli_sites_shows_rnn_and_tokens_sites():
    runner = CliRunner()
    result = runner.invoke(cli, ["sites", "seq_models:tagger"])
    assert result.exit_code == 0, result.output
    assert "gru" in result.output and "tokens" in result.output and "rnn_input" in result.output
    result = runner.invoke(cli, ["sites", "seq_models:readout", "--kind", "rnn", "--model-arg", "form=mean"])
    assert result.exit_code == 0, result.output
    assert "rnn" in result.output and "32×16 → 16" in result.output
    result = runner.invoke(cli, ["add", "attnpool", "seq_models:readout", "--kind", "rnn", "--option", "score=dot",
                                 "--option", "query=last"])
    assert result.exit_code == 0, result.output
    assert "ok" in result.output
    result = runner.invoke(cli, ["add", "attnpool", "seq_models:readout", "--kind", "rnn",
                                 "--model-arg", "form=first"])
    assert result.exit_code == 2 and "Cannot tell how the output of RNN 'rnn' is used" in result.output


# -- tokens sites honour the model's padding information as rnn sites do (lengths inputs, embeddings with a
# padding_idx): the inserted attention never attends to padded steps -----------------------------------
class PaddedEncoder(nn.Module):
    """Token ids (0 = padding) -> embedding -> a transformer-like block -> per-token logits."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(20, 32, padding_idx=0)
        self.block = Block(32)
        self.head = nn.Linear(32, 3)

    def forward(self, tokens):
        return self.head(self.block(self.emb(tokens)))


class LengthTagger(nn.Module):
    """A GRU tagger told its sequences' lengths (a per-step linear layer: a tokens site on the GRU)."""

    def __init__(self, batch_first=True):
        super().__init__()
        self.batch_first = batch_first
        self.emb = nn.Embedding(20, 8)
        self.gru = nn.GRU(8, 32, batch_first=batch_first)
        self.fc = nn.Linear(32, 4)

    def forward(self, tokens, lengths):
        e = self.emb(tokens)
        out, _ = self.gru(e if self.batch_first else e.transpose(0, 1))
        y = self.fc(out)
        return y if self.batch_first else y.transpose(0, 1)


def _padded_tokens(lengths, steps, seed=0):
    g = torch.Generator().manual_seed(seed)
    t = torch.randint(1, 20, (len(lengths), steps), generator=g)
    for i, n in enumerate(lengths):
        t[i, n:] = 0
    return t


@pytest.mark.parametrize("attention", ["mhsa", "local"])
def test_padding_idx_masks_a_block_tokens_site(attention):
    torch.manual_seed(0)
    model = PaddedEncoder().eval()
    x = _padded_tokens([8, 5], 8)
    (site,) = surgeon.sites(model, kind="tokens", example_input=x)
    assert site.action == "replace" and site.info["mask"] == "tokens" and site.info["pad_id"] == 0
    assert site.info["padding_known"]
    identity = surgeon.add(model, attention, kind="tokens", example_input=x)
    with torch.no_grad():
        assert (identity(x) - model(x)).abs().max() <= 1e-5
    patched = surgeon.add(model, attention, kind="tokens", init="paper", example_input=x, verify=False).eval()
    longer = torch.cat([x, torch.zeros(2, 4, dtype=x.dtype)], 1)  # the same samples, padded further
    with torch.no_grad():
        torch.testing.assert_close(patched(longer)[1, :5], patched(x)[1, :5], rtol=0, atol=1e-5)


def test_without_the_mask_padding_would_be_attended():
    """The property above can fail: the same attention without the mask sees the padding."""
    torch.manual_seed(0)
    layer, emb = MultiHeadSelfAttn(32, heads=4).eval(), PaddedEncoder().eval()
    x = _padded_tokens([8, 5], 8)
    longer = torch.cat([x, torch.zeros(2, 4, dtype=x.dtype)], 1)
    with torch.no_grad():
        h, hl = emb.block(emb.emb(x)), emb.block(emb.emb(longer))
        assert not torch.allclose(layer(hl)[1, :5], layer(h)[1, :5], atol=1e-5)
        torch.testing.assert_close(layer(hl, longer != 0)[1, :5], layer(h, x != 0)[1, :5], rtol=0, atol=1e-5)


@pytest.mark.parametrize("batch_first", [True, False])
def test_lengths_input_masks_a_per_step_rnn_tokens_site(batch_first):
    torch.manual_seed(0)
    model = LengthTagger(batch_first).eval()
    x, lengths = _padded_tokens([7, 4], 7), torch.tensor([7, 4])
    (site,) = surgeon.sites(model, kind="tokens", example_input=(x, lengths))
    assert site.info["mask"] == "lengths" and site.args[1] == "lengths"
    identity = surgeon.add(model, "mhsa", kind="tokens", example_input=(x, lengths))
    with torch.no_grad():
        assert (identity(x, lengths) - model(x, lengths)).abs().max() <= 1e-5
    patched = surgeon.add(model, "mhsa", kind="tokens", init="paper", example_input=(x, lengths), verify=False)
    x2 = x.clone()
    x2[1, 4:] = 9  # whatever sits in the padded steps
    with torch.no_grad():
        torch.testing.assert_close(patched(x2, lengths)[1, :4], patched(x, lengths)[1, :4], rtol=0, atol=1e-5)
        assert not torch.allclose(model(x2, lengths)[1, 4:], model(x, lengths)[1, 4:])  # the padding did change


def test_no_padding_information_keeps_an_insert_site():
    from seq_models import tagger

    (site,) = surgeon.sites(tagger(), kind="tokens", example_input=torch.randint(1, 40, (2, 6)))
    assert site.action == "insert" and site.info["padding_known"] is False


class _Encoder(nn.Module):
    """torch's own TransformerEncoder: given a padding mask without autograd, it packs the sequences into nested
    tensors (its fused inference path)."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(100, 32)
        self.enc = nn.TransformerEncoder(nn.TransformerEncoderLayer(32, 4, 64, batch_first=True), 2)
        self.head = nn.Linear(32, 3)

    def forward(self, ids, mask=None):
        return self.head(self.enc(self.emb(ids), src_key_padding_mask=mask).mean(1))


def test_a_torch_transformer_encoder_with_a_padding_mask_is_patched_and_keeps_its_inference_path():
    torch.manual_seed(0)
    model = _Encoder().eval()
    ids, mask = torch.randint(0, 100, (2, 16)), torch.zeros(2, 16, dtype=torch.bool)
    mask[1, 10:] = True
    patched = surgeon.add(model, "mhsa", example_input=(ids, mask))
    assert [e.site for e in surgeon.edits(patched)] == ["enc"]
    with torch.no_grad():  # the fused path (padded positions come back as zeros) in both
        assert torch.equal(patched(ids, mask), model(ids, mask))
    assert torch.equal(patched(ids, mask), model(ids, mask))
