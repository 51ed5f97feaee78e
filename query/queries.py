"""Canned analyst queries: SQLAlchemy Core SELECTs over the analyst views, returning rows addressed by column
name (`Rows`) for the CLI, the Python API and the report.

Unless a run is named, every activation set is read from the complete cross-model correlation run with the
requested control that compared it with the most models, the newest among equals (`newest_runs`, the rule of the
`v_canonical_*` views), and "universal" means `excess_corr > threshold` with the reader's threshold or each run's
recorded one (`actdb.store.database.labels`). Reads take one hook (`mlp.post` or `mlp.pre`): the one asked for,
or the only one present (`registry.resolve_hook`).
"""

from __future__ import annotations

import json

from sqlalchemy import Float, RowMapping, Select, Table, and_, case, cast, func, literal, select, true

from actdb.store.database import tables
from actdb.store.database.connection import Rows, Store
from actdb.store.database.labels import (
    newest_run_listing,
    newest_runs,
    on_newest,
    require_run,
    stability_at,
    universal_condition,
)
from actdb.store.database.registry import get_checkpoint, get_model, resolve_hook
from actdb.store.database.views import (
    v_ablation_summary,
    v_neuron_history,
    v_neuron_matches,
    v_persistence,
    v_similarity,
    v_universality,
)
from actdb.store.errors import ActdbError
from actdb.store.refs import check_threshold

v = v_universality
UNIVERSAL_COLUMNS = [
    "model",
    "step",
    "dataset",
    "hook",
    "layer",
    "neuron",
    "excess_corr",
    "stability",
    "z",
    "z_pooled",
    "mean_max_corr",
    "min_max_corr",
    "mean_baseline",
    "baseline_sd",
    "n_draws",
    "act_mean",
    "act_std",
    "act_skew",
    "act_kurtosis",
    "act_frac_active",
    "run_id",
]
SORTS = {
    "excess": [v.c.excess_corr.desc().nulls_last()],
    "layer": [],
    "max_corr": [v.c.mean_max_corr.desc().nulls_last()],
    "kurtosis": [v.c.act_kurtosis.desc().nulls_last()],
}


def _threshold_column(threshold: float | None):
    """The threshold that labels each row: the reader's, or the run's recorded one."""
    return (v.c.threshold if threshold is None else literal(threshold, Float)).label("threshold")


def _scoped(
    store: Store,
    query: Select,
    control: str,
    model: str | None,
    step: int | None,
    run: int | None,
    hook: str | None = None,
) -> Select:
    """Restrict a query over v_universality to each set's newest run (or one run), the given model/step and one
    hook (the given one, or the only one present); a scope with no runs is a one-line error naming the command
    that produces them."""
    if model is not None:
        with store.transaction() as conn:
            get_model(conn, model)
    if run is not None:
        require_run(store, run, "cross_model")
    hook = resolve_hook(store, hook, model, step, run=run)
    newest = newest_runs(control, run)
    found = newest_run_listing(newest)
    if model is not None:
        found = found.where(tables.model.c.name == model)
    if step is not None:
        found = found.where(tables.checkpoint.c.step == step)
    if hook is not None:
        found = found.where(tables.activation_set.c.hook == hook)
    if not store.query(found.limit(1)):
        if run is not None:
            target = f"{model}@{step}" if model and step is not None else model or f"anything at step {step}"
            raise ActdbError(f"run {run} did not score {target}")
        what = "a cross-model correlation run"
        what += f" ({control} control)" if control != "none" else ""
        scope = f" for {model}" + (f"@{step}" if step is not None else "") if model else ""
        scope += f" at hook {hook}" if hook is not None else ""
        flag = " --control token" if control == "token" else ""
        flag += f" --hook {hook}" if hook is not None and hook != "mlp.post" else ""
        raise ActdbError(
            f"no universality results{scope}: {what} is missing; produce it with `actdb correlate "
            f"--dataset D --step N --models A,B,...`{flag}"
        )
    query = query.join(newest, on_newest(v, newest))
    if model is not None:
        query = query.where(v.c.model == model)
    if step is not None:
        query = query.where(v.c.step == step)
    if hook is not None:
        query = query.where(v.c.hook == hook)
    return query


