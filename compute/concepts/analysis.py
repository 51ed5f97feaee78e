"""`actdb concept show` and `actdb concept experts`: read a concept set's complete runs (SQL rows and AP
sidecars) and compare them across seeds (through stored correlate twins) and across steps (by neuron index)."""

from __future__ import annotations

import itertools
from collections import defaultdict
from dataclasses import dataclass

import numpy as np
from sqlalchemy import func, select

from actdb.compute.concepts import MANTEL_PERMUTATIONS
from actdb.compute.concepts import math as cm
from actdb.compute.concepts.concept_file import ConceptSet, Reference, load_concept_set, read_reference
from actdb.compute.concepts.run import concept_run_key
from actdb.store.database.connection import Rows, Store
from actdb.store.database.tables import (
    activation_set,
    checkpoint,
    concept_alignment,
    concept_expert,
    concept_run,
    correlation_run,
    model,
    neuron_match,
)
from actdb.store.errors import ActdbError
from actdb.store.files.concept import ConceptArrays, read_concept_arrays


@dataclass
class ScoredRun:
    run_id: int
    set_id: int
    model: str
    step: int
    k: int
    tau: float
    pool: str
    masked: bool
    arrays: ConceptArrays
    hook: str
    n_permutations: int
    seed: int
    request_key: str

    def experts(self, c: int) -> np.ndarray:
        return cm.top_k(self.arrays.ap[c], self.k)

    def similarity(self, kind: str = "spearman", layer: int | None = None) -> np.ndarray:
        """Concept x concept: Spearman of the AP vectors over all neurons (or one layer's), or Jaccard of the
        top-k expert sets (of that layer's neurons when `layer` is given)."""
        ap = self.arrays.ap
        if layer is not None:
            if not 0 <= layer < self.arrays.n_layers:
                raise ActdbError(f"layer {layer} does not exist ({self.arrays.n_layers} layers)")
            d = self.arrays.d_mlp
            ap = ap[:, layer * d : (layer + 1) * d]
        if kind == "jaccard":
            return cm.jaccard_matrix([cm.top_k(row, self.k) for row in ap])
        if kind != "spearman":
            raise ActdbError(f"unknown similarity {kind!r}; use spearman or jaccard")
        return cm.spearman_matrix(ap)


def complete_runs(store: Store, name: str, pool: str | None = None, mask: bool | None = None) -> list[ScoredRun]:
    """The newest complete run of each activation set, pool and mask on concept set `name` (optionally of one
    pool / mask)."""
    set_id, _concepts = load_concept_set(store, name)
    cr = concept_run.c
    q = (
        select(
            cr.id,
            cr.set_id,
            cr.k,
            cr.tau,
            cr.pool,
            cr.mask_concept_token,
            cr.path,
            cr.hook,
            cr.n_permutations,
            cr.seed,
            cr.request_key,
            model.c.name,
            checkpoint.c.step,
        )
        .join(activation_set, activation_set.c.id == cr.set_id)
        .join(checkpoint, checkpoint.c.id == activation_set.c.checkpoint_id)
        .join(model, model.c.id == checkpoint.c.model_id)
        .where(cr.concept_set_id == set_id, cr.status == "complete")
        .order_by(cr.id.desc())
    )
    if pool is not None:
        q = q.where(cr.pool == pool)
    if mask is not None:
        q = q.where(cr.mask_concept_token == mask)
    seen, out = set(), []
    for run in store.query(q):
        if (run["set_id"], run["pool"], run["mask_concept_token"]) in seen:
            continue
        seen.add((run["set_id"], run["pool"], run["mask_concept_token"]))
        arrays = read_concept_arrays(store.config.file(run["path"]))
        out.append(
            ScoredRun(
                run["id"],
                run["set_id"],
                run["name"],
                run["step"],
                run["k"],
                run["tau"],
                run["pool"],
                bool(run["mask_concept_token"]),
                arrays,
                run["hook"],
                run["n_permutations"],
                run["seed"],
                run["request_key"],
            )
        )
    if not out:
        raise ActdbError(f"concept set {name!r} has no complete runs; run `actdb concept run {name} --sets ...`")
    return sorted(out, key=lambda r: (r.step, r.model, r.pool, r.masked))


