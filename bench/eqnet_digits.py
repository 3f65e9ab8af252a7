"""EQ-Net on the digits CNN or MLP (bits {2, 4, 8}): do WDR and GPG improve the lowest bit-width?

All three conv/linear layers are elastic. Does WDR and does GPG improve the lowest bit-width over plain
sandwich training? And how well does the CQAP predictor rank subnets?

    python bench/eqnet_digits.py [--model cnn|mlp] [--out FILE] [--seeds 3] [--epochs 30] [--no-predictor]

(default out: bench/results/eqnet_digits.json for cnn, bench/results/eqnet_digits_mlp.json for mlp)

The CPU experiment of TECHNIQUES.md 5 (a). Models: ``cnn`` = the zoo's trained digits CNN; ``mlp`` =
``regc.zoo.digits_mlp()``, flatten -> linear 64-128 -> ReLU -> linear 128-128 -> ReLU -> linear 128-10, no BN
(BN recalibration is then a no-op), trained in fp32 first as the paper starts from trained FP weights:
seed 0, single thread, Adam lr 1e-3 (constant), batch 64, 30 epochs on the 1437 training images, weights
kept in memory. Its fp32 test accuracy and test cross-entropy are reported (for either model). Per seed
and variant, the trained model becomes an elastic supernet (weights per-tensor and per-channel, sym and
asym; activations sym and asym) and is trained with regc.train for 30 epochs (Adam lr 1e-3, cosine,
batch 64; grad clip by value 1.0) by the sandwich rule H + 1 random + L as
    plain   summed cross-entropies of H, R, L                      (eqnet{wdr=false,gpg=false})
    wdr     plain + WDR                                             (eqnet{wdr=true,gpg=false})
    gpg     progressive KL guidance (lambda 0.5, T 1), no WDR       (eqnet{wdr=false,gpg=true})
    both    GPG + WDR                                               (eqnet's default)
Every hyperparameter is the same for all variants, and a seed fixes the data order, the calibration
samples and the subnet draws, so the variants of one seed differ only in the loss (paired runs).
fix_ends=false: both models have three conv/linear layers, and fixing the first and last at 8 bits would
leave one elastic layer. WDR (as the pass) acts on the float weights of all layers but the first.

Each uniform subnet (2, 4, 8 bits for every weight and activation) is measured on the 360 test images
after BN recalibration on 256 training images, under each of the 8 global conditions, by two metrics:
top-1 accuracy (higher is better) and the mean test cross-entropy of its logits, NLL (lower is better;
continuous, so it resolves differences below one image = 0.28 points). Both come from the same logits
(``measure``: the steps of ``Supernet.accuracy``, keeping the logits). Reported per metric and
bit-width: the mean over conditions (per seed, then mean and std over seeds), its delta to plain, the
paired per-seed deltas (variant - plain at the same seed) with their mean and std, and the number of
seeds on which the variant is better than plain (accuracy higher, NLL lower).
WDR's mechanism (the paper's Fig. 2: WDR drives kurtosis toward 1.8, skew toward 0): skewness and
kurtosis (``_reg_math.skew_kurt``, WDR's own statistics) of each layer's float shared weights, before
training (the fp32 model) and per variant after it (mean and std over seeds).
Decision rule, fixed before the runs: a variant improves the lowest bit-width when its paired 2-bit
delta to plain is better than 0 on all or most seeds and its mean exceeds the std of the paired deltas.

Predictor (variant both, every seed; skipped with --no-predictor): 300 subnets per sampler, measured on
512 training images (as the pass does) and on the 360 test images. Samplers: ``uniform`` = the supernet's
R draw (each layer's bits uniform over {2, 4, 8}), ``spread`` = each subnet's bit probabilities p ~
Dirichlet(1, 1, 1), each layer's bits ~ p (2-bit-heavy and 8-bit-heavy subnets are common). CQAP (as the
pass: 3 x 200, Adam 1e-3, 500 full-batch steps) in 5 folds of 240 train / 60 held out; Kendall tau-b (ties
corrected) and Pearson r on each held-out fold. ``noise_ceiling_tau`` = tau between the two measurements
(train subset vs test) of the same 300 subnets: how well a perfect predictor of one could rank the other.
Search: the genetic search with the pass's defaults (predictor of fold 0, train-subset accuracies, uniform
sampler) under avg_bits 3 and 4 (window 0.5); the chosen subnet's average bits, whether it meets the
window, and its test accuracy.
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from _common import capture, write_json

import regc
from regc.passes._eqnet_predictor import encode, kendall_tau, pearson, train_predictor
from regc.passes._eqnet_search import evolve
from regc.passes._reg_math import skew_kurt
from regc.passes.eqnet import EqnetConfig, build_supernet, eval_data, train_supernet
from regc.train import TrainSpec
from regc.zoo import digits_cnn, digits_data, digits_mlp

VARIANTS = {"plain": (False, False), "wdr": (True, False), "gpg": (False, True), "both": (True, True)}
BITS = (2, 4, 8)
CONDITIONS = list(itertools.product((False, True), repeat=3))  # (w_channel, w_sym, a_sym)
N_CONFIGS, FOLDS = 300, 5


MODELS = {"cnn": digits_cnn, "mlp": digits_mlp}


def fp32_reference(model: str) -> dict:
    """The trained fp32 model's test accuracy and test cross-entropy, and its weights' skew/kurtosis."""
    d = digits_data()
    m = capture(MODELS[model]())
    with torch.no_grad():
        logits = m.run(d.x_test)[0]
    sn = build_supernet(m, EqnetConfig(bits=BITS, fix_ends=False), eval_data(m, _spec(0, 1), 256, 512))
    return {"test_accuracy": float((logits.argmax(-1) == d.y_test).float().mean()),
            "test_nll": float(F.cross_entropy(logits, d.y_test)), "weights": weight_stats(sn)}


def _spec(seed: int, epochs: int) -> TrainSpec:
    d = digits_data()
    ds = regc.Dataset({"image": d.x_train})
    ds.labels = d.y_train
    return TrainSpec(data=ds, epochs=epochs, batch_size=64, lr=1e-3, schedule="cosine", seed=seed,
                     progress=False)


def train(model: str, variant: str, seed: int, epochs: int):
    wdr, gpg = VARIANTS[variant]
    config = EqnetConfig(bits=BITS, fix_ends=False, wdr=wdr, gpg=gpg)
    spec = _spec(seed, epochs)
    m = capture(MODELS[model]())
    data = eval_data(m, spec, 256, 512)
    sn = build_supernet(m, config, data)
    t0 = time.perf_counter()
    summary = train_supernet(sn, config, spec)
    return sn, data, {"train_seconds": round(time.perf_counter() - t0, 1), "loss_last": summary["loss_last"]}


def weight_stats(sn) -> dict:
    """Skewness and kurtosis (WDR's statistics) of each layer's float shared weight."""
    out = {}
    for name, q in zip(sn.names, sn.layers, strict=True):
        with torch.no_grad():
            sk, ku = skew_kurt(sn.model.get_tensor(q.weight).detach().float())
        out[name] = {"skew": float(sk), "kurtosis": float(ku)}
    return out


def measure(sn, cfg, calib: list[tuple], x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    """(top-1 accuracy, mean cross-entropy) of subnet ``cfg`` on (x, y) after BN recalibration on
    ``calib``: the steps of ``Supernet.accuracy``, keeping the logits."""
    sn.set(cfg)
    sn.recalibrate(calib)
    with torch.no_grad():
        logits = sn.model.run(x)[0]
    return float((logits.argmax(-1) == y).float().mean()), float(F.cross_entropy(logits, y))


def uniform_accuracy(sn, data) -> dict:
    d = digits_data()
    out = {}
    for b in BITS:
        pairs = [measure(sn, sn.uniform(b, *c), data.calib, d.x_test, d.y_test) for c in CONDITIONS]
        accs, nlls = [a for a, _ in pairs], [n for _, n in pairs]
        out[str(b)] = {"mean_over_conditions": statistics.mean(accs), "per_condition": accs,
                       "nll_mean_over_conditions": statistics.mean(nlls), "nll_per_condition": nlls}
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


def table(runs: dict[str, list], key: str = "mean_over_conditions", lower_is_better: bool = False) -> dict:
    """Per variant and bit-width: mean/std over seeds and the deltas to plain, paired by seed
    (``key``: accuracy, or ``nll_mean_over_conditions`` with ``lower_is_better``)."""
    out = {}
    for variant, rs in runs.items():
        row = {}
        for b in BITS:
            per_seed = [r["uniform"][str(b)][key] for r in rs]
            base = [r["uniform"][str(b)][key] for r in runs["plain"][:len(rs)]]
            deltas = [p - q for p, q in zip(per_seed, base, strict=True)]
            mean, std = _mean_std(per_seed)
            d_mean, d_std = _mean_std(deltas)
            row[str(b)] = {"mean": mean, "std": std, "per_seed": per_seed, "paired_deltas": deltas,
                           "delta_vs_plain": d_mean, "paired_delta_std": d_std,
                           "seeds_better_than_plain": sum((x < 0) if lower_is_better else (x > 0)
                                                          for x in deltas)}
        out[variant] = row
    return out


def weight_table(runs: dict[str, list]) -> dict:
    """Per variant and layer: mean/std over seeds of the float weights' kurtosis and |skew| after training."""
    out = {}
    for variant, rs in runs.items():
        out[variant] = {
            layer: {f"{stat}_{part}": v for stat, vals in (
                ("kurtosis", [r["weights"][layer]["kurtosis"] for r in rs]),
                ("abs_skew", [abs(r["weights"][layer]["skew"]) for r in rs]))
                for part, v in zip(("mean", "std"), _mean_std(vals), strict=True)}
            for layer in rs[0]["weights"]}
    return out


def _print_table(name: str, rows: dict, runs: dict, scale: float, fmt: str) -> None:
    print(name)
    for variant, row in rows.items():
        n = len(runs[variant])
        print(f"  {variant:5s} " + "  ".join(
            f"{b}-bit {c['mean'] * scale:{fmt}}±{c['std'] * scale:{fmt}} "
            f"({c['delta_vs_plain'] * scale:+{fmt}}±{c['paired_delta_std'] * scale:{fmt}}, "
            f"{c['seeds_better_than_plain']}/{n})"
            for b, c in ((b, row[str(b)]) for b in BITS)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", choices=sorted(MODELS), default="cnn")
    ap.add_argument("--out", default=None, help="default: bench/results/eqnet_digits.json (cnn), "
                                                "bench/results/eqnet_digits_mlp.json (mlp)")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--no-predictor", action="store_true", help="skip the CQAP predictor and the search")
    args = ap.parse_args()
    name = "eqnet_digits.json" if args.model == "cnn" else f"eqnet_digits_{args.model}.json"
    out_path = args.out or str(Path(__file__).parent / "results" / name)
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    fp32 = fp32_reference(args.model)
    print(f"{args.model} fp32: test accuracy {fp32['test_accuracy']:.4f}, test NLL {fp32['test_nll']:.4f}  "
          + "  ".join(f"{k} kurt {v['kurtosis']:.2f} skew {v['skew']:+.2f}"
                      for k, v in fp32["weights"].items()), flush=True)
    runs: dict[str, list] = {v: [] for v in VARIANTS}
    predictor = {}
    result = {"benchmark": "eqnet_digits", "model": args.model, "seeds": args.seeds, "epochs": args.epochs,
              "bits": list(BITS), "predictor_run": not args.no_predictor,
              "spec": "adam lr 1e-3 cosine, batch 64, 30 epochs, sandwich H+R+L, grad clip by value 1.0, "
                      "GPG lambda 0.5 T 1; eval: test set (360), BN recal on 256 train; paired seeds; "
                      "metrics: accuracy (higher better), test cross-entropy nll (lower better)",
              "fp32": fp32}
    for seed in range(args.seeds):
        for variant in VARIANTS:
            sn, data, info = train(args.model, variant, seed, args.epochs)
            t1 = time.perf_counter()
            info["uniform"] = uniform_accuracy(sn, data)
            info["weights"] = weight_stats(sn)
            info["eval_seconds"] = round(time.perf_counter() - t1, 1)
            runs[variant].append(info)
            print(f"seed {seed} {variant:5s} " + "  ".join(
                f"{b}-bit {info['uniform'][str(b)]['mean_over_conditions']:.4f}"
                f" nll {info['uniform'][str(b)]['nll_mean_over_conditions']:.4f}" for b in BITS)
                + f"  ({info['train_seconds']}s train)", flush=True)
            if variant == "both" and not args.no_predictor:
                t1 = time.perf_counter()
                predictor[str(seed)] = predictor_and_search(sn, data, seed)
                predictor[str(seed)]["seconds"] = round(time.perf_counter() - t1, 1)
                p = predictor[str(seed)]
                print(f"predictor seed {seed}: " + "  ".join(
                    f"{s}/{n} tau {p[s][n]['kendall_tau_mean']:.3f}" for s in ("uniform", "spread")
                    for n in ("train_subset", "test")) + f"  ({p['seconds']}s)", flush=True)
        done = {v: rs for v, rs in runs.items() if len(rs) == seed + 1}
        write_json(out_path, {**result, "seeds_done": seed + 1, "table": table(done),
                              "table_nll": table(done, "nll_mean_over_conditions", lower_is_better=True),
                              "weight_table": weight_table(done), "predictor": predictor,
                              "runs": runs, "total_seconds": round(time.perf_counter() - t0, 1)}, indent=2)
    _print_table("accuracy % (mean±std, paired delta vs plain ±std, seeds better/total; higher is better)",
                 table(runs), runs, 100, ".2f")
    _print_table("test NLL (mean±std, paired delta vs plain ±std, seeds better/total; LOWER is better)",
                 table(runs, "nll_mean_over_conditions", lower_is_better=True), runs, 1, ".4f")
    print("float weights after training: kurtosis / |skew| (mean±std over seeds; WDR targets kurtosis 1.8, "
          "skew 0, on all layers but the first)")
    for variant, row in weight_table(runs).items():
        print(f"  {variant:5s} " + "  ".join(
            f"{layer} {c['kurtosis_mean']:.2f}±{c['kurtosis_std']:.2f} / {c['abs_skew_mean']:.2f}"
            f"±{c['abs_skew_std']:.2f}" for layer, c in row.items()))
    print(f"total {time.perf_counter() - t0:.0f}s -> {out_path}")


if __name__ == "__main__":
    main()
