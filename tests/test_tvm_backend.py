"""TVM lowering: saved artifacts match onnxruntime, weights stay outside model.so, failures are typed."""

import dataclasses
import json
import re
import shutil
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import regc
from regc.backends.tvm_backend import FORMAT_VERSION, TARGETS, host_cpu_flags, lower_tvm
from regc.errors import ConfigError, InputMismatchError, LoweringError
from regc.runtime.artifact import open_artifact

TOL = dict(rtol=1e-4, atol=1e-4)


class SmallCnn(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.bn = torch.nn.BatchNorm2d(8)
        self.c2 = torch.nn.Conv2d(8, 16, 3, stride=2)
        self.fc = torch.nn.Linear(16, 10)
        self.bn.running_mean.uniform_(-1, 1)  # non-trivial statistics: buffers must reach the artifact
        self.bn.running_var.uniform_(0.5, 2)
        self.bn.weight.data.uniform_(0.5, 2)
        self.bn.bias.data.uniform_(-1, 1)

    def forward(self, x):
        x = torch.relu(self.bn(self.c1(x)))
        return self.fc(torch.relu(self.c2(x)).mean((2, 3)))


class Block(torch.nn.Module):
    """Pre-norm transformer block: LayerNorm, fused-QKV softmax attention (sdpa), GELU MLP."""

    def __init__(self, d=32, heads=4):
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = torch.nn.LayerNorm(d), torch.nn.LayerNorm(d)
        self.qkv, self.proj = torch.nn.Linear(d, 3 * d), torch.nn.Linear(d, d)
        self.fc1, self.fc2 = torch.nn.Linear(d, 4 * d), torch.nn.Linear(4 * d, d)

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = (
            z.reshape(b, t, self.heads, d // self.heads).transpose(1, 2)
            for z in self.qkv(self.ln1(x)).split(d, dim=-1)
        )
        x = x + self.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, t, d))
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x))))


def make_model(module, args, input_names=("x",), output_names=("y",), dynamic_shapes=None):
    """A regc.Model over ``torch.export.export(module.eval(), args).module()``, regc's IR."""
    gm = torch.export.export(module.eval(), args, dynamic_shapes=dynamic_shapes).module()
    return regc.Model(gm=gm, input_names=list(input_names), output_names=list(output_names),
                      example_inputs=args, dynamic_shapes=dynamic_shapes)


def small_cnn_model(seed=0):
    torch.manual_seed(seed)
    return make_model(SmallCnn(), (torch.randn(1, 3, 16, 16),))


def export_onnx(model, path):
    """The dynamo ONNX export of ``model.gm``: the independent reference the artifacts are held to."""
    with warnings.catch_warnings():  # ep.module() says "training mode" and has no eval() (ARCHITECTURE 3)
        warnings.filterwarnings("ignore", "Exporting a model while it is in training mode")
        torch.onnx.export(model.gm, model.example_inputs, str(path), dynamo=True, verbose=False,
                          input_names=model.input_names, output_names=model.output_names)
    return path


def onnxruntime_reference(model, path, inputs):
    import onnxruntime as ort

    session = ort.InferenceSession(str(export_onnx(model, path)), providers=["CPUExecutionProvider"])
    return session.run(None, inputs)


@pytest.fixture(scope="module")
def lowered(tmp_path_factory):
    """(model, in-memory artifact, saved folder) per model kind, lowered once per module."""
    cache = {}

    def get(kind):
        if kind not in cache:
            torch.manual_seed(0)
            model = small_cnn_model() if kind == "cnn" else make_model(Block(), (torch.randn(2, 8, 32),))
            art = lower_tvm(model)
            cache[kind] = (model, art, art.save(tmp_path_factory.mktemp(kind) / "x86_64"))
        return cache[kind]

    return get


@pytest.mark.parametrize("kind", ["cnn", "block"])
def test_saved_artifact_matches_onnxruntime(lowered, kind, tmp_path):
    model, art, folder = lowered(kind)
    x = torch.randn(*model.example_inputs[0].shape)
    (want,) = onnxruntime_reference(model, tmp_path / "ref.onnx", {"x": x.numpy()})
    runner = open_artifact(folder)
    assert runner.input_names == ["x"] and runner.output_names == ["y"]
    np.testing.assert_allclose(runner.run({"x": x.numpy()})["y"], want, **TOL)
    np.testing.assert_allclose(art(x).numpy(), want, **TOL)  # the in-memory artifact runs too
    torch.testing.assert_close(art(x), model(x).detach(), **TOL)