def _check_layer(store: Store, layer: int, model: str | None) -> None:
    """A layer filter must name a layer that exists: of `model`, or of some model in the store (an empty listing
    would read as "no universal neurons there")."""
    m = tables.model
    found = select(m.c.name, m.c.n_layers).order_by(m.c.n_layers.desc(), m.c.name)
    if model is not None:
        found = found.where(m.c.name == model)
    deepest = store.query(found.limit(1)).first()
    if deepest is not None and layer >= deepest.n_layers:
        whose = f"{model} has" if model is not None else f"the deepest model ({deepest.name}) has"
        raise ActdbError(f"layer {layer} does not exist: {whose} {deepest.n_layers} layers (0..{deepest.n_layers - 1})")


def universal_neurons(
    store: Store,
    *,
    model: str | None = None,
    step: int | None = None,
    layer: int | None = None,
    run: int | None = None,
    threshold: float | None = None,
    control: str = "none",
    sort: str = "excess",
    limit: int | None = None,
    min_stability: float | None = None,
    hook: str | None = None,
) -> Rows:
    """Universal neurons with their scores, their stability across baseline draws (at the same threshold as
    the label), activation statistics, and the threshold that labelled them."""
    check_threshold(threshold)
    if min_stability is not None and not 0.0 <= min_stability <= 1.0:
        raise ActdbError(f"--min-stability {min_stability} is not a share in [0, 1]")
    query = select(*(v.c[c] for c in UNIVERSAL_COLUMNS), _threshold_column(threshold), v.c.excess_draws).where(
        universal_condition(threshold)
    )
    query = _scoped(store, query, control, model, step, run, hook)
    if layer is not None:
        _check_layer(store, layer, model)
        query = query.where(v.c.layer == layer)
    query = query.order_by(*SORTS[sort], v.c.model, v.c.step, v.c.layer, v.c.neuron)
    restamp = threshold is not None  # the stored stability is relative to each run's recorded threshold
    if min_stability is not None and not restamp:
        query = query.where(v.c.stability >= min_stability)
    if limit and not (restamp and min_stability is not None):
        query = query.limit(limit)
    rows = []
    for r in store.query(query):
        row = dict(r)
        draws = row.pop("excess_draws")
        if restamp:
            row["stability"] = stability_at(draws, threshold)
            if min_stability is not None and (row["stability"] or 0.0) < min_stability:
                continue
        rows.append(row)
    return Rows([*UNIVERSAL_COLUMNS, "threshold"], rows[:limit] if limit else rows)


def universal_by_layer(
    store: Store,
    *,
    model: str | None = None,
    step: int | None = None,
    layer: int | None = None,
    run: int | None = None,
    threshold: float | None = None,
    control: str = "none",
    hook: str | None = None,
) -> Rows:
    """Per layer counts and percentages of universal neurons (as `v_universal_by_layer`, at any threshold)."""
    check_threshold(threshold)
    is_u = case((universal_condition(threshold), 1), else_=0)
    label = _threshold_column(threshold)
    query = select(
        v.c.model,
        v.c.step,
        v.c.dataset,
        v.c.hook,
        v.c.layer,
        func.count().label("n_neurons"),
        func.sum(is_u).label("n_universal"),
        func.sum(case((v.c.is_dead.is_(True), 1), else_=0)).label("n_dead"),
        (cast(100.0 * func.sum(is_u), Float) / func.count()).label("pct_universal"),
        func.avg(v.c.mean_max_corr).label("mean_max_corr"),
        func.avg(v.c.mean_baseline).label("mean_baseline"),
        v.c.run_id,
        label,
    )
    query = _scoped(store, query, control, model, step, run, hook)
    if layer is not None:
        _check_layer(store, layer, model)
        query = query.where(v.c.layer == layer)
    query = query.group_by(v.c.model, v.c.step, v.c.dataset, v.c.hook, v.c.layer, v.c.run_id, v.c.threshold)
    return store.query(query.order_by(v.c.model, v.c.step, v.c.layer))


def max_corr_by_step(store: Store, control: str = "none", hook: str | None = None) -> Rows:
    """(step, mean_max_corr, mean_baseline, excess_corr, the run's threshold) of every live neuron in each set's
    newest cross-model run."""
    query = select(v.c.step, v.c.mean_max_corr, v.c.mean_baseline, v.c.excess_corr, v.c.threshold).where(
        v.c.is_dead.is_(False)
    )
    return store.query(_scoped(store, query, control, None, None, None, hook))


def hooks_present(store: Store) -> list[str]:
    """The hooks of the store's complete activation sets, sorted (`mlp.post` first)."""
    rows = store.query(
        select(tables.activation_set.c.hook).distinct().where(tables.activation_set.c.status == "complete")
    )
    return sorted(rows.column("hook"), key=lambda h: (h != "mlp.post", h))


