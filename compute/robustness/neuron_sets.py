"""Internal interventions that mean the same thing in every seed: a rule chooses each seed's own neuron set.

Rules: `universal` (each seed's universal neurons), `family:NAME` (those of one explanation family),
`experts:CONCEPT` (the concept's expert neurons from each seed's newest concept run), `twins:MODEL`
(MODEL's universal neurons and, in every other seed, each one's best-matching neuron there), or an explicit
`L.N,...` list (the same indices in every seed). For `universal`, `family:` and `experts:` every seed keeps, per
layer, as many neurons as the seed with the fewest there (its highest-scoring ones: excess correlation, or AP),
so set sizes per layer are equal across seeds.
Matched random controls draw, per seed and layer, unselected neurons of the same activation-frequency decile.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from sqlalchemy import select

from actdb.store.database import tables
from actdb.store.database.connection import Store
from actdb.store.database.labels import latest_universality_run, universal_condition
from actdb.store.database.views import v_neuron_explanations, v_universality
from actdb.store.errors import ActdbError
from actdb.store.refs import Neuron, parse_neuron_list

N_FREQUENCY_BINS = 10


@dataclass(frozen=True)
class SeedSet:
    """What an ablation rule needs of one seed's activation set at one step."""

    model: str
    step: int
    set_id: int
    means: dict[Neuron, float]
    frac_active: dict[Neuron, float]


def rule_sets(store: Store, rule: str, seeds: list[SeedSet], threshold: float | None) -> list[list[Neuron]]:
    """Each seed's neuron set under `rule`, or a one-line error naming a seed it selects nothing in."""
    kind, _, arg = rule.partition(":")
    if kind == "universal" and not arg:
        chosen = _equal_per_layer([_universal(store, s, threshold) for s in seeds])
    elif kind == "family" and arg:
        picked = []
        for s in seeds:
            fam = _family_of(store, s.set_id, arg)
            picked.append([(n, score) for n, score in _universal(store, s, threshold) if n in fam])
        chosen = _equal_per_layer(picked)
    elif kind == "experts" and arg:
        chosen = _equal_per_layer([_experts(store, s, arg) for s in seeds])
    elif kind == "twins" and arg:
        chosen = _twins(store, seeds, arg, threshold)
    elif kind and kind[0].isdigit():
        chosen = [parse_neuron_list(rule)] * len(seeds)
    else:
        raise ActdbError(
            f"unknown ablation rule {rule!r}; use universal, family:NAME, experts:CONCEPT, twins:MODEL or L.N,..."
        )
    for s, neurons in zip(seeds, chosen, strict=True):
        if not neurons:
            raise ActdbError(f"ablation rule {rule!r} selects no neuron in {s.model}@{s.step}")
    return chosen


def _universal(store: Store, seed: SeedSet, threshold: float | None) -> list[tuple[Neuron, float]]:
    """The seed's universal neurons (newest cross-model run scoring its set) with their excess correlation."""
    found = latest_universality_run(store, seed.set_id, "none")
    if found is None:
        raise ActdbError(f"no correlation run has scored {seed.model} (set {seed.set_id}); run `actdb correlate`")
    run_id, recorded = found
    v = v_universality
    rows = store.query(
        select(v.c.layer, v.c.neuron, v.c.excess_corr)
        .where(
            v.c.run_id == run_id,
            v.c.set_id == seed.set_id,
            universal_condition(recorded if threshold is None else threshold),
        )
        .order_by(v.c.layer, v.c.neuron)
    )
    return [((r.layer, r.neuron), float(r.excess_corr)) for r in rows]


def _experts(store: Store, seed: SeedSet, concept: str) -> list[tuple[Neuron, float]]:
    """The concept's top-k expert neurons (by AP) in the newest complete concept run over the seed's set."""
    runs, experts = tables.concept_run, tables.concept_expert
    newest = store.scalar(
        select(runs.c.id)
        .where(runs.c.set_id == seed.set_id, runs.c.status == "complete")
        .order_by(runs.c.id.desc())
        .limit(1)
    )
    if newest is None:
        raise ActdbError(f"no concept run has scored {seed.model}@{seed.step}; run `actdb concept run` first")
    rows = store.query(
        select(experts.c.layer, experts.c.neuron, experts.c.ap).where(
            experts.c.run_id == newest, experts.c.concept == concept
        )
    )
    return [((r.layer, r.neuron), float(r.ap)) for r in rows]


