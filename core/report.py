"""``report.json``: what a compile did, per pass and per layer, with measured quality and speed.

``layers`` is keyed by user name (module FQN or ONNX initializer name without its last segment):
params and bytes before/after. ``layer_profile`` (computed at compile time) and ``per_layer`` (one
table across all passes, rebuilt by ``regc report``) describe the graph's weighted layers, where a
layer is the set of ops that read the same module's tensors (a factorized conv's two convs, a
quantized linear's matmul and bias add). Per layer, on one calibration batch of ``B`` samples:

    MACs           = sum over conv/linear/matmul ops of  numel(y) * K / B     (K = reduction length)
    sparsity       = #{w == 0} / #w             over the weights as the ops see them (dequantized)
    output error   = ||y_after - y_before|| / ||y_before||,   SQNR = -20 log10(error)  [dB]
    latency share  = sum of onnxruntime profiler kernel times of the layer's ops / sum over all ops

An op without weights (ReLU, pooling) counts toward the nearest weighted layer upstream of it: the
layer's block. ``y`` is the block's last tensor, so a BatchNorm folded into the conv before it (its
own layer only in the original graph) joins that conv's block in both graphs and the comparison is
like for like. The error accumulates from the input (as in ORT ``qdq_loss_debug``); it is empty
where pruning changed the block output's shape.
"""

from __future__ import annotations

import dataclasses
import json
import math
import platform
import re
import tempfile
from pathlib import Path
from typing import Any

import torch
import torch.fx as fx

from regc.errors import ConfigError, InputMismatchError
from regc.ir import Model, param_bytes
from regc.opclass import OpClass, conv_transposed, op_class

__all__ = ["layer_table", "build_report", "write_report", "output_quality", "summary_lines", "layer_groups",
           "layer_profile", "latency_share", "per_layer_table", "write_html", "load_report"]

REPORT_VERSION = 1
HIST_BINS = 24
_LEAF = {"weight", "bias", "running_mean", "running_var", "num_batches_tracked"}
aten = torch.ops.aten


def _layer_key(user_name: str) -> str:
    head, _, leaf = user_name.rpartition(".")
    return head if head and leaf in _LEAF else user_name


def layer_table(model: Model) -> dict[str, dict[str, Any]]:
    """layer -> {params, bytes, tensors: {name: {shape, dtype}}} over parameters and buffers."""
    out: dict[str, dict[str, Any]] = {}
    for target, t in model.gm.state_dict().items():
        user = model.user_name(target)
        row = out.setdefault(_layer_key(user), {"params": 0, "bytes": 0, "tensors": {}})
        row["params"] += t.numel()
        row["bytes"] += param_bytes(t)
        row["tensors"][user] = {"shape": list(t.shape), "dtype": str(t.dtype).replace("torch.", "")}
    return out


def output_quality(reference: Model, candidate: Model, data, *, max_samples: int = 256,
                   batch_size: int = 64) -> dict[str, float]:
    """Compare outputs on calibration data: accuracy when labels exist, else cosine and error."""
    cos_num = cos_den_a = cos_den_b = 0.0
    max_abs = 0.0
    ref_sq = err_sq = 0.0
    correct_ref = correct_cand = seen = 0
    with torch.no_grad():
        for xs, y in data.batches(batch_size, like=reference.example_inputs):
            if seen >= max_samples:
                break
            a = reference.run(*xs)[0].double()
            b = candidate.run(*xs)[0].double()
            cos_num += float((a * b).sum())
            cos_den_a += float((a * a).sum())
            cos_den_b += float((b * b).sum())
            err_sq += float(((a - b) ** 2).sum())
            ref_sq += float((a * a).sum())
            max_abs = max(max_abs, float((a - b).abs().max()))
            if y is not None and a.dim() == 2 and y.dim() == 1:
                correct_ref += int((a.argmax(1) == y).sum())
                correct_cand += int((b.argmax(1) == y).sum())
            seen += xs[0].shape[0]
    q = {
        "samples": seen,
        "output_cosine": cos_num / max((cos_den_a * cos_den_b) ** 0.5, 1e-30),
        "output_rel_error": (err_sq / max(ref_sq, 1e-30)) ** 0.5,
        "output_max_abs_error": max_abs,
    }
    if data.labels is not None and seen:
        q["accuracy_before"] = correct_ref / seen
        q["accuracy_after"] = correct_cand / seen
        q["accuracy_delta"] = q["accuracy_after"] - q["accuracy_before"]
    return q


