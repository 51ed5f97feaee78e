"""Universality scores: excess of each neuron's max correlation over the rotation baseline, averaged over every
other set of the run (Gurnee et al. 2024). Dead or constant neurons get `is_dead` and no scores. The label
(`excess > threshold`) is not stored: readers apply it (`actdb.store.labels`)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from actdb.compute.correlation import CorrelationResult


@dataclass
class UniversalityScores:
    mean_max_corr: np.ndarray
    min_max_corr: np.ndarray
    mean_baseline: np.ndarray
    excess_corr: np.ndarray
    is_dead: np.ndarray


def score_universality(result: CorrelationResult) -> dict[int, UniversalityScores]:
    """Scores for every neuron of every set: means over the other sets of max corr and baseline."""
    out = {}
    for key, dead in result.dead.items():
        others = [m for (a, _b), m in result.matches.items() if a == key]
        max_corr = np.stack([m.max_corr for m in others])
        baseline = np.stack([m.baseline_max for m in others])
        undefined = dead | np.isnan(max_corr).any(axis=0) | np.isnan(baseline).any(axis=0)
        with np.errstate(invalid="ignore"):
            excess = np.where(undefined, np.nan, (max_corr - baseline).mean(axis=0))
            out[key] = UniversalityScores(
                mean_max_corr=np.where(undefined, np.nan, max_corr.mean(axis=0)),
                min_max_corr=np.where(undefined, np.nan, max_corr.min(axis=0)),
                mean_baseline=np.where(undefined, np.nan, baseline.mean(axis=0)),
                excess_corr=excess,
                is_dead=dead.copy(),
            )
    return out
