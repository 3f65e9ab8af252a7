"""MetaSchedule tuning of regc's TVM kernels, kept as a reusable, versioned database folder.

For every fused kernel ``K`` of the model (``tvm_backend.fuse_kernels``, the same kernels a build
compiles) tuning looks for a schedule ``s`` (loop tiling, vectorization, parallel loops, unrolling,
inlining, and on CPUs the tiled layout each weight is read in: ``fuse_kernels`` marks weights
layout-free, and a build repacks them once per weight set) that minimizes ``latency(K, s)``, measured on
this machine. Repacking took 12 tuned MiniLM-shaped linears (512 trials) from 1.42x to 1.30x
onnxruntime; with the budget spent as below too, the tuned MiniLM runs at 1.00x (bench/tvm_tuned.py).
Candidates come from an evolutionary search ranked by an XGBoost cost model fitted to the measurements
so far. ``trials`` is the total number of measured candidates over all kernels, so tuning time grows
linearly with it: every kernel gets a first batch (up to 64 candidates), then MetaSchedule's gradient
task scheduler gives the rest, batch by batch, to the kernel whose progress cuts ``sum_K calls(K) *
latency(K)`` most (in MiniLM, the three linear shapes). A kernel stops when a batch measures nothing
(its design space is spent: an elementwise kernel has a handful of schedules) or it has no valid
candidate after a batch (``take`` on random indices); the scheduler would otherwise keep picking them,
and a 32-trials-per-kernel MiniLM tune spent 840 of its 1230 s on searches that measured nothing. Each
batch also costs a fixed search overhead (the evolutionary search, ~10-30 s here; builds take ~0.5 s and
measurements ~0.1 s a candidate), so ``max_kernels`` can restrict tuning to the kernels with the most
work, ``calls(K) * FLOPs(K)``; the others keep default schedules. Candidates are compiled in one builder
process kept for the whole tune (TVM's ``LocalBuilder`` starts a new one, ~15 s, per batch).

Untuned CPU builds are 22-155x slower than onnxruntime (ARCHITECTURE.md section 5): tune once per
model, shapes and target, then reuse the folder::

    regc tune out/model.onnx --target x86_64 --trials 512 --db tuned/
    regc compile out/model.onnx -p '' -t x86_64 --tuning-db tuned/ -o build/

The folder holds TVM's JSONDatabase (``database_workload.json``, ``database_tuning_record.json``)
and ``regc_tuning.json``: format version, preset, target, TVM versions, trials, seconds, and each
kernel's name and structural hash. A build applies it only for the same target and TVM version
(schedules are not portable across either); kernels are looked up by structure, so a database
covers any model with the same kernels, and kernels it lacks keep the default schedules.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

from regc.errors import ConfigError, LoweringError
from regc.files import sha256_file
from regc.ir import Model
from regc.plugins import Command

__all__ = ["INFO_FILE", "TuningDatabase", "import_tensor_intrinsics", "tune_tvm", "TUNE_COMMAND"]

INFO_FILE = "regc_tuning.json"
# 2: fuse_kernels lifts weight-only kernels out of main and computes exp/erf/tanh with polynomials, which
# changed the kernels (and keys) of most models; version-1 databases would match only some of them.
# 3: CPU kernels' weight buffers are layout-free (a tuned schedule may repack them), which changed their keys.
# 4: CPU convs on narrow maps are NHWC kernels (tvm_conv_layout): a version-3 database has no record for them.
# 5: the NHWC layout spreads over those convs' bias adds, ReLUs and residual adds, now fused into them.
FORMAT_VERSION = 5
# Each candidate is built and run in a worker process that imports tvm first (seconds on a busy
# machine); TVM's 30 s default times such candidates out and loses them.
_TIMEOUT_S = 300.0
# Candidates one builder process compiles before it is restarted (see _reusing_builder).
_BUILDS_PER_PROCESS = 256


def import_tensor_intrinsics() -> None:
    """Import ``tvm.s_tir.tensor_intrin`` (MetaSchedule imports it in the tuner and in every builder
    worker) in seconds instead of minutes.

    Its ~250 TVMScript definitions each call ``inspect.stack()``, which asks ``inspect.getmodule`` for
    every frame; for the ``<frozen importlib...>`` frames of an import that lookup scans all of
    ``sys.modules`` and still answers None (a frame has no ``__name__``). 77 s -> 7 s here. The
    shortcut answers None for ``<...>`` file names directly, only while the import runs.
    """
    import inspect
    import sys

    if "tvm.s_tir.tensor_intrin" in sys.modules:
        return
    getmodule = inspect.getmodule

    def _getmodule(obj: Any, _filename: str | None = None) -> Any:
        if _filename is not None and _filename.startswith("<") and inspect.isframe(obj):
            return None
        return getmodule(obj, _filename)

    inspect.getmodule = _getmodule
    try:
        import tvm.s_tir.tensor_intrin  # noqa: F401
    finally:
        inspect.getmodule = getmodule


@dataclasses.dataclass
class TuningDatabase:
    """A tuning database folder and its ``regc_tuning.json`` (``info``)."""

    path: Path
    info: dict[str, Any]
    _database: Any = dataclasses.field(default=None, init=False, repr=False, compare=False)

    @classmethod
    def open(cls, path: str | Path, preset: str, target: Any) -> "TuningDatabase":
        """Open ``path`` for a build with ``preset``/``target``; raise ``ConfigError`` when it was
        written for another target or TVM version, or is not a tuning database."""
        from regc.backends.tvm_backend import tvm_versions

        path = Path(path)
        try:
            info = json.loads((path / INFO_FILE).read_text())
        except FileNotFoundError as e:
            raise ConfigError(
                f"--tuning-db {path}: no {INFO_FILE}; write the database with 'regc tune'") from e
        except (OSError, ValueError) as e:
            raise ConfigError(
                f"--tuning-db {path}: {INFO_FILE} is unreadable ({e}); re-run 'regc tune'") from e
        if info.get("format_version") != FORMAT_VERSION:
            raise ConfigError(f"--tuning-db {path}: format_version {info.get('format_version')!r}, this regc "
                              f"reads {FORMAT_VERSION}; re-run 'regc tune'")
        if info.get("target") != _target_json(target):
            raise ConfigError(f"--tuning-db {path} was tuned for target {info.get('preset')!r} "
                              f"({info.get('target')}), not '{preset}' ({_target_json(target)}); "
                              f"run 'regc tune --target {preset}'")
        ours = tvm_versions()
        for key in ("tvm", "tvm_ffi"):
            if info.get("versions", {}).get(key) != ours[key]:
                theirs = info.get("versions", {}).get(key)
                raise ConfigError(f"--tuning-db {path} was tuned with {key} {theirs}, "
                                  f"this is {ours[key]}; schedules do not carry over: re-run 'regc tune'")
        return cls(path, info)

    def database(self) -> Any:
        """The folder's records as TVM's JSONDatabase, read from disk once."""
        if self._database is None:
            from tvm.s_tir import meta_schedule as ms

            self._database = ms.database.JSONDatabase(work_dir=str(self.path), allow_missing=False)
        return self._database

    def records(self, tasks: list[Any], target: Any) -> dict[str, Any]:
        """The best tuning record (schedule trace, ``run_secs``) held for each of ``tasks``
        (``kernel_tasks``), by kernel name; kernels it has none for are left out."""
        database = self.database()
        found = ((t.task_name, database.query_tuning_record(t.dispatched[0], target, t.task_name))
                 for t in tasks)
        return {name: r for name, r in found if r is not None}

    def apply(self, kernels: Any, target: Any) -> tuple[Any, dict[str, Any]]:
        """Replace the kernels of ``kernels`` (a ``fuse_kernels`` module) that the database has
        schedules for; return the module and a summary for ``ArtifactMeta.tuning_db``. Raise
        ``ConfigError`` when it covers none of them (tuned for another model or other shapes)."""
        from tvm import relax

        from regc.backends.tvm_backend import kernel_tasks

        tasks = kernel_tasks(kernels, target)
        covered = self.records(tasks, target)
        if tasks and not covered:
            raise ConfigError(
                f"--tuning-db {self.path} has no schedule for any of this model's {len(tasks)} kernels "
                f"(tuned for another model or input shapes); run 'regc tune' on this model")
        with target, self.database():
            kernels = relax.transform.MetaScheduleApplyDatabase()(kernels)
        # a tuned CPU kernel that reads a weight in its own tiled layout starts with a repacking block:
        # split it out into a kernel of its own and lift that into main_transform_params, so the
        # weights are repacked once per weight set instead of on every run
        kernels = relax.transform.SplitLayoutRewritePreproc()(kernels)
        kernels = relax.transform.LiftTransformParams()(kernels)
        summary = {"kernels_tuned": len(covered), "kernels_total": len(tasks),
                   "trials": self.info.get("trials"), "records_sha256": self.info.get("records_sha256")}
        return kernels, summary


def tune_tvm(
    model: Model,
    preset: str = "x86_64",
    *,
    trials: int,
    db: str | Path,
    arch: str | None = None,
    seed: int = 0,
    max_kernels: int | None = None,
    log: Callable[[str], None] = print,
) -> TuningDatabase:
    """Tune ``model``'s kernels for ``preset`` with ``trials`` measured candidates in total and write
    the database folder ``db`` (created, or extended when it already holds a database for the same
    target: records add up). ``max_kernels``: tune only that many kernels, the heaviest by
    ``calls * FLOPs``. Progress goes to ``log``: one line per measured batch."""
    import tvm
    import tvm_ffi
    from tvm.s_tir import meta_schedule as ms

    from regc.backends.tvm_backend import (
        PRESETS,
        fuse_kernels,
        get_preset,
        host_cpu_flags,
        import_relax,
        kernel_tasks,
        tvm_versions,
    )

    p = get_preset(preset)
    faster = [q.name for q in PRESETS.values() if q.arch == p.arch and q.device == p.device and
              set(p.cpu_flags) < set(q.cpu_flags) <= host_cpu_flags()]
    if faster:
        log(f"note: this CPU also runs the '{faster[0]}' target, whose tuned kernels use wider vector "
            f"instructions (2.3x faster on a conv, measured); '{preset}' code runs on any {p.arch} CPU")
    if p.cross_compiler:
        raise ConfigError(f"tuning measures kernels on this machine: '{preset}' code cannot run here; "
                          "run 'regc tune' on the target machine")
    missing = p.missing_cpu_flags()
    if missing:
        raise ConfigError(f"tuning measures kernels on this machine: its CPU lacks {', '.join(missing)}, "
                          f"which '{preset}' code uses; tune on a machine that has them, or for 'x86_64'")
    if p.device == "cuda" and not tvm.cuda().exist:
        raise ConfigError("tuning for 'cuda' measures kernels on a GPU and this machine has none")
    if not isinstance(trials, int) or trials < 1:
        raise ConfigError(f"--trials must be a positive integer, got {trials!r}")
    if max_kernels is not None and (not isinstance(max_kernels, int) or max_kernels < 1):
        raise ConfigError(f"--max-kernels must be a positive integer, got {max_kernels!r}")
    dynamic = {n: sorted(d) for n in model.input_names if (d := model.dynamic_dims(n))}
    if dynamic:  # MetaSchedule fails inside TVM on kernels with symbolic dims ("old_rv != nullptr")
        raise ConfigError(f"tuning needs static input shapes (schedules are tuned for one shape); dynamic "
                          f"dims {dynamic}: capture or export the model with the shapes it will run at")
    try:
        import xgboost  # noqa: F401  (MetaSchedule's cost model)
    except ImportError as e:
        raise ConfigError("regc tune needs xgboost: pip install 'xgboost-cpu>=2.1,<4'") from e
    target = p.tvm_target(arch)
    tune_target = _with_num_cores(target)
    db = Path(db)
    if (db / INFO_FILE).exists():
        previous = TuningDatabase.open(db, preset, target)
    elif db.exists() and any(db.iterdir()):
        raise ConfigError(f"--db {db} exists and is not a tuning database; choose another folder")
    else:
        previous = None
    db.mkdir(parents=True, exist_ok=True)

    import_tensor_intrinsics()
    kernels = fuse_kernels(import_relax(model).mod, target)
    extracted = kernel_tasks(kernels, tune_target)
    if not extracted:
        raise LoweringError("the model has no kernels to tune")
    found = len(extracted)
    extracted = heaviest_kernels(extracted, max_kernels or found)
    batch = min(64, trials)
    log(f"tuning {len(extracted)} of {found} kernels for '{preset}', {trials} trials "
        f"(a first batch of <= {batch} per kernel, the rest where it saves the most time)")
    t0 = time.perf_counter()
    progress = _progress_callback(trials, t0, log)
    built = [0]

    def on_built(n: int) -> None:  # the first measurements are only reported once every kernel has a batch
        built[0] += n
        log(f"[{built[0]}/{trials} candidates built, {time.perf_counter() - t0:.0f}s]")

    builder = _reusing_builder(timeout_sec=_TIMEOUT_S, initializer=import_tensor_intrinsics,
                               on_built=on_built)
    try:
        with tempfile.TemporaryDirectory(prefix="regc-tune-") as work:
            contexts, weights = ms.relax_integration.extracted_tasks_to_tune_contexts(
                extracted, work_dir=work, seed=seed)
            ms.tune.tune_tasks(
                tasks=contexts,
                task_weights=weights,
                work_dir=work,
                max_trials_global=trials,
                max_trials_per_task=trials,
                num_trials_per_iter=batch,
                builder=builder,
                runner=ms.runner.LocalRunner(timeout_sec=_TIMEOUT_S, evaluator_config=_cold_cache(p.device)),
                database=ms.database.JSONDatabase(work_dir=str(db)),
                measure_callbacks=[*ms.measure_callback.MeasureCallback.create("default"), progress],
            )
    finally:
        builder.close()
    seconds = time.perf_counter() - t0
    prev = previous.info if previous else {}
    info = {
        "format_version": FORMAT_VERSION,
        "preset": preset,
        "target": _target_json(target),
        "versions": tvm_versions(),
        "trials": trials + prev.get("trials", 0),
        "seconds": round(seconds + prev.get("seconds", 0), 1),
        "kernels": {**prev.get("kernels", {}),
                    **{t.task_name: str(tvm_ffi.structural_hash(t.mod)) for t in extracted}},
        "records_sha256": sha256_file(db / "database_tuning_record.json"),
    }
    (db / INFO_FILE).write_text(json.dumps(info, indent=2) + "\n")
    log(f"tuned in {seconds:.0f}s; database {db}")
    return TuningDatabase(db, info)


def _cold_cache(device: str) -> Any:
    """How candidates are timed: 5 single runs, each after flushing the CPU caches.

    In a model, a kernel meets its weights once per run, coming from memory, so the schedule that
    wins on warm repeats is often not the one that streams weights best. Measured on 12 linears of
    MiniLM's shapes (6 x 384->1536->384, 32 tokens), 128 trials each way, x86_64_v3:
    - timed on warm repeats (3 runs of >= 20 ms on the same buffers): the tuned chain ran 2.41x
      onnxruntime;
    - timed cold: 1.57x (the 384->1536 kernel 12.6 -> 5.7 ms a run in the model).
    """
    from tvm.s_tir import meta_schedule as ms

    return ms.runner.EvaluatorConfig(number=1, repeat=5, min_repeat_ms=0,
                                     enable_cpu_cache_flush=device == "cpu")


def heaviest_kernels(tasks: list[Any], n: int) -> list[Any]:
    """The ``n`` extracted tasks with the most work, ``weight * FLOPs`` (weight = calls per run)."""
    from tvm.s_tir.analysis import estimate_tir_flops

    return sorted(tasks, key=lambda t: -t.weight * estimate_tir_flops(t.dispatched[0]))[:n]


def _reusing_builder(*, timeout_sec: float, initializer: Callable[[], None],
                     max_process_uses: int = _BUILDS_PER_PROCESS,
                     on_built: Callable[[int], None] = lambda n: None) -> Any:
    """A MetaSchedule ``LocalBuilder`` with one worker process (two built a batch slower on a shared
    2-core machine) that it keeps for the whole tune; ``close()`` ends it.

    TVM's ``LocalBuilder`` starts a fresh process pool for every batch of candidates, and once more
    for its sanity check: each start imports tvm and runs ``initializer`` (the tensor intrinsics),
    ~10-15 s here, i.e. a third of building a 64-candidate batch (0.5 s a candidate). Reusing the
    process keeps that cost to one start per ``max_process_uses`` builds; restarting then bounds the
    memory that TVM's comment says leaks in long-lived builder workers. Builds and their results are
    the same as ``LocalBuilder``'s. ``on_built(n)`` is called after each batch of ``n`` candidates: the
    task scheduler measures every kernel's first batch before it reports any result, so this is the
    only progress a tune of one batch per kernel shows until its end."""
    from tvm.ir.utils import derived_object
    from tvm.s_tir.meta_schedule.builder import BuilderResult, LocalBuilder
    from tvm.s_tir.meta_schedule.builder import local_builder as lb
    from tvm.s_tir.meta_schedule.utils import get_global_func_with_default_on_worker
    from tvm.support.popen_pool import PopenPoolExecutor, StatusKind

    @derived_object
    class ReusingBuilder(LocalBuilder._cls):  # type: ignore[misc,name-defined]
        def __init__(self) -> None:
            self.pool = PopenPoolExecutor(max_workers=1, timeout=timeout_sec, initializer=initializer,
                                          maximum_process_uses=max_process_uses)
            super().__init__(max_workers=1, timeout_sec=timeout_sec, initializer=initializer)

        def _sanity_check(self) -> None:
            f_build, f_export = self.f_build, self.f_export

            def check() -> None:
                get_global_func_with_default_on_worker(name=f_build, default=None)
                get_global_func_with_default_on_worker(name=f_export, default=None)

            self.pool.submit(check).result()

        def build(self, build_inputs: list[Any]) -> list[Any]:
            jobs = [(self.f_build, self.f_export, b.mod, b.target, lb._serialize_params(b.params))
                    for b in build_inputs]
            results = []
            for r in self.pool.map_with_error_catching(lambda job: lb._worker_func(*job), jobs):
                if r.status == StatusKind.COMPLETE:
                    results.append(BuilderResult(r.value, None))
                elif r.status == StatusKind.TIMEOUT:
                    results.append(BuilderResult(
                        None, f"LocalBuilder: Timeout, killed after {self.timeout_sec} seconds"))
                else:
                    results.append(BuilderResult(None, f"LocalBuilder: An exception occurred\n{r.value}"))
            on_built(len(results))
            return results

        def close(self) -> None:
            self.pool.shutdown()

    return ReusingBuilder()


def _progress_callback(total: int, t0: float, log: Callable[[str], None]) -> Any:
    """A measure callback that logs each batch and stops a kernel (``terminate_task``) whose batch
    measured nothing or that has no valid candidate yet (see the module docstring)."""
    from tvm.ir.utils import derived_object
    from tvm.s_tir.meta_schedule.measure_callback import PyMeasureCallback

    @derived_object
    class Progress(PyMeasureCallback):
        def __init__(self) -> None:
            super().__init__()
            self.done = 0
            self.best: dict[int, float] = {}

        def apply(self, task_scheduler, task_id, measure_candidates, builder_results, runner_results):
            self.done += len(runner_results)
            times = [sum(float(x) for x in r.run_secs) / len(r.run_secs) for r in runner_results
                     if r.error_msg is None and r.run_secs]
            if times:
                self.best[task_id] = min(self.best.get(task_id, float("inf")), min(times))
            name = task_scheduler.tasks_[task_id].ctx.task_name
            best = f"{self.best[task_id] * 1e3:.3f} ms" if task_id in self.best else "no valid candidate"
            stop = ("; stops: no new candidate" if not runner_results else
                    "; stops, keeps the default schedule" if task_id not in self.best else "")
            log(f"[{self.done}/{total} trials, {time.perf_counter() - t0:.0f}s] {name}: best {best}{stop}")
            if stop:
                task_scheduler.terminate_task(task_id)

    return Progress()


def _with_num_cores(target: Any) -> Any:
    """``target`` with the ``num-cores`` MetaSchedule's CPU rules need: the threads the kernels will
    run with (TVM_NUM_THREADS when set, else the physical cores). A build does not need it."""
    import psutil
    import tvm

    if target.kind.name != "llvm":
        return target
    cores = int(os.environ.get("TVM_NUM_THREADS") or psutil.cpu_count(logical=False) or 1)
    return tvm.target.Target({**dict(target.export()), "num-cores": cores})


def _target_json(target: Any) -> dict[str, Any]:
    """The target as a JSON-comparable dict (attributes TVM fills in included)."""
    return json.loads(json.dumps(dict(target.export()), default=str))


# ---- the `regc tune` command ---------------------------------------------------------------------
def _configure(parser: Any) -> None:
    parser.add_argument("model",
                        help="an .onnx file, MODULE:FUNCTION, or a compile output folder (its model.onnx)")
    parser.add_argument("-t", "--target", default="x86_64",
                        help="TVM preset to tune for (see 'regc targets')")
    parser.add_argument("--arch", help="CUDA compute capability for --target cuda (e.g. sm_80)")
    parser.add_argument("--trials", type=int, default=512,
                        help="measured candidates in total (time ~ linear)")
    parser.add_argument("--db", required=True, help="database folder to write (or extend)")
    parser.add_argument("--max-kernels", type=int,
                        help="tune only this many kernels, the heaviest (calls x FLOPs); others keep "
                             "default schedules")
    parser.add_argument("--seed", type=int, default=0)


def _run(args: Any) -> int:
    from regc.cli import load_model_spec

    spec = args.model
    if os.path.isdir(spec) and os.path.isfile(os.path.join(spec, "model.onnx")):
        spec = os.path.join(spec, "model.onnx")
    model = load_model_spec(spec)
    tune_tvm(model, args.target, trials=args.trials, db=args.db, arch=args.arch, seed=args.seed,
             max_kernels=args.max_kernels)
    return 0


TUNE_COMMAND = Command("tune", "tune a model's TVM kernels with MetaSchedule into a reusable database",
                       _configure, _run)
