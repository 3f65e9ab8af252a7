"""wgsef + harden at 50% of the channels per dependency-graph group vs the dense model, on scikit-learn's
digits: test accuracy, parameters left, and whether exactly k units per group survived.

    python bench/wgsef_groups.py [--steps 300] [--seeds 0 1 2] [--models digits_cnn resnet18_style]
                                 [--out bench/results/wgsef_groups.json]

Every method of one model starts from the same weights and runs the same steps, optimizer (SGD,
momentum 0.9, cosine lr) and data order, in this run:
    dense          plain training (the baseline)
    wgsef          wgsef{keep=0.5} (envelope prox with lambda continuation, then the top-k projection
                   held for the second half of the steps), then harden
    topk_at_start  wgsef{keep=0.5,project=0}: the support is the top-k unit norms at step 0, then
                   masked training (group-magnitude pruning + fine-tuning, the same pass without the
                   envelope phase: what the envelope adds)
    prune_l1       prune{ratio=0.5} (L1 unit norms, physical) then plain training
digits_cnn starts from the zoo's trained weights (compressing a trained model); resnet18_style (width 8,
digits upsampled to 16x16, 3 channels) starts from its seeded init (training and sparsifying together).
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch
import torch.nn.functional as F

import regc
from regc.train import TrainSpec, fit
from regc.zoo import accuracy, digits_cnn, digits_data, resnet18_style

METHODS = {
    "dense": None,
    "wgsef": "wgsef{keep=0.5},harden",
    "topk_at_start": "wgsef{keep=0.5,project=0},harden",
    "prune_l1": "prune{ratio=0.5}",
}


def _data(name: str) -> tuple[dict, torch.Tensor, torch.Tensor, torch.Tensor]:
    d = digits_data()
    if name == "digits_cnn":
        return {"image": d.x_train}, d.y_train, d.x_test, d.y_test

    def up(x: torch.Tensor) -> torch.Tensor:
        return F.interpolate(x, size=16, mode="bilinear", align_corners=False).repeat(1, 3, 1, 1)

    return {"x": up(d.x_train)}, d.y_train, up(d.x_test), d.y_test


def _model(name: str, x_example: torch.Tensor) -> regc.Model:
    zm = digits_cnn() if name == "digits_cnn" else resnet18_style(width=8)
    return regc.capture(zm.module, (x_example[:8],), zm.dynamic_shapes, input_names=zm.input_names,
                        output_names=zm.output_names)


def run(name: str, method: str, seed: int, steps: int) -> dict:
    inputs, y, x_test, y_test = _data(name)
    model = _model(name, next(iter(inputs.values())))
    lr = 0.01 if name == "digits_cnn" else 0.05
    spec = TrainSpec(data=regc.Dataset(inputs, y), optimizer="sgd", lr=lr, momentum=0.9, steps=steps,
                     batch_size=64, schedule="cosine", seed=seed, progress=False)
    params_before = model.num_params()
    row: dict = {}
    pipeline = METHODS[method]
    if pipeline is None or method == "prune_l1":
        if pipeline is not None:
            model, _ = regc.Pipeline.parse(pipeline).run(model)
        fit(model, spec)
    else:
        model, records = regc.Pipeline.parse(pipeline).run(model, regc.PassContext(train=spec))
        st = records[0]["stats"]
        row = {"exact_k": st["exact_k"],
               "alive_at_projection": [g["alive_at_projection"] for g in st["groups"]],
               "k": [g["k"] for g in st["groups"]], "units": [g["units"] for g in st["groups"]],
               "units_removed": records[1]["stats"]["units_removed"]}
    model.train_mode(False)
    return {"accuracy": accuracy(model, x_test, y_test), "params": model.num_params(),
            "params_ratio": round(model.num_params() / params_before, 4), **row}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--models", nargs="+", default=["digits_cnn", "resnet18_style"])
    ap.add_argument("--out", default="bench/results/wgsef_groups.json")
    args = ap.parse_args()
    torch.set_num_threads(1)
    results = {}
    for name in args.models:
        table = {}
        for method in METHODS:
            rows = [run(name, method, s, args.steps) for s in args.seeds]
            acc = [r["accuracy"] for r in rows]
            table[method] = {"accuracy_mean": round(statistics.mean(acc), 4),
                             "accuracy_per_seed": [round(a, 4) for a in acc],
                             **{k: v for k, v in rows[0].items() if k != "accuracy"}}
            if "exact_k" in rows[0]:
                table[method]["exact_k_all_seeds"] = all(r["exact_k"] for r in rows)
            print(name, method, json.dumps(table[method]), flush=True)
        dense = table["dense"]["accuracy_mean"]
        for method in METHODS:
            table[method]["accuracy_minus_dense"] = round(table[method]["accuracy_mean"] - dense, 4)
        results[name] = table
    out = {"benchmark": "wgsef_groups", "steps": args.steps, "seeds": args.seeds, "keep": 0.5,
           "note": "same start, steps, optimizer and data order per model; accuracy on the 360 test digits; "
                   "params = all parameters of the final (hardened) graph",
           "results": results}
    path = Path(args.out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
