"""Triton dequant-GEMM kernels vs their torch reference (CPU, Triton interpreter), int4 packing,
the custom ops' export and fallback, ahead-of-time PTX/cubin compilation, and the GPU benchmark's
refusal without CUDA.

Triton decides interpreter vs GPU when a ``@triton.jit`` function is *defined* (it reads
``TRITON_INTERPRET`` through ``triton.knobs.runtime.interpret`` in the decorator), so the ``kernels``
fixture sets the variable and imports the kernel module afresh; the variable is unset afterwards,
which sends the custom ops on CPU tensors back to the plain-torch path. Compilation for sm_80/sm_90
needs the non-interpreted kernel, so it runs in a subprocess without the variable.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from regc.backends.triton import (
    dequantize,
    int4_linear,
    int8_linear,
    linear_reference,
    pack_int4,
    quantize_int4,
    quantize_int8,
    table_linear,
    unpack_int4,
)
from regc.errors import ConfigError, InputMismatchError

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def kernels():
    mp = pytest.MonkeyPatch()
    mp.setenv("TRITON_INTERPRET", "1")
    sys.modules.pop("regc.backends.triton.kernels", None)
    from regc.backends.triton import kernels as k

    assert k.INTERPRETED
    yield k
    mp.undo()


def _weights(fmt: str, n: int, k: int, group_size: int, gen: torch.Generator):
    """(codes, scales, table) for a random float weight; table: random codes and a random table."""
    w = torch.randn(n, k, generator=gen)
    if fmt == "int8":
        return (*quantize_int8(w, group_size), None)
    if fmt == "int4":
        return (*quantize_int4(w, group_size), None)
    n_groups = 1 if group_size == 0 else -(-k // group_size)
    codes = torch.randint(0, 256, (n, k), dtype=torch.uint8, generator=gen)
    scales = torch.rand(n, n_groups, generator=gen) + 0.5
    return codes, scales.squeeze(1) if group_size == 0 else scales, torch.randn(256, generator=gen)


_OPS = {"int8": int8_linear, "int4": int4_linear, "table": table_linear}


def _call(fmt, x, codes, scales, group_size, table):
    if fmt == "table":
        return table_linear(x, codes, table, scales, group_size)
    return _OPS[fmt](x, codes, scales, group_size)


# (fmt, group_size, dtype, M, N, K): ragged against 64-wide blocks; group 48 divides a K block
# (scale per block), 40 does not (scale per weight); K=199 is odd (int4 padding nibble).
CASES = [
    ("int8", 0, torch.float32, 1, 70, 200),
    ("int8", 48, torch.float16, 33, 70, 200),
    ("int4", 0, torch.float16, 5, 130, 199),
    ("int4", 40, torch.float32, 33, 70, 199),
    ("table", 0, torch.float32, 33, 70, 200),
    ("table", 64, torch.float16, 3, 130, 96),
]


@pytest.mark.parametrize("fmt,group_size,dtype,m,n,k", CASES)
def test_kernel_matches_reference(kernels, fmt, group_size, dtype, m, n, k):
    gen = torch.Generator().manual_seed(m * n + k)
    codes, scales, table = _weights(fmt, n, k, group_size, gen)
    x = torch.randn(m, k, generator=gen).to(dtype)
    y = _call(fmt, x, codes, scales, group_size, table)
    ref = linear_reference(x, fmt, codes, scales, group_size, table)
    assert y.dtype == dtype and y.shape == (m, n)
    # fp16: decoded weights are rounded to fp16 before the dot and y is fp16 (2^-11 relative each)
    tol = 1e-5 if dtype == torch.float32 else 4e-3
    torch.testing.assert_close(y.float(), ref.float(), rtol=tol, atol=tol * float(ref.abs().max()))


def test_kernel_batched_input(kernels):
    gen = torch.Generator().manual_seed(1)
    q, s = quantize_int4(torch.randn(24, 80, generator=gen), 16)
    x = torch.randn(2, 3, 80, generator=gen)
    torch.testing.assert_close(int4_linear(x, q, s, 16), linear_reference(x, "int4", q, s, 16),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("k", [7, 8])
def test_int4_pack_round_trip(k):
    q = torch.randint(-8, 8, (5, k), dtype=torch.int8)
    packed = pack_int4(q)
    assert packed.dtype == torch.uint8 and packed.shape == (5, (k + 1) // 2)
    assert torch.equal(unpack_int4(packed, k), q)
    assert pack_int4(torch.tensor([[1, -1]], dtype=torch.int8)).item() == 0xF1  # low nibble first
    with pytest.raises(InputMismatchError, match=r"\[-8, 7\]"):
        pack_int4(torch.full((1, 2), 8, dtype=torch.int8))


@pytest.mark.parametrize("fmt,group_size", [("int8", 0), ("int8", 16), ("int4", 0), ("int4", 12)])
def test_quantize_exact_on_grid_and_error_bound(fmt, group_size):
    gen = torch.Generator().manual_seed(0)
    quantize, qmax = (quantize_int8, 127) if fmt == "int8" else (quantize_int4, 7)
    n, k = 6, 40
    # exact: weights already on the grid (each group holds a +-qmax value) come back unchanged
    q = torch.randint(-qmax, qmax + 1, (n, k), generator=gen)
    q[:, :: group_size or k] = qmax
    scale = torch.rand(n, 1, generator=gen) + 0.1
    w = q * scale
    codes, s = quantize(w, group_size)
    torch.testing.assert_close(dequantize(fmt, codes, s, k, group_size), w, rtol=1e-6, atol=0)
    # bound: |y - y_q|_j <= max_g scale_jg / 2 * ||x||_1 on random weights
    w = torch.randn(n, k, generator=gen)
    x = torch.randn(4, k, generator=gen)
    codes, s = quantize(w, group_size)
    err = (x @ w.T - linear_reference(x, fmt, codes, s, group_size)).abs()
    bound = s.reshape(n, -1).amax(1) / 2 * x.abs().sum(1, keepdim=True)
    assert (err <= bound + 1e-5).all()


def test_ops_export_and_cpu_fallback(monkeypatch):
    """Without the interpreter the ops run the torch reference; torch.export keeps them as calls."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    gen = torch.Generator().manual_seed(2)
    q, s = quantize_int8(torch.randn(12, 20, generator=gen), 0)
    codes, s8, table = _weights("table", 5, 12, 0, gen)

    class Net(torch.nn.Module):
        def forward(self, x):
            return torch.ops.regc.table_linear(torch.ops.regc.int8_linear(x, q, s, 0).relu(),
                                               codes, table, s8, 0)

    x = torch.randn(3, 20, generator=gen)
    ep = torch.export.export(Net(), (x,))
    targets = {str(n.target) for n in ep.graph.nodes if n.op == "call_function"}
    assert {"regc.int8_linear.default", "regc.table_linear.default"} <= targets
    want = linear_reference(linear_reference(x, "int8", q, s).relu(), "table", codes, s8, 0, table)
    torch.testing.assert_close(ep.module()(x), want, rtol=0, atol=0)