MATCH_COLUMNS = (
    "run_id control hook other_model other_step other_hook max_corr best_layer best_neuron baseline_max_corr "
    "baseline_sd self_corr"
)
STORY_UNIVERSALITY = (
    "run_id control hook threshold excess_corr stability z z_pooled mean_max_corr min_max_corr mean_baseline "
    "baseline_sd "
    "n_draws is_universal is_dead"
)
STORY_ABLATION = "ablation_id method selector threshold n_neurons tokens delta control_mean p_value p_floor"
HISTORY_COLUMNS = "step hook control threshold run_id excess_corr stability mean_max_corr is_universal emergence_step"


def _cols(view: Table, names: str) -> list:
    return [view.c[name] for name in names.split()]


def checkpoint_shape(store: Store, model: str, step: int) -> RowMapping | None:
    """(n_layers, d_mlp) of MODEL@STEP as a row, or None when the store has no such checkpoint."""
    return store.query(
        select(tables.model.c.n_layers, tables.model.c.d_mlp)
        .join(tables.checkpoint, tables.checkpoint.c.model_id == tables.model.c.id)
        .where(tables.model.c.name == model, tables.checkpoint.c.step == step)
    ).first()


def check_neuron(store: Store, model: str, step: int, layer: int, neuron: int) -> None:
    """MODEL@STEP must be a checkpoint of the store and LAYER.NEURON one of its neurons, else a one-line error
    (an empty answer would read as "nothing known about it")."""
    shape = checkpoint_shape(store, model, step)
    if shape is None:
        raise ActdbError(f"unknown checkpoint {model}@{step}; see `actdb status`")
    if not (0 <= layer < shape.n_layers and 0 <= neuron < shape.d_mlp):
        raise ActdbError(
            f"neuron {layer}.{neuron} does not exist ({model} has {shape.n_layers} layers x {shape.d_mlp} neurons)"
        )


def check_scope(store: Store, model: str | None = None, step: int | None = None) -> None:
    """A model and step filter must name what the store has, else a one-line error listing what it has (an
    unknown name would read as "no results")."""
    with store.transaction() as conn:
        if model is not None and step is not None:
            get_checkpoint(conn, model, step)
        elif model is not None:
            get_model(conn, model)
        elif step is not None:
            steps = list(conn.scalars(select(tables.checkpoint.c.step).distinct().order_by(tables.checkpoint.c.step)))
            if step not in steps:
                raise ActdbError(f"no checkpoint at step {step} (steps: {', '.join(map(str, steps)) or 'none'})")


