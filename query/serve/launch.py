"""How to open a store in the explorer: the command line a user can paste (the demo ends by printing it)."""

from __future__ import annotations

import shlex

from actdb.store.config import SQLITE_NAME, StoreConfig
from actdb.store.database.connection import safe_url


def browse_command(config: StoreConfig) -> str:
    """`actdb --home HOME [--db URL] serve`: `--db` only when the database is not the folder's own SQLite file,
    and never with a password."""
    command = f"actdb --home {shlex.quote(str(config.home))}"
    if config.database_url != f"sqlite:///{config.home / SQLITE_NAME}":
        command += f" --db {shlex.quote(safe_url(config.database_url))}"
    return command + " serve"
