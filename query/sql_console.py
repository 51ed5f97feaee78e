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
from collections.abc import Iterator
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
DEFAULT_MAX_ROWS = 100_000  # `actdb sql` / `db.sql` stop here and say so (0: no cap; the CLI streams any size)
DEFAULT_MAX_BYTES = 64 * 2**20  # ... or once the values' text reaches this many bytes
BATCH = 1000  # rows fetched from the database at a time
READ_ONLY = "refused: `actdb sql` is read-only"
ONE_STATEMENT = "refused: `actdb sql` runs exactly one statement"
ROWS_ONLY = (
    "refused: `actdb sql` runs only statements that return rows (SELECT, VALUES, WITH ... SELECT, EXPLAIN, ...); "
    "this one returns none"
)
BLANK = "give a SQL statement: the text is empty or only whitespace"
# PostgreSQL names the top-level command when a statement would write in the read-only transaction: SELECT means
# that a data-modifying WITH (INSERT, UPDATE, DELETE ... RETURNING) inside it was what would write.
PG_WRITING_SELECT = "cannot execute SELECT in a read-only transaction"
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
    config: StoreConfig,
    sql: str,
    timeout: float = DEFAULT_TIMEOUT,
    max_rows: int | None = DEFAULT_MAX_ROWS,
    max_bytes: int | None = DEFAULT_MAX_BYTES,
) -> tuple[list[str], list[tuple[Any, ...]]]:
    """Run exactly one statement that cannot write, ending it after `timeout` seconds; (columns, rows), held in
    memory, so bounded: a result larger than the caps is an ActdbError (stream it with `ReadonlyQuery` instead).

    Every failure is an ActdbError of one line: `refused: ...` for what the guards stop, `SQL error: ...` for
    mistakes, `query cancelled after N s (--timeout)` at the deadline.
    """
    with ReadonlyQuery(config, sql, timeout, max_rows, max_bytes) as result:
        rows = list(result)
        if result.notice:
            raise ActdbError(f"{result.notice}; stream larger results with ReadonlyQuery or `actdb sql`")
        return result.columns, rows


def value_bytes(value: Any) -> int:
    """What a value weighs in the byte cap: the UTF-8 length of its text (bytes: their length; NULL: nothing)."""
    if value is None:
        return 0
    if isinstance(value, (bytes, bytearray, memoryview)):
        return len(value)
    return len(str(value).encode("utf-8", "replace"))


class ReadonlyQuery:
    """One read-only statement's result, streamed: `columns` once the statement has started (errors surface when
    this is made, before any output), then rows as they are iterated, BATCH at a time from the database, so memory
    does not grow with the result. Iteration stops after `max_rows` rows, or at the row that takes the values'
    text (one separator per value) past `max_bytes` (None or 0: no cap); `notice` then says which cap cut it.
    Use it as a context manager, or exhaust it: the connection closes when the rows end, on a cut, or on close()."""

    def __init__(
        self,
        config: StoreConfig,
        sql: str,
        timeout: float = DEFAULT_TIMEOUT,
        max_rows: int | None = DEFAULT_MAX_ROWS,
        max_bytes: int | None = DEFAULT_MAX_BYTES,
    ) -> None:
        if not timeout > 0:
            raise ActdbError("--timeout must be a positive number of seconds")
        for name, cap in (("--max-rows", max_rows), ("--max-bytes", max_bytes)):
            if cap is not None and cap < 0:
                raise ActdbError(f"{name} must be 0 (no cap) or a positive number, not {cap}")
        if not sql.strip():
            raise ActdbError(BLANK)
        refuse_nul(sql)
        self.max_rows = max_rows or None
        self.max_bytes = max_bytes or None
        self.n_rows = 0
        self.n_bytes = 0
        self.notice: str | None = None
        if config.is_sqlite:
            self._source = _stream_sqlite(config.database_url, sql, timeout)
        else:
            self._source = _stream_postgres(config.database_url, sql, timeout)
        self.columns: list[str] = next(self._source)  # runs the statement; a failure is raised here

    def __iter__(self) -> Iterator[tuple[Any, ...]]:
        for row in self._source:
            if self.max_rows is not None and self.n_rows >= self.max_rows:
                self._cut(f"{self.max_rows:,} rows (--max-rows)")
                return
            size = sum(value_bytes(v) for v in row) + len(row)
            if self.max_bytes is not None and self.n_bytes + size > self.max_bytes:
                self._cut(f"{self.max_bytes:,} bytes (--max-bytes)")
                return
            self.n_rows += 1
            self.n_bytes += size
            yield row

    def _cut(self, cap: str) -> None:
        self.notice = f"result cut at {self.n_rows:,} rows: it reached the cap of {cap}; the statement had more"
        self.close()

    def close(self) -> None:
        """End the statement and close its connection (rolled back on PostgreSQL)."""
        self._source.close()

    def __enter__(self) -> ReadonlyQuery:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _cancelled(timeout: float) -> ActdbError:
    return ActdbError(f"query cancelled after {timeout:g} s (--timeout)")


