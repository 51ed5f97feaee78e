"""The measures of interventional robustness (Avery et al.), pure functions on arrays.

Seeds are raters and the intervention is the stimulus: for n seeds' next-token distributions at one position,
dispersion is the generalised Jensen-Shannon divergence in bits, JSD = H(mean_k p_k) - mean_k H(p_k), bounded by
log2(n); IR = 1 - JSD / log2(n) is 1 when every seed predicts the same distribution. IR_norm = IR(x') - IR(x)
scores an intervention that leaves the seeds exactly as (dis)agreeing as before at 0.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

LN2 = math.log(2.0)


LOG_FLOOR = torch.finfo(torch.float64).min  # stands in for log 0, so that 0 * log 0 = 0 without a branch


def _dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Sum over the last axis of a * b, without materialising the product (a batched matrix product)."""
    return torch.einsum("...v,...v->...", a, b)


@dataclass
class Distributions:
    """n seeds' next-token distributions at every position in float64: log-probabilities (log 0 floored),
    probabilities, and each seed's entropy in bits, computed once and shared by JSD and KL."""

    logp: torch.Tensor  # (n_seeds, ..., vocab)
    p: torch.Tensor
    entropy: torch.Tensor  # (n_seeds, ...)

    @classmethod
    def of(cls, logp: torch.Tensor) -> Distributions:
        logp = logp.to(torch.float64).clamp_min(LOG_FLOOR)
        p = logp.exp()
        return cls(logp, p, -_dot(p, logp) / LN2)

    def jsd(self) -> torch.Tensor:
        """Generalised JSD in bits, H(mean_k p_k) - mean_k H(p_k), one value per position."""
        mean = self.p.mean(0)
        return -torch.special.xlogy(mean, mean).sum(-1) / LN2 - self.entropy.mean(0)

    def kl_to(self, other: Distributions) -> torch.Tensor:
        """KL(self || other) in bits per seed and position: -H(self) - sum self.p * log other.p."""
        return -self.entropy - _dot(self.p, other.logp) / LN2


def jsd_bits(logp: torch.Tensor, topk: int | None = None) -> torch.Tensor:
    """Generalised JSD in bits of `logp` `(n_seeds, ..., vocab)` log-probabilities, one value per position.

    With `topk`, the distributions are coarsened to the union of every seed's K most likely tokens at that
    position plus one "other" bucket holding the rest of each seed's mass. Merging outcomes never raises a
    divergence (data processing), so the top-K value is a lower bound that equals the exact one at K = vocab.
    """
    if topk is None or topk >= logp.shape[-1]:
        return Distributions.of(logp).jsd()
    logp = logp.double()
    keep = torch.zeros(logp.shape, dtype=torch.bool, device=logp.device)
    keep.scatter_(-1, logp.topk(topk, dim=-1).indices, True)
    p = logp.exp() * keep.any(0)  # the union of the seeds' top-K tokens, the same outcomes for every seed
    other = (1.0 - p.sum(-1, keepdim=True)).clamp_min(0.0)
    q = torch.cat([p, other], dim=-1)
    mean = q.mean(0)
    return (-torch.special.xlogy(mean, mean).sum(-1) + torch.special.xlogy(q, q).sum(-1).mean(0)) / LN2


def interventional_robustness(jsd: torch.Tensor | np.ndarray | float, n_seeds: int) -> torch.Tensor | np.ndarray:
    """IR = 1 - JSD / log2(n): 1 when the seeds agree exactly, 0 at the largest dispersion n seeds can reach."""
    return 1.0 - jsd / math.log2(n_seeds)


def kl_bits(logp: torch.Tensor, logq: torch.Tensor) -> torch.Tensor:
    """KL(p || q) in bits over the last axis, from log-probabilities (terms with p = 0 contribute 0)."""
    return Distributions.of(logp).kl_to(Distributions.of(logq))


