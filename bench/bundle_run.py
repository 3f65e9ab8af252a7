"""What a run through an edge bundle's C++ runner costs, against the same TVM build run in-process.

    python bench/bundle_run.py [--out bench/results/bundle_run.json] [--runs 20] [--qemu-runs 3]

The zoo BERT-style encoder (``regc.zoo.bert_encoder``, batch 2 x 16 tokens) is lowered once for
x86_64 and once for aarch64. Timed in the same run, one TVM thread each: the x86_64 TVM folder in this
process (``regc.runtime.open_artifact``: the baseline), the x86_64 bundle through ``regc_run`` (a new
process per call: loading the libraries, model.so and model.params, .npy files in and out, plus the
sha256 check of every file) and the aarch64 bundle under qemu-aarch64-static (emulation cost on this
machine, never aarch64 device speed). Reported: median/p90 ms per call, ratios to the baseline, the
largest output difference to the baseline, and the bundle's bytes per file.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from _common import capture

import regc
from regc.runtime import open_artifact
from regc.runtime.bundle import export_bundle
from regc.zoo import bert_encoder


def timed(run, feeds: dict[str, np.ndarray], runs: int) -> tuple[dict[str, float], np.ndarray]:
    out = run(feeds)  # warm-up
    ms = []
    for _ in range(runs):
        t0 = time.perf_counter()
        run(feeds)
        ms.append((time.perf_counter() - t0) * 1e3)
    return {"median_ms": float(np.median(ms)), "p90_ms": float(np.percentile(ms, 90)), "runs": runs}, \
        next(iter(out.values()))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="bench/results/bundle_run.json")
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--qemu-runs", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(1)
    z = bert_encoder()
    model = capture(z)
    feeds = {n: t.numpy() for n, t in zip(z.input_names, z.example_inputs, strict=True)}
    with tempfile.TemporaryDirectory() as tmp:
        folder = regc.lower(model, "x86_64").save(Path(tmp, "x86_64"))
        x86 = export_bundle(folder, "x86_64", Path(tmp, "bundle_x86"))
        a64 = export_bundle(model, "aarch64", Path(tmp, "bundle_a64"))
        base, want = timed(open_artifact(folder).run, feeds, args.runs)
        res = {"machine": platform.machine(), "model": "bert_encoder (2 x 16 tokens)", "tvm_threads": 1,
               "in_process": base}
        cases = (("bundle_x86_64", x86, args.runs), ("bundle_aarch64_qemu", a64, args.qemu_runs))
        for key, bundle, runs in cases:
            t, got = timed(open_artifact(bundle).run, feeds, runs)
            t["ratio_to_in_process"] = t["median_ms"] / base["median_ms"]
            t["max_abs_diff"] = float(np.abs(got - want).max())
            t["bytes"] = {p.relative_to(bundle).as_posix(): p.stat().st_size
                          for p in sorted(bundle.rglob("*")) if p.is_file()}
            res[key] = t
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=2) + "\n")
    print(json.dumps({k: {kk: vv for kk, vv in v.items() if kk != "bytes"} if isinstance(v, dict) else v
                      for k, v in res.items()}, indent=2))


if __name__ == "__main__":
    main()
