"""Helpers shared by the bench scripts (run as ``python bench/X.py``, which puts ``bench/`` on sys.path).

Latency belongs to ``regc.runtime.bench`` (``bench``/``compare``); this holds only the plumbing.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Callable

import onnxruntime as ort

import regc


def capture(z) -> regc.Model:
    """Capture a ``regc.zoo`` model with its input/output names and dynamic shapes."""
    return regc.capture(z.module, z.example_inputs, z.dynamic_shapes, input_names=z.input_names,
                        output_names=z.output_names)


def write_json(path: str | os.PathLike[str], result: dict, indent: int = 1) -> Path:
    """Write ``result`` as JSON to ``path``, creating its folder; return the path."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=indent))
    return out


def ort_session(model: str | os.PathLike[str] | bytes, optimized: str | os.PathLike[str] | None = None,
                profile_prefix: str | None = None) -> ort.InferenceSession:
    """An onnxruntime CPU session as every bench measures it: 1 intra-op and 1 inter-op thread, all graph
    optimizations, warnings off. ``model``: a path or serialized bytes; ``optimized``: also write the
    optimized graph there; ``profile_prefix``: turn on the profiler, its file named from this prefix."""
    so = ort.SessionOptions()
    so.intra_op_num_threads = so.inter_op_num_threads = 1
    so.log_severity_level = 3
    if optimized is not None:
        so.optimized_model_filepath = str(optimized)
    if profile_prefix is not None:
        so.enable_profiling = True
        so.profile_file_prefix = profile_prefix
    src = model if isinstance(model, bytes) else str(model)
    return ort.InferenceSession(src, so, providers=["CPUExecutionProvider"])


def interleaved(calls: dict[str, Callable[[], object]], runs: int, warmup: int = 3) -> dict[str, list[float]]:
    """Milliseconds of every zero-argument call over ``runs`` rounds after ``warmup`` rounds; each round
    makes every call once, starting at a rotating position, so load changes hit all calls alike."""
    names = list(calls)
    times: dict[str, list[float]] = {n: [] for n in names}
    for i in range(warmup + runs):
        for n in names[i % len(names):] + names[:i % len(names)]:
            t0 = time.perf_counter()
            calls[n]()
            if i >= warmup:
                times[n].append(1e3 * (time.perf_counter() - t0))
    return times
