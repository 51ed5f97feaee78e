"""`actdb dataset add`: build a token dataset from documents and register it (file first, then the SQL row)."""

from __future__ import annotations

import json
from collections.abc import Callable

from sqlalchemy import select

from actdb.store.database import tables
from actdb.store.database.connection import Store
from actdb.store.database.registry import check_new_name
from actdb.store.database.schema import Dataset
from actdb.store.errors import ActdbError
from actdb.store.ingest.token_datasets import document_refs, load_tokenizer, pack_documents, resolve_exclusions
from actdb.store.refs import check_name


def add_dataset(
    store: Store,
    name: str,
    sources: list[str],
    tokenizer: str,
    seq_len: int,
    n_tokens: int | None,
    seed: int,
    field: str = "text",
    exclude_tokens: str | None = None,
    log: Callable[[str], None] = print,
) -> Dataset:
    """Tokenize and pack `sources` into `<home>/datasets/<name>.tokens.h5` and record it (a local tokenizer
    folder absolute, or as `store:<relative path>` when it lies inside the store, so the store stays movable)."""
    check_name(name, "dataset name")
    with store.session() as s:
        if s.scalar(select(Dataset).where(Dataset.name == name)) is not None:
            raise ActdbError(f"dataset {name!r} already exists; pick another name")
        check_new_name(s, tables.dataset, name, "dataset name")
    tok = load_tokenizer(tokenizer)
    excluded = resolve_exclusions(tok, exclude_tokens)
    refs, reader = document_refs(sources, field)
    if not refs:
        raise ActdbError("no documents found in " + ", ".join(sources))
    packed = pack_documents(refs, reader, tok, seq_len, n_tokens, seed, [i for i, _t in excluded])
    if n_tokens is not None and packed.tokens.size < n_tokens:
        log(
            f"note: the documents fill only {packed.tokens.size} token positions ({int(packed.mask.sum())} counted), "
            f"fewer than --tokens {n_tokens}"
        )
    rel_path = store.config.dataset_path(name)
    path = store.config.file(rel_path)
    try:
        packed.save(path)
    except OSError as exc:
        raise ActdbError(f"cannot write {path}: {exc.strerror or exc}") from None
    row = Dataset(
        name=name,
        tokenizer=store.config.recorded_path_or_id(tokenizer),
        tokenizer_fingerprint=packed.tokenizer_fingerprint,
        vocab_size=len(tok),
        seq_len=seq_len,
        n_sequences=packed.n_sequences,
        n_tokens=int(packed.tokens.size),
        n_counted=int(packed.mask.sum()),
        token_sha256=packed.sha256,
        excluded_tokens=json.dumps(excluded),
        fingerprint=packed.fingerprint,
        source=", ".join(sources),
        seed=seed,
        path=rel_path,
    )
    with store.session() as s:
        s.add(row)
    return row
