"""harden (the physical end of group-sparse training): zero units go, exactly; constant units stay;
and the chain regularize{kind=wgsef} -> harden leaves a smaller graph with the trained outputs."""

import pytest
import torch

import regc
from regc.passes._depgraph import build_depgraph
from tests.test_depgraph import _zero_units, capture_zoo


def test_harden_removes_exactly_the_zero_units():
    model = capture_zoo("bert_encoder")
    dg = build_depgraph(model)
    chosen = _zero_units(model, dg, frac=0.25)
    ref = model.run(*model.example_inputs)[0]
    model, records = regc.Pipeline.parse("harden").run(model)
    stats = records[0]["stats"]
    assert stats["units_removed"] == len(chosen)
    assert {(g["kind"], g["units_before"], g["units_after"]) for g in stats["groups"]} == {
        ("head", 4, 3), ("channel", 256, 192)}
    torch.testing.assert_close(model.run(*model.example_inputs)[0], ref, rtol=1e-5, atol=1e-5)


def test_harden_keeps_constant_channels_and_is_a_noop_on_dense():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
                              torch.nn.Conv2d(8, 4, 1))
    with torch.no_grad():
        net[0].weight[:2] = 0
        net[0].bias[:2] = 0
        net[1].bias[0] = 0.5  # channel 0: zero filter, BN shift 0.5 -> a constant, not zero
        net[1].weight[1] = 0
        net[1].bias[1] = 0  # channel 1: all zero -> removable
        net[1].running_mean.uniform_(-1, 1)
    model = regc.capture(net, (torch.randn(2, 3, 6, 6),))
    ref = model.run(*model.example_inputs)[0]
    model, records = regc.Pipeline.parse("harden").run(model)
    assert records[0]["stats"]["units_removed"] == 1 and records[0]["stats"]["constant_units"] >= 1
    assert model.get_tensor("0.weight").shape[0] == 7
    torch.testing.assert_close(model.run(*model.example_inputs)[0], ref, rtol=1e-5, atol=1e-6)
    again, records = regc.Pipeline.parse("harden").run(model)
    assert not records[0]["modified"]


@pytest.mark.slow
def test_wgsef_training_then_harden_shrinks_the_graph():
    torch.manual_seed(0)
    # no biases: wgsef zeroes weight groups only, and a zero row with a bias is a constant, not zero
    net = torch.nn.Sequential(torch.nn.Linear(16, 32, bias=False), torch.nn.ReLU(),
                              torch.nn.Linear(32, 32, bias=False), torch.nn.ReLU(), torch.nn.Linear(32, 4))
    model = regc.capture(net, (torch.randn(8, 16),), {"input": {0: torch.export.Dim("batch")}})
    x = torch.randn(256, 16)
    data = regc.Dataset({"input": x}, x[:, :4].argmax(1))
    ctx = regc.PassContext(train=regc.train.TrainSpec(data=data, optimizer="sgd", lr=0.1, steps=100,
                                                      batch_size=32))
    model, records = regc.Pipeline.parse(
        "regularize{kind=wgsef,strength=5,keep=0.25,layers=0.weight:2.weight},harden").run(model, ctx)
    trained = records[0]
    hard = records[1]["stats"]
    assert trained["modified"] and hard["units_removed"] > 0
    assert hard["params_after"] < 0.6 * hard["params_before"]
    assert model.get_tensor("2.weight").shape[0] < 32