def test_runs_take_any_array_layout_and_return_outputs_of_their_own(lowered):
    """A CPU run copies its inputs into buffers kept between runs and copies the outputs out: an
    earlier run's outputs stay as they were, and a non-contiguous input gives the same result."""
    model, art, _ = lowered("cnn")
    x1, x2 = (torch.randn(*model.example_inputs[0].shape).numpy() for _ in range(2))
    (first,) = art.run(x1)
    kept = first.copy()
    (second,) = art.run(np.asfortranarray(x2))
    np.testing.assert_array_equal(first, kept)
    np.testing.assert_allclose(first, model(torch.from_numpy(x1)).detach().numpy(), **TOL)
    np.testing.assert_allclose(second, model(torch.from_numpy(x2)).detach().numpy(), **TOL)
    assert not np.shares_memory(first, art.run(x1)[0])


def test_meta_json_describes_the_build(lowered):
    model, _, folder = lowered("cnn")
    meta = json.loads((folder / "meta.json").read_text())
    assert meta["format_version"] == FORMAT_VERSION and meta["tuning"] == "untuned"
    assert meta["preset"] == "x86_64" and meta["target"]["mtriple"] == "x86_64-linux-gnu"
    assert meta["inputs"] == [{"name": "x", "shape": [1, 3, 16, 16], "dtype": "float32",
                               "example_shape": [1, 3, 16, 16], "value_range": None}]
    assert [(o["name"], o["shape"], o["dtype"]) for o in meta["outputs"]] == [("y", [1, 10], "float32")]
    names = [p["name"] for p in meta["params"]]
    assert {"c1.weight", "bn.running_mean", "bn.running_var", "fc.bias"} <= set(names)
    assert set(names) <= set(model.gm.state_dict())
    assert {"tvm", "tvm_ffi", "torch", "regc"} <= set(meta["versions"])


def test_weights_live_outside_model_so(tmp_path):
    torch.manual_seed(0)
    mlp = torch.nn.Sequential(torch.nn.Linear(256, 1024), torch.nn.ReLU(), torch.nn.Linear(1024, 256))
    model = make_model(mlp, (torch.randn(4, 256),))
    folder = lower_tvm(model).save(tmp_path / "mlp")
    weight_bytes = model.weight_bytes()  # ~2.1 MB
    assert (folder / "model.so").stat().st_size < weight_bytes / 10
    assert (folder / "model.params").stat().st_size >= weight_bytes


def test_swapping_model_params_runs_other_weights(lowered, tmp_path):
    """One model.so, another instance's weights (BatchNorm statistics included): its outputs follow."""
    import tvm

    _, _, folder = lowered("cnn")
    swapped = shutil.copytree(folder, tmp_path / "swapped")
    other = small_cnn_model(seed=1)
    state = other.gm.state_dict()
    names = [p["name"] for p in json.loads((swapped / "meta.json").read_text())["params"]]
    tvm.runtime.save_param_dict_to_file({n: tvm.runtime.tensor(state[n].numpy()) for n in names},
                                        str(swapped / "model.params"))
    x = torch.randn(1, 3, 16, 16)
    got = open_artifact(swapped).run({"x": x.numpy()})["y"]
    np.testing.assert_allclose(got, other(x).detach().numpy(), **TOL)
    assert not np.allclose(got, open_artifact(folder).run({"x": x.numpy()})["y"], **TOL)


def test_weight_only_kernels_run_once_per_weight_set(lowered):
    """y = x W^T transposes W: that kernel reads weights only, so it moves to main_transform_params and
    runs once per weight set; every kernel main calls reads an activation. Swapping params in memory
    re-runs it."""
    import tvm
    from tvm import relax

    from regc.backends.tvm_backend import (
        PRESETS,
        TRANSFORM_PARAMS,
        _weight_names,
        _weight_side,
        fuse_kernels,
        import_relax,
    )

    model, art, _ = lowered("block")
    kernels = fuse_kernels(import_relax(model).mod, PRESETS["x86_64"].tvm_target())
    main, lifted = kernels["main"], kernels[TRANSFORM_PARAMS]
    weights = _weight_names(main)
    calls = [b.value for block in main.body.blocks for b in block.bindings
             if isinstance(b.value, relax.Call) and b.value.op.name == "relax.call_tir"]
    assert len(calls) > 10
    for call in calls:
        args = call.args[1].fields
        assert not all(_weight_side(a, weights) for a in args), call.args[0].name_hint
    transposes = [b.value.args[0].name_hint for block in lifted.body.blocks for b in block.bindings
                  if isinstance(b.value, relax.Call) and b.value.op.name == "relax.call_tir"]
    assert len(transposes) == 4 and all("transpose" in t for t in transposes)  # qkv, proj, fc1, fc2

    x = torch.randn(2, 8, 32)
    before = art(x).numpy()
    np.testing.assert_allclose(before, model(x).detach().numpy(), **TOL)
    name = next(n for n in art.params if n.endswith("fc2.weight") or n.endswith("fc2_weight"))
    original = art.params[name]
    try:
        art.params[name] = tvm.runtime.tensor(np.zeros(original.shape, "float32"))
        zeroed = art(x).numpy()
    finally:
        art.params[name] = original
    assert not np.allclose(zeroed, before, **TOL)
    np.testing.assert_allclose(art(x).numpy(), before)


