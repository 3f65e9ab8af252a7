"""What the peer bench measures for one compressed model, the same way for regc and for every peer.

Weight bytes (of an ONNX file, over its initializers and Constant tensors):
    onnx_bytes    sum_t nbytes(t), as stored (dense)
    weight_bytes  sum_t min(nbytes(t), nnz(t) * itemsize + ceil(numel(t) / 8)) for floating t, else nbytes(t):
                  zeros may be stored as a 1-bit mask plus the non-zero values (what unstructured
                  sparsity needs to count at all); dense tensors are unchanged by it.
For a torch model that has no ONNX form (torchao's tensor subclasses), the same sum runs over the
state_dict, a quantized tensor counting its integer data and its scales/zero points.

Latency: ``regc.runtime.bench.compare`` (interleaved A B B A calls, median, 1 thread) of the entry
against the fp32 ONNX model in onnxruntime, in this process: ratio = median(entry) / median(fp32).
Entries without an ONNX form are compared against the fp32 torch module in torch eager instead
(``TorchRunner``), and say so in ``latency_backend``.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import numpy_helper
from peers.cases import Case, Predict

import regc
from regc.backends.tvm_backend import TensorSpec
from regc.runtime.artifact import OnnxRunner, Runner
from regc.runtime.bench import compare


def _tensor_bytes(a: np.ndarray) -> tuple[int, int]:
    dense = int(a.nbytes)
    if not np.issubdtype(a.dtype, np.floating) or a.size == 0:
        return dense, dense
    packed = int(np.count_nonzero(a)) * a.itemsize + math.ceil(a.size / 8)
    return dense, min(dense, packed)


def onnx_bytes(path: Path) -> tuple[int, int]:
    """(dense bytes, weight bytes with zeros as a bitmask) of the initializers and Constant tensors."""
    g = onnx.load(str(path)).graph
    tensors = list(g.initializer)
    for node in g.node:
        if node.op_type == "Constant":
            tensors += [a.t for a in node.attribute if a.type == onnx.AttributeProto.TENSOR]
    sizes = [_tensor_bytes(numpy_helper.to_array(t)) for t in tensors]
    return sum(s[0] for s in sizes), sum(s[1] for s in sizes)


def _leaves(t: torch.Tensor) -> list[torch.Tensor]:
    """The plain tensors a (possibly nested) tensor subclass stores."""
    if type(t) in (torch.Tensor, torch.nn.Parameter) or not hasattr(t, "__tensor_flatten__"):
        return [t]
    names, _ = t.__tensor_flatten__()
    return [leaf for n in names for leaf in _leaves(getattr(t, n))]


def torch_bytes(module: torch.nn.Module) -> tuple[int, int]:
    """The same sums over a torch module's state_dict; tensor subclasses (torchao) count their inner
    tensors (int8 data, scales, zero points)."""
    sizes = [_tensor_bytes(x.detach().float().numpy() if x.dtype == torch.bfloat16 else x.detach().numpy())
             for t in module.state_dict().values() for x in _leaves(t)]
    return sum(s[0] for s in sizes), sum(s[1] for s in sizes)


def export(case: Case, module: torch.nn.Module, path: Path) -> None:
    """A torch module -> ONNX through regc's own capture and exporter (the fp32 baseline's path too)."""
    regc.capture(module, case.example_inputs, case.dynamic_shapes, input_names=case.input_names,
                 output_names=case.output_names).save(str(path))


def onnx_predict(path: Path) -> Predict:
    r = OnnxRunner(path, threads=1)
    return lambda feed: r.run(feed)[r.output_names[0]]


def torch_predict(module: torch.nn.Module, case: Case) -> Predict:
    def run(feed: dict[str, np.ndarray]) -> np.ndarray:
        with torch.no_grad():
            return module(*(torch.as_tensor(feed[n]) for n in case.input_names)).float().numpy()
    return run


class TorchRunner(Runner):
    """A torch module in eager mode as a ``regc.runtime`` runner, so ``compare`` can time it."""

    def __init__(self, module: torch.nn.Module, case: Case):
        self.module = module
        self.input_specs = [TensorSpec(n, tuple(case.latency_feed[n].shape), str(case.latency_feed[n].dtype))
                            for n in case.input_names]
        self.output_names = list(case.output_names)

    def _run(self, arrays: list[np.ndarray]) -> tuple[np.ndarray, ...]:
        with torch.no_grad():
            return (self.module(*(torch.as_tensor(a) for a in arrays)).numpy(),)


def latency(entry: Runner | Path, baseline: Runner | Path, case: Case, budget_s: float) -> dict:
    """``compare`` on ``case.latency_feed``; the interleaved medians and their ratio."""
    c = compare(entry, baseline, case.latency_feed, warmup=2, budget_s=budget_s)
    return {"ratio": round(c["ratio"], 4), "median_ms": round(c["median_ms"], 4),
            "baseline_median_ms": round(c["baseline_median_ms"], 4), "iters": c["iters"]}
