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


class Workspace:
    """Reusable float64 work arrays shared by the moments of every layer (they are updated one at a time):
    fresh 100 MB temporaries per batch cost more in page faults than the arithmetic."""

    def __init__(self) -> None:
        self.arrays: tuple[np.ndarray, ...] = ()

    def get(self, rows: int, cols: int) -> tuple[np.ndarray, ...]:
        if not self.arrays or self.arrays[0].size < rows * cols:
            self.arrays = tuple(np.empty(rows * cols) for _ in range(3))
        return tuple(a[: rows * cols].reshape(rows, cols) for a in self.arrays)


class StreamingMoments:
    """Running count, mean, central power sums M2..M4, min, max and count of positive values per neuron."""

    def __init__(self, n_features: int, workspace: Workspace | None = None) -> None:
        self.n = 0
        self.mean = np.zeros(n_features)
        self.m2 = np.zeros(n_features)
        self.m3 = np.zeros(n_features)
        self.m4 = np.zeros(n_features)
        self.min = np.full(n_features, np.inf)
        self.max = np.full(n_features, -np.inf)
        self.active = np.zeros(n_features, dtype=np.int64)
        self.workspace = workspace or Workspace()

    def update(self, x: np.ndarray) -> None:
        """Merge a batch `(n, n_features)` of observations."""
        nb = x.shape[0]
        if nb == 0:
            return
        d, d2, tmp = self.workspace.get(nb, len(self.mean))
        np.copyto(d, x)
        np.minimum(self.min, d.min(axis=0), out=self.min)
        np.maximum(self.max, d.max(axis=0), out=self.max)
        self.active += np.count_nonzero(d > 0, axis=0)
        mb = d.mean(axis=0)
        np.subtract(d, mb, out=d)
        np.multiply(d, d, out=d2)
        m2b = d2.sum(axis=0)
        np.multiply(d2, d, out=tmp)
        m3b = tmp.sum(axis=0)
        np.multiply(d2, d2, out=tmp)
        m4b = tmp.sum(axis=0)
        na = self.n
        if na == 0:
            self.n, self.mean, self.m2, self.m3, self.m4 = nb, mb, m2b, m3b, m4b
            return
        n = na + nb
        delta = mb - self.mean
        d_n = delta / n
        m2 = self.m2 + m2b + delta * d_n * na * nb
        m3 = self.m3 + m3b + delta * d_n * d_n * na * nb * (na - nb) + 3.0 * d_n * (na * m2b - nb * self.m2)
        m4 = (
            self.m4
            + m4b
            + delta * d_n**3 * na * nb * (na * na - na * nb + nb * nb)
            + 6.0 * d_n * d_n * (na * na * m2b + nb * nb * self.m2)
            + 4.0 * d_n * (na * m3b - nb * self.m3)
        )
        self.n, self.mean, self.m2, self.m3, self.m4 = n, self.mean + d_n * nb, m2, m3, m4

    def result(self) -> NeuronMoments:
        n = max(self.n, 1)
        var = self.m2 / n
        with np.errstate(divide="ignore", invalid="ignore"):
            constant = var <= 0
            skew = np.where(constant, np.nan, (self.m3 / n) / var**1.5)
            kurt = np.where(constant, np.nan, (self.m4 / n) / var**2 - 3.0)
        return NeuronMoments(
            self.n, self.mean.copy(), np.sqrt(var), skew, kurt, self.active / n, self.min.copy(), self.max.copy()
        )
