"""Adaptive baseline draws: extra rotations only for undecided neurons, equal to the same draws of a full run."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.stats

from actdb.compute.correlation.adaptive import ROUND, draw_rotations, undecided
from actdb.compute.correlation.baseline import draw_rotation
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
    """Three sets sharing latent features of varied strength, so excesses spread across a threshold."""
    rng = np.random.default_rng(3)
    tmp = tmp_path_factory.mktemp("adaptive")
    tokens = rng.integers(0, 30, (N_SEQ, SEQ_LEN)).astype(np.int32)
    mask = np.ones_like(tokens, dtype=bool)
    mask[:, 0] = False
    t = tokens.size
    latent = rng.standard_normal((t, 12))
    strength = np.linspace(0.05, 1.2, L * D)
    out = []
    for k in range(3):
        x = latent @ rng.standard_normal((12, L * D)) * strength + rng.standard_normal((t, L * D))
        x = x.astype(np.float16)
        path = tmp / f"s{k}.h5"
        w = ActivationWriter(path, ActivationHeader(f"m{k}", 0, "fp", "mlp.post", L, D, t, "float16"))
        w.write_rows(0, [x[:, i * D : (i + 1) * D] for i in range(L)])
        w.finish()
        means = x[mask.reshape(-1)].astype(np.float64).mean(axis=0)
        # keys are store ids, not positions (a run's sets are rarely ids 0, 1, 2)
        out.append(SetInput(20 + k, str(path), L, D, means, rotation_key=7 + k))
    return out, tokens, mask


def _threshold(result) -> float:
    """A threshold in the middle of the excesses, where labels are least certain."""
    excess = np.concatenate([s.excess_corr for s in score_universality(result).values()])
    return float(np.nanmedian(excess))


K, CAP = 4, 24


@pytest.fixture(scope="module")
def runs(sets):
    """A full run (every neuron with all CAP draws), the threshold in the middle of its excesses, and an
    adaptive run from K draws up to CAP at that threshold."""
    inputs, tokens, mask = sets
    full = correlate_sets(inputs, tokens, mask, CorrelationOptions(baseline_draws=CAP, baseline_seed=5), CPU)
    threshold = _threshold(full)
    opts = CorrelationOptions(baseline_draws=K, baseline_seed=5, adaptive_threshold=threshold, max_draws=CAP)
    return full, threshold, opts, correlate_sets(inputs, tokens, mask, opts, CPU)


def test_extra_draws_equal_the_same_draws_of_a_full_run_and_go_only_to_undecided_neurons(runs):
    full, threshold, _opts, adaptive = runs
    n_extra = 0
    for pair, res in adaptive.matches.items():
        ref = full.matches[pair].baseline
        np.testing.assert_allclose(res.baseline, ref[:K], atol=1e-6)
        taken = np.isfinite(res.extra)
        n_extra += int(taken.sum())
        np.testing.assert_allclose(res.extra[taken], ref[K:][taken], atol=1e-5)
    assert n_extra > 0
    scores = score_universality(adaptive)
    for sc in scores.values():
        n = sc.n_draws
        live = ~np.isnan(sc.excess_corr)
        assert n[live].min() == K and n[live].max() == CAP and np.all(n[~live] == 0)
        # every neuron is decided at 95 % by its own draws, or was still drawing when the cap came
        layer = np.arange(len(n)) // D
        still = undecided(sc.excess_draws, layer, threshold, 0.95)
        assert np.all(np.isfinite(sc.excess_draws[-1, still]))
        # the label rests on all of a neuron's draws: its excess is the mean over them
        np.testing.assert_allclose(sc.excess_corr[live], np.nanmean(sc.excess_draws[:, live], axis=0), atol=1e-12)
        assert np.all(sc.stability(threshold)[live] * n[live] == np.round(sc.stability(threshold)[live] * n[live]))


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


def test_decisions_match_a_brute_force_replay_on_the_full_runs_draws(runs):
    """Which draws each neuron got, replayed from the full run's draws of every neuron; and the labels moved
    towards the full run's: the adaptive labels agree with the CAP-draw labels at least as often as K draws'."""
    full, threshold, opts, adaptive = runs
    got, ref = score_universality(adaptive), score_universality(full)
    agree_adaptive = agree_k = live_total = 0
    for key, sc in got.items():
        layer = np.arange(len(sc.excess_corr)) // D
        taken, rounds = _replay(ref[key].excess_draws, layer, threshold, opts.adaptive_confidence)
        assert all(r.any() for r in rounds)  # every round had undecided neurons, so the run took them all
        np.testing.assert_array_equal(np.isfinite(sc.excess_draws), taken)
        np.testing.assert_allclose(sc.excess_draws[taken], ref[key].excess_draws[taken], atol=1e-5)
        np.testing.assert_array_equal(sc.n_draws, taken.sum(axis=0))
        live = ~np.isnan(sc.excess_corr)
        truth = ref[key].excess_corr[live] > threshold
        agree_adaptive += int(((sc.excess_corr[live] > threshold) == truth).sum())
        k_only = np.nanmean(ref[key].excess_draws[:K, live], axis=0) > threshold
        agree_k += int((k_only == truth).sum())
        live_total += int(live.sum())
    assert agree_adaptive > agree_k and agree_adaptive / live_total > 0.95


def test_an_adaptive_run_is_deterministic_for_its_seed(sets, runs):
    inputs, tokens, mask = sets
    _full, _threshold, opts, adaptive = runs
    again = correlate_sets(inputs, tokens, mask, opts, CPU)
    for pair, res in adaptive.matches.items():
        np.testing.assert_array_equal(again.matches[pair].baseline, res.baseline)
        np.testing.assert_array_equal(again.matches[pair].extra, res.extra)
    other = correlate_sets(inputs, tokens, mask, CorrelationOptions(**{**vars(opts), "baseline_seed": 6}), CPU)
    assert not np.array_equal(other.matches[(20, 21)].baseline, adaptive.matches[(20, 21)].baseline)


def test_a_rounds_rotations_are_the_baselines_draws():
    """The round's `P_k` side by side, computed on one BLAS thread each, are the engine's draws."""
    block = draw_rotations(D, 5, range(4, 7))
    assert block.shape == (D, 3 * D) and block.dtype == np.float32
    for i, k in enumerate(range(4, 7)):
        np.testing.assert_array_equal(block[:, i * D : (i + 1) * D], draw_rotation(D, 5, k).astype(np.float32))


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
