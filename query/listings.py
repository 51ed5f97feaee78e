"""Listings of what a store holds (`status`, `dataset list/show`), as rows addressed by column name."""

from __future__ import annotations

from sqlalchemy import select

from actdb.store.database.connection import Rows, Store
from actdb.store.database.registry import get_dataset
from actdb.store.database.schema import ActivationSet, Checkpoint, Dataset, Model

STATUS_COLUMNS = ["model", "family", "layers", "d_mlp", "step", "dataset", "status", "progress", "bytes", "path"]


def status_rows(store: Store) -> Rows:
    """One row per activation set, plus models and checkpoints that have none yet."""
    query = (
        select(Model, Checkpoint, ActivationSet, Dataset)
        .join(Checkpoint, Checkpoint.model_id == Model.id, isouter=True)
        .join(ActivationSet, ActivationSet.checkpoint_id == Checkpoint.id, isouter=True)
        .join(Dataset, Dataset.id == ActivationSet.dataset_id, isouter=True)
        .order_by(Model.name, Checkpoint.step, Dataset.name)
    )
    rows = []
    with store.session() as s:
        for m, c, a, d in s.execute(query):
            progress = f"{100.0 * a.tokens_done / a.n_tokens:.0f}%" if a is not None and a.n_tokens else None
            state = a.status if a else None
            if state == "complete" and not store.config.file(a.path).exists():
                state = "missing"  # recorded complete, but its file is gone (see `actdb check`)
            rows.append(
                {
                    "model": m.name,
                    "family": m.family,
                    "layers": m.n_layers,
                    "d_mlp": m.d_mlp,
                    "step": c.step if c else None,
                    "dataset": d.name if d else None,
                    "status": state,
                    "progress": progress,
                    "bytes": a.bytes if a else None,
                    "path": a.path if a else None,
                }
            )
    return Rows(STATUS_COLUMNS, rows)


DATASET_COLUMNS = ["name", "n_sequences", "seq_len", "n_tokens", "n_counted", "tokenizer", "token_sha256"]
DATASET_DETAIL = [
    "excluded_tokens",
    "fingerprint",
    "vocab_size",
    "tokenizer_fingerprint",
    "seed",
    "source",
    "path",
    "created_at",
]


def dataset_rows(store: Store, name: str | None = None, full: bool = False) -> Rows:
    """Every dataset (or one, by name); `full` adds provenance and the whole fingerprints."""
    columns = DATASET_COLUMNS + (DATASET_DETAIL if full else [])
    with store.session() as s:
        query = select(Dataset).order_by(Dataset.name)
        if name is not None:
            get_dataset(s, name)
            query = query.where(Dataset.name == name)
        rows = [{c: getattr(d, c) for c in columns} for d in s.scalars(query)]
    if not full:
        for r in rows:
            r["token_sha256"] = r["token_sha256"][:12]
    return Rows(columns, rows)
