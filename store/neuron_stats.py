"""Streaming per-neuron moments in float64 with a numerically stable merge (Chan et al. / Pebay).

Each batch's central moments are computed directly and merged into the running totals, so the result does
not depend on how the tokens were split into batches beyond rounding; skew and excess kurtosis use the same
(biased) definitions as `scipy.stats.skew` / `scipy.stats.kurtosis`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class NeuronMoments:
    """Final statistics for a vector of neurons; skew/kurtosis are NaN for constant neurons."""

    count: int
    mean: np.ndarray
    std: np.ndarray
    skew: np.ndarray
    kurtosis: np.ndarray
    frac_active: np.ndarray
    min: np.ndarray
    max: np.ndarray


class StreamingMoments:
    """Running count, mean, central power sums M2..M4, min, max and count of positive values per neuron."""

    def __init__(self, n_features: int) -> None:
        self.n = 0
        self.mean = np.zeros(n_features)
        self.m2 = np.zeros(n_features)
        self.m3 = np.zeros(n_features)
        self.m4 = np.zeros(n_features)
        self.min = np.full(n_features, np.inf)
        self.max = np.full(n_features, -np.inf)
        self.active = np.zeros(n_features, dtype=np.int64)

    def update(self, x: np.ndarray) -> None:
        """Merge a batch `(n, n_features)` of observations."""
        nb = x.shape[0]
        if nb == 0:
            return
        x = np.asarray(x, dtype=np.float64)
        mb = x.mean(axis=0)
        d = x - mb
        d2 = d * d
        m2b = d2.sum(axis=0)
        m3b = (d2 * d).sum(axis=0)
        m4b = (d2 * d2).sum(axis=0)
        np.minimum(self.min, x.min(axis=0), out=self.min)
        np.maximum(self.max, x.max(axis=0), out=self.max)
        self.active += (x > 0).sum(axis=0)
        na = self.n
        if na == 0:
            self.n, self.mean, self.m2, self.m3, self.m4 = nb, mb, m2b, m3b, m4b
            return
        n = na + nb
        delta = mb - self.mean
        d_n = delta / n
        m2 = self.m2 + m2b + delta * d_n * na * nb
        m3 = (self.m3 + m3b + delta * d_n * d_n * na * nb * (na - nb)
              + 3.0 * d_n * (na * m2b - nb * self.m2))
        m4 = (self.m4 + m4b + delta * d_n**3 * na * nb * (na * na - na * nb + nb * nb)
              + 6.0 * d_n * d_n * (na * na * m2b + nb * nb * self.m2)
              + 4.0 * d_n * (na * m3b - nb * self.m3))
        self.n, self.mean, self.m2, self.m3, self.m4 = n, self.mean + d_n * nb, m2, m3, m4

    def result(self) -> NeuronMoments:
        n = max(self.n, 1)
        var = self.m2 / n
        with np.errstate(divide="ignore", invalid="ignore"):
            constant = var <= 0
            skew = np.where(constant, np.nan, (self.m3 / n) / var**1.5)
            kurt = np.where(constant, np.nan, (self.m4 / n) / var**2 - 3.0)
        return NeuronMoments(self.n, self.mean.copy(), np.sqrt(var), skew, kurt, self.active / n,
                             self.min.copy(), self.max.copy())
