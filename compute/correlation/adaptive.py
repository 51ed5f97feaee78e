"""Adaptive baseline draws: more rotations only for the neurons whose universal label is still uncertain.

After the run's K draws, a neuron's label `excess > threshold` rests on the mean of its K per-draw excesses. Where
that mean lies within `q * s / sqrt(n)` of the threshold (s: the layer-pooled sd of the per-draw excess,
`pooled_baseline_sd`; n: the draws taken; q: the one-sided normal quantile of the stated confidence), another
round of draws is taken for those neurons only, until each is decided or `max_draws` is reached. The rule is
sequential without alpha spending: "decided at 95 %" means the last look's margin, not a corrected error rate.

Which rotation each draw is. Draws k < K are the run's own, `R_{m,l} P_k` (`baseline.rotation`), untouched.
An extra draw k >= K rotates model m's layer l by `U_{m,l} E_{k+l}`: `U_{m,l}` the eigenvectors of the layer's
covariance `C = U diag(lam) U^T` (`eigenbasis`, once per set and layer), `E_j` the cached Haar rotation of extra
index j (`baseline.extra_rotation`, `rotation_cache.extra_key`: a random stream of its own, a float32 QR). For a
fixed orthogonal U, `U E` is Haar, so each extra draw has the distribution of a first-K draw; the layers of one
draw use different `E` (indices k + l), so they are jointly independent Haar as `R_{m,l} P_k` are, and the `E`
come from their own stream, so the extra draws are independent of the first K. (Draws k and k+1 share
`E_{k+l+1}` between layers l+1 and l of a model, a weak dependence between neighbouring extra draws that the mean
over draws does not mind.) An extra draw is therefore not the draw k of a run with more draws; it is a draw of
the same distribution that is cheap to take:

- rotated sds: `diag(E^T U^T C U E) = lam @ E**2`, O(d^2) per layer and draw instead of a d^3 product;
- an undecided neuron i of set a against set b: `max_j (Cov_ab U_b E)_ij / (sd_i sd_j)`, one row, O(d^2) per
  layer and draw; its columns likewise (`E^T U_a^T Cov_ab[:, cols]`).

What each extra draw still costs beyond O(u d^2) for u undecided neurons is the QR of its `E` (once per width and
seed, kept by the rotation cache) and the `eigh` per set and layer, paid once when a first neuron is undecided.
"""

from __future__ import annotations

from statistics import NormalDist
from typing import TYPE_CHECKING

import numpy as np

from actdb.compute.correlation.blas_threads import map_on_cores
from actdb.compute.correlation.moments import inverse_sd
from actdb.compute.correlation.rotation_cache import extra_key, rotation
from actdb.compute.correlation.symmetric_eigen import symmetric_eigh
from actdb.compute.correlation.universality import pooled_baseline_sd

if TYPE_CHECKING:
    from actdb.compute.correlation.engine import CorrelationEngine

ROUND = 8  # draws added per round for the neurons still undecided
STACK_BYTES = 2**28  # a round's products with the draws' rotations go in slices of at most this many bytes


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


def extra_rotations(d: int, seed: int, indices: range | list, cache: str | None = None) -> np.ndarray:
    """`E_j` for every j in `indices` side by side, `(d, len(indices) * d)` float32
    (`baseline.extra_rotation`), read from the rotation cache in folder `cache` where it holds them, the QRs side
    by side (`map_on_cores`)."""
    return np.concatenate(map_on_cores(lambda j: rotation(cache, extra_key(d, seed, j)), indices), axis=1)


