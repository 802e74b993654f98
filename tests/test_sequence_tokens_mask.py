"""tokens sites honour the model's padding information as rnn sites do (lengths inputs, embeddings with a
padding_idx): the inserted attention never attends to padded steps."""
import pytest
import torch
from torch import nn

import surgeon
from surgeon.layers.sequence import MultiHeadSelfAttn

from seq_models import Block


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


def _tokens(lengths, steps, seed=0):
    g = torch.Generator().manual_seed(seed)
    t = torch.randint(1, 20, (len(lengths), steps), generator=g)
    for i, n in enumerate(lengths):
        t[i, n:] = 0
    return t


@pytest.mark.parametrize("attention", ["mhsa", "local"])
def test_padding_idx_masks_a_block_tokens_site(attention):
    torch.manual_seed(0)
    model = PaddedEncoder().eval()
    x = _tokens([8, 5], 8)
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
    x = _tokens([8, 5], 8)
    longer = torch.cat([x, torch.zeros(2, 4, dtype=x.dtype)], 1)
    with torch.no_grad():
        h, hl = emb.block(emb.emb(x)), emb.block(emb.emb(longer))
        assert not torch.allclose(layer(hl)[1, :5], layer(h)[1, :5], atol=1e-5)
        torch.testing.assert_close(layer(hl, longer != 0)[1, :5], layer(h, x != 0)[1, :5], rtol=0, atol=1e-5)


@pytest.mark.parametrize("batch_first", [True, False])
def test_lengths_input_masks_a_per_step_rnn_tokens_site(batch_first):
    torch.manual_seed(0)
    model = LengthTagger(batch_first).eval()
    x, lengths = _tokens([7, 4], 7), torch.tensor([7, 4])
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
