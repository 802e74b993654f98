"""A GRU forecaster retrofitted with input and temporal attention, in the manner of DA-RNN.

1. Generate 8 driving series (noisy AR(1) processes) and a target that depends on two of them at fixed
   lags: y[t+1] = 0.8·x2[t−3] − 0.8·x5[t−30] + noise; the other six series are distractors.
2. Train a plain GRU that reads a window of 40 steps of all 8 series and predicts y[t+1] from h_n[-1].
3. Retrofit, with two surgeon edits: `inputattn` at the GRU's input (DA-RNN's input attention: one
   weight per driving series) and `attnpool` over the GRU's states in place of h_n[-1] (temporal
   attention, Bahdanau's additive score, the last state as query). At step 0 the forecaster is
   unchanged; fine-tune briefly and print the error (against the base trained as long without
   attention) and what each attention picked out.

NOTE: DA-RNN recomputes its input weights inside the recurrence from the encoder's previous state;
a retrofit cannot enter nn.GRU's loop, so here the input weights are one per window.

Run: python examples/darnn_forecast.py   (CPU, well under two minutes)
"""
from __future__ import annotations

import copy
import time

import torch
import torch.nn.functional as F
from torch import nn

import surgeon
from surgeon.surgery.rewrite import edits_of

SERIES, WINDOW, DRIVERS = 8, 40, {2: (3, 0.8), 5: (30, -0.8)}  # series: (lag, weight)
FINETUNE = 600
torch.manual_seed(0)
torch.set_num_threads(1)  # small recurrent nets run fastest on one thread


def make_series(length: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.zeros(length, SERIES)
    noise = torch.randn(length, SERIES, generator=gen)
    for t in range(1, length):
        x[t] = 0.7 * x[t - 1] + noise[t]
    y = 0.1 * torch.randn(length, generator=gen)
    for k, (lag, w) in DRIVERS.items():
        y[lag + 1:] += w * x[: length - lag - 1, k]  # y[t+1] uses x_k[t - lag]
    return x, y


def windows(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs (N, WINDOW, SERIES) of the driving series up to t, targets y[t+1]."""
    idx = torch.arange(WINDOW, len(x) - 1)
    xs = torch.stack([x[i - WINDOW + 1: i + 1] for i in idx])
    return xs, y[idx + 1]


class GRUForecaster(nn.Module):
    def __init__(self, hidden: int = 32):
        super().__init__()
        self.gru = nn.GRU(SERIES, hidden, batch_first=True)
        self.head = nn.Linear(hidden, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _, h = self.gru(x)
        return self.head(h[-1]).squeeze(-1)


def train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int, lr: float, gen: torch.Generator) -> None:
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    for _ in range(steps):
        idx = torch.randint(0, len(x), (64,), generator=gen)
        loss = F.mse_loss(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()


@torch.no_grad()
def mse(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    return float(F.mse_loss(model(x), y))


def main() -> None:
    start = time.time()
    gen = torch.Generator().manual_seed(0)
    x_train, y_train = windows(*make_series(6000, gen))
    x_test, y_test = windows(*make_series(1500, gen))
    mean = x_train.mean((0, 1))
    std = x_train.std((0, 1))
    x_train, x_test = (x_train - mean) / std, (x_test - mean) / std

    base = GRUForecaster()
    train(base, x_train, y_train, steps=150, lr=3e-3, gen=gen)
    base_mse = mse(base, x_test, y_test)

    # 1. input attention at the GRU's input; 2. temporal attention over its states, in place of h_n[-1]
    control = copy.deepcopy(base)  # the same extra training without attention, for a fair comparison
    train(control, x_train, y_train, steps=FINETUNE, lr=5e-3, gen=torch.Generator().manual_seed(1))
    example = x_train[:2]  # the window length matters to input attention: give surgeon a real input
    model = surgeon.add(base, "inputattn", kind="rnn_input", example_input=example)
    model = surgeon.add(model, "attnpool", kind="rnn", score="additive", query="last", example_input=example)
    with torch.no_grad():
        same = float((model(x_test) - base(x_test)).abs().max())
    step0_mse = mse(model, x_test, y_test)

    train(model, x_train, y_train, steps=FINETUNE, lr=5e-3, gen=torch.Generator().manual_seed(1))
    tuned_mse = mse(model, x_test, y_test)

    paths = {e["attention"]: e["module"] for e in edits_of(model)}
    temporal, inputs = model.get_submodule(paths["attnpool"]), model.get_submodule(paths["inputattn"])
    with torch.no_grad():
        model(x_test)
    series_w = inputs.attn_weights.mean(0)
    step_w = temporal.pool.attn_weights.mean(0)
    print(f"variance of the target (a constant forecast's MSE)  {float(y_test.var()):.4f}")
    print(f"base GRU (h_n[-1] readout)                MSE {base_mse:.4f}")
    print(f"retrofitted, step 0                       MSE {step0_mse:.4f}  (max |diff| {same:.2g})")
    print(f"after fine-tuning                         MSE {tuned_mse:.4f}")
    print(f"base trained as long, without attention   MSE {mse(control, x_test, y_test):.4f}")
    print("input attention per series: " + "  ".join(f"x{k}={float(w):.3f}" for k, w in enumerate(series_w)) +
          f"   (drivers: {', '.join(f'x{k}' for k in DRIVERS)})")
    top = step_w.topk(3)
    print("temporal attention peaks at steps " +
          ", ".join(f"t−{WINDOW - 1 - int(i)} ({float(w):.2f})" for w, i in zip(*top)) +
          f"   (the drivers act at t−{min(lag for lag, _ in DRIVERS.values())} and "
          f"t−{max(lag for lag, _ in DRIVERS.values())})")
    print(f"done in {time.time() - start:.0f}s")
    assert same <= 1e-5


if __name__ == "__main__":
    main()
