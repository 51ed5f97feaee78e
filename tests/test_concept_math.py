"""Concept math against independent plain NumPy / SciPy references (scikit-learn is not a dependency)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from scipy import stats

from actdb.compute.concepts import math as cm


def reference_ap(scores: np.ndarray, labels: np.ndarray) -> float:
    """scikit-learn's definition, written out: over distinct thresholds t (descending), sum (R_t - R_prev) P_t."""
    total = labels.sum()
    ap, prev_recall = 0.0, 0.0
    for t in np.unique(scores)[::-1]:
        predicted = scores >= t
        tp = np.sum(labels & predicted)
        recall = tp / total
        ap += (recall - prev_recall) * tp / predicted.sum()
        prev_recall = recall
    return ap


def reference_auroc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Probability that a random positive outscores a random negative (ties count half), over all pairs."""
    pos, neg = scores[labels], scores[~labels]
    diff = pos[:, None] - neg[None, :]
    return float(np.mean((diff > 0) + 0.5 * (diff == 0)))


@pytest.mark.parametrize("ties", [False, True])
def test_ap_and_auroc_equal_references_for_every_neuron(ties):
    rng = np.random.default_rng(0)
    n, m = 40, 30
    x = rng.normal(size=(n, m))
    if ties:  # ReLU-like zeros and rounded values make tie groups
        x = np.round(np.maximum(x, 0), 1)
    labels = rng.permutation(cm.balanced_labels(18, 22))
    ranked = cm.RankedResponses.of(x)
    ap, auc = ranked.average_precision(labels), ranked.auroc(labels)
    for j in range(m):
        assert ap[j] == pytest.approx(reference_ap(x[:, j], labels), abs=1e-12)
        assert auc[j] == pytest.approx(reference_auroc(x[:, j], labels), abs=1e-12)


def test_score_concept_finds_a_planted_neuron_and_states_its_null():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(60, 200))
    x[:30, 7] += 5.0  # neuron 7 fires on the first 30 sentences (the positives)
    s = cm.score_concept(x, 30, k=10, n_permutations=20, rng=np.random.default_rng(0))
    assert cm.top_k(s.ap, 10)[0] == 7 and s.ap[7] == pytest.approx(1.0)
    assert s.auroc[7] == pytest.approx(1.0)
    assert s.n_permutations == 20 and s.null_best.shape == (20,) and (s.null_kth <= s.null_best).all()
    assert s.null_best.max() < 0.9  # random relabellings of 60 sentences do not reach a planted neuron
    assert s.excess_ap() > 0.1
    assert s.p_best() == pytest.approx(1 / 21)  # the floor with 20 permutations


def test_spearman_matrix_equals_scipy():
    rng = np.random.default_rng(3)
    v = rng.random((5, 100))
    v[2] = np.round(v[2], 1)  # ties
    expected = stats.spearmanr(v.T).statistic
    np.testing.assert_allclose(cm.spearman_matrix(v), expected, atol=1e-12)


def test_rsa_rho_equals_spearman_of_triangles_and_mantel_p_matches_exhaustive_enumeration():
    rng = np.random.default_rng(4)
    n = 5
    a = rng.random((n, n))
    a = (a + a.T) / 2
    b = a + 0.3 * rng.random((n, n))
    b = (b + b.T) / 2
    result = cm.rsa(a, b, 20000, np.random.default_rng(0))
    iu = np.triu_indices(n, k=1)
    assert result.rho == pytest.approx(stats.spearmanr(a[iu], b[iu]).statistic, abs=1e-12)
    exhaustive = [stats.spearmanr(a[iu], b[np.ix_(p, p)][iu]).statistic for p in itertools.permutations(range(n))]
    exact_p = np.mean(np.array(exhaustive) >= result.rho - 1e-12)
    assert result.p == pytest.approx(exact_p, abs=0.01)
    assert result.p_floor == pytest.approx(1 / 20001) and result.n_pairs == 10


def test_taxonomy_similarity_is_path_similarity():
    parents = {"dog": ["animal"], "cat": ["animal"], "oak": ["plant"], "animal": ["thing"], "plant": ["thing"]}
    sim = cm.taxonomy_similarity(["dog", "cat", "oak", "animal", "rock"], parents)
    assert sim[0, 1] == pytest.approx(1 / 3)  # dog-animal-cat
    assert sim[0, 3] == pytest.approx(1 / 2)
    assert sim[0, 2] == pytest.approx(1 / 5)  # dog-animal-thing-plant-oak
    assert sim[0, 4] == 0.0 and sim[4, 4] == 1.0


def test_triplets_give_similarity_and_accuracy():
    # concepts 0, 1 alike; 2 odd in every triplet
    triplets = np.array([[0, 1, 2, 2], [0, 2, 1, 2], [0, 1, 2, 2]])
    sim = cm.triplet_similarity(3, triplets)
    assert sim[0, 1] == 1.0 and sim[0, 2] == 0.0
    model = np.array([[1, 0.9, 0.1], [0.9, 1, 0.2], [0.1, 0.2, 1]])
    assert cm.triplet_accuracy(model, triplets) == (1.0, 3)
    wrong = np.array([[1, 0.1, 0.9], [0.1, 1, 0.2], [0.9, 0.2, 1]])
    assert cm.triplet_accuracy(wrong, triplets)[0] == 0.0


def test_hierarchy_auroc_containment_and_dendrogram_on_a_planted_tree():
    concepts = ["animal", "dog", "cat", "plant", "oak", "fern"]
    parents = {"dog": ["animal"], "cat": ["animal"], "oak": ["plant"], "fern": ["plant"]}
    tax = cm.taxonomy_similarity(concepts, parents)
    sim = tax + 0.01 * np.random.default_rng(5).random(tax.shape)
    sim = (sim + sim.T) / 2
    h = {x.parent: x for x in cm.hierarchy_auroc(sim, concepts, parents, 200, np.random.default_rng(0))}
    assert set(h) == {"animal", "plant"}
    assert h["animal"].auroc == 1.0 and h["animal"].n_children == 2 and h["animal"].n_others == 3
    # 10 relabellings of 5 concepts: one in ten puts both children on top, so p cannot go far below 0.1
    assert 0.05 < h["animal"].p < 0.2
    d = cm.dendrogram(sim, tax)
    assert d.cophenetic_r > 0.9 and sorted(d.leaves) == list(range(6))
    assert cm.containment(np.array([1, 2, 3, 4]), np.array([3, 4, 5])) == 0.5


def test_twin_overlap_tuning_enrichment_and_emergence():
    rng = np.random.default_rng(6)
    n = 500
    twin_of = rng.permutation(n)  # a one-to-one twin map
    experts_a = np.arange(20)
    ov = cm.twin_overlap(experts_a, twin_of[experts_a], twin_of, 200, rng)
    assert ov.jaccard == 1.0 and ov.chance_mean < 0.1 and ov.p == pytest.approx(1 / 201)
    ap_a = rng.random((8, n))
    ap_b = np.empty_like(ap_a)
    ap_b[:, twin_of] = ap_a  # the twin of neuron i in B is tuned exactly like i in A
    twins, random_pairs = cm.twin_tuning(ap_a, ap_b, twin_of, experts_a, 500, rng)
    assert twins == pytest.approx(1.0) and abs(random_pairs) < 0.15
    e = np.zeros(n, bool)
    e[:50] = True
    u = np.zeros(n, bool)
    u[:40] = True
    enr = cm.expert_universal_enrichment(e, u)
    assert enr.table == ((40, 10), (0, 450))
    assert enr.p == pytest.approx(stats.fisher_exact([[40, 10], [0, 450]]).pvalue)
    assert cm.emergence_step([1, 2, 3, 4], [0.6, 0.2, 0.5, 1.0]) == 3
    assert cm.emergence_step([1, 2], [0.1, 0.4]) is None