def refine_baseline(engine: CorrelationEngine, acc: dict) -> int:
    """Add draws `K..max_draws-1` for the undecided neurons of every set (into each pair's `extra` baseline),
    round by round; returns the number of neuron-draws added. `acc` holds the pass's float32 covariance blocks
    of every pair (a one-pass run).

    Draw k rotates model m's layer l by `U_{m,l} E_{k+l}` (module docstring). Once, at the first round: the
    eigendecomposition of every set's layer covariances. Per round: the draws' `E` side by side (indices
    `start .. stop + layers - 2` of the width), their squares times each layer's eigenvalues for the rotated sds,
    and the undecided neurons' rows `Cov_ab[rows] U_b` (stacked over the other sets a) and columns
    `U_a^T Cov_ab[:, cols]` (stacked over b) times the layer's `[E_{k+l} ...]`, one product per set and layer."""
    opts, inputs, backend = engine.options, engine.inputs, engine.backend
    k0, cap = opts.baseline_draws, opts.max_draws
    for res in engine.results.values():
        res.extra = np.full((cap - k0, res.baseline.shape[1]), np.nan)
    sets = range(len(inputs))  # the engine's positions (a set's `key` is its id in the store)
    eigen: dict[int, list] = {}
    layers = {}  # per width, the most layers of a set of that width (a round needs E up to stop + layers - 2)
    for s in inputs:
        layers[s.d_mlp] = max(layers.get(s.d_mlp, 0), s.n_layers)
    pool: dict[tuple[int, int], np.ndarray] = {}  # (width, index) -> E_index, across rounds
    added, start = 0, k0
    while start < cap:
        todo = {i: _undecided_of(engine, i) for i in sets}
        if not any(m.any() for m in todo.values()):
            break
        if not eigen:
            eigen = _eigenbases(engine)
        draws = range(start, min(start + ROUND, cap))
        slots = slice(draws.start - k0, draws.stop - k0)
        forward, backward = _gather(engine, acc, todo)
        p = {
            d: backend.asarray(_pool_rotations(pool, d, opts, range(draws.start, draws.stop + n - 1)))
            for d, n in layers.items()
        }
        sds = _rotated_sds(engine, eigen, p, len(draws))
        for key, mask in todo.items():
            for other in (o for o in sets if o != key):
                engine.results[(key, other)].extra[slots][:, mask] = -np.inf
        for b, entries in forward.items():
            bases = [u for _lam, u in eigen[b]]
            _forward(engine, b, entries, bases, p[inputs[b].d_mlp], sds[b], slots)
        for (a, layer), entries in backward.items():
            _backward(engine, a, layer, entries, eigen[a][layer][1], p[inputs[a].d_mlp], sds[a], slots)
        added += len(draws) * int(sum(m.sum() for m in todo.values()))
        start = draws.stop
    return added


def eigenbasis(cov, xp) -> tuple[object, object]:
    """`(lam, U)` of a layer's covariance `C = U diag(lam) U^T`: eigenvalues (float64, clipped at 0: C is PSD, its
    roundoff is not) and eigenvectors (float32, the rotations' precision), from a float32 divide-and-conquer `eigh`
    (LAPACK `syevd` with the GIL released, `symmetric_eigh`, so that the layers run side by side; on the demo's
    512-wide covariances 47 ms on one core against 111 ms for NumPy's float64 `eigh`). Any orthogonal U makes `U E`
    Haar; what U's precision moves is `lam @ E**2` against the rotated neurons' true variances, by ~2e-6 relative,
    and the draws' correlations by ~1e-6 (benchmarks/RESULTS.md), far below a draw's spread (~0.02). Each
    eigenvector's sign is fixed (its largest entry positive) so that the draws do not hang on the LAPACK's sign
    choice."""
    if xp is np:
        lam, u = symmetric_eigh(cov)
    else:
        lam, u = xp.linalg.eigh(cov.astype(xp.float32))
    u *= xp.sign(u[xp.abs(u).argmax(axis=0), xp.arange(u.shape[1])])
    return xp.clip(lam.astype(xp.float64), 0, None), u


