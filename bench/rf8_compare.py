"""RF8 against FP8 E4M3 and INT8 per-channel on all-MiniLM-L6-v2's weights, weight-only, one run.

    python bench/rf8_compare.py [--out bench/results/rf8_compare.json]

Every linear weight and the three embedding tables are replaced by their decoded 8-bit version
(activations stay float), one format at a time:
    rf8_max     RF8, exponent bias from max|w|                 (regc.passes.rf8.rf8_encode, bias=max)
    rf8_gg      RF8, bias from the GG fitted to the tensor bulk (rf8_encode, bias=gg)
    fp8_e4m3    torch.float8_e4m3fn, one scale per tensor (max|w| -> 448), round to nearest
    int8_pc     symmetric int8, one scale per output channel / embedding row (regc quant's rule)
Reported per format: weight relative RMSE (all weights together, mean and worst over tensors) and the
sentence-embedding cosine to fp32 on ``regc.zoo.SENTENCES`` (mean and min), as measured.
"""

from __future__ import annotations

import argparse

import torch
from _common import capture, write_json

import regc
from regc.opclass import linear_view
from regc.passes._qdq import dequantize, quantize_weight
from regc.passes._rf8_format import decode
from regc.passes.rf8 import rf8_encode
from regc.zoo import SENTENCES, minilm, minilm_tokenize

aten = torch.ops.aten


def weight_targets(model: regc.Model) -> list[str]:
    """Linear weights ((out, in): rows are output channels) and embedding tables."""
    out = []
    for n in model.call_nodes():
        view = linear_view(n, model.gm)
        if view is not None and view.layout == "out_in":
            out.append(view.weight)
        elif n.target is aten.embedding.default and n.args[0].op == "get_attr":
            out.append(n.args[0].target)
    return out


def rf8(mode: str):
    def f(w: torch.Tensor) -> torch.Tensor:
        codes, bias, _ = rf8_encode(w, mode)
        return decode(codes, bias)
    return f


def fp8_e4m3(w: torch.Tensor) -> torch.Tensor:
    scale = w.abs().max() / torch.finfo(torch.float8_e4m3fn).max
    return (w / scale).to(torch.float8_e4m3fn).float() * scale


def int8_per_channel(w: torch.Tensor) -> torch.Tensor:
    return dequantize(*quantize_weight(w, 8, 0), 0)


FORMATS = {"rf8_max": rf8("max"), "rf8_gg": rf8("gg"), "fp8_e4m3": fp8_e4m3, "int8_pc": int8_per_channel}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="bench/results/rf8_compare.json")
    args = ap.parse_args()
    z = minilm()
    base = capture(z)
    ids, mask = minilm_tokenize(SENTENCES)
    with torch.no_grad():
        ref = base(ids, mask)
    targets = weight_targets(base)
    originals = {t: base.get_tensor(t).detach().clone() for t in targets}
    results = {}
    for name, fmt in FORMATS.items():
        m = base.clone()
        approx = {t: fmt(w) for t, w in originals.items()}
        for t, w in approx.items():
            m.set_tensor(t, w)
        rel = {t: ((approx[t] - w).pow(2).sum() / w.pow(2).sum()).sqrt().item() for t, w in originals.items()}
        err = sum((approx[t] - w).pow(2).sum().item() for t, w in originals.items())
        norm = sum(w.pow(2).sum().item() for w in originals.values())
        with torch.no_grad():
            cos = torch.nn.functional.cosine_similarity(m(ids, mask), ref)
        r = results[name] = {"weight_rel_rmse_all": (err / norm) ** 0.5,
                             "weight_rel_rmse_mean": sum(rel.values()) / len(rel),
                             "weight_rel_rmse_worst": max(rel.values()),
                             "cosine_mean": cos.mean().item(), "cosine_min": cos.min().item()}
        print(f"{name:9s} rel RMSE all {r['weight_rel_rmse_all']:.4f} mean {r['weight_rel_rmse_mean']:.4f} "
              f"worst {r['weight_rel_rmse_worst']:.4f}  cosine mean {r['cosine_mean']:.6f}"
              f" min {r['cosine_min']:.6f}")
    write_json(args.out, {"benchmark": "rf8_compare", "tensors": len(targets), "sentences": len(SENTENCES),
                          "formats": results})


if __name__ == "__main__":
    main()
