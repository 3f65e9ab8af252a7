"""EQ-Net on the digits CNN (bits {2, 4, 8}, all three layers elastic): does WDR and does GPG improve the
lowest bit-width over plain sandwich training? And how well does the CQAP predictor rank subnets?

    python bench/eqnet_digits.py [--out bench/results/eqnet_digits.json] [--seeds 3] [--epochs 30]

The CPU experiment of TECHNIQUES.md 5 (a). Per seed and variant, the zoo's trained digits CNN becomes an
elastic supernet (weights per-tensor and per-channel, sym and asym; activations sym and asym) and is
trained with regc.train for 30 epochs (Adam lr 1e-3, cosine, batch 64; grad clip by value 1.0) by the
sandwich rule H + 1 random + L as
    plain   summed cross-entropies of H, R, L                      (eqnet{wdr=false,gpg=false})
    wdr     plain + WDR                                             (eqnet{wdr=true,gpg=false})
    gpg     progressive KL guidance (lambda 0.5, T 1), no WDR       (eqnet{wdr=false,gpg=true})
    both    GPG + WDR                                               (eqnet's default)
Every hyperparameter is the same for all variants, and a seed fixes the data order, the calibration
samples and the subnet draws, so the variants of one seed differ only in the loss (paired runs).
fix_ends=false: the CNN has three conv/linear layers, and fixing the first and last at 8 bits would
leave one elastic layer.

Each uniform subnet (2, 4, 8 bits for every weight and activation) is measured on the 360 test images
after BN recalibration on 256 training images, under each of the 8 global conditions; reported per
bit-width: the mean over conditions (per seed, then mean and std over seeds), its delta to plain, and
the paired per-seed deltas (variant - plain at the same seed) with their mean and std.

Predictor (variant both, every seed): 300 subnets per sampler, measured on 512 training images (as the
pass does) and on the 360 test images. Samplers: ``uniform`` = the supernet's R draw (each layer's bits
uniform over {2, 4, 8}), ``spread`` = each subnet's bit probabilities p ~ Dirichlet(1, 1, 1), each
layer's bits ~ p (2-bit-heavy and 8-bit-heavy subnets are common). CQAP (as the pass: 3 x 200, Adam
1e-3, 500 full-batch steps) in 5 folds of 240 train / 60 held out; Kendall tau-b (ties corrected) and
Pearson r on each held-out fold. ``noise_ceiling_tau`` = tau between the two measurements (train
subset vs test) of the same 300 subnets: how well a perfect predictor of one could rank the other.
Search: the genetic search with the pass's defaults (predictor of fold 0, train-subset accuracies,
uniform sampler) under avg_bits 3 and 4 (window 0.5); the chosen subnet's average bits, whether it
meets the window, and its test accuracy.
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import time
from pathlib import Path

import torch
from _common import capture, write_json

import regc
from regc.passes._eqnet_predictor import encode, kendall_tau, pearson, train_predictor
from regc.passes._eqnet_search import evolve
from regc.passes.eqnet import EqnetConfig, build_supernet, eval_data, train_supernet
from regc.train import TrainSpec
from regc.zoo import digits_cnn, digits_data

VARIANTS = {"plain": (False, False), "wdr": (True, False), "gpg": (False, True), "both": (True, True)}
BITS = (2, 4, 8)
CONDITIONS = list(itertools.product((False, True), repeat=3))  # (w_channel, w_sym, a_sym)
N_CONFIGS, FOLDS = 300, 5


def train(variant: str, seed: int, epochs: int):
    d = digits_data()
    ds = regc.Dataset({"image": d.x_train})
    ds.labels = d.y_train
    wdr, gpg = VARIANTS[variant]
    config = EqnetConfig(bits=BITS, fix_ends=False, wdr=wdr, gpg=gpg)
    spec = TrainSpec(data=ds, epochs=epochs, batch_size=64, lr=1e-3, schedule="cosine", seed=seed,
                     progress=False)
    m = capture(digits_cnn())
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


def spread_config(sn, g: torch.Generator):
    """Random conditions; per-layer bits drawn from p ~ Dirichlet(1, ..., 1) over the elastic bits."""
    base = sn.sample("random", g)
    p = -torch.rand(len(sn.space.bits), generator=g).log()
    n = len(sn.layers)
    w, a = (torch.multinomial(p / p.sum(), n, replacement=True, generator=g).tolist() for _ in range(2))
    return sn.make(base.w_channel, base.w_sym, base.a_sym, [sn.space.bits[i] for i in w],
                   [sn.space.bits[i] for i in a])


def cross_validate(x: torch.Tensor, y: torch.Tensor, seed: int) -> tuple[dict, list]:
    """Kendall tau-b / Pearson r of CQAPs on each held-out fold; the fold nets."""
    n_test = len(y) // FOLDS
    taus, rs, nets = [], [], []
    for k in range(FOLDS):
        test = torch.zeros(len(y), dtype=torch.bool)
        test[k * n_test:(k + 1) * n_test] = True
        net = train_predictor(x[~test], y[~test], 200, 3, 500, 1e-3, seed)
        with torch.no_grad():
            pred = net(x[test])
        taus.append(kendall_tau(pred, y[test]))
        rs.append(pearson(pred, y[test]))
        nets.append(net)
    return {"kendall_tau_per_fold": taus, "kendall_tau_mean": statistics.mean(taus),
            "kendall_tau_std": statistics.stdev(taus), "pearson_mean": statistics.mean(rs),
            "train": len(y) - n_test, "heldout": n_test}, nets


def predictor_and_search(sn, data, seed: int) -> dict:
    d = digits_data()
    test = [(d.x_test,)]
    g = torch.Generator().manual_seed(100 + seed)
    out = {}
    for sampler in ("uniform", "spread"):
        cfgs = [sn.sample("random", g) if sampler == "uniform" else spread_config(sn, g)
                for _ in range(N_CONFIGS)]
        acc = {"train_subset": torch.tensor([sn.accuracy(c, data.calib, data.batches, data.labels)
                                             for c in cfgs]),
               "test": torch.tensor([sn.accuracy(c, data.calib, test, d.y_test) for c in cfgs])}
        x = encode(cfgs, sn.free)
        w_avg = [sn.avg_bits(c)[0] for c in cfgs]
        res = {"configs": N_CONFIGS, "avg_w_bits_range": [min(w_avg), max(w_avg)],
               "noise_ceiling_tau": kendall_tau(acc["train_subset"], acc["test"])}
        for name, y in acc.items():
            res[name], nets = cross_validate(x, y, seed)
            res[name]["accuracy_range"] = [float(y.min()), float(y.max())]
            res[name]["distinct_accuracies"] = int(y.unique().numel())
            if sampler == "uniform" and name == "train_subset":
                out["search"] = search(sn, data, nets[0], g)
        out[sampler] = res
    return out


def search(sn, data, net, g: torch.Generator) -> dict:
    d, cfg = digits_data(), EqnetConfig()
    out = {}
    for c in (3.0, 4.0):
        best, predicted, ok = evolve(sn, lambda cs: net(encode(cs, sn.free)), c, cfg.budget_window,
                                     cfg.population, cfg.generations, cfg.mutate_prob, g)
        out[str(c)] = {"config": best.to_dict(), "avg_bits": sn.avg_bits(best), "window_met": ok,
                       "predicted": predicted,
                       "test_accuracy": sn.accuracy(best, data.calib, [(d.x_test,)], d.y_test)}
    return out


def _mean_std(v: list[float]) -> tuple[float, float]:
    return statistics.mean(v), statistics.stdev(v) if len(v) > 1 else 0.0


def table(runs: dict[str, list]) -> dict:
    """Per variant and bit-width: mean/std over seeds and the deltas to plain, paired by seed."""
    out = {}
    for variant, rs in runs.items():
        row = {}
        for b in BITS:
            per_seed = [r["uniform"][str(b)]["mean_over_conditions"] for r in rs]
            base = [r["uniform"][str(b)]["mean_over_conditions"] for r in runs["plain"][:len(rs)]]
            deltas = [p - q for p, q in zip(per_seed, base, strict=True)]
            mean, std = _mean_std(per_seed)
            d_mean, d_std = _mean_std(deltas)
            row[str(b)] = {"mean": mean, "std": std, "per_seed": per_seed, "paired_deltas": deltas,
                           "delta_vs_plain": d_mean, "paired_delta_std": d_std,
                           "seeds_better_than_plain": sum(x > 0 for x in deltas)}
        out[variant] = row
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "eqnet_digits.json"))
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--epochs", type=int, default=30)
    args = ap.parse_args()
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    runs: dict[str, list] = {v: [] for v in VARIANTS}
    predictor = {}
    result = {"benchmark": "eqnet_digits", "seeds": args.seeds, "epochs": args.epochs, "bits": list(BITS),
              "spec": "adam lr 1e-3 cosine, batch 64, 30 epochs, sandwich H+R+L, grad clip by value 1.0, "
                      "GPG lambda 0.5 T 1; eval: test set (360), BN recal on 256 train; paired seeds"}
    for seed in range(args.seeds):
        for variant in VARIANTS:
            sn, data, info = train(variant, seed, args.epochs)
            t1 = time.perf_counter()
            info["uniform"] = uniform_accuracy(sn, data)
            info["eval_seconds"] = round(time.perf_counter() - t1, 1)
            runs[variant].append(info)
            print(f"seed {seed} {variant:5s} " + "  ".join(
                f"{b}-bit {info['uniform'][str(b)]['mean_over_conditions']:.4f}" for b in BITS)
                + f"  ({info['train_seconds']}s train)", flush=True)
            if variant == "both":
                t1 = time.perf_counter()
                predictor[str(seed)] = predictor_and_search(sn, data, seed)
                predictor[str(seed)]["seconds"] = round(time.perf_counter() - t1, 1)
                p = predictor[str(seed)]
                print(f"predictor seed {seed}: " + "  ".join(
                    f"{s}/{n} tau {p[s][n]['kendall_tau_mean']:.3f}" for s in ("uniform", "spread")
                    for n in ("train_subset", "test")) + f"  ({p['seconds']}s)", flush=True)
        done = {v: rs for v, rs in runs.items() if len(rs) == seed + 1}
        write_json(args.out, {**result, "seeds_done": seed + 1, "table": table(done), "predictor": predictor,
                              "runs": runs, "total_seconds": round(time.perf_counter() - t0, 1)}, indent=2)
    for variant, row in table(runs).items():
        n = len(runs[variant])
        print(f"{variant:5s} " + "  ".join(
            f"{b}-bit {c['mean']:.4f}±{c['std']:.4f} ({c['delta_vs_plain']:+.4f}"
            f"±{c['paired_delta_std']:.4f}, {c['seeds_better_than_plain']}/{n})"
            for b, c in ((b, row[str(b)]) for b in BITS)))


if __name__ == "__main__":
    main()
