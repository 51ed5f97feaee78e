"""Where a store lives: the folder for HDF5 files and the SQL database URL, and the rule from names to files.

File paths are derived from names by an injective rule (percent-encoding every character other than letters,
digits, `_`, `-` and a non-leading `.`) and stored relative to the store folder, so two names never share a
file and a store folder copied or moved together with its SQLite file works from its new place.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

DEFAULT_HOME = "actdb-store"
SQLITE_NAME = "actdb.sqlite"
_SAFE = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-.")


def file_name_of(name: str) -> str:
    """Injective, filesystem-safe form of a name: unsafe characters (and `%` itself, and a leading `.`) become
    `%XX` escapes of their UTF-8 bytes, so distinct names always give distinct file names."""
    out = []
    for i, ch in enumerate(name):
        if ch in _SAFE and not (ch == "." and i == 0):
            out.append(ch)
        else:
            out.extend(f"%{b:02X}" for b in ch.encode("utf-8"))
    return "".join(out)


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

    def file(self, stored_path: str) -> Path:
        """The file a path recorded in SQL refers to (recorded paths are relative to the store folder)."""
        return self.home / stored_path

    @staticmethod
    def activation_path(model: str, step: int, dataset: str, hook: str) -> str:
        """Path, relative to the store folder, of one activation set's HDF5 file."""
        return f"activations/{file_name_of(model)}/step-{step}/{file_name_of(dataset)}.{file_name_of(hook)}.h5"

    @staticmethod
    def dataset_path(dataset: str) -> str:
        """Path, relative to the store folder, of a token dataset's HDF5 file."""
        return f"datasets/{file_name_of(dataset)}.tokens.h5"