def _eigenbases(engine: CorrelationEngine) -> dict[int, list]:
    """`eigenbasis` of every set's layer covariances; on the host the layers side by side (`map_on_cores`)."""
    xp = engine.backend.xp
    covs = [(i, c) for i in range(len(engine.inputs)) for c in engine.moments[i].cov]
    if engine.backend.name == "cupy":
        bases = [eigenbasis(c, xp) for _i, c in covs]
    else:
        bases = map_on_cores(lambda item: eigenbasis(item[1], xp), covs)
    out: dict[int, list] = {}
    for (i, _c), basis in zip(covs, bases, strict=True):
        out.setdefault(i, []).append(basis)
    return out


def _pool_rotations(pool: dict, d: int, opts, indices: range) -> np.ndarray:
    """`[E_j ...]` for j in `indices`, `(d, len(indices) * d)` float32: those not yet in `pool` computed (or read
    from the rotation cache) in parallel, then kept in `pool` for the next round."""
    missing = [j for j in indices if (d, j) not in pool]
    if missing:
        block = extra_rotations(d, opts.baseline_seed, missing, opts.rotation_cache)
        for n, j in enumerate(missing):
            pool[(d, j)] = block[:, n * d : (n + 1) * d]
    for j in [j for (w, j) in pool if w == d and j < indices.start]:
        del pool[(d, j)]  # rounds only move forward
    return np.concatenate([pool[(d, j)] for j in indices], axis=1)


def _layer_draws(p, layer: int, n_draws: int, d: int):
    """`[E_{k+layer} ...]` over the round's draws k: a contiguous slice of the round's `E` side by side."""
    return p[:, layer * d : (layer + n_draws) * d]


def _rotated_sds(engine: CorrelationEngine, eigen: dict, p: dict, n_draws: int) -> dict[int, object]:
    """Per set, `(draws, n)`: its rotated neurons' sds for every layer and draw of the round (`p`: per width, the
    round's `E` side by side). With `W = U E`, `diag(W^T C W) = diag(E^T diag(lam) E)`, i.e. column j's variance
    is `sum_m lam_m E[m, j]^2`: one (d) x (d, draws * d) product per set and layer instead of a d^3 one per
    draw. The squares of one layer's `E` are formed once for every set of the width, one layer at a time (their
    memory is a round's `E` per layer, not per round)."""
    xp, inputs = engine.backend.xp, engine.inputs
    per_set: dict[int, list] = {i: [] for i in eigen}
    for layer in range(max(s.n_layers for s in inputs)):
        for d, block in p.items():
            squares = None
            for i in (i for i, s in enumerate(inputs) if s.d_mlp == d and s.n_layers > layer):
                if squares is None:
                    q = _layer_draws(block, layer, n_draws, d)
                    squares = q * q
                # float32 squares and a sum of d positive terms: relative error ~ sqrt(d) * 6e-8, far below the
                # ~1e-6 a baseline maximum needs
                var = eigen[i][layer][0].astype(xp.float32) @ squares
                per_set[i].append(xp.sqrt(xp.clip(var.astype(xp.float64), 0, None)).reshape(n_draws, -1))
    return {i: xp.concatenate(parts, axis=1) for i, parts in per_set.items()}


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


def _gather(engine: CorrelationEngine, acc: dict, todo: dict) -> tuple[dict, dict]:
    """The covariance rows and columns a round needs, stacked so that each multiplies by the draws' rotations
    in one product: per set b, the undecided rows of every other set against b (`(a, layer, rows, Cov rows)`,
    forward), and per (set a, layer), b's undecided columns against a's layer (`(b, cols, Cov columns)`,
    backward). One product per stack instead of one per pair and layer: a few undecided rows times a
    `(d, draws * d)` block ran far below the BLAS's rate."""
    backend, inputs = engine.backend, engine.inputs
    forward: dict[int, list] = {}
    backward: dict[tuple[int, int], list] = {}
    for g, block in acc.items():
        d = inputs[g.a].d_mlp
        cols = np.flatnonzero(todo[g.b])
        for layer in range(g.start, g.stop):
            cov = engine._rows(g, block, layer)
            rows = np.flatnonzero(todo[g.a][layer * d : (layer + 1) * d])
            if len(rows):
                forward.setdefault(g.b, []).append((g.a, layer, rows, cov[backend.asarray(rows)]))
            if len(cols):
                backward.setdefault((g.a, layer), []).append((g.b, cols, cov[:, backend.asarray(cols)]))
    return forward, backward


