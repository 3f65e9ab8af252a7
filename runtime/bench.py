"""Latency of compiled artifacts, measured in this process.

    bench("out/x86_64")                       # {"median_ms", "p90_ms", "mean_ms", "iters"}
    compare("out/x86_64", "out/model.onnx")   # the same keys, "baseline_"-prefixed ones, and "ratio"

Inputs default to random data shaped by the artifact's declared inputs (``random_inputs``). Timings
are wall-clock per ``runner.run`` call, input checks and host<->device copies included; they compare
artifacts on the same machine and are not tests.
"""

from __future__ import annotations

import functools
import os
import time
from typing import Callable, TypedDict

import numpy as np

from regc.backends.tvm_backend import TensorSpec
from regc.errors import ConfigError, InputMismatchError
from regc.runtime.artifact import Runner, open_artifact

__all__ = ["Comparison", "Timing", "bench", "compare", "random_inputs"]

ArtifactLike = Runner | str | os.PathLike[str]


class Timing(TypedDict):
    median_ms: float
    p90_ms: float
    mean_ms: float
    iters: int


class Comparison(Timing):
    """The artifact's timing, the baseline's under ``baseline_`` keys, and their ratio."""

    baseline_median_ms: float
    baseline_p90_ms: float
    baseline_mean_ms: float
    baseline_iters: int
    ratio: float  # artifact median / baseline median: > 1 means the artifact is slower


def random_inputs(specs: list[TensorSpec], *, seed: int = 0) -> dict[str, np.ndarray]:
    """Random inputs for ``specs``: floats ~ N(0, 1), integers uniform in the spec's ``value_range``
    (``[0, 1]`` when unknown), booleans fair coins. Dynamic dims take the capture example's size, or 1."""
    rng = np.random.default_rng(seed)
    out = {}
    for s in specs:
        shape = s.example_shape or tuple(d if isinstance(d, int) else 1 for d in s.shape)
        dtype = np.dtype(s.dtype)
        if dtype == np.bool_:
            out[s.name] = rng.random(shape) < 0.5
        elif np.issubdtype(dtype, np.integer):
            low, high = s.value_range or (0, 1)
            out[s.name] = rng.integers(low, high, size=shape, endpoint=True).astype(dtype)
        else:
            out[s.name] = rng.standard_normal(shape).astype(dtype)
    return out


def bench(
    runner: ArtifactLike,
    inputs: dict[str, np.ndarray] | None = None,
    *,
    warmup: int = 3,
    iters: int | None = None,
    budget_s: float = 1.0,
) -> Timing:
    """Time ``runner.run(inputs)``: ``warmup`` untimed calls, then ``iters`` calls, or (``iters=None``)
    calls until ``budget_s`` seconds have passed (at least 3)."""
    _check_counts(warmup, iters, budget_s)
    r = _as_runner(runner)
    return _timing(_sample(_warmed_calls([r], inputs, warmup), iters, budget_s)[0])


def compare(
    artifact: ArtifactLike,
    baseline: ArtifactLike,
    inputs: dict[str, np.ndarray] | None = None,
    *,
    warmup: int = 3,
    iters: int | None = None,
    budget_s: float = 2.0,
) -> Comparison:
    """Time ``artifact`` against ``baseline`` on the same inputs, interleaving their calls (A B B A ...)
    so that drift in machine load hits both alike. ``iters`` counts calls of each."""
    _check_counts(warmup, iters, budget_s)
    a, b = _as_runner(artifact), _as_runner(baseline)
    if a.input_names != b.input_names:
        raise InputMismatchError(f"artifact takes inputs {a.input_names}, baseline takes {b.input_names}")
    ta, tb = _sample(_warmed_calls([a, b], inputs, warmup), iters, budget_s)
    ra, rb = _timing(ta), _timing(tb)
    return Comparison(
        **ra,
        baseline_median_ms=rb["median_ms"],
        baseline_p90_ms=rb["p90_ms"],
        baseline_mean_ms=rb["mean_ms"],
        baseline_iters=rb["iters"],
        ratio=ra["median_ms"] / rb["median_ms"],
    )


def _warmed_calls(
    runners: list[Runner], inputs: dict[str, np.ndarray] | None, warmup: int
) -> list[Callable[[], object]]:
    """One call per runner on ``inputs`` (random from the first runner's specs when None), after
    ``warmup`` untimed rounds of them all."""
    inputs = random_inputs(runners[0].input_specs) if inputs is None else inputs
    calls = [functools.partial(r.run, inputs) for r in runners]
    for _ in range(warmup):
        for call in calls:
            call()
    return calls


def _sample(fns: list[Callable[[], object]], iters: int | None, budget_s: float) -> list[list[float]]:
    """Per-function call times in ms; each round calls every function once, alternating the order."""
    times: list[list[float]] = [[] for _ in fns]
    start = time.perf_counter()

    def done(rounds: int) -> bool:
        if iters is not None:
            return rounds >= iters
        return rounds >= 3 and time.perf_counter() - start >= budget_s

    rounds = 0
    while not done(rounds):
        order = range(len(fns)) if rounds % 2 == 0 else reversed(range(len(fns)))
        for i in order:
            t0 = time.perf_counter()
            fns[i]()
            times[i].append((time.perf_counter() - t0) * 1e3)
        rounds += 1
    return times


def _timing(ms: list[float]) -> Timing:
    a = np.asarray(ms)
    return {
        "median_ms": float(np.median(a)),
        "p90_ms": float(np.percentile(a, 90)),
        "mean_ms": float(a.mean()),
        "iters": len(ms),
    }


def _as_runner(r: ArtifactLike) -> Runner:
    return r if isinstance(r, Runner) else open_artifact(r)


def _check_counts(warmup: int, iters: int | None, budget_s: float) -> None:
    if warmup < 0:
        raise ConfigError(f"bench warmup must be >= 0, got {warmup}")
    if iters is not None and iters < 1:
        raise ConfigError(f"bench iters must be >= 1, got {iters}")
    if budget_s <= 0:
        raise ConfigError(f"bench budget_s must be > 0, got {budget_s}")
