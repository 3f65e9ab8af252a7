"""regc `quant` on the trained digits CNN: accuracy and onnxruntime latency against fp32, one run.

    python bench/quant_digits.py [--out bench/results/quant_digits.json] [--runs 300]

The zoo's digits CNN (BatchNorm folded) is calibrated on 256 training images and exported twice:
    regc          quant{speed_batch=64} (the per-layer speed check, at batch 64, keeps layers float
                  where int8 loses: the 1-channel conv1 stays float NCHWc, relu moved after its pool
                  so that onnxruntime keeps that pool float instead of pooling uint8 in NCHW)
    regc_forced   quant{speed_check=false}: every conv/linear int8 as one uint8 chain (input Q, two
                  QLinearConv with fused relu, uint8 NhwcMaxPool, QGemm; no DQ between layers)
Per model, in onnxruntime (1 thread): test accuracy (360 images), latency at batch 1 and 64 (median
and min, interleaved with fp32), the int8 kernels in the optimized graph, the pass's per-layer table
(sensitivity, format, the layer timings that decided), and onnxruntime's profile at batch 64 (median
kernel time per node, microseconds), which shows where int8 wins and loses.
Numbers are as measured on this machine.
"""

from __future__ import annotations

import argparse
import collections
import json
import tempfile
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from _common import capture, interleaved, ort_session, write_json

import regc
from regc.pipeline import parse_pipeline
from regc.registry import PassContext
from regc.zoo import digits_cnn, digits_data

VARIANTS = {"regc": "quant{speed_batch=64}", "regc_forced": "quant{speed_check=false}"}


def node_profile(path: Path, feed: dict, runs: int, tmp: Path) -> dict[str, float]:
    """Median kernel time (us) per node of ``path`` over ``runs`` runs, from onnxruntime's profiler."""
    sess = ort_session(path, profile_prefix=str(tmp / path.stem))
    for _ in range(runs):
        sess.run(None, feed)
    times = collections.defaultdict(list)
    for e in json.loads(Path(sess.end_profiling()).read_text()):
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
            times[f"{e['args']['op_name']} {e['name'][:-len('_kernel_time')]}"].append(e["dur"])
    return {k: float(np.median(v)) for k, v in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="bench/results/quant_digits.json")
    ap.add_argument("--runs", type=int, default=300)
    args = ap.parse_args()

    z = digits_cnn()
    d = digits_data()
    base = regc.compress(capture(z), "fold_bn")
    calib = regc.Dataset({"image": d.x_train[:256]}, d.y_train[:256])
    tmp = Path(tempfile.mkdtemp())
    base.save(tmp / "fp32.onnx")
    stats = {}
    for name, text in VARIANTS.items():
        q, records = parse_pipeline(text).run(base.clone(), PassContext(data=calib))
        q.save(tmp / f"{name}.onnx")
        stats[name] = records[0]["stats"]
    names = ["fp32", *VARIANTS]
    sessions = {k: ort_session(tmp / f"{k}.onnx", tmp / f"{k}.opt.onnx") for k in names}
    x_test, y_test = d.x_test.numpy(), d.y_test.numpy()
    models = {k: {"accuracy": float((s.run(None, {"image": x_test})[0].argmax(1) == y_test).mean()),
                  "int8_kernels": dict(collections.Counter(
                      n.op_type for n in onnx.load(str(tmp / f"{k}.opt.onnx")).graph.node
                      if n.op_type.startswith(("QLinear", "QGemm", "MatMulInteger", "ConvInteger")))),
                  "file_bytes": (tmp / f"{k}.onnx").stat().st_size}
              for k, s in sessions.items()}
    for bs in (1, 64):
        feed = {"image": x_test[:bs]}
        calls = {k: (lambda s=s, feed=feed: s.run(None, feed)) for k, s in sessions.items()}
        times = interleaved(calls, args.runs)
        for k in names:
            med, lo = float(np.median(times[k])), float(np.min(times[k]))
            models[k][f"batch{bs}"] = {"median_ms": med, "min_ms": lo,
                                       "ratio_median": med / float(np.median(times["fp32"])),
                                       "ratio_min": lo / float(np.min(times["fp32"]))}
    for k in names:
        prof = node_profile(tmp / f"{k}.onnx", {"image": x_test[:64]}, args.runs, tmp)
        models[k]["batch64_profile_us"] = {**prof, "total": sum(prof.values())}
    result = {"benchmark": "quant_digits", "onnxruntime": ort.__version__, "threads": 1, "models": models,
              "stats": stats}
    write_json(args.out, result)
    for k, v in models.items():
        b1, b64 = v["batch1"], v["batch64"]
        print(f"{k:12s} acc {v['accuracy']:.4f}  bs1 {b1['median_ms']:.4f} ms ({b1['ratio_median']:.2f}x)"
              f"  bs64 {b64['median_ms']:.3f} ms ({b64['ratio_median']:.2f}x)  {v['int8_kernels']}")
    for name in VARIANTS:
        print(name, {n: (v["format"], v.get("onnxruntime_ms")) for n, v in stats[name]["layers"].items()})
    for k in names:
        prof = models[k]["batch64_profile_us"]
        print(k, "batch 64 profile (us):", {n: round(t, 1) for n, t in prof.items()})


if __name__ == "__main__":
    main()
