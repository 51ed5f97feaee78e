"""Listings of what a store holds (`status`, `dataset list/show`), as rows addressed by column name."""

from __future__ import annotations

from sqlalchemy import select

from actdb.store.database import tables
from actdb.store.database.connection import Rows, Store
from actdb.store.database.registry import get_dataset

STATUS_COLUMNS = ["model", "family", "layers", "d_mlp", "step", "dataset", "status", "progress", "bytes", "path"]


def status_rows(store: Store) -> Rows:
    """One row per activation set, plus models and checkpoints that have none yet."""
    m, c, a, d = tables.model, tables.checkpoint, tables.activation_set, tables.dataset
    query = (
        select(
            m.c.name.label("model"),
            m.c.family,
            m.c.n_layers,
            m.c.d_mlp,
            c.c.step,
            d.c.name.label("dataset"),
            a.c.status,
            a.c.tokens_done,
            a.c.n_tokens,
            a.c.bytes,
            a.c.path,
        )
        .select_from(m)
        .join(tables.checkpoint, tables.checkpoint.c.model_id == tables.model.c.id, isouter=True)
        .join(tables.activation_set, tables.activation_set.c.checkpoint_id == tables.checkpoint.c.id, isouter=True)
        .join(tables.dataset, tables.dataset.c.id == tables.activation_set.c.dataset_id, isouter=True)
        .order_by(tables.model.c.name, tables.checkpoint.c.step, tables.dataset.c.name)
    )
    rows = []
    for r in store.query(query):
        progress = f"{100.0 * r['tokens_done'] / r['n_tokens']:.0f}%" if r["n_tokens"] else None
        state = r["status"]
        if state == "complete" and not store.config.file(r["path"]).exists():
            state = "missing"  # recorded complete, but its file is gone (see `actdb check`)
        rows.append(
            {
                "model": r["model"],
                "family": r["family"],
                "layers": r["n_layers"],
                "d_mlp": r["d_mlp"],
                "step": r["step"],
                "dataset": r["dataset"],
                "status": state,
                "progress": progress,
                "bytes": r["bytes"],
                "path": r["path"],
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
    with store.transaction() as conn:
        query = select(tables.dataset).order_by(tables.dataset.c.name)
        if name is not None:
            get_dataset(conn, name)
            query = query.where(tables.dataset.c.name == name)
        rows = [{c: getattr(d, c) for c in columns} for d in conn.execute(query)]
    if not full:
        for r in rows:
            r["token_sha256"] = r["token_sha256"][:12]
    return Rows(columns, rows)
