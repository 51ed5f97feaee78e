"""A database belongs to one store folder: the `store_identity` row and the folder's `actdb-store-id` file hold
the same id, written by the first `actdb init`.

Paths in SQL are relative to the store folder, so two folders on one database would each miss the other's
files (and `init` of a second folder would silently adopt the first store's rows); one folder on two databases
would let each overwrite the other's files. Both are refused in one line: at `init`, and when a store is
opened. A store copied or moved together with its id file (and its SQLite file) keeps working.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path

from sqlalchemy import Engine, insert, inspect, select
from sqlalchemy.exc import IntegrityError

from actdb.store.database.tables import store_identity
from actdb.store.errors import ActdbError

ID_FILE = "actdb-store-id"


def folder_id(home: Path) -> str | None:
    """The id recorded in a store folder (None when the folder has none)."""
    try:
        return (home / ID_FILE).read_text().strip() or None
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise ActdbError(f"cannot read {home / ID_FILE}: {exc.strerror or exc}") from None


def _database_row(engine: Engine) -> tuple[str, str] | None:
    with engine.connect() as conn:
        row = conn.execute(
            select(store_identity.c.store_id, store_identity.c.home).order_by(store_identity.c.id)
        ).first()
    return None if row is None else (row.store_id, row.home)


def _mismatch(home: Path, url: str, mine: str | None, bound: tuple[str, str] | None) -> str | None:
    """Why this folder and this database are not one store (None when they are, or when neither is bound)."""
    if bound is None:
        if mine is None:
            return None
        return (
            f"store folder {home} belongs to another database (store id {mine[:8]}), not {url}; give this database "
            f"its own folder (--home), or delete {home / ID_FILE} if that database is gone"
        )
    theirs, where = bound
    if mine == theirs or (mine is None and where == str(home)):  # the same folder (its id file lost, or unwritten)
        return None
    if mine is None:
        return (
            f"database {url} already holds the store of folder {where} (store id {theirs[:8]}); use --home {where}, "
            "or give this store its own database (--db)"
        )
    return (
        f"store folder {home} (store id {mine[:8]}) and database {url} (store id {theirs[:8]}, folder {where}) "
        "belong to different stores; pair each folder with its own database"
    )


def bind_folder(engine: Engine, home: Path, url: str) -> None:
    """At `init`: bind a new database and folder to a fresh id, or refuse a folder and database of two stores."""
    mine, bound = folder_id(home), _database_row(engine)
    problem = _mismatch(home, url, mine, bound)
    if problem:
        raise ActdbError(problem)
    if bound is None:
        store_id = str(uuid.uuid4())
        try:
            with engine.begin() as conn:  # the one row (id 1): of two concurrent inits, one binds the database
                conn.execute(insert(store_identity).values(id=1, store_id=store_id, home=str(home)))
        except IntegrityError:
            problem = _mismatch(home, url, mine, _database_row(engine))
            if problem:
                raise ActdbError(problem) from None
            return
    else:
        store_id = bound[0]
    if mine != store_id:
        tmp = home / f"{ID_FILE}.{os.getpid()}.tmp"
        try:
            tmp.write_text(store_id + "\n")
            os.replace(tmp, home / ID_FILE)
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            raise ActdbError(f"cannot write {home / ID_FILE}: {exc.strerror or exc}") from None


def check_unbound(engine: Engine | None, home: Path, url: str) -> None:
    """Before `init` creates or upgrades anything: refuse a folder and a database (None: an SQLite file not yet
    created) that belong to different stores."""
    bound = None
    if engine is not None:
        with engine.connect() as conn:
            if inspect(conn).has_table(store_identity.name):
                bound = _database_row(engine)
    problem = _mismatch(home, url, folder_id(home), bound)
    if problem:
        raise ActdbError(problem)


def check_folder(engine: Engine, home: Path, url: str) -> None:
    """When a store is opened: its folder must be the one its database was initialised with (a database from
    before store ids, with no row, is accepted until `init` binds it)."""
    with engine.connect() as conn:
        if not inspect(conn).has_table(store_identity.name):
            return  # `init` creates it
    bound = _database_row(engine)
    if bound is None:
        return
    problem = _mismatch(home, url, folder_id(home), bound)
    if problem:
        raise ActdbError(problem)
