"""Tables of a stored trajectory run (`v_trajectories`, `v_trajectory_points`): the long rows, the win-rate matrix
ordered seed-major, per-checkpoint values, and Fort's comparison of snapshots of one run against independently
trained runs."""

from __future__ import annotations

from statistics import fmean
from typing import TYPE_CHECKING

from sqlalchemy import func, select

from actdb.store.database import tables
from actdb.store.database.connection import Rows, Store
from actdb.store.database.views import v_trajectories, v_trajectory_points
from actdb.store.errors import ActdbError

if TYPE_CHECKING:
    import numpy as np

LONG_COLUMNS = ["model", "step", "other_model", "other_step", "metric", "value", "n_targets"]
KINDS = ("same seed, other step", "other seed, same step")


def trajectory_run(store: Store, run: int | None = None) -> int:
    """The run asked for, or the newest complete one; a one-line error naming the command when there is none."""
    runs = tables.trajectory_run
    if run is None:
        run = store.scalar(select(func.max(runs.c.id)).where(runs.c.status == "complete"))
        if run is None:
            raise ActdbError("no trajectory run yet; run `actdb trajectories --models A,B,... --steps S1,S2,...`")
        return run
    status = store.scalar(select(runs.c.status).where(runs.c.id == run))
    if status != "complete":
        raise ActdbError(f"trajectory run {run} {'does not exist' if status is None else f'is {status}'}")
    return run


def long_rows(store: Store, run: int | None = None, metric: str | None = None) -> Rows:
    """Every stored value of the run (or of one of its metrics): model, step, other_model, other_step, metric,
    value, n_targets. A metric the run did not store is a one-line error naming those it did."""
    v = v_trajectories
    run = trajectory_run(store, run)
    query = select(*(v.c[c] for c in LONG_COLUMNS)).where(v.c.run_id == run)
    if metric is not None:
        names = store.query(select(v.c.metric).distinct().where(v.c.run_id == run).order_by(v.c.metric)).column(
            "metric"
        )
        if metric not in names:
            raise ActdbError(f"trajectory run {run} has no metric {metric!r} (it has: {', '.join(names)})")
        query = query.where(v.c.metric == metric)
    return store.query(query.order_by(v.c.metric, v.c.model, v.c.step, v.c.other_model, v.c.other_step))


def point_rows(store: Store, run: int | None = None) -> Rows:
    """Per checkpoint: targets, top-1 accuracy, mean loss, Bradley-Terry strength and map coordinates."""
    p = v_trajectory_points
    cols = ["model", "step", "n_targets", "top1_accuracy", "mean_loss", "bt_strength", "map_x", "map_y"]
    query = select(*(p.c[c] for c in cols)).where(p.c.run_id == trajectory_run(store, run))
    return store.query(query.order_by(p.c.model, p.c.step))


def run_summary(store: Store, run: int | None = None) -> dict:
    """The run's own row: eps, distance, embedding, counts, stress, and the reference checkpoint's name."""
    run = trajectory_run(store, run)
    runs, checkpoint, model = tables.trajectory_run, tables.checkpoint, tables.model
    with store.transaction() as conn:
        r = conn.execute(select(runs).where(runs.c.id == run)).one()
        ref = None
        if r.reference_checkpoint_id is not None:
            c = conn.execute(
                select(model.c.name, checkpoint.c.step)
                .join(model, model.c.id == checkpoint.c.model_id)
                .where(checkpoint.c.id == r.reference_checkpoint_id)
            ).one()
            ref = f"{c.name}@{c.step}"
        return {
            "run_id": r.id,
            "sets": r.sets,
            "eps": r.eps,
            "distance": r.distance,
            "embedding": r.embedding,
            "n_checkpoints": r.n_checkpoints,
            "n_targets": r.n_targets,
            "n_triples": r.n_triples,
            "n_nontransitive": r.n_nontransitive,
            "map_stress": r.map_stress,
            "reference": ref,
            "weights": r.weights,
        }


def matrix(rows: Rows, metric: str) -> tuple[list[tuple[str, int]], np.ndarray]:
    """One metric as a square matrix over checkpoints ordered seed-major (model, then step); NaN where absent."""
    import numpy as np  # for the report's figures; the CLI's tables need no NumPy

    keys = sorted({(r["model"], r["step"]) for r in rows} | {(r["other_model"], r["other_step"]) for r in rows})
    grid = np.full((len(keys), len(keys)), np.nan)
    index = {k: i for i, k in enumerate(keys)}
    for r in rows:
        if r["metric"] == metric and r["value"] is not None:
            grid[index[(r["model"], r["step"])], index[(r["other_model"], r["other_step"])]] = r["value"]
    return keys, grid


def wide_table(rows: Rows, metric: str, digits: int = 3) -> Rows:
    """The matrix of one metric as rows: `checkpoint` then one column per checkpoint (seed-major)."""
    keys = sorted({(r["model"], r["step"]) for r in rows} | {(r["other_model"], r["other_step"]) for r in rows})
    labels = [f"{m}@{s}" for m, s in keys]
    cells = {
        (f"{r['model']}@{r['step']}", f"{r['other_model']}@{r['other_step']}"): r["value"]
        for r in rows
        if r["metric"] == metric and r["value"] is not None
    }
    out = []
    for label in labels:
        row = {"checkpoint": label}
        for other in labels:
            value = cells.get((label, other))
            row[other] = None if value is None else round(value, digits)
        out.append(row)
    return Rows(["checkpoint", *labels], out)


def pair_kind(model: str, step: int, other_model: str, other_step: int) -> str | None:
    """Fort's two kinds of pairs: snapshots of one run, or independently trained runs at one step."""
    if model == other_model and step != other_step:
        return KINDS[0]
    if model != other_model and step == other_step:
        return KINDS[1]
    return None


def kind_comparison(
    rows: Rows,
    metrics: tuple[str, ...] = ("ensemble_gain", "disagreement", "win_rate"),
    steps: set[int] | None = None,
) -> Rows:
    """Per kind of pair, over unordered pairs (both at one of `steps`, when given): how many, and the mean, min
    and max of each metric (win rate as |W − 0.5|, its distance from a draw)."""
    out = []
    for kind in KINDS:
        row: dict = {"pairs": kind}
        for metric in metrics:
            values = [
                abs(r["value"] - 0.5) if metric == "win_rate" else r["value"]
                for r in rows
                if r["metric"] == metric
                and (r["model"], r["step"]) < (r["other_model"], r["other_step"])
                and pair_kind(r["model"], r["step"], r["other_model"], r["other_step"]) == kind
                and (steps is None or {r["step"], r["other_step"]} <= steps)
            ]
            name = "win_margin" if metric == "win_rate" else metric
            row["n"] = len(values)
            row[f"mean_{name}"] = round(fmean(values), 5) if values else None
            row[f"min_{name}"] = round(min(values), 5) if values else None
            row[f"max_{name}"] = round(max(values), 5) if values else None
        out.append(row)
    columns = list(out[0].keys())
    columns.remove("n")
    return Rows(["pairs", "n", *columns[1:]], out)
