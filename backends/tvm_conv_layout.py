"""CPU convs on feature maps up to 32 wide run channels-last (NHWC), where a tuned kernel can vectorize.

A tuned NCHW conv vectorizes along the output row (``x``), the innermost axis of what it writes; on a
map at most 8 wide that is one AVX2 vector (8 floats) or half of one, however many channels there are.
In NHWC the innermost axis is the output channel. So, before legalization, every float conv2d
(NCHW input, OIHW weight that is one of ``main``'s weight parameters, groups 1, static shapes) whose
output is at most ``MAX_NHWC_WIDTH`` wide becomes ``conv2d(x, w, data_layout=NHWC, kernel_layout=OHWI)``,
and TVM's ConvertLayout carries the NHWC layout on through the ops after it (bias adds, ReLU, residual
adds, the next such conv, a mean) until an op needs NCHW again::

    transpose(NCHW -> NHWC) -> [NHWC convs, adds, ReLUs, ...] -> transpose(NHWC -> NCHW) -> ...

So a region of such convs is transposed once in and once out, and each NHWC conv fuses with its bias,
ReLU and residual add into one kernel, as NCHW convs do. The weight transposes (OIHW -> OHWI) and the
bias reshapes read weights only: ``LiftTransformParams`` moves them out of the per-run function.

Measured here (AVX2, 1 thread, tuned, ResNet-style model at 1x3x32x32, ``bench/tvm_tuned.py``):
- two 128-channel 3x3 convs on a 4x4 map, 128 trials, tuner's best per call: NCHW 0.198 ms, NHWC
  0.127 ms; onnxruntime ~0.13 ms;
- the whole model, ratio to onnxruntime: all NCHW 1.75x; a transpose pair around each conv up to 8
  wide (38 kernel calls) 1.48x, timed through a TvmArtifact.run with ~0.25 ms more Python overhead;
- with the layout carried over regions (24 kernel calls), interleaved in one run: convs up to 8 wide
  NHWC 1.18x, up to 16 wide 1.06x, up to 32 wide (all of them) 1.02x.
Maps wider than 32 keep NCHW: not measured, and a row there fills whole vectors. Grouped and depthwise
convs, and GPU builds (dlight schedules them), keep NCHW.
"""

from __future__ import annotations

from typing import Any

__all__ = ["MAX_NHWC_WIDTH", "narrow_convs_channels_last"]

MAX_NHWC_WIDTH = 32


def narrow_convs_channels_last(weights: set[str]) -> Any:
    """A Relax module pass: every eligible conv2d (see the module docstring) whose weight is one of
    ``weights`` runs in NHWC, and the layout spreads to the ops around it (TVM's ConvertLayout with a
    per-call decision), then repeated transposes of one tensor are merged (EliminateCommonSubexpr)."""
    import tvm
    from tvm import relax

    def layout(call: Any) -> dict[str, list[str]]:  # other convs keep NCHW, whatever their input's layout
        nhwc = _narrow_float_conv(call, weights)
        return {"relax.nn.conv2d": ["NHWC", "OHWI"] if nhwc else ["NCHW", "OIHW"]}

    return tvm.transform.Sequential([relax.transform.ConvertLayout({}, layout),
                                     relax.transform.EliminateCommonSubexpr()],
                                    name="regc_narrow_convs_channels_last")


def _narrow_float_conv(call: Any, weights: set[str]) -> bool:
    """Whether ``call`` is an NCHW/OIHW float32 conv2d with groups 1, static shapes, a weight
    parameter from ``weights`` and an output (its inferred type) at most ``MAX_NHWC_WIDTH`` wide."""
    import tvm
    from tvm import relax

    if not (isinstance(call.op, tvm.ir.Op) and call.op.name == "relax.nn.conv2d"):
        return False
    a = call.attrs
    x, w = call.args
    if (int(a.groups) != 1 or a.data_layout != "NCHW" or a.kernel_layout != "OIHW" or a.out_layout != "NCHW"
            or not isinstance(w, relax.Var) or w.name not in weights):
        return False
    types = (x.ty, w.ty, call.ty)
    if any(str(t.dtype) != "float32" or t.shape is None for t in types):
        return False
    if not all(isinstance(d, tvm.tirx.IntImm) for t in types for d in t.shape):
        return False
    return int(call.ty.shape[3]) <= MAX_NHWC_WIDTH
