"""Canned read queries behind the listing commands (`status`, `runs`, ...), returning columns and rows."""

from __future__ import annotations

from typing import Any

from sqlalchemy import select

from actdb.store.database import Store
from actdb.store.schema import ActivationSet, Checkpoint, Dataset, Model


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
            rows.append(
                (
                    m.name,
                    m.family,
                    m.n_layers,
                    m.d_mlp,
                    c.step if c else None,
                    d.name if d else None,
                    a.status if a else None,
                    progress,
                    a.bytes if a else None,
                    a.path if a else None,
                )
            )
    return columns, rows


def dataset_rows(store: Store, name: str | None = None, full: bool = False) -> tuple[list[str], list[tuple]]:
    columns = ["name", "n_sequences", "seq_len", "n_tokens", "n_counted", "tokenizer", "token_sha256"]
    if full:
        columns += ["vocab_size", "tokenizer_fingerprint", "seed", "source", "path", "created_at"]
    with store.session() as s:
        q = select(Dataset).order_by(Dataset.name)
        if name is not None:
            from actdb.store.registry import get_dataset

            get_dataset(s, name)
            q = q.where(Dataset.name == name)
        rows = [tuple(getattr(d, c) for c in columns) for d in s.scalars(q)]
    if not full:
        rows = [r[:-1] + (r[-1][:12],) for r in rows]
    return columns, rows


def single_dataset(store: Store) -> str:
    """The store's only dataset, or a one-line error asking for --dataset."""
    with store.session() as s:
        names = list(s.scalars(select(Dataset.name)))
    if len(names) != 1:
        from actdb.store.errors import ActdbError

        raise ActdbError(f"the store has {len(names)} datasets; pass --dataset")
    return names[0]


def persistence_rows(store: Store, model: str | None = None, control: str | None = None) -> tuple[list[str], list]:
    from actdb.store.schema import Persistence

    columns = [
        "model",
        "dataset",
        "control",
        "from_step",
        "to_step",
        "layer",
        "n_universal_from",
        "n_universal_to",
        "n_kept",
        "p_persist",
        "jaccard",
        "mean_self_corr",
    ]
    with store.session() as s:
        q = (
            select(
                Model.name,
                Dataset.name,
                Persistence.control,
                Persistence.from_step,
                Persistence.to_step,
                Persistence.layer,
                Persistence.n_universal_from,
                Persistence.n_universal_to,
                Persistence.n_kept,
                Persistence.p_persist,
                Persistence.jaccard,
                Persistence.mean_self_corr,
            )
            .join(Model, Model.id == Persistence.model_id)
            .join(Dataset, Dataset.id == Persistence.dataset_id)
            .order_by(Model.name, Persistence.control, Persistence.from_step, Persistence.layer)
        )
        if model:
            q = q.where(Model.name == model)
        if control:
            q = q.where(Persistence.control == control)
        rows = [tuple(r) for r in s.execute(q)]
    return columns, rows
