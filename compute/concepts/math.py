"""Concept-expert math on arrays (Suau et al.'s expert units, as Fedzechkina et al. 2025 use them): no I/O.

A neuron's responses to a concept's sentences score it as a classifier of positive vs negative sentences:
average precision (AP, chance = the share of positives, 0.5 when balanced) and AUROC. Every neuron is scored at
once: one sort per neuron column (`RankedResponses`), reused for every label permutation of the null
(permuting labels never re-sorts).
Then concept x concept similarity from the AP vectors, RSA against a reference with a Mantel p, hierarchy
AUROC, containment, the dendrogram's cophenetic correlation with the taxonomy, and the cross-seed and
cross-step comparisons of expert sets.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import stats
from scipy.cluster import hierarchy
from scipy.spatial.distance import squareform


@dataclass(frozen=True)
class RankedResponses:
    """Responses `(n_sentences, n_neurons)` sorted once per neuron column, descending.

    `order[i, n]` is the sentence at descending rank i of neuron n; `group_end[i, n]` the last rank of the tie
    group holding rank i, `group_start[i, n]` its first (ties share the precision at the group's end, as
    scikit-learn's thresholds do, and the midrank for AUROC).
    """

    order: np.ndarray
    group_start: np.ndarray
    group_end: np.ndarray

    @classmethod
    def of(cls, responses: np.ndarray) -> RankedResponses:
        """Sort every neuron's responses (one vectorised sort; NaN is refused)."""
        x = np.asarray(responses)
        if x.ndim != 2 or x.shape[0] < 2:
            raise ValueError(f"responses must be (n_sentences >= 2, n_neurons), got {x.shape}")
        if not np.isfinite(x).all():
            raise ValueError("responses hold NaN or infinite values")
        order = np.argsort(-x, axis=0, kind="stable")
        return cls.from_sorted(order, np.take_along_axis(x, order, axis=0))

    @classmethod
    def from_sorted(cls, order: np.ndarray, sorted_scores: np.ndarray) -> RankedResponses:
        n = order.shape[0]
        ranks = np.broadcast_to(np.arange(n)[:, None], order.shape)
        new_group = np.ones(order.shape, dtype=bool)
        new_group[1:] = sorted_scores[1:] != sorted_scores[:-1]
        ends_here = np.ones(order.shape, dtype=bool)
        ends_here[:-1] = new_group[1:]
        # first rank of each group: running max of group starts; last rank: running min from the end
        start = np.maximum.accumulate(np.where(new_group, ranks, 0), axis=0)
        end = np.minimum.accumulate(np.where(ends_here, ranks, n)[::-1], axis=0)[::-1]
        return cls(order, start, end)

    @property
    def n_sentences(self) -> int:
        return self.order.shape[0]

    def sorted_labels(self, labels: np.ndarray) -> np.ndarray:
        """Boolean labels `(n_sentences,)` or `(n_perm, n_sentences)` in each neuron's descending order."""
        return np.asarray(labels, dtype=bool)[..., self.order]

    def average_precision(self, labels: np.ndarray) -> np.ndarray:
        """AP of every neuron for labels `(n_sentences,)` -> `(n_neurons,)`, or `(n_perm, n_sentences)` ->
        `(n_perm, n_neurons)`. AP = sum over thresholds of (recall step) x precision, equal to
        `sklearn.metrics.average_precision_score`: each positive contributes the precision at the end of its
        tie group, divided by the number of positives."""
        lab = self.sorted_labels(labels)
        positives = int(np.asarray(labels, dtype=bool).sum(axis=-1).reshape(-1)[0])  # the same in every row
        if positives == 0 or positives == self.n_sentences:
            raise ValueError("AP needs both positive and negative sentences")
        tp = np.cumsum(lab, axis=-2, dtype=np.int64)
        precision = tp / (np.arange(1, self.n_sentences + 1)[:, None])
        at_end = np.take_along_axis(precision, np.broadcast_to(self.group_end, precision.shape), axis=-2)
        return (at_end * lab).sum(axis=-2) / positives

    def auroc(self, labels: np.ndarray) -> np.ndarray:
        """AUROC of every neuron (Mann-Whitney U / (P N) with midranks for ties), same shapes as AP."""
        lab = self.sorted_labels(labels)
        n = self.n_sentences
        positives = int(np.asarray(labels, dtype=bool).sum(axis=-1).reshape(-1)[0])
        negatives = n - positives
        if positives == 0 or negatives == 0:
            raise ValueError("AUROC needs both positive and negative sentences")
        # ascending midrank (1-based) of descending positions start..end is n - (start + end) / 2
        midrank = n - (self.group_start + self.group_end) / 2.0
        rank_sum = (midrank * lab).sum(axis=-2)
        return (rank_sum - positives * (positives + 1) / 2.0) / (positives * negatives)


def balanced_labels(n_pos: int, n_neg: int) -> np.ndarray:
    """Labels for `n_pos` positive sentences followed by `n_neg` negatives."""
    return np.r_[np.ones(n_pos, dtype=bool), np.zeros(n_neg, dtype=bool)]


@dataclass(frozen=True)
class ConceptScores:
    """One concept's scores over all neurons, with its permutation null."""

    ap: np.ndarray  # (n_neurons,) float32
    auroc: np.ndarray  # (n_neurons,) float32
    null_best: np.ndarray  # (n_perm,) the best AP over neurons under each label permutation
    null_kth: np.ndarray  # (n_perm,) the k-th best AP under each permutation

    @property
    def n_permutations(self) -> int:
        return len(self.null_best)

    def best(self) -> float:
        return float(self.ap.max())

    def null_q99(self) -> float:
        """The null's 99th percentile of the best AP (with few permutations it is close to their maximum)."""
        return float(np.quantile(self.null_best, 0.99)) if self.n_permutations else float("nan")

    def excess_ap(self) -> float:
        """Best AP above the null's 99th percentile of the best AP."""
        return self.best() - self.null_q99()

    def p_best(self) -> float:
        """Permutation p of the best AP: (1 + #null >= best) / (1 + n_perm); its floor is 1 / (1 + n_perm)."""
        return float((1 + np.sum(self.null_best >= self.best())) / (1 + self.n_permutations))


def score_concept(
    responses: np.ndarray,
    n_positive: int,
    *,
    k: int,
    n_permutations: int,
    rng: np.random.Generator,
) -> ConceptScores:
    """AP and AUROC of every neuron for one concept, from its sentences' responses `(n_sentences, n_neurons)`
    (the first `n_positive` rows positive, the rest negative), and the best and k-th best AP over neurons under
    `n_permutations` random relabellings of the same sentences (one sort serves them all)."""
    ranked = RankedResponses.of(responses)
    labels = balanced_labels(n_positive, responses.shape[0] - n_positive)
    ap = ranked.average_precision(labels).astype(np.float32)
    auroc = ranked.auroc(labels).astype(np.float32)
    kk = min(k, ap.size)
    null_best = np.empty(n_permutations)
    null_kth = np.empty(n_permutations)
    for p in range(n_permutations):  # a loop over permutations, each scoring all neurons at once
        perm_ap = ranked.average_precision(rng.permutation(labels))
        top = np.partition(perm_ap, perm_ap.size - kk)[perm_ap.size - kk :]
        null_best[p] = top.max()
        null_kth[p] = top.min()
    return ConceptScores(ap, auroc, null_best, null_kth)


def top_k(ap: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k highest APs, best first (ties broken by the lower index)."""
    k = min(k, ap.size)
    order = np.argsort(-ap, kind="stable")
    return order[:k]


def rank_rows(x: np.ndarray) -> np.ndarray:
    """Average ranks along the last axis (ties share their mean rank), as `scipy.stats.rankdata`."""
    return stats.rankdata(x, axis=-1)


def spearman_matrix(vectors: np.ndarray) -> np.ndarray:
    """Spearman correlation between every pair of rows `(n_concepts, n_neurons)` -> `(n_concepts, n_concepts)`:
    the Pearson correlation of their ranks. A constant row (no information) gives NaN against every row."""
    r = rank_rows(np.asarray(vectors, dtype=np.float64))
    r = r - r.mean(axis=1, keepdims=True)
    norm = np.sqrt((r * r).sum(axis=1))
    with np.errstate(invalid="ignore", divide="ignore"):
        out = (r @ r.T) / np.outer(norm, norm)
    return np.clip(out, -1.0, 1.0)


def jaccard_matrix(sets: Sequence[np.ndarray]) -> np.ndarray:
    """Jaccard index between every pair of index sets."""
    as_sets = [set(np.asarray(s).tolist()) for s in sets]
    n = len(as_sets)
    out = np.ones((n, n))
    for i in range(n):
        for j in range(i + 1, n):
            out[i, j] = out[j, i] = jaccard(as_sets[i], as_sets[j])
    return out


def jaccard(a: set | np.ndarray, b: set | np.ndarray) -> float:
    return _set_jaccard(set(np.asarray(list(a)).tolist()), set(np.asarray(list(b)).tolist()))


def _set_jaccard(a: set, b: set) -> float:
    """|a & b| / |a | b| of two sets of Python ints (NaN when both are empty)."""
    union = len(a | b)
    return len(a & b) / union if union else float("nan")


def upper(matrix: np.ndarray) -> np.ndarray:
    """The strict upper triangle of a square matrix, row by row."""
    i, j = np.triu_indices(matrix.shape[0], k=1)
    return matrix[i, j]


@dataclass(frozen=True)
class RSA:
    """Spearman between two similarity matrices' upper triangles, with a one-sided Mantel permutation p."""

    rho: float
    p: float
    n_permutations: int
    n_pairs: int

    @property
    def p_floor(self) -> float:
        return 1.0 / (1 + self.n_permutations)


def rsa(model: np.ndarray, reference: np.ndarray, n_permutations: int, rng: np.random.Generator) -> RSA:
    """RSA of two `(n, n)` similarity matrices over the same concepts: rho = Spearman of the upper triangles;
    Mantel p = (1 + #{rho under a joint row/column permutation of `reference` >= rho}) / (1 + n_perm), which
    keeps each matrix's internal dependence between pairs (a plain Spearman p would assume pairs independent).
    Pairs where either matrix is NaN are left out (the permutations leave out the same positions)."""
    n = model.shape[0]
    if model.shape != (n, n) or reference.shape != (n, n) or n < 3:
        raise ValueError("RSA needs two square matrices over the same >= 3 concepts")
    a, b = upper(model), upper(reference)
    ok = np.isfinite(a) & np.isfinite(b)
    if ok.sum() < 3:
        return RSA(float("nan"), float("nan"), n_permutations, int(ok.sum()))
    rho = _spearman_rows(a[ok], b[ok][None, :])[0]
    if not np.isfinite(rho):  # a constant triangle (e.g. a taxonomy without links) carries no ranking
        return RSA(float("nan"), float("nan"), n_permutations, int(ok.sum()))
    exceed = 0
    iu, ju = np.triu_indices(n, k=1)
    for start in range(0, n_permutations, 1000):  # chunks bound the memory to 1000 x n x n
        count = min(1000, n_permutations - start)
        perms = np.argsort(rng.random((count, n)), axis=1)
        permuted = reference[perms[:, iu], perms[:, ju]]  # (count, n_pairs): the triangle of P B P^T
        ok_p = ok & np.isfinite(permuted).all(axis=0)
        if ok_p.sum() < 3:
            continue
        exceed += int(np.sum(_spearman_rows(a[ok_p], permuted[:, ok_p]) >= rho - 1e-12))
    return RSA(float(rho), (1 + exceed) / (1 + n_permutations), n_permutations, int(ok.sum()))


def _spearman_rows(x: np.ndarray, ys: np.ndarray) -> np.ndarray:
    """Spearman of vector x with each row of ys."""
    rx = stats.rankdata(x)
    rx = rx - rx.mean()
    ry = stats.rankdata(ys, axis=1)
    ry = ry - ry.mean(axis=1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        return (ry @ rx) / (np.sqrt((ry * ry).sum(axis=1)) * np.sqrt(rx @ rx))


def taxonomy_similarity(concepts: Sequence[str], parents: dict[str, Sequence[str]]) -> np.ndarray:
    """Path similarity 1 / (1 + shortest path length) between concepts in the undirected graph of `parents`
    links (WordNet's path similarity); 0 for concepts in different trees. Parents that are not concepts
    themselves are nodes of the graph too."""
    graph: dict[str, set[str]] = {}
    for child, ps in parents.items():
        for p in ps:
            graph.setdefault(child, set()).add(p)
            graph.setdefault(p, set()).add(child)
    n = len(concepts)
    out = np.eye(n)
    for i, a in enumerate(concepts):
        dist = {a: 0}
        frontier = [a]
        while frontier:
            nxt = []
            for node in frontier:
                for other in graph.get(node, ()):
                    if other not in dist:
                        dist[other] = dist[node] + 1
                        nxt.append(other)
            frontier = nxt
        for j, b in enumerate(concepts):
            if j != i:
                out[i, j] = 1.0 / (1 + dist[b]) if b in dist else 0.0
    return out


def triplet_similarity(n: int, triplets: np.ndarray) -> np.ndarray:
    """A similarity matrix from odd-one-out triplets `(t, 4)` of concept indices (a, b, c, odd): the share of
    triplets holding both i and j in which neither was the odd one (NaN where a pair never shared a triplet)."""
    together = np.zeros((n, n))
    shared = np.zeros((n, n))
    for a, b, c, odd in np.asarray(triplets, dtype=np.int64):
        for x, y in ((a, b), (a, c), (b, c)):
            shared[x, y] += 1
            shared[y, x] += 1
            if odd not in (x, y):
                together[x, y] += 1
                together[y, x] += 1
    with np.errstate(invalid="ignore", divide="ignore"):
        out = together / shared
    np.fill_diagonal(out, 1.0)
    return out


def triplet_accuracy(similarity: np.ndarray, triplets: np.ndarray) -> tuple[float, int]:
    """Share of odd-one-out triplets (a, b, c, odd) where the model's least similar member to the other two --
    the one outside the most similar pair -- is the human's odd one (chance 1/3), and how many were scored
    (triplets whose pairs are all finite)."""
    t = np.asarray(triplets, dtype=np.int64)
    a, b, c, odd = t.T
    pair_sims = np.stack([similarity[b, c], similarity[a, c], similarity[a, b]], axis=1)  # odd = a, b, c
    ok = np.isfinite(pair_sims).all(axis=1)
    if not ok.any():
        return float("nan"), 0
    chosen = np.stack([a, b, c], axis=1)[np.arange(len(t)), np.argmax(pair_sims, axis=1)]
    return float(np.mean(chosen[ok] == odd[ok])), int(ok.sum())


@dataclass(frozen=True)
class HierarchyAUROC:
    """For one parent: AUROC of sim(parent, child) against sim(parent, non-child), and its permutation p."""

    parent: str
    n_children: int
    n_others: int
    auroc: float
    p: float
    n_permutations: int


def hierarchy_auroc(
    similarity: np.ndarray,
    concepts: Sequence[str],
    parents: dict[str, Sequence[str]],
    n_permutations: int,
    rng: np.random.Generator,
) -> list[HierarchyAUROC]:
    """Per parent that is itself a concept with >= 1 child and >= 1 other concept: does the model place its
    children closer to it than the other concepts? p = (1 + #{AUROC with shuffled child labels >= AUROC}) /
    (1 + n_perm) (with few concepts the number of distinct relabellings, not n_perm, bounds p from below)."""
    index = {c: i for i, c in enumerate(concepts)}
    out = []
    for parent in concepts:
        p = index[parent]
        others = [i for i, c in enumerate(concepts) if i != p]
        labels = np.array([parent in parents.get(concepts[i], ()) for i in others])
        sims = similarity[p, others]
        ok = np.isfinite(sims)
        labels, sims = labels[ok], sims[ok]
        if labels.sum() == 0 or labels.sum() == len(labels):
            continue
        auc = _auroc_1d(sims, labels)
        perms = np.array([_auroc_1d(sims, rng.permutation(labels)) for _ in range(n_permutations)])
        pval = (1 + np.sum(perms >= auc - 1e-12)) / (1 + n_permutations)
        out.append(HierarchyAUROC(parent, int(labels.sum()), int((~labels).sum()), auc, float(pval), n_permutations))
    return out


def _auroc_1d(scores: np.ndarray, labels: np.ndarray) -> float:
    ranks = stats.rankdata(scores)
    n_pos = labels.sum()
    n_neg = len(labels) - n_pos
    return float((ranks[labels].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def containment(child_experts: np.ndarray, parent_experts: np.ndarray) -> float:
    """|E(child) ∩ E(parent)| / k, k the size of the child's expert set."""
    c = set(np.asarray(child_experts).tolist())
    return len(c & set(np.asarray(parent_experts).tolist())) / len(c) if c else float("nan")


@dataclass(frozen=True)
class Dendrogram:
    """Average-linkage clustering of concepts on 1 - similarity, and its cophenetic correlation with the
    taxonomy's path distance (Pearson between the two condensed distance vectors)."""

    linkage: np.ndarray
    leaves: list[int]
    cophenetic_r: float


def dendrogram(similarity: np.ndarray, taxonomy: np.ndarray | None = None) -> Dendrogram:
    """Average linkage on `1 - similarity` (NaN taken as unrelated, distance 1)."""
    dist = 1.0 - np.nan_to_num(np.asarray(similarity, dtype=np.float64), nan=0.0)
    dist = (dist + dist.T) / 2
    np.fill_diagonal(dist, 0.0)
    condensed = squareform(np.clip(dist, 0.0, None), checks=False)
    z = hierarchy.linkage(condensed, method="average")
    leaves = hierarchy.leaves_list(z).tolist()
    r = float("nan")
    if taxonomy is not None:
        coph = hierarchy.cophenet(z)
        tax = squareform(1.0 - taxonomy, checks=False)
        if np.std(coph) > 0 and np.std(tax) > 0:
            r = float(np.corrcoef(coph, tax)[0, 1])
    return Dendrogram(z, leaves, r)


@dataclass(frozen=True)
class TwinOverlap:
    """Seed A's experts mapped through their twins into seed B, against B's experts, and the chance of the same
    from k random neurons of A mapped the same way."""

    jaccard: float
    chance_mean: float
    chance_sd: float
    p: float
    n_draws: int


def twin_overlap(
    experts_a: np.ndarray,
    experts_b: np.ndarray,
    twin_of: np.ndarray,
    n_draws: int,
    rng: np.random.Generator,
) -> TwinOverlap:
    """Jaccard of {twin(i) : i in E_A} with E_B; chance from `n_draws` sets of |E_A| random neurons of A mapped
    through the same twin map (many neurons share a twin, so the hypergeometric would misstate it).
    `twin_of[i]` is the flat index in B of A's neuron i's best match (-1 where unknown)."""
    mapped = twin_of[experts_a]
    b = set(np.asarray(experts_b).tolist())  # built once: the draws below compare against it hundreds of times
    observed = _set_jaccard(set(mapped[mapped >= 0].tolist()), b)
    known = np.flatnonzero(twin_of >= 0)
    k = len(experts_a)
    draws = np.empty(n_draws)
    for d in range(n_draws):
        pick = twin_of[rng.choice(known, size=min(k, len(known)), replace=False)]
        draws[d] = _set_jaccard(set(pick.tolist()), b)
    p = (1 + np.sum(draws >= observed)) / (1 + n_draws)
    sd = float(draws.std(ddof=1)) if n_draws > 1 else 0.0
    return TwinOverlap(observed, float(draws.mean()), sd, float(p), n_draws)


def twin_tuning(
    ap_a: np.ndarray,
    ap_b: np.ndarray,
    twin_of: np.ndarray,
    neurons: np.ndarray,
    n_random: int,
    rng: np.random.Generator,
) -> tuple[float, float]:
    """Mean over `neurons` of A of the correlation across concepts between a neuron's AP `(n_concepts,)` in A and
    its twin's in B, and the same for `n_random` random (A, B) neuron pairs (the control)."""

    def mean_corr(ia: np.ndarray, ib: np.ndarray) -> float:
        x = ap_a[:, ia] - ap_a[:, ia].mean(axis=0)
        y = ap_b[:, ib] - ap_b[:, ib].mean(axis=0)
        with np.errstate(invalid="ignore", divide="ignore"):
            r = (x * y).sum(axis=0) / np.sqrt((x * x).sum(axis=0) * (y * y).sum(axis=0))
        return float(np.nanmean(r)) if np.isfinite(r).any() else float("nan")

    neurons = neurons[twin_of[neurons] >= 0]
    twins = mean_corr(neurons, twin_of[neurons]) if len(neurons) else float("nan")
    ra = rng.integers(0, ap_a.shape[1], n_random)
    rb = rng.integers(0, ap_b.shape[1], n_random)
    return twins, mean_corr(ra, rb)


@dataclass(frozen=True)
class Enrichment:
    """Experts x universal neurons: the 2 x 2 table, odds ratio and Fisher's exact p (two-sided)."""

    table: tuple[tuple[int, int], tuple[int, int]]
    odds_ratio: float
    p: float


def expert_universal_enrichment(is_expert: np.ndarray, is_universal: np.ndarray) -> Enrichment:
    """Are experts universal more often than other neurons? Rows expert/not, columns universal/not."""
    e, u = np.asarray(is_expert, bool), np.asarray(is_universal, bool)
    table = ((int(np.sum(e & u)), int(np.sum(e & ~u))), (int(np.sum(~e & u)), int(np.sum(~e & ~u))))
    result = stats.fisher_exact(table)
    return Enrichment(table, float(result.statistic), float(result.pvalue))


def emergence_step(steps: Sequence[int], jaccard_with_last: Sequence[float], level: float = 0.5) -> int | None:
    """The first step from which the Jaccard of the experts with the last step's stays >= `level`."""
    found = None
    for step, j in zip(steps, jaccard_with_last, strict=True):
        holds = bool(np.isfinite(j) and j >= level)
        found = (found if found is not None else step) if holds else None
    return found
