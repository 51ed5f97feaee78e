"""Connecting to a store's SQL database, upgrading its schema through Alembic, and guarding against old schemas."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from importlib import resources
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Engine, create_engine, event, insert, make_url
from sqlalchemy.exc import OperationalError, SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from actdb.store.config import StoreConfig
from actdb.store.errors import ActdbError, SchemaBehindError

MIGRATIONS_DIR = Path(str(resources.files("actdb.migrations")))


def alembic_config(url: str) -> Config:
    """An Alembic configuration pointing at the packaged migrations and the given database."""
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return cfg


def make_engine(url: str, read_only: bool = False) -> Engine:
    """An engine for `url`; SQLite gets foreign keys, a busy timeout and WAL so ingests can run side by side."""
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
    try:
        return create_engine(url, pool_pre_ping=True, connect_args={"connect_timeout": 10})
    except (SQLAlchemyError, ImportError, ValueError) as exc:
        raise ActdbError(f"invalid database URL {url!r}: {exc}") from None


def _check_connect(engine: Engine) -> None:
    try:
        with engine.connect():
            pass
    except OperationalError as exc:
        first = str(exc.orig).strip().splitlines()[0] if exc.orig else str(exc)
        raise ActdbError(f"cannot reach database {engine.url.render_as_string(hide_password=True)}: {first}") from None


INSERT_BATCH = 20000


def insert_rows(session: Session, table: type, rows: list[dict]) -> None:
    """Bulk-insert dict rows in batches (executemany), fast enough for ~10^6 rows per run at paper scale."""
    for begin in range(0, len(rows), INSERT_BATCH):
        session.execute(insert(table), rows[begin : begin + INSERT_BATCH])


def finite_or_none(x: float) -> float | None:
    """A float for a SQL column, with NaN/inf (undefined statistics) stored as NULL."""
    return float(x) if math.isfinite(x) else None


def head_revision() -> str:
    return ScriptDirectory.from_config(alembic_config("sqlite://")).get_current_head()


def current_revision(engine: Engine) -> str | None:
    with engine.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()


class Store:
    """An opened store: configuration, SQL engine and session factory."""

    def __init__(self, config: StoreConfig, engine: Engine) -> None:
        self.config = config
        self.engine = engine
        self.sessionmaker = sessionmaker(engine, expire_on_commit=False)

    @classmethod
    def open(cls, config: StoreConfig, check_schema: bool = True) -> Store:
        """Open an existing store; a missing or older schema is reported with the command that fixes it."""
        if config.is_sqlite:
            db_file = make_url(config.database_url).database
            if db_file and db_file != ":memory:" and not Path(db_file).exists():
                raise ActdbError(f"no actdb database at {db_file}; run `actdb init` first")
        engine = make_engine(config.database_url)
        _check_connect(engine)
        store = cls(config, engine)
        if check_schema:
            store.require_current_schema()
        return store

    @classmethod
    def init(cls, config: StoreConfig) -> Store:
        """Create the store's folder and database if needed and upgrade the schema to head."""
        try:
            config.home.mkdir(parents=True, exist_ok=True)
            probe = config.home / ".actdb-write-test"
            probe.write_text("ok")
            probe.unlink()
        except OSError as exc:
            raise ActdbError(f"cannot write to store folder {config.home}: {exc.strerror or exc}") from None
        engine = make_engine(config.database_url)
        _check_connect(engine)
        with engine.begin() as conn:
            cfg = alembic_config(config.database_url)
            cfg.attributes["connection"] = conn
            command.upgrade(cfg, "head")
        return cls(config, engine)

    def require_current_schema(self) -> None:
        current, head = current_revision(self.engine), head_revision()
        if current is None:
            raise SchemaBehindError("database has no actdb schema; run `actdb init`")
        if current != head:
            raise SchemaBehindError(
                f"database schema is at revision {current}, this actdb needs {head}; run `actdb init` to upgrade"
            )

    @contextlib.contextmanager
    def session(self) -> Iterator[Session]:
        """A session committed on success and rolled back on error."""
        with self.sessionmaker() as sess:
            try:
                yield sess
                sess.commit()
            except BaseException:
                sess.rollback()
                raise

    def close(self) -> None:
        self.engine.dispose()
