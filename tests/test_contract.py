"""Registry-wide contract: every registered pass runs on the zoo, the verifier passes, `modified`
tells the truth, exact passes keep outputs, configs round-trip through CLI text, and bad values raise
ConfigError. A pass registered without an entry in CONTRACT fails here: no pass without zoo coverage."""

import dataclasses
import typing

import pytest
import torch

from regc.errors import ConfigError
from regc.pipeline import PassStep, parse_pipeline
from regc.registry import PassContext, all_passes
from tests.conftest import capture_zoo, zoo_dataset

# pass name -> (zoo models it must run on, pipeline options used for the contract run)
CONTRACT: dict[str, tuple[tuple[str, ...], dict]] = {
    "fold_bn": (("resnet18_style", "mobilenetv2_style", "digits_cnn"), {}),
    "dce": (("mlp", "bert_encoder"), {}),
    "canonicalize": (("mobilenetv2_style", "gpt2_decoder"), {}),
    "prune": (("resnet18_style", "mobilenetv2_style", "bert_encoder", "gpt2_decoder"), {"ratio": 0.5}),
    "harden": (("resnet18_style", "bert_encoder"), {}),
    "wgsef": (("resnet18_style", "bert_encoder"), {"keep": 0.5}),
    "issp": (("mlp",), {"sparsity": 0.5}),
    "quant": (("mlp", "digits_cnn", "bert_encoder", "gpt2_decoder"), {"speed_check": False, "sweep_samples": 4}),
    "rf8": (("mlp", "bert_encoder", "gpt2_decoder"), {}),
    "svd": (("mlp", "resnet18_style", "bert_encoder", "gpt2_decoder"), {"ratio": 0.5}),
    "fwsvd": (("mlp", "digits_cnn", "mobilenetv2_style", "gpt2_decoder"), {"ratio": 0.5, "fisher": "batch"}),
    "regularize": (("mlp", "bert_encoder"), {"kind": "group_lasso"}),
    "compander": (("mlp", "digits_cnn"), {}),
    "gg_fit": (("mlp",), {}),
    "gg_init": (("mlp",), {}),
    "deepshape": (("digits_cnn",), {}),
    "eqnet": (("digits_cnn",), {"bits": "2:4:8", "calib_samples": 8, "eval_samples": 8,
                                "predictor_samples": 4, "predictor_epochs": 2, "population": 4, "generations": 1}),
}


def _package_passes():
    return {n: i for n, i in all_passes().items() if i.fn.__module__.startswith("regc.passes")}


def test_every_pass_has_zoo_coverage():
    missing = sorted(set(_package_passes()) - set(CONTRACT))
    assert not missing, f"passes without a CONTRACT entry (zoo coverage): {missing}"


def _cases():
    for name, (models, opts) in CONTRACT.items():
        for m in models:
            yield pytest.param(name, m, opts, id=f"{name}-{m}")


def _state(model):
    return {k: v.detach().clone() for k, v in model.gm.state_dict().items()}


@pytest.mark.parametrize("name,zoo_name,opts", list(_cases()))
def test_pass_contract(name, zoo_name, opts):
    info = _package_passes()[name]
    model = capture_zoo(zoo_name)
    data = zoo_dataset(model)
    model.verify()  # normalizes node metadata, so the text comparison below sees only the pass
    xs = data.batch(0, 4, like=model.example_inputs)
    with torch.no_grad():
        ref = [t.clone() for t in model.run(*xs)]
    text_before, state_before = model.print(), _state(model)
    step = PassStep(info, info.make_config(opts))
    torch.manual_seed(0)
    from regc.train import TrainSpec

    train = TrainSpec(data=data, steps=2, batch_size=8, progress=False)  # training passes: a short run
    result = info.fn(model, step.config, PassContext(data=data, train=train))
    result.model.verify()
    changed = result.model.print() != text_before or any(
        k not in state_before or not torch.equal(v, state_before[k]) for k, v in _state(result.model).items())
    assert result.modified == changed, f"{name} says modified={result.modified} but changed={changed}"
    with torch.no_grad():
        got = result.model.run(*xs)
    assert len(got) == len(ref) and all(g.shape == r.shape for g, r in zip(got, ref))
    if info.exact:
        for g, r in zip(got, ref):
            torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-4)
    import json

    json.dumps(result.stats)  # stats must be JSON-serializable for report.json


@pytest.mark.parametrize("name", sorted(CONTRACT))
def test_config_round_trips_and_rejects_bad_values(name):
    info = _package_passes()[name]
    opts = CONTRACT[name][1]
    step = PassStep(info, info.make_config(opts))
    assert parse_pipeline(str(step)).steps[0].config == step.config
    hints = typing.get_type_hints(info.config)
    for f in dataclasses.fields(info.config):
        if hints[f.name] in (int, float):
            with pytest.raises(ConfigError, match=f"{f.name}"):
                info.make_config({f.name: "not-a-number"})
        assert f.name in info.config.__doc__, f"{name}.{f.name} is not documented in the config docstring"
