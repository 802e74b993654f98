"""An LSTM classifier whose answer sits in the first token: last-state readout vs attention pooling.

1. Generate sequences of 40 tokens whose class is the first token (one of 4); the other 39 are noise.
2. Train a plain LSTM that reads its last hidden state (`out[:, -1]`) briefly: it forgets the start.
3. Retrofit `attnpool` at the LSTM's 'rnn' site with surgeon: at step 0 the model computes exactly
   what it did (a zero gate); fine-tune briefly and print accuracy and where the attention points.

Run: python examples/lstm_early_token.py   (CPU, well under two minutes)
"""
from __future__ import annotations

import time

import torch
import torch.nn.functional as F
from torch import nn

import surgeon
from surgeon.surgery.rewrite import edits_of

STEPS, CLASSES, VOCAB = 40, 4, 24
torch.manual_seed(0)
torch.set_num_threads(1)  # small recurrent nets run fastest on one thread


def make_data(n: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    y = torch.randint(0, CLASSES, (n,), generator=gen)
    x = torch.randint(CLASSES, VOCAB, (n, STEPS), generator=gen)  # noise tokens never name a class
    x[:, 0] = y
    return x, y


class LSTMClassifier(nn.Module):
    def __init__(self, hidden: int = 32):
        super().__init__()
        self.emb = nn.Embedding(VOCAB, 16)
        self.lstm = nn.LSTM(16, hidden, batch_first=True)
        self.head = nn.Linear(hidden, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.lstm(self.emb(x))
        return self.head(out[:, -1])


def train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int, lr: float, gen: torch.Generator) -> None:
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    for _ in range(steps):
        idx = torch.randint(0, len(x), (64,), generator=gen)
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
    x_train, y_train = make_data(4000, gen)
    x_test, y_test = make_data(1000, gen)

    base = LSTMClassifier()
    train(base, x_train, y_train, steps=150, lr=3e-3, gen=gen)
    base_acc = accuracy(base, x_test, y_test)

    print(surgeon.plan(base, "attnpool", kind="rnn"))
    patched = surgeon.add(base, "attnpool", kind="rnn")  # verified: identical output at init
    with torch.no_grad():
        same = float((patched(x_test) - base(x_test)).abs().max())
    step0_acc = accuracy(patched, x_test, y_test)

    train(patched, x_train, y_train, steps=300, lr=1e-2, gen=gen)
    tuned_acc = accuracy(patched, x_test, y_test)

    module = patched.get_submodule(edits_of(patched)[0]["module"])
    with torch.no_grad():
        patched(x_test)
    weights = module.pool.attn_weights.mean(0)  # (STEPS,) mean attention per step over the test set
    top = weights.topk(3)

    print(f"base LSTM (last-state readout)      accuracy {base_acc:.3f}")
    print(f"retrofitted with attnpool, step 0   accuracy {step0_acc:.3f}  (max |logit diff| {same:.2g})")
    print(f"after fine-tuning                   accuracy {tuned_acc:.3f}  "
          f"(gate γ = {float(module.gamma.detach()):.3f})")
    print("attention points at steps " + ", ".join(f"{int(i)} ({float(w):.2f})" for w, i in zip(*top)) +
          "; the answer is at step 0")
    print(f"done in {time.time() - start:.0f}s")
    assert step0_acc == base_acc and same <= 1e-5


if __name__ == "__main__":
    main()
