"""CPU convs on narrow feature maps run channels-last (NHWC), where a tuned kernel can vectorize.

A tuned NCHW conv vectorizes along the output row (``x``), the innermost axis of what it writes; on a
map at most 8 wide that is one AVX2 vector (8 floats) or half of one, however many channels there are.
In NHWC the innermost axis is the output channel. So, before legalization, every float conv2d
(NCHW input, OIHW weight that is one of ``main``'s weight parameters, groups 1, static shapes) whose
output is at most ``MAX_NHWC_WIDTH`` wide becomes::

    y = transpose(conv2d_NHWC(transpose(x, NCHW -> NHWC), transpose(w, OIHW -> OHWI)), NHWC -> NCHW)

The weight's transpose reads weights only, so ``LiftTransformParams`` moves it out of the per-run
function; the two activation transposes are small (the maps are narrow) and fuse with neighbouring
elementwise ops. Measured here (AVX2, 1 thread, two 128-channel 3x3 convs on a 4x4 map, 128 trials,
tuner's best per call): NCHW 0.198 ms, NHWC 0.127 ms; onnxruntime ~0.13 ms. On the whole tuned
ResNet-style model (bench/tvm_tuned.py) the rewrite took the ratio to onnxruntime from 1.75x to 1.48x.
Wide maps stay NCHW (an all-NHWC ResNet-style build measured slower). GPU builds keep NCHW (dlight
schedules them).
"""

from __future__ import annotations

from typing import Any

__all__ = ["MAX_NHWC_WIDTH", "narrow_convs_channels_last"]

MAX_NHWC_WIDTH = 8


def narrow_convs_channels_last(weights: set[str]) -> Any:
    """A Relax module pass: every eligible conv2d (see the module docstring) whose weight is one of
    ``weights`` runs in NHWC between two transposes."""
    import tvm
    from tvm import relax
    from tvm.relax.expr_functor import PyExprMutator, mutator

    @mutator
    class ChannelsLast(PyExprMutator):
        def visit_call_(self, call: Any) -> Any:
            narrow = _narrow_float_conv(call, weights)  # the input call is typed: its output shape
            call = super().visit_call_(call)
            if not narrow:
                return call
            a = call.attrs
            x, w = call.args
            nhwc = self.builder_.emit(relax.op.permute_dims(x, [0, 2, 3, 1]))
            ohwi = self.builder_.emit(relax.op.permute_dims(w, [0, 2, 3, 1]))
            y = self.builder_.emit(relax.op.nn.conv2d(
                nhwc, ohwi, strides=a.strides, padding=a.padding, dilation=a.dilation, groups=1,
                data_layout="NHWC", kernel_layout="OHWI", out_layout="NHWC", out_dtype="float32"))
            return relax.op.permute_dims(y, [0, 3, 1, 2])

    @tvm.transform.module_pass(opt_level=0, name="regc_narrow_convs_channels_last")
    def rewrite(mod: Any, _ctx: Any) -> Any:
        channels_last = ChannelsLast(mod)
        for gv, func in mod.functions.items():
            if isinstance(func, relax.Function):
                channels_last.builder_.update_func(gv, channels_last.visit_expr(func))
        return channels_last.builder_.get()

    return rewrite


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
