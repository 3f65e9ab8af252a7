"""Transformer building blocks (opset 22+): Attention, LinearAttention, RMSNormalization,
RotaryEmbedding, Swish, SwiGLU; and the loss ops NegativeLogLikelihoodLoss and SoftmaxCrossEntropyLoss.

Attention (opset 23): softmax(Q K^T * scale + bias) V with Q and K each scaled by sqrt(scale), the
bias built from ``attn_mask`` (bool: -inf where False; float: added), ``is_causal`` (key j visible
from query i iff j <= i + past length) and ``nonpad_kv_seqlen``; rows with no visible key give 0.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from regc.frontend.onnx_import._dtypes import torch_dtype
from regc.frontend.onnx_import._registry import OpCall, norm_axis, rule


@rule("RMSNormalization")
def rms_norm(n: OpCall) -> torch.Tensor:
    """x / sqrt(mean(x^2 over axes [axis, rank)) + eps) * scale."""
    x, scale = n.x(0), n.x(1)
    axis = norm_axis(n.attr("axis", -1), x.dim())
    xf = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
    dims = list(range(axis, x.dim()))
    y = xf * torch.rsqrt(torch.mean(xf * xf, dims, keepdim=True) + n.attr("epsilon", 1e-5))
    return (y * scale).to(x.dtype)


@rule("Swish")
def swish(n: OpCall) -> torch.Tensor:
    x = n.x(0)
    return x * torch.sigmoid(n.attr("alpha", 1.0) * x)


@rule("SwiGLU")
def swiglu(n: OpCall) -> torch.Tensor:
    """swish(a) * b."""
    a = n.x(0)
    return a * torch.sigmoid(n.attr("alpha", 1.0) * a) * n.x(1)


@rule("RotaryEmbedding")
def rotary_embedding(n: OpCall) -> torch.Tensor:
    """Rotate pairs (halves, or even/odd with ``interleaved``) of the first rotary_embedding_dim
    features by the cached angles: (x1, x2) -> (cos x1 - sin x2, sin x1 + cos x2)."""
    x, cos, sin, pos = n.x(0), n.x(1), n.x(2), n.x(3)
    shape = x.shape
    if x.dim() == 4:  # [B, heads, S, D] -> [B, S, heads, D]
        x = x.transpose(1, 2)
    else:
        x = x.reshape(shape[0], shape[1], n.attr("num_heads"), -1)
    dim = n.attr("rotary_embedding_dim", 0) or x.shape[3]
    rot, rest = x[..., :dim], x[..., dim:]
    if pos is not None:
        cos, sin = cos[pos], sin[pos]
    cos, sin = cos.unsqueeze(2), sin.unsqueeze(2)
    interleaved = n.attr("interleaved", 0)
    x1, x2 = (rot[..., 0::2], rot[..., 1::2]) if interleaved else (rot[..., : dim // 2], rot[..., dim // 2 :])
    real, imag = cos * x1 - sin * x2, sin * x1 + cos * x2
    rot = torch.stack((real, imag), -1).reshape(rot.shape) if interleaved else torch.cat((real, imag), -1)
    y = torch.cat((rot, rest), -1)
    return y.transpose(1, 2) if len(shape) == 4 else y.reshape(shape)


# ---- attention ---------------------------------------------------------------------------------
def _heads(t: torch.Tensor, heads: int) -> torch.Tensor:
    """[B, S, heads * D] -> [B, heads, S, D]."""
    return t.reshape(t.shape[0], t.shape[1], heads, -1).transpose(1, 2)


def _visible(
    q_len: Any, kv_len: Any, offset: Any, left: int, right: int, causal: bool
) -> torch.Tensor | None:
    """Which keys each query may see: causal (j <= i + offset) and a sliding window around i + offset.
    ``offset`` is an int or a per-batch [B] tensor; the result is [q, kv] or [B, 1, q, kv]."""
    if not causal and left < 0 and right < 0:
        return None
    i = torch.arange(q_len).reshape(-1, 1)
    j = torch.arange(kv_len).reshape(1, -1)
    if isinstance(offset, torch.Tensor):
        i = i + offset.reshape(-1, 1, 1, 1)
    else:
        i = i + offset
    allowed = torch.ones(torch.broadcast_shapes(i.shape, j.shape), dtype=torch.bool)
    if causal:
        allowed = allowed & (j <= i)
    if left >= 0:
        allowed = allowed & (i - j <= left)
    if right >= 0:
        allowed = allowed & (j - i <= right)
    return allowed


def _as_bias(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A bool mask (True = visible) as an additive 0 / -inf bias."""
    return torch.where(mask, torch.zeros((), dtype=dtype), torch.full((), float("-inf"), dtype=dtype))


