"""ONNX backend node-test conformance of regc's importer: load_onnx -> Model.run vs expected outputs.

    python bench/onnx_conformance.py --out conformance.json [--data DIR] [--workers 2] [--filter REGEX]

Cases come from ``--data`` (the layout of onnx/backend/test/data/node: CASE/model.onnx and
CASE/test_data_set_*/{input,output}_*.pb), else from the installed onnx package's data folder, else
they are generated once from onnx's own test-case definitions into ~/.cache/regc/.

Each case is exactly one of:
  passed          every output matches (same dtype and shape; values within rtol/atol, NaN == NaN;
                  for float16/bfloat16 outputs rtol is at least the type's epsilon, 2^-10 / 2^-7: the
                  reference rounds after every op, and any other valid order of evaluation differs
                  from it by an ulp)
  not-applicable  decided from the model before running: it declares an element type torch cannot
                  hold or compute on (string, complex, float8/6/4, int4/uint4/int2/uint2, uint16/32/64)
  unsupported     the importer refused it with UnsupportedOpError / UnsupportedDtypeError
  failed          a wrong answer, or another typed regc error
  crashed         an exception that is not a regc error (must never happen)
Pass rate = passed / (passed + failed + unsupported + crashed).
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import re
import sys
import time
import traceback
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

STATUSES = ("passed", "failed", "unsupported", "crashed", "not-applicable")
DEFAULT_RTOL, DEFAULT_ATOL = 1e-3, 1e-7
_EPS = {"float16": 2.0**-10, "bfloat16": 2.0**-7}  # relative rounding step of the low-precision types


# ---- case data ---------------------------------------------------------------------------------
def node_data_dir(data: str | None = None) -> Path:
    """The folder of node cases: ``data``, onnx's installed copy, or a generated cache."""
    if data:
        return Path(data)
    installed = Path(onnx.__file__).parent / "backend" / "test" / "data" / "node"
    if installed.is_dir():
        return installed
    cache = Path.home() / ".cache" / "regc" / f"onnx-{onnx.__version__}-node"
    if not (cache / ".complete").exists():
        generate_node_data(cache)
    return cache


def _serialize(value: Any, vi: onnx.ValueInfoProto) -> bytes:
    kind = vi.type.WhichOneof("value")
    if isinstance(value, onnx.TensorProto):
        return value.SerializeToString()
    if kind == "sequence_type":
        return numpy_helper.from_list(value, vi.name).SerializeToString()
    if kind == "optional_type":
        return numpy_helper.from_optional(value, vi.name).SerializeToString()
    if kind == "map_type":
        return numpy_helper.from_dict(value, vi.name).SerializeToString()
    return numpy_helper.from_array(np.asarray(value), vi.name).SerializeToString()


def generate_node_data(out: Path) -> None:
    """Write onnx's node test cases in the on-disk layout, with their tolerances in tolerance.json."""
    import onnx.backend.test.case.node as node_cases

    out.mkdir(parents=True, exist_ok=True)
    for case in node_cases.collect_testcases(None):
        folder = out / case.name
        folder.mkdir(exist_ok=True)
        (folder / "model.onnx").write_bytes(case.model.SerializeToString())
        (folder / "tolerance.json").write_text(json.dumps({"rtol": case.rtol, "atol": case.atol}))
        for i, (inputs, outputs) in enumerate(case.data_sets):
            ds = folder / f"test_data_set_{i}"
            ds.mkdir(exist_ok=True)
            for prefix, values, infos in (
                ("input", inputs, case.model.graph.input),
                ("output", outputs, case.model.graph.output),
            ):
                for j, v in enumerate(values):
                    (ds / f"{prefix}_{j}.pb").write_bytes(_serialize(v, infos[j]))
    (out / ".complete").write_text(onnx.__version__)


def _read_tensor(path: Path) -> np.ndarray:
    t = onnx.TensorProto()
    t.ParseFromString(path.read_bytes())
    return numpy_helper.to_array(t)


