"""Small models for the checkpoint and export tests, importable as factory references
('ckpt_models:lstm_classifier') from a subprocess that has tests/ on its path."""
import torch
from torch import nn


class LSTMClassifier(nn.Module):
    """A sequence classifier that reads the LSTM's last step: the 'rnn' site."""

    def __init__(self, features: int = 8, hidden: int = 16, classes: int = 3):
        super().__init__()
        self.lstm = nn.LSTM(features, hidden, batch_first=True)
        self.head = nn.Linear(hidden, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.lstm(x)
        return self.head(out[:, -1])


def lstm_classifier(**kwargs) -> nn.Module:
    torch.manual_seed(0)
    return LSTMClassifier(**kwargs)
