"""`actdb sql` is read-only by construction: reader role / read-only SQLite connection, one statement, timeouts."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import psycopg
import pytest

from actdb.query.output import render
from actdb.query.sql_console import ROWS_ONLY, run_readonly, schema_listing
from actdb.store.config import StoreConfig
from actdb.store.database.connection import Rows, Store
from actdb.store.database.schema import Checkpoint, Model
from actdb.store.database.sql_reader import connect_postgres_reader, provision_sql_reader, reader_role_name
from actdb.store.errors import ActdbError
from tests.conftest import PG_ADMIN_URL, cli_call, fresh_pg_database

SERVER = PG_ADMIN_URL.replace("postgresql+psycopg", "postgresql").rsplit("/", 1)[0]


def _admin(dbname: str = "postgres") -> psycopg.Connection:
    return psycopg.connect(f"{SERVER}/{dbname}", autocommit=True, connect_timeout=5)


def _populate(store: Store) -> None:
    with store.session() as s:
        for i, name in enumerate(["a", "b"]):
            m = Model(name=name, family="f", architecture="gpt2", n_layers=2, d_mlp=8, source=f"/src/{name}")
            s.add(m)
            s.flush()
            s.add_all([Checkpoint(model_id=m.id, step=step, source=m.source) for step in range(i + 1)])


def _drop_roles(*roles: str) -> None:
    with _admin() as admin:
        for role in roles:
            admin.execute(f'DROP ROLE IF EXISTS "{role}"')


@pytest.fixture(scope="module")
def server_dir():
    """A folder the PostgreSQL server process (another OS user) could write to: escapes must leave it empty."""
    path = Path(tempfile.mkdtemp(prefix="actdb-door-"))
    path.chmod(0o777)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def lite(tmp_path_factory) -> StoreConfig:
    home = tmp_path_factory.mktemp("door-lite")
    cfg = StoreConfig.resolve(home, f"sqlite:///{home}/actdb.sqlite")
    store = Store.init(cfg)
    _populate(store)
    assert provision_sql_reader(store.engine) is None  # SQLite needs no role
    store.close()
    run_readonly(cfg, "SELECT 1")  # a WAL reader creates -wal/-shm once; snapshots are taken after that
    return cfg


@pytest.fixture(scope="module")
def pg(tmp_path_factory) -> StoreConfig:
    with fresh_pg_database("actdb_door") as url:
        cfg = StoreConfig.resolve(tmp_path_factory.mktemp("door-pg"), url)
        store = Store.init(cfg)
        _populate(store)
        assert provision_sql_reader(store.engine) is None
        store.close()
        yield cfg


@pytest.fixture
def role_janitor():
    """Roles to drop after the test; request it before `pg_url` so it tears down after the database is gone."""
    roles: list[str] = []
    yield roles
    _drop_roles(*roles)


def _dbname(cfg: StoreConfig) -> str:
    return cfg.database_url.rsplit("/", 1)[1]


def _pg_state(cfg: StoreConfig) -> dict:
    with _admin(_dbname(cfg)) as admin:
        tables = [r[0] for r in admin.execute("SELECT tablename FROM pg_tables WHERE schemaname = 'public' ORDER BY 1")]
        state = {t: admin.execute(f'SELECT count(*) FROM "{t}"').fetchone()[0] for t in tables}
        state["version"] = admin.execute("SELECT version_num FROM alembic_version").fetchall()
        state["views"] = admin.execute(
            "SELECT viewname FROM pg_views WHERE schemaname = 'public' ORDER BY 1"
        ).fetchall()
        state["large objects"] = admin.execute("SELECT count(*) FROM pg_largeobject_metadata").fetchone()[0]
        state["reader"] = admin.execute(
            "SELECT rolsuper, rolcreaterole, rolcreatedb, rolinherit, rolconfig FROM pg_roles WHERE rolname = %s",
            (reader_role_name(_dbname(cfg)),),
        ).fetchall()
    return state


def _lite_state(cfg: StoreConfig) -> dict:
    """Files of the store and their bytes; SQLite's WAL index (-shm) and an empty -wal come and go with readers."""
    files = {p.name: p.read_bytes() for p in cfg.home.iterdir() if not p.name.endswith("-shm")}
    return {name: hashlib.sha256(data).hexdigest() for name, data in files.items() if data or "-wal" not in name}


