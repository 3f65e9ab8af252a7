"""Latency of FWSVD-factorized all-MiniLM-L6-v2 against the dense model in onnxruntime, one thread.

    python bench/fwsvd_latency.py [--out bench/results/fwsvd_latency.json] [--ratios 0.33,0.5,0.8]

Both are exported with ``Model.save`` (the same exporter) and timed in the same run, interleaved
(dense, then each factorized model, round after round, so load changes hit all alike); reported is
the median (and p10/p90) of --runs runs after --warmup, with intra- and inter-op threads set to 1.
``fwsvd`` (no labels: the distillation Fisher on the first 16 ``regc.zoo.SENTENCES``) factorizes the
36 linear layers of the encoder blocks with ranks in multiples of --round-to. Per ratio: the kept
fraction reached, the ONNX size, the largest ORT-vs-torch difference, the embedding cosine to the
dense model on the 16 held-out SENTENCES for fwsvd and, as a fidelity baseline, plain svd at the same
ratio; and per input shape the latency and the speed-up over dense.
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from _common import interleaved, ort_session, write_json

import regc
from regc.zoo import SENTENCES, minilm, minilm_tokenize

LAYERS = "bert.encoder.*"


def feeds(batch: int, seq: int) -> dict[str, np.ndarray]:
    """Real sentences, padded to ``seq`` tokens, repeated to ``batch`` rows."""
    sents = (SENTENCES * (batch // len(SENTENCES) + 1))[:batch]
    ids, mask = minilm_tokenize(sents, seq)
    return {"input_ids": ids.numpy(), "attention_mask": mask.numpy()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="bench/results/fwsvd_latency.json")
    ap.add_argument("--ratios", default="0.33,0.5,0.8")
    ap.add_argument("--round-to", type=int, default=16)
    ap.add_argument("--shapes", default="1x128,8x64", help="BATCHxSEQ input shapes, comma-separated")
    ap.add_argument("--runs", type=int, default=50)
    ap.add_argument("--warmup", type=int, default=5)
    args = ap.parse_args()
    torch.set_num_threads(1)
    t_start = time.perf_counter()

    zm = minilm()
    dense = regc.capture(zm.module, zm.example_inputs, zm.dynamic_shapes)
    calib = regc.Dataset(dict(zip(zm.input_names, minilm_tokenize(SENTENCES[:16]), strict=True)))
    heldout = minilm_tokenize(SENTENCES[16:])
    with torch.no_grad():
        ref = dense(*heldout)
    tmp = Path(tempfile.mkdtemp(prefix="fwsvd_latency_"))
    paths, info = {"dense": tmp / "dense.onnx"}, {}
    dense.save(str(paths["dense"]))
    for ratio in [float(r) for r in args.ratios.split(",")]:
        opts = f"ratio={ratio},round_to={args.round_to},layers={LAYERS}"
        model, records = regc.Pipeline.parse(f"fwsvd{{{opts},fisher=batch}}").run(
            dense.clone(), regc.PassContext(data=calib))
        plain = regc.compress(dense.clone(), f"svd{{{opts}}}")
        name = f"fwsvd@{ratio}"
        paths[name] = tmp / f"fwsvd_{ratio}.onnx"
        model.save(str(paths[name]))
        with torch.no_grad():
            emb = model(*heldout)
            onnx_emb = ort_session(paths[name]).run(None, {"input_ids": heldout[0].numpy(),
                                                      "attention_mask": heldout[1].numpy()})[0]
            cos_fw, cos_svd = torch.cosine_similarity(emb, ref), torch.cosine_similarity(plain(*heldout), ref)
        stats = records[0]["stats"]
        info[name] = {"ratio": ratio, "pipeline": records[0]["text"],
                      "ratio_achieved": round(stats["ratio_achieved"], 4), "factorized": stats["factorized"],
                      "params": model.num_params(), "onnx_mb": round(paths[name].stat().st_size / 2**20, 2),
                      "onnx_vs_torch_max_abs": float(np.abs(onnx_emb - emb.numpy()).max()),
                      "cosine_to_dense_mean": round(float(cos_fw.mean()), 4),
                      "cosine_to_dense_min": round(float(cos_fw.min()), 4),
                      "svd_cosine_to_dense_mean": round(float(cos_svd.mean()), 4),
                      "svd_cosine_to_dense_min": round(float(cos_svd.min()), 4)}
    sessions = {n: ort_session(p) for n, p in paths.items()}

    result = {
        "bench": "fwsvd_latency",
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                    "onnxruntime": ort.__version__, "threads": 1,
                    "load_avg_1m_at_start": os.getloadavg()[0]},
        "config": {k: v for k, v in vars(args).items() if k != "out"},
        "dense": {"params": dense.num_params(), "onnx_mb": round(paths["dense"].stat().st_size / 2**20, 2)},
        "models": info,
        "latency": [],
    }
    for shape in args.shapes.split(","):
        b, s = (int(v) for v in shape.split("x"))
        feed = feeds(b, s)
        calls = {n: (lambda x=x, feed=feed: x.run(None, feed)) for n, x in sessions.items()}
        times = interleaved(calls, args.runs, args.warmup)
        base = float(np.median(times["dense"]))
        for name, ts in times.items():
            med = float(np.median(ts))
            result["latency"].append({
                "shape": shape, "model": name, "median_ms": round(med, 3),
                "p10_ms": round(float(np.percentile(ts, 10)), 3),
                "p90_ms": round(float(np.percentile(ts, 90)), 3),
                "speedup_vs_dense": round(base / med, 3)})
    result["machine"]["load_avg_1m_at_end"] = os.getloadavg()[0]
    result["seconds"] = round(time.perf_counter() - t_start, 1)
    out = write_json(args.out, result)
    print(table(result))
    print(f"wrote {out} ({result['seconds']} s)")


def table(result: dict) -> str:
    lines = ["| model | kept ratio | cosine fwsvd (svd), mean/min | shape | median ms (p10-p90) | speed-up |",
             "|---" * 6 + "|"]
    for row in result["latency"]:
        m = result["models"].get(row["model"])
        kept = "1.0" if m is None else f"{m['ratio_achieved']:.3f}"
        cos = "1.0" if m is None else (f"{m['cosine_to_dense_mean']:.3f}/{m['cosine_to_dense_min']:.3f} "
                                       f"({m['svd_cosine_to_dense_mean']:.3f}/{m['svd_cosine_to_dense_min']:.3f})")
        lines.append(f"| {row['model']} | {kept} | {cos} | {row['shape']} | {row['median_ms']:.2f} "
                     f"({row['p10_ms']:.2f}-{row['p90_ms']:.2f}) | {row['speedup_vs_dense']:.2f}x |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
