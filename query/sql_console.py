"""`actdb sql`: read-only SQL for analysts (SQLite opened read-only, PostgreSQL in a READ ONLY transaction)."""

from __future__ import annotations

from typing import Any

from sqlalchemy import inspect, text
from sqlalchemy.exc import SQLAlchemyError

from actdb.store.config import StoreConfig
from actdb.store.database import make_engine
from actdb.store.errors import ActdbError

WRITE_HINTS = ("readonly", "read-only", "read only")


def run_readonly(config: StoreConfig, sql: str) -> tuple[list[str], list[tuple[Any, ...]]]:
    """Execute one statement without any possibility of writing; writes are refused with one line."""
    engine = make_engine(config.database_url, read_only=True)
    try:
        with engine.connect() as conn:
            if engine.dialect.name == "postgresql":
                conn.execute(text("SET TRANSACTION READ ONLY"))
            result = conn.execute(text(sql))
            if not result.returns_rows:
                return ["result"], [("statement returned no rows",)]
            return list(result.keys()), [tuple(r) for r in result]
    except SQLAlchemyError as exc:
        detail = str(getattr(exc, "orig", None) or exc).strip().splitlines()[0]
        if any(h in detail.lower() for h in WRITE_HINTS):
            raise ActdbError(f"refused: `actdb sql` is read-only ({detail})") from None
        raise ActdbError(f"SQL error: {detail}") from None
    finally:
        engine.dispose()


def schema_listing(config: StoreConfig) -> tuple[list[str], list[tuple[Any, ...]]]:
    """Every table and view with its columns and types."""
    engine = make_engine(config.database_url, read_only=True)
    try:
        insp = inspect(engine)
        rows = []
        for kind, names in (("table", insp.get_table_names()), ("view", insp.get_view_names())):
            for name in sorted(names):
                if name == "alembic_version":
                    continue
                for col in insp.get_columns(name):
                    rows.append((kind, name, col["name"], str(col["type"])))
        return ["kind", "name", "column", "type"], rows
    finally:
        engine.dispose()
