"""quant: post-training int8 quantization in QDQ form that onnxruntime runs as int8 kernels.

Weights: symmetric int-b, per output channel (or tensor): s = max|w| / (2^(b-1) - 1), w_hat = s round(w/s),
so for a linear layer |y_j - y_hat_j| <= s_j / 2 * ||x||_1. Activations (inputs of linear/conv layers):
uint8 affine, static (range from calibration: min/max, percentile, or MSE-optimal clipping) or dynamic
(range of each tensor at run time). Linears after a LayerNorm are first smoothed (SmoothQuant, Xiao et
al., ICML 2023; exact, folded into the LayerNorm). Embedding tables are quantized weight-only, per row.
Placement follows onnxruntime's QDQ fusions (Jacob et al., CVPR 2018 for the integer arithmetic):
a linear is emitted as MatMulIntegerToFloat itself (uint8 codes of its input from one Q shared by
all readers, int8 weight codes, the bias added in the kernel); a conv as Q/DQ on the activation and
DQ on the weight, which onnxruntime fuses into QLinearConv. Every layer is then measured: its output
SQNR with only that layer quantized (the sensitivity table in the stats), optionally its float/int8
time in onnxruntime (layers where int8 is slower stay float), and ``max_accuracy_drop`` gives the
most sensitive linears full 8-bit weights (uint8 codes, exact u8u8 kernels, where reduce_range holds
the rest below 8 bits), then keeps the most sensitive layers in float, until the model-level drop on
the calibration data (accuracy with labels, 1 - mean output cosine without) fits.
On x86 CPUs without VNNI onnxruntime's uint8 x int8 kernels saturate on full-range 8-bit codes; there
the integer linears get pair-limited 8-bit codes (exact, see _qdq: +3.6 to +4 dB weight SQNR over the
7-bit codes the other layers keep) and run in the same fast kernels.
4-bit storage (groups of G along a row, two codes per byte, see _qdq): weight-only linears run as
onnxruntime's MatMulNBits, embedding tables (asymmetric, w_hat = s_g u + m_g) decode only gathered rows.
A rank-2 linear with a static input range gets an int32 bias so onnxruntime runs it as QGemm.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Literal

import torch

from regc.errors import ConfigError
from regc.ir import Model
from regc.passes._qdq import act_qparams
from regc.passes._quant_calib import calib_batches, choose_range, observe
from regc.passes._quant_layers import (
    QLayer,
    chain_source,
    conv_output,
    find_layers,
    integer_linear,
    rewrite,
    simulate,
)
from regc.passes._quant_smooth import smooth, smooth_candidates
from regc.passes._quant_speed import cpu_has_vnni, time_layer
from regc.registry import PassContext, PassResult, Phase, check_choice, check_range, register_pass
from regc.verify import refresh_meta

__all__ = ["QuantConfig", "quant", "output_drop"]

_VOCAB_ROWS = 4096  # embedding_bits=4 applies to tables with at least this many rows


@dataclasses.dataclass(frozen=True)
class QuantConfig:
    """Options for `quant`.

    Attributes:
        bits: weight bit width in [2, 8] of conv/linear layers; activations are always 8-bit. Codes
            are stored in int8, or packed two per byte when bits <= 4 and acts=none: a linear whose
            input size is a multiple of group_size then has one scale per group and runs as
            MatMulNBits, other layers keep per-channel scales and are decoded by the graph.
        embedding_bits: 8 (symmetric, one scale per row) or 4 (asymmetric per group of group_size,
            float16 scale and minimum, packed) for vocabulary tables (>= 4096 rows: nearly all the
            bytes, one row per token); small tables (positions, token types, added to every token)
            and tables whose width is not a multiple of group_size stay 8-bit.
        group_size: 4-bit group length along a row, a power of two >= 16.
        weights: per_channel (one scale per output channel, the safe default) or per_tensor.
        acts: static (calibrated ranges, needs data), dynamic (range of each tensor at run time) or
            none (weight-only).
        calib: how a static range is chosen: minmax, percentile or mse.
        percentile: the upper percentile kept by calib=percentile, in (50, 100].
        smooth: SmoothQuant strength alpha in [0, 1] for linears that read a LayerNorm (folded into
            it); 0 turns it off.
        embeddings: also quantize embedding (Gather) tables, weight-only with one scale per row.
        calib_samples: calibration samples for activation ranges and the fallback check, >= 1.
        sweep_samples: samples for the per-layer sensitivity sweep (one model run per layer), >= 1.
        max_accuracy_drop: until the drop on the calibration data is at most this (accuracy points
            as a fraction with labels, else 1 - mean output cosine), in [0, 1], give the most sensitive
            integer linears full 8-bit weights (when reduce_range holds the others to 7 bits), then keep
            the most sensitive conv/linear layers in float; none = no fallback.
        speed_check: time each conv/linear alone in onnxruntime, float vs int8, and keep it float
            where int8 is slower.
        speed_batch: batch size the speed check times at when the batch dim is dynamic (0: the
            example inputs' batch).
        reduce_range: keep weight codes exact on x86 CPUs without VNNI (whose uint8 x int8 kernels add
            pairs of products in saturating int16): on (7-bit codes, [-63, 63]), pairs (integer
            linears: 8-bit codes with every same-sign pair summing to at most 128 in magnitude; other
            layers 7-bit), off (full 8-bit), or auto (pairs unless this CPU has VNNI/AMX, then off).
    """

    bits: int = 8
    embedding_bits: int = 8
    group_size: int = 32
    weights: Literal["per_channel", "per_tensor"] = "per_channel"
    acts: Literal["static", "dynamic", "none"] = "static"
    calib: Literal["minmax", "percentile", "mse"] = "mse"
    percentile: float = 99.99
    smooth: float = 0.5
    embeddings: bool = True
    calib_samples: int = 64
    sweep_samples: int = 8
    max_accuracy_drop: float | None = None
    speed_check: bool = True
    speed_batch: int = 0
    reduce_range: Literal["auto", "on", "pairs", "off"] = "auto"

    def __post_init__(self):
        check_range("quant", "bits", self.bits, 2, 8)
        if not isinstance(self.bits, int):
            raise ConfigError(f"quant.bits must be an integer in [2, 8], got {self.bits!r}")
        check_choice("quant", "embedding_bits", self.embedding_bits, (4, 8))
        if self.group_size < 16 or self.group_size & (self.group_size - 1):
            raise ConfigError(f"quant.group_size must be a power of two >= 16 (onnxruntime's MatMulNBits "
                              f"block sizes), got {self.group_size!r}")
        check_range("quant", "speed_batch", self.speed_batch, 0, math.inf)
        check_choice("quant", "weights", self.weights, ("per_channel", "per_tensor"))
        check_choice("quant", "acts", self.acts, ("static", "dynamic", "none"))
        check_choice("quant", "calib", self.calib, ("minmax", "percentile", "mse"))
        check_choice("quant", "reduce_range", self.reduce_range, ("auto", "on", "pairs", "off"))
        check_range("quant", "percentile", self.percentile, 50, 100, lo_open=True)
        check_range("quant", "smooth", self.smooth, 0, 1)
        check_range("quant", "calib_samples", self.calib_samples, 1, math.inf)
        check_range("quant", "sweep_samples", self.sweep_samples, 1, math.inf)
        if self.max_accuracy_drop is not None:
            check_range("quant", "max_accuracy_drop", self.max_accuracy_drop, 0, 1)


@register_pass("quant", QuantConfig, phase=Phase.QUANT, exact=False)
def quant(model: Model, config: QuantConfig, ctx: PassContext) -> PassResult:
    """Post-training int8: per-channel weights, calibrated or dynamic uint8 activations, QDQ placed
    for onnxruntime's int8 kernels, a per-layer sensitivity table and accuracy-driven fallback."""
    if config.acts == "static":
        ctx.require_data("quant")
    refresh_meta(model)
    layers, skipped = find_layers(model)
    if not config.embeddings:
        skipped.update({q.name: "embeddings=false" for q in layers if q.kind == "embedding"})
        layers = [q for q in layers if q.kind != "embedding"]
    if not layers:
        return PassResult(model, False, {"layers": {}, "unsupported": skipped})
    bytes_before = model.weight_bytes()
    static_batch = 0 not in model.dynamic_dims(model.input_names[0])
    batches, labels = _batches(model, ctx, config, static_batch)
    smoothed = 0
    if config.smooth > 0 and config.acts != "none":
        groups = smooth_candidates(model, layers)
        if groups:
            smoothed = smooth(model, groups, observe(model.gm, groups, batches, ctx.seed), config.smooth)
    mode = config.reduce_range if config.reduce_range != "auto" else "off" if cpu_has_vnni() else "pairs"
    wbits = min(config.bits, 7) if mode != "off" else config.bits
    per_channel = config.weights == "per_channel"
    pairs = mode == "pairs" and config.bits == 8
    _choose_acts(model, layers, batches, config, ctx.seed)  # first: integer_linear needs the activations

    def narrow(q: QLayer, group: int | None = None) -> None:  # a layer's codes below full 8 bits
        q.quantize(model, wbits, per_channel, group, pairs=pairs and integer_linear(q))

    for q in layers:
        shape = model.get_tensor(q.weight).shape
        fits = shape[1 if q.kind == "embedding" or q.w_axis == 0 else 0] % config.group_size == 0
        if q.kind == "embedding":
            four = config.embedding_bits == 4 and fits and shape[0] >= _VOCAB_ROWS
            q.quantize(model, 4 if four else 8, per_channel, config.group_size if four else None)
            q.packed = four
        else:
            q.packed = config.bits <= 4 and config.acts == "none"
            narrow(q, config.group_size if q.packed and q.kind == "linear" and fits else None)
    if config.speed_check:
        batch = config.speed_batch if config.speed_batch and not static_batch else None
        timings = {q.name: time_layer(q, batch) for q in layers if q.act is not None}
        for q in layers:
            t = timings.get(q.name)
            if t is not None and t[1] >= t[0]:
                q.reason = f"int8 slower in onnxruntime ({t[1]:.3f} ms vs {t[0]:.3f} ms float)"
    else:
        timings = {}
    sweep = _head(batches, config.sweep_samples, static_batch)
    sweep_ref = simulate(model, [], sweep)
    sqnr = {q.name: _sqnr(sweep_ref, simulate(model, [q], sweep)) for q in layers}
    ref = simulate(model, [], batches)
    active = [q for q in layers if q.reason is None]
    drop = output_drop(ref, simulate(model, active, batches), labels)
    if config.max_accuracy_drop is not None:
        by_sensitivity = sorted((a for a in active if a.kind != "embedding"), key=lambda q: sqnr[q.name])
        if wbits < config.bits:
            drop = _widen(model, by_sensitivity, active, (ref, batches, labels), drop, config, narrow)
        for q in by_sensitivity:
            if drop["drop"] <= config.max_accuracy_drop:
                break
            q.reason = f"kept float for max_accuracy_drop={config.max_accuracy_drop} (sensitive)"
            active = [a for a in active if a.reason is None]
            drop = output_drop(ref, simulate(model, active, batches), labels)
    rewrite(model, active)
    stats = {
        "bits": config.bits, "weight_code_range": 2 ** (wbits - 1) - 1, "reduce_range": mode,
        "weights": config.weights,
        "acts": config.acts, "calib": config.calib,
        "layers": {q.name: _layer_stats(q, config, sqnr[q.name], timings.get(q.name)) for q in layers},
        "quantized": len(active),
        "float": {q.name: q.reason for q in layers if q.reason is not None},
        "unsupported": skipped,
        "smoothquant": {"alpha": config.smooth, "layernorms": smoothed},
        "weight_bytes": {"before": bytes_before, "after": model.weight_bytes()},
        "calibration": {"samples": sum(b[0].shape[0] for b in batches), **drop},
    }
    return PassResult(model, bool(active), stats)


def output_drop(ref: list, out: list, labels: torch.Tensor | None) -> dict:
    """Quality loss of ``out`` against the float ``ref`` (first output of each batch): accuracy drop
    with labels, else 1 - mean cosine of per-sample outputs."""
    a = torch.cat([o[0] for o in ref]).float()
    b = torch.cat([o[0] for o in out]).float()
    if labels is not None:
        acc_f = (a.argmax(-1) == labels).float().mean().item()
        acc_q = (b.argmax(-1) == labels).float().mean().item()
        return {"metric": "accuracy", "float": acc_f, "quantized": acc_q, "drop": acc_f - acc_q}
    cos = torch.nn.functional.cosine_similarity(a.reshape(a.shape[0], -1), b.reshape(b.shape[0], -1), dim=1)
    return {"metric": "cosine", "quantized": cos.mean().item(), "min": cos.min().item(),
            "drop": 1.0 - cos.mean().item()}


def _widen(model: Model, order: list[QLayer], active: list[QLayer], calib: tuple, drop: dict,
           config: QuantConfig, narrow) -> dict:
    """Give the integer linears of ``order`` full 8-bit weight codes (stored uint8, ``QLayer.wide``), in
    that order, until the drop of ``active`` on ``calib`` = (float outputs, batches, labels) fits, then
    return the widest ones (last widened first) to their narrower codes (``narrow(q)``) where the drop
    still fits; return the drop. Without VNNI int8 codes are 7-bit or pair-limited; the u8u8 kernels
    onnxruntime runs for uint8 codes are exact and far faster than float, but slower than u8s8."""
    ref, batches, labels = calib
    per_channel = config.weights == "per_channel"
    widened = []
    for q in order:
        if drop["drop"] <= config.max_accuracy_drop:
            break
        if integer_linear(q):
            q.quantize(model, 8, per_channel, wide=True)
            widened.append(q)
            drop = output_drop(ref, simulate(model, active, batches), labels)
    if drop["drop"] > config.max_accuracy_drop:
        return drop
    for q in reversed(widened[:-1]):  # the last one was needed
        narrow(q)
        narrowed = output_drop(ref, simulate(model, active, batches), labels)
        if narrowed["drop"] <= config.max_accuracy_drop:
            drop = narrowed
        else:
            q.quantize(model, 8, per_channel, wide=True)
    return drop


def _batches(model: Model, ctx: PassContext, config: QuantConfig, static: bool):
    bs = model.example_inputs[0].shape[0] if static else min(32, config.calib_samples)
    return calib_batches(ctx.data, model.example_inputs, bs, config.calib_samples, static)


def _head(batches: list[tuple], n: int, static: bool) -> list[tuple]:
    """The first ``n`` samples (whole batches when the batch dim is static)."""
    out = []
    for xs in batches:
        if n <= 0:
            break
        out.append(xs if static else tuple(x[:n] for x in xs))
        n -= xs[0].shape[0]
    return out


def _choose_acts(model: Model, layers: list[QLayer], batches, config: QuantConfig, seed: int) -> None:
    """Activation quantizers; static convs also quantize their output, and a layer fed by one through
    range-keeping ops reuses that quantizer (one uint8 chain in onnxruntime)."""
    if config.acts == "none":
        return
    static = [q for q in layers if q.x is not None and (config.acts == "static" or q.kind == "conv")]
    convs = [q for q in static if q.kind == "conv"]
    for q in convs:
        q.out = conv_output(q)
    stats = observe(model.gm, {q.x for q in static} | {q.out for q in convs}, batches, seed)
    for q in convs:
        if q.out in stats:
            q.out_act = act_qparams(*choose_range(stats[q.out], config.calib, config.percentile))
    outs = {q.out: q.out_act for q in convs if q.out_act is not None}
    for q in layers:
        if q.x is None:
            continue
        src = chain_source(q.x, set(outs)) if q in static else None
        if src is not None:
            q.act = outs[src]
        elif q in static and q.x in stats:
            q.act = act_qparams(*choose_range(stats[q.x], config.calib, config.percentile))
        elif config.acts == "dynamic":
            q.act = "dynamic"


def _sqnr(ref: list, out: list) -> float:
    sig = sum(r.float().pow(2).sum().item() for rs in ref for r in rs)
    err = sum((r.float() - o.float()).pow(2).sum().item()
              for rs, os in zip(ref, out, strict=True) for r, o in zip(rs, os, strict=True))
    return round(10 * math.log10(sig / err), 2) if err > 0 else float("inf")


def _layer_stats(q: QLayer, config: QuantConfig, sqnr: float, timing) -> dict:
    if q.kind == "embedding":
        act = "float (weight-only)"
    elif q.act == "dynamic":
        act = "dynamic uint8 per-tensor"
    elif q.act is not None:
        act = f"static uint8 per-tensor (scale {q.act[0]:.4g}, zero point {q.act[1]})"
    else:
        act = "float"
    if q.group is not None:
        gran = f"group{q.group}_" + ("asymmetric" if q.zero is not None else "symmetric")
    else:
        gran = config.weights if q.kind != "embedding" or config.weights == "per_tensor" else "per_row"
    bits = q.bits if q.kind == "embedding" else config.bits
    out = {"op": q.kind, "format": "float" if q.reason else f"int{bits}" + ("_packed" if q.packed else ""),
           "bits": 32 if q.reason else bits, "granularity": gran, "activation": act,
           "sensitivity_sqnr_db": sqnr if math.isfinite(sqnr) else None}
    if q.wide and not q.reason:
        out["weight_code_range"] = 127  # stored uint8 with zero point 128 (exact u8u8 kernel)
    elif q.pairs and not q.reason:
        out["weight_codes"] = "8-bit, pair-limited (exact u8s8 kernel)"
    if timing is not None:
        out["onnxruntime_ms"] = {"float": round(timing[0], 4), "int8": round(timing[1], 4)}
    if q.reason:
        out["reason"] = q.reason
    return out
