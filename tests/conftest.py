"""Shared fixtures: SQLite and PostgreSQL stores, a tiny tokenizer, tiny models of each architecture, a dataset."""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from click.testing import CliRunner

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

PG_ADMIN_URL = os.environ.get("ACTDB_TEST_PG", "postgresql://postgres@127.0.0.1:5432/postgres")


def _pg_admin():
    import psycopg

    return psycopg.connect(PG_ADMIN_URL.replace("postgresql+psycopg", "postgresql"), autocommit=True, connect_timeout=5)


@contextlib.contextmanager
def fresh_pg_database(prefix: str = "actdb_test") -> Iterator[str]:
    """Create an empty PostgreSQL database on the local server and drop it, and its SQL-door reader role,
    afterwards (skip if no server)."""
    try:
        admin = _pg_admin()
    except Exception as exc:
        message = f"PostgreSQL server not reachable at {PG_ADMIN_URL}: {exc}"
        if os.environ.get("ACTDB_REQUIRE_PG"):  # CI starts the server: a missing one is a failure there
            pytest.fail(message)
        pytest.skip(message)
    name = f"{prefix}_{uuid.uuid4().hex[:10]}"
    admin.execute(f'CREATE DATABASE "{name}"')
    try:
        yield f"{PG_ADMIN_URL.rsplit('/', 1)[0]}/{name}"
    finally:
        from actdb.store.database.sql_reader import reader_role_name

        admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.execute(f'DROP ROLE IF EXISTS "{reader_role_name(name)}"')  # roles are cluster-wide
        admin.close()


@pytest.fixture
def pg_url() -> Iterator[str]:
    """A fresh, empty PostgreSQL database on the local server, dropped afterwards."""
    with fresh_pg_database() as url:
        yield url


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request, tmp_path) -> str:
    """Each test using it runs once on an SQLite file and once on the PostgreSQL server."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'actdb.sqlite'}"
    return request.getfixturevalue("pg_url")


@pytest.fixture
def store_config(tmp_path):
    from actdb.store.config import StoreConfig

    return StoreConfig.resolve(tmp_path / "store", None)


@pytest.fixture
def store(store_config):
    from actdb.store.database.connection import Store

    s = Store.init(store_config)
    yield s
    s.close()


@dataclass
class CliResult:
    exit_code: int
    stdout: str
    stderr: str


def cli_call(home: Path, db: str, *args: object) -> CliResult:
    """Run `actdb --home HOME --db DB ARGS...` in-process through `main`, with its one-line error handling."""
    from actdb.query.cli import main

    runner = CliRunner()
    with runner.isolation() as streams:
        try:
            main(["--home", str(home), "--db", db] + [str(a) for a in args])
            code = 0
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
        out, err = streams[0].getvalue().decode(), streams[1].getvalue().decode()
    return CliResult(code, out, err)


def cli_runner(home: Path, db: str):
    """`run(*args, ok=True)`: the CLI on one store, asserting success unless `ok=False`."""

    def run(*args: object, ok: bool = True) -> CliResult:
        r = cli_call(home, db, *args)
        assert not ok or r.exit_code == 0, (args, r.stderr)
        return r

    return run


@pytest.fixture
def run_cli(store_config):
    """`run_cli(*args)` runs the CLI against the test store (or `home=`/`db=` given)."""

    def invoke(*args: object, home: Path | None = None, db: str | None = None) -> CliResult:
        return cli_call(home or store_config.home, db or store_config.database_url, *args)

    return invoke


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory) -> Path:
    """A byte-level BPE tokenizer (vocab 300) trained on standard-library source, saved like a hub tokenizer."""
    from actdb.store.ingest.zoo import stdlib_texts, train_tokenizer

    out = tmp_path_factory.mktemp("tokenizer")
    train_tokenizer(stdlib_texts(max_files=40), vocab_size=300, out_dir=out)
    return out


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory, tokenizer_dir) -> dict[str, Path]:
    """Tiny randomly initialised GPT-2, GPT-NeoX and Llama models (2 layers x 128 neurons) saved by path."""
    from actdb.store.ingest.zoo import save_tiny_model

    root = tmp_path_factory.mktemp("models")
    return {
        arch: save_tiny_model(arch, root / arch, tokenizer_dir, seed=i)
        for i, arch in enumerate(["gpt2", "gpt_neox", "llama"])
    }


@pytest.fixture(scope="session")
def text_dir(tmp_path_factory) -> Path:
    """A few standard-library source files copied into a folder, as a user's text corpus."""
    from actdb.store.ingest.zoo import stdlib_texts

    out = tmp_path_factory.mktemp("texts")
    for i, text in enumerate(stdlib_texts(max_files=12, offset=40)):
        (out / f"doc{i:02d}.txt").write_text(text)
    return out
