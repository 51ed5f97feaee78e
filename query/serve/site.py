"""What every page handler shares: the read-only store, the template environment, the models loaded for "try a
text", and the SQL door's table and view listing (read once)."""

from __future__ import annotations

import functools
import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import TypeVar

from jinja2 import Environment
from sqlalchemy import func, select

from actdb.query.text_activations import LoadedModels
from actdb.store.database import tables
from actdb.store.database.connection import Store

T = TypeVar("T")
CACHED_PAGES = 512


def generation(store: Store) -> tuple:
    """What changes whenever a result a page shows can change: per run table the number of complete runs and the
    latest finish, and the size of the tables without a lifecycle. One small query (the tables are small)."""
    parts = []
    for table in (tables.activation_set, tables.correlation_run, tables.ablation, tables.concept_run):
        done = table.c.status == "complete"
        parts.append(select(func.count()).select_from(table).where(done).scalar_subquery())
        parts.append(select(func.max(table.c.finished_at)).where(done).scalar_subquery())
    for table in (tables.persistence, tables.set_explanation, tables.model, tables.checkpoint, tables.dataset):
        parts.append(select(func.count()).select_from(table).scalar_subquery())
    row = store.query(select(*parts)).first()
    return tuple(row.values()) if row is not None else ()


@dataclass
class Site:
    store: Store
    env: Environment
    loaded: LoadedModels
    _cache: OrderedDict = field(default_factory=OrderedDict, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def cached(self, key: Hashable, read: Callable[[], T]) -> T:
        """`read()`, kept until the store's `generation` changes (a run completes, a set is ingested, ...): the
        whole-store aggregates (the home grid, counts over every universality row) are read once per generation.
        Neuron pages are not kept: caching them bought little under load and grew the server by ~30 MiB.
        At most CACHED_PAGES results, least recently used dropped first."""
        now = generation(self.store)
        with self._lock:
            hit = self._cache.get(key)
            if hit is not None and hit[0] == now:
                self._cache.move_to_end(key)
                return hit[1]
        value = read()
        with self._lock:
            self._cache[key] = (now, value)
            while len(self._cache) > CACHED_PAGES:
                self._cache.popitem(last=False)
        return value

    @functools.cached_property
    def relations(self) -> list[tuple[str, str, list[str]]]:
        """(kind, name, columns) of every table and view the SQL door reads, views first."""
        from actdb.query.sql_console import schema_listing

        _cols, listing = schema_listing(self.store.config)
        named: dict[tuple[str, str], list[str]] = {}
        for kind, name, column, _type in listing:
            named.setdefault((kind, name), []).append(column)
        return sorted(((k, n, c) for (k, n), c in named.items()), key=lambda r: (r[0] != "view", r[1]))

    def render(self, template: str, **context: object) -> str:
        return self.env.get_template(template).render(**context)