# ---- layers of a graph ---------------------------------------------------------------------------
@dataclasses.dataclass
class Layer:
    """The ops of one layer (graph order) and the tensors they read (get_attr targets)."""

    nodes: list[fx.Node]
    targets: set[str]
    main: fx.Node  # the op reading the layer's largest tensor
    tensor_inputs: set[fx.Node]  # inputs of ``nodes`` computed from tensors alone (weights, dequantized)


def base_name(user_name: str) -> str:
    """The layer a tensor's user name belongs to: ``features.4.weight_lowrank_a`` and
    ``classifier.weight:q`` -> ``features.4`` and ``classifier``."""
    name = re.sub(r"_(lowrank_[ab]|bias)$", "", user_name.split(":")[0])
    return _layer_key(name)


def layer_groups(model: Model) -> dict[str, Layer]:
    """layer name -> Layer, for every op that reads a tensor directly or through tensor-only ops
    (a dequantize of int8 codes)."""
    gm = model.gm
    reads: dict[fx.Node, set[str]] = {}  # get_attr and tensor-only nodes -> the targets behind them
    found: dict[str, Layer] = {}
    size = {}
    for n in gm.graph.nodes:
        if n.op == "get_attr":
            t = model.get_tensor(n.target)
            if isinstance(t, torch.Tensor):  # not a submodule of a control-flow op
                reads[n], size[n.target] = {n.target}, t.numel()
            continue
        if n.op != "call_function":
            continue
        ins = n.all_input_nodes
        targets = set().union(*(reads[a] for a in ins if a in reads))
        if ins and all(a in reads for a in ins):
            reads[n] = targets
            continue
        if not targets:
            continue
        big = max(sorted(targets), key=lambda t: size[t])
        name = model.annotations.get(big, {}).get("lowrank_of") or model.user_name(big)
        layer = found.setdefault(base_name(name), Layer([], set(), n, set()))
        layer.nodes.append(n)
        layer.tensor_inputs |= {a for a in ins if a in reads}
        if size[big] > max((size[t] for t in layer.targets), default=-1):
            layer.main = n
        layer.targets |= targets
    return found


class _Capture(fx.Interpreter):
    """Runs the graph and keeps, per layer op, its MACs, weight values and output dtype, and per block
    (``owner``: node -> layer) the last tensor it computed."""

    def __init__(self, gm: fx.GraphModule, ops: set[fx.Node], weight_inputs: set[fx.Node],
                 owner: dict[fx.Node, str]):
        super().__init__(gm)
        self.ops, self.weight_inputs, self.owner = ops, weight_inputs, owner
        self.macs: dict[fx.Node, int] = {}
        self.weights: dict[fx.Node, list[torch.Tensor]] = {}
        self.dtypes: dict[fx.Node, str] = {}
        self.block_out: dict[str, torch.Tensor] = {}

    def run_node(self, n: fx.Node) -> Any:
        out = super().run_node(n)
        if n in self.ops:
            args = [self.env.get(a) if isinstance(a, fx.Node) else a for a in n.args]
            self.macs[n] = _macs(n, args, out)
            self.weights[n] = [self.env[a] for a in n.all_input_nodes if a in self.weight_inputs
                               and _is_weight(self.env[a])]
            self.dtypes[n] = str(out.dtype).replace("torch.", "") if isinstance(out, torch.Tensor) else "-"
        if n in self.owner and isinstance(out, torch.Tensor):
            self.block_out[self.owner[n]] = out
        return out


def _blocks(model: Model, groups: dict[str, Layer], starts: set[str]) -> dict[fx.Node, str]:
    """node -> the layer whose block it is in: a block starts at the ops of a layer in ``starts`` and
    takes every later op whose first owned input is in it (activations, pooling, and the ops of
    layers not in ``starts``, such as a BatchNorm that the other graph folded away)."""
    own = {n: name for name, g in groups.items() if name in starts for n in g.nodes}
    out: dict[fx.Node, str] = {}
    for n in model.gm.graph.nodes:
        if n in own:
            out[n] = own[n]
        elif n.op == "call_function":
            src = next((out[a] for a in n.all_input_nodes if a in out), None)
            if src is not None:
                out[n] = src
    return out


