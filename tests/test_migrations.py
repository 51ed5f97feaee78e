"""The schema exists only through Alembic: round trips on SQLite and PostgreSQL, and ORM == migrations."""

from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import inspect

from actdb.store.database import alembic_config, current_revision, head_revision, make_engine
from actdb.store.schema import Base


def test_upgrade_downgrade_upgrade(db_url):
    cfg = alembic_config(db_url)
    engine = make_engine(db_url)
    command.upgrade(cfg, "head")
    assert current_revision(engine) == head_revision()
    tables = set(inspect(engine).get_table_names())
    assert {"model", "checkpoint", "dataset", "activation_set", "neuron_stat"} <= tables
    command.downgrade(cfg, "base")
    assert current_revision(engine) is None
    assert set(inspect(engine).get_table_names()) <= {"alembic_version"}
    command.upgrade(cfg, "head")
    assert current_revision(engine) == head_revision()
    engine.dispose()


def test_orm_models_match_migrations(db_url):
    command.upgrade(alembic_config(db_url), "head")
    engine = make_engine(db_url)
    with engine.connect() as conn:
        ctx = MigrationContext.configure(conn, opts={"compare_type": True})
        diff = compare_metadata(ctx, Base.metadata)
    engine.dispose()
    assert diff == []
