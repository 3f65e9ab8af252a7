"""``torch.ops.regc.{int8,int4,table}_linear``: y = x @ (decode(codes) * s)^T as torch custom ops.

A compressed model calls them like ``torch.ops.regc.int4_linear(x, packed, scales, 128)``; they
capture with ``torch.export`` (the fake implementation gives y's shape [..., N] and x's dtype). They
run the Triton kernel on CUDA tensors and on CPU tensors when the kernel module was imported with
``TRITON_INTERPRET=1``; otherwise ``reference.linear_reference`` (plain torch, fp32 math).
Formats, shapes and the group-scale layout are described in ``reference.py``.
"""

from __future__ import annotations

import os

import torch

from regc.backends.triton.reference import check_weights, linear_reference, scales_2d
from regc.errors import InputMismatchError

__all__ = ["int4_linear", "int8_linear", "table_linear"]


def _triton_runs(x: torch.Tensor) -> bool:
    """CUDA tensors always take the kernel; CPU tensors only under Triton's interpreter."""
    if x.is_cuda:
        return True
    if not os.environ.get("TRITON_INTERPRET"):
        return False  # no triton import on the plain CPU path
    from regc.backends.triton import kernels

    return kernels.INTERPRETED


def _linear(
    x: torch.Tensor, fmt: str, codes: torch.Tensor, scales: torch.Tensor, group_size: int,
    table: torch.Tensor | None,
) -> torch.Tensor:
    if x.dim() == 0 or not x.is_floating_point():
        raise InputMismatchError(
            f"{fmt}_linear: x must be a float tensor [..., K], got {x.dtype} {tuple(x.shape)}"
        )
    k = x.shape[-1]
    check_weights(fmt, k, codes, scales, group_size, table)
    if not _triton_runs(x):
        return linear_reference(x, fmt, codes, scales, group_size, table)
    from regc.backends.triton.kernels import dequant_linear

    y = dequant_linear(
        x.reshape(-1, k).contiguous(), fmt, codes.contiguous(), scales_2d(scales, k, group_size), group_size,
        None if table is None else table.to(torch.float32).contiguous(),
    )
    return y.reshape(*x.shape[:-1], codes.shape[0])


@torch.library.custom_op("regc::int8_linear", mutates_args=())
def int8_linear(x: torch.Tensor, q: torch.Tensor, scales: torch.Tensor, group_size: int = 0) -> torch.Tensor:
    """y = x @ (q * s)^T; q int8 [N, K], scales [N] (group_size 0) or [N, ceil(K/G)]."""
    return _linear(x, "int8", q, scales, group_size, None)


@torch.library.custom_op("regc::int4_linear", mutates_args=())
def int4_linear(
    x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, group_size: int = 0
) -> torch.Tensor:
    """y = x @ (unpack_int4(packed) * s)^T; packed uint8 [N, ceil(K/2)] (``reference.pack_int4``)."""
    return _linear(x, "int4", packed, scales, group_size, None)


@torch.library.custom_op("regc::table_linear", mutates_args=())
def table_linear(
    x: torch.Tensor, codes: torch.Tensor, table: torch.Tensor, scales: torch.Tensor, group_size: int = 0
) -> torch.Tensor:
    """y = x @ (table[codes] * s)^T; codes uint8 [N, K], table float [256] (e.g. RF8's 256 values)."""
    return _linear(x, "table", codes, scales, group_size, table)


def _fake_linear(x: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    return x.new_empty((*x.shape[:-1], codes.shape[0]))


int8_linear.register_fake(lambda x, q, scales, group_size=0: _fake_linear(x, q))
int4_linear.register_fake(lambda x, packed, scales, group_size=0: _fake_linear(x, packed))
table_linear.register_fake(lambda x, codes, table, scales, group_size=0: _fake_linear(x, codes))