def _is_weight(t: Any) -> bool:
    return isinstance(t, torch.Tensor) and t.is_floating_point() and sum(d > 1 for d in t.shape) >= 2


def _macs(n: fx.Node, args: list[Any], out: Any) -> int:
    if not isinstance(out, torch.Tensor) or len(args) < 2 or not all(isinstance(a, torch.Tensor)
                                                                      for a in args[:2]):
        return 0
    x, w = args[0], args[1]
    if op_class(n) is OpClass.CONV:
        k = w[0].numel()  # conv: C_in/groups * kernel; transposed: C_out/groups * kernel per input
        return x.numel() * k if conv_transposed(n) else out.numel() * k
    if n.target in (aten.linear.default, aten.addmm.default):
        return out.numel() * w.shape[-1]
    if n.target in (aten.matmul.default, aten.mm.default, aten.bmm.default):
        return out.numel() * x.shape[-1]
    return 0


def _analyze(model: Model, groups: dict[str, Layer], starts: set[str], xs: tuple[torch.Tensor, ...]
             ) -> tuple[dict[str, dict[str, Any]], dict[str, Any]]:
    """Per layer: static facts, the weights as seen by its ops, and its block's output on ``xs``."""
    ops = {n for g in groups.values() for n in g.nodes}
    cap = _Capture(model.gm, ops, {a for g in groups.values() for a in g.tensor_inputs},
                   _blocks(model, groups, starts))
    with torch.no_grad():
        cap.run(*xs)
    batch = xs[0].shape[0] if xs and xs[0].dim() else 1
    facts, outs = {}, {}
    for name, g in groups.items():
        tensors = [model.get_tensor(t) for t in sorted(g.targets)]
        weights = [w.detach().flatten().float() for n in g.nodes for w in cap.weights[n]]
        flat = torch.cat(weights) if weights else torch.zeros(0)
        facts[name] = {
            "op_class": op_class(g.main).value,
            "ops": [str(n.target).replace("aten.", "") for n in g.nodes],
            "params": sum(t.numel() for t in tensors),
            "bytes": sum(param_bytes(t) for t in tensors),
            "macs": sum(cap.macs[n] for n in g.nodes) // max(batch, 1),
            "weight_dtype": "/".join(sorted({str(t.dtype).replace("torch.", "") for t in tensors
                                             if t.dim() >= 2} or {"-"})),
            "activation_dtype": cap.dtypes[g.nodes[-1]],
            "sparsity": float((flat == 0).float().mean()) if flat.numel() else None,
        }
        outs[name] = (cap.block_out.get(name), flat)
    return facts, outs


def _profile_inputs(model: Model, data, n: int) -> tuple[torch.Tensor, ...]:
    if data is None:
        return model.example_inputs
    xs = next(iter(data.batches(n, like=model.example_inputs)))[0]
    try:
        model.check_inputs(xs)
    except InputMismatchError:
        return model.example_inputs
    return xs


def _histogram(before: torch.Tensor, after: torch.Tensor) -> dict[str, Any]:
    both = torch.cat([before, after])
    lo, hi = (float(both.min()), float(both.max())) if both.numel() else (0.0, 1.0)
    hi = hi if hi > lo else lo + 1.0
    return {"lo": lo, "hi": hi,
            "before": torch.histc(before, HIST_BINS, lo, hi).int().tolist() if before.numel() else [],
            "after": torch.histc(after, HIST_BINS, lo, hi).int().tolist() if after.numel() else []}


def _output_error(a: Any, b: Any) -> dict[str, Any]:
    if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)) or a.shape != b.shape:
        why = (f"output shape changed {list(a.shape)} -> {list(b.shape)}"
               if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) else "not a tensor output")
        return {"output_rel_error": None, "output_sqnr_db": None, "output_error_note": why}
    a, b = a.double(), b.double()
    err = float((a - b).norm() / a.norm().clamp(min=1e-30))
    return {"output_rel_error": err, "output_sqnr_db": round(-20 * math.log10(err), 2) if err > 0 else None}


