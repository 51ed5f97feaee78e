"""Peak memory of `actdb sql` on a large result: streamed (the command as shipped) against holding the rows (the
previous behaviour: every row in a list, then rendered), each in a fresh interpreter, on SQLite and PostgreSQL.

    python benchmarks/sql_stream.py --rows 2000000 [--pg postgresql+psycopg://postgres@127.0.0.1:5432/postgres]

Prints, per backend: rows, peak RSS of a one-row query (the interpreter's floor), of the streamed command and of
the held result, and the seconds each took.
"""

from __future__ import annotations

import argparse
import contextlib
import subprocess
import sys
import tempfile
import textwrap
import time
import uuid

STREAMED = textwrap.dedent(
    """
    import resource, sys
    from actdb.query.cli import main
    try:
        main(["--home", sys.argv[1], "--db", sys.argv[2], "sql", sys.argv[3], "--format", "csv", "--max-rows", "0",
              "--max-bytes", "0", "--timeout", "600"])
    except SystemExit as exc:
        assert not exc.code, exc.code
    print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024, file=sys.stderr)
    """
)
HELD = textwrap.dedent(
    """
    import resource, sys
    from actdb.query.output import render
    from actdb.query.sql_console import ReadonlyQuery
    from actdb.store.config import StoreConfig
    from actdb.store.database.connection import Rows
    cfg = StoreConfig.resolve(sys.argv[1], sys.argv[2])
    with ReadonlyQuery(cfg, sys.argv[3], 600, None, None) as result:
        rows = list(result)
    sys.stdout.write(render(Rows.from_tuples(result.columns, rows), "csv"))
    print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024, file=sys.stderr)
    """
)


def numbers(n: int) -> str:
    return (
        f"WITH RECURSIVE r(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM r WHERE n < {n}) "
        "SELECT n, 'row ' || CAST(n AS VARCHAR(20)) AS label FROM r"
    )


def peak(script: str, home: str, url: str, sql: str) -> tuple[int, float]:
    started = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-c", script, home, url, sql], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    if done.returncode:
        raise SystemExit(done.stderr)
    return int(done.stderr.strip().splitlines()[-1]), time.perf_counter() - started


@contextlib.contextmanager
def pg_database(admin_url: str):
    import psycopg

    server = admin_url.replace("postgresql+psycopg", "postgresql")
    name = f"actdb_bench_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(server, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    try:
        yield f"{admin_url.rsplit('/', 1)[0]}/{name}"
    finally:
        with psycopg.connect(server, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            admin.execute(f'DROP ROLE IF EXISTS "actdb_reader_{name}"')


def measure(label: str, home: str, url: str, n: int) -> None:
    from actdb.store.config import StoreConfig
    from actdb.store.database.connection import Store

    Store.init(StoreConfig.resolve(home, url)).close()
    floor, _ = peak(STREAMED, home, url, numbers(1))
    streamed, t_streamed = peak(STREAMED, home, url, numbers(n))
    held, t_held = peak(HELD, home, url, numbers(n))
    print(
        f"| {label} | {n:,} | {floor} MiB | {streamed} MiB ({t_streamed:.1f} s) | {held} MiB ({t_held:.1f} s) |",
        flush=True,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=2_000_000)
    parser.add_argument("--pg", default="postgresql+psycopg://postgres@127.0.0.1:5432/postgres")
    args = parser.parse_args()
    print("| backend | rows | one-row floor | streamed | held (before) |\n|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as home:
        measure("SQLite", home, f"sqlite:///{home}/actdb.sqlite", args.rows)
    with tempfile.TemporaryDirectory() as home, pg_database(args.pg) as url:
        measure("PostgreSQL", home, url, args.rows)


if __name__ == "__main__":
    main()
