"""4-bit weights: packed two codes per byte in the graph and in the ONNX file, decoded by the
`regc.Int4Decode` function so onnxruntime runs them; exact on the grid, within the int4 bound off it."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import torch

import regc
from regc.passes._qdq import pack_int4, unpack_int4
from regc.pipeline import parse_pipeline
from regc.registry import PassContext

TEXT = "quant{bits=4,acts=none,speed_check=false}"


class _Net(torch.nn.Module):
    def __init__(self, w1, w2):
        super().__init__()
        self.fc1 = torch.nn.Linear(w1.shape[1], w1.shape[0])
        self.fc2 = torch.nn.Linear(w2.shape[1], w2.shape[0])
        with torch.no_grad():
            self.fc1.weight.copy_(w1)
            self.fc2.weight.copy_(w2)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


def test_pack_round_trips_every_code_and_odd_lengths():
    codes = torch.arange(-8, 8, dtype=torch.int8).repeat(3)[:-1]  # 47 codes: odd
    packed = pack_int4(codes)
    assert packed.dtype == torch.uint8 and packed.numel() == 24
    out = unpack_int4(packed, torch.tensor(1.0), [47])
    assert torch.equal(out, codes.float())


def test_int4_grid_exact_bound_and_onnxruntime(tmp_path):
    g = torch.Generator().manual_seed(0)
    k = torch.randint(-7, 8, (32, 48), generator=g).float()
    k[:, 0] = 7
    s = torch.rand(32, 1, generator=g) + 0.1
    w2 = torch.randn(10, 32, generator=g)
    net = _Net(k * s, w2)
    m = regc.capture(net, (torch.randn(4, 48),), {"x": {0: torch.export.Dim("b")}})
    x = torch.randn(64, 48, generator=g)
    with torch.no_grad():
        h = torch.relu(net.fc1(x))  # fc1 is on the 4-bit grid, so the quantized fc1 gives exactly this
        ref = m(x)
    q, records = parse_pipeline(TEXT).run(m, PassContext())
    stats = records[0]["stats"]
    assert {v["format"] for v in stats["layers"].values()} == {"int4_packed"}
    packed = {n: t for n, t in q.gm.named_buffers() if t.dtype == torch.uint8}
    assert sorted(t.numel() for t in packed.values()) == [160, 768]  # 10*32/2 and 32*48/2 bytes
    with torch.no_grad():
        got = q(x)
    # fc2 is not on the grid: |dy_j| <= s_j/2 ||h||_1 with s_j = max|w2_j| / 7
    s2 = w2.abs().amax(1) / 7
    bound = s2[None, :] / 2 * h.abs().sum(1, keepdim=True)
    assert ((got - ref).abs() <= bound * (1 + 1e-4) + 1e-5).all() and (got - ref).abs().max() > 0
    q.save(tmp_path / "q4.onnx")
    proto = onnx.load(str(tmp_path / "q4.onnx"))
    assert [f.name for f in proto.functions] == ["Int4Decode"]
    inits = proto.graph.initializer
    sizes = sorted(int(np.prod(i.dims)) for i in inits if i.data_type == onnx.TensorProto.UINT8)
    assert sizes == [160, 768]
    assert not any(i.data_type == onnx.TensorProto.FLOAT and int(np.prod(i.dims)) >= 320 for i in inits)
    sess = ort.InferenceSession(str(tmp_path / "q4.onnx"), providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(sess.run(None, {"x": x.numpy()})[0], got.numpy(), rtol=1e-5, atol=1e-5)
