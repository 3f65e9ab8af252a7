"""Runtime of the WGSEF proximal step vs the number of groups (1e3 .. 1e6): regc's O(n) median-of-
breakpoints root search against two baselines measured in the same run, all solving the same problem
u_i = clip(eta a_i - c_i, 0, 1), sum_i u_i = k:

    sort       sort the 2n breakpoints, sweep slope/intercept with cumulative sums: O(n log n)
    bisection  60 halvings of the eta bracket, each a full O(n) evaluation (the course code's method)

    python bench/wgsef_prox.py [--out bench/results/wgsef_prox.json] [--repeats 5] [--max-exp 6]

Reports the best-of-repeats seconds and ns per group for each n, the log-log slope of time vs n for
each solver (1.0 = linear), and the largest |u - u_regc| of the baselines (they must agree).
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import time
from pathlib import Path

import numpy as np

from regc.passes._reg_math import sef_root


def root_sort(a: np.ndarray, c: np.ndarray, k: float) -> np.ndarray:
    lo, hi = c / a, (c + 1) / a
    bps = np.concatenate([lo, hi])
    # entering the linear part at lo adds slope a and offset -c; leaving it at hi removes them and adds 1
    d_slope = np.concatenate([a, -a])
    d_off = np.concatenate([-c, c + 1])
    order = np.argsort(bps, kind="stable")
    slope, off = np.cumsum(d_slope[order]), np.cumsum(d_off[order])
    g = off + slope * bps[order] - k
    j = int(np.searchsorted(g, 0.0))  # g is non-decreasing at the breakpoints
    eta = (k - off[j - 1]) / slope[j - 1] if j > 0 and slope[j - 1] > 0 else bps[order][j]
    return np.clip(eta * a - c, 0, 1)


def root_bisect(a: np.ndarray, c: np.ndarray, k: float, iters: int = 60) -> np.ndarray:
    lo, hi = 0.0, float(((c + 1) / a).max())
    for _ in range(iters):
        mid = 0.5 * (lo + hi)
        if np.clip(mid * a - c, 0, 1).sum() < k:
            lo = mid
        else:
            hi = mid
    return np.clip(0.5 * (lo + hi) * a - c, 0, 1)


def _best(fn, repeats: int) -> tuple[float, np.ndarray]:
    best, out = math.inf, None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def _slope(ns: list[int], ts: list[float]) -> float:
    return float(np.polyfit(np.log(ns), np.log(ts), 1)[0])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "wgsef_prox.json"))
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--max-exp", type=int, default=6)
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    rows = []
    for e in range(3, args.max_exp + 1):
        n = 10**e
        a = rng.gamma(2.0, 1.0, size=n)  # group norms
        c = np.full(n, 0.05)             # t = lr * lambda
        k = n / 4
        t_regc, u = _best(functools.partial(sef_root, a, c, np.ones(n), k), args.repeats)
        t_sort, u_sort = _best(functools.partial(root_sort, a, c, k), args.repeats)
        t_bis, u_bis = _best(functools.partial(root_bisect, a, c, k), max(1, args.repeats // 2))
        rows.append({"groups": n, "regc_s": t_regc, "sort_s": t_sort, "bisection_s": t_bis,
                     "regc_ns_per_group": 1e9 * t_regc / n, "sort_ns_per_group": 1e9 * t_sort / n,
                     "bisection_ns_per_group": 1e9 * t_bis / n, "sum_u": float(u.sum()), "k": k,
                     "max_abs_diff_sort": float(np.abs(u - u_sort).max()),
                     "max_abs_diff_bisection": float(np.abs(u - u_bis).max())})
        print(f"n={n:>8}  regc {t_regc * 1e3:8.2f} ms  sort {t_sort * 1e3:8.2f} ms  bisection "
              f"{t_bis * 1e3:8.2f} ms  |u-u_sort| {rows[-1]['max_abs_diff_sort']:.1e}")
    ns = [r["groups"] for r in rows]
    result = {
        "benchmark": "wgsef_prox",
        "rows": rows,
        "loglog_slope": {s: _slope(ns, [r[f"{s}_s"] for r in rows]) for s in ("regc", "sort", "bisection")},
        "speedup_vs_sort_at_max": rows[-1]["sort_s"] / rows[-1]["regc_s"],
        "note": "best of repeats, 1 process; slope 1.0 = linear time",
    }
    print(json.dumps(result["loglog_slope"]))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