def layer_profile(before: Model, after: Model, data=None, *, max_samples: int = 16) -> dict[str, Any]:
    """Per-layer facts of both graphs on the first ``max_samples`` calibration samples (the example
    inputs without data, or when the batch size is fixed): what ``per_layer`` reads. Keys:
    ``samples`` and ``layers: {name: {..._before, ..._after, weight_histogram, output error}}``."""
    xs = _profile_inputs(before, data, max_samples)
    gb, ga = layer_groups(before), layer_groups(after)
    both = set(gb) & set(ga)
    fb, ob = _analyze(before, gb, both, xs)
    fa, oa = _analyze(after, ga, both, xs)
    layers = {}
    for name in [*fb, *(n for n in fa if n not in fb)]:
        row: dict[str, Any] = {}
        for side, facts in (("before", fb), ("after", fa)):
            for k, v in facts.get(name, {}).items():
                row[f"{k}_{side}"] = v
        yb, wb = ob.get(name, (None, torch.zeros(0)))
        ya, wa = oa.get(name, (None, torch.zeros(0)))
        row["weight_histogram"] = _histogram(wb, wa)
        row.update(_output_error(yb, ya) if name in ob and name in oa else
                   {"output_rel_error": None, "output_sqnr_db": None,
                    "output_error_note": f"layer only in the {'original' if name in fb else 'compiled'} "
                                         "graph (its ops count in the block before it)"})
        layers[name] = row
    samples = int(xs[0].shape[0]) if xs and xs[0].dim() else 1
    return {"samples": samples, "hist_bins": HIST_BINS, "layers": layers}


def latency_share(onnx_path: str | Path, model: Model, *, runs: int = 20) -> dict[str, Any]:
    """Per-layer share of onnxruntime's kernel time (its profiler, 1 thread, all graph optimizations)
    running the exported ``model`` on its example inputs. An ONNX node belongs to the layer whose
    initializer it reads, else to its first input's producer's layer; the profiler names a kernel
    after its ONNX node or, once fused, after the output value it writes. Layout conversions that
    onnxruntime inserts (``Reorder*``) stay unattributed."""
    import onnx
    import onnxruntime as ort

    if runs < 2:  # the first run is warm-up and is not counted
        raise ConfigError(f"latency_share needs runs >= 2, got {runs}")
    by_node, by_value = _onnx_owners(onnx.load(str(onnx_path), load_external_data=False).graph, model)
    feeds = {n: t.detach().numpy() for n, t in zip(model.input_names, model.example_inputs, strict=True)}
    with tempfile.TemporaryDirectory() as tmp:
        so = ort.SessionOptions()
        so.enable_profiling = True
        so.profile_file_prefix = str(Path(tmp) / "ort")
        so.intra_op_num_threads = 1
        sess = ort.InferenceSession(str(onnx_path), so, providers=["CPUExecutionProvider"])
        for _ in range(runs):
            sess.run(None, feeds)
        events = json.loads(Path(sess.end_profiling()).read_text())
    starts = sorted(e["ts"] for e in events if e.get("cat") == "Session" and e.get("name") == "model_run")
    per: dict[str, float] = {}
    for e in events:  # the first run (weight prepacking, allocation) is warm-up
        if e.get("cat") != "Node" or not e.get("name", "").endswith("_kernel_time") or e["ts"] < starts[1]:
            continue
        op = re.sub(r"(_nchwc|_token_\d+)+$", "", e["name"][: -len("_kernel_time")])
        key = by_node.get(op) or by_value.get(op) or "(unattributed)"
        per[key] = per.get(key, 0.0) + float(e["dur"])
    total = sum(per.values())
    return {"source": "onnxruntime profiler, CPUExecutionProvider, 1 thread, ORT_ENABLE_ALL, "
                      "first run excluded",
            "runs": runs - 1, "kernel_ms_per_run": total / 1e3 / (runs - 1),
            "share": {k: v / total for k, v in sorted(per.items())} if total else {}}


def _onnx_owners(graph, model: Model) -> tuple[dict[str, str], dict[str, str]]:
    """(ONNX node name -> layer, value name -> layer of the node writing it). A node belongs to the
    layer of the weights it reads (initializers, or values computed from them alone, such as a
    DequantizeLinear of int8 codes), else to the layer of its first input that has one."""
    layer_of = {t: name for name, g in layer_groups(model).items() for t in g.targets}
    weights = {i.name for i in graph.initializer}
    by_node: dict[str, str] = {}
    by_value: dict[str, str] = {}
    for node in graph.node:
        ins = [i for i in node.input if i]
        from_weights = [layer_of.get(i) or by_value.get(i) for i in ins if i in weights]
        own = next((w for w in from_weights if w is not None), None) or \
            next((by_value[i] for i in ins if i in by_value), None)
        if ins and all(i in weights for i in ins):
            weights.update(node.output)
        if own is not None:
            by_node[node.name] = own
            by_value.update({o: own for o in node.output})
    return by_node, by_value


