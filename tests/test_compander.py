"""compander: the compander functions' defining properties, exact folding, and the weight-histogram effect
on the digits CNN trained on noisy labels (against the same training without it)."""

from __future__ import annotations

import pytest
import torch

import regc
from regc._train_param import fold, install
from regc.passes.compander import COMPANDERS, PowerCompander, TanhCompander, register_compander
from regc.train import TrainSpec, fit
from regc.zoo import digits_cnn, digits_data

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("cls", [TanhCompander, PowerCompander])
def test_compander_is_odd_monotone_expanding_and_invertible(cls):
    w = torch.randn(64, 32, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 0.1
    f = cls(w, bound=3.0, shape=2.0, learn=True).double()
    v = torch.linspace(-1, 1, 2001, dtype=torch.float64, requires_grad=True)
    y = f(v)
    torch.testing.assert_close(f(-v), -y)
    assert float(f(torch.zeros(1, dtype=torch.float64)).detach()) == 0.0
    assert bool((y[1:] > y[:-1]).all())
    (g,) = torch.autograd.grad(y.sum(), v)
    assert float(g[1000]) > 1.5  # slope > 1 at 0: small weights are expanded
    torch.testing.assert_close(f(f.right_inverse(w)), w, rtol=1e-6, atol=1e-9)
    if cls is TanhCompander:
        assert float(g[1000]) == pytest.approx(2.0)  # slope b
        assert float(y.detach().abs().max()) < float(f.a.detach())  # bounded by a
        assert float(f.a.detach()) >= 1.049 * float(w.abs().max())  # nothing clipped at init


def test_learned_hyperparameters_cannot_collapse():
    f = TanhCompander(torch.randn(100), bound=3.0, shape=2.0, learn=True)
    a0 = float(f.a.detach())
    with torch.no_grad():
        f.raw_a.fill_(-50.0)
        f.raw_s.fill_(-50.0)
    assert float(f.a.detach()) >= a0 / 4 - 1e-6 and float(f.s.detach()) >= 1.0
    assert {n for n, p in f.named_parameters() if p.requires_grad} == {"raw_a", "raw_s"}
    assert not any(p.requires_grad for p in TanhCompander(torch.randn(9), 3.0, 2.0, learn=False).parameters())


def _cnn() -> regc.Model:
    zm = digits_cnn(trained=True)
    return regc.capture(zm.module, zm.example_inputs, dynamic_shapes=zm.dynamic_shapes,
                        input_names=zm.input_names, output_names=zm.output_names)


@pytest.fixture(scope="module")
def cnn():
    return _cnn()


def test_folding_is_exact_and_restores_the_graph(cnn):
    model = cnn.clone()
    x = digits_data().x_test[:64]
    y0, before = model(x), model.print()
    holders = [install(model, t, [TanhCompander(model.get_tensor(t), 3.0, 2.0, True)])
               for t in ("features.0.weight", "features.4.weight", "classifier.weight")]
    y_init = model(x)
    torch.testing.assert_close(y_init, y0, rtol=1e-5, atol=1e-5)  # V = f^-1(W): the model is unchanged
    with torch.no_grad():  # move the latents and hyperparameters as training would
        for h in holders:
            getattr(model.gm, h).original.mul_(1.3)
            getattr(model.gm, h).fns[0].raw_s.add_(0.5)
    y_param = model(x)
    for h in holders:
        fold(model, h)
    assert torch.equal(model(x), y_param)  # folding: bit-identical outputs
    assert model.print() == before and not (y_param - y0).abs().max() < 1e-3


def test_compander_pass_histogram_effect_on_noisy_digits():
    """40% label noise, same spec with and without the (default) compander: it leaves far fewer weights
    near zero and no larger weights; the graph keeps its structure."""
    d = digits_data()
    g = torch.Generator().manual_seed(0)
    flip = torch.rand(len(d.y_train), generator=g) < 0.4
    other = (d.y_train + torch.randint(1, 10, d.y_train.shape, generator=g)) % 10
    noisy = torch.where(flip, other, d.y_train)
    spec = TrainSpec(data=regc.Dataset({"image": d.x_train}, noisy), loss="ce", lr=3e-3, batch_size=64,
                     epochs=6, schedule="cosine")
    fresh = digits_cnn(trained=False)
    base = regc.capture(fresh.module, fresh.example_inputs, dynamic_shapes=fresh.dynamic_shapes,
                        input_names=fresh.input_names, output_names=fresh.output_names)
    base.verify()
    plain = base.clone()
    fit(plain, spec)
    model, rec = regc.parse_pipeline("compander").run(base.clone(), regc.PassContext(train=spec))
    st = rec[0]["stats"]["layers"]
    assert set(st) == {"features.0", "features.4", "classifier"} and model.print() == base.print()
    w = torch.cat([model.get_tensor(t).detach().reshape(-1) for t in
                   ("features.0.weight", "features.4.weight", "classifier.weight")])
    w0 = torch.cat([plain.get_tensor(t).detach().reshape(-1) for t in
                    ("features.0.weight", "features.4.weight", "classifier.weight")])
    near, near0 = float((w.abs() < 1e-3).float().mean()), float((w0.abs() < 1e-3).float().mean())
    assert near < 0.2 * near0 and near0 > 0.005, (near, near0)
    assert float(w.abs().max()) < 1.1 * float(w0.abs().max())
    for name, entry in st.items():
        assert entry["hyper"]["shape"] == pytest.approx(2.0)  # fixed hyperparameters by default
        assert entry["after"]["near_zero"] <= entry["before"]["near_zero"], name  # vs the fresh init
    acc = float((model(d.x_test).argmax(1) == d.y_test).float().mean())
    acc0 = float((plain(d.x_test).argmax(1) == d.y_test).float().mean())
    assert acc > acc0 - 0.1 and acc > 0.5


def test_pluggable_family_and_config_errors(cnn):
    class Cube(torch.nn.Module):  # f(v) = v + v^3: odd, monotone, slope 1 at 0
        def __init__(self, w, bound, shape, learn):
            super().__init__()

        def forward(self, v):
            return v + v**3

    register_compander("cube_test", Cube)
    try:
        with pytest.raises(ValueError, match="registered twice"):
            register_compander("cube_test", Cube)
        x = digits_data().x_train[:32]
        ds = regc.Dataset({"image": x}, digits_data().y_train[:32])
        ctx = regc.PassContext(train=TrainSpec(data=ds, loss="ce", steps=1, lr=1e-9, batch_size=32))
        text = "compander{function=cube_test,layers=classifier}"
        model, rec = regc.parse_pipeline(text).run(cnn.clone(), ctx)
        assert list(rec[0]["stats"]["layers"]) == ["classifier"]
    finally:
        COMPANDERS.pop("cube_test")
    with pytest.raises(regc.ConfigError, match="compander.function must be one of"):
        regc.parse_pipeline("compander{function=mulaw}")
    with pytest.raises(regc.ConfigError, match=r"compander.shape must be in \(1.0, inf\]"):
        regc.parse_pipeline("compander{shape=0.5}")
    with pytest.raises(regc.ConfigError, match="needs data"):
        regc.compress(cnn.clone(), "compander")
