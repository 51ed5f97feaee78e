"""`actdb sql`: one read-only statement for analysts, read-only by construction.

SQLite: a `mode=ro` + `query_only` connection whose authorizer allows nothing but reading and whose progress handler
ends the statement at the deadline. PostgreSQL: a connection made as the store's reader role (SELECT only), in a READ
ONLY transaction with a server-side statement_timeout, the statement sent through the extended query protocol, whose
parser refuses more than one command. Nothing here inspects the SQL text. See `actdb.store.database.sql_reader`.
"""

from __future__ import annotations

import contextlib
import re
import sqlite3
from typing import Any

from sqlalchemy import inspect

from actdb.store.config import StoreConfig
from actdb.store.database.connection import make_engine
from actdb.store.database.sql_reader import (
    HIDDEN_TABLES,
    TABLE_FUNCTION,
    connect_postgres_reader,
    connect_sqlite_reader,
)
from actdb.store.errors import ActdbError, first_line

DEFAULT_TIMEOUT = 30.0
READ_ONLY = "refused: `actdb sql` is read-only"
ONE_STATEMENT = "refused: `actdb sql` runs exactly one statement"
# SQLSTATEs of what the guards stop: invalid transaction state (read-only transaction, transaction block),
# invalid transaction termination (COMMIT inside DO/CALL), missing privilege.
PG_REFUSED = ("25", "2D", "42501")
# Names a refused table-valued function may carry in the statement (for the message only; the authorizer decides).
TABLE_FUNCTION_NAME = re.compile(r"\b(pragma_\w+|json_each|json_tree|jsonb_each|jsonb_tree|generate_series|dbstat)\b")


def refuse_nul(sql: str) -> None:
    """A NUL character ends the text for PostgreSQL's parser, which would run only what precedes it: refuse it on
    every backend rather than run part of a statement."""
    at = sql.find("\x00")
    if at >= 0:
        raise ActdbError(f"refused: the statement holds a NUL character (U+0000) at offset {at}; remove it")


def run_readonly(
    config: StoreConfig, sql: str, timeout: float = DEFAULT_TIMEOUT
) -> tuple[list[str], list[tuple[Any, ...]]]:
    """Run exactly one statement that cannot write, ending it after `timeout` seconds; (columns, rows).

    Every failure is an ActdbError of one line: `refused: ...` for what the guards stop, `SQL error: ...` for
    mistakes, `query cancelled after N s (--timeout)` at the deadline.
    """
    if not timeout > 0:
        raise ActdbError("--timeout must be a positive number of seconds")
    refuse_nul(sql)
    if config.is_sqlite:
        return _run_sqlite(config.database_url, sql, timeout)
    engine = make_engine(config.database_url)
    try:
        return _run_postgres(engine, sql, timeout)
    finally:
        engine.dispose()


def _no_rows() -> tuple[list[str], list[tuple[Any, ...]]]:
    return ["result"], [("statement returned no rows",)]


def _cancelled(timeout: float) -> ActdbError:
    return ActdbError(f"query cancelled after {timeout:g} s (--timeout)")


def _run_sqlite(url: str, sql: str, timeout: float) -> tuple[list[str], list[tuple[Any, ...]]]:
    conn, guard = connect_sqlite_reader(url, timeout)
    try:
        cur = conn.execute(sql)  # sqlite3 compiles one statement and refuses any that follow
        if cur.description is None:
            return _no_rows()
        rows = [tuple(r) for r in cur.fetchall()]
        return [d[0] for d in cur.description], rows
    except sqlite3.Error as exc:
        if guard.timed_out:
            raise _cancelled(timeout) from None
        if guard.denied:
            raise ActdbError(f"{READ_ONLY} (not authorised: {_denied(guard.denied[0], sql)})") from None
        if isinstance(exc, sqlite3.ProgrammingError) and "one statement" in str(exc):
            raise ActdbError(f"{ONE_STATEMENT} ({first_line(exc)})") from None
        if getattr(exc, "sqlite_errorname", "") == "SQLITE_READONLY":
            raise ActdbError(f"{READ_ONLY} ({first_line(exc)})") from None
        raise ActdbError(f"SQL error: {first_line(exc)}") from None
    finally:
        conn.close()


def _denied(what: str, sql: str) -> str:
    """The authorizer's refusal in words, naming the table-valued function(s) of the statement when it was one."""
    if what != TABLE_FUNCTION:
        return what
    names = sorted({m.group(1).lower() for m in TABLE_FUNCTION_NAME.finditer(sql)})
    return f"{TABLE_FUNCTION} {', '.join(names)}" if names else f"a {TABLE_FUNCTION}"


def _run_postgres(engine, sql: str, timeout: float) -> tuple[list[str], list[tuple[Any, ...]]]:
    import psycopg
    from psycopg import errors

    conn = connect_postgres_reader(engine, timeout)
    try:
        # prepare=True sends Parse/Bind/Execute: the server's parser refuses a string holding several commands,
        # and with no parameters psycopg leaves `%` alone.
        cur = conn.cursor()
        cur.execute(sql, None, prepare=True)
        if cur.description is None:
            return _no_rows()
        rows = [tuple(r) for r in cur.fetchall()]
        return [c.name for c in cur.description], rows
    except errors.QueryCanceled:
        raise _cancelled(timeout) from None
    except psycopg.Error as exc:
        state = exc.sqlstate or ""
        diag = exc.diag
        if state == "42601" and (
            diag.source_function == "exec_parse_message" or "multiple commands" in (diag.message_primary or "")
        ):
            raise ActdbError(f"{ONE_STATEMENT} ({first_line(exc)})") from None
        if state.startswith(PG_REFUSED):
            raise ActdbError(f"{READ_ONLY} ({first_line(exc)})") from None
        raise ActdbError(f"SQL error: {first_line(exc)}") from None
    except ValueError as exc:  # e.g. a NUL character, refused by the driver
        raise ActdbError(f"SQL error: {first_line(exc)}") from None
    finally:
        with contextlib.suppress(Exception):
            conn.rollback()  # never commit: whatever the statement did in its transaction is discarded
        conn.close()


def schema_listing(config: StoreConfig) -> tuple[list[str], list[tuple[Any, ...]]]:
    """Every table and view `actdb sql` can read, with its columns and types."""
    engine = make_engine(config.database_url, read_only=True)
    try:
        insp = inspect(engine)
        rows = []
        for kind, names in (("table", insp.get_table_names()), ("view", insp.get_view_names())):
            for name in sorted(set(names) - HIDDEN_TABLES):
                for col in insp.get_columns(name):
                    rows.append((kind, name, col["name"], str(col["type"])))
        return ["kind", "name", "column", "type"], rows
    finally:
        engine.dispose()
