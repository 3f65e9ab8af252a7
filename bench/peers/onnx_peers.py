"""Peers that rewrite the fp32 ONNX file: onnxruntime's two int8 quantizers and NNCF's post-training
quantization.

    ort:quantize_dynamic   int8 per-channel weights, activations quantized at run time (no data)
    ort:quantize_static    QDQ int8, per-channel weights, MinMax-calibrated activation ranges on Case.calib
    nncf:quantize          nncf.quantize on the ONNX model (its default PTQ: MinMax ranges, fast bias
                           correction), calibrated on Case.calib; model_type=TRANSFORMER for the encoders
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
from peers.cases import Case
from peers.regc_entries import Skip


def _batches(case: Case, size: int = 8) -> list[dict[str, np.ndarray]]:
    n = len(next(iter(case.calib.values())))
    return [{k: v[i:i + size] for k, v in case.calib.items()} for i in range(0, n, size)]


def quantize_dynamic(case: Case, fp32: Path, out: Path) -> dict:
    from onnxruntime.quantization import QuantType
    from onnxruntime.quantization import quantize_dynamic as qd

    t0 = time.perf_counter()
    qd(str(fp32), str(out), weight_type=QuantType.QInt8, per_channel=True)
    return {"onnx": out, "seconds": time.perf_counter() - t0, "config": "QInt8 weights, per_channel"}


def quantize_static(case: Case, fp32: Path, out: Path) -> dict:
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType
    from onnxruntime.quantization import quantize_static as qs

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.it = iter(_batches(case))

        def get_next(self):
            return next(self.it, None)

    t0 = time.perf_counter()
    qs(str(fp32), str(out), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
       activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
    seconds = time.perf_counter() - t0
    return {"onnx": out, "seconds": seconds, "config": "QDQ, per_channel, MinMax calibration"}


def nncf_quantize(case: Case, fp32: Path, out: Path) -> dict:
    try:
        import nncf
        import onnx
    except Exception as e:  # noqa: BLE001 - any import failure skips the peer, with its reason
        raise Skip(f"nncf does not import: {type(e).__name__}: {e}") from e
    items = _batches(case)
    kw = {"model_type": nncf.ModelType.TRANSFORMER} if case.transformer else {}
    t0 = time.perf_counter()
    q = nncf.quantize(onnx.load(str(fp32)), nncf.Dataset(items), subset_size=len(items), **kw)
    seconds = time.perf_counter() - t0
    onnx.save(q, str(out))
    return {"onnx": out, "seconds": seconds,
            "config": f"nncf {nncf.__version__} PTQ{' TRANSFORMER' if kw else ''}"}


ENTRIES = {"ort:quantize_dynamic": quantize_dynamic, "ort:quantize_static": quantize_static,
           "nncf:quantize": nncf_quantize}
