"""Robustness measures against independent references: scipy's Jensen-Shannon distance, a direct float64
formula, and Fleiss' kappa and ICC(2,1) worked by hand from their textbook definitions."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.spatial.distance import jensenshannon

from actdb.compute.robustness.edits import Edit, FrequencyBins, control_edit, generate_edit, identifier_tokens
from actdb.compute.robustness.math import (
    PermutationTest,
    bootstrap_ci,
    fleiss_kappa,
    icc_agreement,
    interventional_robustness,
    jsd_bits,
    kl_bits,
    sign_agreement,
)
from actdb.compute.robustness.neuron_sets import matched_frequency_controls


def _random_logp(rng, n, positions, vocab):
    logits = torch.from_numpy(rng.normal(size=(n, positions, vocab)) * 2)
    return torch.log_softmax(logits, dim=-1)


def test_jsd_of_two_equals_squared_scipy_distance_base_2():
    rng = np.random.default_rng(0)
    logp = _random_logp(rng, 2, 7, 50)
    ours = jsd_bits(logp).numpy()
    p = logp.exp().numpy()
    ref = [jensenshannon(p[0, t], p[1, t], base=2) ** 2 for t in range(7)]
    np.testing.assert_allclose(ours, ref, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("n", [3, 5])
def test_jsd_of_n_equals_a_direct_float64_formula(n):
    rng = np.random.default_rng(n)
    logp = _random_logp(rng, n, 6, 40)
    p = logp.exp().numpy()
    for t in range(6):
        m = p[:, t].mean(0)
        h = lambda q: -(q * np.log2(q)).sum()  # noqa: E731
        ref = h(m) - np.mean([h(p[k, t]) for k in range(n)])
        assert float(jsd_bits(logp)[t]) == pytest.approx(ref, rel=1e-10, abs=1e-12)
    assert (jsd_bits(logp) <= math.log2(n) + 1e-12).all()


def test_jsd_handles_zero_probabilities_and_reaches_log2_n_for_disjoint_supports():
    p = torch.tensor([[1.0, 0, 0], [0, 1.0, 0], [0, 0, 1.0]])
    logp = torch.log(p)[:, None, :]  # three seeds, one position, each certain of a different token
    assert float(jsd_bits(logp)[0]) == pytest.approx(math.log2(3))
    assert float(interventional_robustness(jsd_bits(logp), 3)[0]) == pytest.approx(0.0, abs=1e-12)


def test_topk_jsd_is_a_lower_bound_equal_at_full_vocabulary():
    rng = np.random.default_rng(3)
    logp = _random_logp(rng, 4, 9, 30)
    exact = jsd_bits(logp)
    assert torch.allclose(jsd_bits(logp, topk=30), exact)
    for k in (1, 3, 10):
        assert (jsd_bits(logp, topk=k) <= exact + 1e-12).all()
    # a hand-coarsened reference: the union of top-3 tokens, the rest merged
    k = 3
    p = logp.exp().numpy()
    t = 0
    keep = sorted({int(i) for s in range(4) for i in np.argsort(-p[s, t])[:k]})
    q = np.stack([np.append(p[s, t, keep], 1 - p[s, t, keep].sum()) for s in range(4)])
    h = lambda x: -(x[x > 0] * np.log2(x[x > 0])).sum()  # noqa: E731
    ref = h(q.mean(0)) - np.mean([h(x) for x in q])
    assert float(jsd_bits(logp, topk=k)[t]) == pytest.approx(ref, rel=1e-9)


def test_ir_is_one_for_identical_seeds_and_ir_norm_zero_for_a_no_op():
    rng = np.random.default_rng(1)
    one = _random_logp(rng, 1, 5, 20)
    same = one.expand(4, -1, -1)
    assert torch.allclose(interventional_robustness(jsd_bits(same), 4), torch.ones(5, dtype=torch.float64))
    differ = _random_logp(rng, 4, 5, 20)
    ir = interventional_robustness(jsd_bits(differ), 4)
    assert torch.equal(ir - interventional_robustness(jsd_bits(differ.clone()), 4), torch.zeros(5, dtype=torch.float64))


def test_a_change_planted_in_one_seed_lowers_ir_by_the_computed_amount():
    """Seeds identical at uniform; the intervention turns seed 0 into a point mass. JSD becomes
    H((1 + 3u)/4 mix) - (0 + 3 log2 V)/4, computed here by hand."""
    v, n = 8, 4
    uniform = torch.full((n, 1, v), -math.log(v), dtype=torch.float64)
    planted = uniform.clone()
    planted[0, 0] = torch.log(torch.tensor([1.0] + [0.0] * (v - 1), dtype=torch.float64))
    mix = np.array([(1 + 3 / v) / 4] + [(3 / v) / 4] * (v - 1))
    jsd = -(mix * np.log2(mix)).sum() - 3 * math.log2(v) / 4
    ir_norm = float(
        interventional_robustness(jsd_bits(planted), n)[0] - interventional_robustness(jsd_bits(uniform), n)[0]
    )
    assert ir_norm == pytest.approx(-jsd / 2, rel=1e-12)  # log2(4) = 2
    assert ir_norm < 0


def test_kl_bits_matches_a_direct_formula():
    rng = np.random.default_rng(2)
    a, b = _random_logp(rng, 2, 3, 10)
    p, q = a.exp().numpy(), b.exp().numpy()
    ref = (p * np.log2(p / q)).sum(-1)
    np.testing.assert_allclose(kl_bits(a, b).numpy(), ref, rtol=1e-10)


def test_fleiss_kappa_on_the_worked_example():
    """Fleiss (1971) / Wikipedia's worked example: 10 subjects, 14 raters, 5 categories, kappa = 0.210."""
    counts = np.array(
        [
            [0, 0, 0, 0, 14],
            [0, 2, 6, 4, 2],
            [0, 0, 3, 5, 6],
            [0, 3, 9, 2, 0],
            [2, 2, 8, 1, 1],
            [7, 7, 0, 0, 0],
            [3, 2, 6, 3, 0],
            [2, 5, 3, 2, 2],
            [6, 5, 2, 1, 0],
            [0, 2, 2, 3, 7],
        ]
    )
    assert fleiss_kappa(counts) == pytest.approx(0.20993, abs=1e-4)
    assert fleiss_kappa(np.array([[3, 0], [0, 3], [3, 0]])) == pytest.approx(1.0)


