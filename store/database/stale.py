"""What a replaced checkpoint or activation set takes with it.

When `ingest` replaces a checkpoint's weights (`--replace-source` with other weights) or a set's stored values
(`--force` whose values differ from the old ones), every result computed from the old values stops being
complete in the same transaction as the replacement: its status becomes `stale`, which no view, reader or reuse
check accepts, so the next identical request recomputes it. Rows without a status of their own are dropped
instead (persistence rows and emergence steps, explanations). `invalidate` does it and says what it touched.

Which results depend on what (changed sets: the redone set; with new weights every set of the checkpoint):

- correlation runs (cross-model, within-model, similarity) with a changed set among their members;
- persistence rows that read one of those runs, the emergence steps of their (model, dataset, hook, control,
  threshold), and the persistence runs that wrote them;
- ablations of the checkpoint (new weights, or a changed `mlp.post` set on their dataset: its means) and ablations
  whose neurons came from a stale run;
- prediction sets and trajectory runs of the checkpoint when its weights changed (trajectory runs with
  `--distance cka` also when a set changed: they read similarity runs);
- concept runs of a changed set; robustness runs over the checkpoint (new weights, or a changed set on their
  dataset), and ablation robustness runs over a checkpoint whose neurons a stale run chose;
- explanations of a changed set;
- with new weights, the checkpoint's other activation sets (other hooks, other datasets): complete ones become
  stale (`actdb ingest` redoes them), and unfinished ones restart from row 0 instead of resuming rows written
  with the old weights.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from sqlalchemy import Connection, delete, or_, select, update
from sqlalchemy.orm import Session

from actdb.store.database import tables
from actdb.store.database.tables import utcnow
from actdb.store.hook_names import HOOK_NAME

STALE = "stale"
RESUMABLE = ("pending", "failed", "abandoned")  # unfinished sets whose kept rows a later ingest would resume


@dataclass
class Invalidated:
    """What one replacement made stale (ids per kind) or dropped."""

    sets: list[str] = field(default_factory=list)  # the checkpoint's other complete sets, as "DATASET (HOOK)"
    correlation_runs: list[int] = field(default_factory=list)
    persistence_runs: list[int] = field(default_factory=list)
    persistence_rows: int = 0
    ablations: list[int] = field(default_factory=list)
    predictions: list[str] = field(default_factory=list)  # datasets of the checkpoint's prediction sets
    trajectory_runs: list[int] = field(default_factory=list)
    concept_runs: list[int] = field(default_factory=list)
    robustness_runs: list[int] = field(default_factory=list)
    explanations: list[str] = field(default_factory=list)  # sets whose explanation was dropped, as "DATASET (HOOK)"
    restarted: list[str] = field(default_factory=list)  # unfinished sets that restart from row 0

    def summary(self) -> str:
        """One line naming everything invalidated, or saying that nothing was."""
        parts = []
        for label, ids in (
            ("correlation runs", self.correlation_runs),
            ("persistence runs", self.persistence_runs),
            ("ablations", self.ablations),
            ("trajectory runs", self.trajectory_runs),
            ("concept runs", self.concept_runs),
            ("robustness runs", self.robustness_runs),
        ):
            if ids:
                parts.append(f"{label} {', '.join(map(str, ids))}")
        if self.predictions:
            parts.append(f"predictions on {', '.join(self.predictions)}")
        if self.sets:
            parts.append(f"activation sets on {', '.join(self.sets)} (`actdb ingest` redoes them)")
        dropped = []
        if self.persistence_rows:
            dropped.append(f"{self.persistence_rows} persistence rows and their emergence steps")
        if self.explanations:
            dropped.append(f"the explanations of {', '.join(self.explanations)}")
        if self.restarted:
            dropped.append(f"the kept rows of the unfinished sets on {', '.join(self.restarted)}")
        text = f"stale now: {'; '.join(parts)}" if parts else "nothing computed from it is stale"
        return text + (f"; dropped {', '.join(dropped)}" if dropped else "")


def invalidate(
    s: Session | Connection, checkpoint_id: int, set_id: int | None, weights_changed: bool, reason: str
) -> Invalidated:
    """Mark stale (or drop) every result computed from the old values of set `set_id` of checkpoint
    `checkpoint_id`, or, when `weights_changed`, from any set or the weights of that checkpoint; within the caller's
    transaction, so the replacement and its consequences commit together. Set `set_id` itself holds the new values
    and stays as it is; `reason` is recorded as each stale row's error."""
    out = Invalidated()
    a, ds = tables.activation_set, tables.dataset
    sets = s.execute(
        select(a.c.id, a.c.status, a.c.hook, a.c.dataset_id, ds.c.name.label("dataset"))
        .join(ds, ds.c.id == a.c.dataset_id)
        .where(a.c.checkpoint_id == checkpoint_id)
        .order_by(ds.c.name, a.c.hook)
    ).all()
    changed = [r for r in sets if weights_changed or r.id == set_id]
    changed_ids = [r.id for r in changed]
    post_datasets = {r.dataset_id for r in changed if r.hook == HOOK_NAME}
    changed_datasets = {r.dataset_id for r in changed}
    stale = {"status": STALE, "error": reason}
    for r in changed:
        if r.id == set_id:
            continue
        if r.status == "complete":
            s.execute(update(a).where(a.c.id == r.id).values(**stale, tokens_done=0, finished_at=utcnow()))
            out.sets.append(f"{r.dataset} ({r.hook})")
        elif r.status in RESUMABLE:
            s.execute(update(a).where(a.c.id == r.id).values(tokens_done=0))
            out.restarted.append(f"{r.dataset} ({r.hook})")
    out.correlation_runs = _stale_correlation_runs(s, changed_ids, stale)
    out.persistence_runs, out.persistence_rows = _drop_persistence(s, out.correlation_runs, stale)
    out.ablations = _stale_ablations(s, checkpoint_id, weights_changed, post_datasets, out.correlation_runs, stale)
    if weights_changed:
        out.predictions = _stale_predictions(s, checkpoint_id, stale)
    out.trajectory_runs = _stale_trajectories(s, checkpoint_id, weights_changed, stale)
    out.concept_runs = _stale_ids(s, tables.concept_run, tables.concept_run.c.set_id.in_(changed_ids), stale)
    out.robustness_runs = _stale_robustness(
        s, checkpoint_id, weights_changed, changed_datasets, out.correlation_runs, stale
    )
    explained = set(
        s.scalars(select(tables.set_explanation.c.set_id).where(tables.set_explanation.c.set_id.in_(changed_ids)))
    )
    for table in (tables.neuron_explanation, tables.set_explanation):
        s.execute(delete(table).where(table.c.set_id.in_(changed_ids)))
    out.explanations = [f"{r.dataset} ({r.hook})" for r in changed if r.id in explained]
    return out


