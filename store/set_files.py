"""Opening an activation set's file for reading: the header must say what the set's SQL row says.

A file at a set's path may be another model's, step's, dataset's, hook's or width's file (copied, swapped, or
left by a half-finished repair); every reader opens sets through `open_set` (or passes `expected_header` to
`ActivationReader`), so such a file is refused in one line naming the mismatch before any of its data is used.
The sidecars (a checkpoint's predictions, a set's explanations) are compared the same way, against
`sidecar_identity` / `set_identity`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from sqlalchemy import select

from actdb.store.database import tables
from actdb.store.database.connection import Store
from actdb.store.files.activation import ActivationHeader, ActivationReader
from actdb.store.files.identity import SidecarIdentity

if TYPE_CHECKING:
    from sqlalchemy import Connection
    from sqlalchemy.orm import Session


def expected_header(conn: Connection | Session, aset: Any) -> ActivationHeader:
    """The header a set's file must carry, from its SQL rows (model, step, dataset fingerprint, hook, shape,
    dtype); `aset` is the set's row (Core or ORM: `id`, `hook`, `n_tokens`, `dtype`)."""
    model, checkpoint, dataset, activation_set = tables.model, tables.checkpoint, tables.dataset, tables.activation_set
    found = conn.execute(
        select(model.c.name, model.c.n_layers, model.c.d_mlp, checkpoint.c.step, dataset.c.fingerprint)
        .select_from(activation_set)
        .join(checkpoint, checkpoint.c.id == activation_set.c.checkpoint_id)
        .join(model, model.c.id == checkpoint.c.model_id)
        .join(dataset, dataset.c.id == activation_set.c.dataset_id)
        .where(activation_set.c.id == aset.id)
    ).one()
    return ActivationHeader(
        model=found.name,
        step=int(found.step),
        dataset_fingerprint=found.fingerprint,
        hook=aset.hook,
        n_layers=found.n_layers,
        d_mlp=found.d_mlp,
        n_tokens=int(aset.n_tokens),
        dtype=aset.dtype,
    )


def open_set(store: Store, aset: Any) -> ActivationReader:
    """A reader of the set's file, after checking its header against the set's SQL rows."""
    with store.transaction() as conn:
        expected = expected_header(conn, aset)
    return ActivationReader(store.config.file(aset.path), expected=expected)


def sidecar_identity(
    conn: Connection | Session, checkpoint_id: int, dataset_id: int, hook: str | None = None
) -> SidecarIdentity:
    """What a sidecar of a checkpoint on a dataset (at `hook`, for a set's explanations) must say it is, from SQL:
    model, step, the dataset's fingerprint and the checkpoint's weights fingerprint."""
    model, checkpoint, dataset = tables.model, tables.checkpoint, tables.dataset
    found = conn.execute(
        select(model.c.name, checkpoint.c.step, checkpoint.c.weights_sha256)
        .join(model, model.c.id == checkpoint.c.model_id)
        .where(checkpoint.c.id == checkpoint_id)
    ).one()
    fingerprint = conn.execute(select(dataset.c.fingerprint).where(dataset.c.id == dataset_id)).scalar_one()
    return SidecarIdentity(
        model=found.name,
        step=int(found.step),
        dataset_fingerprint=fingerprint,
        hook=hook,
        weights_sha256=found.weights_sha256,
    )


def set_identity(conn: Connection | Session, set_id: int) -> SidecarIdentity:
    """What the explanation file of an activation set must say it is (its checkpoint, dataset and hook)."""
    aset = tables.activation_set
    found = conn.execute(select(aset.c.checkpoint_id, aset.c.dataset_id, aset.c.hook).where(aset.c.id == set_id)).one()
    return sidecar_identity(conn, found.checkpoint_id, found.dataset_id, found.hook)
