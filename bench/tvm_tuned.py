"""MetaSchedule-tuned TVM x86 builds against onnxruntime fp32, measured in one run.

    nice -n 5 python bench/tvm_tuned.py [--out bench/results/tvm_tuned.json] [--trials-per-kernel 4]
                                        [--max-kernels N] [--models resnet18_style,minilm] [--seq 32]
                                        [--target x86_64_v3] [--db-dir DIR [--measure-only]]

Per model after ``fold_bn`` (``regc.zoo.resnet18_style``: 1x3x32x32; ``regc.zoo.minilm``: 1 sentence
padded to --seq tokens, static shapes): export ONNX (the baseline, onnxruntime CPU, 1 thread), lower
with TVM for --target (default ``x86_64_v3``: AVX2+FMA) untuned, tune with
``regc.backends.tvm_tune.tune_tvm`` (trials = --trials-per-kernel x kernels tuned, an average: the task
scheduler spends them where they save the most time; --max-kernels keeps the heaviest by calls x
FLOPs), lower again
with the database, and time each TVM build against onnxruntime with ``regc.runtime.compare`` (calls
interleaved, TVM at 1 thread: TVM_NUM_THREADS=1). Reported: median latencies, ratio = TVM /
onnxruntime (goal: tuned <= 1.3), trials, tuning seconds, kernels covered, max abs output
difference tuned vs onnxruntime, and where the tuned build's time goes (per kernel, in the model and
in the tuner). The machine is shared, so absolute numbers drift;
the ratios are from interleaved calls in the same run. ``--measure-only`` skips tuning and times builds
from the databases a ``--db-dir`` run kept (their trials and tuning time are reported as
``database_*_total``).
"""

from __future__ import annotations

import os

os.environ.setdefault("TVM_NUM_THREADS", "1")  # before tvm is imported, here and in tuning workers

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import regc
from regc import zoo
from regc.backends.tvm_backend import lower_tvm
from regc.backends.tvm_tune import TuningDatabase, tune_tvm
from regc.runtime import compare
from regc.runtime.artifact import open_artifact


def static_model(name: str, seq: int) -> regc.Model:
    if name == "minilm":
        z = zoo.minilm()
        inputs = zoo.minilm_tokenize(zoo.SENTENCES[:1], max_len=seq)
    else:
        z = getattr(zoo, name)()
        inputs = tuple(t[:1] for t in z.example_inputs)
    model = regc.capture(z.module, inputs, input_names=z.input_names, output_names=z.output_names)
    return regc.compress(model, "fold_bn")  # onnxruntime folds BN into convs at load time too


def run_model(name: str, preset: str, trials_per_kernel: int, max_kernels: int | None, seq: int,
              work: Path, db_dir: Path, measure_only: bool = False) -> dict:
    model = static_model(name, seq)
    onnx_path = work / f"{name}.onnx"
    model.save(str(onnx_path))
    feeds = {n: t.numpy() for n, t in zip(model.input_names, model.example_inputs, strict=True)}
    ort = open_artifact(onnx_path)
    want = ort.run(feeds)[model.output_names[0]]

    t0 = time.perf_counter()
    untuned = lower_tvm(model, preset).save(work / f"{name}-untuned")
    untuned_build_s = time.perf_counter() - t0
    untuned_cmp = compare(untuned, ort, feeds, warmup=2, budget_s=3.0)

    from regc.backends.tvm_backend import PRESETS, fuse_kernels, import_relax, kernel_tasks

    target = PRESETS[preset].tvm_target()
    tasks = kernel_tasks(fuse_kernels(import_relax(model).mod, target), target)
    kernels = len(tasks)
    trials = 0 if measure_only else trials_per_kernel * min(kernels, max_kernels or kernels)
    t0 = time.perf_counter()
    if measure_only:  # time a build from the database already there
        db = TuningDatabase.open(db_dir / f"{name}-{preset}", preset, target)
    else:
        db = tune_tvm(model, preset, trials=trials, db=db_dir / f"{name}-{preset}", max_kernels=max_kernels,
                      log=lambda s: print(f"  {name}: {s}", flush=True))
    tune_s = time.perf_counter() - t0
    tuned_art = lower_tvm(model, preset, tuning_db=db.path)
    tuned = tuned_art.save(work / f"{name}-tuned")
    tuned_cmp = compare(tuned, ort, feeds, warmup=3, budget_s=5.0)
    got = open_artifact(tuned).run(feeds)[model.output_names[0]]
    return {
        "target": preset,
        "inputs": {n: list(a.shape) for n, a in feeds.items()},
        "kernels": kernels,
        "max_kernels": max_kernels,
        "trials": trials,
        "tuning_seconds": round(tune_s, 1),
        "database_trials_total": db.info["trials"],  # more than trials when --db-dir held a database
        "database_seconds_total": db.info["seconds"],
        "kernels_tuned": tuned_art.meta.tuning_db["kernels_tuned"],
        "onnxruntime_median_ms": tuned_cmp["baseline_median_ms"],
        "untuned_median_ms": untuned_cmp["median_ms"],
        "untuned_ratio_to_onnxruntime": untuned_cmp["ratio"],
        "untuned_build_seconds": round(untuned_build_s, 1),
        "tuned_median_ms": tuned_cmp["median_ms"],
        "tuned_ratio_to_onnxruntime": tuned_cmp["ratio"],
        "tuned_max_abs_diff_vs_onnxruntime": float(np.abs(got - want).max()),
        "goal_ratio": 1.3,
        "meets_goal": tuned_cmp["ratio"] <= 1.3,
        "where_the_time_goes": breakdown(tuned_art, list(feeds.values()), tasks, db, target),
    }


