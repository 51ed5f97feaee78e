"""Who `actdb sql` runs as: a read-only PostgreSQL login role per database, and guarded read-only SQLite connections.

The guarantees come from the databases, never from reading the SQL text:

* PostgreSQL: the statement runs on a connection made *as* `actdb_reader_<db>`, a LOGIN role with no attributes, no
  role memberships and only CONNECT, USAGE on schema public and SELECT on actdb's tables and views (not on
  `alembic_version`, not on the `sql_reader` table that holds its password), inside a READ ONLY transaction with a
  server-side `statement_timeout`. Server-side file/program/large-object/signal functions are not granted to it.
* SQLite: the file is opened with `mode=ro`, `PRAGMA query_only`, no attachable databases, and an authorizer that
  allows only reads (SELECT, column reads, functions other than extension loading, recursive CTEs, a few schema
  pragmas); a progress handler aborts the statement after the deadline.
"""

from __future__ import annotations

import hashlib
import re
import secrets
import sqlite3
import time
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy import Connection, Engine, make_url, text
from sqlalchemy.exc import DBAPIError

from actdb.store.errors import ActdbError

READER_TABLE = "sql_reader"  # credentials, created here with plain SQL (not schema: never in a migration)
READER_PREFIX = "actdb_reader_"
HIDDEN_TABLES = frozenset({"alembic_version", READER_TABLE})
ROLE_TIMEOUT = "30s"  # the reader role's own statement_timeout; `actdb sql` sets its --timeout per transaction
# Settings the reader role gets at login (belts: `actdb sql` also sets them on its connection and transaction).
ROLE_SETTINGS = {
    "default_transaction_read_only": "on",
    "statement_timeout": ROLE_TIMEOUT,
    "idle_in_transaction_session_timeout": "60s",
    "client_connection_check_interval": "1s",  # a killed client's query is ended within ~1 s
}
PG_RELKINDS = ("r", "p", "v", "m", "f")  # tables, partitioned tables, views, materialized views, foreign tables


# ---------------------------------------------------------------------------------------------- PostgreSQL


def reader_role_name(database: str) -> str:
    """`actdb_reader_<database>`, lower-case [a-z0-9_], at most 63 bytes; a hash keeps altered names distinct."""
    clean = re.sub(r"[^a-z0-9_]", "_", database.lower())
    if clean != database or len(READER_PREFIX + clean) > 63:
        digest = hashlib.sha1(database.encode()).hexdigest()[:8]
        clean = f"{clean[: 63 - len(READER_PREFIX) - 9]}_{digest}"
    return READER_PREFIX + clean


def _ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _readable_relations(conn: Connection) -> list[str]:
    """actdb's tables and views in schema public, without Alembic's bookkeeping and the reader's credentials."""
    rows = conn.execute(
        text(
            "SELECT c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
            "WHERE n.nspname = 'public' AND c.relkind = ANY(:kinds) ORDER BY c.relname"
        ),
        {"kinds": list(PG_RELKINDS)},
    )
    return [name for (name,) in rows if name not in HIDDEN_TABLES]


def _grant_statements(conn: Connection, role: str, database: str) -> list[str]:
    """Statements (re)granting exactly what the reader may use; idempotent."""
    r = _ident(role)
    stmts = [
        f"REVOKE ALL ON ALL TABLES IN SCHEMA public FROM {r}",
        f"REVOKE ALL ON ALL SEQUENCES IN SCHEMA public FROM {r}",
        f"REVOKE CREATE ON SCHEMA public FROM {r}",
        f"GRANT CONNECT ON DATABASE {_ident(database)} TO {r}",
        f"GRANT USAGE ON SCHEMA public TO {r}",
    ]
    relations = _readable_relations(conn)
    if relations:
        stmts.append(f"GRANT SELECT ON {', '.join('public.' + _ident(t) for t in relations)} TO {r}")
    return stmts


ATTRS_ALL = "LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOINHERIT NOREPLICATION NOBYPASSRLS"
ATTRS_CREATEROLE = "LOGIN NOCREATEDB NOCREATEROLE NOINHERIT"  # what a non-superuser may ALTER


def _known_settings(conn: Connection) -> dict[str, str]:
    """ROLE_SETTINGS that this server knows (client_connection_check_interval needs PostgreSQL 14)."""
    known = set(conn.execute(text("SELECT name FROM pg_settings WHERE name = ANY(:n)"), {"n": list(ROLE_SETTINGS)}))
    return {k: v for k, v in ROLE_SETTINGS.items() if (k,) in known}


