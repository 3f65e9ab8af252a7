"""regc against peer compression tools on the same models, in one run: size, quality, latency, time.

    bench/run [--quick] [--models digits_cnn,minilm] [--entries regc:,ort:quantize_dynamic]
              [--out-dir bench/results] [--no-setup]

Installs the peers first (bench/peers/setup.sh, constrained to the CPU torch==2.13.0; a peer that does not
install or import is skipped with its reason). Per model (peers.cases), the fp32 model is exported to ONNX
once; every entry (regc's pipelines in peers.regc_entries, the peers in peers.onnx_peers and
peers.torch_peers) compresses it, and peers.measure scores the result the same way for all: weight bytes
(ratio to fp32), quality (accuracy, or cosine to fp32), onnxruntime latency ratio to fp32 (interleaved,
same process, 1 thread) and the seconds the compression took. ``fp32`` is timed against itself: its
ratio shows the noise of the latency measurement. Writes peers.json, peers.md and peers_pareto.svg
(peers.report). --quick: smaller calibration sets, fewer training steps and shorter timings.

Progress: one line per entry as it finishes (its result and its wall seconds: compression, export,
quality and latency), and one per model with its wall seconds (``total_s`` per model in the JSON; the
run's own ``total_s`` includes the peers' setup).
"""

from __future__ import annotations

import argparse
import logging
import platform
import re
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # makes bench/peers importable as the namespace package `peers`

import numpy as np  # noqa: E402
import onnxruntime as ort  # noqa: E402
import torch  # noqa: E402
from peers import onnx_peers, regc_entries, report, torch_peers  # noqa: E402
from peers.cases import CASES, Case  # noqa: E402
from peers.measure import (  # noqa: E402
    TorchRunner,
    latency,
    onnx_bytes,
    onnx_predict,
    torch_bytes,
    torch_predict,
)
from peers.regc_entries import Skip  # noqa: E402

import regc  # noqa: E402
import regc.passes  # noqa: E402,F401 - registers the passes, so `all_passes` lists them

PEERS = {**onnx_peers.ENTRIES, **torch_peers.ENTRIES}


def selected(names: list[str], patterns: str | None) -> list[str]:
    """Names matching any comma-separated pattern (an exact name, or a prefix such as ``regc:``)."""
    if not patterns:
        return names
    pats = [p.strip() for p in patterns.split(",") if p.strip()]
    return [n for n in names if any(n == p or (p.endswith(":") and n.startswith(p)) for p in pats)]


