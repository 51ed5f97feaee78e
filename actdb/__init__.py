"""actdb: an activation store and query tool for neuron-level studies of language models across seeds and
checkpoints.

    >>> import actdb
    >>> db = actdb.open(home="actdb-demo")          # the store's folder; db= for PostgreSQL
    >>> db.universal(step=800).head(3)              # a pandas DataFrame, columns named as in the CLI's JSON
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from actdb.query.api import ActdbStore

__version__ = "0.1.0"  # the package's version (pyproject reads it from here); no metadata lookup at start-up

__all__ = ["__version__", "open"]


def open(home: str | os.PathLike | None = None, db: str | None = None) -> ActdbStore:
    """Open an existing store for reading: `home` is its folder (default $ACTDB_HOME or ./actdb-store), `db` a
    database URL (default $ACTDB_DATABASE_URL or the SQLite file in `home`)."""
    from actdb.query.api import ActdbStore

    return ActdbStore.open(home, db)