def _forward(engine, b: int, entries: list, base: list, p, rot_sd, slots: slice) -> None:
    """Undecided rows of the other sets against b's neurons rotated by each draw of the round:
    `Cov_ab[rows] U_b [E_{k+l} ...]` per layer l of b, scaled by the rotated neurons' 1/sd (`rot_sd`: draws x b's
    neurons), the max
    over b's neurons per row and draw, then 1/sd of the row (which does not change the argmax)."""
    xp, backend, sb = engine.backend.xp, engine.backend, engine.inputs[b]
    d, n_draws = sb.d_mlp, rot_sd.shape[0]
    stacked = xp.concatenate([cov for *_, cov in entries], axis=0)
    inv_cols, dead_cols = inverse_sd(rot_sd, xp)
    step = max(1, STACK_BYTES // (4 * n_draws * sb.n_neurons))
    best = np.empty((stacked.shape[0], n_draws))
    for s0 in range(0, stacked.shape[0], step):
        part = stacked[s0 : s0 + step]
        scaled = xp.concatenate(
            [
                ((part[:, lb * d : (lb + 1) * d] @ base[lb]) @ _layer_draws(p, lb, n_draws, d)).reshape(
                    len(part), n_draws, d
                )
                for lb in range(sb.n_layers)
            ],
            axis=2,
        )
        scaled *= inv_cols[None]
        if bool(dead_cols.any()):
            scaled[:, dead_cols] = -xp.inf
        best[s0 : s0 + len(part)] = backend.to_numpy(scaled.max(axis=2))
    at = 0
    for a, layer, rows, _cov in entries:
        da = engine.inputs[a].d_mlp
        inv_rows, _ = inverse_sd(engine.moments[a].sd[layer * da : (layer + 1) * da][backend.asarray(rows)], xp)
        got = np.clip(best[at : at + len(rows)] * backend.to_numpy(inv_rows)[:, None], -1.0, 1.0)
        engine.results[(a, b)].extra[slots, layer * da + rows] = got.T
        at += len(rows)


def _backward(engine, a: int, layer: int, entries: list, base, p, rot_sd, slots: slice) -> None:
    """Undecided columns of the other sets against a's `layer` rotated by each draw of the round:
    `[E_{k+layer} ...]^T U_a^T Cov_ab[:, cols]`, scaled by the rotated neurons' 1/sd, the max over them, a running max
    over a's layers."""
    xp, backend = engine.backend.xp, engine.backend
    d, n_draws = engine.inputs[a].d_mlp, rot_sd.shape[0]
    rotated = base.T @ xp.concatenate([cov for *_, cov in entries], axis=1)
    q = _layer_draws(p, layer, n_draws, d)
    inv_rows, dead_rows = inverse_sd(rot_sd[:, layer * d : (layer + 1) * d], xp)
    step = max(1, STACK_BYTES // (4 * n_draws * d))
    best = np.empty((n_draws, rotated.shape[1]))
    for c0 in range(0, rotated.shape[1], step):
        part = rotated[:, c0 : c0 + step]
        scaled = (q.T @ part).reshape(n_draws, d, part.shape[1])
        scaled *= inv_rows[:, :, None]
        if bool(dead_rows.any()):
            scaled[dead_rows] = -xp.inf
        best[:, c0 : c0 + part.shape[1]] = backend.to_numpy(scaled.max(axis=1))
    at = 0
    for b, cols, _cov in entries:
        inv_cols, _ = inverse_sd(engine.moments[b].sd[backend.asarray(cols)], xp)
        got = np.clip(best[:, at : at + len(cols)] * backend.to_numpy(inv_cols), -1.0, 1.0)
        target = engine.results[(b, a)].extra[slots]
        target[:, cols] = np.fmax(target[:, cols], got)
        at += len(cols)