def _data_sets(case: Path) -> list[tuple[list[np.ndarray], list[np.ndarray]]]:
    return [
        tuple(
            [_read_tensor(ds / f"{kind}_{j}.pb") for j in range(len(list(ds.glob(f"{kind}_*.pb"))))]
            for kind in ("input", "output")
        )
        for ds in sorted(case.glob("test_data_set_*"))
    ]


# ---- one case ----------------------------------------------------------------------------------
def _compare(got: Any, want: np.ndarray, rtol: float, atol: float) -> str | None:
    """None when equal, else why not. bfloat16 (numpy's ml_dtypes) is compared in float32."""
    got_type = str(got.dtype).removeprefix("torch.")
    got = (got.float() if got_type == "bfloat16" else got).detach().numpy()
    if got_type != want.dtype.name:
        return f"dtype {got_type} != expected {want.dtype.name}"
    rtol = max(rtol, _EPS.get(want.dtype.name, 0.0))
    if want.dtype.name == "bfloat16":
        want = want.astype(np.float32)
    if got.shape != want.shape:
        return f"shape {got.shape} != expected {want.shape}"
    if want.dtype.kind == "f":
        if not np.allclose(got, want, rtol=rtol, atol=atol, equal_nan=True):
            err = np.nanmax(np.abs(got.astype(np.float64) - want.astype(np.float64))) if got.size else 0.0
            return f"values differ (max abs error {err:.3g}, rtol={rtol}, atol={atol})"
    elif not np.array_equal(got, want):
        return f"values differ ({int(np.sum(got != want))} of {got.size} elements)"
    return None


def _check_data_set(
    model: onnx.ModelProto, name: str, ins: list[np.ndarray], outs: list[np.ndarray], rtol: float, atol: float
) -> str | None:
    """Import with this data set's values (inputs read as shapes are folded), run, compare; None if equal."""
    from regc.frontend.onnx_import import constant_input_names, import_model
    from regc.frontend.onnx_import._registry import tensor_from_numpy

    inits = {t.name for t in model.graph.initializer}
    by_name = dict(zip([vi.name for vi in model.graph.input if vi.name not in inits], ins, strict=True))
    needed = constant_input_names(model)
    folded = {k: v for k, v in by_name.items() if k in needed}
    fed = [v for k, v in by_name.items() if k not in folded]
    m = import_model(model, source=name, constant_inputs=folded, example_inputs=fed)
    got = m.run(*[tensor_from_numpy(v) for v in fed])
    if len(got) != len(outs):
        return f"{len(got)} outputs, expected {len(outs)}"
    for k, (g, w) in enumerate(zip(got, outs, strict=True)):
        why = _compare(g, w, rtol, atol)
        if why:
            return f"output {k}: {why}"
    return None


def run_case(case: str) -> dict[str, Any]:
    """Import and run one case folder; return {name, ops, status, reason, seconds}."""
    from regc.errors import RegcError, UnsupportedDtypeError, UnsupportedOpError
    from regc.frontend.onnx_import import import_model
    from regc.frontend.onnx_import._dtypes import unsupported_types

    folder = Path(case)
    start = time.perf_counter()
    model = onnx.load(str(folder / "model.onnx"))
    result: dict[str, Any] = {"name": folder.name, "ops": sorted({n.op_type for n in model.graph.node})}
    bad = unsupported_types(model)
    if bad:
        where, name = next(iter(bad.items()))
        return {**result, "status": "not-applicable", "reason": f"{where}: {name}", "seconds": 0.0}
    tol = json.loads((folder / "tolerance.json").read_text()) if (folder / "tolerance.json").exists() else {}
    status, reason = "passed", ""
    try:
        graph_io = (*model.graph.input, *model.graph.output)
        if any(vi.type.WhichOneof("value") != "tensor_type" for vi in graph_io):
            import_model(model, source=folder.name)  # sequence/optional values: the importer's typed refusal
        for ins, outs in _data_sets(folder):
            why = _check_data_set(
                model, folder.name, ins, outs, tol.get("rtol", DEFAULT_RTOL), tol.get("atol", DEFAULT_ATOL)
            )
            if why:
                status, reason = "failed", why
                break
    except (UnsupportedOpError, UnsupportedDtypeError) as e:
        status, reason = "unsupported", f"{type(e).__name__}: {e}"
    except RegcError as e:
        status, reason = "failed", f"{type(e).__name__}: {e}"
    except Exception as e:  # noqa: BLE001  (counted: must be zero)
        status = "crashed"
        reason = f"{type(e).__name__}: {e}\n{traceback.format_exc(limit=-4)}"
    seconds = round(time.perf_counter() - start, 3)
    return {**result, "status": status, "reason": reason[:2000], "seconds": seconds}


