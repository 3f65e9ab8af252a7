"""EQ-Net on the digits CNN (bits {2, 4, 8}, all three layers elastic): does WDR and does GPG improve the
lowest bit-width over plain sandwich training? And how well does the CQAP predictor rank subnets?

    python bench/eqnet_digits.py [--out bench/results/eqnet_digits.json] [--seeds 3] [--epochs 8]

Per seed and variant, the zoo's trained digits CNN becomes an elastic supernet (weights per-tensor and
per-channel, sym and asym; activations sym and asym) and is trained with regc.train (Adam lr 1e-3,
cosine, batch 64, the same spec and seed for every variant) by the sandwich rule as
    plain   summed cross-entropies of H, R, L                      (eqnet{wdr=false,gpg=false})
    wdr     plain + WDR                                             (eqnet{wdr=true,gpg=false})
    gpg     progressive KL guidance, no WDR                         (eqnet{wdr=false,gpg=true})
    both    GPG + WDR                                               (eqnet's default)
Each uniform subnet (2, 4, 8 bits for every weight and activation) is measured on the 360 test images
after BN recalibration on 256 training images, under each of the 8 global conditions; reported per
bit-width: the mean over conditions (per seed, then mean and std over seeds) and its delta to plain.
Predictor (variant both, seed 0): 300 random subnets measured on 512 training images (as the pass
does) and on the test set; CQAP trained on 240, Kendall tau-b (ties corrected) / Pearson r on the 60
held out. Search: the genetic search under avg_bits 3 and 4 and the chosen subnet's test accuracy.
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import time
from pathlib import Path

import torch

import regc
from regc.passes._eqnet_predictor import encode, kendall_tau, pearson, train_predictor
from regc.passes._eqnet_search import evolve
from regc.passes.eqnet import EqnetConfig, build_supernet, eval_data, train_supernet
from regc.train import TrainSpec
from regc.zoo import digits_cnn, digits_data

VARIANTS = {"plain": (False, False), "wdr": (True, False), "gpg": (False, True), "both": (True, True)}
BITS = (2, 4, 8)
CONDITIONS = list(itertools.product((False, True), repeat=3))  # (w_channel, w_sym, a_sym)


def model() -> regc.Model:
    zm = digits_cnn()
    return regc.capture(zm.module, zm.example_inputs, zm.dynamic_shapes, input_names=zm.input_names,
                        output_names=zm.output_names)


def train(variant: str, seed: int, epochs: int):
    d = digits_data()
    ds = regc.Dataset({"image": d.x_train})
    ds.labels = d.y_train
    wdr, gpg = VARIANTS[variant]
    config = EqnetConfig(bits=BITS, fix_ends=False, wdr=wdr, gpg=gpg)
    spec = TrainSpec(data=ds, epochs=epochs, batch_size=64, lr=1e-3, schedule="cosine", seed=seed,
                     progress=False)
    m = model()
    data = eval_data(m, spec, 256, 512)
    sn = build_supernet(m, config, data)
    t0 = time.perf_counter()
    summary = train_supernet(sn, config, spec)
    return sn, data, {"train_seconds": round(time.perf_counter() - t0, 1), "loss_last": summary["loss_last"]}


def uniform_accuracy(sn, data) -> dict:
    d = digits_data()
    test = [(d.x_test,)]
    out = {}
    for b in BITS:
        accs = [sn.accuracy(sn.uniform(b, *c), data.calib, test, d.y_test) for c in CONDITIONS]
        out[str(b)] = {"mean_over_conditions": statistics.mean(accs), "per_condition": accs}
    return out


def predictor_and_search(sn, data, seed: int) -> dict:
    d = digits_data()
    test = [(d.x_test,)]
    g = torch.Generator().manual_seed(100 + seed)
    cfgs = [sn.sample("random", g) for _ in range(300)]
    acc_train = torch.tensor([sn.accuracy(c, data.calib, data.batches, data.labels) for c in cfgs])
    acc_test = torch.tensor([sn.accuracy(c, data.calib, test, d.y_test) for c in cfgs])
    x = encode(cfgs, sn.free)
    out = {}
    for name, y in (("train_subset", acc_train), ("test", acc_test)):
        net = train_predictor(x[:240], y[:240], 200, 3, 500, 1e-3, seed)
        with torch.no_grad():
            pred = net(x[240:])
        out[name] = {"kendall_tau_heldout": kendall_tau(pred, y[240:]),
                     "pearson_heldout": pearson(pred, y[240:]),
                     "accuracy_range": [float(y.min()), float(y.max())]}
        if name == "train_subset":
            searched = {}
            for c in (3.0, 4.0):
                best, predicted, ok = evolve(sn, lambda cs, net=net: net(encode(cs, sn.free)), c, 0.5, 100,
                                             100, 0.1, g)
                searched[str(c)] = {"config": best.to_dict(), "avg_bits": sn.avg_bits(best), "window_met": ok,
                                    "predicted": predicted,
                                    "test_accuracy": sn.accuracy(best, data.calib, test, d.y_test)}
            out["search"] = searched
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "eqnet_digits.json"))
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--epochs", type=int, default=8)
    args = ap.parse_args()
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    runs: dict[str, list] = {v: [] for v in VARIANTS}
    predictor = None
    for seed in range(args.seeds):
        for variant in VARIANTS:
            sn, data, info = train(variant, seed, args.epochs)
            info["uniform"] = uniform_accuracy(sn, data)
            runs[variant].append(info)
            print(f"seed {seed} {variant:5s} " + "  ".join(
                f"{b}-bit {info['uniform'][str(b)]['mean_over_conditions']:.4f}" for b in BITS), flush=True)
            if variant == "both" and seed == 0:
                predictor = predictor_and_search(sn, data, seed)
                shown = {k: v for k, v in predictor.items() if k != "search"}
                print("predictor", json.dumps(shown), flush=True)
    table = {}
    for variant, rs in runs.items():
        row = {}
        for b in BITS:
            per_seed = [r["uniform"][str(b)]["mean_over_conditions"] for r in rs]
            base = [r["uniform"][str(b)]["mean_over_conditions"] for r in runs["plain"]]
            row[str(b)] = {"mean": statistics.mean(per_seed),
                           "std": statistics.stdev(per_seed) if len(per_seed) > 1 else 0.0,
                           "delta_vs_plain": statistics.mean(per_seed) - statistics.mean(base),
                           "seeds_better_than_plain": sum(p > q for p, q in zip(per_seed, base, strict=True))}
        table[variant] = row
        print(f"{variant:5s} " + "  ".join(f"{b}-bit {row[str(b)]['mean']:.4f}±{row[str(b)]['std']:.4f} "
                                           f"({row[str(b)]['delta_vs_plain']:+.4f})" for b in BITS))
    out = {"benchmark": "eqnet_digits", "seeds": args.seeds, "epochs": args.epochs, "bits": list(BITS),
           "spec": "adam lr 1e-3 cosine, batch 64, sandwich H+R+L; eval: test set (360), "
                   "BN recal on 256 train",
           "table": table, "predictor": predictor, "runs": runs,
           "total_seconds": round(time.perf_counter() - t0, 1)}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
