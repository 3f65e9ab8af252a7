"""RF8: the value set derived in TECHNIQUES 6.5, exact round trips, zero/flush/saturation handling, the
reference greedy algorithm, and the `rf8` pass end to end (uint8 codes on disk, onnxruntime decode)."""

from __future__ import annotations

import json
import math

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from regc.errors import ConfigError
from regc.passes._rf8_format import MANTISSAS, ZERO_CODE, bias_for, decode, encode, value_set
from regc.pipeline import parse_pipeline
from regc.registry import PassContext
from tests.conftest import capture_zoo


def _greedy(w: torch.Tensor) -> torch.Tensor:
    """The paper's reference: d1 = sign 2^round(log2|w|), d2 likewise on the residual, kept if e1-e2 <= 4."""
    out = []
    for x in w.tolist():
        if x == 0:
            out.append(0.0)
            continue
        e1 = round(math.log2(abs(x)))
        d1 = math.copysign(2.0 ** e1, x)
        r = x - d1
        keep = r != 0 and e1 - round(math.log2(abs(r))) <= 4
        out.append(d1 + (math.copysign(2.0 ** round(math.log2(abs(r))), r) if keep else 0.0))
    return torch.tensor(out, dtype=torch.float64)


def test_value_set_is_the_derived_one():
    assert sorted(MANTISSAS) == [0.75, 0.875, 0.9375, 1.0, 1.0625, 1.125, 1.25, 1.5]
    v = value_set(0)
    pos = v[v > 0]
    for e in range(1, 15):  # interior binades: exactly the 8 mantissas times 2^e
        in_binade = pos[(pos >= 0.75 * 2 ** e) & (pos <= 1.5 * 2 ** e)]
        assert sorted((in_binade / 2 ** e).tolist()) == sorted(MANTISSAS)
    # 256 codes - zero code - 2 x 15 duplicates (1.5 * 2^e == 0.75 * 2^(e+1)) + zero itself
    assert len(v) == 256 - 1 - 30 + 1 and (v == 0).sum() == 1
    assert v.max() == 1.5 * 2 ** 15 and pos.min() == 0.75 and v.min() == -1.5 * 2 ** 15
    assert torch.equal(value_set(-4), value_set(0) / 16)


@pytest.mark.parametrize("bias", [-20, -7, 0, 3])
def test_every_value_round_trips(bias):
    v = value_set(bias)
    assert torch.equal(decode(encode(v, bias), bias), v)


def test_matches_reference_greedy_and_error_bound():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(20000, generator=g, dtype=torch.float64) * 0.05
    bias = bias_for(w, w.abs().max().item())  # top binade holds max|w|: nothing saturates
    got = decode(encode(w, bias), bias).double()
    in_range = w.abs() >= 2.0 ** bias
    assert torch.equal(got[in_range].float(), _greedy(w[in_range]).float())
    rel = ((got - w).abs() / w.abs())[in_range]
    worst_case = (1.5 - (1 + 2 ** -1.5)) / (1 + 2 ** -1.5)  # m = 1 + 2^-1.5 -> 1.5 (greedy): 10.8%
    assert rel.max() <= worst_case + 1e-12
    m = torch.linspace(2 ** -0.5, 2 ** 0.5 - 1e-6, 100001, dtype=torch.float64)
    worst = ((decode(encode(m, -10), -10).double() - m).abs() / m).max().item()
    assert 0.105 < worst <= worst_case + 1e-12


def test_zero_flush_and_saturation():
    bias = -4  # binades 2^-4 .. 2^11
    w = torch.tensor([0.0, -0.0, 2.0 ** -9, -(2.0 ** -9), 1e9, -1e9, 2.0 ** -4, -(2.0 ** -4), 1.0])
    codes = encode(w, bias)
    out = decode(codes, bias)
    assert codes[0] == codes[1] == codes[2] == codes[3] == ZERO_CODE
    assert out[:4].eq(0).all() and not out.isnan().any()
    assert out[4] == 1.5 * 2 ** 11 and out[5] == -1.5 * 2 ** 11
    assert out[6] == 2.0 ** -4  # the smallest positive power of two is representable
    assert out[7] == 0  # its negative is the reserved zero code
    assert out[8] == 1.0


def test_rf8_pass_uint8_storage_and_onnxruntime_decode(tmp_path):
    model = capture_zoo("mlp")
    x = model.example_inputs
    with torch.no_grad():
        ref = model(*x)
    before = model.weight_bytes()
    q, records = parse_pipeline("rf8").run(model, PassContext())
    stats = records[0]["stats"]
    json.dumps(stats)
    assert set(stats["layers"]) == {"fc1.weight", "fc2.weight", "fc3.weight"}
    assert all(0 < v["relative_rmse"] < 0.06 for v in stats["layers"].values())
    codes = [t for _, t in q.gm.named_buffers() if t.dtype == torch.uint8]
    assert len(codes) == 3 and q.weight_bytes() < 0.4 * before
    with torch.no_grad():
        got = q(*x)
    assert torch.nn.functional.cosine_similarity(got, ref).min() > 0.99 and not torch.equal(got, ref)
    q.save(tmp_path / "rf8.onnx")
    proto = onnx.load(str(tmp_path / "rf8.onnx"))
    assert [f.name for f in proto.functions] == ["RF8Decode"]
    assert sum(n.domain == "regc" and n.op_type == "RF8Decode" for n in proto.graph.node) == 3
    assert sum(i.data_type == onnx.TensorProto.UINT8 for i in proto.graph.initializer) == 3
    sess = ort.InferenceSession(str(tmp_path / "rf8.onnx"), providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(sess.run(None, {"x": x[0].numpy()})[0], got.numpy(), rtol=1e-5, atol=1e-6)


def test_gg_bias_saturates_outliers_and_config_is_checked():
    class Lin(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = torch.nn.Linear(256, 64)
            with torch.no_grad():
                self.fc.weight.normal_(0, 0.02)
                self.fc.weight[0, 0] = 40.0  # one outlier far beyond any Gaussian quantile

        def forward(self, x):
            return self.fc(x)

    import regc

    m = regc.capture(Lin(), (torch.randn(2, 256),))
    _, rec_max = parse_pipeline("rf8").run(m.clone(), PassContext())
    _, rec_gg = parse_pipeline("rf8{bias=gg}").run(m, PassContext())
    lmax, lgg = rec_max[0]["stats"]["layers"]["fc.weight"], rec_gg[0]["stats"]["layers"]["fc.weight"]
    assert lgg["bias"] < lmax["bias"] and lgg["saturated"] == 1 and lmax["saturated"] == 0
    with pytest.raises(ConfigError, match="rf8.bias"):
        parse_pipeline("rf8{bias=mean}")