def breakdown(art, arrays: list[np.ndarray], tasks: list, db, target, top: int = 12) -> dict:
    """The tuned build's time per kernel in the model (``TvmArtifact.kernel_times``) next to the tuner's
    own best measurement of that kernel in isolation, times its calls per run; their sums, and the VM's
    builtins (allocation, shape checks). A kernel slower in the model than in the tuner, or a large
    builtin share, is time that more trials will not win back."""
    times = art.kernel_times(*arrays, runs=20)
    tuner = {name: sum(float(x) for x in r.run_secs) / len(r.run_secs)
             for name, r in db.records(tasks, target).items() if r.run_secs}
    # a kernel whose tuned schedule repacks a weight is built as NAME_prepacked (the repacking runs once
    # per weight set): the tuner's record is under NAME
    tuner = {**tuner, **{f"{k}_prepacked": v for k, v in tuner.items()}}
    kernels = {k: v for k, v in times.items() if not k.startswith("vm.builtin")}
    rows = [{"kernel": k, "calls": c, "in_model_ms": round(sec * 1e3, 4),
             "tuner_ms": round(tuner[k] * c * 1e3, 4) if k in tuner else None}
            for k, (c, sec) in list(kernels.items())[:top]]
    return {
        "kernels_in_model_ms": round(sum(sec for _, sec in kernels.values()) * 1e3, 3),
        "kernels_tuner_ms": round(sum(tuner[k] * c for k, (c, _) in kernels.items() if k in tuner) * 1e3, 3),
        "vm_builtins_ms": round(sum(sec for k, (_, sec) in times.items() if k not in kernels) * 1e3, 3),
        "note": "timed around each VM call (adds microseconds a call); tuner_ms = calls x the tuner's best",
        f"top_{top}_kernels": rows,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="bench/results/tvm_tuned.json")
    ap.add_argument("--models", default="resnet18_style,minilm")
    ap.add_argument("--target", default="x86_64_v3", help="TVM preset (x86_64: generic, SSE2 only)")
    ap.add_argument("--trials-per-kernel", type=int, default=4)
    ap.add_argument("--max-kernels", type=int, help="tune only the heaviest kernels (calls x FLOPs)")
    ap.add_argument("--seq", type=int, default=32)
    ap.add_argument("--db-dir", help="keep each model's tuning database in DB_DIR/MODEL-TARGET; a database "
                                     "already there is extended (trials add up) instead of starting over")
    ap.add_argument("--measure-only", action="store_true",
                    help="no tuning: build from the databases already in --db-dir and time them")
    args = ap.parse_args()
    if args.measure_only and not args.db_dir:
        ap.error("--measure-only times the databases in --db-dir: give --db-dir")
    torch.set_num_threads(1)
    results = {}
    with tempfile.TemporaryDirectory(prefix="regc-bench-tvm-") as tmp:
        db_dir = Path(args.db_dir or tmp)
        for name in args.models.split(","):
            t0 = time.perf_counter()
            results[name] = run_model(name, args.target, args.trials_per_kernel, args.max_kernels, args.seq,
                                      Path(tmp), db_dir, args.measure_only)
            results[name]["total_seconds"] = round(time.perf_counter() - t0, 1)
            results[name]["load_avg_1min_at_end"] = round(os.getloadavg()[0], 2)
            print(name, json.dumps(results[name]), flush=True)
            write(args.out, results)  # after each model: a long run leaves what it finished


def write(path: str, results: dict) -> None:
    """Write ``results`` to ``path``, keeping the entries of models this run did not measure (each model
    is tuned and timed in one run of its own; a ResNet run and a MiniLM run can share one file)."""
    previous = json.loads(Path(path).read_text())["results"] if Path(path).exists() else {}
    out = {
        "what": "TVM x86 (MetaSchedule-tuned and untuned) vs onnxruntime fp32, 1 thread, batch 1, "
                "each model's numbers from one run",
        "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform(),
                    "load_avg_at_end": os.getloadavg()},
        "results": {**previous, **results},
    }
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {path}", flush=True)


if __name__ == "__main__":
    main()
