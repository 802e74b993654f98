"""The registry: lookup by name and alias with "did you mean", kinds and their finders, built-in plugins; and
attention options: types checked against the layers' signatures, ranges by the layers' shared validators
(layers/_util.py). Every wrong value is one OptionError line, never a TypeError or a traceback."""
import math

import pytest
from click.testing import CliRunner

import surgeon
from surgeon import registry
from surgeon.cli import cli
from surgeon.errors import OptionError, UnknownNameError
from surgeon.layers import _util

from catalogue_models import names, target

# str options whose wrong value the layer rejects; for the rest, the wrong value is by type
NOT_A_NUMBER = "x"


def _wrong_type(value_type: tuple[str, ...], default):
    if value_type == ("bool",):
        return "maybe"
    if "int" in value_type:
        return 2.5
    if "float" in value_type:
        return NOT_A_NUMBER
    return 3  # a str (or untyped) option given a number


def _out_of_range(name: str, value_type: tuple[str, ...]):
    if value_type == ("bool",):
        return None  # a bool has no range
    if "int" in value_type:
        return -1
    if "float" in value_type:
        return math.inf if name == "beta" else -1.0  # eca's beta may be any finite number
    return "nonsense"


def _matrix():
    for name in names():
        att = registry.get_attention(name)
        for opt, default in att.options.items():
            t = att.option_types.get(opt, ())
            yield name, opt, _wrong_type(t, default)
            bad = _out_of_range(opt, t)
            if bad is not None:
                yield name, opt, bad
            if opt == "kernel_size":
                yield name, opt, 4  # even


_SITES = {}
RNN_ONLY = {("attnpool", "score"), ("attnpool", "query"), ("attnpool", "hidden")}


def _target(name, option=None):
    return target(name, "rnn" if (name, option) in RNN_ONLY else None)


def _site(name, option):
    """The first site where `name` builds, and the options it needs (sites found once per model)."""
    model, x, kw = _target(name, option)
    kw = dict(kw)
    key = (type(model).__name__, kw["kind"])
    if key not in _SITES:
        _SITES[key] = surgeon.sites(model, kind=kw["kind"], example_input=x)[0]
    return _SITES[key], {k: v for k, v in kw.items() if k != "kind"}


@pytest.mark.parametrize("name,option,value", list(_matrix()))
def test_every_option_rejects_a_wrong_value_with_one_line(name, option, value):
    site, kw = _site(name, option)
    att = registry.get_attention(name)
    att.build(site, init="identity", **kw)  # the site itself is fine
    with pytest.raises(OptionError) as exc:  # not a TypeError, ValueError or AttributeError from inside a layer
        att.build(site, init="identity", **{**kw, option: value})
    msg = str(exc.value)
    assert "\n" not in msg and option in msg and (repr(value) in msg or str(value) in msg), msg


def test_wrong_option_through_plan_is_one_line():
    model, x, kw = _target("cbam")
    with pytest.raises(OptionError, match=r"^cbam: option spatial_norm='maybe' is not valid; spatial_norm must be "
                                          r"true or false$"):
        surgeon.plan(model, "cbam", example_input=x, spatial_norm="maybe", **kw)


def test_bool_options_take_only_bools():
    model, x, kw = _target("se")
    for bad in ("maybe", "true", 1, 0, None):
        with pytest.raises(OptionError, match=r"^se: option bias=.* must be true or false$"):
            surgeon.plan(model, "se", example_input=x, bias=bad, **kw)
    plan = surgeon.plan(model, "se", example_input=x, bias=False, **kw)
    assert not any(n.endswith("bias") for n, _ in plan.edits[0].module.named_parameters())


def test_float_options_take_ints_but_not_nan():
    model, x, kw = _target("adl")
    surgeon.plan(model, "adl", example_input=x, gamma=1, **kw)
    with pytest.raises(OptionError, match="gamma=nan .* must be a finite number"):
        surgeon.plan(model, "adl", example_input=x, gamma=float("nan"), **kw)


def test_cli_forms_of_bools():
    assert registry.parse_cli_options("se", {"bias": "true", "rd_divisor": 1}) == {"bias": True, "rd_divisor": 1}
    assert registry.parse_cli_options("se", {"bias": 0}) == {"bias": False}
    assert registry.parse_cli_options("se", {"bias": "maybe"}) == {"bias": "maybe"}


@pytest.mark.parametrize("option,valid", [("bias=maybe", "true or false"), ("rd_ratio=-3", "(0, 1]"),
                                          ("rd_divisor=2.5", "an integer")])
