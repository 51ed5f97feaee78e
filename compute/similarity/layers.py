"""Layer-by-layer similarity of whole activation sets, from the moments the correlation engine accumulates
anyway: for every pair of sets (a set with itself included) and every pair of their layers,

- `mean_max_corr`: mean over a's live neurons of their best Pearson r among b's layer (and its rotation
  baseline, per draw, the same statistic against b's rotated layer);
- `cka`: linear CKA, `||Cov_ab||_F^2 / (||Cov_aa||_F ||Cov_bb||_F)` on centred (or token-residualised)
  covariances, exact and without a second pass;
- `matched_corr`: the mean r of the optimal one-to-one assignment of a's neurons to b's (Hungarian,
  `scipy.optimize.linear_sum_assignment`), for layers of the same index only: at GPT-2-small width one
  assignment takes about a second, so all layer pairs would cost more than the pass itself.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from types import ModuleType

import numpy as np

SD_EPS = 1e-6


@dataclass
class LayerPair:
    """One direction (a's layer vs b's layer) of one pair of sets."""

    mean_max_corr: float = float("nan")
    cka: float = float("nan")
    matched_corr: float | None = None
    baseline: dict[int, float] = field(default_factory=dict)  # draw -> mean max corr against rotated b


class LayerSimilarity:
    """Collects layer-pair statistics while the engine finalizes; keys use the engine's set indices."""

    def __init__(self, xp: ModuleType, to_numpy) -> None:
        self.xp, self.to_numpy = xp, to_numpy
        self.pairs: dict[tuple[int, int, int, int], LayerPair] = {}

    def pair(self, a: int, b: int, la: int, lb: int) -> LayerPair:
        return self.pairs.setdefault((a, b, la, lb), LayerPair())

    def observe_block(self, a: int, b: int, la: int, r, cov, sd_a, sd_b, covs_a: list, covs_b: list) -> None:
        """A (layer of a) x (all layers of b) block of correlations `r` and covariances `cov`."""
        xp = self.xp
        db = covs_b[0].shape[0]
        live_a = self.to_numpy(sd_a > SD_EPS)
        norm_a = float(xp.linalg.norm(covs_a[la]))
        for lb, cov_bb in enumerate(covs_b):
            cols = slice(lb * db, (lb + 1) * db)
            live_b = self.to_numpy(sd_b[cols] > SD_EPS)
            sub = self.to_numpy(r[:, cols])[np.ix_(live_a, live_b)]
            if sub.size == 0:
                continue
            cka = float(xp.sum(cov[:, cols] ** 2)) / (norm_a * float(xp.linalg.norm(cov_bb)))
            matched = _matched(sub) if la == lb else None
            forward, backward = self.pair(a, b, la, lb), self.pair(b, a, lb, la)
            forward.mean_max_corr, backward.mean_max_corr = float(sub.max(axis=1).mean()), float(sub.max(axis=0).mean())
            forward.cka = backward.cka = cka
            forward.matched_corr = backward.matched_corr = matched

    def observe_self(self, s: int, layer: int, cov, sd) -> None:
        """A layer with itself (the diagonal of the similarity matrix), measured like any other pair."""
        live = self.to_numpy(sd > SD_EPS)
        safe = self.xp.where(sd > SD_EPS, sd, 1.0)
        r = self.to_numpy(cov / self.xp.outer(safe, safe))[np.ix_(live, live)]
        if r.size == 0:
            return
        entry = self.pair(s, s, layer, layer)
        entry.mean_max_corr = float(np.clip(r, -1, 1).max(axis=1).mean())
        entry.cka = 1.0
        entry.matched_corr = _matched(np.clip(r, -1, 1))

    def observe_baseline_forward(self, a: int, b: int, la: int, scaled, inv_rows, draw: int, db: int) -> None:
        """`scaled` = Cov_ab R_b / rotated sd (a's layer `la` x all of b's rotated neurons): for each of b's
        layers, the mean over a's live neurons of their best rotated match there."""
        live = self.to_numpy(inv_rows > 0)
        for lb in range(scaled.shape[1] // db):
            best = self.to_numpy(self.xp.clip(scaled[:, lb * db : (lb + 1) * db].max(axis=1) * inv_rows, -1, 1))
            if live.any():
                self.pair(a, b, la, lb).baseline[draw] = float(best[live].mean())

    def observe_baseline_backward(self, a: int, b: int, la: int, scaled, inv_cols, draw: int, db: int) -> None:
        """`scaled` = R_a^T Cov_ab / rotated sd (a's rotated layer `la` x all of b): for each of b's layers, the
        mean over b's live neurons of their best match among a's rotated layer."""
        for lb in range(scaled.shape[1] // db):
            cols = slice(lb * db, (lb + 1) * db)
            live = self.to_numpy(inv_cols[cols] > 0)
            best = self.to_numpy(self.xp.clip(scaled[:, cols].max(axis=0) * inv_cols[cols], -1, 1))
            if live.any():
                self.pair(b, a, lb, la).baseline[draw] = float(best[live].mean())

    def observe_self_baseline(self, s: int, layer: int, cov, rot, rot_sd, sd, draw: int) -> None:
        """The diagonal's baseline: a layer against its own rotated copy."""
        xp = self.xp
        live = sd > SD_EPS
        inv_rot = xp.where(rot_sd > SD_EPS, 1.0 / xp.where(rot_sd > SD_EPS, rot_sd, 1.0), 0.0)
        best = xp.clip((cov @ rot * inv_rot).max(axis=1) / xp.where(live, sd, 1.0), -1, 1)
        live_np = self.to_numpy(live)
        if live_np.any():
            self.pair(s, s, layer, layer).baseline[draw] = float(self.to_numpy(best)[live_np].mean())


def _matched(r: np.ndarray) -> float:
    """Mean correlation of the optimal one-to-one assignment (rectangular blocks match min(rows, cols))."""
    from scipy.optimize import linear_sum_assignment

    rows, cols = linear_sum_assignment(r, maximize=True)
    return float(r[rows, cols].mean())
