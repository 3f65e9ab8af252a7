"""Op classes: what passes match on instead of raw ATen op names.

The same layer reaches the graph as different ops by source (torch gives ``aten.linear``, GPT-2's
Conv1D gives ``aten.addmm``, ONNX MatMul gives ``aten.matmul`` with a parameter operand; ReLU6 is
``hardtanh`` or ``clamp``). ``op_class(node)`` folds them into classes, and ``linear_view`` /
``conv_view`` give passes one description of a weighted layer:

    linear:  y = x @ W^T + b    W: (out, in)   ("out_in" layout)
    addmm:   y = b + x @ W      W: (in, out)   ("in_out" layout)
    matmul:  y = x @ W          W: (in, out)   ("in_out"; a following add of a parameter is not folded)
"""

from __future__ import annotations

import dataclasses
import enum

import torch
import torch.fx as fx

__all__ = ["OpClass", "op_class", "LinearView", "ConvView", "linear_view", "conv_view", "conv_transposed",
           "is_param_node"]

aten = torch.ops.aten


class OpClass(enum.Enum):
    LINEAR = "linear-like"
    CONV = "conv-like"
    NORM = "norm-like"
    ATTENTION = "attention"
    EMBEDDING = "embedding"
    ELEMENTWISE = "elementwise"
    POOL = "pool"
    SHAPE = "shape"
    OTHER = "other"


_CLASS_OF: dict[object, OpClass] = {}
for _op in (aten.conv1d.default, aten.conv2d.default, aten.conv3d.default, aten.convolution.default,
            aten.conv_transpose1d.default, aten.conv_transpose2d.input, aten.conv_transpose3d.input):
    _CLASS_OF[_op] = OpClass.CONV
for _op in (aten.batch_norm.default, aten._native_batch_norm_legit_no_training.default,
            aten.layer_norm.default, aten.group_norm.default, aten.instance_norm.default,
            aten.rms_norm.default):
    _CLASS_OF[_op] = OpClass.NORM
_CLASS_OF[aten.scaled_dot_product_attention.default] = OpClass.ATTENTION
_CLASS_OF[aten.embedding.default] = OpClass.EMBEDDING
for _op in (aten.max_pool2d.default, aten.avg_pool2d.default, aten.adaptive_avg_pool2d.default,
            aten.max_pool1d.default, aten.avg_pool1d.default, aten.mean.dim, aten.max_pool3d.default):
    _CLASS_OF[_op] = OpClass.POOL
for _op in (aten.view.default, aten.reshape.default, aten.flatten.using_ints, aten.permute.default,
            aten.transpose.int, aten.t.default, aten.unsqueeze.default, aten.squeeze.dim,
            aten.squeeze.dims, aten.cat.default, aten.split.Tensor, aten.split_with_sizes.default,
            aten.slice.Tensor, aten.select.int, aten.expand.default, aten.contiguous.default,
            aten.clone.default, aten.chunk.default, aten.unflatten.int):
    _CLASS_OF[_op] = OpClass.SHAPE
for _op in (aten.relu.default, aten.relu_.default, aten.gelu.default, aten.silu.default,
            aten.sigmoid.default, aten.tanh.default, aten.hardtanh.default, aten.clamp.default,
            aten.hardswish.default, aten.hardsigmoid.default, aten.add.Tensor, aten.sub.Tensor,
            aten.mul.Tensor, aten.div.Tensor, aten.add.Scalar, aten.mul.Scalar, aten.neg.default,
            aten.exp.default, aten.sqrt.default, aten.rsqrt.default, aten.pow.Tensor_Scalar,
            aten.leaky_relu.default, aten.elu.default, aten.softmax.int, aten._softmax.default,
            aten.dropout.default, aten.erf.default):
    _CLASS_OF[_op] = OpClass.ELEMENTWISE

_LINEAR_OPS = (aten.linear.default, aten.addmm.default, aten.mm.default, aten.matmul.default)


def is_param_node(node: object, gm: fx.GraphModule) -> bool:
    """True for a ``get_attr`` node that reads a floating-point ``nn.Parameter`` of ``gm``."""
    if not isinstance(node, fx.Node) or node.op != "get_attr":
        return False
    obj: object = gm
    for part in str(node.target).split("."):
        obj = getattr(obj, part, None)
    return isinstance(obj, torch.nn.Parameter) and obj.is_floating_point()


@dataclasses.dataclass(frozen=True)
class LinearView:
    """A linear-like node: ``input`` times weight ``weight`` (attribute target) plus optional bias."""

    node: fx.Node
    input: fx.Node
    weight: str
    layout: str  # "out_in" (aten.linear) or "in_out" (addmm / mm / matmul)
    bias: str | None


@dataclasses.dataclass(frozen=True)
class ConvView:
    node: fx.Node
    input: fx.Node
    weight: str
    bias: str | None
    transposed: bool


def linear_view(node: fx.Node, gm: fx.GraphModule) -> LinearView | None:
    """Describe ``node`` as a linear layer with a parameter weight, or None."""
    if node.op != "call_function" or node.target not in _LINEAR_OPS:
        return None
    a = node.args
    if node.target is aten.linear.default:
        bias = a[2] if len(a) > 2 else None
        if is_param_node(a[1], gm) and (bias is None or is_param_node(bias, gm)):
            return LinearView(node, a[0], a[1].target, "out_in", bias.target if bias is not None else None)
        return None
    if node.target is aten.addmm.default:
        if node.kwargs or not (is_param_node(a[2], gm) and is_param_node(a[0], gm)):
            return None
        return LinearView(node, a[1], a[2].target, "in_out", a[0].target)
    if is_param_node(a[1], gm) and not is_param_node(a[0], gm) and _param_ndim(a[1], gm) == 2:
        return LinearView(node, a[0], a[1].target, "in_out", None)
    return None


def conv_view(node: fx.Node, gm: fx.GraphModule) -> ConvView | None:
    if node.op != "call_function" or _CLASS_OF.get(node.target) is not OpClass.CONV:
        return None
    a = node.args
    bias = a[2] if len(a) > 2 else None
    if not is_param_node(a[1], gm) or (bias is not None and not is_param_node(bias, gm)):
        return None
    return ConvView(node, a[0], a[1].target, bias.target if bias is not None else None, conv_transposed(node))


def conv_transposed(node: fx.Node) -> bool:
    """True for a conv-like node that is a transposed convolution (by op, or ``convolution``'s flag)."""
    return "transpose" in str(node.target) or (node.target is aten.convolution.default and bool(node.args[6]))


def op_class(node: fx.Node, gm: fx.GraphModule | None = None) -> OpClass:
    """The class of a ``call_function`` node (OTHER for placeholders, attributes and unknown ops)."""
    if node.op != "call_function":
        return OpClass.OTHER
    if node.target in _LINEAR_OPS:
        if gm is None or linear_view(node, gm) is not None:
            return OpClass.LINEAR
        return OpClass.OTHER
    return _CLASS_OF.get(node.target, OpClass.OTHER)


def _param_ndim(node: fx.Node, gm: fx.GraphModule) -> int:
    obj: object = gm
    for part in str(node.target).split("."):
        obj = getattr(obj, part)
    return obj.dim()  # type: ignore[union-attr]
