"""regc's entries: the fp32 model captured once (``regc.capture``), a pipeline run on a clone of it through
``regc.Pipeline.parse(text).run``, and the result exported to ONNX (``Model.save``).

Pipelines (CNNs get the exact ``fold_bn`` first; ``Case.options`` may override a pass's options):
    quant           int8 weights and calibrated activations (QDQ)
    fwsvd           Fisher-weighted SVD, ratio 0.5 of the factorized weights kept
    prune           structured pruning, 30% of the units of every coupled group
    issp            50% unstructured sparsity by iterative soft shrinkage (fine-tunes: Case.train_steps)
    rf8             8-bit RF8 weight codes, weight-only
    wgsef           group sparse envelope training to 70% of the units of every group, then ``harden``
                    removes the zeroed units (fine-tunes), when ``regc passes`` lists it
    eqnet           elastic mixed-precision quantization, a short search (EQNET), when listed
    prune+fwsvd+quant   the three combined

A pipeline that regc refuses for the model with a ``ConfigError`` (eqnet on an encoder without class
logits) is reported as "not applicable" with regc's reason, not as a failure.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

import torch
from peers.cases import Case

import regc
from regc.errors import ConfigError
from regc.registry import PassContext, all_passes
from regc.train import TrainSpec

# eqnet's defaults (300 measured subnets, a 100 x 100 genetic search) take far longer than this bench
EQNET = ("calib_samples=64,eval_samples=64,predictor_samples=16,predictor_epochs=100,population=16,"
         "generations=10")

ENTRIES: dict[str, list[tuple[str, str]]] = {  # entry name -> [(pass, options)]
    "regc:quant": [("quant", "")],
    "regc:fwsvd": [("fwsvd", "ratio=0.5")],
    "regc:prune": [("prune", "ratio=0.3")],
    "regc:issp": [("issp", "sparsity=0.5")],
    "regc:rf8": [("rf8", "")],
    "regc:wgsef": [("wgsef", "keep=0.7"), ("harden", "")],
    "regc:eqnet": [("eqnet", EQNET)],
    "regc:prune,fwsvd,quant": [("prune", "ratio=0.3"), ("fwsvd", "ratio=0.5"), ("quant", "")],
}

TRAINS = {"issp", "wgsef", "eqnet"}


class Skip(Exception):
    """An entry that cannot run here; the message says why (printed and kept in the JSON as ``reason``,
    ``status`` naming the kind of skip)."""

    status = "skipped"


class NotApplicable(Skip):
    """The entry's method does not apply to this model: regc refused the pipeline (``ConfigError``)."""

    status = "not applicable"


def pipeline_text(case: Case, steps: list[tuple[str, str]]) -> str:
    parts = ["fold_bn"] if case.cnn else []
    for name, opts in steps:
        opts = ",".join(filter(None, [opts, case.options.get(name, "")]))
        parts.append(f"{name}{{{opts}}}" if opts else name)
    return ",".join(parts)


def dataset(case: Case) -> regc.Dataset:
    labels = None if case.calib_labels is None else torch.as_tensor(case.calib_labels)
    return regc.Dataset({k: torch.as_tensor(v) for k, v in case.calib.items()}, labels)


def make(name: str) -> Callable[[Case, regc.Model, Path], dict]:
    steps = ENTRIES[name]

    def run(case: Case, base: regc.Model, out: Path) -> dict:
        missing = [p for p, _ in steps if p not in all_passes()]
        if missing:
            raise Skip(f"pass {missing[0]!r} is not registered (`regc passes` does not list it)")
        text = pipeline_text(case, steps)
        pipeline = regc.Pipeline.parse(text)  # outside the try: a bad option in the bench stays a failure
        data = dataset(case)
        train = TrainSpec(data=data, optimizer="adam", lr=1e-4 if case.transformer else 1e-3,
                          steps=case.train_steps, batch_size=16, schedule="cosine", progress=False)
        t0 = time.perf_counter()
        try:
            model, _ = pipeline.run(base.clone(), PassContext(data=data, train=train))
        except ConfigError as e:
            raise NotApplicable(str(e)) from e
        seconds = time.perf_counter() - t0
        model.save(str(out))
        trains = any(p in TRAINS for p, _ in steps)
        return {"onnx": out, "seconds": seconds, "config": text,
                "trains": f"{case.train_steps} steps" if trains else ""}

    return run
