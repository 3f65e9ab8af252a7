"""Packed weight formats and their plain-torch reference: the ground truth for the Triton kernels.

    W[n, k] = decode(codes)[n, k] * scales[n, k // G]      y = x @ W^T   (fp32 math, output in x's dtype)

Formats (``fmt``), for a weight of N output channels and K input features:

- ``int8``:  codes int8 [N, K], q in [-127, 127]; decode(q) = q.
- ``int4``:  codes uint8 [N, ceil(K/2)], two signed 4-bit values per byte, q[n, 2j] in the low nibble
             and q[n, 2j+1] in the high nibble (a zero nibble pads odd K); decode(q) in [-8, 7].
- ``table``: codes uint8 [N, K] and a float32 table [256]; decode(c) = table[c] (RF8 or any 8-bit format).

``scales`` is float [N] (one per output channel, ``group_size=0``) or float [N, ceil(K/G)] with one
scale per ``group_size`` = G consecutive input features. This module needs only torch (the GPU
benchmark imports it by path, without regc installed); regc's typed errors are used when present.
"""

from __future__ import annotations

import torch

try:
    from regc.errors import ConfigError, InputMismatchError
except ImportError:  # imported by path on a machine without regc: both are ValueErrors in regc too
    ConfigError = InputMismatchError = ValueError

__all__ = [
    "FORMATS",
    "check_weights",
    "dequantize",
    "linear_reference",
    "pack_int4",
    "quantize_int4",
    "quantize_int8",
    "scales_2d",
    "unpack_int4",
]

FORMATS = ("int8", "int4", "table")
_CODE_DTYPES = {"int8": torch.int8, "int4": torch.uint8, "table": torch.uint8}


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """int8 [N, K] with values in [-8, 7] -> uint8 [N, ceil(K/2)]: q[:, 2j] low nibble, q[:, 2j+1] high."""
    if q.dtype != torch.int8 or q.dim() != 2:
        raise InputMismatchError(f"pack_int4 takes a 2-D int8 tensor, got {q.dtype} {tuple(q.shape)}")
    if q.numel() and (int(q.min()) < -8 or int(q.max()) > 7):
        raise InputMismatchError(
            f"pack_int4: values must lie in [-8, 7], got [{int(q.min())}, {int(q.max())}]"
        )
    nib = (q.to(torch.int16) & 0xF).to(torch.uint8)
    if nib.shape[1] % 2:
        nib = torch.nn.functional.pad(nib, (0, 1))
    return nib[:, 0::2] | (nib[:, 1::2] << 4)


def unpack_int4(packed: torch.Tensor, k: int) -> torch.Tensor:
    """uint8 [N, ceil(k/2)] -> int8 [N, k]; the inverse of ``pack_int4``. Sign: (nib ^ 8) - 8."""
    nibs = torch.stack([packed & 0xF, packed >> 4], dim=-1).reshape(packed.shape[0], -1)[:, :k]
    return ((nibs.to(torch.int16) ^ 8) - 8).to(torch.int8)


def scales_2d(scales: torch.Tensor, k: int, group_size: int) -> torch.Tensor:
    """Scales as float32 [N, n_groups] (n_groups = 1 per channel, ceil(k / group_size) per group)."""
    n_groups = 1 if group_size == 0 else -(-k // group_size)
    return scales.reshape(scales.shape[0], n_groups).to(torch.float32).contiguous()


def check_weights(
    fmt: str, k: int, codes: torch.Tensor, scales: torch.Tensor, group_size: int, table: torch.Tensor | None
) -> None:
    """Raise ``ConfigError``/``InputMismatchError`` unless the packed weight fits K input features."""
    if fmt not in FORMATS:
        raise ConfigError(f"unknown weight format '{fmt}'; known: {', '.join(FORMATS)}")
    _check_group_size(group_size)
    width = -(-k // 2) if fmt == "int4" else k
    if codes.dtype != _CODE_DTYPES[fmt] or codes.dim() != 2 or codes.shape[1] != width:
        raise InputMismatchError(
            f"{fmt} codes must be {_CODE_DTYPES[fmt]} [N, {width}] for K={k}, "
            f"got {codes.dtype} {tuple(codes.shape)}"
        )
    n = codes.shape[0]
    n_groups = 1 if group_size == 0 else -(-k // group_size)
    if not scales.is_floating_point() or scales.numel() != n * n_groups or scales.shape[0] != n:
        want = f"[{n}]" if group_size == 0 else f"[{n}, {n_groups}] (group_size {group_size})"
        raise InputMismatchError(f"scales must be float {want}, got {scales.dtype} {tuple(scales.shape)}")
    if (fmt == "table") != (table is not None):
        raise InputMismatchError("a 256-entry table is required for fmt 'table' and only for it")
    if table is not None and (table.shape != (256,) or not table.is_floating_point()):
        raise InputMismatchError(f"table must be float [256], got {table.dtype} {tuple(table.shape)}")


def _check_group_size(group_size: int) -> None:
    if not isinstance(group_size, int) or group_size < 0:
        raise ConfigError(f"group_size must be 0 (per output channel) or a positive int, got {group_size!r}")


def dequantize(
    fmt: str, codes: torch.Tensor, scales: torch.Tensor, k: int, group_size: int = 0,
    table: torch.Tensor | None = None,
) -> torch.Tensor:
    """The float32 weight [N, k]: W[n, j] = decode(codes)[n, j] * scales[n, j // G]."""
    check_weights(fmt, k, codes, scales, group_size, table)
    if fmt == "int4":
        w = unpack_int4(codes, k).to(torch.float32)
    elif fmt == "table":
        w = table.to(torch.float32)[codes.long()]
    else:
        w = codes.to(torch.float32)
    s = scales_2d(scales, k, group_size)
    return w * (s if group_size == 0 else s.repeat_interleave(group_size, dim=1)[:, :k])


def linear_reference(
    x: torch.Tensor, fmt: str, codes: torch.Tensor, scales: torch.Tensor, group_size: int = 0,
    table: torch.Tensor | None = None,
) -> torch.Tensor:
    """y = x @ W^T in float32, returned in x's dtype; x is [..., K]."""
    w = dequantize(fmt, codes, scales, x.shape[-1], group_size, table)
    return (x.to(torch.float32) @ w.T).to(x.dtype)


def _quantize_symmetric(w: torch.Tensor, qmax: int, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Round-to-nearest symmetric quantization: s = max|w| / qmax per channel or group, q = round(w / s)."""
    if w.dim() != 2 or not w.is_floating_point():
        raise InputMismatchError(f"quantize takes a float [N, K] weight, got {w.dtype} {tuple(w.shape)}")
    _check_group_size(group_size)
    n, k = w.shape
    g = k if group_size == 0 else group_size
    padded = torch.nn.functional.pad(w.to(torch.float32), (0, -k % g)).reshape(n, -1, g)
    s = padded.abs().amax(dim=2).clamp_min(torch.finfo(torch.float32).tiny) / qmax
    q = torch.round(padded / s[:, :, None]).clamp(-qmax, qmax).reshape(n, -1)[:, :k].to(torch.int8)
    return q, (s[:, 0] if group_size == 0 else s)


def quantize_int8(w: torch.Tensor, group_size: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """float [N, K] -> (int8 codes [N, K], scales); symmetric, q in [-127, 127]."""
    return _quantize_symmetric(w, 127, group_size)


def quantize_int4(w: torch.Tensor, group_size: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """float [N, K] -> (packed uint8 codes [N, ceil(K/2)], scales); symmetric, q in [-7, 7]."""
    q, s = _quantize_symmetric(w, 7, group_size)
    return pack_int4(q), s