def _refused(cfg: StoreConfig, sql: str, timeout: float = 5.0) -> str:
    with pytest.raises(ActdbError) as info:
        run_readonly(cfg, sql, timeout=timeout)
    message = str(info.value)
    assert len(message.splitlines()) == 1, message
    return message


PG_ESCAPES = [
    "COMMIT; DELETE FROM ablation",
    "ROLLBACK; DROP TABLE universality CASCADE",
    "SELECT 1; DELETE FROM model",
    "DELETE FROM model",
    "UPDATE model SET name = 'x'",
    "INSERT INTO model (name) VALUES ('x')",
    "DROP TABLE neuron_stat",
    "TRUNCATE model CASCADE",
    "WITH d AS (DELETE FROM checkpoint RETURNING 1) SELECT count(*) FROM d",
    "DO $$BEGIN COMMIT; DELETE FROM model; END$$",
    "COPY (SELECT 1) TO PROGRAM 'id > {dir}/program'",
    "COPY (SELECT 1) TO '{dir}/copy'",
    "COPY model FROM '/etc/hostname'",
    "SELECT lo_export(lo_from_bytea(0, 'x'), '{dir}/lo')",
    "SELECT pg_read_file('/etc/passwd')",
    "SELECT pg_ls_dir('.')",
    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = 'postgres'",
    "SELECT set_config('role', 'postgres', false)",
    "SET ROLE postgres",
    "SET SESSION AUTHORIZATION postgres",
    "SELECT set_config('log_statement', 'all', false)",
    "SELECT set_config('transaction_read_only', 'off', true)",
    "SELECT pg_reload_conf()",
    "ALTER SYSTEM SET work_mem = '1GB'",
    "SELECT * FROM alembic_version",
    "SELECT * FROM sql_reader",
    "CREATE TEMP TABLE t AS SELECT 1",
    "CREATE TABLE public.t (x int)",
    "GRANT ALL ON model TO PUBLIC",
    "SELECT nextval('model_id_seq')",
    "LOCK TABLE model",
    "VACUUM model",
]
LITE_ESCAPES = [
    "VACUUM INTO '{dir}/vacuum.db'",
    "VACUUM",
    "ATTACH DATABASE '{dir}/attached.db' AS other",
    "DETACH DATABASE main",
    "COMMIT; DELETE FROM ablation",
    "ROLLBACK; DROP TABLE universality",
    "SELECT 1; DELETE FROM model",
    "DELETE FROM model",
    "UPDATE model SET name = 'x'",
    "INSERT INTO model (name) VALUES ('x')",
    "DROP TABLE neuron_stat",
    "CREATE TEMP TABLE t AS SELECT 1",
    "BEGIN IMMEDIATE",
    "PRAGMA query_only = OFF",
    "PRAGMA writable_schema = ON",
    "PRAGMA journal_mode = DELETE",
    "SELECT load_extension('{dir}/evil')",
    "SELECT * FROM alembic_version",
    "REINDEX",
    "ANALYZE",
]


@pytest.mark.parametrize(
    "backend,sql", [("pg", s) for s in PG_ESCAPES] + [("lite", s) for s in LITE_ESCAPES], ids=lambda x: str(x)[:40]
)
def test_escapes_are_refused_and_change_nothing(backend, sql, request, server_dir, tmp_path):
    cfg = request.getfixturevalue(backend)
    target_dir = server_dir if backend == "pg" else tmp_path
    state = _pg_state if backend == "pg" else _lite_state
    before = state(cfg)
    message = _refused(cfg, sql.format(dir=target_dir))
    assert message.startswith("refused: "), message
    if sql.count(";") and not sql.startswith("DO"):
        assert "one statement" in message or "not authorised" in message, message
    assert state(cfg) == before
    assert list(target_dir.iterdir()) == []


def test_server_could_have_written_there(server_dir):
    """Control for the COPY/lo_export cases: the server itself can write into `server_dir`."""
    with _admin() as admin:
        admin.execute(f"COPY (SELECT 1) TO '{server_dir}/control'")
    assert (server_dir / "control").read_text() == "1\n"
    (server_dir / "control").unlink()


