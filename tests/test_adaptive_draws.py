"""Adaptive baseline draws: extra rotations only for undecided neurons, equal to the same draws of a full run."""

from __future__ import annotations

import numpy as np
import pytest

from actdb.compute.correlation.adaptive import undecided
from actdb.compute.correlation.engine import CorrelationOptions, SetInput, correlate_sets
from actdb.compute.correlation.run import CorrelationRequest
from actdb.compute.correlation.universality import score_universality
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
        out.append(SetInput(k, str(path), L, D, means, rotation_key=7 + k))
    return out, tokens, mask


def _threshold(result) -> float:
    """A threshold in the middle of the excesses, where labels are least certain."""
    excess = np.concatenate([s.excess_corr for s in score_universality(result).values()])
    return float(np.nanmedian(excess))


def test_extra_draws_equal_the_same_draws_of_a_full_run_and_go_only_to_undecided_neurons(sets):
    inputs, tokens, mask = sets
    full = correlate_sets(inputs, tokens, mask, CorrelationOptions(baseline_draws=24, baseline_seed=5), CPU)
    threshold = _threshold(full)
    opts = CorrelationOptions(baseline_draws=4, baseline_seed=5, adaptive_threshold=threshold, max_draws=24)
    adaptive = correlate_sets(inputs, tokens, mask, opts, CPU)
    n_extra = 0
    for pair, res in adaptive.matches.items():
        ref = full.matches[pair].baseline
        np.testing.assert_allclose(res.baseline, ref[:4], atol=1e-6)
        taken = np.isfinite(res.extra)
        n_extra += int(taken.sum())
        np.testing.assert_allclose(res.extra[taken], ref[4:][taken], atol=1e-5)
    assert n_extra > 0
    scores = score_universality(adaptive)
    for sc in scores.values():
        n = sc.n_draws
        live = ~np.isnan(sc.excess_corr)
        assert n[live].min() == 4 and n[live].max() == 24 and np.all(n[~live] == 0)
        # every neuron is decided at 95 % by its own draws, or was still drawing when the cap came
        layer = np.arange(len(n)) // D
        still = undecided(sc.excess_draws, layer, threshold, 0.95)
        assert np.all(np.isfinite(sc.excess_draws[-1, still]))
        # the label rests on all of a neuron's draws: its excess is the mean over them
        np.testing.assert_allclose(sc.excess_corr[live], np.nanmean(sc.excess_draws[:, live], axis=0), atol=1e-12)
        assert np.all(sc.stability(threshold)[live] * n[live] == np.round(sc.stability(threshold)[live] * n[live]))


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
