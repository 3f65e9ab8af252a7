"""ResNet-18-style net on the digits task: dense vs 50% of channels removed (prune{ratio=0.5}) plus a
short distillation recovery. Accuracy and onnxruntime latency are measured in the same run; the
targets are accuracy within 0.5 point of dense and latency at most 0.6x dense at batch 1 and 32.

    python bench/prune_resnet.py [--size 16] [--epochs 12] [--finetune-epochs 10] [--out ...]

Digits (8x8, 1 channel) are repeated to 3 channels and resized (bilinear) to ``size`` for the zoo's
``resnet18_style`` (width 16; stride-1 stem and three stride-2 stages: 16 -> 2 at the head).
At 8x8 the net runs 20 convolutions on 8x8 .. 1x1 maps, so at batch 1 onnxruntime's fixed cost per
op is a large share of the run and halving channels saves less than half the time; at 16x16 the
convolutions dominate. Units are ranked by Taylor importance over the whole training set, kept
channel counts are multiples of 8 (onnxruntime's NCHWc block on AVX2; 16 would keep all 16 stem
channels and prune nothing there). Recovery: Hinton distillation from the dense model
(loss = T^2 KL(p_dense^T || p_pruned^T) + ce_weight * CE(labels)), Adam with a cosine schedule.
BatchNorm is folded before export in both models, so the timing compares what a deployment would run.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from _common import write_json

import regc
from regc.runtime.bench import compare
from regc.train import TrainPlan, TrainSpec, fit
from regc.zoo import accuracy, digits_data, resnet18_style


def images(x: torch.Tensor, size: int) -> torch.Tensor:
    x = x.repeat(1, 3, 1, 1)
    if size == x.shape[-1]:
        return x
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)


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
    ap.add_argument("--size", type=int, default=16)
    ap.add_argument("--epochs", type=int, default=12)
    ap.add_argument("--finetune-epochs", type=int, default=10)
    ap.add_argument("--ratio", type=float, default=0.5)
    ap.add_argument("--importance", default="taylor")
    ap.add_argument("--temperature", type=float, default=4.0)
    ap.add_argument("--ce-weight", type=float, default=0.5)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--out", default="bench/results/prune_resnet.json")
    args = ap.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    d = digits_data()
    xtr, xte = images(d.x_train, args.size), images(d.x_test, args.size)
    train = regc.Dataset({"x": xtr}, d.y_train)
    zm = resnet18_style(num_classes=10, width=16)
    dense = regc.capture(zm.module, (xtr[:2],), {"x": {0: torch.export.Dim("batch")}})

    t0 = time.perf_counter()
    fit(dense, TrainSpec(data=train, loss="ce", optimizer="adam", lr=3e-3, epochs=args.epochs, batch_size=64,
                         schedule="cosine", weight_decay=1e-4))
    dense_s = time.perf_counter() - t0
    acc_dense = accuracy(dense, xte, d.y_test)

    def prune(importance: str) -> tuple[regc.Model, list[dict]]:
        text = f"prune{{ratio={args.ratio},importance={importance},round_to=8,batch_size=64}}"
        return regc.Pipeline.parse(text).run(dense.clone(), regc.PassContext(data=train))

    one_shot = {imp: accuracy(prune(imp)[0], xte, d.y_test) for imp in ("l1", "fisher", "taylor")}
    pruned, records = prune(args.importance)

    plan = TrainPlan()
    plan.add_loss("ce", lambda model, b: F.cross_entropy(b.output, b.labels.long()), weight=args.ce_weight)
    t0 = time.perf_counter()
    summary = fit(pruned, TrainSpec(data=train, loss="kd", temperature=args.temperature, optimizer="adam",
                                    lr=args.lr, epochs=args.finetune_epochs, batch_size=64, schedule="cosine",
                                    seed=1), plan, teacher=dense)
    ft_s = time.perf_counter() - t0
    acc_pruned = accuracy(pruned, xte, d.y_test)

    with tempfile.TemporaryDirectory() as tmp:
        lat = {f"batch_{b}": latency(pruned, dense, xte[:b], Path(tmp), str(b)) for b in (1, 32)}
    stats = records[0]["stats"]
    drop = acc_dense - acc_pruned
    result = {
        "benchmark": "prune_resnet",
        "model": f"resnet18_style(width=16) on digits as 3x{args.size}x{args.size}",
        "pipeline": records[0]["text"],
        "dense": {"accuracy": acc_dense, "params": stats["params_before"], "train_s": round(dense_s, 1),
                  "epochs": args.epochs},
        "pruned": {"accuracy_one_shot": one_shot, "accuracy": acc_pruned, "params": stats["params_after"],
                   "recovery": {"loss": f"kd(T={args.temperature}) + {args.ce_weight} ce", "lr": args.lr,
                                "epochs": args.finetune_epochs, "steps": summary["steps"],
                                "seconds": round(ft_s, 1)}},
        "test_images": len(d.y_test),
        "accuracy_drop_points": round(100 * drop, 2),
        "latency_onnxruntime_1_thread": lat,
        "targets": {"accuracy_within_0.5_point": drop <= 0.005,
                    "latency_at_most_0.6x_batch_32": lat["batch_32"]["ratio"] <= 0.6,
                    "latency_at_most_0.6x_batch_1": lat["batch_1"]["ratio"] <= 0.6},
        "groups": [{k: g[k] for k in ("name", "channels_before", "channels_after")} for g in stats["groups"]],
    }
    write_json(args.out, result, indent=2)
    summary = {k: result[k] for k in ("dense", "pruned", "accuracy_drop_points", "targets")}
    print(json.dumps(summary, indent=2))
    print(json.dumps(lat, indent=2))


if __name__ == "__main__":
    main()
