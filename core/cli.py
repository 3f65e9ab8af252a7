"""The ``regc`` command line. Every failure exits non-zero with one line naming what is wrong.

    regc compile MODEL -p PIPELINE [-t TARGET] [--data DATA.npz] -o OUT
    regc run ARTIFACT --inputs in.npz --outputs out.npz
    regc inspect MODEL [--json]
    regc passes [NAME]
    regc targets
    regc bench ARTIFACT [--baseline ARTIFACT]
    regc report OUT
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Sequence

from regc.errors import ConfigError, ModelFormatError, RegcError

__all__ = ["main"]


class _Progress:
    """Numbered step lines with elapsed time on stderr (stdout stays clean for --json)."""

    def __init__(self, total: int, quiet: bool = False):
        from rich.console import Console

        self.console = Console(stderr=True, highlight=False)
        self.total, self.i, self.quiet, self.t0 = total, 0, quiet, time.perf_counter()

    def step(self, what: str):
        self.i += 1
        if not self.quiet:
            self.console.print(f"[{self.i}/{self.total}] {what} (t={time.perf_counter() - self.t0:.1f}s)")
        return self.console.status(what, spinner="dots") if not self.quiet else _Null()

    def log(self, msg: str) -> None:
        if not self.quiet:
            self.console.print(f"      {msg}")


class _Null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def load_model_spec(spec: str):
    """``path.onnx`` -> regc.load; ``module:function`` -> the function's (module, example_inputs[,
    dynamic_shapes]), a ``regc.Model``, or an object with ``.module`` and ``.example_inputs``."""
    import regc

    if ":" in spec and not Path(spec).exists() and not spec.lower().endswith(".onnx"):
        mod_name, _, fn_name = spec.partition(":")
        sys.path.insert(0, os.getcwd())
        try:
            fn = getattr(importlib.import_module(mod_name), fn_name)
        except (ImportError, AttributeError) as e:
            raise ModelFormatError(f"cannot import '{spec}': {e}") from e
        obj = fn()
        if isinstance(obj, regc.Model):
            return obj
        if hasattr(obj, "module") and hasattr(obj, "example_inputs"):
            return regc.capture(obj.module, obj.example_inputs, getattr(obj, "dynamic_shapes", None),
                                input_names=getattr(obj, "input_names", None),
                                output_names=getattr(obj, "output_names", None))
        if isinstance(obj, tuple) and len(obj) in (2, 3):
            return regc.capture(*obj)
        raise ModelFormatError(f"'{spec}' returned {type(obj).__name__}; return (module, example_inputs) or a regc.Model")
    return regc.load(spec)


def cmd_compile(args) -> int:
    import torch

    import regc
    from regc.data import load_npz
    from regc.files import atomic_dir
    from regc.plugins import require, target
    from regc.registry import PassContext
    from regc.report import (
        build_report,
        latency_share,
        layer_profile,
        output_quality,
        summary_lines,
        write_html,
        write_report,
    )

    pipeline = regc.parse_pipeline(args.passes)
    target_opts: dict[str, str] = {}
    if args.target:
        args.target, target_opts = _target_spec(args.target)
        target(args.target)
    train_spec = _load_train_spec(args.train) if args.train else None
    out = Path(args.output)
    steps = 5 + bool(args.target)
    prog = _Progress(steps, args.quiet)
    with atomic_dir(out, "report.json", "regc output folder") as tmp:
        with prog.step(f"loading {args.model}"):
            model = load_model_spec(args.model)
        data = load_npz(args.data, model.input_names) if args.data else None
        if data is not None:
            data.check(model)
        original = model.clone()
        ctx = PassContext(data=data, train=train_spec, seed=args.seed, log=prog.log)
        torch.manual_seed(args.seed)
        with prog.step(f"running passes: {pipeline}"):
            model, records = pipeline.run(model, ctx)
        for r in records:
            prog.log(f"{r['pass']}: modified={r['modified']} ({r['seconds']:.2f}s)")
        with prog.step("exporting ONNX and checking it runs in onnxruntime"):
            model.save(str(tmp / "model.onnx"))
            _smoke_test(require("open_artifact")(tmp / "model.onnx"), model)
        artifacts = {"onnx": "model.onnx"}
        if args.target:
            with prog.step(f"lowering to {args.target}"):
                art = regc.lower(model, args.target, **target_opts,
                                 **({"tuning_db": args.tuning_db} if args.tuning_db else {}))
                art.save(str(tmp / args.target))
                if getattr(art, "runs_here", lambda: True)():
                    _smoke_test(require("open_artifact")(tmp / args.target), model)
                else:
                    prog.log(f"not run: this machine lacks the device '{args.target}' builds run on")
            artifacts[args.target] = args.target
        with prog.step("measuring quality and latency"):
            quality = output_quality(original, model, data) if data is not None else None
            latency = None if args.no_bench else _latency(original, tmp, require)
            profile = layer_profile(original, model, data)
            layer_latency = None if args.no_bench else latency_share(tmp / "model.onnx", model)
        report = build_report(source=args.model, pipeline=str(pipeline), target=args.target, before=original,
                              after=model, passes=records, quality=quality, latency=latency,
                              artifacts=artifacts, profile=profile, layer_latency=layer_latency)
        with prog.step("writing report"):
            write_report(report, tmp / "report.json")
            write_html(report, tmp / "report.html")
    for line in summary_lines(report, str(out)):
        print(line)
    return 0


def _target_spec(text: str) -> tuple[str, dict[str, str]]:
    """``-t`` text in pipeline-step syntax: 'cuda{arch=sm_80}' -> ('cuda', {'arch': 'sm_80'})."""
    from regc.pipeline import split_steps

    steps = list(split_steps(text))
    if len(steps) != 1:
        raise ConfigError(f"-t {text}: give one target, optionally with options, e.g. 'cuda{{arch=sm_80}}'")
    return steps[0]


def _smoke_test(runner, model) -> None:
    """Load + run one input + compare: a produced artifact that does not run is an error."""
    import numpy as np

    from regc.errors import LoweringError

    feeds = {n: t.detach().numpy() for n, t in zip(model.input_names, model.example_inputs)}
    got = runner.run(feeds)
    want = [t.detach().numpy() for t in model.run(*model.example_inputs)]
    for name, w in zip(model.output_names, want):
        g = got[name]
        tol = 1e-3 * max(1.0, float(np.abs(w).max()))
        if g.shape != w.shape or float(np.abs(g.astype(np.float64) - w).max()) > tol:
            raise LoweringError(
                f"the compiled artifact's output '{name}' differs from the regc model "
                f"(max abs diff {float(np.abs(g.astype(np.float64) - w).max()):.3g} > {tol:.3g})")


def _latency(original, tmp: Path, require) -> dict[str, Any]:
    """onnxruntime latency of the compiled model.onnx vs the original, measured in this run."""
    base = tmp / ".original.onnx"
    original.save(str(base))
    try:
        res = require("compare")(tmp / "model.onnx", base)
    finally:
        base.unlink(missing_ok=True)
    res["backend"] = "onnxruntime (1 thread)"
    return res


def _load_train_spec(path: str):
    from regc.train import TrainSpec

    return TrainSpec.from_file(path)


def cmd_report(args) -> int:
    from regc.report import load_report, per_layer_table, write_html, write_report

    out = Path(args.output)
    report = load_report(out)
    report["per_layer"] = per_layer_table(report)
    write_report(report, out / "report.json")
    write_html(report, out / "report.html")
    print(f"{'layer':<28}{'params':>18}{'MACs/sample':>22}{'out err':>10}{'latency':>9}")
    for row in report["per_layer"]["rows"]:
        err, share = row["output_rel_error"], row["latency_share"]
        err = "n/a" if err is None else f"{err:.1e}"
        share = "n/a" if share is None else f"{100 * share:.1f}%"
        print(f"{row['name'][-27:]:<28}{_arrow(row['params_before'], row['params_after']):>18}"
              f"{_arrow(row['macs_before'], row['macs_after']):>22}{err:>10}{share:>9}")
    print(f"report: {out / 'report.html'} (table: {out / 'report.json'} key 'per_layer')")
    return 0


def _arrow(a, b) -> str:
    return f"{'n/a' if a is None else a} -> {'n/a' if b is None else b}"


def cmd_run(args) -> int:
    from regc.plugins import require

    outputs = require("run_npz")(Path(args.artifact), Path(args.inputs), Path(args.outputs))
    for name, arr in outputs.items():
        print(f"{name}: shape {list(arr.shape)} dtype {arr.dtype}")
    return 0


def cmd_inspect(args) -> int:
    from regc.opclass import op_class
    from regc.report import layer_table

    model = load_model_spec(args.model)
    counts: dict[str, int] = {}
    classes: dict[str, int] = {}
    for n in model.call_nodes():
        name = str(n.target).replace("aten.", "")
        counts[name] = counts.get(name, 0) + 1
        c = op_class(n, model.gm).value
        classes[c] = classes.get(c, 0) + 1
    info = {
        "model": args.model,
        "origin": model.origin,
        "inputs": [{"name": n, "shape": list(t.shape), "dtype": str(t.dtype).replace("torch.", "")}
                   for n, t in zip(model.input_names, model.example_inputs)],
        "outputs": list(model.output_names),
        "params": model.num_params(),
        "bytes": model.weight_bytes(),
        "ops": dict(sorted(counts.items())),
        "op_classes": dict(sorted(classes.items())),
        "layers": {k: {"params": v["params"], "bytes": v["bytes"]} for k, v in layer_table(model).items()},
    }
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    print(f"{args.model} ({model.origin})")
    for i in info["inputs"]:
        print(f"  input  {i['name']}: {i['dtype']}{i['shape']}")
    for o in info["outputs"]:
        print(f"  output {o}")
    print(f"  params {info['params']:,}  bytes {info['bytes']:,}")
    print("  ops: " + ", ".join(f"{k} x{v}" for k, v in info["ops"].items()))
    print("  op classes: " + ", ".join(f"{k} x{v}" for k, v in info["op_classes"].items()))
    return 0


def cmd_passes(args) -> int:
    from regc.registry import all_passes, get_pass

    if args.name:
        info = get_pass(args.name)
        print(f"{info.name}  (phase {info.phase.name.lower()}, {'exact' if info.exact else 'lossy'}"
              f"{', needs --data' if info.needs_data else ''}"
              f"{', aliases: ' + ', '.join(info.aliases) if info.aliases else ''})")
        print(f"  {info.doc.splitlines()[0] if info.doc else ''}")
        for name, tp, default, help_ in info.options():
            print(f"  {name}: {tp} = {default!r}  {help_}")
        return 0
    for name, info in sorted(all_passes().items(), key=lambda kv: (kv[1].phase, kv[0])):
        alias = f" [{', '.join(info.aliases)}]" if info.aliases else ""
        first = info.doc.splitlines()[0] if info.doc else ""
        print(f"{name:<14}{info.phase.name.lower():<13}{first}{alias}")
    return 0


def cmd_targets(args) -> int:
    from regc.plugins import targets

    for name, t in sorted(targets().items()):
        print(f"{name:<10}{t.description}")
    return 0


def cmd_bench(args) -> int:
    from regc.plugins import require

    if args.baseline:
        res = require("compare")(Path(args.artifact), Path(args.baseline), warmup=args.warmup, iters=args.iters)
        print(f"{args.artifact}: median {res['median_ms']:.3f} ms, p90 {res['p90_ms']:.3f} ms")
        print(f"{args.baseline}: median {res['baseline_median_ms']:.3f} ms, p90 {res['baseline_p90_ms']:.3f} ms")
        print(f"ratio (artifact / baseline, same run): {res['ratio']:.3f}x")
    else:
        res = require("bench_artifact")(Path(args.artifact), warmup=args.warmup, iters=args.iters)
        print(f"{args.artifact}: median {res['median_ms']:.3f} ms, p90 {res['p90_ms']:.3f} ms ({res['iters']} runs)")
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2) + "\n")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="regc", description="A compiler for model compression.")
    p.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    sub = p.add_subparsers(dest="cmd", required=True, metavar="COMMAND")

    c = sub.add_parser("compile", help="run a pass pipeline, export ONNX, optionally lower to a target")
    c.add_argument("model", help="an .onnx file or MODULE:FUNCTION returning (module, example_inputs)")
    c.add_argument("-p", "--passes", required=True, help="pipeline text, e.g. 'fold_bn,prune{ratio=0.3}'")
    c.add_argument("-t", "--target", help="compile for a target preset (see 'regc targets')")
    c.add_argument("--data", help="calibration/training samples: .npz, keys = model input names (+ 'labels')")
    c.add_argument("--train", help="training recipe (JSON) for training-time passes")
    c.add_argument("--tuning-db", help="reuse a TVM tuning database written by 'regc tune'")
    c.add_argument("-o", "--output", required=True, help="output folder (written atomically)")
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--no-bench", action="store_true", help="skip the latency measurement")
    c.add_argument("-q", "--quiet", action="store_true", help="no progress lines")
    c.set_defaults(fn=cmd_compile)

    r = sub.add_parser("run", help="run an artifact (.onnx or compiled target folder) on inputs from an .npz")
    r.add_argument("artifact")
    r.add_argument("--inputs", required=True)
    r.add_argument("--outputs", required=True)
    r.set_defaults(fn=cmd_run)

    i = sub.add_parser("inspect", help="ops, params, bytes, inputs and outputs of a model")
    i.add_argument("model")
    i.add_argument("--json", action="store_true")
    i.set_defaults(fn=cmd_inspect)

    ps = sub.add_parser("passes", help="list passes, or show one pass's options and defaults")
    ps.add_argument("name", nargs="?")
    ps.set_defaults(fn=cmd_passes)

    rp = sub.add_parser("report", help="per-layer table (report.json) and static report.html of a compile")
    rp.add_argument("output", help="the -o folder of a 'regc compile' run")
    rp.set_defaults(fn=cmd_report)

    t = sub.add_parser("targets", help="list compile targets")
    t.set_defaults(fn=cmd_targets)

    b = sub.add_parser("bench", help="median and p90 latency, with a ratio to a baseline measured in the same run")
    b.add_argument("artifact")
    b.add_argument("--baseline")
    b.add_argument("--warmup", type=int, default=10)
    b.add_argument("--iters", type=int, default=100)
    b.add_argument("--json", help="also write the numbers to this JSON file")
    b.set_defaults(fn=cmd_bench)

    from regc.plugins import commands

    for cmd in commands().values():  # plug-in commands: tune (backends), export (runtime), ...
        sp = sub.add_parser(cmd.name, help=cmd.help)
        cmd.configure(sp)
        sp.set_defaults(fn=cmd.run)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    import warnings

    warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated")
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.fn(args)
    except RegcError as e:
        if args.debug:
            raise
        print(f"regc: error: {type(e).__name__}: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("regc: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # a bug: say so on one line, keep the traceback behind --debug
        if args.debug:
            raise
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        print(f"regc: internal error: {type(e).__name__}: {first} (rerun with --debug for the traceback)",
              file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
