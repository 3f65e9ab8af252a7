"""rf8: store weights in RF8, the 8-bit residual float (Wu et al., "Generalized Gaussian Priors for
Optimized LLMs", arXiv 2506.00486 v3), one uint8 code per weight plus one exponent bias per tensor.

Each weight becomes the sum of its two leading signed powers of two, w_hat = 2^e1 (1 + s 2^-delta) with
delta in 1..4 (format and value set in ``regc.passes._rf8_format``); 16 binades are kept per tensor,
placed by the bias: at max|w| (``bias=max``) or at a quantile of the generalized Gaussian fitted to
the tensor's bulk (|w| up to its 99.9th percentile; ``bias=gg``; moment-ratio fit of
``regc.passes._gg_math``), which saturates rare outliers to widen the small end. The graph reads
``regc::rf8_decode(codes, bias)``; the ONNX export emits the custom-domain op ``regc.RF8Decode`` with a
function body of standard ops (bit fields, an 8-entry mantissa table, 2^e), so onnxruntime runs it
(and folds it at load: weights stay 1 byte on disk).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Literal

import onnx
import onnxscript
import torch
from onnx import TensorProto, helper
from onnx.defs import OpSchema

from regc.errors import ConfigError
from regc.ir import Model
from regc.opclass import conv_view, is_param_node, linear_view
from regc.passes._gg_math import estimate
from regc.passes._qdq import free_name
from regc.passes._rf8_format import MANTISSAS, ZERO_CODE, bias_for, decode, encode, gg_top
from regc.plugins import register_onnx_translation
from regc.registry import PassContext, PassResult, Phase, register_pass

__all__ = ["Rf8Config", "rf8", "rf8_decode", "rf8_encode"]

aten = torch.ops.aten


@torch.library.custom_op("regc::rf8_decode", mutates_args=())
def rf8_decode(codes: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """float32 weights from uint8 RF8 codes and a 0-d float exponent bias."""
    return decode(codes, bias)


@rf8_decode.register_fake
def _(codes: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    return torch.empty(codes.shape, dtype=torch.float32, device=codes.device)


def _function() -> onnx.FunctionProto:
    """RF8Decode(codes: uint8, bias: float) -> float: the reference decode in standard ONNX ops."""
    def const(name, value, dtype):
        return helper.make_node("Constant", [], [name], value=helper.make_tensor(name, dtype, [], [value]))

    nodes = [
        const("three", 3, TensorProto.UINT8), const("seven", 7, TensorProto.UINT8),
        const("fifteen", 15, TensorProto.UINT8), const("zero_code", ZERO_CODE, TensorProto.UINT8),
        const("two", 2.0, TensorProto.FLOAT), const("zero", 0.0, TensorProto.FLOAT),
        helper.make_node("Constant", [], ["mant"], value=helper.make_tensor("mant", TensorProto.FLOAT, [8],
                                                                          list(MANTISSAS))),
        helper.make_node("BitwiseAnd", ["codes", "seven"], ["r"]),
        helper.make_node("BitShift", ["codes", "three"], ["shifted"], direction="RIGHT"),
        helper.make_node("BitwiseAnd", ["shifted", "fifteen"], ["e"]),
        helper.make_node("BitShift", ["codes", "seven"], ["s"], direction="RIGHT"),
        helper.make_node("Cast", ["r"], ["r64"], to=TensorProto.INT64),
        helper.make_node("Gather", ["mant", "r64"], ["m"]),
        helper.make_node("Cast", ["e"], ["ef"], to=TensorProto.FLOAT),
        helper.make_node("Add", ["ef", "bias"], ["exp"]),
        helper.make_node("Pow", ["two", "exp"], ["p"]),
        helper.make_node("Mul", ["m", "p"], ["mag"]),
        helper.make_node("Cast", ["s"], ["sb"], to=TensorProto.BOOL),
        helper.make_node("Neg", ["mag"], ["neg"]),
        helper.make_node("Where", ["sb", "neg", "mag"], ["signed"]),
        helper.make_node("Equal", ["codes", "zero_code"], ["is_zero"]),
        helper.make_node("Where", ["is_zero", "zero", "signed"], ["y"]),
    ]
    return helper.make_function("regc", "RF8Decode", ["codes", "bias"], ["y"], nodes,
                                [helper.make_opsetid("", 18)])


_SCHEMA = OpSchema("RF8Decode", "regc", 1, inputs=[OpSchema.FormalParameter("codes", "tensor(uint8)"),
                                                   OpSchema.FormalParameter("bias", "tensor(float)")],
                   outputs=[OpSchema.FormalParameter("y", "tensor(float)")])
_RF8_OP = onnxscript.values.Op(onnxscript.values.Opset("regc", 1), "RF8Decode", _SCHEMA)


def _rf8_decode_onnx(codes, bias):
    return _RF8_OP(codes, bias)


register_onnx_translation(torch.ops.regc.rf8_decode.default, _rf8_decode_onnx, (_function(),))


@dataclasses.dataclass(frozen=True)
class Rf8Config:
    """Options for `rf8`.

    Attributes:
        bias: where each tensor's 16 binades sit: max (the top binade holds max|w|) or gg (the top
            binade holds the fitted generalized-Gaussian quantile exceeded with probability 1/(20 n);
            rarer outliers saturate at 1.5 * 2^top).
        embeddings: also encode embedding tables (else only conv/linear weights).
    """

    bias: Literal["max", "gg"] = "max"
    embeddings: bool = True

    def __post_init__(self):
        if self.bias not in ("max", "gg"):
            raise ConfigError(f"rf8.bias must be one of ['max', 'gg'], got {self.bias!r}")


@register_pass("rf8", Rf8Config, phase=Phase.QUANT, exact=False)
def rf8(model: Model, config: Rf8Config, ctx: PassContext) -> PassResult:
    """Encode conv/linear (and embedding) weights as RF8 codes decoded in the graph (weight-only)."""
    gm, g = model.gm, model.gm.graph
    layers, bytes_before = {}, model.weight_bytes()
    for n in list(model.call_nodes()):
        lv, cv = linear_view(n, gm), conv_view(n, gm)
        if lv is not None:
            target = lv.weight
        elif cv is not None:
            target = cv.weight
        elif config.embeddings and n.target is aten.embedding.default and is_param_node(n.args[0], gm):
            target = n.args[0].target
        else:
            continue
        w_node = next(a for a in n.args if isinstance(a, torch.fx.Node) and a.op == "get_attr"
                      and a.target == target)
        w = model.get_tensor(target).detach()
        codes, bias, fit = rf8_encode(w, config.bias)
        w_hat = decode(codes, bias)
        name = model.user_name(target)
        attrs = [_store(model, name, "rf8", codes),
                 _store(model, name, "rf8_bias", torch.tensor(float(bias)))]
        with g.inserting_before(n):
            dec = g.call_function(torch.ops.regc.rf8_decode.default, tuple(g.get_attr(a) for a in attrs))
        n.replace_input_with(w_node, dec)
        rel = ((w_hat - w).pow(2).mean() / w.pow(2).mean().clamp(min=1e-30)).sqrt().item()
        layers[name] = {"format": "rf8", "bits": 8, "granularity": "per_tensor exponent bias", "bias": bias,
                        "gg_nu": fit["nu"], "relative_rmse": rel,
                        "flushed_to_zero": int(((codes == ZERO_CODE) & (w != 0)).sum()),
                        "saturated": int((w.abs() > 1.5 * 2.0 ** (bias + 15)).sum())}
    if layers:
        model.recompile()
    stats = {"bias": config.bias, "layers": layers,
             "weight_bytes": {"before": bytes_before, "after": model.weight_bytes()}}
    return PassResult(model, bool(layers), stats)


def rf8_encode(w: torch.Tensor, bias_mode: str) -> tuple[torch.Tensor, int, dict]:
    """(uint8 codes, exponent bias, GG fit of the bulk) for ``w`` with the bias chosen by ``bias_mode``."""
    fit = estimate(_bulk(w))
    top = gg_top(w, fit) if bias_mode == "gg" and math.isfinite(fit["nu"]) else float(w.abs().max())
    bias = bias_for(w, top)
    return encode(w, bias), bias, fit


def _bulk(w: torch.Tensor) -> torch.Tensor:
    """The weights up to the 99.9th percentile of |w|: the moment-ratio fit is not robust to outliers."""
    a = w.reshape(-1).abs().float()
    k = max(1, int(0.999 * a.numel()))
    return w.reshape(-1)[a <= a.kthvalue(k).values]


def _store(model: Model, name: str, kind: str, t: torch.Tensor) -> str:
    attr = free_name(model, f"{name}_{kind}")
    model.set_tensor(attr, t, trainable=False)
    model.param_names[attr] = f"{name}:{kind}"
    return attr
