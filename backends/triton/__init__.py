"""Dequant-GEMM kernels in Triton for packed weights, as torch custom ops.

    y = x @ W^T,  W = decode(codes) * scales   (decoded in registers, accumulated in fp32)

Three weight formats share one kernel: int8, int4 (two per byte) and 8-bit codes through a 256-entry
table (RF8 or any custom 8-bit float). Importing this package registers ``torch.ops.regc.int8_linear``,
``int4_linear`` and ``table_linear``; they run the Triton kernel on CUDA tensors (or on CPU under
``TRITON_INTERPRET=1``) and a plain-torch reference otherwise. ``triton`` is imported only on launch.
"""

from regc.backends.triton.ops import int4_linear, int8_linear, table_linear
from regc.backends.triton.reference import (
    dequantize,
    linear_reference,
    pack_int4,
    quantize_int4,
    quantize_int8,
    unpack_int4,
)

__all__ = [
    "dequantize",
    "int4_linear",
    "int8_linear",
    "linear_reference",
    "pack_int4",
    "quantize_int4",
    "quantize_int8",
    "table_linear",
    "unpack_int4",
]
