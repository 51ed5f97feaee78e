"""Checkpoint-against-checkpoint measures on arrays (pure NumPy, no I/O): win rates from per-token losses with a
Bradley-Terry fit and the count of non-transitive triples (Gigastep's matrix), top-1 disagreement with its
reference curves and the ensemble gain of a two-model mixture (Fort et al.), cosines of parameters streamed block
by block, and metric MDS (or a small exact t-SNE) of a distance matrix for the trajectory map."""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from itertools import combinations

import numpy as np

LN2 = math.log(2.0)
CHUNK_ELEMENTS = 1 << 20  # pair temporaries per block of tokens: ~1M values, whatever the number of checkpoints


@dataclass
class PairMatrices:
    """Every ordered pair of K checkpoints over the targets both count. `wins2[a, b]` counts a's wins twice and
    ties once (integers, so W + Wᵀ = 1 exactly); `gain` is the mean ensemble gain, `disagreement` the share of
    differing top-1 predictions; the diagonal is computed like any other pair."""

    count: np.ndarray  # (K, K) int64: targets both checkpoints count
    wins2: np.ndarray  # (K, K) int64: 2 x wins + ties of the row checkpoint against the column one
    disagree: np.ndarray  # (K, K) int64: targets whose top-1 predictions differ
    gain_sum: np.ndarray  # (K, K) float64: summed per-target ensemble gain

    @property
    def win_rate(self) -> np.ndarray:
        return self.wins2 / (2.0 * self.count)

    @property
    def disagreement(self) -> np.ndarray:
        return self.disagree / self.count

    @property
    def ensemble_gain(self) -> np.ndarray:
        return self.gain_sum / self.count


def mixture_gain(d: np.ndarray) -> np.ndarray:
    """Per-target ensemble gain mean(ℓA, ℓB) − (−log((e^−ℓA + e^−ℓB)/2)) as a function of d = ℓA − ℓB alone: it is
    log cosh(d/2) ≥ 0, written |d|/2 + log1p(e^−|d|) − log 2 so that no exponential overflows."""
    a = np.abs(d)
    return a / 2 + np.log1p(np.exp(-a)) - LN2


