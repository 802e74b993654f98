"""Shared by the tests that load a saved model in a new process."""
from __future__ import annotations

import torch

import surgeon


def save_trained_looking(patched, xs: tuple, folder, pick=lambda out: out) -> None:
    """Nudge every weight (so a lost or misplaced one shows), save the model to `folder`/out, and write its
    output on `xs` (`pick`ed from what it returns) to expected.pt and `xs` to inputs.pt."""
    for p in patched.parameters():
        p.data.add_(0.01 * torch.randn_like(p))
    surgeon.save(patched, folder / "out")
    with torch.no_grad():
        torch.save(pick(patched(*xs)), folder / "expected.pt")
    torch.save(xs, folder / "inputs.pt")
