"""Recurrent layers RNN, GRU and LSTM, unrolled over the (static) sequence length.

Per direction d, with W [gates*H, I], R [gates*H, H], B = [Wb, Rb]:
  RNN:  H_t = f(X_t W^T + H_{t-1} R^T + Wb + Rb)
  GRU:  z, r = f(.), h = g(X_t Wh^T + (r * H_{t-1}) Rh^T + Rbh + Wbh)   (linear_before_reset=1:
        g(X_t Wh^T + r * (H_{t-1} Rh^T + Rbh) + Wbh)); H_t = (1 - z) * h + z * H_{t-1}   gates "zrh"
  LSTM: i, o, f = f(. + P * C), c = g(.); C_t = f * C_{t-1} + i * c; H_t = o * h(C_t)   gates "iofc"
Steps past ``sequence_lens[b]`` keep the state and output zeros; "reverse" runs each sequence from its
last valid step.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn.functional as F

from regc.frontend.onnx_import._ops_shape import reverse_sequence
from regc.frontend.onnx_import._registry import OpCall, rule

_ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "sigmoid": torch.sigmoid,
    "tanh": torch.tanh,
    "relu": torch.relu,
    "softsign": F.softsign,
    "softplus": F.softplus,
}
_DEFAULTS = {"RNN": ["Tanh"], "GRU": ["Sigmoid", "Tanh"], "LSTM": ["Sigmoid", "Tanh", "Tanh"]}
_GATES = {"RNN": 1, "GRU": 3, "LSTM": 4}


def _activations(n: OpCall, directions: int) -> list[list[Callable[[torch.Tensor], torch.Tensor]]]:
    names = n.attr("activations") or _DEFAULTS[n.op] * directions
    per = len(_DEFAULTS[n.op])
    if (
        n.attr("activation_alpha")
        or n.attr("activation_beta")
        or any(a.lower() not in _ACTIVATIONS for a in names)
    ):
        raise n.fail(
            f"activations {names} with parameters are not supported (supported: {sorted(_ACTIVATIONS)})"
        )
    fns = [_ACTIVATIONS[a.lower()] for a in names]
    return [fns[d * per : (d + 1) * per] for d in range(directions)]


def _step(
    n: OpCall,
    acts: list[Any],
    gx: torch.Tensor,
    h: torch.Tensor,
    c: torch.Tensor | None,
    r: torch.Tensor,
    rb: torch.Tensor,
    p: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One time step: gx = X_t W^T + Wb (all gates), h/c the previous state."""
    clip = n.attr("clip")

    def pre(v: torch.Tensor) -> torch.Tensor:
        return v if clip is None else torch.clamp(v, -clip, clip)

    if n.op == "RNN":
        return acts[0](pre(gx + h @ r.t() + rb)), None
    if n.op == "GRU":
        hidden = h.shape[-1]
        gh = h @ r[: 2 * hidden].t() + rb[: 2 * hidden]
        z, rr = acts[0](pre(gx[:, : 2 * hidden] + gh)).chunk(2, -1)
        rh, rbh = r[2 * hidden :], rb[2 * hidden :]
        if n.attr("linear_before_reset", 0):
            cand = acts[1](pre(gx[:, 2 * hidden :] + rr * (h @ rh.t() + rbh)))
        else:
            cand = acts[1](pre(gx[:, 2 * hidden :] + (rr * h) @ rh.t() + rbh))
        return (1 - z) * cand + z * h, None
    g = gx + h @ r.t() + rb
    gi, go, gf, gc = g.chunk(4, -1)
    pi, po, pf = p.chunk(3) if p is not None else (0, 0, 0)
    i = acts[0](pre(gi + pi * c))
    f = acts[0](pre(gf + pf * c))
    c_new = f * c + i * acts[1](pre(gc))
    o = acts[0](pre(go + po * c_new))
    return o * acts[2](c_new), c_new


@rule("RNN", "GRU", "LSTM")
def recurrent(n: OpCall) -> tuple[torch.Tensor, ...]:
    """Outputs Y [T, D, B, H] (layout=1: [B, T, D, H]), Y_h [D, B, H] and, for LSTM, Y_c."""
    lstm = n.op == "LSTM"
    x, w, r, b, lens, h0 = (n.x(i) for i in range(6))
    c0, p = (n.x(6), n.x(7)) if lstm else (None, None)
    if lstm and n.attr("input_forget", 0):
        raise n.fail("input_forget=1 is not supported")
    layout = n.attr("layout", 0)
    if layout:
        x = x.transpose(0, 1)
        h0, c0 = (None if s is None else s.transpose(0, 1) for s in (h0, c0))
    steps, batch = x.shape[0], x.shape[1]
    hidden = n.attr("hidden_size")
    direction = n.attr("direction", "forward")
    dirs = ["forward", "reverse"] if direction == "bidirectional" else [direction]
    acts = _activations(n, len(dirs))
    gates = _GATES[n.op] * hidden
    ys, hs, cs = [], [], []
    for d, name in enumerate(dirs):
        wb, rb = (b[d, :gates], b[d, gates:]) if b is not None else (0, torch.zeros(gates, dtype=x.dtype))
        xs = reverse_sequence(x, lens, 1, 0) if name == "reverse" else x
        h = h0[d] if h0 is not None else torch.zeros(batch, hidden, dtype=x.dtype)
        c = (c0[d] if c0 is not None else torch.zeros(batch, hidden, dtype=x.dtype)) if lstm else None
        gx_all = xs @ w[d].t() + wb  # [T, B, gates]
        outs = []
        for t in range(steps):
            h_new, c_new = _step(n, acts[d], gx_all[t], h, c, r[d], rb, None if p is None else p[d])
            if lens is None:
                h, c, out = h_new, c_new, h_new
            else:
                live = (t < lens).reshape(-1, 1)
                h = torch.where(live, h_new, h)
                c = torch.where(live, c_new, c) if lstm else None
                out = torch.where(live, h_new, torch.zeros((), dtype=x.dtype))
            outs.append(out)
        y = torch.stack(outs)
        ys.append(reverse_sequence(y, lens, 1, 0) if name == "reverse" else y)
        hs.append(h)
        cs.append(c)
    y, y_h = torch.stack(ys, 1), torch.stack(hs)
    y_c = torch.stack(cs) if lstm else None
    if layout:
        y, y_h = y.permute(2, 0, 1, 3), y_h.transpose(0, 1)
        y_c = y_c.transpose(0, 1) if lstm else None
    return (y, y_h, y_c) if lstm else (y, y_h)