def twin_map(store: Store, set_a: int, set_b: int, n_neurons: int, d_mlp: int) -> np.ndarray | None:
    """Flat index in B of each neuron of A's best match, from the newest complete correlation run holding both
    (-1 where none); None when no run matched them."""
    m = neuron_match.c
    with store.transaction() as conn:
        run_id = conn.execute(
            select(func.max(m.run_id))
            .join(correlation_run, correlation_run.c.id == m.run_id)
            .where(m.set_id == set_a, m.other_set_id == set_b, correlation_run.c.status == "complete")
        ).scalar()
        if run_id is None:
            return None
        rows = conn.execute(
            select(m.layer, m.neuron, m.best_layer, m.best_neuron).where(
                m.run_id == run_id, m.set_id == set_a, m.other_set_id == set_b
            )
        ).all()
    out = np.full(n_neurons, -1, dtype=np.int64)
    for layer, neuron, bl, bn in rows:
        if bl is not None and bn is not None:
            out[layer * d_mlp + neuron] = bl * d_mlp + bn
    return out


def _expert_universal(store: Store, run: ScoredRun, n_concepts: int) -> cm.Enrichment | None:
    """Experts (any concept's top-k) x universal neurons (newest cross-model run, none control, its threshold)."""
    from actdb.store.database.labels import latest_universality_run, universal_neurons_of

    found = latest_universality_run(store, run.set_id, "none")
    if found is None:
        return None
    n = run.arrays.ap.shape[1]
    d = run.arrays.d_mlp
    universal = np.zeros(n, dtype=bool)
    for layer, neuron in universal_neurons_of(store, found[0], run.set_id, found[1]):
        universal[layer * d + neuron] = True
    expert = np.zeros(n, dtype=bool)
    for c in range(n_concepts):
        expert[run.experts(c)] = True
    return cm.expert_universal_enrichment(expert, universal)


def stored_alignment(store: Store, runs: list[ScoredRun]) -> dict[int, dict[str, cm.RSA]]:
    """Each run's RSA tests as `concept run` stored them (`v_concept_alignment`), by run id and reference name."""
    a = concept_alignment.c
    ids = [r.run_id for r in runs]
    rows = store.query(select(a.run_id, a.reference, a.rho, a.p, a.n_permutations, a.n_pairs).where(a.run_id.in_(ids)))
    out: dict[int, dict[str, cm.RSA]] = defaultdict(dict)
    for row in rows:
        rho, p = (float("nan") if v is None else v for v in (row["rho"], row["p"]))
        out[row["run_id"]][row["reference"]] = cm.RSA(rho, p, row["n_permutations"], row["n_pairs"])
    return out


def _scored_with(run: ScoredRun, concepts: ConceptSet, reference: Reference, test: cm.RSA) -> bool:
    """Whether `run` was scored against this very reference (name and content): its request key says so."""
    key = concept_run_key(
        concepts,
        run.set_id,
        run.hook,
        run.pool,
        run.masked,
        run.k,
        run.tau,
        run.n_permutations,
        test.n_permutations,
        run.seed,
        reference,
    )
    return key == run.request_key


def _mean(values: list[float]) -> float | None:
    finite = [v for v in values if v is not None and np.isfinite(v)]
    return float(np.mean(finite)) if finite else None


