"""One Triton dequant-GEMM kernel for the packed formats of ``reference.py``.

    y[m, n] = sum_k x[m, k] * decode(codes)[n, k] * s[n, k // G]

Each program computes a BLOCK_M x BLOCK_N tile of y. Per K step it loads an x tile and the packed
codes of a BLOCK_K x BLOCK_N weight tile, decodes them in registers (int8: q; int4: both nibbles
of each byte sign-extended as (nib ^ 8) - 8 and interleaved; table: table[code]), casts to x's
dtype and accumulates ``tl.dot`` in fp32 (IEEE fp32 for fp32 x, no TF32). Scales are applied where
they are cheapest (``SCALE``): 0, per channel: the accumulator once at the end; 1, groups that are
whole K blocks: each block's partial product; 2, any other group size: each decoded weight. Edges
of M, N, K are masked, so no shape must be a multiple of a block.

Imports only torch and triton (the GPU benchmark loads this file by path). Whether the kernel runs in
Triton's CPU interpreter is fixed when this module is first imported (``TRITON_INTERPRET=1`` then).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = [
    "FMT_IDS",
    "INTERPRETED",
    "compile_for_gpu",
    "dequant_linear",
    "dequant_matmul_kernel",
    "launch_config",
]

FMT_IDS = {"int8": 0, "int4": 1, "table": 2}
INTERPRETED = bool(triton.knobs.runtime.interpret)


@triton.jit
def dequant_matmul_kernel(
    x_ptr, w_ptr, s_ptr, t_ptr, y_ptr,
    M, N, K, n_groups, group_size,
    stride_xm, stride_wn, stride_ym,
    FMT: tl.constexpr, SCALE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok, n_ok = offs_m < M, offs_n < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_ok = offs_k < K
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :],
                    mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        w_ok = k_ok[:, None] & n_ok[None, :]
        if FMT == 1:  # int4: BLOCK_K/2 bytes, rows 2j (low nibble) and 2j+1 (high) interleaved
            offs_j = k0 // 2 + tl.arange(0, BLOCK_K // 2)
            byte = tl.load(w_ptr + offs_n[None, :] * stride_wn + offs_j[:, None],
                           mask=(offs_j[:, None] < (K + 1) // 2) & n_ok[None, :], other=0).to(tl.int32)
            lo, hi = ((byte & 0xF) ^ 8) - 8, ((byte >> 4) ^ 8) - 8
            w = tl.reshape(tl.permute(tl.join(lo, hi), (0, 2, 1)), (BLOCK_K, BLOCK_N)).to(tl.float32)
        elif FMT == 2:  # 8-bit code through a 256-entry table; masked lanes forced to 0 (table may hold NaN)
            code = tl.load(w_ptr + offs_n[None, :] * stride_wn + offs_k[:, None], mask=w_ok, other=0)
            w = tl.where(w_ok, tl.load(t_ptr + code.to(tl.int32)), 0.0)
        else:  # int8
            w = tl.load(w_ptr + offs_n[None, :] * stride_wn + offs_k[:, None], mask=w_ok, other=0)
            w = w.to(tl.float32)
        if SCALE == 2:
            w = w * tl.load(s_ptr + offs_n[None, :] * n_groups + offs_k[:, None] // group_size,
                            mask=w_ok, other=0.0)
        if SCALE == 1:
            s = tl.load(s_ptr + offs_n * n_groups + k0 // group_size, mask=n_ok, other=0.0)
            acc += tl.dot(x, w.to(x.dtype), input_precision="ieee") * s[None, :]
        else:
            acc = tl.dot(x, w.to(x.dtype), acc, input_precision="ieee")
    if SCALE == 0:
        acc = acc * tl.load(s_ptr + offs_n, mask=n_ok, other=0.0)[None, :]
    tl.store(y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=m_ok[:, None] & n_ok[None, :])


def launch_config(m: int, n: int, k: int, group_size: int) -> dict[str, int]:
    """Block sizes, scale mode and warps: narrow tiles for decode-sized M (more programs per weight),
    64-wide otherwise; never wider than the next power of two of a dim (min 16, what ``tl.dot``
    needs). With groups, BLOCK_K is halved until it divides the group size (SCALE 1) if it can."""
    bm, bn, bk = (16, 32, 128) if m <= 16 else (64, 64, 64)

    def fit(block: int, dim: int) -> int:
        return min(block, max(16, triton.next_power_of_2(dim)))

    bk = fit(bk, k)
    if group_size == 0 or group_size >= k:
        scale = 0
    else:
        while bk > 16 and group_size % bk:
            bk //= 2
        scale = 1 if group_size % bk == 0 else 2
    return {"BLOCK_M": fit(bm, m), "BLOCK_N": fit(bn, n), "BLOCK_K": bk, "SCALE": scale,
            "num_warps": 4, "num_stages": 3}


def dequant_linear(
    x: torch.Tensor, fmt: str, codes: torch.Tensor, scales: torch.Tensor, group_size: int,
    table: torch.Tensor | None = None,
) -> torch.Tensor:
    """Launch the kernel: x [M, K] (unit stride along K), codes as in ``reference.py``, scales float32
    [N, n_groups] contiguous (n_groups == 1: per channel), table float32 [256] for ``fmt='table'``.
    Arguments are not validated here (``ops.py`` does that); returns y [M, N] in x's dtype."""
    m, k = x.shape
    n, n_groups = scales.shape
    y = torch.empty((m, n), dtype=x.dtype, device=x.device)
    cfg = launch_config(m, n, k, group_size)
    grid = (triton.cdiv(m, cfg["BLOCK_M"]), triton.cdiv(n, cfg["BLOCK_N"]))
    dequant_matmul_kernel[grid](
        x, codes, scales, scales if table is None else table, y,
        m, n, k, n_groups, max(group_size, 1),
        x.stride(0), codes.stride(0), y.stride(0),
        FMT=FMT_IDS[fmt], **cfg,
    )
    return y


def compile_for_gpu(
    fmt: str, capability: int, dtype: str = "fp16", m: int = 128, group_size: int = 0
) -> dict:
    """Compile the kernel ahead of time for an NVIDIA GPU of compute ``capability`` (80, 90, ...)
    without one: ``{"ptx": str, "cubin": bytes, "name": str}``. Needs ``TRITON_INTERPRET`` unset at import.
    ``m`` picks the block config (``launch_config``); ``group_size`` > 0 compiles the group-scale path."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    cfg = launch_config(m, 4096, 4096, group_size)
    code = "i8" if fmt == "int8" else "u8"
    signature = {
        "x_ptr": f"*{dtype}", "w_ptr": f"*{code}", "s_ptr": "*fp32", "t_ptr": "*fp32", "y_ptr": f"*{dtype}",
        **{a: "i32" for a in ("M", "N", "K", "n_groups", "group_size")},
        **{a: "i32" for a in ("stride_xm", "stride_wn", "stride_ym")},
        **{c: "constexpr" for c in ("FMT", "SCALE", "BLOCK_M", "BLOCK_N", "BLOCK_K")},
    }
    constexprs = {"FMT": FMT_IDS[fmt], **{c: cfg[c] for c in ("SCALE", "BLOCK_M", "BLOCK_N", "BLOCK_K")}}
    src = ASTSource(dequant_matmul_kernel, signature, constexprs)
    compiled = triton.compile(src, target=GPUTarget("cuda", capability, 32),
                              options={"num_warps": cfg["num_warps"], "num_stages": cfg["num_stages"]})
    return {"ptx": compiled.asm["ptx"], "cubin": compiled.asm["cubin"], "name": compiled.metadata.name}
