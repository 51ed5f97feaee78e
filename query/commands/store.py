"""Store-wide commands: create or upgrade a store, list and verify what it holds, register token datasets."""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING

import click

from actdb.query.options import (
    COUNT,
    SEED,
    AppContext,
    format_option,
    pass_app,
    quiet_option,
)
from actdb.query.output import render

if TYPE_CHECKING:
    pass


@click.command()
@pass_app
def init(app: AppContext) -> None:
    """Create the store (folder + database) or upgrade its schema to the latest revision."""
    from actdb.store.database.connection import Store, safe_url

    store = Store.init(app.config)
    click.echo(f"store ready: {app.config.home} (database {safe_url(app.config.database_url)})")
    for note in store.notes:
        click.echo(f"actdb: warning: {note}", err=True)


@click.command()
@format_option
@pass_app
def status(app: AppContext, fmt: str) -> None:
    """Models, checkpoints and activation sets with their ingest status and bytes on disk."""
    from actdb.query.listings import status_rows

    click.echo(render(status_rows(app.store()), fmt))


@click.command()
@click.option("--quick", is_flag=True, help="Check existence, headers and shapes only (skip reading every checksum).")
@format_option
@quiet_option
@pass_app
def check(app: AppContext, quick: bool, fmt: str, quiet: bool) -> None:
    """Verify every complete set's file: present, of the recorded shape, and passing its checksums (exit 1 if not)."""
    from actdb.store.check import check_store

    problems = check_store(app.store(), quick=quick, progress=not quiet, log=lambda m: click.echo(m, err=True))
    if problems or fmt != "table":
        click.echo(render(problems, fmt))
    else:
        click.echo("everything the database records as complete is present and intact")
    if problems:
        sys.exit(1)


@click.group()
def dataset() -> None:
    """Token datasets shared by every model: add, list, show."""


@dataset.command("add")
@click.argument("name")
@click.argument("sources", nargs=-1, required=True)
@click.option("--tokenizer", required=True, help="Tokenizer hub id or local folder (usually the model's).")
@click.option("--seq-len", type=click.IntRange(2, 2**20), default=512, show_default=True)
@click.option("--tokens", "n_tokens", type=COUNT, help="Target token count (whole sequences).")
@click.option("--seed", type=SEED, default=0, show_default=True, help="Seed of the document shuffle.")
@click.option("--field", default="text", show_default=True, help="Text field of JSONL records / hub datasets.")
@click.option(
    "--exclude-tokens",
    help="Tokens that never count, besides BOS/EOS/padding: comma-separated ids, vocabulary tokens or text like "
    "\\n; `gurnee` = the newline token, as in Gurnee et al. 2024.",
)
@pass_app
def dataset_add(
    app: AppContext,
    name: str,
    sources: tuple[str, ...],
    tokenizer: str,
    seq_len: int,
    n_tokens: int | None,
    seed: int,
    field: str,
    exclude_tokens: str | None,
) -> None:
    """Tokenize SOURCES (files, folders, JSONL, or a Hugging Face dataset name) into dataset NAME."""
    from actdb.store.ingest.dataset_registry import add_dataset

    row = add_dataset(
        app.store(),
        name=name,
        sources=list(sources),
        tokenizer=tokenizer,
        seq_len=seq_len,
        n_tokens=n_tokens,
        seed=seed,
        field=field,
        exclude_tokens=exclude_tokens,
        log=lambda m: click.echo(f"actdb: {m}", err=True),
    )
    click.echo(
        f"dataset {row.name}: {row.n_sequences} sequences x {row.seq_len} = {row.n_tokens} tokens "
        f"({row.n_counted} counted), sha256 {row.token_sha256[:12]}"
    )


@dataset.command("list")
@format_option
@pass_app
def dataset_list(app: AppContext, fmt: str) -> None:
    """All token datasets."""
    from actdb.query.listings import dataset_rows

    click.echo(render(dataset_rows(app.store()), fmt))


@dataset.command("show")
@click.argument("name")
@format_option
@pass_app
def dataset_show(app: AppContext, name: str, fmt: str) -> None:
    """Everything recorded about one dataset."""
    from actdb.query.listings import dataset_rows
    from actdb.query.output import cell
    from actdb.store.database.connection import Rows

    row = dataset_rows(app.store(), name=name, full=True)[0]
    if fmt == "table":  # one field a line, values left-aligned: one long value must not pad every other line
        width = max(len(k) for k in row)
        click.echo("\n".join(f"{k.ljust(width)}  {cell(v)}".rstrip() for k, v in row.items()))
        return
    click.echo(render(Rows(["field", "value"], [{"field": k, "value": v} for k, v in row.items()]), fmt))


COMMANDS = (
    init,
    status,
    check,
    dataset,
)