def neuron_story(
    store: Store, model: str, step: int, layer: int, neuron: int, hook: str | None = None
) -> dict[str, Rows]:
    """Everything known about one neuron at one hook (the given one, or the only one of MODEL@STEP): statistics,
    matches, universality, history, ablations."""
    check_neuron(store, model, step, layer, neuron)
    hook = resolve_hook(store, hook, model, step)
    m, h = v_neuron_matches, v_neuron_history
    here = and_(m.c.model == model, m.c.step == step, m.c.layer == layer, m.c.neuron == neuron)
    at_hook = {
        "statistics": tables.activation_set.c.hook == hook,
        "matches": m.c.hook == hook,
        "universality": v.c.hook == hook,
        "history": h.c.hook == hook,
    }
    if hook is None:  # no complete set: nothing to restrict
        at_hook = dict.fromkeys(at_hook, true())
    stats = (
        select(
            tables.dataset.c.name.label("dataset"),
            tables.activation_set.c.hook,
            *(
                tables.neuron_stat.c[c]
                for c in ("count", "mean", "std", "skew", "kurtosis", "frac_active", "min", "max")
            ),
        )
        .join(tables.activation_set, tables.activation_set.c.id == tables.neuron_stat.c.set_id)
        .join(tables.checkpoint, tables.checkpoint.c.id == tables.activation_set.c.checkpoint_id)
        .join(tables.model, tables.model.c.id == tables.checkpoint.c.model_id)
        .join(tables.dataset, tables.dataset.c.id == tables.activation_set.c.dataset_id)
        .where(
            tables.model.c.name == model,
            tables.checkpoint.c.step == step,
            tables.neuron_stat.c.layer == layer,
            tables.neuron_stat.c.neuron == neuron,
        )
        .where(at_hook["statistics"])
    )
    a = v_ablation_summary
    return {
        "statistics": store.query(stats),
        "matches": store.query(
            select(*_cols(m, MATCH_COLUMNS))
            .where(here, at_hook["matches"])
            .order_by(m.c.run_id.desc(), m.c.other_model, m.c.other_step)
        ),
        "universality": store.query(
            select(*_cols(v, STORY_UNIVERSALITY))
            .where(v.c.model == model, v.c.step == step, v.c.layer == layer, v.c.neuron == neuron)
            .where(at_hook["universality"])
            .order_by(v.c.run_id.desc())
        ),
        "history": store.query(
            select(*_cols(h, HISTORY_COLUMNS))
            .where(h.c.model == model, h.c.layer == layer, h.c.neuron == neuron, at_hook["history"])
            .order_by(h.c.control, h.c.step, h.c.run_id)
        ),
        "self_correlation": store.query(
            select(
                m.c.step.label("from_step"),
                m.c.other_step.label("to_step"),
                m.c.control,
                m.c.self_corr,
                m.c.max_corr,
                m.c.best_layer,
                m.c.best_neuron,
            )
            .where(m.c.model == model, m.c.other_model == model, m.c.other_step > m.c.step)
            .where(m.c.layer == layer, m.c.neuron == neuron, at_hook["matches"])
            .order_by(m.c.control, m.c.step, m.c.other_step)
        ),
        "ablations": store.query(
            select(*_cols(a, STORY_ABLATION), tables.ablation_neuron.c.delta.label("own_delta"))
            .join(tables.ablation, tables.ablation.c.id == a.c.ablation_id)
            .outerjoin(
                tables.ablation_neuron,
                and_(
                    tables.ablation_neuron.c.ablation_id == tables.ablation.c.id,
                    tables.ablation_neuron.c.layer == layer,
                    tables.ablation_neuron.c.neuron == neuron,
                ),
            )
            .where(a.c.model == model, a.c.step == step, tables.ablation.c.neurons.like(f'%"{layer}.{neuron}"%'))
            .order_by(a.c.ablation_id)
        ),
    }


def _hooks_of_members():
    """The hook of a run's member sets: one name, or both joined by a comma (the only two hooks)."""
    low, high = func.min(tables.activation_set.c.hook), func.max(tables.activation_set.c.hook)
    return case((low == high, low), else_=low + literal(",") + high).label("hook")


def models_listing(store: Store) -> Rows:
    """One row per model with its registered checkpoints: how many, first and last step (none yet: 0, NULL)."""
    m, c = tables.model, tables.checkpoint
    query = (
        select(
            m.c.name.label("model"),
            m.c.family,
            m.c.seed,
            m.c.architecture,
            m.c.n_layers.label("layers"),
            m.c.d_mlp,
            m.c.source,
            func.count(c.c.id).label("checkpoints"),
            func.min(c.c.step).label("first_step"),
            func.max(c.c.step).label("last_step"),
        )
        .join(c, c.c.model_id == m.c.id, isouter=True)
        .group_by(m.c.id)
        .order_by(m.c.name)
    )
    return store.query(query)


def runs_listing(store: Store) -> Rows:
    """Every correlation run with its kind, status, dataset, control, hook of its sets, parameters, read
    amplification and timings."""
    r = tables.correlation_run
    return store.query(
        select(
            r.c.id.label("run_id"),
            r.c.kind,
            r.c.status,
            tables.dataset.c.name.label("dataset"),
            r.c.control,
            _hooks_of_members(),
            r.c.threshold,
            r.c.baseline_seed,
            func.count(tables.run_member.c.set_id).label("n_sets"),
            r.c.n_tokens,
            r.c.n_passes,
            # stored bytes read over the bytes the files hold: 1.0 when one read pass read each byte once
            (cast(r.c.bytes_read, Float) / func.nullif(r.c.bytes_held, 0)).label("read_amplification"),
            r.c.n_dead,
            r.c.backend,
            r.c.seconds,
            r.c.started_at,
            r.c.error,
        )
        .join(tables.dataset, tables.dataset.c.id == r.c.dataset_id)
        .outerjoin(tables.run_member, tables.run_member.c.run_id == r.c.id)
        .outerjoin(tables.activation_set, tables.activation_set.c.id == tables.run_member.c.set_id)
        .group_by(r.c.id, tables.dataset.c.name)
        .order_by(r.c.id)
    )


