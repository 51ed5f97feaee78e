"""The study as a whole: the static `report` and the end-to-end `demo`."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import click

from actdb.query.options import (
    STEPS,
    AppContext,
    pass_app,
    quiet_option,
    threshold_option,
)

if TYPE_CHECKING:
    pass


@click.command()
@click.option("--out", "out_dir", default="actdb-report", show_default=True, type=click.Path(file_okay=False))
@threshold_option()
@pass_app
def report(app: AppContext, out_dir: str, threshold: float | None) -> None:
    """A static HTML page with PNG plots of everything in the store."""
    from actdb.query.report import build_report

    path = build_report(app.store(), Path(out_dir), threshold=threshold)
    click.echo(f"report written to {path}")


@click.command()
@click.option("--seeds", type=click.IntRange(2, 64), default=4, show_default=True, help="Independently seeded models.")
@click.option(
    "--steps",
    type=STEPS,
    default="0,50,200,800",
    show_default=True,
    help="Checkpoints to analyse (the last one is the training length).",
)
@click.option(
    "--tokens",
    "n_tokens",
    type=click.IntRange(min=256, max=10_000_000),
    default=24576,
    show_default=True,
    help="Tokens in the analysis dataset.",
)
@click.option(
    "--controls", type=click.IntRange(0, 1000), default=19, show_default=True, help="Random sets in the ablation."
)
@threshold_option(
    "Excess correlation for universal, not the paper's 0.5: tiny models' rotation baseline is ~0.4 (see README).",
    default=0.2,  # DemoRequest's (a test holds them equal); imported here, the demo would slow every command's start
)
@click.option("--zoo", type=click.Path(file_okay=False), help="Folder of the model zoo (default: <home>/zoo).")
@quiet_option
@pass_app
def demo(
    app: AppContext,
    seeds: int,
    steps: list[int],
    n_tokens: int,
    controls: int,
    threshold: float,
    zoo: str | None,
    quiet: bool,
) -> None:
    """The whole study on a local zoo of tiny GPT-2 seeds: train, ingest, correlate, persist, ablate, report."""
    from actdb.query.demo import DemoRequest, run_demo
    from actdb.store.database.connection import Store

    if len(steps) < 2:
        raise click.BadParameter("--steps needs at least two steps")
    request = DemoRequest(
        seeds=seeds,
        checkpoints=tuple(steps),
        tokens=n_tokens,
        controls=controls,
        threshold=threshold,
        zoo=Path(zoo) if zoo else None,
        progress=not quiet,
    )
    run_demo(Store.init(app.config), request, echo=click.echo)


COMMANDS = (
    report,
    demo,
)
