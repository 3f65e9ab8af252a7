"""eqnet: the LSQ+ quantizer against its reference gradient formulas, weights shared across bit-widths with
separate scales, the sandwich/GPG losses, BN recalibration, the search under the bit budget, lowering
to integer weights that equal the fake-quantized ones, and a tiny end-to-end run on the digits CNN."""

from __future__ import annotations

import math

import numpy as np
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F

import regc
from regc.errors import ConfigError
from regc.passes._eqnet_losses import sandwich_loss
from regc.passes._eqnet_predictor import encode, kendall_tau
from regc.passes._eqnet_quant import WeightQuantizer, lsq_fake_quant, qrange
from regc.passes._eqnet_search import evolve, meets
from regc.passes._eqnet_supernet import _Record
from regc.passes._qdq import _nibbles
from regc.passes.eqnet import EqnetConfig, build_supernet, eval_data, train_supernet
from regc.pipeline import parse_pipeline
from regc.registry import PassContext
from regc.train import TrainSpec
from regc.zoo import accuracy, digits_cnn, digits_data

pytestmark = pytest.mark.usefixtures("one_thread")


def _reference(x, s, beta, qn, qp, c, g):
    """x_bar and the LSQ+ gradients (dx, ds, dbeta) of sum(g * x_bar), by the formulas."""
    v = (x - beta) / s
    inside = ((v >= qn) & (v <= qp)).double()
    out = v.clamp(qn, qp).round() * s + beta
    ds_el = torch.where(v < qn, torch.full_like(v, qn),
                        torch.where(v > qp, torch.full_like(v, qp), v.round() - v))
    return out, g * inside, c * g * ds_el, c * g * (1 - inside)


@pytest.mark.parametrize("signed,channel", [(True, False), (False, False), (True, True)])
def test_lsq_plus_value_and_gradients_match_the_reference(signed, channel):
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(6, 50, generator=gen, dtype=torch.float64) * 2
    qn, qp = qrange(3, signed)
    shape = (6, 1) if channel else ()
    s = (torch.rand(shape, generator=gen, dtype=torch.float64) * 0.3 + 0.2).requires_grad_()
    beta = (-0.4 + 0.1 * torch.randn(shape, generator=gen, dtype=torch.float64)).requires_grad_()  # negative
    xr = x.clone().requires_grad_()
    g = torch.randn(x.shape, generator=gen, dtype=torch.float64)
    c = 0.37
    out = lsq_fake_quant(xr, s, beta, qn, qp, c)
    out.backward(g)
    ref, dx, ds, db = _reference(x, s.detach(), beta.detach(), qn, qp, c, g)
    assert torch.equal(out.detach(), ref)  # bit for bit: the gradient scaling leaves values alone
    red = (1,) if channel else (0, 1)
    torch.testing.assert_close(xr.grad, dx)
    torch.testing.assert_close(s.grad, ds.sum(red).reshape(shape))
    torch.testing.assert_close(beta.grad, db.sum(red).reshape(shape))
    v = (x - beta.detach()) / s.detach()
    assert ((v < qn) | (v > qp)).any() and ((v > qn) & (v < qp)).any()  # both regimes are exercised
    assert float(beta.detach().max()) < 0 and (out.detach() - x).abs().max() > 0  # offset keeps its sign


def test_weight_quantizer_grad_scale_uses_the_per_channel_element_count():
    w = torch.randn(8, 4, 3, 3, generator=torch.Generator().manual_seed(2))
    wq = WeightQuantizer(w, 0, (2, 4))
    wq.cfg = (4, True, True)
    wq(w).sum().backward()
    qn, qp = qrange(4, True)
    s = wq.scale_c[0, 2].detach()
    v = w / s.reshape(-1, 1, 1, 1)
    ds = torch.where(v < qn, float(qn), torch.where(v > qp, float(qp), v.round() - v)).sum((1, 2, 3))
    c = 1 / math.sqrt(qp * 36)  # 36 = elements per output channel (the official code uses numel / size(1))
    torch.testing.assert_close(wq.scale_c.grad[0, 2], c * ds)
    assert wq.scale_c.grad[[0, 0, 1], [0, 1, 2]].abs().sum() == 0  # other bit-widths / symmetries: no grad
    assert wq.offset_c.grad is None and wq.offset_t.grad is None  # symmetric: no offset, per-channel only


