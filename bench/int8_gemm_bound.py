"""How fast can int8 make the MiniLM encoder on this CPU? The bound set by onnxruntime's int8 GEMM kernels.

    python bench/int8_gemm_bound.py [--out bench/results/int8_gemm_bound.json] [--runs 300] [--seq 32]

int8 quantization speeds up the encoder's linear layers only; attention, LayerNorm, GELU and the
embeddings run the same float kernels as before. So with ``f`` = the linears' share of the fp32 encoder's
time and ``r`` = int8 GEMM time / fp32 GEMM time, an int8 lowering through these kernels that leaves the
rest as it is cannot be faster than

    ratio >= f r + (1 - f)          (quantize/dequantize glue counted in r)

and even with the rest of the encoder free, not below r. So an encoder at <= 0.5x fp32 needs r < 0.5, or
the int8 graph running its float parts (attention, LayerNorm, GELU) more than twice as fast as the fp32
graph does, which is fusion, not quantization.

Measured here, onnxruntime CPU, 1 thread, batch 1, ``--seq`` tokens (M = seq rows):
  r  the encoder's 36 linears (6 layers x Q, K, V, output 384x384, FFN 384x1536 and 1536x384) as one
     chain graph with their own random weights, once with fp32 ``MatMul`` and once per int8 kernel
     onnxruntime has for a float-in/float-out linear with int8 weights (per-output-channel scales):
     ``MatMulIntegerToFloat`` after a static ``QuantizeLinear`` with 7-bit weight codes (regc's default
     on CPUs without VNNI), with full 8-bit codes, with uint8 codes (u8u8), and
     ``DynamicQuantizeMatMul`` (onnxruntime's quantize_dynamic); calls interleaved over --runs rounds,
     medians; r = best int8 chain / fp32 chain.
  f  fp32 chain / the fp32 encoder's median latency (``Model.save`` of the captured encoder, the same
     session settings, one sentence padded to --seq tokens), its calls interleaved with the chains'.
The bound is compared with two int8 encoders whose calls are interleaved with the rest in the same run:
regc ``quant`` (bench/quant_minilm.py's pipeline) and onnxruntime's quantize_dynamic.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import onnxruntime as ort
from _common import capture, interleaved, ort_session, write_json
from onnx import TensorProto
from onnx import helper as oh
from onnx import numpy_helper as nh
from onnxruntime.quantization import QuantType, quantize_dynamic
from quant_minilm import PASSES

import regc
from regc.pipeline import parse_pipeline
from regc.registry import PassContext
from regc.zoo import SENTENCES, minilm, minilm_tokenize

HIDDEN, FFN, LAYERS = 384, 1536, 6
LINEARS = [(HIDDEN, HIDDEN)] * 4 + [(HIDDEN, FFN), (FFN, HIDDEN)]  # K, N per layer: Q, K, V, out, FFN in/out
VARIANTS = ("fp32_matmul", "int8_static_7bit", "int8_static_8bit", "uint8_static_u8u8", "int8_dynamic")


def chain_graph(m: int, variant: str, rng: np.random.Generator) -> bytes:
    """The encoder's 36 linears as one chain x -> linear_1 -> ... -> linear_36, each with its own weights
    W[K, N] ~ N(0, 1/K) (6 x 22 MB fp32, streamed from memory as in the encoder) and, for the int8
    variants, per-column scales, a static QuantizeLinear in front (the glue a static lowering needs)."""
    nodes, inits, x = [], {}, "x"
    for i, (k, n) in enumerate(LINEARS * LAYERS):
        w = (rng.standard_normal((k, n)) / np.sqrt(k)).astype(np.float32)
        y = f"y{i}"
        if variant == "fp32_matmul":
            nodes.append(oh.make_node("MatMul", [x, f"w{i}"], [y]))
            inits[f"w{i}"] = w
        else:
            bits = 7 if variant in ("int8_static_7bit", "int8_dynamic") else 8
            scale = (np.abs(w).max(0) / (2 ** (bits - 1) - 1)).astype(np.float32)
            codes = np.round(w / scale)
            if variant == "uint8_static_u8u8":
                codes, zp = (codes + 128).astype(np.uint8), np.full(n, 128, np.uint8)
            else:
                codes, zp = codes.astype(np.int8), np.zeros(n, np.int8)
            inits.update({f"w{i}": codes, f"ws{i}": scale, f"wz{i}": zp})
            if variant == "int8_dynamic":
                nodes.append(oh.make_node("DynamicQuantizeMatMul", [x, f"w{i}", f"ws{i}", f"wz{i}"], [y],
                                          domain="com.microsoft"))
            else:
                inits.update({f"xs{i}": np.float32(0.05), f"xz{i}": np.uint8(128)})
                ins = [f"xq{i}", f"w{i}", f"xs{i}", f"ws{i}", f"xz{i}", f"wz{i}"]
                nodes += [oh.make_node("QuantizeLinear", [x, f"xs{i}", f"xz{i}"], [f"xq{i}"]),
                          oh.make_node("MatMulIntegerToFloat", ins, [y], domain="com.microsoft")]
        x = y
    g = oh.make_graph(nodes, "linears", [oh.make_tensor_value_info("x", TensorProto.FLOAT, [m, HIDDEN])],
                      [oh.make_tensor_value_info(x, TensorProto.FLOAT, [m, HIDDEN])],
                      [nh.from_array(v, name) for name, v in inits.items()])
    model = oh.make_model(g, opset_imports=[oh.make_opsetid("", 18), oh.make_opsetid("com.microsoft", 1)])
    model.ir_version = 9
    return model.SerializeToString()


def encoder_files(ids, mask, tmp: Path) -> dict[str, Path]:
    """The MiniLM encoder as ONNX files in ``tmp``: fp32 (``Model.save``), regc ``quant`` (quant_minilm's
    pipeline, calibrated on the first 16 sentences) and onnxruntime's quantize_dynamic (per channel)."""
    model = capture(minilm())
    files = {k: tmp / f"{k}.onnx" for k in ("fp32", "regc_int8", "ort_dynamic")}
    model.save(files["fp32"])
    calib = regc.Dataset({"input_ids": ids[:16], "attention_mask": mask[:16]})
    parse_pipeline(PASSES).run(model, PassContext(data=calib))[0].save(files["regc_int8"])
    quantize_dynamic(str(files["fp32"]), str(files["ort_dynamic"]), weight_type=QuantType.QInt8,
                     per_channel=True)
    return files


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "int8_gemm_bound.json"))
    ap.add_argument("--runs", type=int, default=300)
    ap.add_argument("--seq", type=int, default=32)
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    x = rng.standard_normal((args.seq, HIDDEN)).astype(np.float32)
    sessions = {v: ort_session(chain_graph(args.seq, v, rng)) for v in VARIANTS}
    calls = {v: (lambda s=s: s.run(None, {"x": x})) for v, s in sessions.items()}
    ids, mask = minilm_tokenize(SENTENCES, max_len=args.seq)
    feed = {"input_ids": ids[3:4].numpy(), "attention_mask": mask[3:4].numpy()}
    with tempfile.TemporaryDirectory(prefix="regc-bound-") as tmp:
        encoders = {k: ort_session(p) for k, p in encoder_files(ids, mask, Path(tmp)).items()}
    for k, enc in encoders.items():
        calls[f"{k}_encoder"] = lambda enc=enc: enc.run(None, feed)
    med = {k: float(np.median(v)) / 1e3 for k, v in interleaved(calls, args.runs, warmup=5).items()}
    chains = {v: {"median_ms": med[v] * 1e3, "ratio_to_fp32": med[v] / med["fp32_matmul"]} for v in VARIANTS}
    for v, c in chains.items():
        print(f"{v:18s} {c['median_ms']:.2f} ms  {c['ratio_to_fp32']:.3f}x", flush=True)
    best = min(VARIANTS[1:], key=lambda v: med[v])
    r = chains[best]["ratio_to_fp32"]
    linears_fp32_s, encoder_s = med["fp32_matmul"], med["fp32_encoder"]
    f = linears_fp32_s / encoder_s
    measured = {k: med[f"{k}_encoder"] / encoder_s for k in encoders}
    result = {
        "benchmark": "int8_gemm_bound", "onnxruntime": ort.__version__, "threads": 1, "rows_m": args.seq,
        "linear_chain": chains, "best_int8": best, "r": r,
        "fp32_encoder_median_ms": encoder_s * 1e3, "fp32_linears_ms": linears_fp32_s * 1e3,
        "linear_share_f": f, "bound_ratio": f * r + (1 - f), "measured_encoder_ratio": measured,
    }
    write_json(args.out, result)
    print(f"r = {r:.3f} ({best} / fp32 over the 36 linears); f = {f:.3f} "
          f"(linears {linears_fp32_s * 1e3:.2f} ms of {encoder_s * 1e3:.2f} ms); "
          f"int8 encoder >= {f * r + (1 - f):.3f}x fp32; measured in this run: "
          + ", ".join(f"{k} {v:.3f}x" for k, v in measured.items()))


if __name__ == "__main__":
    main()
