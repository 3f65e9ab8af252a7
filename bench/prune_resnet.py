"""ResNet-18-style net on the digits task: dense vs 50% of channels removed (prune{ratio=0.5}) plus a
short fine-tune. Accuracy and onnxruntime latency are measured in the same run; the targets are
accuracy within 0.5 point of dense and latency at most 0.6x dense.

    python bench/prune_resnet.py [--epochs 12] [--finetune-epochs 6] [--out bench/results/prune_resnet.json]

Digits (8x8, 1 channel) are repeated to 3 channels for the zoo's ``resnet18_style`` (width 16; the
stride-1 stem and three stride-2 stages give 8 -> 1 at the head). BatchNorm is folded
before export in both models, so the timing compares what a deployment would run.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

import regc
from regc.runtime.bench import compare
from regc.train import TrainSpec, fit
from regc.zoo import accuracy, digits_data, resnet18_style


def images(x: torch.Tensor) -> torch.Tensor:
    return x.repeat(1, 3, 1, 1)


def latency(model: regc.Model, baseline: regc.Model, x: torch.Tensor, folder: Path, tag: str) -> dict:
    paths = []
    for name, m in (("pruned", model), ("dense", baseline)):
        m = regc.compress(m.clone(), "fold_bn")
        paths.append(folder / f"{name}_{tag}.onnx")
        m.save(paths[-1])
    res = compare(str(paths[0]), str(paths[1]), {"x": x.numpy()}, budget_s=4.0)
    return {k: round(v, 4) if isinstance(v, float) else v for k, v in res.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=12)
    ap.add_argument("--finetune-epochs", type=int, default=6)
    ap.add_argument("--ratio", type=float, default=0.5)
    ap.add_argument("--out", default="bench/results/prune_resnet.json")
    args = ap.parse_args()
    torch.manual_seed(0)
    d = digits_data()
    xtr, xte = images(d.x_train), images(d.x_test)
    train = regc.Dataset({"x": xtr}, d.y_train)
    zm = resnet18_style(num_classes=10, width=16)
    dense = regc.capture(zm.module, (xtr[:2],), {"x": {0: torch.export.Dim("batch")}})

    t0 = time.perf_counter()
    fit(dense, TrainSpec(data=train, loss="ce", optimizer="adam", lr=3e-3, epochs=args.epochs, batch_size=64,
                         schedule="cosine", weight_decay=1e-4))
    dense_s = time.perf_counter() - t0
    acc_dense = accuracy(dense, xte, d.y_test)

    pruned = dense.clone()
    pruned, records = regc.Pipeline.parse(f"prune{{ratio={args.ratio},round_to=8}}").run(pruned)
    acc_oneshot = accuracy(pruned, xte, d.y_test)
    t0 = time.perf_counter()
    fit(pruned, TrainSpec(data=train, loss="ce", optimizer="adam", lr=1e-3, epochs=args.finetune_epochs,
                          batch_size=64, schedule="cosine", weight_decay=1e-4, seed=1))
    ft_s = time.perf_counter() - t0
    acc_pruned = accuracy(pruned, xte, d.y_test)

    with tempfile.TemporaryDirectory() as tmp:
        lat = {f"batch_{b}": latency(pruned, dense, xte[:b], Path(tmp), str(b)) for b in (1, 32)}
    stats = records[0]["stats"]
    result = {
        "benchmark": "prune_resnet",
        "model": "resnet18_style(width=16) on digits as 3x8x8",
        "pipeline": records[0]["text"],
        "dense": {"accuracy": acc_dense, "params": stats["params_before"], "train_s": round(dense_s, 1),
                  "epochs": args.epochs},
        "pruned": {"accuracy_one_shot": acc_oneshot, "accuracy": acc_pruned, "params": stats["params_after"],
                   "finetune_s": round(ft_s, 1), "finetune_epochs": args.finetune_epochs},
        "accuracy_drop_points": round(100 * (acc_dense - acc_pruned), 2),
        "latency_onnxruntime_1_thread": lat,
        "targets": {"accuracy_within_0.5_point": acc_dense - acc_pruned <= 0.005,
                    "latency_at_most_0.6x_batch_32": lat["batch_32"]["ratio"] <= 0.6,
                    "latency_at_most_0.6x_batch_1": lat["batch_1"]["ratio"] <= 0.6},
        "groups": [{k: g[k] for k in ("name", "channels_before", "channels_after")} for g in stats["groups"]],
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    summary = {k: result[k] for k in ("dense", "pruned", "accuracy_drop_points", "targets")}
    print(json.dumps(summary, indent=2))
    print(json.dumps(lat, indent=2))


if __name__ == "__main__":
    main()
