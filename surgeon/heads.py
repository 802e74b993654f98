"""The classifier head of a model: find it (outside the modules surgery inserted), check it against the
data's classes, replace it with a fresh Linear. Used by fine-tuning and by adapters (`include=['head']`).
"""
from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterable, Sequence

from torch import nn

from surgeon.errors import DataError, ModelError, OptionError

log = logging.getLogger("surgeon")


def under(name: str, prefixes: Iterable[str]) -> bool:
    """Whether module or parameter path `name` is one of `prefixes` or inside one of them."""
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def inserted_modules(model: nn.Module) -> list[str]:
    """Paths of the modules surgery inserted ([] for a plain model)."""
    from surgeon.surgery.rewrite import edits_of

    return [e["module"] for e in edits_of(model)]


def find_head(model: nn.Module) -> str:
    """The classifier's module path: timm's `get_classifier()`, `pretrained_cfg['classifier']`, else
    the last nn.Linear (in module order) that surgery did not insert.

    Raises:
        ModelError: the model has no Linear head.
    """
    names = {id(m): n for n, m in model.named_modules() if n}
    get = getattr(model, "get_classifier", None)
    if callable(get):
        with contextlib.suppress(Exception):
            head = get()
            if isinstance(head, nn.Linear) and id(head) in names:
                return names[id(head)]
    modules = dict(model.named_modules())
    cfg = getattr(model, "pretrained_cfg", None) or {}
    if isinstance(cfg.get("classifier"), str) and isinstance(modules.get(cfg["classifier"]), nn.Linear):
        return cfg["classifier"]
    new = inserted_modules(model)
    linears = [n for n, m in modules.items() if n and isinstance(m, nn.Linear) and not under(n, new)]
    if not linears:
        raise ModelError(f"Cannot find the classifier head of {type(model).__name__}: no nn.Linear outside "
                           f"the inserted modules. Fine-tuning needs a Linear head")
    return linears[-1]


def find_head_or_none(model: nn.Module) -> str | None:
    """`find_head`, or None for a model without a Linear head."""
    try:
        return find_head(model)
    except ModelError:
        return None


def head_outputs(model: nn.Module, head: str) -> int:
    return model.get_submodule(head).out_features


def replace_head(model: nn.Module, num_classes: int, *, head: str | None = None) -> str:
    """Put a fresh nn.Linear with `num_classes` outputs where the head is; returns its path.

    The model's recipe records `num_classes` as a model argument, so `surgeon.load` rebuilds the new
    head (the base model's constructor must accept `num_classes`, as timm's and torchvision's do).
    """
    from surgeon.training.record import set_model_arg

    path = head or find_head(model)
    old = model.get_submodule(path)
    new = nn.Linear(old.in_features, num_classes, bias=old.bias is not None).to(old.weight.device, old.weight.dtype)
    parent, _, leaf = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, new)
    if isinstance(getattr(model, "num_classes", None), int):
        model.num_classes = num_classes
    set_model_arg(model, "num_classes", num_classes)
    log.info("head %s: replaced by Linear(%d, %d)", path, old.in_features, num_classes)
    return path


def check_classes(model: nn.Module, classes: Sequence[str] | None, *, head: str | None = None,
                  num_classes: int | None = None, offer: bool = True) -> int | None:
    """Check the data's class count against the head. Returns the class count the head must have.

    Raises:
        DataError: the head has another number of outputs than the data has classes (and
        `num_classes` does not ask to replace it), or `num_classes` contradicts the data.
    """
    n_data = len(classes) if classes is not None else None
    if num_classes is not None:
        if num_classes < 2:
            raise OptionError(f"num_classes must be at least 2, got {num_classes}")
        if n_data is not None and n_data != num_classes:
            raise DataError(f"num_classes={num_classes} (--num-classes) but the data has {n_data} classes")
        return num_classes
    if n_data is None or head is None:
        return None
    n_head = head_outputs(model, head)
    if n_head != n_data:
        fix = (f"; pass num_classes={n_data} (--num-classes {n_data}) to replace the head with a new one"
               if offer else "; evaluate it on data with the classes it was trained for")
        raise DataError(f"The model's head {head!r} has {n_head} outputs but the data has {n_data} classes{fix}")
    return n_data
