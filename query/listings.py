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


def dataset_rows(store: Store, name: str | None = None, full: bool = False) -> tuple[list[str], list[tuple]]:
    columns = ["name", "n_sequences", "seq_len", "n_tokens", "n_counted", "tokenizer", "token_sha256"]
    if full:
        columns += ["vocab_size", "tokenizer_fingerprint", "seed", "source", "path", "created_at"]
    with store.session() as s:
        q = select(Dataset).order_by(Dataset.name)
        if name is not None:
            from store.registry import get_dataset

            get_dataset(s, name)
            q = q.where(Dataset.name == name)
        rows = [tuple(getattr(d, c) for c in columns) for d in s.scalars(q)]
    if not full:
        rows = [r[:-1] + (r[-1][:12],) for r in rows]
    return columns, rows