def concept_table(
    store: Store,
    name: str,
    *,
    human: str | None = None,
    pool: str = "max",
    mask: bool = False,
    draws: int = 200,
    mantel_permutations: int | None = None,
    seed: int = 0,
    similarity: str = "spearman",
    layer: int | None = None,
) -> tuple[Rows, Rows]:
    """The per-step table and the per-model emergence rows (first step from which the Jaccard of the experts with
    the last step's stays >= 0.5). Per step, means over the models (ordered pairs for cross-seed columns):
    concepts, best AP, experts above tau; twin overlap (Jaccard of A's experts' twins with B's experts) and its
    chance from `draws` random k-sets; twin tuning (correlation over concepts of an expert's AP with its twin's)
    and the same for 1000 random neuron pairs; experts x universal neurons odds ratio (and the largest Fisher p);
    seed-seed RSA; taxonomy and human RSA, each with the largest Mantel p over the models and the fewest
    permutations behind those p (so p >= 1 / (1 + it)); hierarchy AUROC; containment
    |E(child) ∩ E(parent)| / k over parent-child pairs; the average-linkage dendrogram's cophenetic correlation
    with the taxonomy; Jaccard of the experts with the last step. `similarity` (spearman or jaccard) and `layer`
    choose the concept x concept matrix the RSA and hierarchy columns use.

    The Mantel tests are the ones `concept run` stored (`v_concept_alignment`), so both report one p, wherever
    they apply: the Spearman matrix over every layer, and for `human` a run scored with that same reference.
    Elsewhere, or for every run when `mantel_permutations` is given, the test is run here with
    `mantel_permutations` (default MANTEL_PERMUTATIONS, `concept run`'s own default) permutations."""
    _id, concepts = load_concept_set(store, name)
    runs = complete_runs(store, name, pool, mask)
    names = concepts.names
    reference = read_reference(human, names) if human else None
    taxonomy = cm.taxonomy_similarity(names, concepts.parents)
    rng = np.random.default_rng(seed)
    mantel_rng = np.random.default_rng([seed, 1])  # own stream: the chance columns don't depend on stored tests
    run_tested_this_matrix = similarity == "spearman" and layer is None
    stored = stored_alignment(store, runs) if mantel_permutations is None and run_tested_this_matrix else {}
    fresh = MANTEL_PERMUTATIONS if mantel_permutations is None else mantel_permutations

    def mantel(run: ScoredRun, own: np.ndarray, target: np.ndarray, human_reference: Reference | None) -> cm.RSA:
        """RSA of the run's concept x concept matrix `own` with `target` (the taxonomy or the human reference)."""
        test = stored.get(run.run_id, {}).get("taxonomy" if human_reference is None else human_reference.name)
        if test is not None and (human_reference is None or _scored_with(run, concepts, human_reference, test)):
            return test
        return cm.rsa(own, target, fresh, mantel_rng)

    by_model: dict[str, list[ScoredRun]] = defaultdict(list)
    for r in runs:
        by_model[r.model].append(r)
    last = {m: rs[-1] for m, rs in by_model.items()}
    jaccard_last: dict[int, float] = {}
    for m, rs in by_model.items():
        for r in rs:
            jaccard_last[r.run_id] = float(
                np.mean([cm.jaccard(r.experts(c), last[m].experts(c)) for c in range(len(names))])
            )
    rows = []
    for step in sorted({r.step for r in runs}):
        at = [r for r in runs if r.step == step]
        sims = {r.run_id: r.similarity(similarity, layer) for r in at}
        tax = [mantel(r, sims[r.run_id], taxonomy, None) for r in at] if len(names) >= 3 else []
        hum = (
            [mantel(r, sims[r.run_id], reference.similarity, reference) for r in at]
            if reference is not None and len(names) >= 3
            else []
        )
        hier = [h.auroc for r in at for h in cm.hierarchy_auroc(sims[r.run_id], names, concepts.parents, 200, rng)]
        cophenetic = [cm.dendrogram(sims[r.run_id], taxonomy).cophenetic_r for r in at] if len(names) >= 3 else []
        contained = [
            cm.containment(r.experts(names.index(child)), r.experts(names.index(parent)))
            for r in at
            for child in names
            for parent in concepts.parents.get(child, ())
            if parent in names
        ]
        seed_rsa = [cm.rsa(sims[a.run_id], sims[b.run_id], 0, rng).rho for a, b in itertools.combinations(at, 2)]
        overlap, chance, tuning, random_tuning = [], [], [], []
        for a, b in itertools.permutations(at, 2):
            twins = twin_map(store, a.set_id, b.set_id, a.arrays.ap.shape[1], a.arrays.d_mlp)
            if twins is None:
                continue
            for c in range(len(names)):
                o = cm.twin_overlap(a.experts(c), b.experts(c), twins, draws, rng)
                overlap.append(o.jaccard)
                chance.append(o.chance_mean)
            union = np.unique(np.concatenate([a.experts(c) for c in range(len(names))]))
            t, rnd = cm.twin_tuning(a.arrays.ap, b.arrays.ap, twins, union, 1000, rng)
            tuning.append(t)
            random_tuning.append(rnd)
        odds, fisher_p = [], []
        for r in at:
            enrichment = _expert_universal(store, r, len(names))
            if enrichment is not None:
                odds.append(enrichment.odds_ratio)
                fisher_p.append(enrichment.p)
        rows.append(
            (
                step,
                len(at),
                len(names),
                _mean([float(r.arrays.ap[c].max()) for r in at for c in range(len(names))]),
                _mean([float(np.sum(r.arrays.ap[c] > r.tau)) for r in at for c in range(len(names))]),
                _mean(overlap),
                _mean(chance),
                _mean(tuning),
                _mean(random_tuning),
                _mean(odds),
                max(fisher_p, default=None),
                _mean(seed_rsa),
                _mean([t.rho for t in tax]),
                max((t.p for t in tax if np.isfinite(t.p)), default=None),
                min((t.n_permutations for t in tax if np.isfinite(t.p)), default=None),
                _mean([h.rho for h in hum]),
                max((h.p for h in hum if np.isfinite(h.p)), default=None),
                min((h.n_permutations for h in hum if np.isfinite(h.p)), default=None),
                _mean(hier),
                _mean(contained),
                _mean(cophenetic),
                _mean([jaccard_last[r.run_id] for r in at]),
            )
        )
    table = Rows.from_tuples(
        [
            "step",
            "models",
            "concepts",
            "mean_best_ap",
            "experts_above_tau",
            "twin_jaccard",
            "twin_chance",
            "twin_tuning",
            "random_tuning",
            "expert_universal_or",
            "fisher_p_max",
            "seed_seed_rsa",
            "taxonomy_rsa",
            "taxonomy_p_max",
            "taxonomy_permutations",
            "human_rsa",
            "human_p_max",
            "human_permutations",
            "hierarchy_auroc",
            "containment",
            "cophenetic_r",
            "jaccard_with_last",
        ],
        rows,
    )
    emergence = []
    for m, rs in sorted(by_model.items()):
        steps = [r.step for r in rs]
        emergence.append((m, steps[-1], cm.emergence_step(steps, [jaccard_last[r.run_id] for r in rs])))
    return table, Rows.from_tuples(["model", "last_step", "emergence_step"], emergence)