def test_kernel_times_say_where_a_run_goes(lowered):
    model, art, _ = lowered("block")
    x = model.example_inputs[0].numpy()
    times = art.kernel_times(x, runs=3)
    kernels = {k: v for k, v in times.items() if not k.startswith("vm.builtin")}
    assert sum(calls for calls, _ in kernels.values()) >= 10  # kernel calls per run
    assert sum("matmul" in k for k in kernels) >= 4 and all(sec > 0 for _, sec in times.values())
    assert list(times.values()) == sorted(times.values(), key=lambda v: -v[1])
    np.testing.assert_allclose(art.run(x)[0], model(model.example_inputs[0]).detach().numpy(), **TOL)


class Nonlinear(torch.nn.Module):
    def forward(self, x):
        smooth = torch.softmax(x, -1) + F.gelu(x) + F.gelu(x, approximate="tanh")
        return smooth + torch.tanh(x) + torch.exp(x) + torch.erf(x)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_float32_exp_erf_tanh_use_polynomials_not_the_c_library(dtype):
    """The C library's erf/exp/tanh run one element a time (erf: 38x slower on x86-64-v3); float32 gets
    TVM's fast_* approximations, within a few float32 ulps; float64 keeps the library calls."""
    x = (torch.randn(4, 64, generator=torch.Generator().manual_seed(0)) * 3).to(dtype)
    model = make_model(Nonlinear().to(dtype), (x,))
    art = lower_tvm(model)
    called = set(re.findall(r"call [^@]*@([\w.]+)", art.kernel_source("llvm")))
    library = {c for c in called if re.fullmatch(r"(erff?|expf?|tanhf?|llvm\.exp\..*)", c)}
    want = model(x).detach().numpy()
    got = art(x).numpy()
    if dtype == torch.float32:
        assert library == set()
        np.testing.assert_allclose(got, want, rtol=2e-6, atol=1e-6)
    else:
        assert library  # the default legalization, as before
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)


def test_dynamic_batch(tmp_path):
    torch.manual_seed(0)
    module = SmallCnn().eval()
    model = make_model(module, (torch.randn(2, 3, 16, 16),),
                       dynamic_shapes={"x": {0: torch.export.Dim("batch", max=64)}})
    runner = open_artifact(lower_tvm(model).save(tmp_path / "dyn"))
    assert isinstance(runner.input_specs[0].shape[0], str) and runner.input_specs[0].shape[1:] == (3, 16, 16)
    for batch in (3, 5):
        x = torch.randn(batch, 3, 16, 16)
        np.testing.assert_allclose(runner.run({"x": x.numpy()})["y"], module(x).detach().numpy(), **TOL)
    with pytest.raises(InputMismatchError, match=r"input 'x' has shape \(3, 4, 16, 16\)"):
        runner.run({"x": np.zeros((3, 4, 16, 16), np.float32)})


class Erfinv(torch.nn.Module):
    def forward(self, x):
        return torch.erfinv(x).relu()


def test_op_without_tvm_converter_is_named():
    with pytest.raises(LoweringError, match=r"no converter for aten\.erfinv\.default \(nodes erfinv"):
        lower_tvm(make_model(Erfinv(), (torch.rand(4) - 0.5,)))


def test_training_mode_is_rejected():
    model = small_cnn_model().train_mode(True)
    with pytest.raises(LoweringError, match=r"train_mode\(False\)"):
        lower_tvm(model)


