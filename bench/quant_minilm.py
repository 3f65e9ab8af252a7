"""regc `quant` on the pretrained all-MiniLM-L6-v2 against fp32 and onnxruntime's own int8 tool, one run.

    python bench/quant_minilm.py [--out bench/results/quant_minilm.json] [--passes PIPELINE] [--runs 40]

Default pipeline: quant{embedding_bits=4,max_accuracy_drop=0.0045}: int8 linears (static, SmoothQuant;
MatMulIntegerToFloat with the bias in the kernel, one Q per activation), the vocabulary table in 4-bit
groups, 8-bit weight codes that are pair-limited on CPUs without VNNI (exact in onnxruntime's fast u8s8
kernel, see quant's reduce_range); should the cosine drop on the calibration sentences exceed 0.0045
(cosine >= 0.9955 there), the most sensitive linears get full uint8 codes (u8u8), then stay float.

Calibration: the first 16 of ``regc.zoo.SENTENCES``; fidelity is reported on all 32 and on the 16
held-out ones. Every model is exported to ONNX and run by onnxruntime (1 intra/inter-op thread):
    fp32          Model.save of the captured encoder
    regc          Model.save after regc.compress(..., --passes)
    ort_dynamic   onnxruntime.quantization.quantize_dynamic(fp32, per_channel=True), the usual baseline
Per model: file bytes and initializer bytes (ratio to fp32), embedding cosine to fp32 on each sentence
(onnxruntime outputs, batch 1, padded to 32 tokens), latency (median/min of --runs, interleaved so load
changes hit all models alike) and the int8 kernels in onnxruntime's optimized graph. The pass's stats
(per-layer sensitivity table included) are written too. Numbers are as measured on this machine.
"""

from __future__ import annotations

import argparse
import collections
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from _common import capture, interleaved, ort_session, write_json
from onnxruntime.quantization import QuantType, quantize_dynamic

import regc
from regc.pipeline import parse_pipeline
from regc.registry import PassContext
from regc.zoo import SENTENCES, minilm, minilm_tokenize

PASSES = "quant{embedding_bits=4,max_accuracy_drop=0.0045}"
INT8_KERNELS = ("MatMulIntegerToFloat", "DynamicQuantizeMatMul", "QLinearMatMul", "MatMulInteger", "QGemm")


def embed(sess: ort.InferenceSession, ids, mask) -> np.ndarray:
    return np.concatenate([sess.run(None, {"input_ids": ids[i:i + 1], "attention_mask": mask[i:i + 1]})[0]
                           for i in range(len(ids))])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="bench/results/quant_minilm.json")
    ap.add_argument("--passes", default=PASSES)
    ap.add_argument("--runs", type=int, default=40)
    args = ap.parse_args()

    z = minilm()
    model = capture(z)
    ids, mask = minilm_tokenize(SENTENCES)
    calib = regc.Dataset({"input_ids": ids[:16], "attention_mask": mask[:16]})
    tmp = Path(tempfile.mkdtemp())
    paths = {"fp32": tmp / "fp32.onnx", "regc": tmp / "regc.onnx", "ort_dynamic": tmp / "ort_dynamic.onnx"}
    model.save(paths["fp32"])
    t0 = time.perf_counter()
    qmodel, records = parse_pipeline(args.passes).run(model, PassContext(data=calib))
    compress_s = time.perf_counter() - t0
    qmodel.save(paths["regc"])
    quantize_dynamic(str(paths["fp32"]), str(paths["ort_dynamic"]), weight_type=QuantType.QInt8,
                     per_channel=True)

    ids_np, mask_np = ids.numpy(), mask.numpy()
    sessions = {k: ort_session(p, tmp / f"{k}.opt.onnx") for k, p in paths.items()}
    ref = embed(sessions["fp32"], ids_np, mask_np)
    feed = {"input_ids": ids_np[3:4], "attention_mask": mask_np[3:4]}
    times = interleaved({k: (lambda s=s: s.run(None, feed)) for k, s in sessions.items()}, args.runs)
    latency = {k: {"median_ms": float(np.median(v)), "min_ms": float(np.min(v))} for k, v in times.items()}
    fp_bytes = paths["fp32"].stat().st_size
    fp_init = sum(len(i.raw_data) for i in onnx.load(str(paths["fp32"])).graph.initializer)
    models = {}
    for k, p in paths.items():
        y = embed(sessions[k], ids_np, mask_np)
        cos = (y * ref).sum(1) / np.linalg.norm(y, axis=1) / np.linalg.norm(ref, axis=1)
        init = sum(len(i.raw_data) for i in onnx.load(str(p)).graph.initializer)
        ops = collections.Counter(n.op_type for n in onnx.load(str(tmp / f"{k}.opt.onnx")).graph.node)
        models[k] = {
            "file_bytes": p.stat().st_size, "file_ratio": p.stat().st_size / fp_bytes,
            "initializer_bytes": init, "initializer_ratio": init / fp_init,
            "cosine_mean": float(cos.mean()), "cosine_min": float(cos.min()),
            "cosine_heldout_mean": float(cos[16:].mean()), "cosine_heldout_min": float(cos[16:].min()),
            **latency[k], "latency_ratio_median": latency[k]["median_ms"] / latency["fp32"]["median_ms"],
            "latency_ratio_min": latency[k]["min_ms"] / latency["fp32"]["min_ms"],
            "int8_kernels": {op: ops[op] for op in INT8_KERNELS if ops[op]},
        }
    result = {
        "benchmark": "quant_minilm", "passes": args.passes, "compress_seconds": round(compress_s, 1),
        "machine": {"cpu": platform.processor() or platform.machine(), "onnxruntime": ort.__version__,
                    "threads": 1},
        "models": models, "stats": records[0]["stats"],
    }
    write_json(args.out, result)
    for k, v in models.items():
        print(f"{k:12s} bytes {v['file_ratio']:.3f} (init {v['initializer_ratio']:.3f})"
              f"  cos mean {v['cosine_mean']:.5f} min {v['cosine_min']:.5f}"
              f"  latency {v['median_ms']:.2f} ms ({v['latency_ratio_median']:.2f}x median,"
              f" {v['latency_ratio_min']:.2f}x min)  {v['int8_kernels']}")


if __name__ == "__main__":
    main()
