"""Opening an activation set's file for reading: the header must say what the set's SQL row says.

A file at a set's path may be another model's, step's, dataset's, hook's or width's file (copied, swapped, or
left by a half-finished repair); every reader opens sets through `open_set` (or passes `expected_header` to
`ActivationReader`), so such a file is refused in one line naming the mismatch before any of its data is used.
"""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.orm import Session

from actdb.store.database.connection import Store
from actdb.store.database.schema import ActivationSet, Checkpoint, Dataset, Model
from actdb.store.files.activation import ActivationHeader, ActivationReader


def expected_header(session: Session, aset: ActivationSet) -> ActivationHeader:
    """The header a set's file must carry, from its SQL rows (model, step, dataset fingerprint, hook, shape,
    dtype)."""
    model, step, fingerprint = session.execute(
        select(Model, Checkpoint.step, Dataset.fingerprint)
        .select_from(ActivationSet)
        .join(Checkpoint, Checkpoint.id == ActivationSet.checkpoint_id)
        .join(Model, Model.id == Checkpoint.model_id)
        .join(Dataset, Dataset.id == ActivationSet.dataset_id)
        .where(ActivationSet.id == aset.id)
    ).one()
    return ActivationHeader(
        model=model.name,
        step=int(step),
        dataset_fingerprint=fingerprint,
        hook=aset.hook,
        n_layers=model.n_layers,
        d_mlp=model.d_mlp,
        n_tokens=int(aset.n_tokens),
        dtype=aset.dtype,
    )


def open_set(store: Store, aset: ActivationSet) -> ActivationReader:
    """A reader of the set's file, after checking its header against the set's SQL rows."""
    with store.session() as s:
        expected = expected_header(s, aset)
    return ActivationReader(store.config.file(aset.path), expected=expected)
