"""Pipeline text, phase order, the registry's errors and option coercion."""

import dataclasses

import pytest
import torch

import regc
from regc.errors import ConfigError, PipelineError
from regc.pipeline import parse_pipeline
from regc.registry import Phase, PassResult, check_range, get_pass, register_pass


@dataclasses.dataclass(frozen=True)
class _ToyConfig:
    """Options for `_toy_scale`.

    Attributes:
        factor: multiply the output by this, in (0, 10].
        mode: how to scale.
        layers: layer names to touch.
    """

    factor: float = 1.0
    mode: str = "all"
    layers: tuple = ()

    def __post_init__(self):
        check_range("_toy_scale", "factor", self.factor, 0, 10, lo_open=True)


@register_pass("_toy_scale", _ToyConfig, phase=Phase.QUANT, exact=False)
def _toy_scale(model, config, ctx):
    """Test-only pass."""
    return PassResult(model, False, {"factor": config.factor})


def test_text_round_trips():
    text = "fold_bn,canonicalize,_toy_scale{factor=2.5,layers=a:b}"
    with pytest.raises(PipelineError, match="cannot run after"):  # canonicalize after fold_bn is fine
        parse_pipeline("_toy_scale,fold_bn")
    p = parse_pipeline(text)
    assert str(p) == text
    assert str(parse_pipeline(str(p))) == text
    assert p.steps[2].config == _ToyConfig(factor=2.5, layers=("a", "b"))


def test_defaults_are_not_printed():
    assert str(parse_pipeline("_toy_scale{factor=1.0}")) == "_toy_scale"


def test_unknown_pass_suggests_close_match():
    with pytest.raises(PipelineError, match="Did you mean 'fold_bn'"):
        parse_pipeline("fold_bm")


def test_unknown_option_suggests_close_match():
    with pytest.raises(ConfigError, match="did you mean 'factor'"):
        parse_pipeline("_toy_scale{facor=2}")


@pytest.mark.parametrize("text,match", [
    ("_toy_scale{factor=abc}", "must be float"),
    ("_toy_scale{factor=0}", r"must be in \(0, 10\], got 0.0"),
    ("_toy_scale{factor=11}", r"must be in \(0, 10\]"),
    ("_toy_scale{factor}", "KEY=VALUE"),
    ("_toy_scale{factor=1,factor=2}", "given twice"),
])
def test_bad_options_raise_config_error(text, match):
    with pytest.raises(ConfigError, match=match):
        parse_pipeline(text)


@pytest.mark.parametrize("text", ["", "fold_bn,", "fold_bn;dce", "fold_bn{", "1abc"])
def test_malformed_text(text):
    with pytest.raises(PipelineError):
        parse_pipeline(text)


def test_wrong_order_explains_legal_order():
    with pytest.raises(PipelineError) as e:
        parse_pipeline("_toy_scale,dce")
    msg = str(e.value)
    assert "canonicalize < reparam < regularize < prune < lowrank < sparsify < quant < lower" in msg
    assert "Put 'dce' before '_toy_scale'" in msg


def test_registry_rejects_duplicates_and_bad_configs():
    with pytest.raises(ValueError, match="registered twice"):
        register_pass("fold_bn", _ToyConfig, phase=Phase.QUANT, exact=True)(lambda m, c, x: None)

    @dataclasses.dataclass
    class NotFrozen:
        a: int = 1

    with pytest.raises(TypeError, match="frozen"):
        register_pass("_nf", NotFrozen, phase=Phase.QUANT, exact=True)


def test_pass_failure_names_pass_and_predecessors(convbn_model):
    @dataclasses.dataclass(frozen=True)
    class C:
        """Options for `_boom` (none)."""

    @register_pass("_boom", C, phase=Phase.LOWER, exact=True)
    def _boom(model, config, ctx):
        raise ZeroDivisionError("bug inside")

    with pytest.raises(PipelineError, match=r"pass '_boom' \(after fold_bn\) failed: ZeroDivisionError") as e:
        regc.compress(convbn_model, "fold_bn,_boom")
    assert isinstance(e.value.__cause__, ZeroDivisionError)


def test_pipeline_of_python_values():
    p = regc.Pipeline.of("fold_bn", ("_toy_scale", {"factor": 3}))
    assert str(p) == "fold_bn,_toy_scale{factor=3.0}"
    assert get_pass("_toy_scale").options()[0][:3] == ("factor", "float", 1.0)
    assert "multiply the output" in get_pass("_toy_scale").options()[0][3]


def test_needs_data_is_enforced(convbn_model):
    @dataclasses.dataclass(frozen=True)
    class C:
        """Options for `_needs` (none)."""

    register_pass("_needs", C, phase=Phase.LOWER, exact=True, needs_data=True)(
        lambda m, c, x: PassResult(m, False))
    with pytest.raises(ConfigError, match="needs calibration data: pass --data"):
        regc.compress(convbn_model, "_needs")
    x = torch.randn(2, 3, 8, 8)
    out = regc.compress(convbn_model, "_needs", data=regc.Dataset({"x": x}))
    assert out is convbn_model
