"""Cost of the per-layer report that ``regc compile`` now computes, against the compile steps it
sits beside, measured in the same run (ratios, not absolute times).

    python bench/report_overhead.py [--out bench/results/report_overhead.json]

Per model (the digits CNN after ``fwsvd{ratio=0.5}``; ``resnet18_style`` after ``fold_bn``):
    extra    = layer_profile (two graph runs on 16 calibration samples, histograms)
             + latency_share (onnxruntime profiler, 20 runs) + per-layer table + report.html
    baseline = ONNX export of the compiled model + output_quality on the same data (both already
               part of every compile)
    ratio    = extra / baseline  (median of 3 repeats each)
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
from _common import capture

import regc
from regc.data import Dataset
from regc.registry import PassContext
from regc.report import build_report, latency_share, layer_profile, output_quality, write_html
from regc.zoo import ZOO, digits_data

REPEATS = 3


def _time(fn) -> float:
    times = []
    for _ in range(REPEATS):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def measure(name: str, pipeline: str, data: Dataset, folder: Path) -> dict:
    z = ZOO[name]()
    before = capture(z)
    after, records = regc.parse_pipeline(pipeline).run(before.clone(), PassContext(data=data, seed=0))
    onnx_path = folder / f"{name}.onnx"

    def baseline():
        after.save(str(onnx_path))
        output_quality(before, after, data)

    def extra():
        prof = layer_profile(before, after, data)
        lat = latency_share(onnx_path, after)
        r = build_report(source=name, pipeline=pipeline, target=None, before=before, after=after,
                         passes=records, quality=None, latency=None, artifacts={}, profile=prof,
                         layer_latency=lat)
        write_html(r, folder / f"{name}.html")

    tb = _time(baseline)
    te = _time(extra)
    return {"model": name, "pipeline": pipeline, "layers": len(layer_profile(before, after, data)["layers"]),
            "baseline_s": round(tb, 4), "extra_s": round(te, 4), "ratio": round(te / tb, 3),
            "html_bytes": (folder / f"{name}.html").stat().st_size}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "report_overhead.json")
    args = ap.parse_args()
    torch.set_num_threads(1)
    d = digits_data()
    digits = Dataset.from_arrays({"image": d.x_train[:64].numpy(), "labels": d.y_train[:64].numpy()},
                                 ["image"])
    z = ZOO["resnet18_style"]()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(16, *z.example_inputs[0].shape[1:], generator=g)
    resnet = Dataset.from_arrays({z.input_names[0]: x.numpy()}, z.input_names)
    with tempfile.TemporaryDirectory() as tmp:
        rows = [measure("digits_cnn", "fwsvd{ratio=0.5}", digits, Path(tmp)),
                measure("resnet18_style", "fold_bn", resnet, Path(tmp))]
    result = {"bench": "report_overhead", "repeats": REPEATS, "threads": 1, "results": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    for r in rows:
        print(f"{r['model']}: {r['layers']} layers, report extras {r['extra_s']:.3f} s vs export+quality "
              f"{r['baseline_s']:.3f} s = {r['ratio']:.2f}x, report.html {r['html_bytes']} bytes")


if __name__ == "__main__":
    main()
