"""`regc compile` summary and `regc report`: the per-layer table against the model, report.html
(table + inline SVG, offline), and a headless Chromium render of it."""

import contextlib
import importlib.util
import io
import json
import math
import shutil
import struct
import subprocess
import zlib
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import onnx
import pytest

from regc.cli import main

ROOT = Path(__file__).resolve().parents[1]
PIPELINE = "fold_bn,fwsvd{ratio=0.5}"
COLUMNS = {"name", "op_class", "params_before", "params_after", "macs_before", "macs_after", "bytes_before",
           "bytes_after", "sparsity", "rank_kept", "weight_format", "activation_format",
           "sensitivity_sqnr_db", "output_rel_error", "latency_share"}


@pytest.fixture(scope="module")
def compiled(tmp_path_factory, one_thread):
    """The digits example (README command 1) compiled with a lossy pipeline, then `regc report`."""
    tmp = tmp_path_factory.mktemp("report")
    spec = importlib.util.spec_from_file_location("build_example", ROOT / "examples/digits/build_example.py")
    build = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(build)
    with contextlib.redirect_stdout(io.StringIO()):
        build.main(["--out", str(tmp)])
    out = tmp / "out"
    compile_out = io.StringIO()
    with contextlib.redirect_stdout(compile_out):
        assert main(["compile", str(tmp / "digits_cnn.onnx"), "-p", PIPELINE,
                     "--data", str(tmp / "calib.npz"), "-o", str(out), "-q"]) == 0
    compiled_json = json.loads((out / "report.json").read_text())
    (out / "report.html").unlink()
    report_out = io.StringIO()
    with contextlib.redirect_stdout(report_out):
        assert main(["report", str(out)]) == 0
    return {"onnx": tmp / "digits_cnn.onnx", "out": out, "compile_stdout": compile_out.getvalue(),
            "report_stdout": report_out.getvalue(), "compiled_json": compiled_json,
            "report": json.loads((out / "report.json").read_text())}


def _expected_layers(onnx_path: Path) -> dict[str, dict[str, int]]:
    """Conv/Gemm layers of the original ONNX file: params and MACs per sample, from its initializers
    and inferred shapes (independent of regc's IR)."""
    m = onnx.shape_inference.infer_shapes(onnx.load(str(onnx_path)))
    inits = {i.name: list(i.dims) for i in m.graph.initializer}
    shapes = {v.name: [d.dim_value for d in v.type.tensor_type.shape.dim] for v in m.graph.value_info}
    out = {}
    for node in m.graph.node:
        if node.op_type not in ("Conv", "Gemm"):
            continue
        w = inits[node.input[1]]
        params = sum(math.prod(inits[i]) for i in node.input if i in inits)
        conv = node.op_type == "Conv"
        macs = math.prod(shapes[node.output[0]][1:]) * math.prod(w[1:]) if conv else math.prod(w)
        out[node.input[1].removesuffix(".weight")] = {"params": params, "macs": macs, "weight": math.prod(w),
                                                      "shape": w}
    return out


@pytest.mark.slow
def test_compile_prints_summary(compiled):
    out, text = compiled["out"], compiled["compile_stdout"]
    r = compiled["compiled_json"]
    s, q, lat = r["size"], r["quality"], r["latency"]
    assert f"{s['bytes_before'] / 1e6:.3f} MB -> {s['bytes_after'] / 1e6:.3f} MB" in text
    assert f"{1 / s['bytes_ratio']:.2f}x smaller" in text and s["bytes_ratio"] < 0.6  # fwsvd halves the convs
    assert f"delta {100 * q['accuracy_delta']:+.2f} points" in text and q["samples"] > 0
    assert f"= {lat['ratio']:.2f}x" in text and lat["ratio"] > 0
    assert str(out / "report.html") in text and "report.json" in text
    assert (out / "report.html").is_file() and "<svg" in (out / "report.html").read_text()
    assert "per_layer" in r and "layer_profile" in r  # compile already writes the full report


