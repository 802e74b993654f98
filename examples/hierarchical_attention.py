"""A hierarchical attention network (HAN) made by applying surgeon twice to a plain two-level GRU.

1. Generate documents of 10 sentences × 25 words whose class is the one keyword hidden at a random
   word of a random sentence; every other word is noise.
2. Train a plain two-level model: a word GRU reads each sentence (its h_n is the sentence vector),
   a sentence GRU reads the sentence vectors (its h_n classifies the document).
3. Surgeon, twice: `attnpool` at the word GRU's 'rnn' site (word attention), then at the sentence
   GRU's (sentence attention), as in Yang et al., Hierarchical Attention Networks for Document
   Classification, NAACL 2016. With identity init the model is unchanged at step 0 (checked); with
   init='paper' it is the HAN as published, attention pooling alone, which is fine-tuned here: its
   attention has to find the keyword, where a gated version may keep leaning on the GRUs' h_n.
   Prints accuracy and how often each level's attention points at the keyword.

Run: python examples/hierarchical_attention.py   (CPU, well under two minutes)
"""
from __future__ import annotations

import copy
import time

import torch
import torch.nn.functional as F
from torch import nn

import surgeon
from surgeon.surgery.rewrite import edits_of

SENTENCES, WORDS, CLASSES, VOCAB = 10, 25, 4, 30
FINETUNE = 600
torch.manual_seed(0)
torch.set_num_threads(1)  # small recurrent nets run fastest on one thread


def make_docs(n: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Documents (n, SENTENCES, WORDS), labels (n,), and where each keyword is: (sentence, word)."""
    y = torch.randint(0, CLASSES, (n,), generator=gen)
    x = torch.randint(CLASSES, VOCAB, (n, SENTENCES, WORDS), generator=gen)
    where = torch.stack([torch.randint(0, SENTENCES, (n,), generator=gen),
                         torch.randint(0, WORDS, (n,), generator=gen)], 1)
    x[torch.arange(n), where[:, 0], where[:, 1]] = y
    return x, y, where


class TwoLevelGRU(nn.Module):
    """Words -> sentence vectors (word GRU's h_n) -> document vector (sentence GRU's h_n) -> class."""

    def __init__(self, dim: int = 16, hidden: int = 32):
        super().__init__()
        self.emb = nn.Embedding(VOCAB, dim)
        self.word_gru = nn.GRU(dim, hidden, batch_first=True)
        self.sent_gru = nn.GRU(hidden, hidden, batch_first=True)
        self.head = nn.Linear(hidden, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, w = x.shape
        _, h = self.word_gru(self.emb(x.reshape(b * s, w)))
        _, h = self.sent_gru(h[-1].reshape(b, s, -1))
        return self.head(h[-1])


def train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int, lr: float, gen: torch.Generator) -> None:
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    for _ in range(steps):
        idx = torch.randint(0, len(x), (32,), generator=gen)
        loss = F.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    return float((model(x).argmax(1) == y).float().mean())


def main() -> None:
    start = time.time()
    gen = torch.Generator().manual_seed(0)
    x_train, y_train, _ = make_docs(3000, gen)
    x_test, y_test, where = make_docs(500, gen)

    base = TwoLevelGRU()
    train(base, x_train, y_train, steps=200, lr=3e-3, gen=gen)
    base_acc = accuracy(base, x_test, y_test)

    control = copy.deepcopy(base)  # the same extra training without attention, for a fair comparison
    train(control, x_train, y_train, steps=FINETUNE, lr=1e-2, gen=torch.Generator().manual_seed(1))
    example = x_train[:2]  # (2, 10, 25) documents: the first layer alone cannot tell surgeon this shape
    print([f"{s.name}: {s.info['form']} of {s.describe_shape()}"
           for s in surgeon.sites(base, kind="rnn", example_input=example)])
    # identity init: the plain model's output, exactly, at step 0
    ident = surgeon.add(base, "attnpool", kind="rnn", at=["word_gru"], example_input=example)  # word attention
    ident = surgeon.add(ident, "attnpool", kind="rnn", at=["sent_gru"], example_input=example)  # sentence attention
    with torch.no_grad():
        same = float((ident(x_test) - base(x_test)).abs().max())
    step0_acc = accuracy(ident, x_test, y_test)

    # init='paper': the HAN as published (attention pooling alone, no gates), from the trained GRUs
    han = surgeon.add(base, "attnpool", kind="rnn", at=["word_gru"], init="paper", example_input=example)
    han = surgeon.add(han, "attnpool", kind="rnn", at=["sent_gru"], init="paper", example_input=example)
    train(han, x_train, y_train, steps=FINETUNE, lr=1e-2, gen=torch.Generator().manual_seed(1))
    han_acc = accuracy(han, x_test, y_test)

    modules = [han.get_submodule(e["module"]) for e in edits_of(han)]
    word, sent = modules[0].pool, modules[1].pool
    with torch.no_grad():
        han(x_test)
    n = len(x_test)
    sent_hit = (sent.attn_weights.argmax(1) == where[:, 0]).float().mean()
    word_w = word.attn_weights.reshape(n, SENTENCES, WORDS)[torch.arange(n), where[:, 0]]
    word_hit = (word_w.argmax(1) == where[:, 1]).float().mean()
    word_mass = word_w[torch.arange(n), where[:, 1]].mean()

    print(f"plain two-level GRU (h_n readouts)   accuracy {base_acc:.3f}")
    print(f"HAN by surgeon ×2 (identity), step 0 accuracy {step0_acc:.3f}  (max |logit diff| {same:.2g})")
    print(f"HAN (init='paper') fine-tuned        accuracy {han_acc:.3f}")
    print(f"plain model trained as long          accuracy {accuracy(control, x_test, y_test):.3f}")
    print(f"sentence attention peaks at the keyword's sentence in {float(sent_hit):.0%} of documents "
          f"(chance {1 / SENTENCES:.0%})")
    print(f"word attention peaks at the keyword within that sentence in {float(word_hit):.0%} "
          f"(chance {1 / WORDS:.0%}); its mean weight there is {float(word_mass):.2f} (uniform {1 / WORDS:.2f})")
    print(f"done in {time.time() - start:.0f}s")
    assert step0_acc == base_acc and same <= 1e-5


if __name__ == "__main__":
    main()
