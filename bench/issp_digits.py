"""ISS-P (soft shrinkage, alpha=0.95) vs iterative hard thresholding (alpha=0) on the digits CNN trained
from scratch at 90% and 95% per-layer sparsity: equal steps, 3 seeds, test accuracy and mask churn.

    python bench/issp_digits.py [--steps 600] [--seeds 0 1 2] [--out bench/results/issp_digits.json]

Both methods run the same ``issp`` pass (alpha is the only difference) on the same data order; the dense
model trained for the same steps is the baseline. The first conv and the classifier stay dense (the
official code's skip of first/last layers), so sparsity applies to the 16->32 conv (4608 weights).
"""

from __future__ import annotations

import argparse
import json
import statistics

import torch
from _common import write_json

import regc
from regc.train import TrainSpec, fit
from regc.zoo import accuracy, digits_cnn, digits_data


def run(alpha: float | None, sparsity: float, seed: int, steps: int) -> dict:
    d = digits_data()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        zm = digits_cnn(trained=False)
        for p in zm.module.parameters():  # a fresh init per seed
            if p.dim() > 1:
                torch.nn.init.kaiming_uniform_(p, a=5 ** 0.5)
    model = regc.capture(zm.module, zm.example_inputs, zm.dynamic_shapes)
    spec = TrainSpec(data=regc.Dataset({"image": d.x_train}, d.y_train), optimizer="adam", lr=1e-2,
                     steps=steps, batch_size=64, schedule="cosine", seed=seed)
    if alpha is None:
        fit(model, spec)
        return {"accuracy": accuracy(model, d.x_test, d.y_test)}
    model, records = regc.Pipeline.parse(f"issp{{sparsity={sparsity},alpha={alpha}}}").run(
        model, regc.PassContext(train=spec))
    stats = records[0]["stats"]
    layer = next(iter(stats["layers"].values()))
    return {"accuracy": accuracy(model, d.x_test, d.y_test), "sparsity": layer["sparsity"],
            "mask_churn_last": stats["mask_churn_last"], "compression": stats["storage"]["compression"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--out", default="bench/results/issp_digits.json")
    args = ap.parse_args()
    torch.set_num_threads(1)
    rows = {"dense": [run(None, 0.0, s, args.steps) for s in args.seeds]}
    for sparsity in (0.9, 0.95):
        for name, alpha in (("issp_alpha0.95", 0.95), ("iht_alpha0", 0.0)):
            rows[f"{name}@{sparsity}"] = [run(alpha, sparsity, s, args.steps) for s in args.seeds]
    table = {k: {"accuracy_mean": round(statistics.mean(r["accuracy"] for r in v), 4),
                 "accuracy_per_seed": [round(r["accuracy"], 4) for r in v],
                 **({"sparsity": v[0]["sparsity"], "compression": v[0]["compression"],
                     "mask_churn_last_mean": round(statistics.mean(r["mask_churn_last"] for r in v), 5)}
                    if "sparsity" in v[0] else {})}
             for k, v in rows.items()}
    result = {"benchmark": "issp_digits", "steps": args.steps, "seeds": args.seeds,
              "note": "sparsity on the middle conv only; storage = values + 1-bit mask, never speed",
              "results": table}
    write_json(args.out, result, indent=2)
    print(json.dumps(table, indent=2))


if __name__ == "__main__":
    main()