def _role_statements(conn: Connection, role: str, password: str, verb: str, attrs: str = ATTRS_ALL) -> list[str]:
    r = _ident(role)
    stmts = [f"{verb} ROLE {r} {attrs} PASSWORD '{password}'"]
    stmts += [f"ALTER ROLE {r} SET {k} = '{v}'" for k, v in _known_settings(conn).items()]
    return stmts


def role_problems(conn: Connection, role: str) -> list[str] | None:
    """None when `role` does not exist, else what makes it more than a plain reader (empty list: it is fine)."""
    row = conn.execute(
        text(
            "SELECT r.rolsuper, r.rolcreaterole, r.rolcreatedb, r.rolreplication, r.rolbypassrls, r.rolcanlogin, "
            "ARRAY(SELECT g.rolname::text FROM pg_auth_members m JOIN pg_roles g ON g.oid = m.roleid "
            "WHERE m.member = r.oid ORDER BY 1) FROM pg_roles r WHERE r.rolname = :role"
        ),
        {"role": role},
    ).one_or_none()
    if row is None:
        return None
    *flags, groups = row
    names = ("SUPERUSER", "CREATEROLE", "CREATEDB", "REPLICATION", "BYPASSRLS", "NOLOGIN")
    flags[-1] = not flags[-1]
    return [n for n, bad in zip(names, flags, strict=True) if bad] + [f"member of {g}" for g in groups]


def _ensure_credentials(conn: Connection, role: str) -> str:
    """The reader's password from `sql_reader`, generated on first use; the table is readable only by its owner."""
    conn.execute(text(f"CREATE TABLE IF NOT EXISTS {READER_TABLE} (role TEXT PRIMARY KEY, password TEXT NOT NULL)"))
    conn.execute(text(f"REVOKE ALL ON {READER_TABLE} FROM PUBLIC"))
    password = _stored_password(conn, role)
    if password is None:
        password = secrets.token_hex(24)
        conn.execute(text(f"INSERT INTO {READER_TABLE} (role, password) VALUES (:r, :p)"), {"r": role, "p": password})
    return password


def _stored_password(conn: Connection, role: str) -> str | None:
    if not conn.execute(text("SELECT to_regclass(:t) IS NOT NULL"), {"t": f"public.{READER_TABLE}"}).scalar():
        return None
    return conn.execute(text(f"SELECT password FROM {READER_TABLE} WHERE role = :r"), {"r": role}).scalar()


def _revoke_memberships(role: str, problems: list[str]) -> list[str]:
    prefix = "member of "
    return [f"REVOKE {_ident(p[len(prefix) :])} FROM {_ident(role)}" for p in problems if p.startswith(prefix)]


def admin_sql(conn: Connection, role: str, password: str, database: str, problems: list[str] | None) -> str:
    """The SQL an administrator (superuser) runs in the store's database to create or repair the reader role."""
    stmts = _role_statements(conn, role, password, "CREATE" if problems is None else "ALTER")
    stmts += _revoke_memberships(role, problems or [])
    stmts += _grant_statements(conn, role, database)
    return "; ".join(stmts) + ";"


def provision_sql_reader(engine: Engine) -> str | None:
    """Create or refresh the PostgreSQL reader role of `actdb sql` and grant it SELECT on every actdb table and view.

    Idempotent; meant to run after the migrations on every `actdb init`. Returns None when the role is ready (and
    for SQLite, which needs no role), else one paragraph telling what an administrator must run.
    """
    if engine.dialect.name != "postgresql":
        return None
    database = engine.url.database or ""
    role = reader_role_name(database)
    with engine.begin() as conn:
        conn.execute(text("SELECT pg_advisory_xact_lock(hashtext('actdb_sql_reader'))"))
        user, superuser, createrole = conn.execute(
            text("SELECT current_user, rolsuper, rolcreaterole FROM pg_roles WHERE rolname = current_user")
        ).one()
        password = _ensure_credentials(conn, role)
        problems = role_problems(conn, role)
        if superuser or createrole:
            super_only = {"SUPERUSER", "REPLICATION", "BYPASSRLS"}.intersection(problems or [])
            if problems is None:
                stmts = _role_statements(conn, role, password, "CREATE")
            elif superuser or not super_only:
                stmts = _role_statements(conn, role, password, "ALTER", ATTRS_ALL if superuser else ATTRS_CREATEROLE)
                stmts += _revoke_memberships(role, problems)
            else:
                stmts = []
            _try_each(conn, stmts)  # whatever this user may not do shows in role_problems below and in the message
            problems = role_problems(conn, role)
        if problems == []:
            failed = _try_each(conn, _grant_statements(conn, role, database))
            if not failed:
                return None
            sql = "; ".join(failed) + ";"
            why = f"{user} may not grant everything role {role} needs"
        else:
            sql = admin_sql(conn, role, password, database, problems)
            why = (
                f"role {role} does not exist and {user} may not create roles"
                if problems is None
                else f"role {role} is not a plain reader ({', '.join(problems)}) and {user} may not change that"
            )
    return (
        f"`actdb sql` on PostgreSQL runs as a read-only role, but {why}. A superuser must run in database "
        f"{database}: {sql} Afterwards `actdb init` (as any user owning the tables) re-grants SELECT on tables that "
        "later migrations add; or run `actdb init` once as a user allowed to create roles."
    )


