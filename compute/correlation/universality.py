"""Universality scores: excess of each neuron's max correlation over the rotation baseline, averaged over every
other set of the run (Gurnee et al. 2024), with the baseline drawn K times. Dead or constant neurons get
`is_dead` and no scores. The label (`excess > threshold`) is not stored: readers apply it
(`actdb.store.database.labels`); what is stored lets them say how stable it is across baseline draws."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from actdb.compute.correlation.engine import CorrelationResult


@dataclass
class UniversalityScores:
    mean_max_corr: np.ndarray
    min_max_corr: np.ndarray
    mean_baseline: np.ndarray  # mean over draws of the baseline averaged over the other sets
    baseline_sd: np.ndarray  # its standard deviation over draws (NaN with one draw)
    excess_corr: np.ndarray  # mean_max_corr - mean_baseline
    excess_draws: np.ndarray  # (draws, n): the excess against each draw (NaN: not taken); stability = share above
    is_dead: np.ndarray

    @property
    def z(self) -> np.ndarray:
        """(max corr - baseline mean) / baseline sd: how many baseline sds the match stands above chance. The sd
        rests on `n_draws` draws: at K = 8 its reciprocal is heavy-tailed, see `z_pooled`."""
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.where(self.baseline_sd > 0, self.excess_corr / self.baseline_sd, np.nan)

    @property
    def n_draws(self) -> np.ndarray:
        """How many baseline draws each neuron's scores rest on."""
        return np.isfinite(self.excess_draws).sum(axis=0)

    def z_pooled(self, d_mlp: int) -> np.ndarray:
        """Excess over the layer-pooled, shrunk baseline sd (`pooled_baseline_sd`)."""
        layer = np.arange(len(self.excess_corr)) // d_mlp
        sd = pooled_baseline_sd(self.baseline_sd, self.n_draws, layer)
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.where(sd > 0, self.excess_corr / sd, np.nan)

    def stability(self, threshold: float) -> np.ndarray:
        """Share of its baseline draws in which the neuron is universal at `threshold` (NaN where undefined)."""
        with np.errstate(invalid="ignore", divide="ignore"):
            share = (self.excess_draws > threshold).sum(axis=0) / self.n_draws
        return np.where(np.isnan(self.excess_corr), np.nan, share)


POOL_PRIOR_DRAWS = 8  # the layer's variance counts as much as 8 draws (7 degrees of freedom) of one neuron


def pooled_baseline_sd(
    sd: np.ndarray, n_draws: np.ndarray, group: np.ndarray, prior_dof: float = POOL_PRIOR_DRAWS - 1
) -> np.ndarray:
    """Each neuron's baseline sd shrunk towards its group's (layer's): s~^2 = (nu s^2 + nu0 s0^2) / (nu + nu0).

    With K draws a neuron's sample variance s^2 has nu = K - 1 degrees of freedom, so 1/s, and with it
    z = excess / s, is heavy-tailed at small K (at K = 8 one neuron in a few hundred gets half the true sd).
    The layer's neurons share one null (rotations of the same layer), so their variances are pooled: s0^2 is
    the median of the group's s^2 divided by the median of chi2(nu)/nu (the median of a scaled chi-square is
    below its mean; the median keeps a few extreme neurons from moving s0). nu0 weighs that pooled value like
    `prior_dof` degrees of freedom of one neuron; as K grows a neuron's own sd dominates. NaN where no
    variance exists (one draw, dead neurons). The chi-square median is Wilson and Hilferty's
    nu (1 - 2 / (9 nu))^3 (3.4 % above the exact value at nu = 1, 0.13 % at nu = 7, closer above)."""
    sd = np.asarray(sd, dtype=float)
    dof = np.asarray(n_draws, dtype=float) - 1
    out = np.full(sd.shape, np.nan)
    for g in np.unique(group):
        members = (group == g) & np.isfinite(sd) & (dof >= 1)
        if not members.any():
            continue
        nu = dof[members]
        var = sd[members] ** 2
        # per-neuron correction, so that groups with mixed draw counts pool on one scale
        s0_sq = float(np.median(var / (1 - 2 / (9 * nu)) ** 3))
        out[members] = np.sqrt((nu * var + prior_dof * s0_sq) / (nu + prior_dof))
    return out


def score_universality(result: CorrelationResult) -> dict[int, UniversalityScores]:
    """Scores for every neuron of every set: means over the other sets of max corr and of each baseline draw."""
    out = {}
    for key, dead in result.dead.items():
        others = [m for (a, _b), m in result.matches.items() if a == key]
        max_corr = np.stack([m.max_corr for m in others])  # (others, n)
        baseline = np.stack([m.baseline for m in others])  # (others, draws, n)
        undefined = dead | np.isnan(max_corr).any(axis=0) | np.isnan(baseline).any(axis=(0, 1))
        if all(m.extra is not None for m in others):  # adaptive draws: NaN where a neuron got none
            baseline = np.concatenate([baseline, np.stack([m.extra for m in others])], axis=1)
        with np.errstate(invalid="ignore", divide="ignore"):
            mean_max = np.where(undefined, np.nan, max_corr.mean(axis=0))
            per_draw = np.where(undefined, np.nan, baseline.mean(axis=0))  # (draws, n)
            taken = np.isfinite(per_draw).sum(axis=0)
            mean_baseline = np.where(taken > 0, np.nansum(per_draw, axis=0) / np.maximum(taken, 1), np.nan)
            var = np.nansum((per_draw - mean_baseline) ** 2, axis=0) / np.maximum(taken - 1, 1)
            sd = np.where(taken > 1, np.sqrt(var), np.nan)
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


def describe_draws(scores: dict[int, UniversalityScores], first: int) -> str:
    """How many baseline draws a run's live neurons rest on, for its log: range, mean, and how many drew more
    than the `first` every neuron gets."""
    n = np.concatenate([sc.n_draws[sc.n_draws > 0] for sc in scores.values()])
    if not len(n):
        return "no live neurons"
    more = int((n > first).sum())
    return (
        f"baseline draws per neuron {n.min()}-{n.max()}, mean {n.mean():.2f}; {more} of {len(n)} neurons drew more "
        f"than {first}"
    )


def format_draws(values: np.ndarray) -> str | None:
    """The per-draw excess of one neuron as stored: sorted, comma-separated, 9 significant digits."""
    finite = np.sort(values[np.isfinite(values)])  # adaptive runs leave the draws not taken NaN
    return ",".join(f"{v:.9g}" for v in finite) if len(finite) else None
