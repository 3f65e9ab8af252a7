"""EQ-Net's genetic search for a mixed-precision subnet under an average-bit budget (TECHNIQUES.md 5.5).

Constraint: the parameter-weighted average weight bits and the feature-map-weighted average
activation bits of the elastic layers both lie in (c - window, c]. Every individual is repaired into
the constraint: while an average exceeds c, a random elastic layer above the lowest bit-width steps
one bit-width down; then, while it is at most c - window, a random layer whose next bit-width keeps
the average <= c steps up. The upper bound c always holds after repair (when the lowest bit-width
fits it); the lower bound holds unless no such step exists (a budget window the space cannot hit).

Evolution (OFA / EQ-Net search, ``EvolutionFinder``): the population starts from ``population``
repaired uniform draws (conditions and per-layer bits); each generation keeps the top ``parents``
fraction P by predicted accuracy and adds ``population`` children: round(population / 2) by mutation
of a random parent (every gene, conditions included, redrawn with probability ``mutate_prob``) and
the rest by uniform crossover of two random parents, each child repaired; so a generation ranks
P + population individuals (25 + 50 + 50 with the paper's population 100). The best predicted
individual seen that meets the whole window is returned (if none does, the best one under c).
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch

from regc.passes._eqnet_quant import SubnetConfig
from regc.passes._eqnet_supernet import Supernet

__all__ = ["repair", "evolve"]

Scorer = Callable[[list[SubnetConfig]], torch.Tensor]


def _avg(bits: Sequence[int], costs: Sequence[int], idx: list[int]) -> float:
    return sum(bits[i] * costs[i] for i in idx) / sum(costs[i] for i in idx)


def _repair_bits(bits: list[int], costs: Sequence[int], idx: list[int], space: tuple[int, ...], c: float,
                 lo: float, g: torch.Generator) -> list[int]:
    bits = list(bits)
    pos = {b: k for k, b in enumerate(space)}
    while _avg(bits, costs, idx) > c + 1e-9:
        down = [i for i in idx if pos[bits[i]] > 0]
        if not down:
            break
        i = down[int(torch.randint(len(down), (1,), generator=g))]
        bits[i] = space[pos[bits[i]] - 1]
    while _avg(bits, costs, idx) <= lo + 1e-9:
        up = []
        for i in idx:
            if pos[bits[i]] + 1 < len(space):
                trial = list(bits)
                trial[i] = space[pos[bits[i]] + 1]
                if _avg(trial, costs, idx) <= c + 1e-9:
                    up.append(i)
        if not up:
            break
        i = up[int(torch.randint(len(up), (1,), generator=g))]
        bits[i] = space[pos[bits[i]] + 1]
    return bits


def repair(sn: Supernet, cfg: SubnetConfig, c: float, window: float, g: torch.Generator) -> SubnetConfig:
    """``cfg`` moved into the budget (see module docstring)."""
    idx = [i for i, f in enumerate(sn.free) if f]
    w = _repair_bits(list(cfg.w_bits), sn.w_cost, idx, sn.space.bits, c, c - window, g)
    a = _repair_bits(list(cfg.a_bits), sn.a_cost, idx, sn.space.bits, c, c - window, g)
    return sn.make(cfg.w_channel, cfg.w_sym, cfg.a_sym, w, a)


def meets(sn: Supernet, cfg: SubnetConfig, c: float, window: float) -> bool:
    return all(c - window + 1e-9 < v <= c + 1e-9 for v in sn.avg_bits(cfg))


def _mutate(sn: Supernet, cfg: SubnetConfig, p: float, g: torch.Generator) -> SubnetConfig:
    fresh = sn.sample("random", g)

    def mix(a, b):
        return b if float(torch.rand((), generator=g)) < p else a

    return sn.make(mix(cfg.w_channel, fresh.w_channel), mix(cfg.w_sym, fresh.w_sym),
                   mix(cfg.a_sym, fresh.a_sym),
                   [mix(a, b) for a, b in zip(cfg.w_bits, fresh.w_bits, strict=True)],
                   [mix(a, b) for a, b in zip(cfg.a_bits, fresh.a_bits, strict=True)])


def _cross(sn: Supernet, x: SubnetConfig, y: SubnetConfig, g: torch.Generator) -> SubnetConfig:
    def pick(a, b):
        return a if float(torch.rand((), generator=g)) < 0.5 else b

    return sn.make(pick(x.w_channel, y.w_channel), pick(x.w_sym, y.w_sym), pick(x.a_sym, y.a_sym),
                   [pick(a, b) for a, b in zip(x.w_bits, y.w_bits, strict=True)],
                   [pick(a, b) for a, b in zip(x.a_bits, y.a_bits, strict=True)])


def evolve(sn: Supernet, score: Scorer, c: float, window: float, population: int, generations: int,
           mutate_prob: float, g: torch.Generator, parents: float = 0.25) -> tuple[SubnetConfig, float, bool]:
    """(best config, its predicted score, whether it meets the whole window)."""
    pop = [repair(sn, sn.sample("random", g), c, window, g) for _ in range(population)]
    best: dict[bool, tuple[float, SubnetConfig]] = {}

    def rank(cands: list[SubnetConfig]) -> list[SubnetConfig]:
        with torch.no_grad():
            s = score(cands).tolist()
        for v, cfg in zip(s, cands, strict=True):
            ok = meets(sn, cfg, c, window)
            if ok not in best or v > best[ok][0]:
                best[ok] = (v, cfg)
        order = sorted(range(len(cands)), key=lambda i: -s[i])
        return [cands[i] for i in order]

    pop = rank(pop)
    n_par = max(1, int(round(parents * population)))
    for _ in range(generations):
        par = pop[:n_par]
        kids = []
        for k in range(population):
            if k < round(population / 2) or n_par < 2:
                child = _mutate(sn, par[int(torch.randint(n_par, (1,), generator=g))], mutate_prob, g)
            else:
                i, j = torch.randperm(n_par, generator=g)[:2].tolist()
                child = _cross(sn, par[i], par[j], g)
            kids.append(repair(sn, child, c, window, g))
        pop = rank(par + kids)
    ok = True in best
    v, cfg = best[ok]
    return cfg, v, ok
