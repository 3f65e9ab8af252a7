"""prune: config validation, the policy picks the right units, per-layer stats, rounding, heads."""

import json

import pytest
import torch

import regc
from regc.errors import ConfigError
from regc.passes._depgraph import build_depgraph
from regc.passes._importance import unit_importance
from regc.passes.prune import PruneConfig, kept_units
from regc.pipeline import parse_pipeline
from regc.zoo import digits_cnn, digits_data
from tests import conftest
from tests.test_depgraph import capture_zoo


def _digits_model(dead: float = 0.0):
    """The trained digits CNN with the last ``dead`` fraction of each conv's filters (and BN) zeroed."""
    zm = digits_cnn()
    with torch.no_grad():
        for conv, bn in ((zm.module.features[0], zm.module.features[1]),
                         (zm.module.features[4], zm.module.features[5])):
            n = round(dead * conv.out_channels)
            for t in (conv.weight, bn.weight, bn.bias):
                t[conv.out_channels - n:] = 0
    return conftest.capture_zoo(zm)


def _digits_dataset(n=128):
    d = digits_data()
    return regc.Dataset({"image": d.x_train[:n]}, d.y_train[:n])


@pytest.mark.parametrize("opts,field", [
    ({"ratio": 1.0}, "ratio"), ({"ratio": -0.1}, "ratio"), ({"head_ratio": 1.5}, "head_ratio"),
    ({"importance": "random"}, "importance"), ({"round_to": 0}, "round_to"),
    ({"batch_size": 0}, "batch_size"),
])
def test_config_rejects_bad_values(opts, field):
    with pytest.raises(ConfigError, match=f"prune.{field}"):
        PruneConfig(**opts)


def test_pipeline_text_round_trips():
    p = parse_pipeline("prune{ratio=0.3,importance=taylor,round_to=8}")
    assert str(p) == "prune{ratio=0.3,importance=taylor,round_to=8}"
    assert p.steps[0].config == PruneConfig(ratio=0.3, importance="taylor", round_to=8)


def test_kept_units_rounding():
    assert kept_units(64, 1, 0.5, 1) == 32
    assert kept_units(60, 1, 0.5, 8) == 32  # 30 rounded up to a multiple of 8
    assert kept_units(4, 16, 0.25, 8) == 3  # heads of 16 channels are already multiples of 8
    assert kept_units(3, 1, 0.9, 1) == 1  # never empties a group


@pytest.mark.parametrize("importance", ["l1", "l2", "fisher", "taylor"])
def test_every_criterion_removes_dead_filters_first(importance):
    """3/8 of each conv's filters are dead: every criterion scores them 0 and the others above 0, so
    ratio=0.375 removes exactly them (outputs kept), and the model really got smaller."""
    model = _digits_model(dead=0.375)
    x = digits_data().x_test
    ref = model(x)
    scores = unit_importance(model, build_depgraph(model).groups, importance, _digits_dataset())
    assert [int((s == 0).sum()) for s in scores] == [6, 12] and all((s[:-12] > 0).all() for s in scores)
    text = f"prune{{ratio=0.375,importance={importance}}}"
    model, records = parse_pipeline(text).run(model, regc.PassContext(data=_digits_dataset()))
    stats = records[0]["stats"]
    assert stats["layers"]["features.0.weight"]["out_after"] == 10
    assert model.get_tensor("features.4.weight").shape == (20, 10, 3, 3)
    assert model.get_tensor("classifier.weight").shape == (10, 20 * 4)
    torch.testing.assert_close(model(x), ref, rtol=1e-5, atol=1e-5)
    json.dumps(stats)


def test_fisher_and_taylor_need_data():
    model = _digits_model()
    with pytest.raises(ConfigError, match="prune"):
        regc.compress(model, "prune{importance=fisher}")


def test_resnet_half_channels_report():
    model = capture_zoo("resnet18_style")
    before = model.num_params()
    model, records = parse_pipeline("prune{ratio=0.5,round_to=8}").run(model)
    stats = records[0]["stats"]
    assert records[0]["modified"] and stats["params_before"] == before
    assert stats["params_after"] < 0.3 * before  # conv params scale with (kept fraction)^2
    layer = stats["layers"]["layer3.0.conv1.weight"]
    sizes = (layer["out_before"], layer["out_after"], layer["in_before"], layer["in_after"])
    assert sizes == (64, 32, 32, 16)
    assert all(g["channels_after"] % 8 == 0 for g in stats["groups"])
    assert model(torch.randn(5, 3, 32, 32)).shape == (5, 10)
    json.dumps(stats)


def test_bert_heads_and_ffn_units():
    model = capture_zoo("bert_encoder")
    model, records = parse_pipeline("prune{ratio=0.5,head_ratio=0.25}").run(model)
    kinds = {(g["kind"], g["units_before"], g["units_after"]) for g in records[0]["stats"]["groups"]}
    assert kinds == {("head", 4, 3), ("channel", 256, 128)}
    assert model.get_tensor("layers.1.attention.value.weight").shape == (48, 64)
    assert model.get_tensor("layers.1.output.weight").shape == (64, 128)
    ids = torch.randint(1, 1000, (2, 12))
    assert model(ids, torch.ones_like(ids)).shape == (2, 12, 64)


@pytest.mark.slow
def test_pretrained_minilm_prunes_ffn_units_and_heads():
    """The pretrained MiniLM (a position-id buffer sliced in the graph, 6 layers x 12 heads):
    prune removes FFN units and heads; zeroing nothing else, the pruned model still runs."""
    from regc.zoo import SENTENCES, minilm, minilm_tokenize

    model = conftest.capture_zoo(minilm())
    ids, mask = minilm_tokenize(SENTENCES[:8])
    with torch.no_grad():
        ref = model(ids, mask)
    pruned, records = parse_pipeline("prune{ratio=0.25,head_ratio=0.25}").run(model)
    stats = records[0]["stats"]
    assert stats["params_after"] < 0.93 * stats["params_before"]
    kinds = {(g["kind"], g["units_before"], g["units_after"]) for g in stats["groups"]}
    assert ("head", 12, 9) in kinds and ("channel", 1536, 1152) in kinds
    with torch.no_grad():
        out = pruned(ids, mask)
    assert out.shape == ref.shape
    # one-shot, no recovery: embeddings stay correlated with the original (bound from a measured run)
    assert float(torch.nn.functional.cosine_similarity(out, ref).mean()) > 0.5