def _try_each(conn: Connection, stmts: list[str]) -> list[str]:
    """Run each statement in its own savepoint; return those that failed (never raises for a refused one)."""
    failed = []
    for stmt in stmts:
        try:
            with conn.begin_nested():
                conn.exec_driver_sql(stmt)
        except DBAPIError:
            failed.append(stmt)
    return failed


def reader_credentials(engine: Engine) -> tuple[str, str, dict[str, str]]:
    """(role, password, login settings) of the store's reader, or ActdbError with `actdb sql`'s one-line refusal."""
    database = engine.url.database or ""
    role = reader_role_name(database)
    with engine.connect() as conn:
        password = _stored_password(conn, role)
        if password is None:
            raise ActdbError(f"refused: the read-only role {role} of `actdb sql` is not set up; run `actdb init`")
        problems = role_problems(conn, role)
        if problems is None:
            raise ActdbError(
                f"refused: the read-only role {role} of `actdb sql` is missing; run `actdb init` as a user allowed to "
                f"create roles, or have a superuser run: {admin_sql(conn, role, password, database, problems)}"
            )
        if problems:
            raise ActdbError(
                f"refused: role {role} has more than read access ({', '.join(problems)}); run `actdb init` as a "
                "superuser to reset it"
            )
        settings = _known_settings(conn)
    return role, password, settings


def connect_postgres_reader(engine: Engine, timeout: float) -> Any:
    """A psycopg connection *as* the reader role (not SET ROLE), in a READ ONLY transaction with a server-side
    statement timeout of `timeout` seconds. `engine` is the store's main engine; it only reads the password."""
    import psycopg

    role, password, settings = reader_credentials(engine)
    _, params = engine.dialect.create_connect_args(engine.url.set(username=role, password=password))
    params.pop("context", None)
    ms = max(1, round(timeout * 1000))
    settings["statement_timeout"] = f"{ms}ms"
    options = " ".join(f"-c {k}={v}" for k, v in settings.items())
    params["options"] = f"{params.get('options', '')} {options}".strip()
    params.setdefault("connect_timeout", 10)
    try:
        conn = psycopg.connect(**params, autocommit=False)
    except psycopg.Error as exc:
        first = (str(exc).strip() or type(exc).__name__).splitlines()[0]
        raise ActdbError(f"refused: cannot connect as the read-only role {role}: {first}") from None
    try:
        conn.read_only = True  # every transaction opens with BEGIN READ ONLY
        row = conn.execute(
            "SELECT current_user, session_user, r.rolsuper OR r.rolcreaterole OR r.rolcreatedb OR r.rolreplication "
            "OR r.rolbypassrls OR EXISTS (SELECT 1 FROM pg_auth_members m WHERE m.member = r.oid), "
            "current_setting('transaction_read_only') FROM pg_roles r WHERE r.rolname = current_user"
        ).fetchone()
        if row is None or row[0] != role or row[1] != role or row[2] or row[3] != "on":
            raise ActdbError(f"refused: the session of {role} is not a plain read-only reader; run `actdb init`")
        conn.execute(f"SET LOCAL statement_timeout = {ms}")
    except BaseException:
        conn.close()
        raise
    return conn


# ------------------------------------------------------------------------------------------------- SQLite

