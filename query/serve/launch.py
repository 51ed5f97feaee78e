"""How to open a store in the explorer: the command line a user can paste (the demo ends by printing it)."""

from __future__ import annotations

import os
import shlex
import shutil
import sys
from pathlib import Path

from actdb.store.config import SQLITE_NAME, StoreConfig
from actdb.store.database.connection import safe_url


def actdb_command() -> str:
    """This installation's `actdb` as a fresh shell runs it: bare `actdb` when that name on PATH is this
    installation's script, else the script's path (relative when under the current folder: `.venv/bin/actdb`
    after `scripts/bootstrap.sh`, whose venv no shell has activated), else `python -m` on this interpreter."""
    own = shutil.which("actdb", path=str(Path(sys.executable).parent))  # the console script beside the interpreter
    if own is None:
        return f"{shlex.quote(sys.executable)} -m actdb.query.cli"
    on_path = shutil.which("actdb")
    if on_path is not None and os.path.samefile(on_path, own):
        return "actdb"
    script = Path(own).absolute()
    if not script.is_relative_to(Path.cwd()):
        return shlex.quote(str(script))
    relative = script.relative_to(Path.cwd())
    return shlex.quote(str(relative) if relative.parent != Path(".") else f"./{relative}")  # a path, not a name


def browse_command(config: StoreConfig) -> str:
    """`actdb --home HOME [--db URL] serve`, with `actdb` as `actdb_command` spells it: `--db` only when the
    database is not the folder's own SQLite file, and never with a password."""
    command = f"{actdb_command()} --home {shlex.quote(str(config.home))}"
    if config.database_url != f"sqlite:///{config.home / SQLITE_NAME}":
        command += f" --db {shlex.quote(safe_url(config.database_url))}"
    return command + " serve"