@rule("Attention")
def attention(n: OpCall) -> tuple[Any, ...]:
    q, k, v, mask, past_k, past_v, nonpad = (n.x(i) for i in range(7))
    out_dtype = q.dtype
    if q.dtype in (torch.float16, torch.bfloat16):  # compute in float32, round once at the end
        q, k, v, past_k, past_v = (None if t is None else t.float() for t in (q, k, v, past_k, past_v))
        mask = mask if mask is None or mask.dtype == torch.bool else mask.float()
    rank = q.dim()
    if rank == 3:
        q, k, v = (
            _heads(q, n.attr("q_num_heads")),
            _heads(k, n.attr("kv_num_heads")),
            _heads(v, n.attr("kv_num_heads")),
        )
    scale = n.attr("scale")
    scale = scale if scale is not None else q.shape[3] ** -0.5
    if past_k is not None:
        k, v = torch.cat((past_k, k), 2), torch.cat((past_v, v), 2)
    present_k, present_v = k, v
    q_len, kv_len = q.shape[2], k.shape[2]
    bias = torch.zeros((q_len, kv_len), dtype=q.dtype)
    if mask is not None:
        if mask.shape[-1] != kv_len:  # pad the mask up to the key length with "not visible"
            fill = False if mask.dtype == torch.bool else float("-inf")
            mask = F.pad(mask, [0, kv_len - mask.shape[-1]], value=fill)
        bias = bias + (_as_bias(mask, q.dtype) if mask.dtype == torch.bool else mask)
    offset: Any = past_k.shape[2] if past_k is not None else 0
    if nonpad is not None and past_k is None:
        offset = nonpad.reshape(-1) - q_len
    visible = _visible(
        q_len,
        kv_len,
        offset,
        n.attr("left_window_size", -1),
        n.attr("right_window_size", -1),
        bool(n.attr("is_causal", 0)),
    )
    if visible is not None:
        bias = bias + _as_bias(visible, q.dtype)
    if nonpad is not None:
        padded = torch.arange(kv_len).reshape(1, -1) < nonpad.reshape(-1, 1)
        bias = bias + _as_bias(padded, q.dtype).reshape(-1, 1, 1, kv_len)
    if k.shape[1] != q.shape[1]:  # grouped-query attention: share each key/value head
        k = torch.repeat_interleave(k, q.shape[1] // k.shape[1], 1)
        v = torch.repeat_interleave(v, q.shape[1] // v.shape[1], 1)
    root = scale**0.5
    scores = torch.matmul(q * root, (k * root).transpose(2, 3))
    softcap = n.attr("softcap", 0.0)
    if softcap > 0:
        scores = softcap * torch.tanh(scores / softcap)
    qk_out = scores
    scores = scores + bias
    mode = n.attr("qk_matmul_output_mode", 0)
    if mode == 2:
        qk_out = scores
    precision = n.attr("softmax_precision")
    probs = torch.softmax(scores.to(torch_dtype(precision, "softmax_precision")) if precision else scores, -1)
    hidden = torch.isneginf(torch.amax(bias, -1, keepdim=True))
    probs = torch.where(hidden, torch.zeros((), dtype=probs.dtype), probs).to(q.dtype)
    if mode == 3:
        qk_out = probs
    y = torch.matmul(probs, v)
    if rank == 3:
        y = y.transpose(1, 2).reshape(y.shape[0], y.shape[2], -1)
    return tuple(t.to(out_dtype) for t in (y, present_k, present_v, qk_out))


@rule("LinearAttention")
def linear_attention(n: OpCall) -> tuple[torch.Tensor, torch.Tensor]:
    """Recurrent state S [B, Hkv, dk, dv], per step t (in float32):
    gated: S *= exp(g_t); delta: v_t = beta_t (v_t - S^T k_t); S += k_t v_t^T; y_t = scale * S^T q_t
    (key/value heads shared by groups of query heads)."""
    q, k, v, past, decay, beta = (n.x(i) for i in range(6))
    hq, hkv = n.attr("q_num_heads"), n.attr("kv_num_heads")
    rule_ = n.attr("update_rule", "gated_delta")
    q4, k4, v4 = _heads(q.float(), hq), _heads(k.float(), hkv), _heads(v.float(), hkv)
    batch, steps, dk, dv = q.shape[0], q.shape[1], q4.shape[3], v4.shape[3]
    if decay is not None:
        decay = decay.float().reshape(batch, steps, hkv, -1).transpose(1, 2)  # [B, Hkv, T, 1 or dk]
    if beta is not None:
        beta = beta.float().reshape(batch, steps, beta.shape[-1], 1).transpose(1, 2)
    state = past.float() if past is not None else torch.zeros((batch, hkv, dk, dv))
    scale = n.attr("scale", 0.0) or dk**-0.5
    outs = []
    for t in range(steps):
        k_t, v_t = k4[:, :, t], v4[:, :, t]
        if rule_ in ("gated", "gated_delta"):
            state = state * torch.exp(decay[:, :, t]).unsqueeze(-1)
        if rule_ in ("delta", "gated_delta"):
            v_t = beta[:, :, t] * (v_t - torch.einsum("bhdm,bhd->bhm", state, k_t))
        state = state + k_t.unsqueeze(-1) * v_t.unsqueeze(-2)
        shared = torch.repeat_interleave(state, hq // hkv, 1) if hq != hkv else state
        outs.append(scale * torch.einsum("bhd,bhdm->bhm", q4[:, :, t], shared))
    y = torch.stack(outs, 2).transpose(1, 2).reshape(batch, steps, hq * dv)
    return y.to(q.dtype), state.to(past.dtype if past is not None else q.dtype)


# ---- losses ------------------------------------------------------------------------------------
def _nll(n: OpCall, logp: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None) -> torch.Tensor:
    """-logp[i, target[i], ...] weighted; mean divides by the total weight of non-ignored targets."""
    ignore = n.attr("ignore_index")
    return F.nll_loss(
        logp,
        target.to(torch.int64),
        weight,
        ignore_index=-100 if ignore is None else ignore,
        reduction=n.attr("reduction", "mean"),
    )


@rule("NegativeLogLikelihoodLoss")
def nll_loss(n: OpCall) -> torch.Tensor:
    return _nll(n, n.x(0), n.x(1), n.x(2))


@rule("SoftmaxCrossEntropyLoss")
def softmax_cross_entropy(n: OpCall) -> tuple[torch.Tensor, torch.Tensor]:
    """NLL of log_softmax over the class axis 1; the second output is that log-probability."""
    logp = torch.log_softmax(n.x(0), 1)
    return _nll(n, logp, n.x(1), n.x(2)), logp