@pytest.mark.slow
def test_per_layer_table_matches_the_model(compiled):
    r, expected = compiled["report"], _expected_layers(compiled["onnx"])
    for key in ("size", "quality", "latency", "passes", "layers", "artifacts"):  # existing keys kept
        assert key in r
    assert COLUMNS <= {c[0] for c in r["per_layer"]["columns"]}
    rows = {row["name"]: row for row in r["per_layer"]["rows"]}
    assert set(rows) == set(expected) == {"features.0", "features.4", "classifier"}
    fw = next(p for p in r["passes"] if p["pass"] == "fwsvd")["stats"]["layers"]
    factorized = {k.removesuffix(".weight") for k, e in fw.items() if e["rank"] is not None}
    assert factorized == {"features.4"}  # the layer this pipeline changes; the others are checks of "kept"
    for name, e in expected.items():
        row = rows[name]
        assert row["params_before"] == e["params"] and row["macs_before"] == e["macs"]
        assert row["bytes_before"] == 4 * e["params"] and row["weight_format"] == "float32"
        assert row["op_class"] == ("conv-like" if len(e["shape"]) == 4 else "linear-like")
        assert row["sparsity"] == 0.0 and 0.0 < row["latency_share"] < 1.0
        hist = r["layer_profile"]["layers"][name]["weight_histogram"]
        assert sum(hist["before"]) == e["weight"] and len(hist["before"]) == r["layer_profile"]["hist_bins"]
        if name not in factorized:
            assert row["params_after"] == e["params"] and row["macs_after"] == e["macs"]
            assert row["rank_kept"] is None and row["channels_kept"] is None
            assert hist["after"] == hist["before"]
    # features.4: (32, 16, 3, 3) -> rank r: conv(16 -> r, 3x3) then conv(r -> 32, 1x1), bias kept
    r4 = fw["features.4.weight"]["rank"]
    row = rows["features.4"]
    assert row["rank_kept"] == f"{r4}/32" and row["ops"] == ["conv2d.default", "conv2d.default"]
    assert row["params_after"] == r4 * 16 * 9 + 32 * r4 + 32 < row["params_before"]
    assert row["macs_after"] == 4 * 4 * (r4 * 16 * 9 + 32 * r4) < row["macs_before"]
    hist = r["layer_profile"]["layers"]["features.4"]["weight_histogram"]
    assert sum(hist["after"]) == r4 * 16 * 9 + 32 * r4  # the two factors' values
    # accumulated error: exact before the changed layer, nonzero from it on, bounded by the model's own
    assert rows["features.0"]["output_rel_error"] == 0.0
    assert 1e-3 < rows["features.4"]["output_rel_error"] < 2.0
    assert 1e-3 < rows["classifier"]["output_rel_error"]
    assert rows["classifier"]["output_rel_error"] == pytest.approx(r["quality"]["output_rel_error"], rel=0.5)
    share = r["layer_latency"]["share"]
    assert sum(share.values()) == pytest.approx(1.0) and set(rows) <= set(share)
    assert sum(row["params_after"] for row in rows.values()) == r["size"]["params_after"]
    assert "features.4" in compiled["report_stdout"] and "report.html" in compiled["report_stdout"]


class _Dom(HTMLParser):
    def __init__(self):
        super().__init__()
        self.tags, self.attrs, self.rows, self._table = [], [], {}, None

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        self.attrs += [(tag, k, v) for k, v in attrs]
        if tag == "table":
            self._table = dict(attrs).get("id")
        if tag == "tr" and self._table:
            self.rows[self._table] = self.rows.get(self._table, 0) + 1


def check_html(text: str, n_layers: int) -> None:
    dom = _Dom()
    dom.feed(text)
    assert dom.rows.get("per-layer") == n_layers + 1  # header + one row per layer
    assert dom.tags.count("svg") >= 4 and dom.tags.count("rect") > 20  # pareto, error, latency, histograms
    assert "script" not in dom.tags and "link" not in dom.tags  # offline: nothing to fetch
    assert not [a for a in dom.attrs if a[1] in ("src", "href")]


@pytest.mark.slow
def test_report_html_has_table_and_plots(compiled):
    text = (compiled["out"] / "report.html").read_text()
    check_html(text, len(compiled["report"]["per_layer"]["rows"]))
    for name in ("features.0", "features.4", "classifier", "per-layer output relative error",
                 "onnxruntime latency share", "size vs quality"):
        assert name in text


