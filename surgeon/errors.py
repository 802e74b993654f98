"""The errors surgeon raises for user mistakes, and the one it raises for its own.

Every user mistake raises a `SurgeonError` subclass that names what was wrong; the CLI turns any of them
into one line on stderr and exit code 2. Messages say what failed, quote the user's value, say what is
valid and how to fix it. A broken internal invariant raises `InternalError`, which is not a SurgeonError:
it ends in a traceback and asks for a bug report, instead of passing for a user's mistake.
"""
from __future__ import annotations

import difflib
from collections.abc import Iterable


class SurgeonError(Exception):
    """Base class of every error surgeon raises for bad input."""


class UnknownNameError(SurgeonError, KeyError):
    """An attention, model, kind, option or site name that does not exist."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class OptionError(SurgeonError, ValueError):
    """An option value outside its valid range, or options that do not go together (a kind the attention
    does not serve, --include without --adapter)."""


class SiteShapeError(OptionError):
    """An option that does not fit one site's shape (channels not divisible by the groups asked for):
    `surgeon.add` skips such sites with a warning, and refuses only when no site fits."""


class TraceError(SurgeonError):
    """A model (or part of it) could not be traced by torch.fx."""


class CallError(SurgeonError, TypeError):
    """A rewritten forward was called with arguments it was not traced for (see surgery/calls.py)."""


class ShapeError(SurgeonError):
    """A site's shape does not fit the attention, or an edit changed a shape."""


class NoSitesError(SurgeonError):
    """A filter (kind, --at glob) matched no site."""


class PluginError(SurgeonError):
    """A plugin failed to load or registered something invalid."""


class WeightsError(SurgeonError):
    """A weights file that cannot be read or does not fit the model."""


class ModelError(SurgeonError):
    """A model reference that cannot be turned into a model."""


def did_you_mean(value: str, choices: Iterable[str], n: int = 3) -> str:
    """Return ' Did you mean 'x'?' (or '') for the closest of `choices` to `value`."""
    choices = list(choices)
    close = difflib.get_close_matches(value, choices, n=n, cutoff=0.6)
    if not close:
        lowered = value.lower()
        close = [c for c in choices if lowered and lowered in c.lower()][:n]
    if not close:
        return ""
    return " Did you mean " + " or ".join(repr(c) for c in close) + "?"


def unknown(what: str, value: str, choices: Iterable[str], hint: str = "") -> UnknownNameError:
    """Build the standard unknown-name error: what, the value, close matches and a hint."""
    msg = f"Unknown {what} {value!r}.{did_you_mean(value, choices)}"
    if hint:
        msg += f" {hint}"
    return UnknownNameError(msg)


def preview(names: Iterable[str], n: int = 5) -> str:
    """A short comma-separated preview of names: 'a, b, c, ... (12 in all)'."""
    names = list(names)
    shown = ", ".join(repr(x) for x in names[:n])
    if len(names) > n:
        shown += f", ... ({len(names)} in all)"
    return shown


class VerificationError(SurgeonError):
    """A patched model failed its check (identity init changed the output, gradients do not flow)."""


class RecipeError(SurgeonError):
    """A recipe that cannot be read: not JSON, not a recipe, a version this surgeon cannot read, a
    field of the wrong type, a path outside the recipe's folder, or code it was not trusted to run."""


class ExportError(SurgeonError):
    """A patched model that an export format cannot serve, or whose export computes something else."""


class DataError(SurgeonError):
    """Data that cannot serve as classification data: a missing, empty or mis-laid-out folder, or
    classes that do not fit the model's head."""


class OutputError(SurgeonError):
    """An output that cannot or may not be written: under a file, a symbolic link, a system folder,
    the working directory, an input being read, or an existing folder that is not a surgeon save; or a
    run folder that cannot be resumed (no run in it, or a trainer state this surgeon cannot read)."""


class TrainingError(SurgeonError):
    """A fine-tuning run that cannot go on: the loss became NaN or infinite."""


class InternalError(RuntimeError):
    """A broken invariant inside surgeon: a bug, never the user's mistake (not a SurgeonError, so the CLI
    shows the traceback). The message says so and asks for a report."""

    def __init__(self, message: str):
        super().__init__(f"{message}. This is a bug in surgeon, please report it (with the traceback)")


def warn(message: str) -> None:
    """A UserWarning attributed to the first caller outside surgeon (the user's line, not surgeon's own
    wrappers and entry points)."""
    import os
    import sys
    import warnings

    package = os.path.dirname(os.path.abspath(__file__)) + os.sep
    frame, level = sys._getframe(1), 2  # stacklevel 2: the caller of warn()
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(package):
        frame, level = frame.f_back, level + 1
    warnings.warn(message, stacklevel=level)
