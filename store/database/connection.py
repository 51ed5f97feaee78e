"""The one way to reach a store's SQL database: `Store` owns the engine (read-write or read-only), upgrades the
schema through Alembic, and returns query results as rows addressed by column name."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Mapping, Sequence
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import (
    Connection,
    Engine,
    Executable,
    RowMapping,
    Table,
    create_engine,
    event,
    insert,
    inspect,
    make_url,
    text,
)
from sqlalchemy.exc import OperationalError, SQLAlchemyError

from actdb.store.config import StoreConfig
from actdb.store.database.identity import bind_folder, check_folder, check_unbound
from actdb.store.errors import ActdbError, SchemaBehindError, first_line

if TYPE_CHECKING:
    from sqlalchemy.orm import Session

MIGRATIONS_DIR = Path(str(resources.files("actdb.migrations")))


def alembic_config(url: str):
    """An Alembic configuration pointing at the packaged migrations and the given database."""
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return cfg


_SECRET_PARAMS = ("password", "passfile", "sslpassword", "sslkey")


def safe_url(url: str) -> str:
    """The URL as it may be shown to a user: never with its password, in the userinfo or in a query parameter
    (`?password=...` is how libpq URLs may carry it too)."""
    try:
        parsed = make_url(url)
    except Exception:
        return url.split("://", 1)[0] + "://…"
    hidden = {k: "hidden" for k in parsed.query if k.lower() in _SECRET_PARAMS}
    return parsed.update_query_dict(hidden).render_as_string(hide_password=True)


def make_engine(url: str, read_only: bool = False) -> Engine:
    """An engine for `url`. SQLite gets foreign keys, a busy timeout and WAL so ingests can run side by side;
    `read_only` opens SQLite with `mode=ro` and PostgreSQL sessions with read-only transactions."""
    if url.startswith("postgresql://"):
        url = "postgresql+psycopg://" + url[len("postgresql://") :]
    if url.startswith("sqlite"):
        path = url.split("///", 1)[-1]
        if read_only:
            url = f"sqlite:///file:{path}?mode=ro&uri=true"
        engine = create_engine(url, connect_args={"timeout": 60})

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_conn, _record) -> None:
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA foreign_keys=ON")
            if not read_only:
                cur.execute("PRAGMA journal_mode=WAL")
            cur.close()

        return engine
    connect_args: dict[str, Any] = {"connect_timeout": 10}
    if read_only:
        connect_args["options"] = "-c default_transaction_read_only=on"
    try:
        return create_engine(url, pool_pre_ping=True, connect_args=connect_args)
    except (SQLAlchemyError, ImportError, ValueError) as exc:
        raise ActdbError(f"invalid database URL {safe_url(url)}: {first_line(exc)}") from None


MISSING_DATABASE = "3D000"  # PostgreSQL's invalid_catalog_name: the server is there, the database is not


class MissingDatabaseError(ActdbError):
    """The PostgreSQL server answered, but the store's database does not exist on it."""


def _check_connect(engine: Engine) -> None:
    try:
        with engine.connect():
            pass
    except OperationalError as exc:
        url = engine.url
        # libpq reports a refused login without a SQLSTATE, so the server's (English) message is the fallback
        if getattr(exc.orig, "sqlstate", None) == MISSING_DATABASE or (
            url.database and f'database "{url.database}" does not exist' in str(exc.orig)
        ):
            raise MissingDatabaseError(
                f"database {url.database!r} does not exist on the PostgreSQL server at {url.host or 'localhost'}:"
                f"{url.port or 5432}; `actdb init` creates it when {url.username or 'the user'} may create "
                f"databases, or run `createdb -h {url.host or 'localhost'} -p {url.port or 5432} "
                f"-U {url.username or 'postgres'} {url.database}`"
            ) from None
        raise ActdbError(f"cannot reach database {safe_url(str(engine.url))}: {first_line(exc)}") from None


def create_database(engine: Engine) -> None:
    """Create the PostgreSQL database of `engine`'s URL, connecting to the server's `postgres` database; a
    one-line error when this user may not."""
    url = engine.url
    admin = create_engine(
        url.set(database="postgres"), isolation_level="AUTOCOMMIT", connect_args={"connect_timeout": 10}
    )
    try:
        with admin.connect() as conn:
            name = conn.dialect.identifier_preparer.quote(url.database)
            conn.exec_driver_sql(f"CREATE DATABASE {name}")
    except SQLAlchemyError as exc:
        raise ActdbError(
            f"database {url.database!r} does not exist and {url.username or 'this user'} cannot create it "
            f"({first_line(getattr(exc, 'orig', None) or exc)}); run `createdb -h {url.host or 'localhost'} -p "
            f"{url.port or 5432} -U USER {url.database}` as a user allowed to, then `actdb init`"
        ) from None
    finally:
        admin.dispose()


