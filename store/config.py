"""Where a store lives: the root folder for HDF5 files and the SQL database URL."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

DEFAULT_HOME = "actdb-store"
SQLITE_NAME = "actdb.sqlite"


@dataclass(frozen=True)
class StoreConfig:
    """Resolved location of a store: `home` holds HDF5 files, `database_url` the metadata."""

    home: Path
    database_url: str

    @classmethod
    def resolve(cls, home: str | os.PathLike | None = None, database_url: str | None = None) -> StoreConfig:
        """Flags win over ACTDB_HOME / ACTDB_DATABASE_URL, which win over ./actdb-store with an SQLite file."""
        home_path = Path(home or os.environ.get("ACTDB_HOME") or DEFAULT_HOME).expanduser().absolute()
        url = database_url or os.environ.get("ACTDB_DATABASE_URL") or f"sqlite:///{home_path / SQLITE_NAME}"
        return cls(home=home_path, database_url=url)

    @property
    def is_sqlite(self) -> bool:
        return self.database_url.startswith("sqlite")

    def activation_path(self, model: str, step: int, dataset: str, hook: str) -> Path:
        """Path of one activation set's HDF5 file, relative names kept filesystem-safe."""
        return self.home / "activations" / _safe(model) / f"step-{step}" / f"{_safe(dataset)}.{_safe(hook)}.h5"

    def dataset_path(self, dataset: str) -> Path:
        return self.home / "datasets" / f"{_safe(dataset)}.tokens.h5"


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)
