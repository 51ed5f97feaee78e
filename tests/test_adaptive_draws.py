"""Adaptive baseline draws: extra rotations only for undecided neurons, equal to a direct float64 computation with
the rotations the module states, and of the same distribution as the run's first K draws."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg
import scipy.stats

from actdb.compute.correlation.adaptive import ROUND, extra_rotations, undecided
from actdb.compute.correlation.baseline import draw_rotation, extra_rotation, rotation
from actdb.compute.correlation.engine import CorrelationOptions, SetInput, correlate_sets
from actdb.compute.correlation.run import CorrelationRequest
from actdb.compute.correlation.universality import pooled_baseline_sd, score_universality
from actdb.store.device import resolve_device
from actdb.store.errors import ActdbError
from actdb.store.files.activation import ActivationHeader, ActivationWriter
from actdb.store.refs import SetRef

N_SEQ, SEQ_LEN, D, L = 40, 32, 24, 2
CPU = resolve_device("cpu").array


@pytest.fixture(scope="module")
def sets(tmp_path_factory):
    """Three sets sharing latent features of varied strength, so excesses spread across a threshold; and their
    activations (float64 copies of the float16 written) for the direct computations."""
    rng = np.random.default_rng(3)
    tmp = tmp_path_factory.mktemp("adaptive")
    tokens = rng.integers(0, 30, (N_SEQ, SEQ_LEN)).astype(np.int32)
    mask = np.ones_like(tokens, dtype=bool)
    mask[:, 0] = False
    t = tokens.size
    latent = rng.standard_normal((t, 12))
    strength = np.linspace(0.05, 1.2, L * D)
    out, xs = [], []
    for k in range(3):
        x = latent @ rng.standard_normal((12, L * D)) * strength + rng.standard_normal((t, L * D))
        x = x.astype(np.float16)
        xs.append(x.astype(np.float64))
        path = tmp / f"s{k}.h5"
        w = ActivationWriter(path, ActivationHeader(f"m{k}", 0, "fp", "mlp.post", L, D, t, "float16"))
        w.write_rows(0, [x[:, i * D : (i + 1) * D] for i in range(L)])
        w.finish()
        means = x[mask.reshape(-1)].astype(np.float64).mean(axis=0)
        # keys are store ids, not positions (a run's sets are rarely ids 0, 1, 2)
        out.append(SetInput(20 + k, str(path), L, D, means, rotation_key=7 + k))
    return out, tokens, mask, xs


def _threshold(result) -> float:
    """A threshold in the middle of the excesses, where labels are least certain."""
    excess = np.concatenate([s.excess_corr for s in score_universality(result).values()])
    return float(np.nanmedian(excess))


K, CAP = 4, 24


@pytest.fixture(scope="module")
def runs(sets):
    """A full run (every neuron with all CAP draws), the threshold in the middle of its excesses, and an
    adaptive run from K draws up to CAP at that threshold."""
    inputs, tokens, mask, _xs = sets
    full = correlate_sets(inputs, tokens, mask, CorrelationOptions(baseline_draws=CAP, baseline_seed=5), CPU)
    threshold = _threshold(full)
    opts = CorrelationOptions(baseline_draws=K, baseline_seed=5, adaptive_threshold=threshold, max_draws=CAP)
    return full, threshold, opts, correlate_sets(inputs, tokens, mask, opts, CPU)


def _eigenvectors(cov: np.ndarray) -> np.ndarray:
    """float64 eigenvectors of a covariance, each with its largest entry positive (the engine's convention)."""
    _lam, u = np.linalg.eigh(cov)
    return u * np.sign(u[np.abs(u).argmax(axis=0), np.arange(u.shape[1])])


def _rotated_max(xs, mask, a: int, b: int, rotations) -> np.ndarray:
    """Direct float64 baseline of set a's neurons against set b rotated by `rotations[l]` per layer l: each
    rotated neuron is a column of the centred activations times the rotation, correlations from the data, the
    max over b's rotated neurons of every layer."""
    rows = mask.reshape(-1)
    xa = xs[a][rows] - xs[a][rows].mean(axis=0)
    best = np.full(xa.shape[1], -np.inf)
    for layer, w in enumerate(rotations):
        xb = xs[b][rows, layer * D : (layer + 1) * D]
        y = (xb - xb.mean(axis=0)) @ w
        corr = (xa.T @ y) / np.outer(np.linalg.norm(xa, axis=0), np.linalg.norm(y, axis=0))
        best = np.maximum(best, corr.max(axis=1))
    return best


def _extra_rotations(xs, mask, b: int, draw: int, seed: int) -> list[np.ndarray]:
    """Extra draw `draw`'s rotation of set b's layers, as the module docstring states: `U_l E_{draw + l}`."""
    rows = mask.reshape(-1)
    out = []
    for layer in range(L):
        xb = xs[b][rows, layer * D : (layer + 1) * D]
        cov = np.cov(xb, rowvar=False, bias=True)
        out.append(_eigenvectors(cov) @ extra_rotation(D, seed, draw + layer).astype(np.float64))
    return out


@pytest.fixture(scope="module")
def direct(sets):
    """Every neuron's extra draws K..CAP-1 against every other set, computed directly in float64."""
    inputs, _tokens, mask, xs = sets
    out = {}
    for a, sa in enumerate(inputs):
        for b, sb in enumerate(inputs):
            if a != b:
                out[(sa.key, sb.key)] = np.stack(
                    [_rotated_max(xs, mask, a, b, _extra_rotations(xs, mask, b, k, 5)) for k in range(K, CAP)]
                )
    return out


def test_extra_draws_are_the_stated_rotations_and_go_only_to_undecided_neurons(runs, direct):
    """The first K draws are the run's own (those of a K-draw run); an extra draw, where taken, equals the
    direct float64 computation with the rotation `U_l P_{k+l}` applied to the activations."""
    full, threshold, _opts, adaptive = runs
    n_extra = 0
    for pair, res in adaptive.matches.items():
        np.testing.assert_allclose(res.baseline, full.matches[pair].baseline[:K], atol=1e-6)
        taken = np.isfinite(res.extra)
        n_extra += int(taken.sum())
        np.testing.assert_allclose(res.extra[taken], direct[pair][taken], atol=2e-5)
    assert n_extra > 0
    scores = score_universality(adaptive)
    for sc in scores.values():
        n = sc.n_draws
        live = ~np.isnan(sc.excess_corr)
        assert n[live].min() == K and n[live].max() == CAP and np.all(n[~live] == 0)
        # the last round's draws went to exactly the neurons undecided at 95 % at its look (a neuron decided
        # earlier can turn undecided afterwards as its layer's pooled sd moves; the rule does not look again)
        layer = np.arange(len(n)) // D
        last = K + (CAP - K - 1) // ROUND * ROUND
        look = undecided(sc.excess_draws[:last], layer, threshold, 0.95)
        np.testing.assert_array_equal(np.isfinite(sc.excess_draws[-1]), look)
        # the label rests on all of a neuron's draws: its excess is the mean over them
        np.testing.assert_allclose(sc.excess_corr[live], np.nanmean(sc.excess_draws[:, live], axis=0), atol=1e-12)
        assert np.all(sc.stability(threshold)[live] * n[live] == np.round(sc.stability(threshold)[live] * n[live]))


def _shared_p_rotations(xs, mask, b: int, draw: int, seed: int) -> list[np.ndarray]:
    """The rejected shortcut: one `P_draw` for every layer (`U_l P_draw`), each layer Haar but not independent."""
    rows = mask.reshape(-1)
    return [
        _eigenvectors(np.cov(xs[b][rows, layer * D : (layer + 1) * D], rowvar=False, bias=True))
        @ draw_rotation(D, seed, draw)
        for layer in range(L)
    ]


def _compare(xs, mask, inputs, pairs, extra_rotations, n: int = 48) -> tuple[np.ndarray, float]:
    """Per-neuron z-scores of (mean of n run draws `R_l P_k`) - (mean of n extra draws), and the p-value of
    Welch's t-test on the per-draw means over neurons."""
    zs, old_means, new_means = [], [], []
    for a, b in pairs:
        key = inputs[b].rotation_key
        old = np.stack(
            [_rotated_max(xs, mask, a, b, [rotation(D, 9, key, layer, k) for layer in range(L)]) for k in range(n)]
        )
        new = np.stack([_rotated_max(xs, mask, a, b, extra_rotations(xs, mask, b, k, 9)) for k in range(n, 2 * n)])
        se = np.sqrt(old.var(axis=0, ddof=1) / n + new.var(axis=0, ddof=1) / n)
        zs.append((old.mean(axis=0) - new.mean(axis=0)) / se)
        old_means.append(old.mean(axis=1))
        new_means.append(new.mean(axis=1))
    t = scipy.stats.ttest_ind(np.concatenate(old_means), np.concatenate(new_means), equal_var=False)
    return np.concatenate(zs), float(t.pvalue)


def test_extra_draws_have_the_distribution_of_the_first_k(sets):
    """`U_l P_{k+l}` against the run's `R_l P_k`, 48 draws of each: every neuron's mean baseline agrees within
    Monte Carlo error (the z-scores look standard normal) and so does the mean over neurons per draw. Also where
    a set's second layer repeats its first (as neighbouring layers of a residual stream nearly do), a case in
    which one `P` for every layer is detected: its rotated layers coincide and the max over them is lower."""
    inputs, _tokens, mask, xs = sets
    repeated = [x.copy() for x in xs]
    repeated[1][:, D:] = repeated[1][:, :D]
    for data, pairs in [(xs, [(0, 1), (2, 0)]), (repeated, [(0, 1), (2, 1)])]:
        z, p = _compare(data, mask, inputs, pairs, _extra_rotations)
        assert abs(z.mean()) < 0.5 and np.mean(np.abs(z) > 3) < 0.02 and 0.7 < z.std() < 1.3 and p > 1e-3
    z, p = _compare(repeated, mask, inputs, [(0, 1), (2, 1)], _shared_p_rotations)
    assert z.mean() > 1 and p < 1e-6


def _replay(excess: np.ndarray, layer: np.ndarray, threshold: float, confidence: float) -> np.ndarray:
    """Brute force: which of the full run's draws the sequential rule takes for each neuron. Rounds of ROUND
    draws from K to CAP; a round's draws go to every neuron whose mean over the draws it has lies within
    `z * pooled sd / sqrt(n)` of the threshold (scipy's normal quantile, the sd pooled over its layer), and the
    rounds stop when no neuron of any set is undecided (here: per set, as the caller checks every set)."""
    z = scipy.stats.norm.ppf(confidence)
    taken = np.zeros(excess.shape, dtype=bool)
    taken[:K] = np.isfinite(excess[:K])
    rounds = []
    for start in range(K, CAP, ROUND):
        seen = np.where(taken, excess, np.nan)
        n = taken.sum(axis=0)
        with np.errstate(invalid="ignore", divide="ignore"):
            mean = np.nanmean(seen, axis=0)
            sd = np.nanstd(seen, axis=0, ddof=1)
        pooled = pooled_baseline_sd(np.where(n >= 2, sd, np.nan), n, layer)
        with np.errstate(invalid="ignore"):
            todo = (n >= 2) & (np.abs(mean - threshold) < z * pooled / np.sqrt(np.maximum(n, 1)))
        rounds.append(todo)
        taken[start : start + ROUND, todo] = True
    return taken, rounds


def test_decisions_match_a_brute_force_replay_on_direct_draws(runs, direct):
    """Which draws each neuron got, replayed from every neuron's K run draws and its CAP - K extra draws computed
    directly; and the labels moved towards the CAP-draw labels: they agree with them more often than K draws'."""
    _full, threshold, opts, adaptive = runs
    got = score_universality(adaptive)
    agree_adaptive = agree_k = live_total = 0
    for key, sc in got.items():
        others = [pair for pair in adaptive.matches if pair[0] == key]
        mean_max = np.mean([adaptive.matches[p].max_corr for p in others], axis=0)
        extra = mean_max - np.mean([direct[p] for p in others], axis=0)
        excess = np.concatenate([sc.excess_draws[:K], extra])
        layer = np.arange(len(sc.excess_corr)) // D
        taken, rounds = _replay(excess, layer, threshold, opts.adaptive_confidence)
        assert all(r.any() for r in rounds)  # every round had undecided neurons, so the run took them all
        np.testing.assert_array_equal(np.isfinite(sc.excess_draws), taken)
        np.testing.assert_allclose(sc.excess_draws[taken], excess[taken], atol=2e-5)
        np.testing.assert_array_equal(sc.n_draws, taken.sum(axis=0))
        live = ~np.isnan(sc.excess_corr)
        truth = excess[:, live].mean(axis=0) > threshold
        agree_adaptive += int(((sc.excess_corr[live] > threshold) == truth).sum())
        agree_k += int(((excess[:K, live].mean(axis=0) > threshold) == truth).sum())
        live_total += int(live.sum())
    assert agree_adaptive > agree_k and agree_adaptive / live_total > 0.95


def test_an_adaptive_run_is_deterministic_for_its_seed(sets, runs):
    inputs, tokens, mask, _xs = sets
    _full, _threshold, opts, adaptive = runs
    again = correlate_sets(inputs, tokens, mask, opts, CPU)
    for pair, res in adaptive.matches.items():
        np.testing.assert_array_equal(again.matches[pair].baseline, res.baseline)
        np.testing.assert_array_equal(again.matches[pair].extra, res.extra)
    other = correlate_sets(inputs, tokens, mask, CorrelationOptions(**{**vars(opts), "baseline_seed": 6}), CPU)
    assert not np.array_equal(other.matches[(20, 21)].baseline, adaptive.matches[(20, 21)].baseline)


def test_a_rounds_rotations_are_orthogonal_haar_draws_of_their_own_stream(tmp_path):
    """The round's `E_j` side by side, computed on one BLAS thread each, are `baseline.extra_rotation`: orthogonal
    to float32 precision, with R's diagonal signs fixed (so that the QR's sign convention does not bias them), and
    not the run's own `P_j` (their own random stream)."""
    block = extra_rotations(D, 5, range(4, 7))
    assert block.shape == (D, 3 * D) and block.dtype == np.float32
    np.testing.assert_array_equal(extra_rotations(D, 5, range(4, 7), str(tmp_path)), block)  # written to the cache
    assert len(list(tmp_path.glob("extra-*.rot"))) == 3
    np.testing.assert_array_equal(extra_rotations(D, 5, range(4, 7), str(tmp_path)), block)  # read from it
    for i, k in enumerate(range(4, 7)):
        e = block[:, i * D : (i + 1) * D]
        np.testing.assert_array_equal(e, extra_rotation(D, 5, k))
        np.testing.assert_allclose(e.astype(np.float64).T @ e, np.eye(D), atol=5e-6)
        assert np.abs(e - draw_rotation(D, 5, k)).max() > 0.1
    # Haar: the mean of a fixed entry over many draws is 0 and its variance 1/d (a QR without the sign fix moves
    # the diagonal's mean away from 0)
    many = np.stack([extra_rotation(8, 5, j) for j in range(4000)]).astype(np.float64)
    assert np.abs(many.mean(axis=0)).max() < 4 * np.sqrt(1 / 8 / 4000)
    np.testing.assert_allclose(many.var(axis=0), 1 / 8, rtol=0.15)


def test_undecided_is_a_margin_of_pooled_sds_around_the_threshold():
    rng = np.random.default_rng(0)
    draws = 0.3 + 0.02 * rng.standard_normal((8, 6))
    draws[:, 1] += 0.2  # far above 0.3
    draws[:, 2] -= 0.2  # far below
    draws[:, 3] = np.nan  # dead
    draws[:, 0] = 0.3 + 0.02 * np.array([1, -1, 1, -1, 1, -1, 1, -1])  # mean right at the threshold
    draws[:4, 4] = [0.31, 0.29, 0.305, 0.295]  # the same with only 4 draws
    draws[4:, 4] = np.nan
    got = undecided(draws, np.zeros(6, dtype=int), 0.3, 0.95)
    assert got.tolist()[:4] == [True, False, False, False] and got[4]
    assert not undecided(draws, np.zeros(6, dtype=int), 0.0, 0.95)[[0, 4, 5]].any()


def test_adaptive_request_errors_are_one_line():
    refs = [SetRef("a", 1), SetRef("b", 1)]
    with pytest.raises(ActdbError, match="above --baseline-draws"):
        CorrelationRequest(sets=refs, baseline_draws=8, max_draws=8).options()
    with pytest.raises(ActdbError, match="at least 2"):
        CorrelationRequest(sets=refs, baseline_draws=1, max_draws=8).options()
    opts = CorrelationRequest(sets=refs, threshold=0.2, baseline_draws=8, max_draws=32).options()
    assert (opts.adaptive_threshold, opts.max_draws) == (0.2, 32)


def test_symmetric_eigh_is_scipys_divide_and_conquer_through_the_gil_free_door():
    """`symmetric_eigh` gives `scipy.linalg.eigh(driver="evd")`'s eigenpairs, through the ctypes call on this SciPy
    (not its fallback), for a covariance and for a matrix with repeated eigenvalues."""
    from actdb.compute.correlation.symmetric_eigen import _ssyevd, symmetric_eigh

    assert _ssyevd() is not None
    rng = np.random.default_rng(3)
    x = rng.standard_normal((300, 96)).astype(np.float32)
    cov = np.cov(x, rowvar=False).astype(np.float32)
    for matrix in (cov, np.eye(40, dtype=np.float32) * 2):
        lam, u = symmetric_eigh(matrix)
        ref_lam, _ = scipy.linalg.eigh(matrix, driver="evd")
        assert lam.dtype == np.float32 and u.dtype == np.float32 and u.flags.f_contiguous
        np.testing.assert_allclose(lam, ref_lam, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(u.astype(np.float64) @ np.diag(lam) @ u.T, matrix, atol=2e-5)
    _, ref_u = scipy.linalg.eigh(cov, driver="evd")  # distinct eigenvalues: the same vectors up to sign
    np.testing.assert_allclose(np.abs(symmetric_eigh(cov)[1].T @ ref_u), np.eye(len(cov)), atol=1e-3)
    with pytest.raises(ValueError, match="infs or NaNs"):
        symmetric_eigh(np.full((4, 4), np.nan, dtype=np.float32))