def fleiss_kappa(counts: np.ndarray) -> float:
    """Fleiss' kappa of `counts` `(subjects, categories)`: how many of the n raters put each subject in each
    category (every row sums to the same n). NaN when every rating falls in one category (no variation)."""
    counts = np.asarray(counts, dtype=np.float64)
    return fleiss_kappa_from_sums(len(counts), int(counts[0].sum()), (counts**2).sum(), counts.sum(0))


def fleiss_kappa_from_sums(n_subjects: int, n_raters: int, sum_sq: float, totals: np.ndarray) -> float:
    """Fleiss' kappa from streamed sums: the number of subjects, raters per subject, the sum over subjects and
    categories of squared counts, and each category's total count (so it accumulates batch by batch)."""
    n, big_n = n_raters, n_subjects
    if big_n == 0 or n < 2:
        return float("nan")
    p_bar = (sum_sq - big_n * n) / (big_n * n * (n - 1))  # mean observed agreement
    shares = np.asarray(totals, dtype=np.float64) / (big_n * n)
    p_e = float((shares**2).sum())  # agreement expected by chance
    return float("nan") if p_e >= 1.0 else float((p_bar - p_e) / (1.0 - p_e))


def icc_agreement(scores: np.ndarray) -> float:
    """ICC(2,1) (two-way random effects, absolute agreement, single rater; Shrout & Fleiss 1979) of `scores`
    `(targets, raters)`: here targets are interventions and raters seeds, so it says whether the seeds rank the
    interventions alike. NaN with fewer than 2 targets or raters, or no variance at all."""
    x = np.asarray(scores, dtype=np.float64)
    n, k = x.shape
    if n < 2 or k < 2:
        return float("nan")
    grand = x.mean()
    ms_rows = k * ((x.mean(1) - grand) ** 2).sum() / (n - 1)
    ms_cols = n * ((x.mean(0) - grand) ** 2).sum() / (k - 1)
    resid = x - x.mean(1, keepdims=True) - x.mean(0, keepdims=True) + grand
    ms_err = (resid**2).sum() / ((n - 1) * (k - 1))
    denom = ms_rows + (k - 1) * ms_err + k * (ms_cols - ms_err) / n
    return float("nan") if denom <= 0 else float((ms_rows - ms_err) / denom)


def sign_agreement(changes: np.ndarray) -> float:
    """Share of contexts `(contexts, seeds)` on which every seed's change has the same sign (zero counts as its
    own sign): 1 when the seeds always move the same way."""
    s = np.sign(np.asarray(changes))
    return float((s == s[:, :1]).all(axis=1).mean()) if len(s) else float("nan")


@dataclass(frozen=True)
class PermutationTest:
    """How an observed IR_norm compares with K controls: excess over their mean, a two-sided rank p-value
    (1 + #controls at least as far from the control mean) / (1 + K), and the smallest p K controls allow."""

    n: int
    mean: float
    sd: float | None
    excess: float
    p_value: float
    p_floor: float

    @classmethod
    def of(cls, controls: np.ndarray, observed: float) -> PermutationTest | None:
        c = np.asarray(controls, dtype=np.float64)
        if len(c) == 0:
            return None
        mean = float(c.mean())
        sd = float(c.std(ddof=1)) if len(c) > 1 else None
        as_far = int((np.abs(c - mean) >= abs(observed - mean) - 1e-15).sum())
        return cls(len(c), mean, sd, observed - mean, (1 + as_far) / (1 + len(c)), 1 / (1 + len(c)))


def bootstrap_ci(values: np.ndarray, draws: int = 1000, seed: int = 0, level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of `values` (one per context), resampling contexts."""
    v = np.asarray(values, dtype=np.float64)
    if len(v) < 2:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    means = v[rng.integers(0, len(v), size=(draws, len(v)))].mean(1)
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(means, [tail, 100 - tail])
    return float(low), float(high)
