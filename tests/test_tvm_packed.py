"""Packed weights through TVM: 4-bit (two codes per byte) and RF8 (one uint8 code per weight) reach
model.params as codes, and their decode runs inside the kernel that consumes the weight (matmul,
conv, gather), computed one output-channel slice at a time: no kernel writes a float copy of a weight."""

import numpy as np
import pytest
import torch
from conftest import capture_zoo

import regc
from regc.backends.tvm_backend import (
    PRESETS,
    _integer_weight,
    _schedule_weight_decode,
    _weight_names,
    fuse_kernels,
    import_relax,
    lower_tvm,
)

INT4 = "quant{acts=none,speed_check=false,bits=4}"
RF8 = "rf8"
CONSUMERS = ("matmul", "conv2d", "take")  # TIR block names of the ops a decoded weight feeds


def mlp_model():
    torch.manual_seed(0)
    mlp = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.ReLU(), torch.nn.Linear(256, 64))
    return regc.capture(mlp, (torch.randn(4, 64),))


def code_kernels(model):
    """{kernel name: (schedule of the kernel as built for x86_64, names of the code buffers it reads)}
    for every kernel ``main`` calls with an integer weight, and the float outputs of those calls."""
    from tvm import relax, s_tir

    mod = fuse_kernels(import_relax(model).mod, PRESETS["x86_64"].tvm_target())
    mod = _schedule_weight_decode()(mod)
    main = mod["main"]
    weights = _weight_names(main)
    kernels, outputs = {}, []
    for binding in (b for block in main.body.blocks for b in block.bindings):
        call = binding.value
        if not (isinstance(call, relax.Call) and call.op.name == "relax.call_tir"):
            continue
        codes = [i for i, a in enumerate(call.args[1].fields) if _integer_weight(a, weights)]
        if codes:
            func = mod[call.args[0]]
            kernels[call.args[0].name_hint] = (s_tir.Schedule(func), {func.params[i].name for i in codes})
            outputs.append(binding.var.ty)
    return kernels, outputs


def assert_decode_inside_consumers(model, weight_shapes):
    """Every kernel reading codes computes a matmul/conv/gather, every block of it that reads codes is
    that consumer or is nested in the consumer's outermost (output-channel) loop, and no call of such
    a kernel returns a float tensor shaped like a weight. Returns the number of such calls."""
    kernels, outputs = code_kernels(model)
    assert kernels
    for name, (sch, codes) in kernels.items():
        blocks = sch.get_child_blocks(sch.get_sblock("root"))
        consumers = [b for b in blocks if any(c in sch.get(b).name_hint for c in CONSUMERS)]
        assert len(consumers) == 1, (name, [sch.get(b).name_hint for b in blocks])
        consumer = sch.get(consumers[0])
        outer = sch.get(sch.get_loops(consumers[0])[0])
        readers = [b for b in blocks if {r.source.name for r in sch.get(b).reads} & codes]
        assert readers, name
        for b in readers:
            inside = sch.get(b).same_as(consumer) or sch.get(sch.get_loops(b)[0]).same_as(outer)
            assert inside, (name, sch.get(b).name_hint)
    for ty in outputs:
        shape = tuple(int(d) if str(d).isdigit() else str(d) for d in ty.shape)
        assert not ("float" in str(ty.dtype) and shape in weight_shapes), ty
    return len(outputs)


def check_outputs(art, compressed, reference, rtol=1e-4):
    """``art`` matches the compressed torch graph within ``rtol`` of the output scale, and really runs
    compressed weights (it differs from the float model by more than that)."""
    x = compressed.example_inputs
    got = art(*x)
    with torch.no_grad():
        want, ref = compressed(*x), reference(*x)
    scale = float(want.abs().max())
    np.testing.assert_allclose(got.numpy(), want.numpy(), rtol=rtol, atol=rtol * scale)
    assert float((got - ref).abs().max()) > 10 * rtol * scale


def param_bytes(art):
    return sum(t.numpy().nbytes for t in art.params.values())


@pytest.fixture(scope="module")
def mlp_builds():
    """(float model, {pipeline: (compressed model, artifact)}, float artifact), built once."""
    model = mlp_model()
    builds = {}
    for text in (INT4, RF8):
        compressed = regc.compress(model.clone(), text)
        builds[text] = (compressed, lower_tvm(compressed))
    return model, builds, lower_tvm(model)


def test_int4_params_hold_packed_codes(mlp_builds):
    model, builds, float_art = mlp_builds
    compressed, art = builds[INT4]
    numel = 2 * 64 * 256
    codes = {n: t for n, t in art.params.items() if str(t.dtype) == "uint8"}
    assert len(codes) == 2 and sum(t.numpy().nbytes for t in codes.values()) == numel // 2
    floats = [t.numpy().size for t in art.params.values() if str(t.dtype) == "float32"]
    assert max(floats) <= 64 * 256 // 32  # scales (one per group of 32) and biases, no weight copy
    ratio = param_bytes(art) / param_bytes(float_art)  # 1/8 + scales (1/32 x 4 bytes) + fp32 biases
    assert 1 / 8 < ratio < 0.17, ratio
    check_outputs(art, compressed, model)


def test_rf8_params_hold_uint8_codes(mlp_builds):
    model, builds, float_art = mlp_builds
    compressed, art = builds[RF8]
    codes = {n: t for n, t in art.params.items() if str(t.dtype) == "uint8"}
    assert sorted(tuple(t.shape) for t in codes.values()) == [(64, 256), (256, 64)]
    floats = [t.numpy().size for t in art.params.values() if str(t.dtype) == "float32"]
    assert max(floats) == 256  # a bias; the exponent biases are scalars
    ratio = param_bytes(art) / param_bytes(float_art)  # 1/4 + fp32 biases
    assert 1 / 4 < ratio < 0.26, ratio
    check_outputs(art, compressed, model)


@pytest.mark.parametrize("text", [INT4, RF8])
def test_mlp_decode_runs_inside_the_matmuls(mlp_builds, text):
    compressed, _ = mlp_builds[1][text]
    assert_decode_inside_consumers(compressed, {(256, 64), (64, 256)})


@pytest.mark.parametrize("text", [INT4, RF8])
def test_digits_cnn_convs_and_linear_decode_packed_weights(text):
    model = capture_zoo("digits_cnn")
    compressed = regc.compress(model.clone(), text)
    assert_decode_inside_consumers(compressed, {(16, 1, 3, 3), (32, 16, 3, 3), (10, 128)})
    art = lower_tvm(compressed)
    assert {n for n, t in art.params.items() if str(t.dtype) == "uint8"} == {
        f"{w}_{'q4' if text == INT4 else 'rf8'}" for w in ("features_0_weight", "features_4_weight",
                                                           "classifier_weight")}
    check_outputs(art, compressed, model)


@pytest.mark.slow
def test_bert_encoder_rf8_embeddings_and_linears():
    """Embedding gathers decode only the rows they read; every linear (the attention output one is a
    batched matmul over a broadcast weight) decodes inside its matmul."""
    model = capture_zoo("bert_encoder")
    compressed = regc.compress(model.clone(), RF8)
    calls = assert_decode_inside_consumers(compressed, {(1000, 64), (64, 64), (256, 64), (64, 256)})
    assert calls == 14  # 2 embedding tables + 2 layers x 6 linears, each decoded by its consumer
    art = lower_tvm(compressed)
    assert sum(str(t.dtype) == "uint8" for t in art.params.values()) == 14
    assert param_bytes(art) / param_bytes(lower_tvm(model)) < 0.27
    check_outputs(art, compressed, model)
