"""Benchmark regc's Triton dequant-GEMM kernels on a CUDA GPU; write JSON.

    python bench/triton_gpu.py [--out bench/results/triton_gpu.json]

For y = x @ W^T with x fp16 [M, K], M in {1, 16, 128} and N = K in {4096, 8192}, it times each packed
format (int8 per channel, int4 with groups of 128, 8-bit codes through a 256-entry table) against
torch's fp16 matmul on the fp16 weight, and against a bandwidth roofline: bytes moved (x, packed
weight, scales, y) / peak bandwidth, the peak measured by a device-to-device copy. Every kernel is
checked against the plain-torch reference before it is timed. Timing: CUDA events around each call,
L2 flushed before each, median of 50 after 10 warm-up calls.

Needs torch with CUDA, triton and numpy, not an installed regc: the kernel and reference files are
loaded by path. Prints what it found and exits 2 when CUDA or triton is missing, 1 when a kernel
disagrees with the reference.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import platform
import sys
import time
from pathlib import Path
from types import ModuleType
from typing import Callable

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
KERNEL_DIR = ROOT / "backends" / "triton"
SHAPES_M = (1, 16, 128)
SHAPES_NK = (4096, 8192)
GROUP = 128
REL_TOL = 1e-2  # fp16 output, fp32 accumulation: max |y - y_ref| / max |y_ref|
WARMUP, REPS = 10, 50


def _load(name: str, path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def environment() -> dict:
    """What this machine offers: versions, CUDA, the GPU."""
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    cuda = torch.cuda.is_available()
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cuda_available": cuda,
        "triton": triton_version,
        "numpy": np.__version__,
        "gpu": torch.cuda.get_device_name() if cuda else None,
        "capability": list(torch.cuda.get_device_capability()) if cuda else None,
    }


def time_ms(fn: Callable[[], object], flush: torch.Tensor) -> float:
    """Median milliseconds of ``fn`` over REPS calls, each after an L2 flush, timed by CUDA events."""
    for _ in range(WARMUP):
        fn()
    times = []
    for _ in range(REPS):
        flush.zero_()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return float(np.median(times))


def copy_bandwidth(flush: torch.Tensor) -> float:
    """Peak bandwidth in bytes/s: a 1 GiB device-to-device copy moves 2 GiB (read + write)."""
    src = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src), flush)
    return 2 * (1 << 30) / (ms * 1e-3)


def weight_variants(ref: ModuleType, w: torch.Tensor) -> dict[str, dict]:
    """The packed weights benchmarked, from one float weight [N, K]."""
    q8, s8 = ref.quantize_int8(w)
    q4, s4 = ref.quantize_int4(w, GROUP)
    table = torch.sort(torch.randn(256, device=w.device)).values  # a custom 8-bit float format
    codes = torch.bucketize(w / w.abs().amax(1, keepdim=True) * 2.5, table).clamp(max=255).to(torch.uint8)
    return {
        "int8": {"fmt": "int8", "codes": q8, "scales": s8, "group_size": 0, "table": None},
        f"int4_g{GROUP}": {"fmt": "int4", "codes": q4, "scales": s4, "group_size": GROUP, "table": None},
        "table8": {"fmt": "table", "codes": codes, "scales": w.abs().amax(1) / 2.5, "group_size": 0,
                   "table": table},
    }


def nbytes(*tensors: torch.Tensor | None) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def run(ref: ModuleType, ker: ModuleType) -> tuple[dict, bool]:
    flush = torch.empty(256 << 20, dtype=torch.uint8, device="cuda")  # larger than any L2
    peak = copy_bandwidth(flush)
    print(f"copy bandwidth: {peak / 1e9:.0f} GB/s")
    rows, ok = [], True
    for nk in SHAPES_NK:
        gen = torch.Generator(device="cuda").manual_seed(nk)
        w = torch.randn(nk, nk, device="cuda", generator=gen) / nk**0.5
        w16 = w.half()
        variants = weight_variants(ref, w)
        for m in SHAPES_M:
            x = torch.randn(m, nk, device="cuda", generator=gen).half()
            fp16_ms = time_ms(lambda x=x, w16=w16: x @ w16.T, flush)
            fp16_bytes = nbytes(x, w16) + m * nk * 2
            rows.append({"impl": "torch_fp16", "M": m, "N": nk, "K": nk, "ms": fp16_ms, "bytes": fp16_bytes,
                         "roofline_ms": fp16_bytes / peak * 1e3, "max_rel_err": 0.0})
            print(_line(rows[-1]))
            for name, v in variants.items():
                args = (x, v["fmt"], v["codes"], ref.scales_2d(v["scales"], nk, v["group_size"]),
                        v["group_size"], v["table"])
                y = ker.dequant_linear(*args)
                y_ref = ref.linear_reference(x, v["fmt"], v["codes"], v["scales"], v["group_size"],
                                             v["table"])
                err = float((y.float() - y_ref.float()).abs().max() / y_ref.float().abs().max())
                passed = err <= REL_TOL
                ok &= passed
                row = {"impl": name, "M": m, "N": nk, "K": nk, "max_rel_err": err, "correct": passed}
                if passed:
                    ms = time_ms(lambda args=args: ker.dequant_linear(*args), flush)
                    moved = nbytes(x, v["codes"], v["scales"], v["table"]) + m * nk * 2
                    row.update(ms=ms, bytes=moved, roofline_ms=moved / peak * 1e3,
                               speedup_vs_fp16=fp16_ms / ms)
                rows.append(row)
                print(_line(row))
    for r in rows:
        if "ms" in r:
            r["fraction_of_roofline"] = r["roofline_ms"] / r["ms"]
            r["tflops"] = 2 * r["M"] * r["N"] * r["K"] / (r["ms"] * 1e-3) / 1e12
    return {"copy_bandwidth_GBps": peak / 1e9, "rows": rows}, ok


def _line(r: dict) -> str:
    if "ms" not in r:
        return f"{r['impl']:>10} M={r['M']:<4} N=K={r['N']}: WRONG, max rel err {r['max_rel_err']:.2e}"
    return (f"{r['impl']:>10} M={r['M']:<4} N=K={r['N']}: {r['ms'] * 1e3:8.1f} us, roofline "
            f"{r['roofline_ms'] * 1e3:7.1f} us, err {r['max_rel_err']:.1e}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "triton_gpu.json"))
    args = parser.parse_args(argv)
    env = environment()
    for k, v in env.items():
        print(f"{k}: {v}")
    if not env["cuda_available"]:
        print("error: torch.cuda.is_available() is False: this benchmark needs an NVIDIA GPU and a CUDA "
              "build of torch; nothing was measured", file=sys.stderr)
        return 2
    if env["triton"] is None:
        print("error: triton is not installed (pip install 'triton==3.9.*'); nothing was measured",
              file=sys.stderr)
        return 2
    ref = _load("regc_triton_reference", KERNEL_DIR / "reference.py")
    ker = _load("regc_triton_kernels", KERNEL_DIR / "kernels.py")
    if ker.INTERPRETED:
        print("error: TRITON_INTERPRET is set; unset it to benchmark the GPU", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    results, ok = run(ref, ker)
    out = {"environment": env, "config": {"warmup": WARMUP, "reps": REPS, "group_size": GROUP,
                                          "rel_tol": REL_TOL, "x_dtype": "float16"},
           **results, "wall_s": time.perf_counter() - t0}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {args.out} ({out['wall_s']:.0f} s)")
    if not ok:
        print("error: a kernel disagrees with the torch reference (see max_rel_err)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
