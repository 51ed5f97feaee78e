"""The `actdb` command line: the group, its store options, and the commands of every study (`query/commands/`).
Each command opens the store, calls one library function with keyword arguments and renders its rows; user
mistakes become one line on stderr and a non-zero exit (`main`)."""

from __future__ import annotations

import os
import sys

import click

from actdb import __version__
from actdb.query.commands import (
    ablation,
    concepts,
    correlation,
    explain,
    ingest,
    persistence,
    plan,
    report,
    robustness,
    serve,
    similarity,
    sql,
    store,
    trajectories,
)
from actdb.query.options import AppContext
from actdb.store.config import StoreConfig
from actdb.store.errors import ActdbError, first_line


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.version_option(__version__, prog_name="actdb")
@click.option("--home", envvar="ACTDB_HOME", help="Store folder for HDF5 files [env ACTDB_HOME; ./actdb-store].")
@click.option(
    "--db",
    "database_url",
    envvar="ACTDB_DATABASE_URL",
    help="SQLAlchemy database URL [env ACTDB_DATABASE_URL; SQLite file in the store folder].",
)
@click.pass_context
def cli(ctx: click.Context, home: str | None, database_url: str | None) -> None:
    """actdb: an activation store and query tool for neuron-level studies across seeds and checkpoints."""
    ctx.obj = AppContext(StoreConfig.resolve(home, database_url))


for _module in (
    store,
    ingest,
    correlation,
    similarity,
    persistence,
    ablation,
    explain,
    sql,
    report,
    plan,
    trajectories,
    concepts,
    serve,
    robustness,
):
    for _command in _module.COMMANDS:
        cli.add_command(_command)


def main(argv: list[str] | None = None) -> None:
    """Console entry point: user mistakes become one line on stderr and exit status 1 (2 for usage errors)."""
    _exit(_run(argv))


def _run(argv: list[str] | None) -> int:
    try:
        cli.main(args=argv, prog_name="actdb", standalone_mode=False)
    except click.exceptions.Exit as exc:
        return exc.exit_code
    except click.Abort:
        return _fail("aborted", 130)
    except click.UsageError as exc:
        ctx = f" (see `{exc.ctx.command_path} --help`)" if exc.ctx else ""
        return _fail(f"{first_line(click.ClickException(exc.format_message()))}{ctx}", 2)
    except click.ClickException as exc:
        return _fail(exc.format_message(), exc.exit_code)
    except ActdbError as exc:
        return _fail(f"error: {exc}", 1)
    except KeyboardInterrupt:
        return _fail("interrupted", 130)
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else 1
    except Exception as exc:
        sa = sys.modules.get("sqlalchemy.exc")  # a database error needs the database layer, already imported
        if sa is not None and isinstance(exc, sa.SQLAlchemyError):
            return _fail(f"database error: {first_line(exc)}", 1)
        raise
    return 0


def _fail(message: str, code: int) -> int:
    click.echo(f"actdb: {message}", err=True)
    return code


def _exit(code: int) -> None:
    files = sys.modules.get("actdb.store.files.activation")  # only commands that opened HDF5 files import it
    if files is not None and files.unclosable_files():  # HDF5 would fail finalizing a file it cannot flush
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


if __name__ == "__main__":
    main()
