"""``report.json``: what a compile did, per pass and per layer, with measured quality and speed.

Layers are keyed by user name (module FQN or ONNX initializer name without its last segment):
params and bytes before/after, plus any per-layer entries passes put in their stats.
"""

from __future__ import annotations

import json
import platform
from pathlib import Path
from typing import Any

import torch

from regc.ir import Model, param_bytes

__all__ = ["layer_table", "build_report", "write_report", "output_quality", "summary_lines"]

REPORT_VERSION = 1
_LEAF = {"weight", "bias", "running_mean", "running_var", "num_batches_tracked"}


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


def build_report(*, source: str, pipeline: str, target: str | None, before: Model, after: Model,
                 passes: list[dict[str, Any]], quality: dict[str, Any] | None,
                 latency: dict[str, Any] | None, artifacts: dict[str, str]) -> dict[str, Any]:
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
    return {
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
        "artifacts": artifacts,
        "environment": {"python": platform.python_version(), "torch": torch.__version__,
                        "machine": platform.machine()},
    }


def write_report(report: dict[str, Any], path: str | Path) -> None:
    Path(path).write_text(json.dumps(report, indent=2, default=_jsonable) + "\n")


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
    lines = [f"size: {s['bytes_before'] / 1e6:.3f} MB -> {s['bytes_after'] / 1e6:.3f} MB "
             f"({100 * s['bytes_ratio']:.1f}%), params {s['params_before']} -> {s['params_after']}"]
    q = report.get("quality")
    if q:
        if "accuracy_before" in q:
            lines.append(f"quality on {q['samples']} calibration samples: accuracy "
                         f"{100 * q['accuracy_before']:.2f}% -> {100 * q['accuracy_after']:.2f}% "
                         f"(delta {100 * q['accuracy_delta']:+.2f} points), output cosine {q['output_cosine']:.6f}")
        else:
            lines.append(f"quality on {q['samples']} calibration samples: output cosine "
                         f"{q['output_cosine']:.6f}, relative error {q['output_rel_error']:.2e}")
    lat = report.get("latency")
    if lat:
        lines.append(f"latency ({lat['backend']}): {lat['median_ms']:.3f} ms vs {lat['baseline_median_ms']:.3f} ms "
                     f"original = {lat['ratio']:.2f}x")
    lines.append(f"report: {Path(out_dir) / 'report.json'}")
    return lines
