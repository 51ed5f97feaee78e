"""Adaptive baseline draws: more rotations only for the neurons whose universal label is still uncertain.

After the run's K draws, a neuron's label `excess > threshold` rests on the mean of its K per-draw excesses. Where
that mean lies within `q * s / sqrt(n)` of the threshold (s: the layer-pooled sd of the per-draw excess,
`pooled_baseline_sd`; n: the draws taken; q: the one-sided normal quantile of the stated confidence), another
round of draws is taken for those neurons only, until each is decided or `max_draws` is reached. The rule is
sequential without alpha spending: "decided at 95 %" means the last look's margin, not a corrected error rate.

A draw costs products with covariances, not a pass over the tokens: for an undecided neuron i of set a, its
baseline against set b is `max_j (Cov_ab R_b)_ij / (sd_i sd(R_b)_j)`, one row of the product instead of the
whole block, plus each set's rotated sds `diag(R^T C R)` (a d^3 product per layer and draw). The draws use the
same rotations `R_{m,l} P_k` as the first K (`baseline.rotation`), so draw k is the same rotation whether it
was taken for every neuron or only for some.
"""

from __future__ import annotations

from statistics import NormalDist
from typing import TYPE_CHECKING

import numpy as np

from actdb.compute.correlation.moments import inverse_sd
from actdb.compute.correlation.rotation_cache import draw_key, rotation
from actdb.compute.correlation.universality import pooled_baseline_sd

if TYPE_CHECKING:
    from actdb.compute.correlation.engine import CorrelationEngine

ROUND = 8  # draws added per round for the neurons still undecided


def undecided(excess_draws: np.ndarray, layer: np.ndarray, threshold: float, confidence: float) -> np.ndarray:
    """Neurons whose mean excess over their finite draws is within `q * s_pooled / sqrt(n)` of `threshold`.

    `excess_draws` is `(draws, n)` with NaN for draws not taken; dead neurons (no finite draw) are decided."""
    n = np.isfinite(excess_draws).sum(axis=0)
    live = n >= 2
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = np.where(n > 0, np.nansum(excess_draws, axis=0) / np.maximum(n, 1), np.nan)
        var = np.nansum((excess_draws - mean) ** 2, axis=0) / np.maximum(n - 1, 1)
    sd = pooled_baseline_sd(np.where(live, np.sqrt(var), np.nan), n, layer)
    q = NormalDist().inv_cdf(confidence)
    with np.errstate(invalid="ignore"):
        return live & np.isfinite(sd) & (np.abs(mean - threshold) < q * sd / np.sqrt(np.maximum(n, 1)))


def refine_baseline(engine: CorrelationEngine, acc: dict) -> int:
    """Add draws `K..max_draws-1` for the undecided neurons of every set (into each pair's `extra` baseline),
    round by round; returns the number of neuron-draws added. `acc` holds the pass's float32 covariance blocks
    of every pair (a one-pass run).

    Draw k rotates model m's layer by `R P_k` (`R` its draw-0 rotation). What does not depend on k is computed
    once: `R^T C R` per set and layer (for the rotated sds), and per round `Cov_ab[undecided rows] R_b` and
    `R_a^T Cov_ab[:, undecided columns]`. A draw then costs `(R^T C R) P_k` per set and layer (d^3, for the sds
    of every rotated neuron, which every maximum needs) and the undecided neurons' rows times `P_k`."""
    opts, inputs, backend = engine.options, engine.inputs, engine.backend
    xp = backend.xp
    k0, cap = opts.baseline_draws, opts.max_draws
    for res in engine.results.values():
        res.extra = np.full((cap - k0, res.baseline.shape[1]), np.nan)
    bases = {s.key: [backend.asarray(r) for r in engine._base_rotations(s.key)] for s in inputs}
    rotated_cov = {
        s.key: [r.T @ (c.astype(xp.float32) @ r) for c, r in zip(engine.moments[s.key].cov, bases[s.key], strict=True)]
        for s in inputs
    }
    draws: dict[tuple[int, int], object] = {}
    added, draw = 0, k0
    while draw < cap:
        todo = {s.key: _undecided_of(engine, s.key) for s in inputs}
        if not any(m.any() for m in todo.values()):
            break
        fixed = _round_products(engine, acc, bases, todo)
        for k in range(draw, min(draw + ROUND, cap)):
            sds = {}
            for s in inputs:
                if (s.d_mlp, k) not in draws:
                    draws[(s.d_mlp, k)] = backend.asarray(
                        rotation(opts.rotation_cache, draw_key(s.d_mlp, opts.baseline_seed, k))
                    )
                p = draws[(s.d_mlp, k)]
                sds[s.key] = xp.concatenate(
                    [xp.sqrt(xp.clip(((c @ p) * p).sum(axis=0, dtype=xp.float64), 0, None)) for c in rotated_cov[s.key]]
                )
            for key, mask in todo.items():
                for other in (o for o in range(len(inputs)) if o != key):
                    engine.results[(key, other)].extra[k - k0, mask] = -np.inf
            for (kind, a, b, layer), (index, part) in fixed.items():
                if kind == "forward":
                    _forward(engine, a, b, layer, index, part, draws[(inputs[b].d_mlp, k)], sds[b], k - k0)
                else:
                    _backward(engine, a, b, layer, index, part, draws[(inputs[a].d_mlp, k)], sds[a], k - k0)
            added += int(sum(m.sum() for m in todo.values()))
        draw = min(draw + ROUND, cap)
    return added


