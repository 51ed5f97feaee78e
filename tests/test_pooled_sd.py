"""The layer-pooled, shrunk baseline sd behind `z_pooled`, against the raw per-neuron sd on small-K samples."""

from __future__ import annotations

import numpy as np
import pytest

from actdb.compute.correlation.universality import pooled_baseline_sd


def _draws(rng: np.random.Generator, n: int, k: int, sigma: np.ndarray, heavy: bool) -> np.ndarray:
    """(k, n) baseline draws around 0: Gaussian, or Student t with 3 degrees of freedom scaled to sd sigma."""
    if heavy:
        return rng.standard_t(3, size=(k, n)) * sigma / np.sqrt(3.0)
    return rng.standard_normal((k, n)) * sigma


@pytest.mark.parametrize("heavy", [False, True])
def test_pooled_z_is_not_heavy_tailed_at_eight_draws(heavy):
    rng = np.random.default_rng(0)
    n, k, sigma, excess = 4096, 8, 0.02, 0.1  # every neuron's true z is 5
    sd = _draws(rng, n, k, np.full(n, sigma), heavy).std(axis=0, ddof=1)
    raw_z = excess / sd
    pooled_z = excess / pooled_baseline_sd(sd, np.full(n, k), np.zeros(n, dtype=int))
    # the raw z's tail: its largest values are 4-6 times the truth (the sd of 8 draws is sometimes tiny)
    assert np.max(raw_z) > 19
    assert np.quantile(raw_z, 0.99) > 12
    # the pooled z keeps its tail close to its bulk: max within 40 % of the median, 99th percentile within 35 %
    # (Gaussian draws: median ~5.1, max ~6.9; t3 draws shift the scale, not the tail: ~6.5, ~8.8)
    assert np.max(pooled_z) < 1.4 * np.median(pooled_z)
    assert np.quantile(pooled_z, 0.99) < 1.35 * np.median(pooled_z)
    assert np.max(raw_z) > 3 * np.median(raw_z)
    assert np.median(pooled_z) == pytest.approx(5, rel=0.1 if not heavy else 0.35)


def test_pooling_keeps_neurons_that_really_differ_apart_and_lets_many_draws_dominate():
    rng = np.random.default_rng(1)
    n = 2000
    sigma = np.where(np.arange(n) < n // 2, 0.01, 0.04)  # two kinds of neuron in one layer
    for k, rel in ((8, 0.6), (64, 0.15)):
        sd = _draws(rng, n, k, sigma, heavy=False).std(axis=0, ddof=1)
        pooled = pooled_baseline_sd(sd, np.full(n, k), np.zeros(n, dtype=int))
        low, high = np.median(pooled[: n // 2]), np.median(pooled[n // 2 :])
        assert high > 2 * low  # shrunk towards the layer, not replaced by it
        assert high == pytest.approx(0.04, rel=rel) and low == pytest.approx(0.01, rel=rel * 2)


def test_groups_pool_separately_and_undefined_stays_undefined():
    sd = np.array([0.01, 0.011, 0.012, 0.1, 0.11, 0.12, np.nan, 0.05])
    n_draws = np.array([8, 8, 8, 8, 8, 8, 8, 1])
    group = np.array([0, 0, 0, 1, 1, 1, 1, 1])
    out = pooled_baseline_sd(sd, n_draws, group)
    assert np.all(out[:3] < 0.02) and np.all(out[3:6] > 0.08)
    assert np.isnan(out[6]) and np.isnan(out[7])  # a dead neuron; one draw has no variance
