"""Weight Compander on the digits CNN with 40% symmetric label noise: test accuracy (mean, std over
seeds) and weight histograms, against the same training without it, run in the same process.

    python bench/compander_digits.py [--out bench/results/compander_digits.json] [--seeds 5] [--epochs 30]

Per seed: the zoo's digits CNN re-initialized with that seed, 40% of the training labels replaced by a
different random class, then trained with regc.train (Adam, the same spec for every variant) as
    baseline              plain training
    power_fixed           compander              (the default: function=power, shape=2, learn=false)
    power_learned         compander{learn=true}
    tanh_fixed            compander{function=tanh}
    tanh_learned          compander{function=tanh,learn=true}
    tanh_slope4_learned   compander{function=tanh,shape=4,learn=true}
Reported per variant: clean test accuracy, accuracy on the noisy training labels (memorization),
and over all conv/linear weights the fraction |w| < 1e-3 ("near zero") and max |w|.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

import regc
import regc.passes  # noqa: F401  (registers the passes)
from regc.train import TrainSpec
from regc.zoo import accuracy, digits_cnn, digits_data

VARIANTS = {
    "baseline": None,
    "power_fixed": "compander",  # the default: function=power, shape=2, learn=false
    "power_learned": "compander{learn=true}",
    "tanh_fixed": "compander{function=tanh}",
    "tanh_learned": "compander{function=tanh,learn=true}",
    "tanh_slope4_learned": "compander{function=tanh,shape=4,learn=true}",
}


def noisy_labels(y: torch.Tensor, rate: float, seed: int, classes: int = 10) -> torch.Tensor:
    """Symmetric noise: a ``rate`` fraction of labels moved to a uniformly drawn *other* class."""
    g = torch.Generator().manual_seed(1000 + seed)
    flip = torch.rand(len(y), generator=g) < rate
    shift = torch.randint(1, classes, (len(y),), generator=g)
    return torch.where(flip, (y + shift) % classes, y)


def fresh_model(seed: int) -> regc.Model:
    zm = digits_cnn(trained=False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for m in zm.module.modules():
            if hasattr(m, "reset_parameters"):
                m.reset_parameters()
    return regc.capture(zm.module, zm.example_inputs, dynamic_shapes=zm.dynamic_shapes,
                        input_names=zm.input_names, output_names=zm.output_names)


def weight_hist(model: regc.Model) -> dict[str, float]:
    from regc.passes._reg_layers import weighted_layers

    layers, _ = weighted_layers(model)
    w = torch.cat([model.get_tensor(L.weight).detach().reshape(-1) for L in layers])
    return {"near_zero": float((w.abs() < 1e-3).float().mean()), "max_abs": float(w.abs().max()),
            "std": float(w.std())}


def run(variant: str, seed: int, epochs: int, noise: float) -> dict[str, float]:
    d = digits_data()
    y_noisy = noisy_labels(d.y_train, noise, seed)
    spec = TrainSpec(data=regc.Dataset({"image": d.x_train}, y_noisy), loss="ce", optimizer="adam", lr=3e-3,
                     batch_size=64, epochs=epochs, seed=seed, schedule="cosine")
    model = fresh_model(seed)
    t0 = time.perf_counter()
    text = VARIANTS[variant]
    if text is None:
        regc.train.fit(model, spec)
        hyper = {}
    else:
        model, rec = regc.parse_pipeline(text).run(model, regc.PassContext(train=spec))
        hyper = {k: v["hyper"] for k, v in rec[0]["stats"]["layers"].items()}
    return {"seed": seed, "test_acc": accuracy(model, d.x_test, d.y_test),
            "noisy_train_acc": accuracy(model, d.x_train, y_noisy),
            "clean_train_acc": accuracy(model, d.x_train, d.y_train),
            "seconds": time.perf_counter() - t0, **weight_hist(model), "hyper": hyper}


def summarize(runs: list[dict]) -> dict[str, float]:
    out = {}
    for key in ("test_acc", "noisy_train_acc", "clean_train_acc", "near_zero", "max_abs", "std", "seconds"):
        vals = [r[key] for r in runs]
        out[f"{key}_mean"] = statistics.mean(vals)
        out[f"{key}_std"] = statistics.stdev(vals) if len(vals) > 1 else 0.0
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "compander_digits.json"))
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--noise", type=float, default=0.4)
    ap.add_argument("--variants", default=",".join(VARIANTS))
    args = ap.parse_args()
    torch.set_num_threads(1)
    results = {}
    for variant in args.variants.split(","):
        runs = [run(variant, s, args.epochs, args.noise) for s in range(args.seeds)]
        results[variant] = {"summary": summarize(runs), "runs": runs}
        s = results[variant]["summary"]
        print(f"{variant:20s} test {s['test_acc_mean']:.4f} ± {s['test_acc_std']:.4f}  noisy-train "
              f"{s['noisy_train_acc_mean']:.3f}  near0 {s['near_zero_mean']:.4f}  "
              f"max|w| {s['max_abs_mean']:.3f}")
    base = results["baseline"]["summary"] if "baseline" in results else None
    delta = {v: {"test_acc": r["summary"]["test_acc_mean"] - base["test_acc_mean"],
                 "near_zero": r["summary"]["near_zero_mean"] - base["near_zero_mean"],
                 "max_abs": r["summary"]["max_abs_mean"] - base["max_abs_mean"]}
             for v, r in results.items() if base is not None and v != "baseline"}
    out = {"benchmark": "compander_digits", "seeds": args.seeds, "epochs": args.epochs,
           "label_noise": args.noise,
           "spec": "adam lr 3e-3 cosine, batch 64, ce on noisy labels", "variants": results,
           "delta_vs_baseline": delta}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
