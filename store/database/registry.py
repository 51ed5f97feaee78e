"""Finding and registering models, checkpoints, datasets and activation sets, with one-line errors that say
what exists and which command creates what is missing."""

from __future__ import annotations

from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from actdb.store.database.connection import Store
from actdb.store.database.schema import ActivationSet, Checkpoint, Dataset, Model, RunMember
from actdb.store.errors import ActdbError
from actdb.store.hook_names import HOOK_NAME
from actdb.store.refs import SetRef


def _get_named(session: Session, cls: type, name: str, missing: str) -> object:
    row = session.scalar(select(cls).where(cls.name == name))
    if row is None:
        known = ", ".join(session.scalars(select(cls.name).order_by(cls.name))) or "none yet"
        raise ActdbError(missing.format(name=name, known=known))
    return row


def get_dataset(session: Session, name: str) -> Dataset:
    return _get_named(
        session, Dataset, name, "no dataset named {name!r} (known: {known}); create it with `actdb dataset add`"
    )


def get_model(session: Session, name: str) -> Model:
    return _get_named(session, Model, name, "unknown model {name!r} (known: {known})")


def get_checkpoint(session: Session, model_name: str, step: int) -> Checkpoint:
    model = get_model(session, model_name)
    ckpt = session.scalar(select(Checkpoint).where(Checkpoint.model_id == model.id, Checkpoint.step == step))
    if ckpt is None:
        steps = ", ".join(
            str(s)
            for s in session.scalars(
                select(Checkpoint.step).where(Checkpoint.model_id == model.id).order_by(Checkpoint.step)
            )
        )
        raise ActdbError(f"model {model_name!r} has no step {step} (steps: {steps or 'none'})")
    return ckpt


def check_new_name(session: Session, cls: type, name: str, what: str) -> None:
    """Refuse a new name that differs from an existing one only in case: their files would be one file on a
    case-insensitive file system."""
    clash = session.scalar(select(cls.name).where(func.lower(cls.name) == name.lower(), cls.name != name))
    if clash is not None:
        raise ActdbError(f"{what} {name!r} differs from the existing {clash!r} only in case; pick another name")


def find_set(session: Session, model_name: str, step: int, dataset: str, hook: str = HOOK_NAME) -> ActivationSet | None:
    return session.scalar(
        select(ActivationSet)
        .join(Checkpoint, ActivationSet.checkpoint_id == Checkpoint.id)
        .join(Model, Checkpoint.model_id == Model.id)
        .join(Dataset, ActivationSet.dataset_id == Dataset.id)
        .where(Model.name == model_name, Checkpoint.step == step, Dataset.name == dataset, ActivationSet.hook == hook)
    )


def only_dataset(store: Store, model: str | None = None) -> str:
    """The store's only dataset (or the only one `model` has complete sets on), or a one-line error asking for
    --dataset."""
    with store.session() as s:
        query = select(Dataset.name).distinct()
        if model is not None:
            get_model(s, model)
            query = (
                query.join(ActivationSet, ActivationSet.dataset_id == Dataset.id)
                .join(Checkpoint, Checkpoint.id == ActivationSet.checkpoint_id)
                .join(Model, Model.id == Checkpoint.model_id)
                .where(Model.name == model, ActivationSet.status == "complete")
            )
        names = sorted(s.scalars(query))
    if len(names) != 1:
        where = f"{model} has complete sets on" if model is not None else "the store has"
        listed = f" ({', '.join(names)})" if names else ""
        raise ActdbError(f"{where} {len(names)} datasets{listed}; pass --dataset")
    return names[0]


