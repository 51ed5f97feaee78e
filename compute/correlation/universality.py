"""Universality scores: excess of each neuron's max correlation over the rotation baseline, averaged over every
other set of the run (Gurnee et al. 2024), with the baseline drawn K times. Dead or constant neurons get
`is_dead` and no scores. The label (`excess > threshold`) is not stored: readers apply it
(`actdb.store.database.labels`); what is stored lets them say how stable it is across baseline draws."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from actdb.compute.correlation.engine import CorrelationResult


@dataclass
class UniversalityScores:
    mean_max_corr: np.ndarray
    min_max_corr: np.ndarray
    mean_baseline: np.ndarray  # mean over draws of the baseline averaged over the other sets
    baseline_sd: np.ndarray  # its standard deviation over draws (NaN with one draw)
    excess_corr: np.ndarray  # mean_max_corr - mean_baseline
    excess_draws: np.ndarray  # (draws, n): the excess against each draw; stability = share above the threshold
    is_dead: np.ndarray

    @property
    def z(self) -> np.ndarray:
        """(max corr - baseline mean) / baseline sd: how many baseline sds the match stands above chance."""
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.where(self.baseline_sd > 0, self.excess_corr / self.baseline_sd, np.nan)

    def stability(self, threshold: float) -> np.ndarray:
        """Share of baseline draws in which the neuron is universal at `threshold` (NaN where undefined)."""
        with np.errstate(invalid="ignore"):
            share = (self.excess_draws > threshold).mean(axis=0)
        return np.where(np.isnan(self.excess_corr), np.nan, share)


def score_universality(result: CorrelationResult) -> dict[int, UniversalityScores]:
    """Scores for every neuron of every set: means over the other sets of max corr and of each baseline draw."""
    out = {}
    for key, dead in result.dead.items():
        others = [m for (a, _b), m in result.matches.items() if a == key]
        max_corr = np.stack([m.max_corr for m in others])  # (others, n)
        baseline = np.stack([m.baseline for m in others])  # (others, draws, n)
        undefined = dead | np.isnan(max_corr).any(axis=0) | np.isnan(baseline).any(axis=(0, 1))
        with np.errstate(invalid="ignore"):
            mean_max = np.where(undefined, np.nan, max_corr.mean(axis=0))
            per_draw = np.where(undefined, np.nan, baseline.mean(axis=0))  # (draws, n)
            sd = per_draw.std(axis=0, ddof=1) if per_draw.shape[0] > 1 else np.full(per_draw.shape[1], np.nan)
            mean_baseline = per_draw.mean(axis=0)
            out[key] = UniversalityScores(
                mean_max_corr=mean_max,
                min_max_corr=np.where(undefined, np.nan, max_corr.min(axis=0)),
                mean_baseline=mean_baseline,
                baseline_sd=sd,
                excess_corr=mean_max - mean_baseline,
                excess_draws=mean_max[None, :] - per_draw,
                is_dead=dead.copy(),
            )
    return out


def format_draws(values: np.ndarray) -> str | None:
    """The per-draw excess of one neuron as stored: sorted, comma-separated, 9 significant digits."""
    finite = np.sort(values[np.isfinite(values)])
    return ",".join(f"{v:.9g}" for v in finite) if len(finite) == len(values) else None