def _stream_sqlite(url: str, sql: str, timeout: float) -> Iterator[Any]:
    """Yields the column names, then the rows, BATCH at a time from SQLite's cursor."""
    conn, guard = connect_sqlite_reader(url, timeout)
    try:
        cur = conn.execute(sql)  # sqlite3 compiles one statement and refuses any that follow
        if cur.description is None:  # a comment, or a statement the authorizer let run that has no result
            raise ActdbError(ROWS_ONLY)
        yield [d[0] for d in cur.description]
        while batch := cur.fetchmany(BATCH):
            yield from (tuple(r) for r in batch)
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


def _stream_postgres(url: str, sql: str, timeout: float) -> Iterator[Any]:
    """Yields the column names, then the rows, which the server sends BATCH at a time (libpq's chunked mode)."""
    import psycopg
    from psycopg import errors

    engine = make_engine(url)
    try:
        conn = connect_postgres_reader(engine, timeout)
    finally:
        engine.dispose()
    rows = None
    columns: list[str] = []
    try:
        columns = _described_columns(conn, sql)  # also a zero-row result's, which stream() does not give
        # stream() sends Parse/Bind/Execute (the extended protocol): the server's parser refuses a string holding
        # several commands, and with no parameters psycopg leaves `%` alone. Rows arrive in chunks, never all.
        cur = conn.cursor()
        # chunks need libpq 17; an older one streams row by row (single-row mode): slower, just as bounded
        rows = cur.stream(sql, None, size=BATCH if psycopg.capabilities.has_stream_chunked() else 1)
        first = next(rows, None)
        yield columns
        if first is not None:
            yield tuple(first)
            yield from (tuple(r) for r in rows)
    except errors.QueryCanceled:
        raise _cancelled(timeout) from None
    except psycopg.Error as exc:
        state = exc.sqlstate or ""
        if not columns and not state and isinstance(exc, (errors.ProgrammingError, errors.InternalError)):
            # the server ran it and sent no rows (stream() raises "didn't produce a result"; a comment-only text
            # is an EMPTY_QUERY): it did not write, or the read-only transaction would have refused it
            raise ActdbError(ROWS_ONLY) from None
        diag = exc.diag
        if state == "42601" and (
            diag.source_function == "exec_parse_message" or "multiple commands" in (diag.message_primary or "")
        ):
            raise ActdbError(f"{ONE_STATEMENT} ({first_line(exc)})") from None
        if diag.message_primary == PG_WRITING_SELECT:
            raise ActdbError(f"{READ_ONLY} (a data-modifying WITH in the SELECT writes: {first_line(exc)})") from None
        if state.startswith(PG_REFUSED):
            raise ActdbError(f"{READ_ONLY} ({first_line(exc)})") from None
        raise ActdbError(f"SQL error: {first_line(exc)}") from None
    except ValueError as exc:  # what the driver refuses before sending
        raise ActdbError(f"SQL error: {first_line(exc)}") from None
    finally:
        if rows is not None:
            with contextlib.suppress(Exception):
                rows.close()  # psycopg cancels a statement still sending rows and drains what arrived
        with contextlib.suppress(Exception):
            conn.rollback()  # never commit: whatever the statement did in its transaction is discarded
        conn.close()


def _described_columns(conn: Any, sql: str) -> list[str]:
    """The result columns of `sql` as the server's parser describes it (Parse and Describe of the unnamed
    statement, on the reader's read-only connection; nothing runs): empty for a statement that returns no rows.
    A statement the parser refuses (several commands, a syntax error, an unknown table) raises its psycopg error."""
    from psycopg import errors, pq

    encoding = conn.info.encoding
    parsed = conn.pgconn.prepare(b"", sql.encode(encoding))
    if parsed.status != pq.ExecStatus.COMMAND_OK:
        raise errors.error_from_result(parsed, encoding=encoding)
    described = conn.pgconn.describe_prepared(b"")
    if described.status != pq.ExecStatus.COMMAND_OK:
        raise errors.error_from_result(described, encoding=encoding)
    return [described.fname(i).decode(encoding) for i in range(described.nfields)]


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
