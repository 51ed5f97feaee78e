"""Reading the store as an analyst: `sql` on the read-only door and `export` of activations."""

from __future__ import annotations

import click

from actdb.query.options import (
    INDEX,
    AppContext,
    dataset_option,
    format_option,
    pass_app,
    read_hook_option,
)
from actdb.query.output import render, render_stream
from actdb.query.sql_console import DEFAULT_MAX_BYTES, DEFAULT_MAX_ROWS


@click.command()
@click.argument("query", required=False)
@click.option("--schema", is_flag=True, help="List tables and views with their columns.")
@click.option(
    "--timeout", type=click.FloatRange(0.1, 86400), default=30.0, show_default=True, help="Cancel after SECONDS."
)
@click.option(
    "--max-rows",
    type=click.IntRange(0),
    default=DEFAULT_MAX_ROWS,
    show_default=True,
    help="Stop after this many rows and say so on stderr (0: no cap; rows are streamed either way).",
)
@click.option(
    "--max-bytes",
    type=click.IntRange(0),
    default=DEFAULT_MAX_BYTES,
    show_default=True,
    help="Stop once the values' text reaches this many bytes and say so on stderr (0: no cap).",
)
@format_option
@pass_app
def sql(
    app: AppContext, query: str | None, schema: bool, timeout: float, max_rows: int, max_bytes: int, fmt: str
) -> None:
    """Run one read-only SQL statement against the store (it cannot write, by construction); rows are streamed
    to the output as they arrive."""
    from actdb.query.sql_console import ReadonlyQuery, schema_listing
    from actdb.store.database.connection import Rows

    app.store()
    if schema:
        click.echo(render(Rows.from_tuples(*schema_listing(app.config)), fmt))
    elif query and query.strip():  # blank text is the same usage error as none
        with ReadonlyQuery(app.config, query, timeout, max_rows, max_bytes) as result:
            columns = Rows.from_tuples(result.columns, []).columns  # repeated names made unique, as elsewhere
            render_stream(columns, result, fmt, lambda text: click.echo(text, nl=False))
        if result.notice:
            click.echo(result.notice, err=True)
    else:
        raise click.UsageError("give a SQL query or --schema")


@click.command()
@click.argument("target", metavar="MODEL@STEP")
@click.option("--layer", type=INDEX, required=True)
@click.option("--neurons", help="Comma-separated neuron indices (default: all).")
@click.option("--tokens", "token_range", help="START:END token rows (default: all).")
@dataset_option("Dataset of the set (default: the only one).")
@read_hook_option
@click.option("--counted-only", is_flag=True, help="Drop positions that are not counted (BOS/EOS/padding).")
@click.option(
    "--out", "out_path", required=True, type=click.Path(dir_okay=False), help="FILE.csv, FILE.parquet or FILE.npy"
)
@pass_app
def export(
    app: AppContext,
    target: str,
    layer: int,
    neurons: str | None,
    token_range: str | None,
    dataset_name: str | None,
    hook: str | None,
    counted_only: bool,
    out_path: str,
) -> None:
    """Write activations of one layer (neurons in the order given) to CSV or Parquet, with each row's token
    index, sequence, position, token id and counted flag, or the bare values to .npy."""
    from actdb.query.api import ActdbStore

    acts = ActdbStore(app.store()).activations(
        target,
        layer,
        neurons=neurons,
        tokens=token_range,
        dataset=dataset_name,
        counted_only=counted_only,
        hook=hook,
    )
    acts.write(out_path)
    click.echo(
        f"wrote {acts.values.shape[0]} tokens x {acts.values.shape[1]} neurons of {target} at {acts.hook} to {out_path}"
    )


COMMANDS = (
    sql,
    export,
)
