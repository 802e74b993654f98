"""surgeon.errors: user mistakes raise the SurgeonError subclass that names what was wrong; broken internal
invariants raise InternalError, which is no SurgeonError and asks for a bug report."""
import ast
import pathlib

import pytest
import torch
from click.testing import CliRunner
from torch import nn

import surgeon
from surgeon import errors
from surgeon.cli import cli, handle_errors
from surgeon.errors import InternalError, ModelError, OptionError, SurgeonError
from toy_models import TinyResNet

PACKAGE = pathlib.Path(surgeon.__file__).parent


def test_no_code_raises_the_bare_base_class():
    bare = []
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Raise) and isinstance(node.exc, ast.Call) \
                    and getattr(node.exc.func, "id", None) == "SurgeonError":
                bare.append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno}")
    assert not bare, "raise the subclass that says what was wrong: " + ", ".join(bare)


def test_every_user_error_is_a_surgeon_error_and_the_internal_one_is_not():
    users = [c for c in vars(errors).values() if isinstance(c, type) and issubclass(c, SurgeonError)]
    assert len(users) >= 10
    assert not issubclass(InternalError, SurgeonError) and issubclass(InternalError, RuntimeError)
    assert str(InternalError("x went wrong")) == ("x went wrong. This is a bug in surgeon, please report it "
                                                  "(with the traceback)")


def test_the_cli_shows_an_internal_error_as_a_traceback_not_one_line():
    @handle_errors
    def broken():
        raise InternalError("an invariant broke")

    with pytest.raises(InternalError, match="bug in surgeon"):
        broken()

    @handle_errors
    def mistaken():
        raise OptionError("a user mistake")

    with pytest.raises(SystemExit) as exit_:
        mistaken()
    assert exit_.value.code == 2


def test_a_kind_the_attention_does_not_serve_is_an_option_error():
    with pytest.raises(OptionError, match="se cannot serve kind 'pool'; it serves residual"):
        surgeon.plan(TinyResNet().eval(), "se", kind="pool", input_size=(3, 32, 32))
    result = CliRunner().invoke(cli, ["add", "se", "tests/toy_models.py:TinyResNet", "--kind", "pool",
                                      "--input-size", "3,32,32"])
    assert result.exit_code == 2 and result.output.count("\n") == 1


def test_a_model_that_is_no_module_is_a_model_error():
    with pytest.raises(ModelError, match="Expected a torch.nn.Module or a model reference string, got int"):
        surgeon.sites(3)


@pytest.mark.parametrize("to_script", [torch.jit.script, lambda m: torch.jit.trace(m, torch.randn(1, 3, 32, 32))])
def test_a_torchscript_model_is_refused_naming_what_to_patch_instead(to_script):
    scripted = to_script(TinyResNet().eval())
    with pytest.raises(ModelError, match="is TorchScript .* patch the nn.Module it was made from"):
        surgeon.add(scripted, "se", input_size=(3, 32, 32))


def test_a_model_with_uninitialised_lazy_modules_is_refused_and_left_uninitialised():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.LazyConv2d(8, 3), nn.ReLU(), nn.LazyConv2d(8, 3))
    with pytest.raises(ModelError, match=r"^LazyConv2d at '1' has uninitialised \(lazy\) parameters: run the model "
                                         "once on an example input"):
        surgeon.add(model, "se", input_size=(3, 32, 32))
    assert isinstance(model[1].weight, nn.parameter.UninitializedParameter)
    model(torch.randn(1, 3, 32, 32))  # initialised as the error says: patched, and computing what it computes
    patched = surgeon.add(model, "se", input_size=(3, 32, 32))
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(patched.eval()(x), model.eval()(x))


def test_an_adapter_of_a_model_without_edits_is_an_option_error(tmp_path):
    with pytest.raises(OptionError, match="no edits, so an adapter would be empty"):
        surgeon.save(nn.Linear(2, 2), tmp_path / "out", adapter=True)


@pytest.mark.parametrize("context", [torch.no_grad, torch.inference_mode], ids=["no_grad", "inference_mode"])
def test_surgery_inside_no_grad_or_inference_mode_gives_a_verified_trainable_model(context):
    """An evaluation script's setup: the inserted modules still get trainable (not inference) parameters, and the
    check its backward pass."""
    model = TinyResNet()
    with context():
        plan = surgeon.plan(model, "se", input_size=(3, 32, 32))
        patched = plan.apply()
        assert torch.is_grad_enabled() is False  # the caller's setting is back
    new = [p for n, p in patched.named_parameters() if ".se" in n or n.startswith("se")]
    assert plan.verification.ok and plan.verification.with_grad == len(new) > 0
    assert all(p.requires_grad and not p.is_inference() for p in new)
    patched(torch.randn(2, 3, 32, 32)).sum().backward()
    assert all(p.grad is not None for p in new)


def test_a_model_made_under_inference_mode_is_refused_in_one_line():
    with torch.inference_mode():
        model = TinyResNet()
    with pytest.raises(ModelError, match=r"^TinyResNet holds tensors made under torch.inference_mode, which can be "
                                         "neither trained nor checked"):
        surgeon.add(model, "se", input_size=(3, 32, 32))
