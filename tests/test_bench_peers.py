"""The peer bench (bench/run -> bench/peers/run.py): a --quick smoke run on the digits CNN with regc entries
and onnxruntime's quantize_dynamic (always installed), a regc entry that does not apply to its model
(eqnet on the BERT encoder: reported, not failed), and the report's Pareto/best logic on made-up rows."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"
sys.path.insert(0, str(BENCH))

from peers import regc_entries, report  # noqa: E402
from peers.cases import bert  # noqa: E402

import regc  # noqa: E402
import regc.passes  # noqa: E402,F401 - registers the passes


def check_row(row: dict, max_bytes: float, min_quality: float) -> None:
    assert row["status"] == "ok", row
    assert 0 < row["bytes_ratio"] <= max_bytes, row
    assert row["bytes_ratio"] <= row["onnx_bytes_ratio"] + 1e-9, row  # the bitmask rule never adds bytes
    assert row["quality"] >= min_quality, row
    lat = row["latency"]
    # no upper bound: onnxruntime's dynamic int8 convs (ConvInteger) run 25-110x slower than fp32 here
    assert math.isfinite(lat["ratio"]) and lat["ratio"] > 0.05, row
    assert lat["median_ms"] > 0 and lat["baseline_median_ms"] > 0 and lat["iters"] >= 3, row
    assert row["compress_s"] >= 0, row


@pytest.mark.slow
def test_quick_run_writes_json_md_svg(tmp_path):
    entries = "regc:rf8,regc:prune,ort:quantize_dynamic"
    proc = subprocess.run(
        [sys.executable, str(BENCH / "peers" / "run.py"), "--quick", "--no-setup", "--models", "digits_cnn",
         "--entries", entries, "--out-dir", str(tmp_path)],
        capture_output=True, text=True, timeout=600, cwd=BENCH.parent)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads((tmp_path / "peers.json").read_text())
    m = result["models"]["digits_cnn"]
    rows = {r["entry"]: r for r in m["entries"]}
    # only what was asked, fp32 first, then in the bench's own order (regc's entries before the peers)
    assert list(rows) == ["fp32", "regc:prune", "regc:rf8", "ort:quantize_dynamic"]
    assert m["fp32_quality"] > 0.9 and m["fp32_weight_bytes"] > 10_000
    fp32 = rows["fp32"]
    check_row(fp32, 1.0, m["fp32_quality"])
    assert fp32["bytes_ratio"] == 1.0 and fp32["quality_delta"] == 0.0
    assert 0.3 < fp32["latency"]["ratio"] < 3  # fp32 timed against itself: only noise
    check_row(rows["regc:rf8"], 0.35, m["fp32_quality"] - 0.03)  # 8-bit codes: ~1/4 of the bytes
    check_row(rows["ort:quantize_dynamic"], 0.35, m["fp32_quality"] - 0.03)
    check_row(rows["regc:prune"], 0.8, 0.1)  # 30% of the channels gone, one-shot (no fine-tune)
    assert rows["regc:prune"]["config"] == "fold_bn,prune{ratio=0.3}"
    assert {"regc", "peer"} == set(m["best"])

    md = (tmp_path / "peers.md").read_text()
    for name in rows:
        assert f"| {name} |" in md
    assert "## Best regc entry vs best peer" in md

    svg = ET.fromstring((tmp_path / "peers_pareto.svg").read_text())
    circles = svg.findall(".//{http://www.w3.org/2000/svg}circle")
    assert len(circles) == len(rows)  # one marker per measured entry
    assert len(svg.findall(".//{http://www.w3.org/2000/svg}polyline")) == 1


def test_entry_regc_refuses_is_not_applicable(tmp_path):
    """eqnet ranks subnets by top-1 accuracy and refuses the encoder (no class logits) with a
    ConfigError: the entry says "not applicable" with regc's reason instead of failing."""
    case = bert(quick=True)
    base = regc.capture(case.module, case.example_inputs, case.dynamic_shapes, input_names=case.input_names,
                        output_names=case.output_names)
    with pytest.raises(regc_entries.NotApplicable, match=r"\(batch, classes\) logits") as info:
        regc_entries.make("regc:eqnet")(case, base, tmp_path / "eqnet.onnx")
    assert info.value.status == "not applicable"
    assert not (tmp_path / "eqnet.onnx").exists()


def test_front_and_best_pick_the_right_entries():
    pts = [(1.0, 0.99), (0.5, 0.98), (0.6, 0.97), (0.25, 0.90), (0.25, 0.95)]
    assert report._front(pts) == [(0.25, 0.95), (0.5, 0.98), (1.0, 0.99)]  # dominated points dropped

    def row(entry, by, b, q, lat):
        return {"entry": entry, "by": by, "status": "ok", "bytes_ratio": b, "quality": q,
                "latency": {"ratio": lat}, "latency_backend": "onnxruntime"}

    rows = [row("fp32", "fp32", 1.0, 0.99, 1.0), row("a", "regc", 0.3, 0.985, 0.9),
            row("b", "regc", 0.2, 0.95, 0.5), row("c", "peer", 0.4, 0.99, 1.5),
            {"entry": "d", "by": "peer", "status": "failed", "reason": "x"}]
    b = report.best(rows, "accuracy", 0.99, "regc")
    assert b["smallest"]["entry"] == "a" and b["fastest"]["entry"] == "a"  # b is 4 points below fp32
    assert report.best(rows, "accuracy", 0.99, "peer")["smallest"]["entry"] == "c"
    # cosine: within tolerance means >= 0.99 whatever fp32 scores, so no regc row qualifies here
    assert report.best(rows, "cosine", 1.0, "regc") == {"smallest": None, "fastest": None}
    assert report.best(rows, "cosine", 1.0, "peer")["smallest"]["entry"] == "c"