def pair_matrices(
    losses: np.ndarray, top1: np.ndarray, eps: float = 0.0, chunk_elements: int = CHUNK_ELEMENTS
) -> PairMatrices:
    """All pairwise counts of K checkpoints from `losses` (K, N; NaN where a target does not count) and `top1`
    (K, N). A target counts for a pair when both losses are finite. Row a against every later row b is done on
    blocks of tokens sized so the temporaries stay near `chunk_elements` values: memory beyond the inputs does not
    grow with the number of pairs. a beats b on a target when ℓa < ℓb − eps; |ℓa − ℓb| ≤ eps is a tie."""
    if losses.shape != top1.shape or losses.ndim != 2:
        raise ValueError("losses and top1 must both be (checkpoints, targets)")
    k, n = losses.shape
    first = np.isfinite(losses[0])  # usual case: one dataset mask, so NaNs line up in every row
    shared = all(np.array_equal(np.isfinite(row), first) for row in losses[1:])  # row by row: no (K, N) mask
    del first
    count = np.zeros((k, k), np.int64)
    wins2 = np.zeros((k, k), np.int64)
    disagree = np.zeros((k, k), np.int64)
    gain_sum = np.zeros((k, k), np.float64)
    block = max(1, chunk_elements // max(k, 1))
    for s0 in range(0, n, block):
        lo = losses[:, s0 : s0 + block].astype(np.float64)
        t = top1[:, s0 : s0 + block]
        if shared:  # keep only this block's counted targets; then no pair needs its own mask
            keep = np.isfinite(lo[0])
            lo, t = lo[:, keep], t[:, keep]
        for a in range(k):
            d = lo[a:] - lo[a]  # row 0 is a against itself; d[j] = ℓ_b − ℓ_a, so a wins where d > eps
            differ = t[a:] != t[a]
            if shared:
                width = d.shape[1]
                counted = np.full(len(d), width, np.int64)
                wins = np.count_nonzero(d > eps, axis=1)
                np.abs(d, out=d)
                ties = np.count_nonzero(d <= eps, axis=1)
                gain = np.negative(d)  # mixture_gain, with one buffer: log1p(e^−|d|) − log 2 + |d|/2
                np.exp(gain, out=gain)
                np.log1p(gain, out=gain)
                gain -= LN2  # per target, so that a pair of equal losses sums exact zeros
                d *= 0.5
                gain += d
                g = gain.sum(axis=1)
                dis = np.count_nonzero(differ, axis=1)
            else:
                valid = np.isfinite(d)
                counted = np.count_nonzero(valid, axis=1)
                with np.errstate(invalid="ignore"):
                    ties = np.count_nonzero(np.abs(d) <= eps, axis=1)  # NaN compares False
                    wins = np.count_nonzero(d > eps, axis=1)
                g = np.where(valid, mixture_gain(np.where(valid, d, 0.0)), 0.0).sum(axis=1)
                dis = np.count_nonzero(differ & valid, axis=1)
            count[a, a:] += counted
            wins2[a, a:] += 2 * wins + ties
            disagree[a, a:] += dis
            gain_sum[a, a:] += g
    upper = np.triu_indices(k, 1)
    lower = (upper[1], upper[0])
    count[lower] = count[upper]
    wins2[lower] = 2 * count[upper] - wins2[upper]  # b's wins are a's losses; ties count for both
    disagree[lower] = disagree[upper]
    gain_sum[lower] = gain_sum[upper]
    return PairMatrices(count=count, wins2=wins2, disagree=disagree, gain_sum=gain_sum)


def bradley_terry(
    wins: np.ndarray, games: np.ndarray, prior_games: float = 1.0, tol: float = 1e-10, max_iter: int = 10_000
) -> np.ndarray:
    """Bradley-Terry strengths s (log scale, mean 0) with P(a beats b) = σ(s_a − s_b), by Hunter's (2004) MM
    iteration on win counts `wins[a, b]` (ties as half wins) out of `games[a, b]`. `prior_games` adds that many
    virtual games per pair, split evenly, so a checkpoint that never loses keeps a finite strength; with ~10⁵
    targets per pair one virtual game moves nothing visibly."""
    k = len(wins)
    w = np.asarray(wins, np.float64) + prior_games / 2
    n = np.asarray(games, np.float64) + prior_games
    np.fill_diagonal(w, 0.0)
    np.fill_diagonal(n, 0.0)
    total_wins = w.sum(axis=1)
    p = np.ones(k)
    for _ in range(max_iter):
        new = total_wins / (n / (p[:, None] + p[None, :])).sum(axis=1)
        new /= np.exp(np.log(new).mean())
        if np.max(np.abs(np.log(new) - np.log(p))) < tol:
            p = new
            break
        p = new
    s = np.log(p)
    return s - s.mean()


def nontransitive_triples(win_rate: np.ndarray) -> int:
    """Unordered triples (a, b, c) whose majority relation is a cycle: a beats b, b beats c and c beats a (W > 0.5
    on each edge, in one direction or the other); a triple with an exact tie (W = 0.5) is not a cycle."""
    beats = win_rate > 0.5
    cycles = 0
    for a, b, c in combinations(range(len(win_rate)), 3):
        if (beats[a, b] and beats[b, c] and beats[c, a]) or (beats[b, a] and beats[c, b] and beats[a, c]):
            cycles += 1
    return cycles


def disagreement_references(acc: np.ndarray, acc_ref: float) -> dict[str, np.ndarray]:
    """Disagreement d with a reference of top-1 accuracy `acc_ref`, divided by its error 1 − acc_ref, for a model
    of accuracy `acc` under three assumptions about where the errors fall (e, e₀ are the two error rates):
    nested errors with the same wrong guess (the fewest disagreements two such accuracies allow): d = |acc − acc_ref|;
    independent errors with different wrong guesses: d = e + e₀ − e·e₀;
    disjoint errors (never wrong together): d = min(1, e + e₀)."""
    acc = np.asarray(acc, np.float64)
    e, e0 = 1.0 - acc, 1.0 - acc_ref
    return {
        "nested": np.abs(acc - acc_ref) / e0,
        "independent": (e + e0 - e * e0) / e0,
        "disjoint": np.minimum(1.0, e + e0) / e0,
    }


def weight_grams(
    blocks: Iterable[np.ndarray], k: int, groups: list[list[int]] = ()
) -> tuple[np.ndarray, list[np.ndarray]]:
    """Dot products of whole parameter vectors without holding any whole vector: Σ over blocks of X Xᵀ (float64),
    X a (K, m) block of K checkpoints' flattened parameters, and per group of rows (one seed's steps, its first
    row the origin θ₀) the Gram of θᵢ − θ₀ over its other rows, formed block by block (no cancellation between
    large dot products)."""
    gram = np.zeros((k, k), np.float64)
    deltas = [np.zeros((len(g) - 1, len(g) - 1), np.float64) for g in groups]
    for x in blocks:
        x = np.asarray(x, np.float64).reshape(k, -1)
        gram += x @ x.T
        for acc, group in zip(deltas, groups, strict=True):
            d = x[group[1:]] - x[group[0]]
            acc += d @ d.T
    return gram, deltas


def cosines(gram: np.ndarray) -> np.ndarray:
    """Cosine matrix from a Gram matrix (NaN where a vector is zero)."""
    norm = np.sqrt(np.clip(np.diag(gram), 0.0, None))
    outer = np.outer(norm, norm)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(outer > 0, np.clip(gram / outer, -1.0, 1.0), np.nan)


def classical_mds(dist: np.ndarray, dim: int = 2) -> np.ndarray:
    """Torgerson's classical scaling: the top eigenvectors of the double-centred squared distances."""
    n = len(dist)
    j = np.eye(n) - 1.0 / n
    b = -0.5 * j @ (np.asarray(dist, np.float64) ** 2) @ j
    vals, vecs = np.linalg.eigh(b)
    order = np.argsort(vals)[::-1][:dim]
    return vecs[:, order] * np.sqrt(np.clip(vals[order], 0.0, None))


def stress(dist: np.ndarray, points: np.ndarray) -> float:
    """Kruskal's stress-1: sqrt(Σ (‖xᵢ − xⱼ‖ − δᵢⱼ)² / Σ δᵢⱼ²) over pairs i < j."""
    iu = np.triu_indices(len(dist), 1)
    fitted = np.linalg.norm(points[:, None, :] - points[None, :, :], axis=-1)[iu]
    target = np.asarray(dist, np.float64)[iu]
    denom = float((target**2).sum())
    return float(np.sqrt(((fitted - target) ** 2).sum() / denom)) if denom > 0 else 0.0


def metric_mds(dist: np.ndarray, dim: int = 2, max_iter: int = 3000, tol: float = 1e-12) -> tuple[np.ndarray, float]:
    """Metric MDS by SMACOF (Guttman transform, unit weights) started from classical scaling, so the result is
    deterministic; returns the points and their stress-1."""
    delta = np.asarray(dist, np.float64)
    if delta.shape[0] != delta.shape[1] or not np.allclose(delta, delta.T) or (delta < 0).any():
        raise ValueError("a distance matrix must be square, symmetric and non-negative")
    n = len(delta)
    x = classical_mds(delta, dim)
    if n < 3:
        return x, stress(delta, x)
    iu = np.triu_indices(n, 1)

    def raw(points: np.ndarray) -> float:
        fitted = np.linalg.norm(points[:, None, :] - points[None, :, :], axis=-1)
        return float(((fitted[iu] - delta[iu]) ** 2).sum())

    previous = raw(x)
    for _ in range(max_iter):
        fitted = np.linalg.norm(x[:, None, :] - x[None, :, :], axis=-1)
        with np.errstate(divide="ignore", invalid="ignore"):
            ratio = np.where(fitted > 0, delta / fitted, 0.0)
        b = -ratio
        np.fill_diagonal(b, 0.0)
        np.fill_diagonal(b, -b.sum(axis=1))
        x = b @ x / n
        current = raw(x)
        if previous - current <= tol * max(previous, 1e-300):
            break
        previous = current
    return x, stress(delta, x)


def tsne(dist: np.ndarray, seed: int = 0, perplexity: float | None = None, n_iter: int = 1000) -> np.ndarray:
    """Exact 2-D t-SNE (van der Maaten & Hinton 2008) of a small distance matrix, seeded: Gaussian affinities at
    the given perplexity (default min(30, (n − 1)/3)), early exaggeration 12 for 250 steps, momentum gradient
    descent. For a few dozen checkpoints; distances between clusters in the result carry no meaning."""
    d2 = np.asarray(dist, np.float64) ** 2
    n = len(d2)
    if n < 3:
        raise ValueError("t-SNE needs at least three points")
    perp = perplexity or min(30.0, (n - 1) / 3.0)
    target = math.log(perp)
    p = np.zeros((n, n))
    for i in range(n):  # binary search of each point's precision for the perplexity
        lo, hi, beta = 0.0, np.inf, 1.0
        row = np.delete(d2[i], i)
        for _ in range(100):
            w = np.exp(-(row - row.min()) * beta)
            s = w.sum()
            h = math.log(s) + beta * float((row - row.min()) @ w) / s
            if abs(h - target) < 1e-6:
                break
            if h > target:
                lo, beta = beta, beta * 2 if hi == np.inf else (beta + hi) / 2
            else:
                hi, beta = beta, (beta + lo) / 2
        p[i, np.arange(n) != i] = w / s
    p = np.maximum((p + p.T) / (2 * n), 1e-12)
    rng = np.random.default_rng(seed)
    y = rng.normal(scale=1e-4, size=(n, 2))
    update = np.zeros_like(y)
    for it in range(n_iter):
        exaggerate = 12.0 if it < 250 else 1.0
        diff = y[:, None, :] - y[None, :, :]
        num = 1.0 / (1.0 + (diff**2).sum(-1))
        np.fill_diagonal(num, 0.0)
        q = np.maximum(num / num.sum(), 1e-12)
        grad = 4 * (((exaggerate * p - q) * num)[:, :, None] * diff).sum(axis=1)
        update = (0.5 if it < 250 else 0.8) * update - 100.0 * grad
        y = y + update
        y -= y.mean(axis=0)
    return y