def _stale_ids(s: Session | Connection, table, condition, stale: dict) -> list[int]:
    """Mark the complete rows of a run table that meet `condition` stale; returns their ids."""
    ids = sorted(s.scalars(select(table.c.id).where(condition, table.c.status == "complete")))
    if ids:
        s.execute(update(table).where(table.c.id.in_(ids)).values(**stale))
    return ids


def _stale_correlation_runs(s: Session | Connection, set_ids: list[int], stale: dict) -> list[int]:
    member = tables.run_member
    runs = select(member.c.run_id).where(member.c.set_id.in_(set_ids))
    return _stale_ids(s, tables.correlation_run, tables.correlation_run.c.id.in_(runs), stale)


def _drop_persistence(s: Session | Connection, run_ids: list[int], stale: dict) -> tuple[list[int], int]:
    """Drop the persistence rows that read a stale run and the emergence steps of their key; the persistence runs
    of those keys over those steps become stale. Returns (stale persistence run ids, rows dropped)."""
    p = tables.persistence
    reads = or_(p.c.from_run_id.in_(run_ids), p.c.to_run_id.in_(run_ids), p.c.self_run_id.in_(run_ids))
    rows = s.execute(
        select(
            p.c.id, p.c.model_id, p.c.dataset_id, p.c.hook, p.c.control, p.c.threshold, p.c.from_step, p.c.to_step
        ).where(reads)
    ).all()
    if not rows:
        return [], 0
    steps: dict[tuple, set[int]] = {}
    for r in rows:
        steps.setdefault((r.model_id, r.dataset_id, r.hook, r.control, r.threshold), set()).update(
            (r.from_step, r.to_step)
        )
    s.execute(delete(p).where(p.c.id.in_([r.id for r in rows])))
    e, pr = tables.neuron_emergence, tables.persistence_run
    stale_runs = []
    for (model_id, dataset_id, hook, control, threshold), touched in steps.items():
        s.execute(
            delete(e).where(
                e.c.model_id == model_id,
                e.c.dataset_id == dataset_id,
                e.c.hook == hook,
                e.c.control == control,
                e.c.threshold == threshold,
            )
        )
        runs = s.execute(
            select(pr.c.id, pr.c.steps).where(
                pr.c.model_id == model_id,
                pr.c.dataset_id == dataset_id,
                pr.c.hook == hook,
                pr.c.control == control,
                pr.c.threshold == threshold,
                pr.c.status == "complete",
            )
        ).all()
        stale_runs += [r.id for r in runs if touched & {int(x) for x in r.steps.split(",") if x}]
    if stale_runs:
        s.execute(update(pr).where(pr.c.id.in_(stale_runs)).values(**stale))
    return sorted(stale_runs), len(rows)


