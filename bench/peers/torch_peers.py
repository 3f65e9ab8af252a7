"""Peers that rewrite the fp32 torch module (a fresh deep copy per entry), then export it to ONNX.

    torchao:int8wo         torchao.quantization.quantize_(m, Int8WeightOnlyConfig()): int8 nn.Linear weights
                           with one scale per row; no ONNX form, so quality and latency run in torch eager
    torch_pruning:l1       Torch-Pruning's MetaPruner, GroupMagnitudeImportance(p=1), 30% of the channels of
                           every group (CNNs: all but the classifier; encoders: the FFN units only, since
                           the hidden size and heads are coupled across residuals and attention reshapes)
    torch:magnitude        torch.nn.utils.prune.global_unstructured(L1Unstructured, 50%) over conv/linear
                           weights, made permanent (prune.remove): dense zeros, counted by the bitmask rule
    svd:truncated          W (m x n, conv as m x in*k*k) ~ (U_r S_r) V_r^T with the uniform rank
                           r = floor(0.5 m n / (m + n)) (half the weights), as two layers: conv k x k to r
                           channels then conv 1x1 (or two linears); layers where r >= min(m, n) stay dense
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
from peers.cases import Case
from peers.measure import export
from peers.regc_entries import Skip
from torch import nn


def _timed_export(case: Case, module: nn.Module, out: Path, t0: float, config: str) -> dict:
    seconds = time.perf_counter() - t0
    export(case, module.eval(), out)
    return {"onnx": out, "seconds": seconds, "config": config}


def torchao_int8(case: Case, fp32: Path, out: Path) -> dict:
    try:
        from torchao.quantization import Int8WeightOnlyConfig, quantize_
    except Exception as e:  # noqa: BLE001 - any import failure skips the peer, with its reason
        raise Skip(f"torchao does not import: {type(e).__name__}: {e}") from e
    import torchao

    m = case.fresh_module()
    t0 = time.perf_counter()
    quantize_(m, Int8WeightOnlyConfig())
    return {"torch": m, "seconds": time.perf_counter() - t0,
            "config": f"torchao {torchao.__version__} Int8WeightOnlyConfig (nn.Linear only)"}


def torch_pruning_l1(case: Case, fp32: Path, out: Path) -> dict:
    try:
        import torch_pruning as tp
    except Exception as e:  # noqa: BLE001
        raise Skip(f"torch_pruning does not import: {type(e).__name__}: {e}") from e
    m = case.fresh_module()
    linears = [(n, mod) for n, mod in m.named_modules() if isinstance(mod, nn.Linear)]
    if case.transformer:
        ignored = [mod for n, mod in m.named_modules() if isinstance(mod, (nn.Linear, nn.Embedding))
                   and not n.endswith(("intermediate", "intermediate.dense"))]
    else:
        ignored = [linears[-1][1]]
    example = tuple(torch.as_tensor(case.latency_feed[n][:2]) for n in case.input_names)
    t0 = time.perf_counter()
    pruner = tp.pruner.MetaPruner(m, example, importance=tp.importance.GroupMagnitudeImportance(p=1),
                                  pruning_ratio=0.3, ignored_layers=ignored)
    pruner.step()
    return _timed_export(case, m, out, t0, f"torch-pruning {tp.__version__} MetaPruner L1, ratio 0.3")


def magnitude(case: Case, fp32: Path, out: Path) -> dict:
    from torch.nn.utils import prune

    m = case.fresh_module()
    params = [(mod, "weight") for mod in m.modules() if isinstance(mod, (nn.Linear, nn.Conv2d))]
    t0 = time.perf_counter()
    prune.global_unstructured(params, pruning_method=prune.L1Unstructured, amount=0.5)
    for mod, name in params:
        prune.remove(mod, name)
    return _timed_export(case, m, out, t0, "global L1 unstructured, 50% of conv/linear weights")


def _factor(layer: nn.Module) -> nn.Module | None:
    w = layer.weight.detach()
    m, n = w.shape[0], w[0].numel()
    r = int(0.5 * m * n / (m + n))
    if r < 1 or r >= min(m, n):
        return None
    u, s, vt = torch.linalg.svd(w.reshape(m, n), full_matrices=False)
    left, right = u[:, :r] * s[:r], vt[:r]
    has_bias = layer.bias is not None
    if isinstance(layer, nn.Linear):
        a, b = nn.Linear(n, r, bias=False), nn.Linear(r, m, bias=has_bias)
    else:
        if layer.groups != 1:
            return None
        a = nn.Conv2d(layer.in_channels, r, layer.kernel_size, layer.stride, layer.padding, layer.dilation,
                      bias=False)
        b = nn.Conv2d(r, m, 1, bias=has_bias)
    with torch.no_grad():
        a.weight.copy_(right.reshape(a.weight.shape))
        b.weight.copy_(left.reshape(b.weight.shape))
        if has_bias:
            b.bias.copy_(layer.bias)
    return nn.Sequential(a, b)


def truncated_svd(case: Case, fp32: Path, out: Path) -> dict:
    m = case.fresh_module()
    t0 = time.perf_counter()
    targets = [(n, mod) for n, mod in m.named_modules() if isinstance(mod, (nn.Linear, nn.Conv2d))]
    replaced = 0
    for name, mod in targets:
        new = _factor(mod)
        if new is not None:
            parent, _, leaf = name.rpartition(".")
            setattr(m.get_submodule(parent) if parent else m, leaf, new)
            replaced += 1
    return _timed_export(case, m, out, t0, f"uniform rank for half the weights, {replaced} layers factored")


ENTRIES = {"torchao:int8wo": torchao_int8, "torch_pruning:l1": torch_pruning_l1,
           "torch:magnitude": magnitude, "svd:truncated": truncated_svd}