def test_cli_wrong_option_is_one_line_exit_2(option, valid):
    result = CliRunner().invoke(cli, ["add", "se", "toy_models:tiny_resnet", "--input-size", "3,32,32",
                                      "--option", option, "--dry-run"])
    assert result.exit_code == 2, result.output
    lines = [ln for ln in result.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error:") and option.split("=")[0] in lines[0] and valid in lines[0]


@pytest.mark.parametrize("check,args,ok", [
    (_util.check_int, ("n", 0), False), (_util.check_int, ("n", True), False), (_util.check_int, ("n", 3), True),
    (_util.check_odd_kernel, ("k", 3), True), (_util.check_odd_kernel, ("k", 4), False),
    (_util.check_ratio, ("r", 1), True), (_util.check_ratio, ("r", 0), False),
    (_util.check_ratio, ("r", float("nan")), False), (_util.check_fraction, ("f", 0), True),
    (_util.check_positive, ("t", float("inf")), False), (_util.check_bool, ("b", 1), False),
    (_util.check_choice, ("m", "ab", ("a", "b")), False), (_util.check_feat_size, ((7, 7),), True),
])
def test_shared_validators(check, args, ok):
    if ok:
        check(*args)
    else:
        with pytest.raises(OptionError):
            check(*args)


def test_layers_raise_value_errors_for_hand_written_models():
    from surgeon.layers import CBAM

    with pytest.raises(ValueError, match="kernel_size must be a positive odd integer, got 4"):
        CBAM(16, kernel_size=4)


# -- lookup ---------------------------------------------------------------------------------------------
def test_an_attention_is_found_by_name_and_by_every_alias():
    table = registry.attentions()
    for att in table.values():
        assert registry.get_attention(att.name).name == att.name
        for alias in att.aliases:
            assert registry.get_attention(alias).name == att.name
    assert registry.get_attention("nonlocal").name == "nl" and registry.get_attention("sam").name == "spatial"
    assert "nonlocal" not in table  # keyed by name; aliases only resolve


@pytest.mark.parametrize("name, close", [
    ("cbma", "'cbam'"),           # a typo
    ("squeeze", "'squeeze_excite'"),  # part of an alias
    ("NONLOCAL", "'nonlocal'"),   # another case
])
def test_an_unknown_attention_says_what_it_may_have_meant(name, close):
    with pytest.raises(UnknownNameError) as err:
        registry.get_attention(name)
    message = str(err.value)
    assert message.startswith(f"Unknown attention {name!r}. Did you mean ") and close in message
    assert message.endswith("Run 'surgeon list' for all attentions.")


def test_a_name_close_to_nothing_gets_no_guess():
    with pytest.raises(UnknownNameError, match=r"^Unknown attention 'zzzz'\. Run 'surgeon list'"):
        registry.get_attention("zzzz")


def test_kinds_and_their_finders():
    kinds = registry.site_finders()
    assert {"residual", "stage", "after_conv", "pool", "rnn", "tokens"} <= set(kinds)
    assert registry.finders() == {k: f.find for k, f in kinds.items()}
    registry.check_kind("stage")
    with pytest.raises(UnknownNameError, match=r"Unknown kind 'stag'\. Did you mean 'stage'\?.*Valid kinds: "):
        registry.check_kind("stag")


def test_every_attention_has_a_default_kind_it_serves_and_only_known_kinds():
    kinds = set(registry.site_finders())
    for att in registry.attentions().values():
        assert att.default_kind == att.kinds[0] and set(att.kinds) <= kinds, att.name


BUILT_IN = {"aaconv", "adl", "attention_gate", "attnpool", "bam", "cbam", "ccnet", "coord", "cross", "danet", "eca",
            "ema", "fca", "gc", "ge", "hard", "inputattn", "local", "mhsa", "nl", "residual_attention", "scse", "se",
            "sk", "spatial", "srm", "stn", "structured", "triplet"}
# the catalogue's second part (issue 16)
BUILT_IN |= {"simam", "gct", "ese", "ceca", "sa", "splat", "ela", "strip", "psa", "ea", "bot", "halo", "lambda",
             "fpa", "gau", "dham"}


def test_every_built_in_attention_is_registered():
    builtin = {a.name for a in registry.attentions().values() if a.plugin in registry.DEFAULT_PLUGINS}
    assert builtin == BUILT_IN


def test_every_built_in_plugin_is_loaded_under_its_module_name():
    pm = registry.get_plugin_manager()
    assert registry.get_plugin_manager() is pm  # loaded once
    assert all(pm.has_plugin(name) for name in registry.DEFAULT_PLUGINS)
    assert {a.plugin for a in registry.attentions().values()} <= set(registry.DEFAULT_PLUGINS)