INSERT_BATCH = 20000


def insert_rows(session: Session | Connection, table: Table | type, rows: list[dict]) -> None:
    """Bulk-insert dict rows (all with the same keys) in the session's transaction, by each backend's fast path:
    COPY on PostgreSQL, the driver's own executemany on SQLite (SQLAlchemy's per-row processing cost more than
    the database's work: 0.3 s of a 0.8 s correlation on the demo)."""
    if not rows:
        return
    conn = session if isinstance(session, Connection) else session.connection()
    table = getattr(table, "__table__", table)  # an ORM class or its Core table
    name, columns = table.name, list(rows[0])
    listed = ", ".join(f'"{c}"' for c in columns)
    raw = conn.connection.driver_connection
    if conn.dialect.name == "postgresql":
        with raw.cursor() as cur, cur.copy(f'COPY "{name}" ({listed}) FROM STDIN') as copy:
            for r in rows:
                copy.write_row([r[c] for c in columns])
        return
    if conn.dialect.name == "sqlite":
        marks = ", ".join("?" for _ in columns)
        raw.executemany(f'INSERT INTO "{name}" ({listed}) VALUES ({marks})', ([r[c] for c in columns] for r in rows))
        return
    for begin in range(0, len(rows), INSERT_BATCH):
        session.execute(insert(table), rows[begin : begin + INSERT_BATCH])


def finite_or_none(x: float) -> float | None:
    """A float for a SQL column, with NaN/inf (undefined statistics) stored as NULL."""
    return float(x) if math.isfinite(x) else None


def known_revisions() -> list[str]:
    """The schema revisions this actdb ships, oldest first. Revision files are named after their (linear,
    zero-padded) revision id, so reading the folder is enough; a test checks this against Alembic's own
    history, and commands that only read never import Alembic."""
    return sorted(p.name[:4] for p in (MIGRATIONS_DIR / "versions").glob("[0-9][0-9][0-9][0-9]_*.py"))


def head_revision() -> str:
    return known_revisions()[-1]


def current_revision(engine: Engine) -> str | None:
    """The database's schema revision (None before `actdb init`)."""
    with engine.connect() as conn:
        if not inspect(conn).has_table("alembic_version"):
            return None
        return conn.execute(text("SELECT version_num FROM alembic_version")).scalar()


class Rows(Sequence[RowMapping]):
    """Query results: `.columns` in order, rows as read-only mappings addressed by column name."""

    def __init__(
        self, columns: Sequence[str], rows: Sequence[Mapping[str, Any]], types: Mapping[str, type] | None = None
    ) -> None:
        self.columns = list(columns)
        self._rows = list(rows)
        self.types = dict(types or {})  # each column's Python type where the query declares it (typed empty frames)

    @classmethod
    def from_tuples(cls, columns: Sequence[str], tuples: Sequence[Sequence[Any]]) -> Rows:
        """Rows from positional results (free-form SQL), repeated column names made unique (`x`, `x_2`)."""
        names: list[str] = []
        for c in columns:
            name, k = c, 1
            while name in names:
                k += 1
                name = f"{c}_{k}"
            names.append(name)
        return cls(names, [dict(zip(names, t, strict=True)) for t in tuples])

    def __getitem__(self, index):
        return self._rows[index]

    def __len__(self) -> int:
        return len(self._rows)

    def first(self) -> RowMapping | None:
        return self._rows[0] if self._rows else None

    def column(self, name: str) -> list[Any]:
        return [r[name] for r in self._rows]

    def dicts(self) -> list[dict[str, Any]]:
        return [dict(r) for r in self._rows]

    def where(self, **equal: Any) -> Rows:
        """The rows whose columns equal the given values."""
        return Rows(self.columns, [r for r in self._rows if all(r[k] == v for k, v in equal.items())], self.types)