ABLATION_COLUMNS = [
    "ablation_id",
    "model",
    "step",
    "dataset",
    "hook",
    "method",
    "selector",
    "threshold",
    "n_neurons",
    "tokens",
    "eval_split",
    "n_eval_sequences",
    "positions",
    "base_loss",
    "ablated_loss",
    "delta",
    "n_controls",
    "control_mean",
    "control_std",
    "control_min",
    "control_max",
    "control_ci_low",
    "control_ci_high",
    "p_value",
    "p_floor",
]


def ablations_listing(store: Store, model: str | None = None) -> Rows:
    a = v_ablation_summary
    query = select(*(a.c[c] for c in ABLATION_COLUMNS)).order_by(a.c.ablation_id)
    if model:
        with store.transaction() as conn:
            get_model(conn, model)  # an unknown name is an error, not an empty listing
        query = query.where(a.c.model == model)
    return store.query(query)


PERSISTENCE_COLUMNS = [
    "model",
    "dataset",
    "hook",
    "control",
    "threshold",
    "from_step",
    "to_step",
    "layer",
    "n_universal_from",
    "n_universal_to",
    "n_kept",
    "p_persist",
    "jaccard",
    "mean_self_corr",
    "mean_self_corr_universal",
]


def persistence_listing(
    store: Store,
    model: str | None = None,
    control: str | None = None,
    threshold: float | None = None,
    hook: str | None = None,
) -> Rows:
    """Stored persistence rows, optionally of one model, control, threshold and hook."""
    p = v_persistence
    query = select(*(p.c[c] for c in PERSISTENCE_COLUMNS)).order_by(
        p.c.model, p.c.hook, p.c.control, p.c.threshold, p.c.from_step, p.c.layer
    )
    if hook:
        query = query.where(p.c.hook == hook)
    if model:
        with store.transaction() as conn:
            get_model(conn, model)
        query = query.where(p.c.model == model)
    if control:
        query = query.where(p.c.control == control)
    if threshold is not None:
        query = query.where(p.c.threshold == check_threshold(threshold))
    return store.query(query)


def ablation_control_deltas(store: Store) -> dict[int, list[float]]:
    """Each complete ablation's control deltas, one per random set."""
    rows = store.query(
        select(tables.ablation.c.id, tables.ablation.c.control_deltas).where(
            tables.ablation.c.status == "complete", tables.ablation.c.control_deltas.isnot(None)
        )
    )
    return {r.id: json.loads(r.control_deltas) for r in rows}


SIMILARITY_LAYER_COLUMNS = (
    "model step layer other_model other_step other_layer mean_max_corr mean_baseline baseline_sd excess_corr "
    "matched_corr cka"
)


def similarity_listing(store: Store, *, run: int | None = None, control: str = "none", by_layer: bool = False) -> Rows:
    """Every pair of sets of a similarity run (default: the newest with this control): per pair the means over
    same-index layers, or every layer pair with `by_layer`."""
    sim = v_similarity
    if run is None:
        run = store.scalar(
            select(func.max(tables.correlation_run.c.id)).where(
                tables.correlation_run.c.kind == "similarity",
                tables.correlation_run.c.status == "complete",
                tables.correlation_run.c.control == control,
            )
        )
        if run is None:
            flag = " --control token" if control == "token" else ""
            raise ActdbError(f"no similarity run yet; run `actdb similarity --models A,B,... --steps S1,S2,...{flag}`")
    else:
        require_run(store, run, "similarity")
    if by_layer:
        query = select(*_cols(sim, SIMILARITY_LAYER_COLUMNS)).where(sim.c.run_id == run)
        return store.query(query.order_by(sim.c.model, sim.c.step, sim.c.other_model, sim.c.other_step, sim.c.layer))
    query = (
        select(
            sim.c.model,
            sim.c.step,
            sim.c.other_model,
            sim.c.other_step,
            func.avg(sim.c.mean_max_corr).label("mean_max_corr"),
            func.avg(sim.c.mean_baseline).label("mean_baseline"),
            func.avg(sim.c.excess_corr).label("excess_corr"),
            func.avg(sim.c.matched_corr).label("matched_corr"),
            func.avg(sim.c.cka).label("cka"),
            func.count().label("n_layers"),
            sim.c.run_id,
        )
        .where(sim.c.run_id == run, sim.c.layer == sim.c.other_layer)
        .group_by(sim.c.model, sim.c.step, sim.c.other_model, sim.c.other_step, sim.c.run_id)
        .order_by(sim.c.model, sim.c.step, sim.c.other_model, sim.c.other_step)
    )
    return store.query(query)
