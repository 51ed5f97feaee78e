"""Finding and registering models, checkpoints, datasets and activation sets, with one-line errors that say
what exists and which command creates what is missing.

Everything here is SQLAlchemy Core on `store.database.tables`: lookups take a Core connection or an ORM session
(both execute Core statements) and return `Row`s, read by attribute (`row.id`, `row.path`)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from sqlalchemy import Row, Table, func, insert, select
from sqlalchemy.exc import IntegrityError

from actdb.store.database import tables
from actdb.store.errors import ActdbError
from actdb.store.hook_names import HOOK_NAME
from actdb.store.refs import SetRef

if TYPE_CHECKING:
    from sqlalchemy import Connection
    from sqlalchemy.orm import Session

    from actdb.store.database.connection import Store

    Executor = Connection | Session

model, checkpoint, dataset, activation_set = tables.model, tables.checkpoint, tables.dataset, tables.activation_set
prediction_set = tables.prediction_set


def _get_named(conn: Executor, table: Table, name: str, missing: str) -> Row[Any]:
    row = conn.execute(select(table).where(table.c.name == name)).first()
    if row is None:
        known = ", ".join(conn.scalars(select(table.c.name).order_by(table.c.name))) or "none yet"
        raise ActdbError(missing.format(name=name, known=known))
    return row


def get_dataset(conn: Executor, name: str) -> Row[Any]:
    """The dataset row named `name`, or a one-line error listing the known ones."""
    return _get_named(
        conn, dataset, name, "no dataset named {name!r} (known: {known}); create it with `actdb dataset add`"
    )


def get_model(conn: Executor, name: str) -> Row[Any]:
    """The model row named `name`, or a one-line error listing the known ones."""
    return _get_named(conn, model, name, "unknown model {name!r} (known: {known})")


def get_checkpoint(conn: Executor, model_name: str, step: int) -> Row[Any]:
    """The checkpoint row of MODEL at STEP, or a one-line error listing the model's steps."""
    found = get_model(conn, model_name)
    ckpt = conn.execute(select(checkpoint).where(checkpoint.c.model_id == found.id, checkpoint.c.step == step)).first()
    if ckpt is None:
        steps = ", ".join(
            str(s)
            for s in conn.scalars(
                select(checkpoint.c.step).where(checkpoint.c.model_id == found.id).order_by(checkpoint.c.step)
            )
        )
        raise ActdbError(f"model {model_name!r} has no step {step} (steps: {steps or 'none'})")
    return ckpt


def check_new_name(conn: Executor, table: Table, name: str, what: str) -> None:
    """Refuse a new name that differs from an existing one only in case: their files would be one file on a
    case-insensitive file system."""
    clash = conn.scalar(select(table.c.name).where(func.lower(table.c.name) == name.lower(), table.c.name != name))
    if clash is not None:
        raise ActdbError(f"{what} {name!r} differs from the existing {clash!r} only in case; pick another name")


def find_set(conn: Executor, model_name: str, step: int, dataset_name: str, hook: str = HOOK_NAME) -> Row[Any] | None:
    """The activation set of MODEL@STEP on a dataset at a hook, whatever its status (None if there is none)."""
    return conn.execute(
        select(activation_set)
        .join(checkpoint, activation_set.c.checkpoint_id == checkpoint.c.id)
        .join(model, checkpoint.c.model_id == model.c.id)
        .join(dataset, activation_set.c.dataset_id == dataset.c.id)
        .where(
            model.c.name == model_name,
            checkpoint.c.step == step,
            dataset.c.name == dataset_name,
            activation_set.c.hook == hook,
        )
    ).first()


def only_dataset(store: Store, model_name: str | None = None) -> str:
    """The store's only dataset (or the only one `model_name` has complete sets on), or a one-line error asking
    for --dataset."""
    with store.transaction() as conn:
        query = select(dataset.c.name).distinct()
        if model_name is not None:
            get_model(conn, model_name)
            query = (
                query.join(activation_set, activation_set.c.dataset_id == dataset.c.id)
                .join(checkpoint, checkpoint.c.id == activation_set.c.checkpoint_id)
                .join(model, model.c.id == checkpoint.c.model_id)
                .where(model.c.name == model_name, activation_set.c.status == "complete")
            )
        names = sorted(conn.scalars(query))
    if len(names) != 1:
        where = f"{model_name} has complete sets on" if model_name is not None else "the store has"
        listed = f" ({', '.join(names)})" if names else ""
        raise ActdbError(f"{where} {len(names)} datasets{listed}; pass --dataset")
    return names[0]


def checkpoints_dataset(store: Store, refs: Sequence[SetRef]) -> str:
    """The dataset checkpoints are compared on by their predictions when no --dataset is given: the only one
    holding complete predictions of any of them, else the only one their complete sets are on (where `actdb
    predictions` puts them), else the store's only dataset; or a one-line error asking for --dataset."""
    with store.transaction() as conn:
        ids = [get_checkpoint(conn, ref.model, ref.step).id for ref in refs]

        def holding(table: Table) -> list[str]:
            query = select(dataset.c.name).distinct().join(table, table.c.dataset_id == dataset.c.id)
            return sorted(conn.scalars(query.where(table.c.checkpoint_id.in_(ids), table.c.status == "complete")))

        what, names = "predictions", holding(prediction_set)
        if not names:
            what, names = "complete sets", holding(activation_set)
    if not names:
        return only_dataset(store)
    if len(names) > 1:
        raise ActdbError(f"the checkpoints have {what} on {len(names)} datasets ({', '.join(names)}); pass --dataset")
    return names[0]


