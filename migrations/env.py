"""Alembic environment: runs revisions on the connection actdb hands over, or on `sqlalchemy.url`."""

from alembic import context

from actdb.store.database import tables
from actdb.store.database.connection import make_engine

config = context.config
tables.declare_running_indexes()
target_metadata = tables.metadata
NOT_SCHEMA = {"sql_reader"}  # credentials of the `actdb sql` reader role (actdb.store.database.sql_reader), not schema


def include_object(obj, name, type_, reflected, compare_to) -> bool:
    return not (type_ == "table" and name in NOT_SCHEMA)


def run_migrations_offline() -> None:
    context.configure(
        url=config.get_main_option("sqlalchemy.url"),
        target_metadata=target_metadata,
        literal_binds=True,
        render_as_batch=True,
    )
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        _run(connection)
        return
    engine = make_engine(config.get_main_option("sqlalchemy.url"))
    try:
        with engine.connect() as conn:
            _run(conn)
            conn.commit()
    finally:
        engine.dispose()


def _run(connection) -> None:
    if connection.dialect.name == "sqlite":
        # Batch migrations recreate tables (copy, drop, rename). With foreign keys on, dropping a parent table
        # would cascade-delete its children's rows, so they are off while revisions run (before any BEGIN,
        # where SQLite ignores the pragma), and checked afterwards.
        connection.exec_driver_sql("PRAGMA foreign_keys=OFF")
    context.configure(connection=connection, target_metadata=target_metadata, render_as_batch=True, compare_type=True)
    with context.begin_transaction():
        context.run_migrations()
    if connection.dialect.name == "sqlite":
        broken = connection.exec_driver_sql("PRAGMA foreign_key_check").fetchall()
        if broken:
            raise RuntimeError(f"foreign keys broken by a migration: {broken[:5]}")
        connection.exec_driver_sql("PRAGMA foreign_keys=ON")


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