def _cnn() -> regc.Model:
    zm = digits_cnn()
    return regc.capture(zm.module, zm.example_inputs, zm.dynamic_shapes, input_names=zm.input_names,
                        output_names=zm.output_names)


@pytest.fixture(scope="module")
def cnn():
    return _cnn()


def _dataset(n: int = 1437) -> regc.Dataset:
    d = digits_data()
    ds = regc.Dataset({"image": d.x_train[:n]})
    ds.labels = d.y_train[:n]
    return ds


def _supernet(model, config, n=256):
    spec = TrainSpec(data=_dataset(), batch_size=64, progress=False)
    data = eval_data(model, spec, n, n)
    return build_supernet(model, config, data), data


def test_weights_shared_across_bit_widths_with_separate_scales_and_exact_removal(cnn):
    model = cnn.clone()
    x = digits_data().x_test[:64]
    with torch.no_grad():
        ref = model(x)
    sn, data = _supernet(model, EqnetConfig(bits=(2, 4, 8), fix_ends=False))
    n_params = len(list(model.gm.parameters()))
    sn.install()
    weights = [model.get_tensor(q.weight) for q in sn.layers]
    outs = {}
    for b in (2, 8):
        sn.set(sn.uniform(b, False, True, True))
        for p in model.gm.parameters():
            p.grad = None
        out = model(x)
        outs[b] = out.detach()
        F.cross_entropy(out, digits_data().y_test[:64]).backward()
        for wq, w in zip(sn.wq, weights, strict=True):
            assert w.grad is not None and w.grad.abs().sum() > 0  # the one shared float weight learns
            slots = wq.scale_t.grad.nonzero().tolist()
            assert slots == [[0, b - 2]]  # only this bit-width's own per-tensor symmetric scale
    assert len(list(model.gm.parameters())) == n_params + 4 * 3 + 2 * 3  # + scales/offsets, no weight copies
    assert (outs[2] - ref).abs().max() > 10 * (outs[8] - ref).abs().max() > 0
    sn.remove()
    with torch.no_grad():
        assert torch.equal(model(x), ref)
    assert not any(n.op == "call_module" and "eqnet" in str(n.target) for n in model.gm.graph.nodes)