# ---- the report --------------------------------------------------------------------------------
def build_report(*, source: str, pipeline: str, target: str | None, before: Model, after: Model,
                 passes: list[dict[str, Any]], quality: dict[str, Any] | None,
                 latency: dict[str, Any] | None, artifacts: dict[str, str],
                 profile: dict[str, Any] | None = None, layer_latency: dict[str, Any] | None = None
                 ) -> dict[str, Any]:
    lb, la = layer_table(before), layer_table(after)
    layers = {}
    for name in sorted(set(lb) | set(la)):
        b, a = lb.get(name, {"params": 0, "bytes": 0}), la.get(name, {"params": 0, "bytes": 0})
        layers[name] = {
            "params_before": b["params"], "params_after": a["params"],
            "bytes_before": b["bytes"], "bytes_after": a["bytes"],
            "tensors_after": a.get("tensors", {}),
        }
    wb, wa = before.weight_bytes(), after.weight_bytes()
    report = {
        "regc_report_version": REPORT_VERSION,
        "source": source,
        "origin": before.origin,
        "pipeline": pipeline,
        "target": target,
        "inputs": {n: list(t.shape) for n, t in zip(after.input_names, after.example_inputs)},
        "outputs": list(after.output_names),
        "size": {"params_before": before.num_params(), "params_after": after.num_params(),
                 "bytes_before": wb, "bytes_after": wa, "bytes_ratio": wa / max(wb, 1)},
        "quality": quality,
        "latency": latency,
        "passes": passes,
        "layers": layers,
        "layer_profile": profile,
        "layer_latency": layer_latency,
        "artifacts": artifacts,
        "environment": {"python": platform.python_version(), "torch": torch.__version__,
                        "machine": platform.machine()},
    }
    report["per_layer"] = per_layer_table(report)
    return report


COLUMNS = [
    ("name", "layer"), ("op_class", "op class"), ("ops", "ops"),
    ("params_before", "params before"), ("params_after", "params after"),
    ("macs_before", "MACs/sample before"), ("macs_after", "MACs/sample after"),
    ("bytes_before", "bytes before"), ("bytes_after", "bytes after"),
    ("sparsity", "sparsity"), ("rank_kept", "rank kept"), ("channels_kept", "channels kept (pruned)"),
    ("weight_format", "weight format"), ("activation_format", "activation format"),
    ("sensitivity_sqnr_db", "quant sensitivity SQNR dB"), ("output_rel_error", "output rel. error"),
    ("output_sqnr_db", "output SQNR dB"), ("latency_share", "latency share"), ("passes", "in stats of"),
]


