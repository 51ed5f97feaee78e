"""`actdb --version`, `init`, `status` and one-line errors for user mistakes."""

import subprocess
import sys

from sqlalchemy import text

from actdb.store.database.connection import make_engine


def test_init_status_on_sqlite(run_cli, store_config):
    r = run_cli("status")
    assert r.exit_code == 1 and "actdb init" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    r = run_cli("init")
    assert r.exit_code == 0, r.stderr
    assert (store_config.home / "actdb.sqlite").exists()
    r = run_cli("status", "--format", "json")
    assert r.exit_code == 0 and r.stdout.strip() == "[]"
    assert run_cli("init").exit_code == 0


def test_init_status_on_postgresql(run_cli, pg_url, tmp_path):
    assert run_cli("init", db=pg_url).exit_code == 0
    r = run_cli("status", db=pg_url)
    assert r.exit_code == 0 and "(no rows)" in r.stdout


def test_schema_behind_is_reported(run_cli, store_config):
    run_cli("init")
    engine = make_engine(store_config.database_url)
    with engine.begin() as conn:
        conn.execute(text("UPDATE alembic_version SET version_num = '0001'"))
    engine.dispose()
    r = run_cli("status")
    assert r.exit_code == 1
    assert "0001" in r.stderr and "actdb init" in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_user_mistakes_are_one_line(run_cli, tmp_path):
    cases = [
        run_cli("init", db="postgresql://nobody:sekrit@127.0.0.1:1/none?password=sekrit2"),
        run_cli("status", "--no-such-option"),
        run_cli("no-such-command"),
    ]
    (tmp_path / "file").write_text("not a folder")
    cases.append(run_cli("init", home=tmp_path / "file" / "below"))
    for r in cases:
        assert r.exit_code != 0
        assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "cannot reach" in cases[0].stderr and "sekrit" not in cases[0].stderr


def test_console_script_version():
    out = subprocess.run([sys.executable, "-m", "actdb.query.cli", "--version"], capture_output=True, text=True)
    assert out.returncode == 0 and "actdb, version" in out.stdout


def test_help_says_the_demo_threshold_and_what_mantel_permutations_are():
    from click.testing import CliRunner

    from actdb.query.cli import cli
    from actdb.query.demo import DemoRequest

    def help_of(*command: str) -> str:
        return " ".join(CliRunner().invoke(cli, [*command, "--help"], terminal_width=400).output.split())

    assert f"[default: {DemoRequest.threshold}]" in help_of("demo")  # the value the demo runs with
    for command in (("concept", "show"), ("concept", "run")):
        assert "--mantel-permutations INTEGER RANGE Permutations of the Mantel test" in help_of(*command), command


def test_the_package_docstring_says_listings_are_data_frames(store):
    import pandas as pd

    import actdb
    from actdb.query.api import ActdbStore

    assert "rows as dicts" not in actdb.__doc__ and "pandas DataFrame" in actdb.__doc__
    assert isinstance(ActdbStore(store).models().head(3), pd.DataFrame)
