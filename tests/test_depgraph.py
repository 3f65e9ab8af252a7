"""Dependency graph: the right coupled groups on ResNet, MobileNetV2, BERT and GPT-2 (captured and
ONNX-imported), exact removal of groups whose weights are zero, a real change when live units go,
and unknown ops as barriers (a warning, never a crash or a wrong cut)."""

import functools

import pytest
import torch

import regc
from regc.opclass import conv_view
from regc.passes._depgraph import build_depgraph
from tests.conftest import capture_zoo as _capture


@functools.cache
def _captured(name):
    return _capture(name)


def capture_zoo(name):
    """A fresh copy of a zoo model, captured once per test session (capture dominates the runtime)."""
    return _captured(name).clone()


def _zero_units(model, dg, frac=0.5, seed=0):
    """Zero every 'out' slice (filters, biases, norm affine) of ``frac`` of each group's units, so
    those channels are exactly zero everywhere; return the chosen unit ids."""
    g = torch.Generator().manual_seed(seed)
    chosen = []
    with torch.no_grad():
        for grp in dg.groups:
            pick = torch.randperm(len(grp.units), generator=g)[: max(1, int(frac * len(grp.units)))]
            chosen += [grp.units[int(i)] for i in pick]
            for slot, idx in grp.members:
                t = model.get_tensor(slot.target)
                if slot.role == "out" and isinstance(t, torch.nn.Parameter):
                    t.index_fill_(slot.dim, torch.isin(idx, pick).nonzero().flatten(), 0.0)
    return chosen


# (zoo model, expected groups, expected head groups (units, unit width))
ZOO_GROUPS = [
    ("resnet18_style", 12, []),
    ("mobilenetv2_style", 25, []),
    ("bert_encoder", 4, [(4, 16), (4, 16)]),
    ("gpt2_decoder", 4, [(4, 48), (4, 48)]),
]


@pytest.mark.parametrize("name,n_groups,heads", ZOO_GROUPS, ids=[z[0] for z in ZOO_GROUPS])
def test_zero_groups_prune_exactly_on_zoo(name, n_groups, heads):
    model = capture_zoo(name)
    dg = build_depgraph(model)
    assert len(dg.groups) == n_groups
    assert [(len(g.units), g.unit_width) for g in dg.groups if g.kind == "head"] == heads
    assert not dg.warnings
    chosen = _zero_units(model, dg)
    with torch.no_grad():
        ref = model.run(*model.example_inputs)[0]
    params = model.num_params()
    layers = dg.remove(chosen)
    model.verify()
    with torch.no_grad():
        got = model.run(*model.example_inputs)[0]
    assert model.num_params() < 0.75 * params  # about half of every group is gone
    assert all(v["params_after"] < v["params_before"] for v in layers.values())
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())


def test_resnet_residual_group_spans_blocks_and_shortcut():
    dg = build_depgraph(capture_zoo("resnet18_style"))
    by_first = {g.layers[0]: g for g in dg.groups}
    stage2 = next(g for g in dg.groups if "layer2.0.downsample.0.weight" in g.layers)
    assert stage2.layers == ["layer2.0.conv2.weight", "layer2.0.downsample.0.weight", "layer2.1.conv2.weight"]
    assert len(stage2.units) == 32
    assert "conv1.weight" in by_first and by_first["conv1.weight"].layers == [
        "conv1.weight", "layer1.0.conv2.weight", "layer1.1.conv2.weight"]
    # every BatchNorm on the residual stream and every consumer conv's input dim are members
    targets = {(s.target, s.dim, s.role) for s, _ in stage2.members}
    assert ("layer2.0.bn2.weight", 0, "out") in targets and ("layer3.0.conv1.weight", 1, "in") in targets


def test_mobilenet_depthwise_follows_expansion_channels():
    model = capture_zoo("mobilenetv2_style")
    dg = build_depgraph(model)
    grp = next(g for g in dg.groups if g.layers == ["features.2.conv.0.0.weight"])
    slots = {s.target: s for s, _ in grp.members}
    assert slots["features.2.conv.1.0.weight"].role == "out"  # depthwise conv: channel passes through
    assert slots["features.2.conv.2.weight"].role == "in"  # projection reads it
    dg.remove(grp.units[:5])
    dw = next(n for n in model.call_nodes()
              if conv_view(n, model.gm) and conv_view(n, model.gm).weight == "features.2.conv.1.0.weight")
    assert dw.args[-1] == len(grp.units) - 5  # groups rewritten
    assert model.get_tensor("features.2.conv.1.0.weight").shape[0] == len(grp.units) - 5


class CatSplitNet(torch.nn.Module):
    """Concat of two conv branches, a channel split, flatten into a linear layer."""

    def __init__(self):
        super().__init__()
        self.a = torch.nn.Conv2d(2, 6, 3, padding=1)
        self.b = torch.nn.Conv2d(2, 4, 3, padding=1)
        self.c = torch.nn.Conv2d(10, 8, 1)
        self.fc = torch.nn.Linear(4 * 16, 5)

    def forward(self, x):
        y = self.c(torch.relu(torch.cat([self.a(x), self.b(x)], 1)))
        left, right = y.split(4, dim=1)
        return self.fc((left * torch.sigmoid(right)).flatten(1))