def _init_worker() -> None:
    import logging
    import warnings

    import torch

    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)


# ---- the run -----------------------------------------------------------------------------------
def run(
    data: str | None = None, workers: int = 2, pattern: str | None = None, names: list[str] | None = None
) -> dict[str, Any]:
    """Run every case (matching ``pattern``, or among ``names``) and return the summary."""
    root = node_data_dir(data)
    cases = sorted(
        str(p.parent)
        for p in root.glob("*/model.onnx")
        if (not pattern or re.search(pattern, p.parent.name)) and (names is None or p.parent.name in names)
    )
    start = time.perf_counter()
    if workers > 1:
        with ProcessPoolExecutor(workers, mp_context=get_context("spawn"), initializer=_init_worker) as pool:
            results = list(pool.map(run_case, cases, chunksize=8))
    else:
        _init_worker()
        results = [run_case(c) for c in cases]
    return summarize(results, time.perf_counter() - start)


def summarize(results: list[dict[str, Any]], seconds: float) -> dict[str, Any]:
    counts = collections.Counter(r["status"] for r in results)
    applicable = sum(counts[s] for s in ("passed", "failed", "unsupported", "crashed"))
    per_op: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    for r in results:
        for op in r["ops"]:
            per_op[op][r["status"]] += 1
    import torch

    return {
        "onnx": onnx.__version__,
        "torch": torch.__version__,
        "seconds": round(seconds, 1),
        "cases": len(results),
        "counts": {s: counts[s] for s in STATUSES},
        "applicable": applicable,
        "pass_rate": round(counts["passed"] / applicable, 4) if applicable else 0.0,
        "per_op": {op: dict(c) for op, c in sorted(per_op.items())},
        "not_passed": [
            {k: r[k] for k in ("name", "status", "reason")}
            for r in results
            if r["status"] not in ("passed", "not-applicable")
        ],
        "not_applicable": {r["name"]: r["reason"] for r in results if r["status"] == "not-applicable"},
        "slowest": {r["name"]: r["seconds"] for r in sorted(results, key=lambda r: -r["seconds"])[:20]},
    }


def print_table(report: dict[str, Any]) -> None:
    c = report["counts"]
    print(
        f"ONNX node conformance (onnx {report['onnx']}, torch {report['torch']}): {report['cases']} cases "
        f"in {report['seconds']} s"
    )
    for s in STATUSES:
        print(f"  {s:15s} {c[s]:5d}")
    print(f"  pass rate       {report['pass_rate']:.1%} of {report['applicable']} applicable")
    worst = sorted(
        (
            (sum(v for k, v in cnt.items() if k in ("failed", "unsupported", "crashed")), op)
            for op, cnt in report["per_op"].items()
        ),
        reverse=True,
    )[:15]
    print("  ops with most non-passing cases: " + ", ".join(f"{op} {n}" for n, op in worst if n))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="JSON summary path")
    ap.add_argument("--data", help="folder of node cases (default: onnx's, or generated once)")
    ap.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1))
    ap.add_argument("--filter", help="regex on case names")
    args = ap.parse_args(argv)
    report = run(args.data, args.workers, args.filter)
    Path(args.out).write_text(json.dumps(report, indent=1))
    print_table(report)
    return 0 if report["counts"]["crashed"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
