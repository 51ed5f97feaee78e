"""Finding and registering models, checkpoints, datasets and activation sets; claiming a set for one writer."""

from __future__ import annotations

import os
import socket
from datetime import timedelta

from sqlalchemy import or_, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from actdb.store.database import Store
from actdb.store.errors import ActdbError, BusyError
from actdb.store.schema import ActivationSet, Checkpoint, Dataset, Model, utcnow

STALE_AFTER = timedelta(seconds=120)


def owner_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


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
        steps = (
            ", ".join(
                str(s)
                for s in session.scalars(
                    select(Checkpoint.step).where(Checkpoint.model_id == model.id).order_by(Checkpoint.step)
                )
            )
            or "none"
        )
        raise ActdbError(f"model {model_name!r} has no step {step} (steps: {steps})")
    return ckpt


def find_set(session: Session, model_name: str, step: int, dataset: str, hook: str) -> ActivationSet | None:
    return session.scalar(
        select(ActivationSet)
        .join(Checkpoint, ActivationSet.checkpoint_id == Checkpoint.id)
        .join(Model, Checkpoint.model_id == Model.id)
        .join(Dataset, ActivationSet.dataset_id == Dataset.id)
        .where(Model.name == model_name, Checkpoint.step == step, Dataset.name == dataset, ActivationSet.hook == hook)
    )


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


def claim_set(store: Store, set_id: int, force: bool) -> str:
    """Atomically make this process the set's only writer; returns the status it had before."""
    me = owner_id()
    now = utcnow()
    with store.session() as s:
        before = s.get(ActivationSet, set_id)
        if before.status == "complete" and not force:
            return "complete"
        prior = before.status
        claimable = [ActivationSet.status.in_(("pending", "failed"))]
        if force:
            claimable.append(ActivationSet.status == "complete")
        claimable.append((ActivationSet.status == "running") & (ActivationSet.heartbeat_at < now - STALE_AFTER))
        if before.status == "running" and before.owner and _owner_is_dead(before.owner):
            claimable.append((ActivationSet.status == "running") & (ActivationSet.owner == before.owner))
        result = s.execute(
            update(ActivationSet)
            .where(ActivationSet.id == set_id, or_(*claimable))
            .values(status="running", owner=me, heartbeat_at=now, started_at=now, error=None)
        )
        if result.rowcount != 1:
            s.rollback()
            raise BusyError(
                f"activation set {set_id} is being ingested by {before.owner} right now; "
                "nothing to do here (it resumes from there if that process dies)"
            )
    return prior


def _owner_is_dead(owner: str) -> bool:
    host, _, pid = owner.rpartition(":")
    if host != socket.gethostname() or not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False