def test_concat_split_and_flatten_exact():
    torch.manual_seed(0)
    model = regc.capture(CatSplitNet(), (torch.randn(2, 2, 4, 4),))
    dg = build_depgraph(model)
    sizes = sorted((g.layers[0], len(g.units)) for g in dg.groups)
    # a and b stay separate groups through the concat; c's halves are coupled by the multiply
    assert sizes == [("a.weight", 6), ("b.weight", 4), ("c.weight", 4)]
    chosen = _zero_units(model, dg)
    ref = model.run(*model.example_inputs)[0]
    dg.remove(chosen)
    model.verify()
    assert model.get_tensor("c.weight").shape == (4, 5, 1, 1)
    assert model.get_tensor("fc.weight").shape == (5, 2 * 16)  # flatten: 16 features per channel
    torch.testing.assert_close(model.run(*model.example_inputs)[0], ref, rtol=1e-5, atol=1e-6)


def test_removing_live_units_changes_output():
    """The key effect: removal is real, so removing non-zero channels moves the output."""
    model = capture_zoo("bert_encoder")
    ref = model.run(*model.example_inputs)[0]
    dg = build_depgraph(model)
    head = next(g for g in dg.groups if g.kind == "head")
    dg.remove(head.units[:1])
    assert model.get_tensor("layers.0.attention.query.weight").shape == (48, 64)
    assert model.get_tensor("layers.0.attention.out.weight").shape == (64, 48)
    got = model.run(*model.example_inputs)[0]
    assert (got - ref).abs().max() > 1e-3


class UnknownOpNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.c2 = torch.nn.Conv2d(8, 8, 3, padding=1)
        self.c3 = torch.nn.Conv2d(8, 4, 1)

    def forward(self, x):
        y = torch.cumsum(self.c1(x), dim=1)  # mixes channels: no pruning rule
        return self.c3(torch.relu(self.c2(y)))


def test_unknown_op_is_a_barrier_with_warning():
    torch.manual_seed(0)
    model = regc.capture(UnknownOpNet(), (torch.randn(1, 3, 6, 6),))
    dg = build_depgraph(model)
    assert any("cumsum" in w for w in dg.warnings)
    assert [g.layers for g in dg.groups] == [["c2.weight"]]  # c1 is blocked, c2 is still prunable
    chosen = _zero_units(model, dg)
    ref = model.run(*model.example_inputs)[0]
    dg.remove(chosen)
    assert model.get_tensor("c1.weight").shape[0] == 8
    torch.testing.assert_close(model.run(*model.example_inputs)[0], ref, rtol=1e-5, atol=1e-6)


class PositionIdNet(torch.nn.Module):
    """Token + position embeddings whose position ids are a buffer sliced to the sequence length
    (as in Hugging Face BERT and MiniLM), then an FFN."""

    def __init__(self):
        super().__init__()
        self.tok = torch.nn.Embedding(50, 16)
        self.pos = torch.nn.Embedding(32, 16)
        self.register_buffer("position_ids", torch.arange(32)[None], persistent=False)
        self.up = torch.nn.Linear(16, 24)
        self.down = torch.nn.Linear(24, 16)

    def forward(self, ids):
        h = self.tok(ids) + self.pos(self.position_ids[:, : ids.shape[1]])
        return self.down(torch.relu(self.up(h)))


def test_sliced_constant_buffer_carries_no_channels():
    """A slice of a constant buffer (the position ids) has no channel labels: removal rewrites the
    slices of activations only and leaves it as it is (it raised KeyError on the buffer's node)."""
    torch.manual_seed(0)
    model = regc.capture(PositionIdNet(), (torch.randint(0, 50, (2, 8)),))
    assert any(n.target is torch.ops.aten.slice.Tensor for n in model.call_nodes())
    dg = build_depgraph(model)
    assert sorted(g.layers for g in dg.groups) == [["pos.weight", "tok.weight"], ["up.weight"]]
    chosen = _zero_units(model, dg)
    ref = model.run(*model.example_inputs)[0]
    dg.remove(chosen)
    model.verify()
    assert model.get_tensor("up.weight").shape == (12, 8)
    assert model.get_tensor("position_ids").shape == (1, 32)
    torch.testing.assert_close(model.run(*model.example_inputs)[0], ref, rtol=1e-5, atol=1e-6)


def test_pruned_model_keeps_dynamic_batch():
    model = capture_zoo("bert_encoder")
    dg = build_depgraph(model)
    dg.remove([g.units[0] for g in dg.groups])
    ids = torch.randint(1, 1000, (3, 9))
    assert model(ids, torch.ones_like(ids)).shape == (3, 9, 64)


@pytest.mark.slow
def test_onnx_imported_graph_prunes_like_captured(tmp_path):
    captured = capture_zoo("resnet18_style")
    captured.save(tmp_path / "m.onnx")
    model = regc.load(tmp_path / "m.onnx")
    dg = build_depgraph(model)
    assert len(dg.groups) == len(build_depgraph(captured).groups)  # BN folded by the exporter
    chosen = _zero_units(model, dg)
    ref = model.run(*model.example_inputs)[0]
    params = model.num_params()
    dg.remove(chosen)
    model.verify()
    assert model.num_params() < 0.75 * params
    torch.testing.assert_close(model.run(*model.example_inputs)[0], ref, rtol=1e-5, atol=1e-5)