# Authorizer action codes by name, for messages.
# fmt: off
SQLITE_ACTIONS = {getattr(sqlite3, f"SQLITE_{name}"): name for name in (
    "CREATE_INDEX", "CREATE_TABLE", "CREATE_TEMP_INDEX", "CREATE_TEMP_TABLE", "CREATE_TEMP_TRIGGER",
    "CREATE_TEMP_VIEW", "CREATE_TRIGGER", "CREATE_VIEW", "DELETE", "DROP_INDEX", "DROP_TABLE", "DROP_TEMP_INDEX",
    "DROP_TEMP_TABLE", "DROP_TEMP_TRIGGER", "DROP_TEMP_VIEW", "DROP_TRIGGER", "DROP_VIEW", "INSERT", "PRAGMA", "READ",
    "SELECT", "TRANSACTION", "UPDATE", "ATTACH", "DETACH", "ALTER_TABLE", "REINDEX", "ANALYZE", "CREATE_VTABLE",
    "DROP_VTABLE", "FUNCTION", "SAVEPOINT", "RECURSIVE",
)}
# fmt: on
# Pragmas that only describe the schema: none of them has a setter form or touches the file.
SQLITE_READ_PRAGMAS = frozenset({"table_info", "table_xinfo", "index_list", "index_info", "index_xinfo"})
SQLITE_DENIED_FUNCTIONS = frozenset({"load_extension", "fts3_tokenizer", "readfile", "writefile", "edit"})
SQLITE_PROGRESS_STEPS = 1000  # VM instructions between deadline checks (~microseconds)
# A table-valued function (pragma_*, json_each, ...) is an eponymous virtual table: SQLite declares it on first use
# and asks the authorizer for UPDATE of sqlite_master.type while doing so. No user statement reaches that check
# (SQLite itself refuses `UPDATE sqlite_master`), so the pair names a table-valued function, not a write.
SCHEMA_TABLES = frozenset({"sqlite_master", "sqlite_schema"})
TABLE_FUNCTION = "table-valued function"


@dataclass
class SqliteGuard:
    """The authorizer and progress handler of one read-only SQLite connection, and what they stopped."""

    deadline: float
    denied: list[str] = field(default_factory=list)
    timed_out: bool = False

    def authorize(self, action: int, arg1: str | None, arg2: str | None, _db: str | None, _inner: str | None) -> int:
        """Whitelist: only reading is authorised. VACUUM (and VACUUM INTO) ask for ATTACH, so they are denied too."""
        name = SQLITE_ACTIONS.get(action, str(action))
        if action in (sqlite3.SQLITE_SELECT, sqlite3.SQLITE_RECURSIVE):
            return sqlite3.SQLITE_OK
        if action == sqlite3.SQLITE_READ and (arg1 or "").lower() not in HIDDEN_TABLES:
            return sqlite3.SQLITE_OK
        if action == sqlite3.SQLITE_FUNCTION and (arg2 or "").lower() not in SQLITE_DENIED_FUNCTIONS:
            return sqlite3.SQLITE_OK
        if action == sqlite3.SQLITE_PRAGMA and (arg1 or "").lower() in SQLITE_READ_PRAGMAS:
            return sqlite3.SQLITE_OK
        if action == sqlite3.SQLITE_UPDATE and (arg1 or "").lower() in SCHEMA_TABLES and arg2 == "type":
            self.denied.append(TABLE_FUNCTION)
            return sqlite3.SQLITE_DENY
        detail = {sqlite3.SQLITE_FUNCTION: arg2, sqlite3.SQLITE_TRANSACTION: arg1}.get(action, arg1)
        self.denied.append(f"{name} {detail}" if detail else name)
        return sqlite3.SQLITE_DENY

    def progress(self) -> int:
        if time.monotonic() > self.deadline:
            self.timed_out = True
            return 1  # non-zero: SQLite interrupts the statement
        return 0


def sqlite_path(database_url: str) -> Path:
    """The database file of an SQLite URL; it must exist (a read-only open never creates one)."""
    name = make_url(database_url).database
    if not name or name == ":memory:" or name.startswith("file:"):
        raise ActdbError(f"`actdb sql` needs an SQLite database file, not {database_url!r}")
    path = Path(name).expanduser().absolute()
    if not path.is_file():
        raise ActdbError(f"no actdb database at {path}; run `actdb init` first")
    return path


def connect_sqlite_reader(database_url: str, timeout: float) -> tuple[sqlite3.Connection, SqliteGuard]:
    """A read-only connection (`mode=ro`, `query_only`, nothing attachable, reading-only authorizer) whose
    statements are interrupted `timeout` seconds from now."""
    path = sqlite_path(database_url)
    uri = f"file:{urllib.parse.quote(str(path))}?mode=ro"
    conn = sqlite3.connect(uri, uri=True, timeout=min(timeout, 10.0), isolation_level=None)
    try:
        conn.execute("PRAGMA query_only = ON")
        conn.execute("PRAGMA trusted_schema = OFF")
        conn.setlimit(sqlite3.SQLITE_LIMIT_ATTACHED, 0)
        guard = SqliteGuard(deadline=time.monotonic() + timeout)
        conn.set_authorizer(guard.authorize)
        conn.set_progress_handler(guard.progress, SQLITE_PROGRESS_STEPS)
    except BaseException:
        conn.close()
        raise
    return conn, guard
