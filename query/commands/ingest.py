"""Commands that run checkpoints over a token dataset: `ingest` (activations, statistics, explanations) and
`predictions`."""

from __future__ import annotations

from typing import TYPE_CHECKING

import click

from actdb.query.options import (
    STEP,
    STEPS,
    AppContext,
    cluster_option,
    dataset_option,
    device_option,
    force_option,
    pass_app,
    quiet_option,
    recorded_hook_option,
    stored_dtype_option,
)

if TYPE_CHECKING:
    from actdb.compute.cluster import ClusterSpec


def _steps(step: int | None, steps: list[int] | None) -> list[int]:
    if (step is None) == (steps is None):
        raise click.UsageError("give exactly one of --step N or --steps N,M,...")
    return [step] if step is not None else steps


@click.command()
@click.argument("model")
@click.option("--step", type=STEP, help="Training step to ingest.")
@click.option("--steps", type=STEPS, help="Several steps, comma-separated.")
@dataset_option("Token dataset to run the model on.", required=True)
@click.option("--source", help="Hub id or local folder; `{step}` is replaced by the step. Registers MODEL.")
@click.option("--revision", help="Revision template, e.g. checkpoint-{step} (default per family).")
@click.option(
    "--revisions",
    help="Explicit revisions, comma-separated, one per --steps entry (e.g. step1000-tokens4B,step2000-tokens8B).",
)
@recorded_hook_option
@device_option
@click.option(
    "--torch-dtype",
    type=click.Choice(["float32", "bfloat16", "float16"]),
    default="float32",
    show_default=True,
    help="Precision of the forward pass (what is stored is --dtype's either way).",
)
@click.option(
    "--trust-remote-code",
    is_flag=True,
    help="Let transformers run the model repository's own code (needed by some hub models; off by default).",
)
@click.option("--batch-size", type=click.IntRange(min=1), default=8, show_default=True, help="Sequences per pass.")
@click.option(
    "--predictions",
    "with_predictions",
    is_flag=True,
    help="Also record each step's top-1 predictions and losses (a second pass, for `similarity --function`).",
)
@stored_dtype_option(
    "Stored values: float16, or int8 (1 byte a value: affine codes with a float32 scale and offset per "
    "1024-token block and neuron; reads return float32 within half a step of float16)."
)
@click.option(
    "--top-k",
    type=click.IntRange(0, 1000),
    default=32,
    show_default=True,
    help="Max-activating examples kept per neuron while streaming; with them the set is explained (token and "
    "position variance fractions, vocabulary statistics). 0 skips both.",
)
@cluster_option
@force_option("Recompute a set that is complete.")
@click.option(
    "--replace-source",
    is_flag=True,
    help="Record this --source for these steps though MODEL was registered from another one (or the step was "
    "ingested from other weights).",
)
@click.option(
    "--identical-weights",
    is_flag=True,
    help="Accept weights identical to another step's or another model's (a source whose steps really do not differ, "
    "or a deliberate copy).",
)
@quiet_option
@pass_app
def ingest(
    app: AppContext,
    model: str,
    step: int | None,
    steps: list[int] | None,
    dataset_name: str,
    source: str | None,
    revision: str | None,
    revisions: str | None,
    hook: str,
    device: str,
    torch_dtype: str,
    trust_remote_code: bool,
    batch_size: int,
    with_predictions: bool,
    dtype: str,
    top_k: int,
    cluster: ClusterSpec,
    force: bool,
    replace_source: bool,
    identical_weights: bool,
    quiet: bool,
) -> None:
    """Record MODEL's MLP activations at each step on a dataset, with per-neuron statistics and explanations.
    With --workers or --scheduler, each step is one task on a Dask cluster."""
    from actdb.compute.step_ingest import ingest_on_cluster, ingest_step
    from actdb.store.ingest.pipeline import IngestRequest, check_steps_distinguishable

    step_list = _steps(step, steps)
    per_step = _paired_revisions(step_list, revision, revisions)
    store = app.store()
    if revisions is None:
        check_steps_distinguishable(store, model, source, revision, len(step_list), identical_weights)
    requests = [
        IngestRequest(
            model=model,
            step=s,
            dataset=dataset_name,
            source=source,
            revision=rev,
            hook=hook,
            device=device,
            torch_dtype=torch_dtype,
            trust_remote_code=trust_remote_code,
            batch_size=batch_size,
            dtype=dtype,
            top_k=top_k,
            force=force,
            replace_source=replace_source,
            identical_weights=identical_weights,
            progress=not quiet,
        )
        for s, rev in zip(step_list, per_step, strict=True)
    ]
    if cluster.enabled:
        ingest_on_cluster(
            store.config, requests, cluster, predictions=with_predictions, progress=not quiet, log=click.echo
        )
        return
    for request in requests:
        ingest_step(store, request, with_predictions, log=click.echo)


def _paired_revisions(steps: list[int], revision: str | None, revisions: str | None) -> list[str | None]:
    """One revision per step: `--revisions` pairs explicit names with `--steps`; `--revision` is a template."""
    if revisions is None:
        return [revision] * len(steps)
    if revision is not None:
        raise click.UsageError("give --revision (a template) or --revisions (a list), not both")
    names = [r.strip() for r in revisions.split(",")]
    if len(names) != len(steps) or not all(names):
        raise click.UsageError(f"--revisions names {len(names)} revisions for {len(steps)} steps; give one per step")
    return names


@click.command()
@click.argument("targets", metavar="MODEL@STEP...", nargs=-1, required=True)
@dataset_option("Dataset to predict on (default: the set's only one).")
@click.option("--batch-size", type=click.IntRange(min=1), default=8, show_default=True)
@device_option
@force_option("Predict again even if complete.")
@quiet_option
@pass_app
def predictions(
    app: AppContext,
    targets: tuple[str, ...],
    dataset_name: str | None,
    batch_size: int,
    device: str,
    force: bool,
    quiet: bool,
) -> None:
    """Record each checkpoint's top-1 next token and loss at every position (for `similarity --function`)."""
    from actdb.compute.similarity.predictions import PredictionRequest, compute_predictions

    for target in targets:
        request = PredictionRequest(
            target=target,
            dataset=dataset_name,
            batch_size=batch_size,
            device=device,
            force=force,
            progress=not quiet,
        )
        compute_predictions(app.store(), request, log=click.echo)


COMMANDS = (
    ingest,
    predictions,
)
