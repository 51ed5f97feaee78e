"""What "universal" means, in one place.

A correlation run stores each neuron's max-corr, baseline and excess; nothing stores a label. A neuron is
universal in a run when `excess_corr > threshold`, where the threshold is the reader's (`--threshold`) or, by
default, the one recorded on the run for display (0.5 unless `actdb correlate --threshold` said otherwise).
The analyst views apply the same rule with the recorded threshold. Listings, persistence, ablation and the
report all read labels through here, so they agree for any threshold.
"""

from __future__ import annotations

from sqlalchemy import ColumnElement, Select, Subquery, and_, func, literal, select

from actdb.store.database import tables
from actdb.store.database.connection import Store
from actdb.store.database.views import v_universality
from actdb.store.errors import ActdbError
from actdb.store.refs import check_threshold


def universal_condition(threshold: float | None, view=v_universality) -> ColumnElement[bool]:
    """`excess_corr > threshold` on a universality view, with each run's recorded threshold when None."""
    bound = view.c.threshold if threshold is None else literal(check_threshold(threshold))
    return view.c.excess_corr > bound


def newest_runs(control: str = "none", run: int | None = None) -> Subquery:
    """(set_id, run_id): for each activation set, the complete cross-model run with this control that compared it
    with the most models, the newest among equals (or the sets of one given run).

    Preferring the widest run keeps a listing on one comparison: after `correlate A,B,C` then `correlate A,B`,
    C would otherwise be read from the three-model run and A, B from the two-model one. A re-run over the same
    models replaces what readers see without deleting history."""
    complete = (tables.correlation_run.c.status == "complete", tables.correlation_run.c.kind == "cross_model")
    scope = tables.correlation_run.c.id == run if run is not None else tables.correlation_run.c.control == control
    width = (
        select(tables.run_member.c.run_id, func.count().label("members"))
        .join(tables.correlation_run, tables.correlation_run.c.id == tables.run_member.c.run_id)
        .where(*complete, scope)
        .group_by(tables.run_member.c.run_id)
        .subquery("width")
    )
    ranked = (
        select(
            tables.run_member.c.set_id,
            tables.run_member.c.run_id,
            func.row_number()
            .over(
                partition_by=tables.run_member.c.set_id,
                order_by=(width.c.members.desc(), tables.run_member.c.run_id.desc()),
            )
            .label("rank"),
        )
        .join(width, width.c.run_id == tables.run_member.c.run_id)
        .subquery("ranked")
    )
    return select(ranked.c.set_id, ranked.c.run_id).where(ranked.c.rank == 1).subquery("newest")


def newest_run_listing(newest: Subquery) -> Select:
    """Each set's chosen run (see `newest_runs`) with names: run_id, set_id, model, step, dataset, threshold."""
    return (
        select(
            newest.c.run_id,
            newest.c.set_id,
            tables.model.c.name.label("model"),
            tables.checkpoint.c.step,
            tables.dataset.c.name.label("dataset"),
            tables.correlation_run.c.threshold,
        )
        .join(tables.activation_set, tables.activation_set.c.id == newest.c.set_id)
        .join(tables.checkpoint, tables.checkpoint.c.id == tables.activation_set.c.checkpoint_id)
        .join(tables.model, tables.model.c.id == tables.checkpoint.c.model_id)
        .join(tables.dataset, tables.dataset.c.id == tables.activation_set.c.dataset_id)
        .join(tables.correlation_run, tables.correlation_run.c.id == newest.c.run_id)
        .order_by(tables.model.c.name, tables.checkpoint.c.step)
    )


def on_newest(view, newest: Subquery) -> ColumnElement[bool]:
    """Join condition restricting a universality view to each set's chosen run (see `newest_runs`)."""
    return and_(view.c.run_id == newest.c.run_id, view.c.set_id == newest.c.set_id)


def stability_at(draws: str | None, threshold: float) -> float | None:
    """Share of baseline draws in which the neuron is universal at `threshold` (None when undefined)."""
    if not draws:
        return None
    values = [float(x) for x in draws.split(",")]
    return sum(v > threshold for v in values) / len(values)


RUN_KINDS = {
    "cross_model": "a cross-model correlation run (`actdb correlate` over different models)",
    "within_model": "a within-model run (one model at several steps, from `actdb persistence`)",
    "similarity": "a similarity run (`actdb similarity`)",
}


def require_run(store: Store, run_id: int, kind: str, set_id: int | None = None, what: str = "") -> float:
    """The recorded threshold of run `run_id`, after checking that it exists, is complete, is of `kind` and (with
    `set_id`) scored that set; otherwise a one-line error saying which of these failed."""
    run_table, member = tables.correlation_run, tables.run_member
    with store.transaction() as conn:
        run = conn.execute(select(run_table).where(run_table.c.id == run_id)).first()
        if run is None:
            raise ActdbError(f"there is no run {run_id}")
        if run.kind != kind:
            raise ActdbError(f"run {run_id} is {RUN_KINDS.get(run.kind, run.kind)}; this needs {RUN_KINDS[kind]}")
        if run.status != "complete":
            raise ActdbError(f"run {run_id} is {run.status}, not complete")
        scored = select(member.c.set_id).where(member.c.run_id == run_id, member.c.set_id == set_id)
        if set_id is not None and conn.execute(scored).first() is None:
            raise ActdbError(f"run {run_id} did not score {what or f'set {set_id}'}")
        return run.threshold


def latest_universality_run(store: Store, set_id: int, control: str) -> tuple[int, float] | None:
    """(run_id, recorded threshold) of the run `newest_runs` picks for the set with this control, or None."""
    newest = newest_runs(control)
    row = store.query(
        select(newest.c.run_id, tables.correlation_run.c.threshold)
        .join(tables.correlation_run, tables.correlation_run.c.id == newest.c.run_id)
        .where(newest.c.set_id == set_id)
    ).first()
    return None if row is None else (row.run_id, row.threshold)


def universal_neurons_of(store: Store, run_id: int, set_id: int, threshold: float) -> list[tuple[int, int]]:
    """(layer, neuron) of the set's universal neurons in a run at a threshold, sorted."""
    v = v_universality
    rows = store.query(
        select(v.c.layer, v.c.neuron)
        .where(v.c.run_id == run_id, v.c.set_id == set_id, universal_condition(threshold))
        .order_by(v.c.layer, v.c.neuron)
    )
    return [(r.layer, r.neuron) for r in rows]


TOKEN_MIN_R2 = 0.5  # a neuron whose variance is at least half explained by the current token id is a token neuron
POSITION_MIN_R2 = 0.5  # ... by the position in the sequence: a position neuron
FAMILIES = ("token", "position", "prediction", "suppression", "unexplained")


def family_rule(token_min: float, position_min: float, kurtosis_min: float | None, skew_min: float | None) -> str:
    """The family rule in one line, as `v_neuron_explanations` applies it (the first that holds)."""
    vocab = (
        f"prediction if vocab excess kurtosis > {kurtosis_min:g} and skew > {skew_min:g}; suppression if that "
        f"kurtosis and skew < {-skew_min if skew_min else 0:g}; "
        if kurtosis_min is not None
        else ""
    )
    return f"token if token_r2 >= {token_min:g}; position if position_r2 >= {position_min:g}; {vocab}else unexplained"