def _stale_ablations(
    s: Session | Connection,
    checkpoint_id: int,
    weights_changed: bool,
    post_datasets: set[int],
    run_ids: list[int],
    stale: dict,
) -> list[int]:
    ab = tables.ablation
    here = ab.c.checkpoint_id == checkpoint_id
    if not weights_changed:  # the same weights: only the means of a changed mlp.post set move
        here = here & ab.c.dataset_id.in_(post_datasets)
    return _stale_ids(s, ab, or_(here, ab.c.run_id.in_(run_ids)), stale)


def _stale_predictions(s: Session | Connection, checkpoint_id: int, stale: dict) -> list[str]:
    p, ds = tables.prediction_set, tables.dataset
    rows = s.execute(
        select(p.c.id, ds.c.name)
        .join(ds, ds.c.id == p.c.dataset_id)
        .where(p.c.checkpoint_id == checkpoint_id, p.c.status == "complete")
        .order_by(ds.c.name)
    ).all()
    if rows:
        s.execute(update(p).where(p.c.id.in_([r.id for r in rows])).values(**stale))
    return [r.name for r in rows]


def _stale_trajectories(s: Session | Connection, checkpoint_id: int, weights_changed: bool, stale: dict) -> list[int]:
    t, point = tables.trajectory_run, tables.trajectory_point
    involved = or_(
        t.c.id.in_(select(point.c.run_id).where(point.c.checkpoint_id == checkpoint_id)),
        t.c.reference_checkpoint_id == checkpoint_id,
    )
    if not weights_changed:  # predictions and weights are as they were; CKA distances read similarity runs
        involved = involved & (t.c.distance == "cka")
    return _stale_ids(s, t, involved, stale)


def _stale_robustness(
    s: Session | Connection,
    checkpoint_id: int,
    weights_changed: bool,
    changed_datasets: set[int],
    run_ids: list[int],
    stale: dict,
) -> list[int]:
    """Robustness runs over this checkpoint (new weights, or a changed set on their dataset: its statistics), and
    ablation runs over a checkpoint that is a member of a stale correlation run (their neurons may come from it)."""
    r, c, m = tables.robustness_run, tables.checkpoint, tables.model
    here = s.execute(select(m.c.name, c.c.step).join(c, c.c.model_id == m.c.id).where(c.c.id == checkpoint_id)).one()
    member, a = tables.run_member, tables.activation_set
    chosen = {
        (row.name, row.step)
        for row in s.execute(
            select(m.c.name, c.c.step)
            .join(c, c.c.model_id == m.c.id)
            .join(a, a.c.checkpoint_id == c.c.id)
            .join(member, member.c.set_id == a.c.id)
            .where(member.c.run_id.in_(run_ids))
        )
    }
    ids = []
    for run in s.execute(
        select(r.c.id, r.c.models, r.c.steps, r.c.dataset_id, r.c.intervention).where(r.c.status == "complete")
    ):
        covered = {(name, int(step)) for name in json.loads(run.models) for step in json.loads(run.steps)}
        over_this = (here.name, here.step) in covered and (weights_changed or run.dataset_id in changed_datasets)
        if over_this or (run.intervention == "ablate" and covered & chosen):
            ids.append(run.id)
    if ids:
        s.execute(update(r).where(r.c.id.in_(ids)).values(**stale))
    return sorted(ids)
