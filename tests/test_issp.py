"""issp: soft-shrink mechanics (pruned weights decay as alpha^t, hard mask frozen after the stage),
N:M patterns, and the pass end to end (sparsity reached, masks annotated, storage reported)."""

import pytest
import torch

import regc
from regc.errors import ConfigError
from regc.passes.issp import IsspConfig, ShrinkSchedule, shrink_set
from regc.train import TrainPlan, TrainSpec, fit


class MLP(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = torch.nn.Linear(8, 16), torch.nn.Linear(16, 16), torch.nn.Linear(16, 4)

    def forward(self, x):
        return self.c(torch.relu(self.b(torch.relu(self.a(x)))))


def _mlp_and_data():
    torch.manual_seed(0)
    model = regc.capture(MLP(), (torch.randn(4, 8),), {"x": {0: torch.export.Dim("batch")}})
    data = regc.Dataset({"x": torch.randn(64, 8)}, torch.randint(0, 4, (64,)))
    return model, data


def test_soft_shrink_decays_as_alpha_power_then_mask_freezes():
    model, data = _mlp_and_data()
    w0 = model.get_tensor("b.weight").detach().clone()
    cfg = IsspConfig(sparsity=0.75, alpha=0.5)
    sched = ShrinkSchedule({"b.weight": 0}, cfg, prune_steps=5)
    seen = []
    plan = TrainPlan()
    plan.add_after_step("issp", sched, order=10)
    plan.add_after_step("record", lambda m, s: seen.append(m.get_tensor("b.weight").detach().clone()),
                        order=20)
    # pruning stage with a negligible lr: only the shrinkage moves the weights
    fit(model, TrainSpec(data=data, optimizer="sgd", momentum=0.0, lr=1e-12, steps=5, batch_size=16), plan)
    pruned = shrink_set(w0, 0.75, None)
    assert int(pruned.sum()) == 192  # 75% of 256
    for t in range(4):  # the smallest 75% stay the smallest, so they decay as alpha^(t+1)
        torch.testing.assert_close(seen[t][pruned], w0[pruned] * 0.5 ** (t + 1), rtol=1e-6, atol=1e-9)
        torch.testing.assert_close(seen[t][~pruned], w0[~pruned], rtol=1e-6, atol=1e-9)
    assert (seen[4][pruned] == 0).all()  # hard mask at the end of the stage
    # fine-tuning stage with a real lr: kept weights move, the mask is re-applied after every step
    sched.prune_steps = 0
    fit(model, TrainSpec(data=data, optimizer="adam", lr=1e-2, steps=3, batch_size=16), TrainPlan())
    moved = model.get_tensor("b.weight").detach()
    assert (moved[pruned] != 0).any()  # without the hook, Adam regrows them: the hook is what keeps them 0
    model.get_tensor("b.weight").data.copy_(seen[4])
    plan = TrainPlan()
    plan.add_after_step("issp", sched)
    fit(model, TrainSpec(data=data, optimizer="adam", lr=1e-2, steps=10, batch_size=16), plan)
    w = model.get_tensor("b.weight").detach()
    assert (w[pruned] == 0).all() and (w[~pruned] != seen[4][~pruned]).any()
    assert torch.equal(sched.masks["b.weight"], pruned)


def test_iht_is_alpha_zero():
    w = torch.randn(6, 8)
    sched = ShrinkSchedule({"w": 0}, IsspConfig(sparsity=0.5, alpha=0.0), prune_steps=3)

    class M:
        def get_tensor(self, t):
            return w

    sched(M(), 0)
    assert int((w == 0).sum()) == 24


def test_two_four_pattern():
    w = torch.randn(8, 16)
    sel = shrink_set(w, 0.0, (2, 4))
    assert (sel.reshape(8, 4, 4).sum(-1) == 2).all()
    kept = w.abs().masked_fill(sel, -1).reshape(8, 4, 4)
    dropped = w.abs().masked_fill(~sel, float("inf")).reshape(8, 4, 4)
    assert (kept.max(-1).values >= dropped.min(-1).values).all()
    sel_t = shrink_set(w.t(), 0.0, (2, 4), rows_dim=1)  # (in, out) layout: rows along dim 1
    assert torch.equal(sel_t, sel.t())


@pytest.mark.parametrize("opts,field", [({"sparsity": 1.0}, "sparsity"), ({"alpha": 1.0}, "alpha"),
                                        ({"nm": "4:2"}, "nm"), ({"prune_fraction": 0.0}, "prune_fraction")])
def test_config_rejects_bad_values(opts, field):
    with pytest.raises(ConfigError, match=f"issp.{field}"):
        IsspConfig(**opts)


@pytest.mark.parametrize("nm", ["", "2:4"])
def test_pass_reaches_sparsity_and_reports_storage(nm):
    model, data = _mlp_and_data()
    ctx = regc.PassContext(train=TrainSpec(data=data, lr=1e-2, steps=40, batch_size=16))
    text = f"issp{{sparsity=0.9,alpha=0.9{',nm=' + nm if nm else ''}}}"
    model, records = regc.Pipeline.parse(text).run(model, ctx)
    stats = records[0]["stats"]
    w = model.get_tensor("b.weight")
    want = 0.5 if nm else 0.9
    assert abs((w == 0).float().mean().item() - want) < 0.01
    assert (model.get_tensor("a.weight") != 0).all()  # first layer skipped
    ann = model.annotations["b.weight"]
    assert torch.equal(ann["mask"], w != 0) and ann["pattern"] == (nm or "unstructured")
    assert stats["layers"]["b.weight"]["nonzero"] == int((w != 0).sum())
    assert stats["storage"]["compression"] == pytest.approx(1024 / (4 * int((w != 0).sum()) + 32), rel=1e-3)


def test_shrink_set_takes_the_smallest_magnitudes_and_breaks_ties_by_index():
    w = torch.tensor([3.0, -1.0, 1.0, 0.0, 1.0, -2.0, 1.0])
    # ceil(0.5 * 7) = 4 weights: the 0, then three of the four |w| = 1 ties, lowest index first
    assert shrink_set(w, 0.5, None).tolist() == [False, True, True, True, True, False, False]
    assert not shrink_set(w, 0.0, None).any()
    assert shrink_set(w, 1.0, None).sum() == 6  # at least one weight always survives
