"""Opening an activation set's file for reading: the header must say what the set's SQL row says.

A file at a set's path may be another model's, step's, dataset's, hook's or width's file (copied, swapped, or
left by a half-finished repair); every reader opens sets through `open_set` (or passes `expected_header` to
`ActivationReader`), so such a file is refused in one line naming the mismatch before any of its data is used.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from sqlalchemy import select

from actdb.store.database import tables
from actdb.store.database.connection import Store
from actdb.store.files.activation import ActivationHeader, ActivationReader

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