def test_bad_options_are_config_errors():
    model = small_cnn_model()
    known = "known: x86_64, x86_64_v3, aarch64, cuda$"
    with pytest.raises(ConfigError, match="unknown TVM preset 'riscv'; " + known):
        lower_tvm(model, "riscv")
    with pytest.raises(ConfigError, match="no regc_tuning.json; write the database with 'regc tune'"):
        lower_tvm(model, tuning_db="db/")
    with pytest.raises(ConfigError, match="arch=sm_80 applies to the 'cuda' target only"):
        lower_tvm(model, arch="sm_80")
    with pytest.raises(ConfigError, match="'sm80' is not a CUDA compute capability"):
        lower_tvm(model, "cuda", arch="sm80")


def test_targets_for_the_registry():
    assert [(t.name, t.lower.keywords) for t in TARGETS] == [("x86_64", {"preset": "x86_64"}),
                                                            ("x86_64_v3", {"preset": "x86_64_v3"}),
                                                            ("aarch64", {"preset": "aarch64"}),
                                                            ("cuda", {"preset": "cuda"})]
    descriptions = {t.name: t.description for t in TARGETS}
    assert "untuned" in descriptions["x86_64"] and "untuned" in descriptions["aarch64"]
    assert "AVX2+FMA" in descriptions["x86_64_v3"] and "dlight" in descriptions["cuda"]
    assert {"x86_64", "x86_64_v3", "aarch64", "cuda"} <= set(regc.plugins.targets())


@pytest.mark.skipif(not {"avx2", "fma"} <= host_cpu_flags(), reason="needs a CPU with AVX2 and FMA")
def test_x86_64_v3_uses_avx2_and_fma_and_matches_the_generic_build():
    model = make_model(SmallCnn(), (torch.randn(2, 3, 8, 8),))
    generic, v3 = lower_tvm(model), lower_tvm(model, "x86_64_v3")
    asm = {a.meta.preset: a.kernel_source("llvm", "asm") for a in (generic, v3)}
    # generic x86-64 has SSE2 only: 128-bit xmm registers and no fused multiply-add
    assert "vfmadd" not in asm["x86_64"] and "ymm" not in asm["x86_64"]
    assert asm["x86_64_v3"].count("vfmadd") > 50 and asm["x86_64_v3"].count("%ymm") > 500
    assert v3.meta.target["mcpu"] == "x86-64-v3" and v3.runs_here()
    x = torch.randn(2, 3, 8, 8)
    np.testing.assert_allclose(v3(x).numpy(), generic(x).numpy(), rtol=1e-5, atol=1e-5)


def test_a_build_for_missing_cpu_extensions_is_refused(lowered, monkeypatch):
    import regc.backends.tvm_backend as tb

    model, art, _ = lowered("cnn")
    v3 = tb.TvmArtifact(art.module, art.params, dataclasses.replace(art.meta, preset="x86_64_v3"))
    monkeypatch.setattr(tb, "host_cpu_flags", lambda: frozenset({"sse2", "avx"}))
    assert not v3.runs_here()
    with pytest.raises(LoweringError, match="uses avx2, fma, f16c, bmi2 instructions, which this CPU lacks"):
        v3.run(*(t.numpy() for t in model.example_inputs))


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("nvcc") is None, reason="needs the CUDA toolkit's nvcc (no GPU needed)")
def test_cuda_builds_gpu_kernels_without_a_gpu(tmp_path):
    """dlight schedules every kernel for the GPU; nvcc compiles them here, running needs a GPU."""
    import tvm

    model = make_model(Block(), (torch.randn(2, 8, 32),))
    art = lower_tvm(model, "cuda", arch="sm_86")
    cuda = art.kernel_source("cuda")
    assert cuda.count("__global__") >= 5 and "blockIdx.x" in cuda and "threadIdx.x" in cuda
    assert "fused_matmul" in cuda and "softmax" in cuda  # the block's matmuls and attention are GPU kernels
    assert "__global__" not in art.kernel_source("llvm")  # the host module only launches them
    folder = art.save(tmp_path / "cuda")
    meta = json.loads((folder / "meta.json").read_text())
    assert meta["preset"] == "cuda" and meta["target"]["arch"] == "sm_86"
    assert (folder / "model.params").stat().st_size >= model.weight_bytes()  # weights still outside the code
    assert art.runs_here() == tvm.cuda().exist
    if not tvm.cuda().exist:
        with pytest.raises(LoweringError, match="runs on an NVIDIA GPU and this machine has none"):
            open_artifact(folder)


