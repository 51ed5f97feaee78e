"""Canned read queries behind the listing commands (`status`, `runs`, ...), returning columns and rows."""

from __future__ import annotations

from typing import Any

from sqlalchemy import select

from store.database import Store
from store.schema import ActivationSet, Checkpoint, Dataset, Model


def status_rows(store: Store) -> tuple[list[str], list[tuple[Any, ...]]]:
    """One row per activation set, plus models and checkpoints that have none yet."""
    columns = ["model", "family", "layers", "d_mlp", "step", "dataset", "status", "progress", "bytes", "path"]
    with store.session() as s:
        q = (
            select(Model, Checkpoint, ActivationSet, Dataset)
            .join(Checkpoint, Checkpoint.model_id == Model.id, isouter=True)
            .join(ActivationSet, ActivationSet.checkpoint_id == Checkpoint.id, isouter=True)
            .join(Dataset, Dataset.id == ActivationSet.dataset_id, isouter=True)
            .order_by(Model.name, Checkpoint.step, Dataset.name)
        )
        rows = []
        for m, c, a, d in s.execute(q):
            progress = f"{100.0 * a.tokens_done / a.n_tokens:.0f}%" if a is not None and a.n_tokens else None
            rows.append((
                m.name, m.family, m.n_layers, m.d_mlp, c.step if c else None, d.name if d else None,
                a.status if a else None, progress, a.bytes if a else None, a.path if a else None,
            ))
    return columns, rows