def test_icc_two_way_agreement_by_hand():
    """Shrout & Fleiss (1979) table 2: 6 targets x 4 judges, ICC(2,1) = 0.29."""
    x = np.array([[9, 2, 5, 8], [6, 1, 3, 2], [8, 4, 6, 8], [7, 1, 2, 6], [10, 5, 6, 9], [6, 2, 4, 7]])
    assert icc_agreement(x) == pytest.approx(0.2898, abs=1e-3)
    # identical raters agree perfectly
    col = np.array([1.0, 3.0, 2.0, 5.0])
    assert icc_agreement(np.stack([col, col, col], axis=1)) == pytest.approx(1.0)


def test_sign_agreement_permutation_p_and_bootstrap():
    assert sign_agreement(np.array([[1, 2, 3], [-1, 2, 3], [-1, -2, -0.1]])) == pytest.approx(2 / 3)
    controls = np.array([0.0, 0.1, -0.1, 0.05])
    far = PermutationTest.of(controls, -1.0)
    assert far.p_value == pytest.approx(1 / 5) and far.p_floor == pytest.approx(1 / 5)
    assert far.excess == pytest.approx(-1.0 - controls.mean())
    near = PermutationTest.of(controls, controls.mean())
    assert near.p_value == 1.0
    assert PermutationTest.of(np.array([]), 0.0) is None
    v = np.random.default_rng(0).normal(size=200)
    low, high = bootstrap_ci(v, 2000, seed=1)
    assert low < v.mean() < high and bootstrap_ci(v, 2000, seed=1) == (low, high)
    se = v.std(ddof=1) / math.sqrt(len(v))
    assert high - low == pytest.approx(2 * 1.96 * se, rel=0.15)


def test_edits_keep_length_and_frequency_bin():
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 50, size=(20, 16))
    mask = np.ones_like(tokens, dtype=bool)
    bins = FrequencyBins(tokens, mask, 50, never={0})
    clean = tokens[0]
    edit = generate_edit("replace", clean, mask[0], bins, np.zeros(50, dtype=bool), rng)
    assert len(edit.edited) == 16 and len(edit.changed) == 1
    at = edit.changed[0]
    assert bins.bin_of[edit.edited[at]] == bins.bin_of[clean[at]] and edit.edited[at] != 0
    assert edit.evaluated()[:at].sum() == 0 and edit.evaluated()[at:].all()
    ids = np.array([1, 2, 3, 1, 2, 4])
    ident = np.zeros(50, dtype=bool)
    ident[[1, 2]] = True
    swapped = generate_edit("swap", ids, np.ones(6, dtype=bool), bins, ident, rng)
    assert swapped.edited.tolist() == [2, 1, 3, 2, 1, 4]
    control = control_edit(swapped, bins, np.random.default_rng(5))
    assert len(control.changed) <= 4 and (bins.bin_of[control.edited] == bins.bin_of[control.clean]).all()
    assert identifier_tokens(["foo", " bar", "(", "if", "x1", "_"]).tolist() == [True, True, False, False, True, False]
    assert isinstance(Edit(ids, ids, np.ones(6, dtype=bool)).changed, np.ndarray)


def test_matched_controls_keep_layer_counts_and_frequency_decile():
    d = 100
    frac = {(0, n): n / d for n in range(d)} | {(1, n): (d - n) / d for n in range(d)}
    chosen = [(0, 5), (0, 55), (1, 90)]
    a = matched_frequency_controls(chosen, frac, d, 6, np.random.default_rng(3))
    assert a == matched_frequency_controls(chosen, frac, d, 6, np.random.default_rng(3))
    for draw in a:
        assert sorted(layer for layer, _ in draw) == [0, 0, 1] and not set(draw) & set(chosen)
        zero = sorted(n for layer, n in draw if layer == 0)
        assert zero[0] // 10 == 0 and zero[1] // 10 == 5  # same activation-frequency decile
        assert [n for layer, n in draw if layer == 1][0] // 10 == 9
