"""Property-based test: random small CNNs and sequence models (tests/fuzz_models.py), every built-in
attention whose kinds they may have. For each, `surgeon.add` either gives a patched model that computes
what the original computes, in eval and in train mode under one seed (outputs within 1e-5, batch-norm
buffers equal after one train-mode forward on separate copies of the inputs, the same requires_grad on
every output), or raises a SurgeonError whose message is one line. Anything else fails, with the model's
source in the message as the reproducer.

The default profile is derandomized with a few examples (fast); `make test-slow` runs the long one.
"""
from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

import surgeon
from surgeon.errors import SurgeonError, VerificationError
from surgeon.surgery.verify import tensors

import fuzz_models

TOL = 1e-5
# options that make an attention fit models 4 or 8 channels wide (defaults assume ResNet widths)
OPTIONS = {"aaconv": {"heads": 2}, "sk": {"groups": 4, "min_channels": 4}, "cross": {"query": "ctx"}}
# regularisers that are the identity in eval only, by design (train mode drops or reweights features)
TRAIN_STOCHASTIC = {"adl"}  # (their train-mode output, and the batch-norm statistics after them, differ)

_COMMON = dict(deadline=None, database=None, print_blob=True,
               suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
# no shrinking in the fast profile: a failure reports its (small) model as drawn, within the time budget
settings.register_profile("fuzz-fast", max_examples=8, derandomize=True, phases=(Phase.explicit, Phase.generate),
                          report_multiple_bugs=True, **_COMMON)
settings.register_profile("fuzz-slow", max_examples=150, **_COMMON)


class Mismatch(AssertionError):
    pass


OUTCOMES: dict[str, int] = {}  # 'patched' / 'refused' counts over the session (for reports)
REFUSALS: list[str] = []
CHECKED: set[tuple[str, str, str]] = set()  # (model family, attention, kind) pairs tried


def _compare(a, b, what: str) -> None:
    ta, tb = tensors(a), tensors(b)
    if len(ta) != len(tb):
        raise Mismatch(f"{what}: {len(ta)} output tensors, patched {len(tb)}")
    for x, y in zip(ta, tb):
        if x.shape != y.shape:
            raise Mismatch(f"{what}: output shape {tuple(x.shape)}, patched {tuple(y.shape)}")
        if x.requires_grad != y.requires_grad:
            raise Mismatch(f"{what}: output requires_grad {x.requires_grad}, patched {y.requires_grad}")
        if not torch.isfinite(y).all() and torch.isfinite(x).all():
            raise Mismatch(f"{what}: the patched output is not finite")
        diff = (x.detach().double() - y.detach().double()).abs().max().item() if x.numel() else 0.0
        if not diff <= TOL:
            raise Mismatch(f"{what}: max |diff| {diff:.3g} > {TOL}")


def _copies(xs):
    return tuple(x.clone() for x in xs)


def _buffers(model):
    return {k: v for k, v in model.state_dict().items() if k.endswith(("running_mean", "running_var", "_rm", "_rv",
                                                                        "num_batches_tracked"))}


def check_attention(model, xs, name: str, kind: str) -> str:
    """One attention at one kind of sites: 'patched', 'refused' (a one-line SurgeonError); raises otherwise."""
    try:
        patched = surgeon.add(model, name, kind=kind, example_input=_copies(xs), **OPTIONS.get(name, {}))
    except VerificationError as exc:  # the user did nothing wrong: identity init must hold
        raise Mismatch(f"verification failed: {exc}") from exc
    except SurgeonError as exc:
        msg = str(exc)
        if not msg or "\n" in msg:
            raise Mismatch(f"a SurgeonError that is not one line: {msg!r}") from exc
        REFUSALS.append(f"{name} at {kind}: {msg}")
        return "refused"
    # eval, with autograd on
    _compare(model(*_copies(xs)), patched(*_copies(xs)), "eval")
    # train: separate copies (the patched model shares the original's tensors), one seed
    m1, p1 = copy.deepcopy(model).train(), copy.deepcopy(patched).train()
    torch.manual_seed(123)
    out_m = m1(*_copies(xs))
    torch.manual_seed(123)
    out_p = p1(*_copies(xs))
    if name in TRAIN_STOCHASTIC:
        return "patched"
    _compare(out_m, out_p, "train")
    bm, bp = _buffers(m1), p1.state_dict()
    for k, v in bm.items():
        if k not in bp:
            raise Mismatch(f"train: buffer {k!r} is missing from the patched state dict")
        if not torch.allclose(v.double(), bp[k].double(), atol=TOL):
            raise Mismatch(f"train: buffer {k!r} differs after one train-mode forward")
    return "patched"


def attentions_for(model, xs, spec) -> list[tuple[str, str]]:
    """(attention, kind) for every attention and each of its kinds the model has sites of."""
    try:
        found = {s.kind for s in surgeon.sites(model, kind=sorted(fuzz_models.kinds_of(spec)),
                                               example_input=_copies(xs))}
    except SurgeonError as exc:
        if "\n" in str(exc):
            raise Mismatch(f"sites: a SurgeonError that is not one line: {exc}") from exc
        return []
    return [(a.name, k) for a in surgeon.attentions() for k in a.kinds if k in found]


def run_property(data, spec, *, every: bool) -> None:
    model, xs, src = fuzz_models.build(spec)
    try:
        pairs = attentions_for(model, xs, spec)
    except Exception as exc:
        raise AssertionError(f"surgeon.sites: {type(exc).__name__}: {exc}\nspec: {spec}\n"
                             f"--- model source ---\n{src}") from exc
    if not pairs:
        return
    if not every:  # the fast profile checks a drawn few per model
        pairs = data.draw(st.lists(st.sampled_from(pairs), min_size=1, max_size=4, unique=True), label="attentions")
    for name, kind in pairs:
        try:
            outcome = check_attention(model, xs, name, kind)
        except Exception as exc:
            raise AssertionError(f"attention {name!r} at {kind} sites: {type(exc).__name__}: {exc}\n"
                                 f"spec: {spec}\n--- model source ---\n{src}") from exc
        OUTCOMES[outcome] = OUTCOMES.get(outcome, 0) + 1
        CHECKED.add((spec["family"], name, kind))



@settings(settings.get_profile("fuzz-fast"))
@given(data=st.data(), spec=fuzz_models.specs)
def test_fuzz_attentions_keep_the_model_or_refuse_in_one_line(data, spec):
    run_property(data, spec, every=False)


@pytest.mark.slow
@settings(settings.get_profile("fuzz-slow"))
@given(data=st.data(), spec=fuzz_models.specs)
def test_fuzz_every_attention_long(data, spec):
    run_property(data, spec, every=True)


def test_generator_covers_its_features():
    """The generator writes what it claims (a guard against a feature silently dropping out)."""
    spec = {"family": "cnn", "width": 4, "input_op": True, "two_inputs": True, "stem_bn": True,
            "blocks": [("res", s) for s in fuzz_models.ADD_STYLES] + [(b, "plus") for b in fuzz_models.CNN_BLOCKS],
            "hook": "nonleaf", "head": "functional", "aux_no_grad": True}
    src = fuzz_models.source(spec)
    for text in ("r = r + x", "r += x", "torch.add(r, x)", "r.add_(x)", "torch.cat", "with torch.no_grad():",
                 "x.relu_()", "x = x.sub(self.mean)", "training=self.training", "register_forward_hook",
                 "def forward(self, x, y)", "nn.MaxPool2d", "F.avg_pool2d", "nn.Dropout", "F.dropout"):
        assert text in src, text
    model, xs, _ = fuzz_models.build(spec)
    logits, aux = model(*xs)
    assert logits.shape == (2, 5) and logits.requires_grad and not aux.requires_grad
    seq = {"family": "seq", "cell": "LSTM", "batch_first": True, "bidirectional": True, "num_layers": 2,
           "packed": True, "padding_idx": 0, "readout": "per_step", "block": True, "context": True}
    src = fuzz_models.source(seq)
    assert "pack_padded_sequence" in src and "padding_idx=0" in src and "self.blk" in src
    model, xs, _ = fuzz_models.build(seq)
    assert model(*xs).shape == (2, 3)


# -- save / load in a new process ------------------------------------------------------------------------
# A generated CNN, fixed so the test is deterministic. NOTE: generated sequence models and models with two
# inputs do not load yet: `load` re-traces with one guessed input (32 steps, one tensor) instead of the
# recipe's inputs (checkpoint.py, reported in the issue)
ROUND_TRIP = [
    ({"family": "cnn", "width": 8, "input_op": True, "two_inputs": False, "stem_bn": True,
      "blocks": [("res", "iadd"), ("cat", "plus"), ("pool_module", "plus"), ("res", "torch_add")],
      "hook": "none", "head": "module", "aux_no_grad": False}, "cbam", "residual"),
    ({"family": "cnn", "width": 4, "input_op": False, "two_inputs": False, "stem_bn": False,
      "blocks": [("shared", "plus"), ("res", "add_"), ("dropout_module", "plus"), ("pool_functional", "plus")],
      "hook": "none", "head": "mean", "aux_no_grad": False}, "attnpool", "pool"),
]

_LOADER = """
import importlib.util, sys, torch, surgeon
for i, folder in enumerate(sys.argv[1:]):
    spec = importlib.util.spec_from_file_location(f"fuzz_model_{i}", f"{folder}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    xs, expected = torch.load(f"{folder}.io.pt")
    loaded = surgeon.load(folder, base=mod.Fuzz()).eval()
    with torch.no_grad():
        diff = (loaded(*xs) - expected).abs().max().item()
    print(i, diff)
    assert diff <= 1e-6, (folder, diff)
"""


def test_generated_models_save_and_load_in_a_new_process(tmp_path):
    import subprocess
    import sys

    folders = []
    for i, (spec, attention, kind) in enumerate(ROUND_TRIP):
        model, xs, src = fuzz_models.build(spec)
        patched = surgeon.add(model, attention, kind=kind, init="paper", example_input=xs, verify=False).eval()
        folder = tmp_path / f"m{i}"
        (tmp_path / f"m{i}.py").write_text(src)
        surgeon.save(patched, folder)
        with torch.no_grad():
            torch.save((xs, patched(*xs)), tmp_path / f"m{i}.io.pt")
        folders.append(str(folder))
    out = subprocess.run([sys.executable, "-c", _LOADER, *folders], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    assert len(out.stdout.splitlines()) == len(ROUND_TRIP)
