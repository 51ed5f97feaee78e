"""Where a store lives: the folder for HDF5 files and the SQL database URL, and the rule from names to files.

File paths are derived from names by an injective rule (percent-encoding every character other than letters,
digits, `_`, `-` and a non-leading `.`) and stored relative to the store folder, so two names never share a
file and a store folder copied or moved together with its SQLite file works from its new place. Model sources
and dataset tokenizers inside the store folder are recorded the same way (`store:<relative path>`), so a zoo
kept in the store moves with it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from actdb.store.errors import ActdbError

DEFAULT_HOME = "actdb-store"
SQLITE_NAME = "actdb.sqlite"
STORE_SOURCE = "store:"
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

    def recorded_source(self, source: str) -> str:
        """How a model source (or source template) is recorded: an absolute local path inside the store folder
        becomes `store:<relative path>`; anything else is kept as given."""
        if not os.path.isabs(source) or source.startswith(STORE_SOURCE):
            return source
        home = os.path.abspath(self.home)
        if os.path.commonpath([home, source]) != home or source == home:
            return source
        return STORE_SOURCE + Path(os.path.relpath(source, home)).as_posix()

    def recorded_path_or_id(self, given: str) -> str:
        """How a tokenizer (or other source) typed by a user is recorded: an existing local path (relative to the
        working folder, `~` expanded) as `recorded_source` records its absolute form, so that neither the working
        folder nor the store's place matters when it is read back; anything else (a hub id) as given."""
        local = os.path.expanduser(given)
        if not Path(local).exists():
            return given
        return self.recorded_source(os.path.abspath(local))

    def locate(self, source: str) -> str:
        """What a recorded source loads from: a `store:` path under this store folder, anything else as recorded
        (a hub id, or a local path outside the store)."""
        if source.startswith(STORE_SOURCE):
            return str(self.home / source.removeprefix(STORE_SOURCE))
        return source

    def model_location(self, recorded: str, what: str) -> str:
        """Where a checkpoint (or a dataset's tokenizer) recorded as `recorded` loads from, checked before any run
        starts: a one-line error when its local files are gone."""
        location = self.locate(recorded)
        if (recorded.startswith(STORE_SOURCE) or os.path.isabs(recorded)) and not Path(location).exists():
            raise ActdbError(f"the files of {what} are gone: {location} does not exist")
        return location

    def tokenizer_location(self, recorded: str, dataset: str) -> str:
        """Where the tokenizer of `dataset`, recorded as `recorded`, loads from: `model_location`'s rule and check
        (stores written before tokenizers were recorded store-relative hold absolute paths, which load as such)."""
        return self.model_location(recorded, f"the tokenizer of dataset {dataset}")

    @staticmethod
    def activation_path(model: str, step: int, dataset: str, hook: str) -> str:
        """Path, relative to the store folder, of one activation set's HDF5 file."""
        return f"activations/{file_name_of(model)}/step-{step}/{file_name_of(dataset)}.{file_name_of(hook)}.h5"

    @staticmethod
    def dataset_path(dataset: str) -> str:
        """Path, relative to the store folder, of a token dataset's HDF5 file."""
        return f"datasets/{file_name_of(dataset)}.tokens.h5"