def per_layer_table(report: dict[str, Any]) -> dict[str, Any]:
    """One row per layer across all passes: ``{"columns": [[key, title], ...], "rows": [{key: value}]}``.
    Missing facts (a report written without data, or with ``--no-bench``) are ``None``."""
    prof = (report.get("layer_profile") or {}).get("layers") or {}
    share = (report.get("layer_latency") or {}).get("share")
    by_pass: dict[str, dict[str, list[dict]]] = {}  # layer -> pass -> its per-layer stats entries
    for rec in report.get("passes", []):
        stats = rec.get("stats") or {}
        entries = stats.get("layers")
        if isinstance(entries, dict):
            for key, entry in entries.items():
                if isinstance(entry, dict):
                    by_pass.setdefault(base_name(key), {}).setdefault(rec["pass"], []).append(entry)
    layers = report.get("layers", {})
    rows = []
    for name in list(prof) or sorted(layers):
        p = prof.get(name) or {}
        old = layers.get(name, {})
        stats = by_pass.get(name, {})
        entries = [e for v in stats.values() for e in v]
        ranks = [f"{e['rank']}/{e['full_rank']}" for e in entries
                 if e.get("rank") is not None and "full_rank" in e]
        channels = [", ".join(f"{d} {e[f'{d}_before']}->{e[f'{d}_after']}" for d in ("out", "in")
                              if e.get(f"{d}_before") != e.get(f"{d}_after"))
                    for e in entries if "out_before" in e and "out_after" in e]
        formats = sorted({e["format"] for e in entries if isinstance(e.get("format"), str)})
        acts = sorted({e["activation"] for e in entries if isinstance(e.get("activation"), str)})
        sens = [e["sensitivity_sqnr_db"] for e in entries
                if isinstance(e.get("sensitivity_sqnr_db"), (int, float))]
        in_after = bool(p.get("ops_after")) or not prof  # a layer the compile removed has no latency
        rows.append({
            "name": name,
            "op_class": p.get("op_class_after", p.get("op_class_before")),
            "ops": p.get("ops_after", p.get("ops_before")),
            "params_before": p.get("params_before", old.get("params_before")),
            "params_after": p.get("params_after", old.get("params_after")),
            "macs_before": p.get("macs_before"), "macs_after": p.get("macs_after"),
            "bytes_before": p.get("bytes_before", old.get("bytes_before")),
            "bytes_after": p.get("bytes_after", old.get("bytes_after")),
            "sparsity": p.get("sparsity_after"),
            "rank_kept": ", ".join(ranks) or None,
            "channels_kept": ", ".join(c for c in channels if c) or None,
            "weight_format": ", ".join(formats) or p.get("weight_dtype_after"),
            "activation_format": ", ".join(acts) or p.get("activation_dtype_after"),
            "sensitivity_sqnr_db": min(sens) if sens else None,
            "output_rel_error": p.get("output_rel_error"),
            "output_sqnr_db": p.get("output_sqnr_db"),
            "latency_share": share.get(name, 0.0) if share and in_after else None,
            "passes": sorted(stats),
        })
    return {"columns": [list(c) for c in COLUMNS], "rows": rows}


def load_report(out_dir: str | Path) -> dict[str, Any]:
    path = Path(out_dir) / "report.json"
    if not path.is_file():
        raise ConfigError(f"{path} not found; pass the -o folder of a 'regc compile' run")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path} is not valid JSON ({e}); rerun 'regc compile'") from e


def write_report(report: dict[str, Any], path: str | Path) -> None:
    Path(path).write_text(json.dumps(report, indent=2, default=_jsonable) + "\n")


def write_html(report: dict[str, Any], path: str | Path) -> None:
    from regc._report_html import render

    Path(path).write_text(render(report))


def _jsonable(o: Any) -> Any:
    if isinstance(o, torch.Tensor):
        return o.tolist()
    if isinstance(o, (set, tuple)):
        return list(o)
    if hasattr(o, "item"):
        return o.item()
    return str(o)


def summary_lines(report: dict[str, Any], out_dir: str) -> list[str]:
    s = report["size"]
    r = s["bytes_ratio"]
    change = f"{1 / r:.2f}x smaller" if 0 < r <= 1 else f"{r:.2f}x larger"
    lines = [f"size: {s['bytes_before'] / 1e6:.3f} MB -> {s['bytes_after'] / 1e6:.3f} MB "
             f"({100 * r:.1f}%, {change}), params {s['params_before']} -> {s['params_after']}"]
    q = report.get("quality")
    if q:
        if "accuracy_before" in q:
            lines.append(f"quality on {q['samples']} calibration samples: accuracy "
                         f"{100 * q['accuracy_before']:.2f}% -> {100 * q['accuracy_after']:.2f}% "
                         f"(delta {100 * q['accuracy_delta']:+.2f} points), output cosine {q['output_cosine']:.6f}")
        else:
            lines.append(f"quality on {q['samples']} calibration samples: output cosine "
                         f"{q['output_cosine']:.6f}, relative error {q['output_rel_error']:.2e}")
    else:
        lines.append("quality: not measured (pass --data to compare outputs on calibration samples)")
    lat = report.get("latency")
    if lat:
        lines.append(f"latency ({lat['backend']}): {lat['median_ms']:.3f} ms vs {lat['baseline_median_ms']:.3f} ms "
                     f"original = {lat['ratio']:.2f}x")
    else:
        lines.append("latency: not measured (--no-bench)")
    lines.append(f"report: {Path(out_dir) / 'report.html'} (data: {Path(out_dir) / 'report.json'})")
    return lines