def complete_set(session: Session, ref: SetRef, dataset: str | None, hook: str = HOOK_NAME) -> ActivationSet:
    """The complete activation set of MODEL@STEP (on `dataset`, or its only dataset), or a one-line error."""
    ckpt = get_checkpoint(session, ref.model, ref.step)
    q = (
        select(ActivationSet, Dataset.name)
        .join(Dataset)
        .where(ActivationSet.checkpoint_id == ckpt.id, ActivationSet.hook == hook)
    )
    want = ref.dataset or dataset
    if want:
        get_dataset(session, want)
        q = q.where(Dataset.name == want)
    rows = session.execute(q).all()
    if not rows:
        on = f" on dataset {want!r}" if want else ""
        flag = "" if hook == HOOK_NAME else f" --hook {hook}"
        raise ActdbError(
            f"{ref} has no activation set{on} (hook {hook}); run `actdb ingest {ref.model} --step {ref.step} "
            f"--dataset {want or 'DATASET'}{flag}` first"
        )
    if len(rows) > 1:
        raise ActdbError(f"{ref} has sets on several datasets ({', '.join(n for _a, n in rows)}); pass --dataset")
    aset, ds_name = rows[0]
    if aset.status != "complete":
        raise ActdbError(
            f"the activation set of {ref} on {ds_name} is {aset.status}, not complete; finish it with `actdb ingest`"
        )
    return aset


def resolve_sets(store: Store, refs: list[SetRef], dataset: str | None, hook: str = HOOK_NAME) -> list[ActivationSet]:
    """Complete activation sets for the references, all on one dataset and hook, or a one-line error."""
    if len(set(refs)) != len(refs):
        raise ActdbError("the same activation set is listed twice")
    with store.session() as s:
        found = [complete_set(s, ref, dataset, hook) for ref in refs]
    if len({a.dataset_id for a in found}) > 1:
        raise ActdbError("the sets are on different datasets; correlate sets of one dataset (pass --dataset)")
    return found


def get_or_create(store: Store, cls: type, lookup: dict, defaults: dict) -> object:
    """Insert a row keyed by `lookup` unless it exists; a concurrent insert of the same key is tolerated."""
    with store.session() as s:
        row = s.scalar(select(cls).filter_by(**lookup))
        if row is not None:
            return row
    try:
        with store.session() as s:
            row = cls(**lookup, **defaults)
            s.add(row)
        return row
    except IntegrityError:
        with store.session() as s:
            return s.scalar(select(cls).filter_by(**lookup))


def resolve_hook(
    store: Store,
    hook: str | None,
    model: str | None = None,
    step: int | None = None,
    dataset: str | None = None,
    run: int | None = None,
) -> str | None:
    """The hook a read uses: `hook` when given (an error naming the hooks present when no complete set in scope
    has it), else the only hook of the complete sets in scope (MODEL, STEP, DATASET, the members of RUN when
    given); several hooks are a one-line error asking for --hook. None when no set is in scope: the caller says
    what is missing."""
    query = (
        select(ActivationSet.hook)
        .distinct()
        .join(Checkpoint, Checkpoint.id == ActivationSet.checkpoint_id)
        .join(Model, Model.id == Checkpoint.model_id)
        .join(Dataset, Dataset.id == ActivationSet.dataset_id)
        .where(ActivationSet.status == "complete")
    )
    for column, value in ((Model.name, model), (Checkpoint.step, step), (Dataset.name, dataset)):
        if value is not None:
            query = query.where(column == value)
    if run is not None:
        query = query.join(RunMember, RunMember.set_id == ActivationSet.id).where(RunMember.run_id == run)
    present = sorted(store.query(query).column("hook"))
    scope = (
        f"{model}@{step}"
        if model is not None and step is not None
        else model or (f"step {step}" if step is not None else "the store")
    )
    scope += f" in run {run}" if run is not None else ""
    if hook is not None:
        if present and hook not in present:
            raise ActdbError(f"{scope} has no complete sets at hook {hook}; hooks present: {', '.join(present)}")
        return hook
    if len(present) > 1:
        raise ActdbError(f"{scope} has sets at hooks {', '.join(present)}; choose one with --hook")
    return present[0] if present else None