class Store:
    """An opened store: configuration, the SQL engine (read-write or read-only) and sessions on it."""

    def __init__(self, config: StoreConfig, engine: Engine, read_only: bool = False) -> None:
        self.config = config
        self.engine = engine
        self.read_only = read_only
        self.notes: list[str] = []  # what `init` could not do itself and a person must (e.g. create a role)
        self._sessionmaker = None  # made on the first `session()`: readers never import the ORM

    @classmethod
    def open(cls, config: StoreConfig, check_schema: bool = True, read_only: bool = False) -> Store:
        """Open an existing store; a missing or older schema is reported with the command that fixes it.
        (Runs whose process died are reaped by whoever opens the store for work: `store.database.lifecycle`.)"""
        if config.is_sqlite:
            db_file = make_url(config.database_url).database
            if db_file and db_file != ":memory:" and not Path(db_file).exists():
                raise ActdbError(f"no actdb database at {db_file}; run `actdb init` first")
        engine = make_engine(config.database_url, read_only=read_only)
        _check_connect(engine)
        store = cls(config, engine, read_only)
        if check_schema:
            store.require_current_schema()
            check_folder(engine, config.home, safe_url(config.database_url))
        return store

    @classmethod
    def init(cls, config: StoreConfig) -> Store:
        """Create the store's folder and database if needed and upgrade the schema to head."""
        from alembic import command
        from alembic.util import CommandError

        engine = None
        if not config.is_sqlite or Path(make_url(config.database_url).database or "").exists():
            engine = make_engine(config.database_url)
            try:
                _check_connect(engine)
            except MissingDatabaseError:
                create_database(engine)  # init creates what it initialises; then connects as any other command
                _check_connect(engine)
        check_unbound(engine, config.home, safe_url(config.database_url))  # before anything is created or upgraded
        try:
            config.home.mkdir(parents=True, exist_ok=True)
            probe = config.home / ".actdb-write-test"
            probe.write_text("ok")
            probe.unlink()
        except OSError as exc:
            raise ActdbError(f"cannot write to store folder {config.home}: {exc.strerror or exc}") from None
        if engine is None:
            engine = make_engine(config.database_url)
            _check_connect(engine)
        current, head = current_revision(engine), head_revision()
        if current is not None and current != head and not _known_revision(current):
            raise ActdbError(
                f"database schema is at revision {current}, which this actdb ({head}) does not know: "
                "it was written by a newer actdb; upgrade actdb instead"
            )
        with engine.connect() as conn:
            cfg = alembic_config(config.database_url)
            cfg.attributes["connection"] = conn
            try:
                command.upgrade(cfg, "head")
            except CommandError as exc:
                raise ActdbError(f"cannot upgrade the schema: {first_line(exc)}") from None
            conn.commit()
        bind_folder(engine, config.home, safe_url(config.database_url))
        store = cls(config, engine)
        from actdb.store.database.sql_reader import provision_sql_reader

        note = provision_sql_reader(engine)
        if note:
            store.notes.append(note)
        return store

    def require_current_schema(self) -> None:
        current, head = current_revision(self.engine), head_revision()
        if current is None:
            raise SchemaBehindError("database has no actdb schema; run `actdb init`")
        if current != head:
            if not _known_revision(current):
                raise SchemaBehindError(
                    f"database schema is at revision {current}, newer than this actdb ({head}); upgrade actdb"
                )
            raise SchemaBehindError(
                f"database schema is at revision {current}, this actdb needs {head}; run `actdb init` to upgrade"
            )

    @contextlib.contextmanager
    def transaction(self) -> Iterator[Connection]:
        """A Core connection in one transaction, committed on success and rolled back on error: what readers
        and Core writers use."""
        with self.engine.begin() as conn:
            yield conn

    @contextlib.contextmanager
    def session(self) -> Iterator[Session]:
        """An ORM session committed on success and rolled back on error (writers that build mapped objects)."""
        if self._sessionmaker is None:
            from sqlalchemy.orm import sessionmaker

            self._sessionmaker = sessionmaker(self.engine, expire_on_commit=False)
        with self._sessionmaker() as sess:
            try:
                yield sess
                sess.commit()
            except BaseException:
                sess.rollback()
                raise

    def query(self, statement: Executable) -> Rows:
        """Run a Core SELECT and return its rows, addressed by column name."""
        with self.engine.connect() as conn:
            result = conn.execute(statement)
            return Rows(list(result.keys()), list(result.mappings()), _declared_types(statement))

    def scalar(self, statement: Executable) -> Any:
        with self.engine.connect() as conn:
            return conn.execute(statement).scalar()

    def close(self) -> None:
        self.engine.dispose()


def _declared_types(statement: Executable) -> dict[str, type]:
    """The Python type each selected column declares (`Integer` -> int, ...), where SQLAlchemy knows one."""
    types = {}
    for column in getattr(statement, "selected_columns", []):
        try:
            types[column.key] = column.type.python_type
        except (NotImplementedError, AttributeError):
            continue
    return types


def _known_revision(revision: str) -> bool:
    return revision in known_revisions()
