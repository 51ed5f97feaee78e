"""Small things that made the CLI harder to trust: `dataset show` padding every line, a missing PostgreSQL database
reported as unreachable, two spellings of --top-k, and `plan --device` as free text."""

from __future__ import annotations

import click

from actdb.compute.planning.shapes import DEVICES
from actdb.query.cli import cli
from actdb.query.commands.correlation import correlate
from actdb.query.commands.plan import PLAN_DEVICES
from tests.conftest import PG_ADMIN_URL, _pg_admin, cli_call, cli_runner, fresh_pg_database


def test_dataset_show_pads_no_line(tmp_path, tokenizer_dir, text_dir):
    home, db = tmp_path, f"sqlite:///{tmp_path}/actdb.sqlite"
    run = cli_runner(home, db)
    run("init")
    run("dataset", "add", "d", text_dir, "--tokenizer", tokenizer_dir, "--seq-len", 32, "--tokens", 800)
    lines = run("dataset", "show", "d").stdout.splitlines()
    fields = {line.split()[0]: line for line in lines}
    assert fields["seq_len"].split() == ["seq_len", "32"]
    width = max(len(k) for k in fields)
    for name, line in fields.items():
        assert line == line.rstrip() and not line[width:].startswith("   "), line
        assert len(line) <= width + 2 + max(len(v) for v in line.split(None, 1)[1:] or [""]), name
    assert len(fields["seq_len"]) == width + 2 + 2  # "32": not padded to the longest value
    assert "seq_len" in run("dataset", "show", "d", "--format", "csv").stdout


def test_a_missing_postgres_database_is_named_and_init_creates_it(tmp_path):
    with fresh_pg_database("actdb_missing") as url:
        missing = url + "_absent"
        name = missing.rsplit("/", 1)[1]
        r = cli_call(tmp_path, missing, "status")
        assert r.exit_code == 1 and len(r.stderr.strip().splitlines()) == 1, r.stderr
        assert f"database '{name}' does not exist" in r.stderr and "createdb -h 127.0.0.1 -p 5432" in r.stderr
        assert "cannot reach" not in r.stderr
        try:
            r = cli_call(tmp_path, missing, "init")
            assert r.exit_code == 0, r.stderr
            assert cli_call(tmp_path, missing, "status").exit_code == 0
        finally:
            with _pg_admin() as admin:
                admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
                admin.execute(f'DROP ROLE IF EXISTS "actdb_reader_{name}"')
    assert PG_ADMIN_URL


def _visible_options(command: click.Command) -> set[str]:
    return {o for p in command.params if isinstance(p, click.Option) and not p.hidden for o in p.opts}


def _commands(group: click.Group, prefix: str = "") -> dict[str, click.Command]:
    found = {}
    for name, command in group.commands.items():
        found[prefix + name] = command
        if isinstance(command, click.Group):
            found.update(_commands(command, f"{prefix}{name} "))
    return found


def test_top_k_has_one_spelling_and_the_old_one_still_works():
    spelled = {name for name, c in _commands(cli).items() if {"--topk", "--top-k"} & _visible_options(c)}
    assert spelled >= {"correlate", "examples", "ingest"}
    assert not any("--topk" in _visible_options(c) for c in _commands(cli).values())
    base = ["--models", "a,b", "--step", "0"]
    new = correlate.make_context("correlate", [*base, "--top-k", "3"]).params
    old = correlate.make_context("correlate", [*base, "--topk", "3"]).params
    assert (new["topk"], new["old_topk"]) == (3, None) and old["old_topk"] == 3
    assert "--topk" not in correlate.get_help(click.Context(correlate))


def test_plan_device_is_a_choice(tmp_path):
    assert PLAN_DEVICES == DEVICES
    r = cli_call(
        tmp_path,
        f"sqlite:///{tmp_path}/x.sqlite",
        "plan",
        "--models",
        2,
        "--steps",
        1,
        "--tokens",
        "1k",
        "--arch",
        "gpt2-small",
        "--device",
        "tpu",
    )
    assert r.exit_code == 2 and "'tpu' is not one of 'cpu', 'cuda', 'h100', 'a100', 'h200'" in r.stderr