def run_case(case: Case, entries: list[str], tmp: Path, budget_s: float) -> dict:
    base = regc.capture(case.module, case.example_inputs, case.dynamic_shapes, input_names=case.input_names,
                        output_names=case.output_names)
    fp32 = tmp / f"{case.name}.fp32.onnx"
    base.save(str(fp32))  # the fp32 baseline: the same capture every regc entry starts from
    case.reference = onnx_predict(fp32)(case.eval_feed)
    fp32_quality, _ = case.quality(onnx_predict(fp32))
    fp32_bytes = onnx_bytes(fp32)
    fp32_torch_bytes = torch_bytes(case.module)
    torch_fp32 = TorchRunner(case.module, case)
    rows = []
    for name in ["fp32", *entries]:
        by = "fp32" if name == "fp32" else "regc" if name in regc_entries.ENTRIES else "peer"
        row: dict = {"entry": name, "by": by}
        t0 = time.perf_counter()
        try:
            if name in case.skip:
                raise Skip(case.skip[name])
            if name == "fp32":
                got = {"onnx": fp32, "seconds": 0.0, "config": "regc.capture + Model.save"}
            elif name in regc_entries.ENTRIES:
                got = regc_entries.make(name)(case, base, tmp / f"{case.name}.{name}.onnx")
            else:
                got = PEERS[name](case, fp32, tmp / f"{case.name}.{name.replace(':', '_')}.onnx")
            if "onnx" in got:
                dense, packed = onnx_bytes(got["onnx"])
                ref_dense, ref_packed = fp32_bytes
                predict, lat_args, backend = onnx_predict(got["onnx"]), (got["onnx"], fp32), "onnxruntime"
            else:
                dense, packed = torch_bytes(got["torch"])
                ref_dense, ref_packed = fp32_torch_bytes
                predict = torch_predict(got["torch"], case)
                lat_args, backend = (TorchRunner(got["torch"], case), torch_fp32), "torch eager"
            q, q_min = case.quality(predict)
            row.update(status="ok", config=got["config"], trains=got.get("trains", ""),
                       weight_bytes=packed, onnx_bytes=dense, bytes_ratio=round(packed / ref_packed, 4),
                       onnx_bytes_ratio=round(dense / ref_dense, 4), quality=round(q, 5),
                       quality_min=round(q_min, 5), quality_delta=round(q - fp32_quality, 5),
                       latency=latency(*lat_args, case, budget_s), latency_backend=backend,
                       compress_s=round(got["seconds"], 2))
        except Skip as e:
            row.update(status=e.status, reason=str(e))
        except Exception as e:  # noqa: BLE001 - one failing entry must not end the bench; it is reported
            first = re.sub(r"\x1b\[[0-9;]*m", "", (str(e).strip().splitlines() or [""])[0])[:200]
            row.update(status="failed", reason=f"{type(e).__name__}: {first}")
        row["wall_s"] = round(time.perf_counter() - t0, 1)
        rows.append(row)
        if row["status"] == "ok":
            print(f"  {name:24s} bytes {row['bytes_ratio']:.3f}  quality {row['quality']:.4f}  latency "
                  f"{row['latency']['ratio']:.2f}x ({backend})  compress {row['compress_s']:.1f}s  "
                  f"[{row['wall_s']:.0f} s]", flush=True)
        else:
            print(f"  {name:24s} {row['status']}: {row['reason']}  [{row['wall_s']:.0f} s]", flush=True)
    return {"metric": case.metric, "fp32_quality": round(fp32_quality, 5), "fp32_weight_bytes": fp32_bytes[1],
            "latency_batch": len(next(iter(case.latency_feed.values()))), "setup_s": round(case.setup_s, 1),
            "entries": rows,
            "best": {by: report.best(rows, case.metric, fp32_quality, by) for by in ("regc", "peer")}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smoke run: small data, few steps, short timings")
    ap.add_argument("--models", help=f"comma-separated subset of {','.join(CASES)}")
    ap.add_argument("--entries", help="comma-separated entry names or prefixes ending in ':' (regc:, ort:)")
    ap.add_argument("--out-dir", default="bench/results")
    ap.add_argument("--no-setup", action="store_true", help="do not run bench/peers/setup.sh first")
    args = ap.parse_args()
    start = time.perf_counter()
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore", category=FutureWarning)
    logging.getLogger().setLevel(logging.ERROR)  # onnxruntime.quantization's "consider pre-processing"
    logging.getLogger("torchao").setLevel(logging.ERROR)  # its CUDA-only kernels that do not load here
    if not args.no_setup:
        subprocess.run(["bash", str(HERE / "setup.sh")], check=False)
    models = selected(list(CASES), args.models)
    entries = selected([*regc_entries.ENTRIES, *PEERS], args.entries)
    if not models or not entries:
        raise SystemExit(f"nothing selected: models {args.models!r} of {list(CASES)}, "
                         f"entries {args.entries!r}")
    result = {"benchmark": "peers", "quick": args.quick,
              "machine": f"{platform.machine()}, onnxruntime {ort.__version__}, torch {torch.__version__}, "
                         "1 thread", "models": {}}
    with tempfile.TemporaryDirectory() as d:
        for name in models:
            print(f"{name}:", flush=True)
            t0 = time.perf_counter()
            try:
                case = CASES[name](args.quick)
            except Exception as e:  # noqa: BLE001 - e.g. the MiniLM package missing: skip the model
                print(f"  skipped: {type(e).__name__}: {e}", flush=True)
                result["models"][name] = {"skipped": f"{type(e).__name__}: {e}"}
                continue
            m = run_case(case, entries, Path(d), 0.3 if args.quick else 1.5)
            m["total_s"] = round(time.perf_counter() - t0, 1)
            result["models"][name] = m
            print(f"  {name}: {m['total_s']:.0f} s (setup {m['setup_s']:.0f} s)", flush=True)
    models_run = list(result["models"].items())
    result["skipped_models"] = {k: v.pop("skipped") for k, v in models_run if "skipped" in v}
    result["models"] = {k: v for k, v in result["models"].items() if v}
    result["total_s"] = round(time.perf_counter() - start, 1)
    report.write(result, Path(args.out_dir))
    print(f"wrote {args.out_dir}/peers.json, peers.md, peers_pareto.svg in {result['total_s']:.0f} s")


if __name__ == "__main__":
    np.seterr(all="ignore")
    main()
