"""4-bit weights: packed two codes per byte in the graph and in the ONNX file, and run by onnxruntime from
that storage: linears whose input size is a multiple of group_size as com.microsoft MatMulNBits (one
scale per group of 32), others through the `regc.Int4Decode` function; vocabulary embedding tables as
asymmetric groups decoded after the Gather. Exact on the grid, within the stated bound off it, and
onnxruntime matches the torch graph (the reference dequantized math) to float rounding."""

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
    # fc1 (48 inputs, not a multiple of 32) keeps one scale per row, fc2 one per group of 32
    assert [v["granularity"] for v in stats["layers"].values()] == ["per_channel", "group32_symmetric"]
    packed = {n: t for n, t in q.gm.named_buffers() if t.dtype == torch.uint8}
    assert sorted(t.numel() for t in packed.values()) == [160, 768]  # 10*32/2 and 32*48/2 bytes
    with torch.no_grad():
        got = q(x)
    # fc2 is not on the grid: |dy_j| <= s_j/2 ||h||_1 with s_j = max|w2_j| / 7 (its one group is its row)
    s2 = w2.abs().amax(1) / 7
    bound = s2[None, :] / 2 * h.abs().sum(1, keepdim=True)
    assert ((got - ref).abs() <= bound * (1 + 1e-4) + 1e-5).all() and (got - ref).abs().max() > 0
    q.save(tmp_path / "q4.onnx")
    proto = onnx.load(str(tmp_path / "q4.onnx"))
    assert [f.name for f in proto.functions] == ["Int4Decode"]
    assert [n.op_type for n in proto.graph.node if n.domain == "com.microsoft"] == ["MatMulNBits"]
    inits = proto.graph.initializer
    sizes = sorted(int(np.prod(i.dims)) for i in inits if i.data_type == onnx.TensorProto.UINT8)
    assert sizes == [160, 768]
    assert not any(i.data_type == onnx.TensorProto.FLOAT and int(np.prod(i.dims)) >= 320 for i in inits)
    sess = ort.InferenceSession(str(tmp_path / "q4.onnx"), providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(sess.run(None, {"x": x.numpy()})[0], got.numpy(), rtol=1e-5, atol=1e-5)


class _Embed(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.words = torch.nn.Embedding(5000, 64)
        self.pos = torch.nn.Embedding(16, 64)

    def forward(self, ids):
        return self.words(ids) + self.pos.weight[: ids.shape[1]]


def test_vocabulary_table_4bit_groups_bound_and_onnxruntime(tmp_path):
    torch.manual_seed(0)
    net = _Embed().eval()
    ids = torch.randint(0, 5000, (3, 16))
    m = regc.capture(net, (ids,), {"ids": {0: torch.export.Dim("b")}})
    q, records = parse_pipeline("quant{acts=none,embedding_bits=4,speed_check=false}").run(m, PassContext())
    layers = records[0]["stats"]["layers"]
    assert layers["words.weight"]["format"] == "int4_packed"
    assert layers["words.weight"]["granularity"] == "group32_asymmetric"
    bufs = dict(q.gm.named_buffers())
    assert bufs["words_weight_q4"].shape == (5000, 32) and bufs["words_weight_q4"].dtype == torch.uint8
    assert bufs["words_weight_scale"].shape == (5000, 2) and bufs["words_weight_scale"].dtype == torch.float16
    # per element: |w - w_hat| <= s_g / 2, plus float16 rounding of the group minimum and scale
    w = net.words.weight.detach()
    g = w.reshape(5000, 2, 32)
    s = ((g.amax(-1) - g.amin(-1)) / 15)[..., None]
    amax = g.abs().amax(-1, keepdim=True)
    probe = torch.arange(5000).reshape(50, 100)
    with torch.no_grad():
        rows = torch.ops.regc.gather_int4(bufs["words_weight_q4"], bufs["words_weight_scale"],
                                          bufs["words_weight_zero"], probe, 32).reshape(5000, 2, 32)
    err = (rows - g).abs()
    assert (err <= s / 2 * 1.01 + amax * 2 ** -9).all() and err.max() > 0
    x = torch.randint(0, 5000, (2, 16))
    with torch.no_grad():
        got, ref = q(x), net(x)
    assert (got - ref).norm() / ref.norm() < 0.1
    q.save(tmp_path / "e4.onnx")
    sizes = sorted(int(np.prod(i.dims)) for i in onnx.load(str(tmp_path / "e4.onnx")).graph.initializer)
    assert sizes[-1] == 5000 * 32  # the packed table is the largest initializer
    sess = ort.InferenceSession(str(tmp_path / "e4.onnx"), providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(sess.run(None, {"ids": x.numpy()})[0], got.numpy(), rtol=1e-6, atol=1e-6)