def _round_products(engine: CorrelationEngine, acc: dict, bases: dict, todo: dict) -> dict:
    """Per (direction, a, b, layer of a): the undecided neurons' indices and their products with the draw-0
    rotations, `Cov_ab[rows] R_b` (forward, rows of a) or `R_a^T Cov_ab[:, cols]` (backward, columns of b)."""
    backend, inputs = engine.backend, engine.inputs
    out = {}
    for g, block in acc.items():
        sb = inputs[g.b]
        d = inputs[g.a].d_mlp
        for layer in range(g.start, g.stop):
            cov = engine._rows(g, block, layer)
            rows = np.flatnonzero(todo[g.a][layer * d : (layer + 1) * d])
            if len(rows):
                part = cov[backend.asarray(rows)]
                rotated = [part[:, lb * sb.d_mlp : (lb + 1) * sb.d_mlp] @ bases[g.b][lb] for lb in range(sb.n_layers)]
                out[("forward", g.a, g.b, layer)] = (rows, rotated)
            cols = np.flatnonzero(todo[g.b])
            if len(cols):
                out[("backward", g.a, g.b, layer)] = (cols, bases[g.a][layer].T @ cov[:, backend.asarray(cols)])
    return out


def _undecided_of(engine: CorrelationEngine, key: int) -> np.ndarray:
    others = [res for (a, _b), res in engine.results.items() if a == key]
    max_corr = np.stack([r.max_corr for r in others]).mean(axis=0)
    per_draw = np.concatenate(
        [np.stack([r.baseline for r in others]).mean(axis=0), np.stack([r.extra for r in others]).mean(axis=0)]
    )
    with np.errstate(invalid="ignore"):
        excess = np.where(np.isfinite(max_corr) & np.isfinite(per_draw), max_corr - per_draw, np.nan)
    d = engine.inputs[key].d_mlp
    layer = np.arange(excess.shape[1]) // d
    return undecided(excess, layer, engine.options.adaptive_threshold, engine.options.adaptive_confidence)


def _forward(engine, a: int, b: int, layer: int, rows: np.ndarray, rotated: list, p, rot_sd, slot: int) -> None:
    """Undecided neurons (`rows`) of a's `layer` against b's neurons rotated by draw k: `(Cov R_b) P_k`."""
    xp, backend = engine.backend.xp, engine.backend
    d = engine.inputs[a].d_mlp
    scaled = xp.concatenate([part @ p for part in rotated], axis=1)
    inv_cols, dead_cols = inverse_sd(rot_sd, xp)
    scaled *= inv_cols
    if bool(dead_cols.any()):
        scaled[:, dead_cols] = -xp.inf
    inv_rows, _ = inverse_sd(engine.moments[a].sd[layer * d : (layer + 1) * d][backend.asarray(rows)], xp)
    best = backend.to_numpy(xp.clip(scaled.max(axis=1) * inv_rows, -1.0, 1.0))
    engine.results[(a, b)].extra[slot, layer * d + rows] = best


def _backward(engine, a: int, b: int, layer: int, cols: np.ndarray, part, p, rot_sd, slot: int) -> None:
    """Undecided neurons (`cols`) of b against a's `layer` rotated by draw k: `P_k^T (R_a^T Cov)`, a running max
    over a's layers."""
    xp, backend = engine.backend.xp, engine.backend
    d = engine.inputs[a].d_mlp
    scaled = p.T @ part
    inv_rows, dead_rows = inverse_sd(rot_sd[layer * d : (layer + 1) * d], xp)
    scaled *= inv_rows[:, None]
    if bool(dead_rows.any()):
        scaled[dead_rows, :] = -xp.inf
    inv_cols, _ = inverse_sd(engine.moments[b].sd[backend.asarray(cols)], xp)
    best = backend.to_numpy(xp.clip(scaled.max(axis=0) * inv_cols, -1.0, 1.0))
    target = engine.results[(b, a)].extra[slot]
    target[cols] = np.fmax(target[cols], best)