def _family_of(store: Store, set_id: int, family: str) -> set[Neuron]:
    v = v_neuron_explanations
    rows = store.query(select(v.c.layer, v.c.neuron).where(v.c.set_id == set_id, v.c.family == family))
    return {(r.layer, r.neuron) for r in rows}


def _equal_per_layer(scored: list[list[tuple[Neuron, float]]]) -> list[list[Neuron]]:
    """Per layer, every seed keeps its `m` highest-scoring neurons, `m` the smallest count any seed has there."""
    layers = sorted({n[0] for seed in scored for n, _ in seed})
    out: list[list[Neuron]] = [[] for _ in scored]
    for layer in layers:
        per_seed = [sorted((x for x in seed if x[0][0] == layer), key=lambda x: (-x[1], x[0])) for seed in scored]
        m = min(len(p) for p in per_seed)
        for k, p in enumerate(per_seed):
            out[k] += [n for n, _ in p[:m]]
    return [sorted(s) for s in out]


def _twins(store: Store, seeds: list[SeedSet], model: str, threshold: float | None) -> list[list[Neuron]]:
    """MODEL's universal neurons, and in each other seed the neuron each one correlates with best there (from the
    same cross-model run), duplicates kept once."""
    anchor = next((s for s in seeds if s.model == model), None)
    if anchor is None:
        raise ActdbError(f"twins:{model}: {model} is not one of the seeds ({', '.join(s.model for s in seeds)})")
    own = [n for n, _ in _universal(store, anchor, threshold)]
    run_id, _ = latest_universality_run(store, anchor.set_id, "none")
    m = tables.neuron_match
    out = []
    for s in seeds:
        if s is anchor:
            out.append(own)
            continue
        rows = store.query(
            select(m.c.layer, m.c.neuron, m.c.best_layer, m.c.best_neuron).where(
                m.c.run_id == run_id, m.c.set_id == anchor.set_id, m.c.other_set_id == s.set_id
            )
        )
        best = {(r.layer, r.neuron): (r.best_layer, r.best_neuron) for r in rows}
        out.append(sorted({best[n] for n in own if n in best and best[n][0] is not None}))
    return out


def matched_frequency_controls(
    neurons: list[Neuron], frac_active: dict[Neuron, float], d_mlp: int, k: int, rng: np.random.Generator
) -> list[list[Neuron]]:
    """K random sets with the same count per layer as `neurons`, none of them selected, each drawn neuron from
    the selected one's activation-frequency decile within its layer (the nearest deciles when that one is used up)."""
    by_layer: dict[int, list[int]] = {}
    for layer, n in neurons:
        by_layer.setdefault(layer, []).append(n)
    deciles = {}
    for layer in by_layer:
        freq = np.array([frac_active.get((layer, n), 0.0) for n in range(d_mlp)])
        rank = np.empty(d_mlp, dtype=np.int64)
        rank[np.lexsort((np.arange(d_mlp), freq))] = np.arange(d_mlp)
        deciles[layer] = rank * N_FREQUENCY_BINS // d_mlp
    out = []
    for _ in range(k):
        draw: list[Neuron] = []
        for layer, chosen in sorted(by_layer.items()):
            free = np.ones(d_mlp, dtype=bool)
            free[chosen] = False
            if free.sum() < len(chosen):
                raise ActdbError(f"layer {layer} has too few unselected neurons for a matched random set")
            decile = deciles[layer]
            for n in chosen:
                # the nearest decile (distance 0 first) that still has an unselected, undrawn neuron
                distance = np.where(free, np.abs(decile - decile[n]), N_FREQUENCY_BINS)
                pick = int(rng.choice(np.flatnonzero(distance == distance.min())))
                free[pick] = False
                draw.append((layer, pick))
        out.append(sorted(draw))
    return out
