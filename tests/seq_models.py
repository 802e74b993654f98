"""Small sequence models for the sequence-attention tests, importable as `seq_models:FACTORY` (tests/ is
on sys.path) so the CLI can load them too."""
from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence


class Readout(nn.Module):
    """Embedding -> RNN -> one vector per sample (`form`) -> linear.

    form: 'last' (out[:, -1] / out[-1]), 'h_n' (h_n[-1]), 'cat' (both directions' final states),
    'mean' (over time), 'first' (out[:, 0]: a use no rnn site recognises).
    """

    def __init__(self, cell: str = "lstm", form: str = "last", *, batch_first: bool = True,
                 bidirectional: bool = False, num_layers: int = 1, vocab: int = 40, dim: int = 12,
                 hidden: int = 16, classes: int = 3, padding_idx: int | None = None):
        super().__init__()
        self.form, self.is_lstm, self.batch_first = form, cell == "lstm", batch_first
        self.emb = nn.Embedding(vocab, dim, padding_idx=padding_idx)
        rnn = {"lstm": nn.LSTM, "gru": nn.GRU, "rnn": nn.RNN}[cell]
        self.rnn = rnn(dim, hidden, batch_first=batch_first, bidirectional=bidirectional, num_layers=num_layers)
        width = hidden * (2 if bidirectional and form in ("last", "mean", "cat", "first") else 1)
        self.fc = nn.Linear(width, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, h = self.rnn(self.emb(x))
        if self.is_lstm:
            h = h[0]
        t = 1 if self.batch_first else 0
        if self.form == "last":
            z = out[:, -1] if self.batch_first else out[-1]
        elif self.form == "h_n":
            z = h[-1]
        elif self.form == "cat":
            z = torch.cat([h[-2], h[-1]], dim=1)
        elif self.form == "mean":
            z = out.mean(t)
        else:
            z = out[:, 0]
        return self.fc(z)


class Tagger(nn.Module):
    """A per-step tagger: the GRU's output feeds a linear layer at every step (a tokens site)."""

    def __init__(self, vocab: int = 40, dim: int = 12, hidden: int = 16, tags: int = 5):
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.gru = nn.GRU(dim, hidden, batch_first=True)
        self.fc = nn.Linear(hidden, tags)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.gru(self.emb(x))
        return self.fc(out)


class WithLengths(nn.Module):
    """An LSTM classifier given `lengths`, and a context vector `ctx` (a query for cross attention)."""

    def __init__(self, vocab: int = 40, dim: int = 12, hidden: int = 16, classes: int = 3):
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.lstm = nn.LSTM(dim, hidden, batch_first=True)
        self.fc = nn.Linear(hidden, classes)
        self.ctx_proj = nn.Linear(6, classes)

    def forward(self, x: torch.Tensor, lengths: torch.Tensor, ctx: torch.Tensor) -> torch.Tensor:
        _, (h, _) = self.lstm(self.emb(x))
        return self.fc(h[-1]) + self.ctx_proj(ctx)


class Block(nn.Module):
    """A transformer-like residual block over (B, T, C) or (T, B, C) tokens."""

    def __init__(self, c):
        super().__init__()
        self.norm = nn.LayerNorm(c)
        self.mlp = nn.Sequential(nn.Linear(c, 2 * c), nn.GELU(), nn.Linear(2 * c, c))

    def forward(self, x):
        return x + self.mlp(self.norm(x))


def readout(**kwargs) -> nn.Module:
    torch.manual_seed(0)
    return Readout(**kwargs).eval()


def tagger() -> nn.Module:
    torch.manual_seed(0)
    return Tagger().eval()


class QuestionPassage(nn.Module):
    """Two GRUs: a question's h_n is a natural query for attention over the passage (cross)."""

    def __init__(self, vocab: int = 40, dim: int = 12, hidden: int = 16):
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.q_gru = nn.GRU(dim, hidden, batch_first=True)
        self.p_gru = nn.GRU(dim, hidden, batch_first=True)
        self.fc = nn.Linear(2 * hidden, 2)

    def forward(self, passage: torch.Tensor, question: torch.Tensor) -> torch.Tensor:
        _, hq = self.q_gru(self.emb(question))
        _, hp = self.p_gru(self.emb(passage))
        return self.fc(torch.cat([hp[-1], hq[-1]], 1))


class Packed(nn.Module):
    """A GRU over a packed sequence: reads h_n (`form='h_n'`) or the mean of the padded output ('mean')."""

    def __init__(self, form: str = "h_n", vocab: int = 40, dim: int = 12, hidden: int = 16,
                 bidirectional: bool = False):
        super().__init__()
        self.form = form
        self.emb = nn.Embedding(vocab, dim)
        self.gru = nn.GRU(dim, hidden, batch_first=True, bidirectional=bidirectional)
        self.fc = nn.Linear(hidden * (2 if bidirectional and form == "mean" else 1), 3)

    def forward(self, x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        packed = pack_padded_sequence(self.emb(x), lengths, batch_first=True, enforce_sorted=False)
        out, h = self.gru(packed)
        if self.form == "mean":
            padded, _ = pad_packed_sequence(out, batch_first=True)
            return self.fc(padded.mean(1))
        return self.fc(h[-1])
