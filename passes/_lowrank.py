"""Factor math and rank allocation for the `svd` and `fwsvd` passes (tensors only, no graph).

Paper convention (Hsu et al., "Language model compression with weighted low-rank factorization",
ICLR 2022): a layer is y = x W + b with W of shape (N inputs, M outputs). With row (input-feature)
importances f of shape (N,) and the weighting

    I = diag(sqrt(f / max(f) + eps)),     svd(I W) = U S V^T,
    A = I^-1 U_r S_r   (N x r),           B = V_r^T   (r x M),            W ~ A B,

A B minimizes ||I (W - A B)||_F^2 = sum_i I_ii^2 ||W_i - (A B)_i||^2, and the minimum is
sum_{k>r} S_k^2 (Eckart-Young on I W). f = 1 is plain truncated SVD. Dividing f by its max makes the
factors invariant to the Fisher's scale; eps is relative to that max (1e-5, as in the third-party code).

Rank allocation spends a parameter budget over layers. A rank unit costs N + M parameters and buys
the error ``scale * S_k^2``. With scale = max(f) / M, the row importance spread evenly over the row's
M elements, that is the Fisher-weighted squared error sum_ij F_ij dW_ij^2 (~ 2 dL, second order) under
the paper's row-sharing approximation; it is comparable across layers because every layer's Fisher
comes from the same loss, and a uniform Fisher allocates exactly like plain SVD.
``allocate_global`` is a greedy water-filling on gain / cost, ``allocate_uniform`` keeps the same
parameter fraction in every layer.
"""

from __future__ import annotations

import dataclasses
import heapq

import torch

__all__ = ["Spectrum", "weighted_svd", "max_rank", "uniform_rank", "allocate_uniform", "allocate_global"]


@dataclasses.dataclass(frozen=True)
class Spectrum:
    """The SVD of the row-weighted matrix I W of one layer (float64)."""

    u: torch.Tensor  # (N, k)
    s: torch.Tensor  # (k,)
    vh: torch.Tensor  # (k, M)
    row_weight: torch.Tensor  # (N,) diagonal of I
    scale: float  # multiplies S_k^2 to give the layer's error in the shared (loss) unit

    @property
    def n_in(self) -> int:
        return self.u.shape[0]

    @property
    def n_out(self) -> int:
        return self.vh.shape[1]

    def factors(self, r: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(A, B) of rank ``r`` in float32: A = I^-1 U_r S_r (N x r), B = V_r^T (r x M)."""
        a = (self.u[:, :r] * self.s[:r]) / self.row_weight[:, None]
        return a.float(), self.vh[:r].float()

    def gain(self, lo: int, hi: int) -> float:
        """Error removed by growing the rank from ``lo`` to ``hi``: scale * sum_{lo<=k<hi} S_k^2."""
        return self.scale * float((self.s[lo:hi] ** 2).sum())

    def energy_kept(self, r: int) -> float:
        """Fraction of sum S_k^2 (of I W) that rank ``r`` keeps."""
        total = float((self.s ** 2).sum())
        return 1.0 if total == 0 else float((self.s[:r] ** 2).sum()) / total


def weighted_svd(w: torch.Tensor, row_importance: torch.Tensor | None = None, eps: float = 1e-5
                 ) -> Spectrum:
    """SVD of I W for ``w`` (N, M); ``row_importance`` f (N,) or None for plain SVD (I = 1).

    A layer whose f is all zero (no gradient reached it) gets I = sqrt(eps) * 1, i.e. plain SVD,
    and scale 0: its truncation costs nothing in the loss's unit. Otherwise scale = max(f) / M.
    """
    w64 = w.detach().to(torch.float64)
    if row_importance is None:
        row_weight, scale = torch.ones(w64.shape[0], dtype=torch.float64), 1.0
    else:
        f = row_importance.detach().to(torch.float64)
        top = float(f.max())
        row_weight = torch.sqrt((f / top if top > 0 else f) + eps)
        scale = top / w64.shape[1]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # LAPACK's SVD gains little from threads here and stalls on shared cores
    try:
        u, s, vh = torch.linalg.svd(row_weight[:, None] * w64, full_matrices=False)
    finally:
        torch.set_num_threads(threads)
    return Spectrum(u, s, vh, row_weight, scale)


def max_rank(n_in: int, n_out: int, round_to: int = 1) -> int:
    """Largest multiple of ``round_to`` with r (N + M) < N M (fewer parameters than dense); 0 if none."""
    r = (n_in * n_out - 1) // (n_in + n_out)
    return r // round_to * round_to


def uniform_rank(n_in: int, n_out: int, ratio: float, round_to: int = 1) -> int:
    """The rank keeping ``ratio`` of the N M weights: floor(ratio N M / (N + M)), rounded down to
    ``round_to`` but at least ``round_to``."""
    r = int(ratio * n_in * n_out / (n_in + n_out)) // round_to * round_to
    return max(r, round_to)


def allocate_uniform(shapes: dict[str, tuple[int, int]], ratio: float, round_to: int = 1
                     ) -> dict[str, int | None]:
    """Per-layer ranks at the same kept fraction ``ratio``; None where no rank saves parameters."""
    out: dict[str, int | None] = {}
    for name, (n, m) in shapes.items():
        r = uniform_rank(n, m, ratio, round_to)
        out[name] = r if r <= max_rank(n, m, round_to) else None
    return out


def allocate_global(spectra: dict[str, Spectrum], budget: float, round_to: int = 1
                    ) -> dict[str, int | None]:
    """Greedy water-filling: spend ``budget`` weights where the error removed per weight is largest.

    Every factorizable layer starts at rank ``round_to``; the others are dense and paid for. A step
    grows one layer by ``round_to`` ranks (cost round_to (N + M), gain = scale * sum of the next
    S_k^2); once the next step would no longer save parameters, the layer's last step is to stay
    dense (cost N M - r (N + M), gain = all the error left). Steps are taken best gain/cost first
    while they fit. Returns the rank per layer, or None for layers kept dense. Per layer the gains of
    rank steps only decrease (S is sorted), so greedy is optimal for the rank steps up to the
    granularity of one step.
    """
    ranks: dict[str, int | None] = {}
    spent = 0.0
    heap: list[tuple[float, str]] = []
    steps: dict[str, tuple[int | None, float, float]] = {}  # name -> (new rank or None=dense, gain, cost)

    def push(name: str, r: int) -> None:
        sp = spectra[name]
        unit = sp.n_in + sp.n_out
        if r + round_to <= max_rank(sp.n_in, sp.n_out, round_to):
            step = (r + round_to, sp.gain(r, r + round_to), round_to * unit)
        else:
            step = (None, sp.gain(r, sp.s.numel()), sp.n_in * sp.n_out - r * unit)
        steps[name] = step
        heapq.heappush(heap, (-step[1] / step[2], name))

    for name, sp in spectra.items():
        dense = max_rank(sp.n_in, sp.n_out, round_to) < round_to
        ranks[name] = None if dense else round_to
        spent += sp.n_in * sp.n_out if dense else round_to * (sp.n_in + sp.n_out)
    for name in sorted(n for n, r in ranks.items() if r is not None):
        push(name, round_to)
    while heap:
        _, name = heapq.heappop(heap)
        new_rank, _, cost = steps[name]
        if spent + cost > budget:
            continue  # the budget only shrinks: this layer's next step never fits, it is done
        spent += cost
        ranks[name] = new_rank
        if new_rank is not None:
            push(name, new_rank)
    return ranks