def test_bn_recalibration_gives_the_subnets_batch_statistics(cnn):
    model = cnn.clone()
    sn, data = _supernet(model, EqnetConfig(bits=(2, 4, 8), fix_ends=False))
    sn.install()
    cfg = sn.uniform(2, True, False, False)
    sn.set(cfg)
    xs = data.calib[0]
    bn = next(n for n in model.gm.graph.nodes if n.target is torch.ops.aten.batch_norm.default)
    conv = bn.args[0]
    rm_target = bn.args[3].target
    before = model.get_tensor(rm_target).clone()
    with torch.no_grad():
        rec = _Record(model.gm, {conv})
        rec.run(*xs)
        seen = rec.values[conv]
    sn.recalibrate(data.calib)
    mean = seen.mean((0, 2, 3))
    var = seen.var((0, 2, 3), unbiased=True)
    torch.testing.assert_close(model.get_tensor(rm_target), mean, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(model.get_tensor(bn.args[4].target), var, rtol=1e-4, atol=1e-5)
    assert (model.get_tensor(rm_target) - before).abs().max() > 1e-3
    assert bn.args[5] is False and bn.args[6] == 0.1  # the graph is back in eval mode


def test_sandwich_and_gpg_losses():
    gen = torch.Generator().manual_seed(3)
    chain = [torch.randn(5, 4, generator=gen) for _ in range(3)]
    y = torch.tensor([0, 1, 2, 3, 0])
    plain = sandwich_loss(chain, y, gpg=False)
    torch.testing.assert_close(plain, sum(F.cross_entropy(c, y) for c in chain))

    def kl(t, s):  # KL(p_t || p_s), batch mean
        pt = t.softmax(-1)
        return (pt * (pt.log() - s.log_softmax(-1))).sum(-1).mean()

    lam = 0.3
    want = F.cross_entropy(chain[0], y) + sum(lam * kl(chain[k - 1], chain[k]) + (1 - lam) * F.cross_entropy(
        chain[k], y) for k in (1, 2))
    torch.testing.assert_close(sandwich_loss(chain, y, gpg=True, lam=lam), want)
    s = [c.clone().requires_grad_() for c in chain]
    sandwich_loss(s, y, gpg=True, lam=1.0).backward()
    s1 = chain[1].clone().requires_grad_()
    (want_g,) = torch.autograd.grad(kl(chain[0], s1), s1)  # s[1] as teacher of s[2] gets no gradient
    torch.testing.assert_close(s[1].grad, want_g)
    assert s[2].grad.abs().sum() > 0


@pytest.mark.parametrize("fix_ends,budgets",
                         [(False, (2.5, 3.0, 4.0, 5.5, 7.0)), (True, (3.0, 4.0, 6.0, 8.0))])
def test_search_respects_the_bit_budget(cnn, fix_ends, budgets):
    sn, _ = _supernet(cnn.clone(), EqnetConfig(bits=(2, 3, 4, 6, 8), fix_ends=fix_ends))
    g = torch.Generator().manual_seed(0)

    def score(cfgs):  # favors the most bits: pushes every individual against the upper bound
        return torch.tensor([sum(c.w_bits) + sum(c.a_bits) + 0.1 * c.w_channel for c in cfgs])

    for c in budgets:
        best, v, ok = evolve(sn, score, c, 0.5, 20, 10, 0.2, g)
        w, a = sn.avg_bits(best)
        assert ok and meets(sn, best, c, 0.5), (c, w, a)
        assert c - 0.5 < w <= c + 1e-9 and c - 0.5 < a <= c + 1e-9
        assert v == float(score([best])[0])
        if fix_ends:
            assert best.w_bits[0] == best.w_bits[-1] == best.a_bits[0] == best.a_bits[-1] == 8
    if fix_ends:  # one elastic layer cannot average into (2, 2.5]: the upper bound still holds
        best, _, ok = evolve(sn, score, 2.5, 0.5, 20, 5, 0.2, g)
        assert not ok and max(sn.avg_bits(best)) <= 2.5
    with pytest.raises(ConfigError, match="avg_bits"):
        EqnetConfig(bits=(4, 8), avg_bits=3.0)


def test_each_generation_adds_population_children_to_the_parents(cnn):
    sn, _ = _supernet(cnn.clone(), EqnetConfig(bits=(2, 4, 8), fix_ends=False))
    sizes = []

    def score(cfgs):
        sizes.append(len(cfgs))
        return torch.tensor([float(sum(c.w_bits)) for c in cfgs])

    evolve(sn, score, 4.0, 0.5, 20, 3, 0.3, torch.Generator().manual_seed(0))
    assert sizes == [20] + [5 + 20] * 3  # top 25% parents + 10 mutated + 10 crossed children (OFA / EQ-Net)
    assert EqnetConfig().mutate_prob == 0.3  # what the official script means, not its shadowing default 0.1


def test_one_step_clips_gradients_by_value_and_wdr_spares_the_first_layer(cnn):
    """Plain SGD (lr 1, no momentum) moves each parameter by minus its clipped gradient; the same seed gives
    the same batch and subnets, so WDR changes the step of every layer but the first."""
    spec = TrainSpec(data=_dataset(256), steps=1, batch_size=64, optimizer="sgd", momentum=0.0, lr=1.0,
                     progress=False)

    def step(**kw) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        model = cnn.clone()
        config = EqnetConfig(bits=(2, 4, 8), fix_ends=False, **kw)
        sn = build_supernet(model, config, eval_data(model, spec, 64, 64))
        params = list(model.gm.parameters()) + [p for m in sn.wq + sn.aq for p in m.parameters()]
        weights = [model.get_tensor(q.weight) for q in sn.layers]
        before = [p.detach().clone() for p in params + weights]
        train_supernet(sn, config, spec)
        moves = [(p.detach() - b).abs() for p, b in zip(params + weights, before, strict=True)]
        return moves[:len(params)], moves[len(params):]

    clip = 1e-3
    moves, _ = step(wdr=False, grad_clip_value=clip)
    biggest = max(float(m.max()) for m in moves)
    assert clip * (1 - 1e-4) < biggest <= clip * (1 + 1e-4)
    _, plain = step(wdr=False, grad_clip_value=0.0)
    _, wdr = step(wdr=True, wdr_strength=10.0, grad_clip_value=0.0)
    assert max(float(m.max()) for m in plain) > clip  # the clip above was active
    torch.testing.assert_close(wdr[0], plain[0], rtol=1e-5, atol=1e-8)
    assert all((w - p).abs().max() > 1e-4 for w, p in zip(wdr[1:], plain[1:], strict=True))


def test_predictor_encoding_and_kendall_tau(cnn):
    model = cnn.clone()
    sn, _ = _supernet(model, EqnetConfig(bits=(2, 4, 8), fix_ends=True))
    a = sn.make(True, False, False, [8, 2, 8], [8, 4, 8])
    x = encode([a], sn.free)[0]
    assert x.shape == (6 + 14,) and x[:6].tolist() == [1, 0, 0, 1, 0, 1]  # asym flags are really set
    assert x[6:].nonzero().flatten().tolist() == [0, 7 + 2]  # w 2 bits, a 4 bits
    assert kendall_tau(torch.tensor([1., 2, 3, 4]), torch.tensor([10., 20, 30, 40])) == 1.0
    assert kendall_tau(torch.tensor([1., 2, 3]), torch.tensor([3., 1, 2])) == pytest.approx(-1 / 3)
    assert kendall_tau(torch.tensor([1., 1, 2]), torch.tensor([1., 2, 3])) == pytest.approx(2 / math.sqrt(6))


@pytest.mark.parametrize("w_channel,w_sym,a_sym", [(True, False, False),
                                                   pytest.param(False, True, True, marks=pytest.mark.slow)])
def test_lowered_integer_weights_equal_the_fake_quantized_ones(cnn, tmp_path, w_channel, w_sym, a_sym):
    model = cnn.clone()
    x = digits_data().x_test
    sn, data = _supernet(model, EqnetConfig(bits=(2, 4, 8), fix_ends=False))
    sn.install()
    cfg = sn.make(w_channel, w_sym, a_sym, [8, 4, 2], [4, 2, 8])
    sn.set(cfg)
    sn.recalibrate(data.calib)
    with torch.no_grad():
        fake_w = [wq(model.get_tensor(q.weight)) for wq, q in zip(sn.wq, sn.layers, strict=True)]
        fake_out = model(x)
    layers = sn.lower(cfg)
    model.verify()
    assert [v["format"] for v in layers.values()] == ["int8", "int4_packed", "int2_packed"]
    assert not any(n.op == "call_module" and "eqnet" in str(n.target) for n in model.gm.graph.nodes)
    for q, fw, b in zip(sn.layers, fake_w, cfg.w_bits, strict=True):
        key = q.name.replace(".", "_")
        bufs = dict(model.gm.named_buffers())
        scale = bufs[f"{key}_scale"]
        if b == 8:
            codes = bufs[f"{key}_q"].float()
        else:
            packed = bufs[f"{key}_q4"]
            assert packed.numel() == math.ceil(fw.numel() / 2)
            codes = _nibbles(packed, fw.numel()).reshape(fw.shape).float()
        qn, qp = qrange(b, True)
        assert codes.min() >= qn and codes.max() <= qp and len(codes.unique()) > 1
        axis_shape = [-1] + [1] * (fw.dim() - 1)
        lowered = codes * (scale.reshape(axis_shape) if scale.dim() == 1 else scale)  # 8-bit: per channel
        if not w_sym:
            lowered = lowered + bufs[f"{key}_offset"]
        assert torch.equal(lowered, fw)  # the integer weights are exactly the fake-quantized ones
    with torch.no_grad():
        got = model(x)
    # same float ops in the same order: equal up to summation order, far below one output quantum
    assert (got - fake_out).abs().max() <= 1e-5 * fake_out.abs().max()
    assert accuracy(model, x, digits_data().y_test) > 0.5
    if not w_sym:  # one ONNX round trip (per-tensor 8-bit, packed, sym; marked slow) is enough
        return
    model.save(tmp_path / "eq.onnx")
    sess = ort.InferenceSession(str(tmp_path / "eq.onnx"), providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(sess.run(None, {"image": x.numpy()})[0], got.numpy(), rtol=1e-4, atol=1e-4)


def test_tiny_end_to_end_run_meets_the_budget_and_keeps_accuracy(cnn):
    model = cnn.clone()
    d = digits_data()
    before = accuracy(model, d.x_test, d.y_test)
    text = ("eqnet{bits=2:4:8,fix_ends=false,avg_bits=4,calib_samples=128,eval_samples=256,"
            "predictor_samples=24,predictor_epochs=100,population=16,generations=8}")
    spec = TrainSpec(data=_dataset(), steps=20, batch_size=64, progress=False)
    ctx = PassContext(data=_dataset(), train=spec)
    out, records = parse_pipeline(text).run(model, ctx)
    st = records[0]["stats"]
    avg = st["avg_bits"]
    assert avg["window_met"] and 3.5 < avg["weights"] <= 4 and 3.5 < avg["acts"] <= 4
    assert set(st["layers"]) == {"features.0", "features.4", "classifier"}
    assert {"loss", "task", "wdr"} <= set(st["train"]["terms"]) and st["train"]["steps"] == 20
    assert -1 <= st["predictor"]["kendall_tau"] <= 1 and st["predictor"]["heldout"] == 5
    assert st["weight_bytes"]["after"] < 0.5 * st["weight_bytes"]["before"]
    assert not any(p.is_floating_point() and p.dim() >= 2 and p.numel() > 64
                   for n, p in out.gm.named_buffers() if not n.endswith("offset"))
    after = accuracy(out, d.x_test, d.y_test)
    assert after >= before - 0.05, (before, after)


def test_without_labels_the_float_models_argmax_is_the_label(cnn):
    model = cnn.clone()
    x = digits_data().x_train[:192]
    ds = regc.Dataset({"image": x})
    spec = TrainSpec(data=ds, steps=2, batch_size=64, progress=False)
    data = eval_data(model, spec, 64, 128)
    with torch.no_grad():
        want = model(torch.cat([xs[0] for xs in data.batches])).argmax(-1)
    assert torch.equal(data.labels, want) and data.labels.numel() == 128
    config = EqnetConfig(bits=(4, 8), fix_ends=False, wdr=False)
    sn = build_supernet(model, config, data)
    summary = train_supernet(sn, config, spec)
    assert summary["steps"] == 2 and math.isfinite(summary["loss_last"]) and "wdr" not in summary["terms"]


def test_a_model_without_class_logits_is_refused_with_a_clear_error():
    from tests.test_depgraph import capture_zoo

    model = capture_zoo("bert_encoder")  # outputs (batch, tokens, hidden): no top-1 accuracy
    ds = regc.Dataset({n: t.repeat(4, *[1] * (t.dim() - 1)) for n, t in zip(model.input_names,
                                                                          model.example_inputs, strict=True)})
    spec = TrainSpec(data=ds, steps=2, batch_size=4, progress=False)
    with pytest.raises(regc.ConfigError, match=r"\(batch, classes\) logits"):
        eval_data(model, spec, 4, 4)
