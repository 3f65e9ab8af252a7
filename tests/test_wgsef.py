"""wgsef and harden: the envelope prox with continuation reaches exactly k units per dependency-graph
group on a ResNet and a BERT encoder; harden then removes them physically (the parameter count drops by
what the groups predict) with the trained outputs; zero units go, exactly; constant units are folded
into the next layer where that is exact and kept (with the reason) where it is not; masks follow."""

import pytest
import torch

import regc
from regc.passes import _reg_math as rm
from regc.passes._depgraph import build_depgraph
from tests.conftest import zoo_dataset
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


class _Net(torch.nn.Module):
    """conv3x3 -> BN -> ReLU -> (consumer) -> pool -> linear; the consumer decides whether a constant
    channel of the first conv can be folded."""

    def __init__(self, consumer: str):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 3, bias=False)
        self.bn = torch.nn.BatchNorm2d(8)
        self.consumer = consumer
        if consumer == "1x1_bn":
            self.c2, self.bn2 = torch.nn.Conv2d(8, 6, 1, bias=False), torch.nn.BatchNorm2d(6)
        else:
            size = 1 if consumer == "1x1" else 3
            self.c2 = torch.nn.Conv2d(8, 6, size, padding=size // 2)
        self.fc = torch.nn.Linear(6, 4)

    def forward(self, x):
        y = self.c2(torch.relu(self.bn(self.conv(x))))
        if self.consumer == "1x1_bn":
            y = self.bn2(y)
        return self.fc(torch.relu(y).mean((2, 3)))


def _constant_model(consumer):
    torch.manual_seed(0)
    net = _Net(consumer)
    with torch.no_grad():
        for bn in (net.bn, getattr(net, "bn2", None)):
            if bn is not None:
                bn.running_mean.uniform_(-1, 1)
                bn.running_var.uniform_(0.5, 2)
                bn.bias.uniform_(-1, 1)
        net.conv.weight[:3] = 0  # channels 0-2: zero filter, BN shift -> a constant
        net.bn.bias[:3] = torch.tensor([0.7, -0.4, 0.9])
        net.bn.weight[3] = 0
        net.conv.weight[3] = 0
        net.bn.bias[3] = 0  # channel 3: all zero -> removable everywhere
    return regc.capture(net.eval(), (torch.randn(4, 3, 9, 9),), {"x": {0: torch.export.Dim("batch")}})


@pytest.mark.parametrize("consumer,folded,absorber", [
    ("1x1", 3, "c2.bias"), ("1x1_bn", 3, "bn2.running_mean"), ("3x3_padded", 0, None)])
def test_harden_folds_constant_channels_where_exact(consumer, folded, absorber):
    model = _constant_model(consumer)
    x = torch.randn(16, 3, 9, 9)
    ref = model.run(x)[0]
    before = {k: v.clone() for k, v in model.gm.state_dict().items()}
    model, records = regc.Pipeline.parse("harden").run(model)
    stats = records[0]["stats"]
    assert stats["constant_units_folded"] == folded and stats["units_removed"] == 1 + folded
    assert stats["constant_units"] == 3 - folded  # kept constants are listed with the reason
    assert all("padded convolution" in k["reason"] for k in stats["constant_units_kept"])
    assert model.get_tensor("conv.weight").shape[0] == 8 - 1 - folded
    assert model.get_tensor("c2.weight").shape[1] == 8 - 1 - folded
    assert stats["params_before"] - stats["params_after"] == (1 + folded) * (27 + 2 + 6 * model.get_tensor(
        "c2.weight")[0, 0].numel())
    if absorber:  # the constant went into the consumer's bias (or the BN mean after it)
        assert not torch.equal(model.get_tensor(absorber), before[absorber])
    torch.testing.assert_close(model.run(x)[0], ref, rtol=1e-5, atol=1e-5)
    _, again = regc.Pipeline.parse("harden").run(model)
    assert not again[0]["modified"]


@pytest.mark.parametrize("pipeline", ["prune{ratio=0.5}", "harden"])
def test_prune_and_harden_keep_masks_in_step_with_sliced_weights(pipeline):
    model = _constant_model("3x3_padded")  # channel 3 is all zero: harden removes it, prune removes 4
    for t in ("conv.weight", "c2.weight"):  # an ISS-P style unstructured mask on both sides of the cut
        w = model.get_tensor(t)
        with torch.no_grad():
            w.masked_fill_((w.abs() < w.abs().median()) & (w != 0), 0)
        model.annotations[t] = {"mask": w != 0, "sparsity": 0.5, "pattern": "unstructured"}
    model, _ = regc.Pipeline.parse(pipeline).run(model)
    assert model.get_tensor("conv.weight").shape[0] == (4 if pipeline.startswith("prune") else 7)
    for t in ("conv.weight", "c2.weight"):
        w, ann = model.get_tensor(t), model.annotations[t]
        assert ann["mask"].shape == w.shape and torch.equal(ann["mask"], w != 0)
        assert ann["sparsity"] == pytest.approx(1 - float((w != 0).float().mean()))
        assert ann["pattern"] == "unstructured"


def test_envelope_prox_tends_to_the_topk_projection():
    """(1 + c) prox_{c S_k} -> P_k as c -> inf: the projection wgsef ends with is the envelope's limit."""
    g = torch.Generator().manual_seed(0)
    norms = torch.rand(40, generator=g, dtype=torch.float64) + 0.01
    k = 7
    topk = torch.zeros(40, dtype=torch.float64)
    topk[norms.argsort(descending=True)[:k]] = 1
    alive = []
    for c in (1e-2, 1.0, 1e6):
        f = rm.sef_shrink(norms, torch.ones(40), c, k)
        alive.append(int((f > 0).sum()))
    assert alive[0] > 2 * k and alive[-1] == k  # moderate lambda: many alive; the limit: exactly k
    torch.testing.assert_close((1 + 1e6) * rm.sef_shrink(norms, torch.ones(40), 1e6, k), topk,
                               rtol=0, atol=1e-5)


def _expected_params(model, dg, removed):
    """Parameter count after removing ``removed`` units, from the groups' slots alone."""
    removed = set(removed)
    gone: dict[tuple[str, int], torch.Tensor] = {}
    for g in dg.groups:
        dead = torch.tensor([u in removed for u in g.units] + [False])  # idx -1 -> the last entry: kept
        for slot, idx in g.members:
            key = (slot.target, slot.dim)
            gone[key] = gone.get(key, torch.zeros(len(idx), dtype=torch.bool)) | dead[idx]
    total = 0
    for name, p in model.gm.named_parameters():
        n = 1
        for d, size in enumerate(p.shape):
            n *= size - int(gone[(name, d)].sum()) if (name, d) in gone else size
        total += n
    return total


@pytest.mark.slow
@pytest.mark.parametrize("zoo_name,keep,n_groups,left", [("resnet18_style", 0.5, 12, 0.26),
                                                         ("bert_encoder", 0.5, 4, 0.71)])
def test_wgsef_reaches_k_per_group_then_harden_removes_them_exactly(zoo_name, keep, n_groups, left,
                                                                    one_thread):
    model = capture_zoo(zoo_name)
    data = zoo_dataset(model, n=32)
    ctx = regc.PassContext(train=regc.train.TrainSpec(data=data, optimizer="sgd", lr=0.05, steps=12,
                                                      batch_size=8, progress=False))
    model, rec = regc.Pipeline.parse(f"wgsef{{keep={keep},strength=5}}").run(model, ctx)
    stats = rec[0]["stats"]
    assert len(stats["groups"]) == n_groups and stats["exact_k"]
    dg = build_depgraph(model)
    for g, r in zip(dg.groups, stats["groups"], strict=True):  # exactly k non-zero units per group
        norms = torch.zeros(len(g.units), dtype=torch.float64)
        for slot, idx in g.members:
            p = model.get_tensor(slot.target)
            if slot.role == "out" and isinstance(p, torch.nn.Parameter):
                per = p.detach().double().abs().sum([d for d in range(p.dim()) if d != slot.dim]) \
                    if p.dim() > 1 else p.detach().double().abs()
                norms.index_add_(0, idx.clamp_min(0), per * (idx >= 0))
        assert int((norms > 0).sum()) == r["k"] == max(1, round(keep * len(g.units)))
        assert r["alive_before"] == len(g.units)  # training did the selection, not the start point
    dead = [u for g in dg.groups for u, z in zip(g.units, _unit_zero(model, g), strict=True) if z]
    expected = _expected_params(model, dg, dead)
    xs = zoo_dataset(model, n=8, seed=1).batch(0, 8, like=model.example_inputs)
    ref = model.run(*xs)[0]
    model, rec = regc.Pipeline.parse("harden").run(model)
    hard = rec[0]["stats"]
    assert hard["units_removed"] == len(dead) == sum(len(g.units) - r["k"] for g, r in zip(
        dg.groups, stats["groups"], strict=True))
    # resnet: every conv halves in and out (~1/4 left); bert: embeddings and hidden width are pinned
    assert hard["params_after"] == expected == model.num_params() < left * hard["params_before"]
    torch.testing.assert_close(model.run(*xs)[0], ref, rtol=1e-5, atol=1e-5)


def _unit_zero(model, g):
    mass = g.reduce({s.target: model.get_tensor(s.target).detach().abs() for s, _ in g.members
                     if isinstance(model.get_tensor(s.target), torch.nn.Parameter)})
    return (mass == 0).tolist()


def test_wgsef_rejects_bad_options_and_selects_groups():
    with pytest.raises(regc.errors.ConfigError, match="wgsef.groups"):
        regc.Pipeline.parse("wgsef{groups=channel:layer}")
    with pytest.raises(regc.errors.ConfigError, match="wgsef.keep"):
        regc.Pipeline.parse("wgsef{keep=0}")
    model = capture_zoo("bert_encoder")
    data = zoo_dataset(model, n=8)
    ctx = regc.PassContext(train=regc.train.TrainSpec(data=data, steps=2, batch_size=8, progress=False))
    _, rec = regc.Pipeline.parse("wgsef{groups=head,keep=0.25}").run(model, ctx)
    groups = [(g["kind"], g["units"], g["alive_after"]) for g in rec[0]["stats"]["groups"]]
    assert groups == [("head", 4, 1)] * 2  # FFN channel groups untouched
    with pytest.raises(regc.errors.ConfigError, match="no prunable group"):
        regc.Pipeline.parse("wgsef{groups=filter}").run(capture_zoo("bert_encoder"), ctx)


@pytest.mark.slow
def test_wgsef_training_then_harden_shrinks_the_graph():
    torch.manual_seed(0)
    # no biases: regularize{kind=wgsef} zeroes weight groups only, and a zero row with a bias is a constant
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


def test_round_to_rounds_k_up_to_kernel_friendly_channel_counts():
    from regc.passes.wgsef import WgsefConfig, target_units

    assert [target_units(n, 1, 0.7, 1) for n in (8, 16, 32)] == [6, 11, 22]  # plain round(keep n)
    assert [target_units(n, 1, 0.7, 8) for n in (8, 16, 32)] == [8, 16, 24]  # multiples of 8, <= n
    assert target_units(12, 64, 0.25, 8) == 3  # heads of width 64 are already multiples of 8
    assert target_units(10, 1, 0.01, 4) == 4  # at least one unit, then rounded
    with pytest.raises(regc.errors.ConfigError, match="wgsef.round_to"):
        WgsefConfig(round_to=0)