def concept_experts(store: Store, name: str, concept: str, model: str | None = None, step: int | None = None) -> Rows:
    """The top-k experts of one concept in each complete run (optionally one model / step), with each neuron's
    newest universality score (excess correlation), its family when explained, and its twins in the other
    models' sets at the same step (from the newest correlation run holding both)."""
    _id, concepts = load_concept_set(store, name)
    c = concepts.position(concept, name)
    every = complete_runs(store, name)
    runs = [r for r in every if (model is None or r.model == model) and (step is None or r.step == step)]
    if not runs:
        raise ActdbError(f"no complete run of {name!r} for {model or 'any model'} at step {step}")
    from actdb.store.database.views import v_neuron_explanations, v_universality

    out = []
    for r in runs:
        with store.transaction() as s:
            ce = concept_expert.c
            experts = s.execute(
                select(ce.rank, ce.layer, ce.neuron, ce.ap, ce.auroc)
                .where(ce.run_id == r.run_id, ce.concept == concept)
                .order_by(ce.rank)
            ).all()
            universality = {
                (u.layer, u.neuron): u.excess_corr
                for u in s.execute(
                    select(v_universality.c.layer, v_universality.c.neuron, v_universality.c.excess_corr)
                    .where(v_universality.c.set_id == r.set_id)
                    .order_by(v_universality.c.run_id)
                )
            }
            family = {
                (e.layer, e.neuron): e.family
                for e in s.execute(
                    select(
                        v_neuron_explanations.c.layer, v_neuron_explanations.c.neuron, v_neuron_explanations.c.family
                    ).where(v_neuron_explanations.c.set_id == r.set_id)
                )
            }
        twins = []
        for other in every:
            if other.step == r.step and other.model != r.model:
                t = twin_map(store, r.set_id, other.set_id, r.arrays.ap.shape[1], r.arrays.d_mlp)
                if t is not None:
                    twins.append((other, t))
        d = r.arrays.d_mlp
        for e in experts:
            flat = e.layer * d + e.neuron
            twin_text = []
            for other, t in twins:
                if (other.pool, other.masked) != (r.pool, r.masked):
                    continue
                if t[flat] >= 0:
                    tl, tn = divmod(int(t[flat]), d)
                    twin_text.append(f"{other.model}:{tl}.{tn} (AP {other.arrays.ap[c, t[flat]]:.3f})")
            out.append(
                (
                    r.model,
                    r.step,
                    r.pool,
                    r.masked,
                    e.rank,
                    e.layer,
                    e.neuron,
                    e.ap,
                    e.auroc,
                    universality.get((e.layer, e.neuron)),
                    family.get((e.layer, e.neuron)),
                    "; ".join(twin_text) or None,
                )
            )
    return Rows.from_tuples(
        ["model", "step", "pool", "masked", "rank", "layer", "neuron", "ap", "auroc", "excess_corr", "family", "twins"],
        out,
    )


def similarity_matrices(store: Store, name: str) -> tuple[ConceptSet, list[ScoredRun]]:
    """The concept set and its newest complete runs (for the report's heatmaps and dendrograms)."""
    _id, concepts = load_concept_set(store, name)
    return concepts, complete_runs(store, name)