def test_large_objects_and_settings_die_with_the_transaction(pg):
    """What PUBLIC may still execute (creating a large object, user settings) is rolled back, never committed."""
    before = _pg_state(pg)
    cols, rows = run_readonly(pg, "SELECT lo_from_bytea(0, 'x') IS NOT NULL AS created")
    assert rows == [(True,)]
    run_readonly(pg, "SELECT set_config('default_transaction_read_only', 'off', false)")
    run_readonly(pg, "SELECT set_config('statement_timeout', '0', false)")
    assert _pg_state(pg) == before
    assert "read-only" in _refused(pg, "DELETE FROM model")
    assert _refused(pg, "SELECT set_config('statement_timeout', '0', true), pg_sleep(5)", timeout=1).startswith(
        "query cancelled after 1 s"
    )


@pytest.mark.parametrize("backend", ["lite", "pg"])
def test_reads_work(backend, request):
    cfg = request.getfixturevalue(backend)
    assert run_readonly(cfg, "SELECT name FROM model ORDER BY name") == (["name"], [("a",), ("b",)])
    cols, rows = run_readonly(
        cfg,
        "SELECT m.name, count(*) AS n FROM checkpoint c JOIN model m ON m.id = c.model_id "
        "GROUP BY m.name ORDER BY m.name;",
    )
    assert cols == ["name", "n"] and rows == [("a", 1), ("b", 2)]
    assert run_readonly(cfg, "SELECT count(*) AS n FROM v_universality")[1] == [(0,)]
    assert run_readonly(cfg, "SELECT '%s' AS p, '100%' AS q") == (["p", "q"], [("%s", "100%")])
    assert run_readonly(
        cfg, "WITH RECURSIVE r(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM r WHERE n < 5) SELECT sum(n) AS s FROM r"
    ) == (["s"], [(15,)])
    assert "SQL error: " in _refused(cfg, "SELECT * FROM no_such_table")
    assert _refused(cfg, "SELEC 1").startswith("SQL error: ")
    names = {row[1] for row in schema_listing(cfg)[1]}
    assert {"model", "v_universality"} <= names and not names & {"alembic_version", "sql_reader"}


def test_sqlite_timeout_cancels_a_runaway_query(lite):
    t0 = time.monotonic()
    message = _refused(
        lite, "WITH RECURSIVE r(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM r) SELECT count(*) FROM r", 1
    )
    assert message == "query cancelled after 1 s (--timeout)"
    assert time.monotonic() - t0 < 2.5


def _reader_backends(cfg: StoreConfig) -> list[tuple]:
    with _admin() as admin:
        return admin.execute(
            "SELECT pid, state, query FROM pg_stat_activity WHERE usename = %s", (reader_role_name(_dbname(cfg)),)
        ).fetchall()