def complete_set(conn: Executor, ref: SetRef, dataset_name: str | None, hook: str = HOOK_NAME) -> Row[Any]:
    """The complete activation set of MODEL@STEP (on `dataset_name`, or its only dataset), or a one-line error."""
    ckpt = get_checkpoint(conn, ref.model, ref.step)
    q = (
        select(
            activation_set,
            dataset.c.name.label("dataset_name"),
            dataset.c.path.label("dataset_path"),
            dataset.c.fingerprint.label("dataset_fingerprint"),
        )
        .join(dataset, activation_set.c.dataset_id == dataset.c.id)
        .where(activation_set.c.checkpoint_id == ckpt.id, activation_set.c.hook == hook)
    )
    want = ref.dataset or dataset_name
    if want:
        get_dataset(conn, want)
        q = q.where(dataset.c.name == want)
    rows = conn.execute(q).all()
    if not rows:
        on = f" on dataset {want!r}" if want else ""
        flag = "" if hook == HOOK_NAME else f" --hook {hook}"
        raise ActdbError(
            f"{ref} has no activation set{on} (hook {hook}); run `actdb ingest {ref.model} --step {ref.step} "
            f"--dataset {want or 'DATASET'}{flag}` first"
        )
    if len(rows) > 1:
        raise ActdbError(
            f"{ref} has sets on several datasets ({', '.join(r.dataset_name for r in rows)}); pass --dataset"
        )
    found = rows[0]
    if found.status == "stale":
        raise ActdbError(
            f"the activation set of {ref} on {found.dataset_name} is stale ({found.error}); `actdb ingest` redoes it"
        )
    if found.status != "complete":
        raise ActdbError(
            f"the activation set of {ref} on {found.dataset_name} is {found.status}, not complete; finish it with "
            "`actdb ingest`"
        )
    return found


def resolve_sets(store: Store, refs: list[SetRef], dataset_name: str | None, hook: str = HOOK_NAME) -> list[Row[Any]]:
    """Complete activation sets for the references, all on one dataset and hook, or a one-line error."""
    if len(set(refs)) != len(refs):
        raise ActdbError("the same activation set is listed twice")
    with store.transaction() as conn:
        found = [complete_set(conn, ref, dataset_name, hook) for ref in refs]
    if len({a.dataset_id for a in found}) > 1:
        raise ActdbError("the sets are on different datasets; correlate sets of one dataset (pass --dataset)")
    return found


def get_or_create(store: Store, table: Table, lookup: dict[str, Any], defaults: dict[str, Any]) -> Row[Any]:
    """The row keyed by `lookup`, inserted with `defaults` unless it exists; a concurrent insert of the same key
    is tolerated (the other writer's row is returned)."""
    where = [table.c[k] == v for k, v in lookup.items()]
    with store.transaction() as conn:
        row = conn.execute(select(table).where(*where)).first()
        if row is not None:
            return row
    try:
        with store.transaction() as conn:
            conn.execute(insert(table).values(**lookup, **defaults))
    except IntegrityError:
        pass
    with store.transaction() as conn:
        return conn.execute(select(table).where(*where)).first()


def resolve_hook(
    store: Store,
    hook: str | None,
    model_name: str | None = None,
    step: int | None = None,
    dataset_name: str | None = None,
    run: int | None = None,
) -> str | None:
    """The hook a read uses: `hook` when given (an error naming the hooks present when no complete set in scope
    has it), else the only hook of the complete sets in scope (MODEL, STEP, DATASET, the members of RUN when
    given); several hooks are a one-line error asking for --hook. None when no set is in scope: the caller says
    what is missing."""
    member = tables.run_member
    query = (
        select(activation_set.c.hook)
        .distinct()
        .join(checkpoint, checkpoint.c.id == activation_set.c.checkpoint_id)
        .join(model, model.c.id == checkpoint.c.model_id)
        .join(dataset, dataset.c.id == activation_set.c.dataset_id)
        .where(activation_set.c.status == "complete")
    )
    for column, value in ((model.c.name, model_name), (checkpoint.c.step, step), (dataset.c.name, dataset_name)):
        if value is not None:
            query = query.where(column == value)
    if run is not None:
        query = query.join(member, member.c.set_id == activation_set.c.id).where(member.c.run_id == run)
    present = sorted(store.query(query).column("hook"))
    scope = (
        f"{model_name}@{step}"
        if model_name is not None and step is not None
        else model_name or (f"step {step}" if step is not None else "the store")
    )
    scope += f" in run {run}" if run is not None else ""
    if hook is not None:
        if present and hook not in present:
            raise ActdbError(f"{scope} has no complete sets at hook {hook}; hooks present: {', '.join(present)}")
        return hook
    if len(present) > 1:
        raise ActdbError(f"{scope} has sets at hooks {', '.join(present)}; choose one with --hook")
    return present[0] if present else None
