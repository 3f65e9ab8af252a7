"""BERT-style encoder: dense vs 50% of FFN units and a quarter of the attention heads removed
(prune{ratio=0.5,head_ratio=0.25}), then distillation to the dense model's outputs. Output fidelity on
held-out sequences and onnxruntime latency are measured in the same run.

    python bench/prune_bert.py [--steps 600] [--out bench/results/prune_bert.json]

The encoder is the zoo's ``bert_encoder`` widened to hidden 128, 4 layers, 8 heads (FFN 512), with
seeded random weights: the task is to reproduce the dense model's last hidden state, so fidelity is
measured as per-token cosine and relative L2 error against it. Stated bound: mean per-token cosine
>= 0.98 after distillation (the one-shot numbers show what distillation recovers).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch
from _common import write_json

import regc
from regc.runtime.bench import compare
from regc.train import TrainSpec, fit
from regc.zoo import bert_encoder

COSINE_BOUND = 0.98


def tokens(n: int, seq: int, vocab: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, vocab, (n, seq), generator=g)
    lengths = torch.randint(seq // 2, seq + 1, (n,), generator=g)
    mask = (torch.arange(seq)[None] < lengths[:, None]).long()
    return ids * mask, mask


def fidelity(model: regc.Model, ref: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor) -> dict:
    with torch.no_grad():
        y = model(ids, mask)
    keep = mask.bool()
    cos = torch.nn.functional.cosine_similarity(y[keep], ref[keep], dim=-1)
    rel = (y[keep] - ref[keep]).norm() / ref[keep].norm()
    return {"cosine_mean": round(cos.mean().item(), 5), "cosine_min": round(cos.min().item(), 5),
            "relative_l2": round(rel.item(), 5)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--out", default="bench/results/prune_bert.json")
    args = ap.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    vocab, seq = 1000, 32
    zm = bert_encoder(vocab_size=vocab, hidden=128, layers=4, heads=8, max_positions=64)
    dense = regc.capture(zm.module, zm.example_inputs, zm.dynamic_shapes,
                         input_names=zm.input_names, output_names=zm.output_names)
    train = regc.Dataset(dict(zip(zm.input_names, tokens(4096, seq, vocab, seed=1), strict=True)))
    test_ids, test_mask = tokens(256, seq, vocab, seed=2)
    with torch.no_grad():
        ref = dense(test_ids, test_mask)

    pruned = dense.clone()
    pruned, records = regc.Pipeline.parse("prune{ratio=0.5,head_ratio=0.25}").run(pruned)
    one_shot = fidelity(pruned, ref, test_ids, test_mask)
    t0 = time.perf_counter()
    summary = fit(pruned, TrainSpec(data=train, loss="distill", optimizer="adam", lr=1e-3, steps=args.steps,
                                    batch_size=32, schedule="cosine"), teacher=dense)
    distill_s = time.perf_counter() - t0
    after = fidelity(pruned, ref, test_ids, test_mask)

    lat = {}
    with tempfile.TemporaryDirectory() as tmp:
        paths = [Path(tmp) / "pruned.onnx", Path(tmp) / "dense.onnx"]
        pruned.save(paths[0])
        dense.save(paths[1])
        for batch in (1, 8):
            inputs = {"input_ids": test_ids[:batch].numpy(), "attention_mask": test_mask[:batch].numpy()}
            res = compare(str(paths[0]), str(paths[1]), inputs, budget_s=4.0)
            lat[f"batch_{batch}_seq_{seq}"] = {k: round(v, 4) if isinstance(v, float) else v
                                                for k, v in res.items()}
    stats = records[0]["stats"]
    result = {
        "benchmark": "prune_bert",
        "model": "bert_encoder(hidden=128, layers=4, heads=8, ffn=512), seeded random weights",
        "pipeline": records[0]["text"],
        "params": {"dense": stats["params_before"], "pruned": stats["params_after"]},
        "groups": [{k: g[k] for k in ("name", "kind", "units_before", "units_after")}
                   for g in stats["groups"]],
        "fidelity_one_shot": one_shot,
        "fidelity_after_distillation": after,
        "distillation": {"steps": args.steps, "seconds": round(distill_s, 1),
                         "loss_first": summary["loss_first"], "loss_last": summary["loss_last"]},
        "latency_onnxruntime_1_thread": lat,
        "targets": {f"cosine_mean_at_least_{COSINE_BOUND}": after["cosine_mean"] >= COSINE_BOUND},
    }
    write_json(args.out, result, indent=2)
    print(json.dumps({k: result[k] for k in ("params", "fidelity_one_shot", "fidelity_after_distillation",
                                             "distillation", "targets")}, indent=2))
    print(json.dumps(lat, indent=2))


if __name__ == "__main__":
    main()