def test_cuda_without_nvcc_says_what_to_install(monkeypatch):
    monkeypatch.setattr("regc.backends.tvm_backend.shutil.which", lambda name: None)
    with pytest.raises(LoweringError, match="compiles kernels with nvcc: install the CUDA toolkit"):
        lower_tvm(small_cnn_model(), "cuda")


def test_aarch64_without_cross_compiler_says_what_to_install(monkeypatch):
    monkeypatch.setattr("regc.backends.tvm_backend.shutil.which", lambda name: None)
    with pytest.raises(LoweringError, match="apt-get install g\\+\\+-aarch64-linux-gnu"):
        lower_tvm(small_cnn_model(), "aarch64")


@pytest.mark.skipif(shutil.which("aarch64-linux-gnu-g++") is None, reason="needs g++-aarch64-linux-gnu")
def test_aarch64_cross_compiles(tmp_path):
    folder = lower_tvm(small_cnn_model(), "aarch64").save(tmp_path / "a64")
    elf = (folder / "model.so").read_bytes()[:20]
    assert elf[:4] == b"\x7fELF" and int.from_bytes(elf[18:20], "little") == 183  # EM_AARCH64
    assert json.loads((folder / "meta.json").read_text())["target"]["mattr"] == ["+neon"]
    with pytest.raises(LoweringError, match="runs on aarch64 machines"):
        open_artifact(folder)


def test_int8_weights_stay_int8_and_dequantize_inside_the_consuming_kernels():
    """quant's int8 per-channel weights reach model.params as int8 (~1/4 of the float bytes) and each
    (q - z) * s is fused into the matmul kernel that reads it: no separate dequantize kernel."""
    import tvm

    from regc.backends.tvm_backend import PRESETS, fuse_kernels, import_relax

    torch.manual_seed(0)
    mlp = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.ReLU(), torch.nn.Linear(256, 64))
    model = make_model(mlp, (torch.randn(4, 64),))
    quantized = regc.compress(model.clone(), "quant{acts=none,speed_check=false}")
    art, float_art = lower_tvm(quantized), lower_tvm(model)

    int8 = {n: t for n, t in art.params.items() if str(t.dtype) == "int8"}
    assert sorted(tuple(t.shape) for t in int8.values()) == [(64, 256), (256, 64)]
    weight_bytes = 2 * 64 * 256
    assert sum(t.numpy().nbytes for t in int8.values()) == weight_bytes  # 1 byte per weight
    # no fp32 copy of a weight: the float parameters are biases, scales and zero points
    assert all(str(t.dtype) != "float32" or t.numpy().size <= 256 for t in art.params.values())
    q_bytes = sum(t.numpy().nbytes for t in art.params.values())
    f_bytes = sum(t.numpy().nbytes for t in float_art.params.values())
    assert 0.25 <= q_bytes / f_bytes <= 0.30  # int8 weights + per-channel scales/zero points + fp32 biases

    target = PRESETS["x86_64"].tvm_target()
    kernels = fuse_kernels(import_relax(quantized).mod, target)
    signatures = {gv.name_hint: next(s for s in f.script().splitlines() if s.lstrip().startswith("def "))
                  for gv, f in kernels.functions.items() if isinstance(f, tvm.tirx.PrimFunc)}
    readers = [name for name, signature in signatures.items() if '"int8"' in signature]
    assert len(readers) == 2 and all("matmul" in name for name in readers), readers
    # main gets the codes as they are: lifting weight-only kernels out of it never made them floats
    main_weights = {(str(p.ty.dtype), tuple(int(d) for d in p.ty.shape)) for p in kernels["main"].params[1:]}
    assert {("int8", (256, 64)), ("int8", (64, 256))} <= main_weights
    assert not main_weights & {("float32", (256, 64)), ("float32", (64, 256))}

    x = torch.randn(4, 64)
    got, want = art(x).numpy(), quantized(x).detach().numpy()
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * float(np.abs(want).max()))
    quant_error = float(np.abs(got - model(x).detach().numpy()).max())
    assert 1e-4 < quant_error < 0.05 * float(np.abs(want).max())  # really the int8 weights, and close


def test_cli_target_options_use_pipeline_syntax():
    from regc.cli import _target_spec

    assert _target_spec("cuda{arch=sm_90a}") == ("cuda", {"arch": "sm_90a"})
    assert _target_spec("x86_64") == ("x86_64", {})
    with pytest.raises(ConfigError, match="give one target"):
        _target_spec("cuda,x86_64")