def _wait_until(predicate, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return predicate()


def test_pg_timeout_is_enforced_by_the_server(pg):
    t0 = time.monotonic()
    assert _refused(pg, "SELECT pg_sleep(5)", timeout=1) == "query cancelled after 1 s (--timeout)"
    assert time.monotonic() - t0 < 2.5
    assert _wait_until(lambda: _reader_backends(pg) == [], 2), _reader_backends(pg)


def test_pg_query_of_a_killed_client_ends_on_the_server(pg):
    code = (
        "from actdb.query.sql_console import run_readonly; from actdb.store.config import StoreConfig; "
        f"run_readonly(StoreConfig.resolve({str(pg.home)!r}, {pg.database_url!r}), 'SELECT pg_sleep(60)', timeout=4)"
    )
    child = subprocess.Popen([sys.executable, "-c", code], env=dict(os.environ), cwd=Path(__file__).parent.parent)
    try:
        assert _wait_until(lambda: any("pg_sleep" in (q or "") for _, _, q in _reader_backends(pg)), 15)
        t_kill = time.monotonic()
        os.kill(child.pid, signal.SIGKILL)
        child.wait()
        assert _wait_until(lambda: _reader_backends(pg) == [], 5), _reader_backends(pg)
        assert time.monotonic() - t_kill < 4.5  # ended by the server, at latest by its statement_timeout
    finally:
        if child.poll() is None:
            child.kill()


def test_pg_reader_session_is_the_reader_not_a_set_role(pg):
    from sqlalchemy import create_engine

    engine = create_engine(pg.database_url.replace("postgresql://", "postgresql+psycopg://"))
    conn = connect_postgres_reader(engine, 7)
    try:
        row = conn.execute(
            "SELECT session_user, current_user, current_setting('transaction_read_only'), "
            "current_setting('statement_timeout'), current_setting('default_transaction_read_only')"
        ).fetchone()
        assert row == (reader_role_name(_dbname(pg)),) * 2 + ("on", "7s", "on")
    finally:
        conn.close()
        engine.dispose()


def test_tables_of_later_migrations_are_granted_by_reprovisioning(role_janitor, pg_url, tmp_path):
    cfg = StoreConfig.resolve(tmp_path, pg_url)
    role = reader_role_name(_dbname(cfg))
    role_janitor.append(role)
    store = Store.init(cfg)
    try:
        assert provision_sql_reader(store.engine) is None
        password = _stored(cfg, role)
        with _admin(_dbname(cfg)) as admin:  # the store owner adds a table, as a later migration would
            admin.execute("CREATE TABLE later (x int); INSERT INTO later VALUES (1)")
            assert "permission denied" in _refused(cfg, "SELECT x FROM later")
            admin.execute(f'GRANT pg_read_server_files TO "{role}"')  # and someone widens the reader
            assert "more than read access" in _refused(cfg, "SELECT 1")
        assert provision_sql_reader(store.engine) is None  # `actdb init` again: idempotent, repairs, re-grants
        assert run_readonly(cfg, "SELECT x FROM later") == (["x"], [(1,)])
        assert _stored(cfg, role) == password
    finally:
        store.close()


def _stored(cfg: StoreConfig, role: str) -> str:
    with _admin(_dbname(cfg)) as admin:
        return admin.execute("SELECT password FROM sql_reader WHERE role = %s", (role,)).fetchone()[0]


@pytest.mark.parametrize("may_create_roles", [False, True])
def test_store_owner_without_superuser(may_create_roles, role_janitor, pg_url, tmp_path):
    """A plain owner gets the administrator's SQL and a clean refusal; a CREATEROLE owner provisions alone."""
    owner = f"actdb_plain_{uuid.uuid4().hex[:8]}"
    dbname = _dbname(StoreConfig(tmp_path, pg_url))
    role = reader_role_name(dbname)
    role_janitor.extend([owner, role])
    with _admin() as admin:
        admin.execute(f'CREATE ROLE "{owner}" LOGIN NOSUPERUSER {"CREATEROLE" if may_create_roles else "NOCREATEROLE"}')
        admin.execute(f'ALTER DATABASE "{dbname}" OWNER TO "{owner}"')
    cfg = StoreConfig.resolve(tmp_path, f"{SERVER.replace('postgres@', owner + '@')}/{dbname}")
    store = Store.init(cfg)
    try:
        message = provision_sql_reader(store.engine)
        if may_create_roles:
            assert message is None
        else:
            assert message and "may not create roles" in message and f'CREATE ROLE "{role}"' in message
            assert "GRANT SELECT ON " in message and 'public."model"' in message and "alembic_version" not in message
            refusal = _refused(cfg, "SELECT count(*) FROM model")
            assert refusal.startswith(f"refused: the read-only role {role} of `actdb sql` is missing")
            assert f'CREATE ROLE "{role}"' in refusal
            admin_sql = message.split(": ", 1)[1].split(" Afterwards", 1)[0]
            with _admin(dbname) as admin:  # what the administrator is told to run, run as told
                admin.execute(admin_sql)
            assert provision_sql_reader(store.engine) is None
        assert run_readonly(cfg, "SELECT count(*) AS n FROM model") == (["n"], [(0,)])
        assert _refused(cfg, "SELECT * FROM sql_reader").startswith("refused: ")
        assert _refused(cfg, "COMMIT; DROP TABLE model").startswith("refused: `actdb sql` runs exactly one statement")
    finally:
        store.close()


def test_reader_role_names():
    assert reader_role_name("actdb_test_0123456789") == "actdb_reader_actdb_test_0123456789"
    odd = reader_role_name('My-"DB"')
    assert odd.startswith("actdb_reader_my__db__") and odd != reader_role_name("my__db_")
    assert len(reader_role_name("x" * 63)) <= 63


def test_json_output_of_every_postgres_type(pg):
    """NUMERIC, bytea, arrays and intervals come back as JSON, not a traceback."""
    cols, rows = run_readonly(
        pg,
        "SELECT avg(x)::numeric AS mean, sum(x)::numeric AS total, '\\xdead'::bytea AS raw, ARRAY[1, 2] AS arr, "
        "interval '1 day' AS span, now() AS at FROM (VALUES (1), (2)) AS t(x)",
    )
    out = json.loads(render(Rows.from_tuples(cols, rows), "json"))
    assert out[0]["mean"] == 1.5 and out[0]["total"] == 3 and out[0]["raw"] == "dead" and out[0]["arr"] == [1, 2]
    assert out[0]["span"] == "1 day, 0:00:00" and isinstance(out[0]["at"], str)


@pytest.mark.parametrize("backend", ["lite", "pg"])
@pytest.mark.parametrize("sql", ["SELECT 1 AS a\x00; DELETE FROM model", "SELECT 1 AS x\x00 junk", "\x00"])
def test_a_nul_character_is_refused_on_both_backends(backend, sql, request):
    """PostgreSQL's parser stops at a NUL and would run the part before it; both backends refuse the statement."""
    cfg = request.getfixturevalue(backend)
    message = _refused(cfg, sql)
    assert message.startswith("refused: the statement holds a NUL character (U+0000) at offset "), message
    assert f"offset {sql.index(chr(0))};" in message


@pytest.mark.parametrize(
    "sql,named",
    [
        ("SELECT * FROM pragma_database_list", "table-valued function pragma_database_list"),
        ("SELECT 1 FROM model m, pragma_index_list('model')", "table-valued function pragma_index_list"),
        ("SELECT * FROM json_each('[1]')", "table-valued function json_each"),
        ("PRAGMA database_list", "PRAGMA database_list"),
    ],
)
def test_sqlite_refusal_names_what_was_refused(lite, sql, named):
    message = _refused(lite, sql)
    assert message == f"refused: `actdb sql` is read-only (not authorised: {named})"
    assert "sqlite_master" not in message


NO_ROWS = [("pg", s) for s in ("DO $$ BEGIN PERFORM 1; END $$", "LISTEN x", "NOTIFY x", "PREPARE p AS SELECT 1")]
NO_ROWS += [("pg", "RESET ROLE"), ("pg", "-- a comment"), ("lite", "-- a comment"), ("lite", "/* nothing */")]


@pytest.mark.parametrize("backend,sql", NO_ROWS, ids=lambda x: str(x)[:30])
def test_statements_that_return_no_rows_are_refused_in_one_line(backend, sql, request):
    """What runs and sends back no result (PostgreSQL's DO, LISTEN, PREPARE, ...; a bare comment) is refused with
    one plain line, not the driver's "didn't produce a result", and writes nothing."""
    cfg = request.getfixturevalue(backend)
    state = _pg_state if backend == "pg" else _lite_state
    before = state(cfg)
    assert _refused(cfg, sql) == ROWS_ONLY
    assert state(cfg) == before


@pytest.mark.parametrize("backend", ["lite", "pg"])
def test_an_empty_result_keeps_its_columns_and_blank_text_is_a_usage_error(backend, request):
    cfg = request.getfixturevalue(backend)
    empty = "SELECT m.name, c.step FROM model m JOIN checkpoint c ON c.model_id = m.id WHERE m.name = 'nobody'"
    assert run_readonly(cfg, empty) == (["name", "step"], [])
    r = cli_call(cfg.home, cfg.database_url, "sql", empty, "--format", "csv")
    assert r.exit_code == 0 and r.stdout.splitlines() == ["name,step"], r
    for blank in ("", " ", "\n\t "):
        r = cli_call(cfg.home, cfg.database_url, "sql", blank)
        assert r.exit_code == 2 and "give a SQL query or --schema" in r.stderr, (blank, r)
        with pytest.raises(ActdbError, match="give a SQL statement: the text is empty or only whitespace"):
            run_readonly(cfg, blank)


def test_a_writing_with_clause_is_named_as_the_writer(pg):
    """PostgreSQL names the top-level SELECT when a WITH inside it would write; the refusal says which part."""
    before = _pg_state(pg)
    message = _refused(pg, "WITH x AS (INSERT INTO model (name) VALUES ('x') RETURNING id) SELECT * FROM x")
    assert message.startswith("refused: `actdb sql` is read-only (a data-modifying WITH in the SELECT writes: ")
    assert _pg_state(pg) == before
