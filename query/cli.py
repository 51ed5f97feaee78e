"""The `actdb` command line: every user-facing command, with one-line errors and non-zero exits."""

from __future__ import annotations

import sys
from importlib.metadata import version

import click

from query.output import FORMATS, render
from store.config import StoreConfig
from store.database import Store
from store.errors import ActdbError


class AppContext:
    """Resolved store location, opened lazily so `--help` never touches the database."""

    def __init__(self, config: StoreConfig) -> None:
        self.config = config
        self._store: Store | None = None

    def store(self) -> Store:
        if self._store is None:
            self._store = Store.open(self.config)
        return self._store


pass_app = click.make_pass_decorator(AppContext)
format_option = click.option("--format", "fmt", type=click.Choice(FORMATS), default="table", show_default=True)


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(version("actdb"), prog_name="actdb")
@click.option("--home", envvar="ACTDB_HOME", help="Store folder for HDF5 files [env ACTDB_HOME; ./actdb-store].")
@click.option("--db", "database_url", envvar="ACTDB_DATABASE_URL",
              help="SQLAlchemy database URL [env ACTDB_DATABASE_URL; SQLite file in the store folder].")
@click.pass_context
def cli(ctx: click.Context, home: str | None, database_url: str | None) -> None:
    """actdb: an activation store and query tool for neuron-level studies across seeds and checkpoints."""
    ctx.obj = AppContext(StoreConfig.resolve(home, database_url))


@cli.command()
@pass_app
def init(app: AppContext) -> None:
    """Create the store (folder + database) or upgrade its schema to the latest revision."""
    store = Store.init(app.config)
    click.echo(f"store ready: {app.config.home} (database {store.engine.url.render_as_string(hide_password=True)})")


@cli.command()
@format_option
@pass_app
def status(app: AppContext, fmt: str) -> None:
    """Models, checkpoints and activation sets with their ingest status and bytes on disk."""
    from query.listings import status_rows

    columns, rows = status_rows(app.store())
    click.echo(render(columns, rows, fmt))


def main(argv: list[str] | None = None) -> None:
    """Console entry point: user mistakes become one line on stderr and exit status 1 (2 for usage errors)."""
    try:
        cli.main(args=argv, prog_name="actdb", standalone_mode=False)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except click.Abort:
        click.echo("actdb: aborted", err=True)
        sys.exit(130)
    except click.UsageError as exc:
        ctx = f" (see `{exc.ctx.command_path} --help`)" if exc.ctx else ""
        click.echo(f"actdb: {exc.format_message()}{ctx}", err=True)
        sys.exit(2)
    except click.ClickException as exc:
        click.echo(f"actdb: {exc.format_message()}", err=True)
        sys.exit(exc.exit_code)
    except ActdbError as exc:
        click.echo(f"actdb: error: {exc}", err=True)
        sys.exit(1)
    except KeyboardInterrupt:
        click.echo("actdb: interrupted", err=True)
        sys.exit(130)


if __name__ == "__main__":
    main()
