"""Persistence of universal neurons across one model's checkpoints: `persistence`."""

from __future__ import annotations

from typing import TYPE_CHECKING

import click

from actdb.query.options import (
    STEPS,
    AppContext,
    control_option,
    dataset_option,
    device_option,
    format_option,
    pass_app,
    quiet_option,
    read_hook_option,
    threshold_option,
)
from actdb.query.output import render

if TYPE_CHECKING:
    pass


@click.command()
@click.option("--model", "model_name", help="Compute persistence of this model (omit to list stored results).")
@dataset_option("Dataset of the analysed sets (default: the only one).")
@click.option("--steps", type=STEPS, help="Analysed steps, comma-separated (default: every ingested step).")
@read_hook_option
@control_option()
@threshold_option()
@device_option
@quiet_option
@format_option
@pass_app
def persistence(
    app: AppContext,
    model_name: str | None,
    dataset_name: str | None,
    steps: list[int] | None,
    hook: str | None,
    control: str,
    threshold: float | None,
    device: str,
    quiet: bool,
    fmt: str,
) -> None:
    """Do universal neurons last? Per layer overlap between consecutive steps, self-correlation, emergence."""
    from actdb.query.queries import persistence_listing
    from actdb.store.database.registry import only_dataset, resolve_hook

    store = app.store()
    if model_name is not None:
        from actdb.compute.persistence.run import PersistenceRequest, compute_persistence

        dataset_name = dataset_name or only_dataset(store, model_name)
        hook = resolve_hook(store, hook, model_name, dataset_name=dataset_name) or "mlp.post"
        request = PersistenceRequest(
            model=model_name,
            dataset=dataset_name,
            hook=hook,
            steps=steps,
            control=control,
            threshold=threshold,
            device=device,
            progress=not quiet,
        )
        outcome = compute_persistence(store, request, log=lambda m: click.echo(m, err=True))
        threshold = outcome.threshold
    listing = persistence_listing(store, model_name, control if model_name else None, threshold, hook)
    click.echo(render(listing, fmt))


COMMANDS = (persistence,)