def test_ops_reject_bad_arguments():
    x = torch.randn(2, 8)
    q, s = quantize_int8(torch.randn(4, 8), 0)
    with pytest.raises(ConfigError, match="group_size"):
        int8_linear(x, q, s, -1)
    with pytest.raises(InputMismatchError, match="codes must be"):
        int4_linear(x, q, s, 0)  # int8 codes where packed uint8 are expected
    with pytest.raises(InputMismatchError, match="scales must be"):
        int8_linear(x, q, s, 4)  # per-channel scales given with a group size
    with pytest.raises(InputMismatchError, match="table"):
        table_linear(x, q.view(torch.uint8), torch.randn(255), s, 0)


_COMPILE = """
import json
from regc.backends.triton.kernels import compile_for_gpu
out = {}
for fmt, group_size in [("int8", 0), ("int4", 128), ("table", 0)]:
    for cap in (80, 90):
        r = compile_for_gpu(fmt, cap, group_size=group_size)
        ptx = r["ptx"]
        out[f"{fmt}_sm{cap}"] = {"entry": f".entry {r['name']}" in ptx, "mma": "mma" in ptx,
                                 "ld_global": "ld.global" in ptx, "target": f".target sm_{cap}" in ptx,
                                 "cubin_bytes": len(r["cubin"])}
print(json.dumps(out))
"""


@pytest.mark.slow
def test_kernels_compile_to_ptx_and_cubin_without_gpu():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    proc = subprocess.run([sys.executable, "-c", _COMPILE], env=env, capture_output=True, text=True,
                          timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(results) == 6
    for name, r in results.items():
        assert r["entry"] and r["mma"] and r["ld_global"] and r["target"], (name, r)
        assert r["cubin_bytes"] > 1000, (name, r)


def test_gpu_benchmark_refuses_without_cuda(tmp_path):
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    out = tmp_path / "r.json"
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "triton_gpu.py"), "--out", str(out)],
                          env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "cuda_available: False" in proc.stdout and f"torch: {torch.__version__}" in proc.stdout
    assert "triton: " in proc.stdout
    assert "torch.cuda.is_available() is False" in proc.stderr
    assert not out.exists()