def test_report_of_a_report_without_measurements(tmp_path):
    """An older/minimal report.json (no per-layer profile, no data, --no-bench) still renders, n/a cells."""
    out = tmp_path / "out"
    out.mkdir()
    minimal = {"source": "m.onnx", "pipeline": "fold_bn", "target": None, "quality": None, "latency": None,
               "size": {"params_before": 10, "params_after": 8, "bytes_before": 40, "bytes_after": 32,
                        "bytes_ratio": 0.8},
               "passes": [{"pass": "fwsvd", "text": "fwsvd", "modified": True, "seconds": 0.1,
                           "stats": {"layers": {"fc.weight": {"rank": 2, "full_rank": 4}}}},
                          {"pass": "quant", "text": "quant", "modified": True, "seconds": 0.1,
                           "stats": {"layers": {
                               f"fc.weight_lowrank_{t}": {"format": "int8", "activation": "uint8",
                                                          "sensitivity_sqnr_db": db}
                               for t, db in (("a", 30.5), ("b", 28.0))}}},
                          {"pass": "prune", "text": "prune", "modified": True, "seconds": 0.1,
                           "stats": {"layers": {"fc.weight": {"out_before": 8, "out_after": 6, "in_before": 4,
                                                              "in_after": 4}}}}],
               "layers": {"fc": {"params_before": 10, "params_after": 8, "bytes_before": 40,
                                 "bytes_after": 32}}}
    (out / "report.json").write_text(json.dumps(minimal))
    with contextlib.redirect_stdout(io.StringIO()):
        assert main(["report", str(out)]) == 0
    r = json.loads((out / "report.json").read_text())
    (row,) = r["per_layer"]["rows"]
    assert row["name"] == "fc" and row["params_after"] == 8 and row["rank_kept"] == "2/4"
    assert row["weight_format"] == "int8" and row["activation_format"] == "uint8"
    assert row["passes"] == ["fwsvd", "prune", "quant"] and row["channels_kept"] == "out 8->6"
    assert row["sensitivity_sqnr_db"] == 28.0  # the more sensitive of the layer's two factors
    assert row["macs_after"] is None and row["latency_share"] is None and r["pipeline"] == "fold_bn"
    text = (out / "report.html").read_text()
    assert 'id="per-layer"' in text and "n/a" in text and "not available" in text


def test_report_on_a_folder_without_report_fails_cleanly(tmp_path, capsys):
    assert main(["report", str(tmp_path)]) != 0
    assert "report.json not found" in capsys.readouterr().err


def _png_pixels(path: Path) -> np.ndarray:
    """Decode an 8-bit RGB(A) PNG (zlib + per-row filters) to an (h, w, 3) array."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, idat, ihdr = 8, b"", None
    while pos < len(data):
        (n,) = struct.unpack(">I", data[pos:pos + 4])
        kind, body = data[pos + 4:pos + 8], data[pos + 8:pos + 8 + n]
        if kind == b"IHDR":
            ihdr = struct.unpack(">IIBB", body[:10])
        elif kind == b"IDAT":
            idat += body
        pos += 12 + n
    w, h, depth, colour = ihdr
    assert depth == 8 and colour in (2, 6), f"unexpected PNG format depth={depth} colour={colour}"
    bpp, raw = (3 if colour == 2 else 4), zlib.decompress(idat)
    stride, prev = w * bpp, np.zeros(w * bpp, np.int64)
    img = np.zeros((h, stride), np.uint8)
    for y in range(h):
        f = raw[y * (stride + 1)]
        line = np.frombuffer(raw, np.uint8, stride, y * (stride + 1) + 1).astype(np.int64)
        if f == 1:  # Sub: running sum along the row, per channel
            line = np.cumsum(line.reshape(w, bpp), axis=0).reshape(-1) % 256
        elif f == 2:  # Up
            line = (line + prev) % 256
        elif f in (3, 4):  # Average, Paeth: sequential along the row
            out, up = line.tolist(), prev.tolist()
            for i in range(stride):
                a, b, c = (out[i - bpp], up[i], up[i - bpp]) if i >= bpp else (0, up[i], 0)
                if f == 3:
                    pred = (a + b) // 2
                else:
                    pa, pb, pc = abs(b - c), abs(a - c), abs(a + b - 2 * c)
                    pred = a if pa <= pb and pa <= pc else b if pb <= pc else c
                out[i] = (out[i] + pred) % 256
            line = np.array(out, np.int64)
        img[y], prev = line, line
    return img.reshape(h, w, bpp)[:, :, :3]


def check_png_not_blank(path: Path) -> None:
    """Real content: many colours and at least 1% of pixels far from the background colour."""
    px = _png_pixels(path).reshape(-1, 3).astype(np.int64)
    colours, counts = np.unique((px[:, 0] << 16) | (px[:, 1] << 8) | px[:, 2], return_counts=True)
    bg = np.array([(colours[counts.argmax()] >> s) & 255 for s in (16, 8, 0)])
    far = np.abs(px - bg).sum(1) > 96
    assert len(colours) >= 8 and far.mean() > 0.01, f"{len(colours)} colours, {far.mean():.2%} off background"


@pytest.mark.slow
def test_chromium_renders_report(compiled, tmp_path):
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("chromium is not installed (Debian: apt-get install -y chromium)")
    url = (compiled["out"] / "report.html").resolve().as_uri()
    flags = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
             "--window-size=1200,1600"]
    shot = tmp_path / "report.png"
    subprocess.run([*flags, f"--screenshot={shot}", url], check=True, capture_output=True, timeout=120)
    check_png_not_blank(shot)
    dom = subprocess.run([*flags, "--dump-dom", url], check=True, capture_output=True, text=True,
                         timeout=120).stdout
    check_html(dom, len(compiled["report"]["per_layer"]["rows"]))
