"""GG priors: the moment-ratio table and estimator, gg_fit / gg_init / deepshape passes."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import regc
from regc.passes import _gg_math as gg
from regc.train import TrainSpec

pytestmark = pytest.mark.usefixtures("one_thread")


def test_rho_table_known_values_and_monotone():
    assert float(gg.rho(2.0)) == pytest.approx(math.pi / 2)
    assert float(gg.rho(1.0)) == pytest.approx(2.0)
    r = gg.rho(gg.NU_TABLE)
    assert gg.NU_TABLE[0] == 0.1 and gg.NU_TABLE[-1] == 3.0 and len(gg.NU_TABLE) == 291
    assert np.all(np.diff(r) < 0)  # rho decreases with nu: the table inverts uniquely


@pytest.mark.parametrize("nu", [0.6, 1.0, 1.5, 2.0, 2.7])
def test_estimator_recovers_shape_and_scale_of_gg_samples(nu):
    rng = np.random.default_rng(int(nu * 10))
    x = gg.sample((400_000,), nu, 0.05, rng)
    f = gg.estimate(x)
    assert abs(f["nu"] - nu) <= 0.05 and f["alpha"] == pytest.approx(0.05, rel=0.03)
    var = 0.05**2 * math.gamma(3 / nu) / math.gamma(1 / nu)
    assert float(x.var()) == pytest.approx(var, rel=0.02)
    from scipy import stats

    x = torch.from_numpy(stats.gennorm(nu, scale=0.05).rvs(400_000, random_state=1))
    assert abs(gg.estimate(x)["nu"] - nu) <= 0.05  # agrees with scipy's gennorm


def _two_layer(w1: torch.Tensor, w2: torch.Tensor) -> regc.Model:
    m = torch.nn.Sequential(torch.nn.Linear(w1.shape[1], w1.shape[0]), torch.nn.ReLU(),
                            torch.nn.Linear(w2.shape[1], w2.shape[0]))
    with torch.no_grad():
        m[0].weight.copy_(w1)
        m[2].weight.copy_(w2)
    model = regc.capture(m, (torch.randn(4, w1.shape[1]),), dynamic_shapes=({0: torch.export.Dim("b")},))
    model.verify()  # node shapes as a pipeline leaves them, so printed graphs compare
    return model


def test_gg_fit_reports_per_layer_and_global_and_ks_prefers_the_right_family():
    rng = np.random.default_rng(0)
    lap = gg.sample((300, 200), 1.0, 0.05, rng).float()   # Laplace weights
    gau = gg.sample((100, 300), 2.0, 0.05, rng).float()   # Gaussian weights
    model = _two_layer(lap, gau)
    before = model.print()
    out, rec = regc.parse_pipeline("gg_fit").run(model, regc.PassContext())
    st = rec[0]
    assert st["modified"] is False and out.print() == before
    layers = st["stats"]["layers"]
    assert set(layers) == {"0.weight", "2.weight"}  # biases (1-D) are left out
    assert abs(layers["0.weight"]["nu"] - 1.0) <= 0.05 and abs(layers["2.weight"]["nu"] - 2.0) <= 0.08
    ks0, ks2 = layers["0.weight"]["ks"], layers["2.weight"]["ks"]
    assert ks0["gg"] < ks0["gaussian"] and ks0["laplace"] < ks0["gaussian"]
    assert ks2["gg"] < ks2["laplace"] and ks2["gaussian"] < ks2["laplace"]
    assert st["stats"]["global"]["numel"] == 300 * 200 + 100 * 300
    assert 0.1 <= st["stats"]["global"]["nu"] < layers["2.weight"]["nu"]  # a scale mixture: heavier tails


@pytest.mark.parametrize("nu", [1.0, 2.0])
def test_gg_init_draws_the_requested_shape_and_variance(nu):
    model = _two_layer(torch.zeros(400, 300), torch.zeros(10, 400))
    bias = model.get_tensor("0.bias").detach().clone()
    out, rec = regc.parse_pipeline(f"gg_init{{shape={nu},gain=2}}").run(model, regc.PassContext())
    st = rec[0]["stats"]["layers"]
    for name, fan in (("0.weight", 400), ("2.weight", 10)):
        w = out.get_tensor(name).detach()
        assert float(w.std()) == pytest.approx(math.sqrt(2 / fan), rel=0.05)  # Var = gain / shape[0]
        assert st[name]["target_std"] == pytest.approx(math.sqrt(2 / fan))
    assert abs(gg.estimate(out.get_tensor("0.weight"))["nu"] - nu) <= 0.08
    assert torch.equal(out.get_tensor("0.bias").detach(), bias)  # 1-D tensors untouched
    with pytest.raises(regc.ConfigError, match=r"gg_init.shape must be in \[0.1, 3.0\]"):
        regc.parse_pipeline("gg_init{shape=4}")


def test_histogram_reshape_moves_the_fit_as_specified_and_preserves_rank():
    rng = np.random.default_rng(3)
    x = gg.sample((300_000,), 1.5, 0.05, rng).float()
    new, info = gg.histogram_reshape(x, 0.8, 0.6, 13, 10)
    assert info["nu_before"] == pytest.approx(1.5, abs=0.05) and info["core_fraction"] > 0.98
    # the core's histogram is the target GG(0.8 nu, 0.6 alpha) pmf on the grid, rounded
    step = 2.0**-13
    core = torch.round(x.double() / step).abs() * step <= info["q_max"]  # the core, as the pass defines it
    grid = np.arange(-round(info["q_max"] / step), round(info["q_max"] / step) + 1)
    p = gg.gg_pdf(grid * step, info["nu_target"], info["alpha_target"], float(x.double().mean()))
    want = p / p.sum() * int(core.sum())
    got = np.bincount((torch.round(new[core] / step).long() - grid[0]).numpy(), minlength=len(grid))
    assert got.sum() == int(core.sum()) and np.abs(got - want).max() < 1.0
    # so the fit over all values moves to the target (the 1-2% untouched tail pulls nu down a little)
    after = gg.estimate(new, center=True)
    assert abs(after["nu"] - 0.8 * info["nu_before"]) <= 0.2 and after["nu"] < info["nu_before"] - 0.3
    assert after["alpha"] == pytest.approx(0.6 * info["alpha_before"], rel=0.15)
    xs, ns = x[core], new[core]
    order = torch.argsort(xs, stable=True)  # ties keep index order, as in the pass
    assert bool((ns[order][1:] >= ns[order][:-1]).all())  # rank-preserving
    assert torch.equal(new[~core], x[~core])                # outside the core: untouched
    assert torch.equal(torch.round(ns / step) * step, ns)   # core values on the grid


def test_deepshape_pass_then_distillation_recovers_outputs():
    rng = np.random.default_rng(4)
    w1 = gg.sample((256, 64), 1.6, 0.1, rng).float()
    w2 = gg.sample((8, 256), 1.6, 0.1, rng).float()
    model = _two_layer(w1, w2)
    teacher = model.clone()
    x = torch.randn(512, 64, generator=torch.Generator().manual_seed(0))
    spec = TrainSpec(data=regc.Dataset({"input": x}), loss="distill", lr=1e-3, epochs=15, batch_size=64)
    text = "deepshape{grid_bits=8,min_count=5}"
    shaped, rec = regc.parse_pipeline(text).run(model.clone(), regc.PassContext())
    st = rec[0]["stats"]
    assert abs(st["nu_after"] - 0.8 * st["nu_before"]) <= 0.15
    assert st["alpha_after"] < 0.75 * st["alpha_before"]
    with torch.no_grad():
        err_shaped = float((shaped(x) - teacher(x)).pow(2).mean())
    recovered, rec = regc.parse_pipeline(text[:-1] + ",recover=true}").run(model.clone(),
                                                                          regc.PassContext(train=spec))
    with torch.no_grad():
        err_rec = float((recovered(x) - teacher(x)).pow(2).mean())
        assert err_shaped > 0.01 * float(teacher(x).pow(2).mean())  # reshaping is lossy ...
    assert err_rec < 0.2 * err_shaped                            # ... and distillation recovers most of it
    assert rec[0]["stats"]["recovery"]["steps"] == 120 and recovered.print() == teacher.print()
