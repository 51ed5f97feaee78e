"""What every page handler shares: the read-only store, the template environment, the models loaded for "try a
text", and the SQL door's table and view listing (read once)."""

from __future__ import annotations

import functools
from dataclasses import dataclass

from jinja2 import Environment

from actdb.query.text_activations import LoadedModels
from actdb.store.database.connection import Store


@dataclass
class Site:
    store: Store
    env: Environment
    loaded: LoadedModels

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
