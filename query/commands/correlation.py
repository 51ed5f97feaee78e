"""Cross-model correlation and universality: `correlate`, `universal`, `runs`."""

from __future__ import annotations

from typing import TYPE_CHECKING

import click

from actdb.query.options import (
    INDEX,
    SEED,
    SIZE,
    STEP,
    AppContext,
    cluster_option,
    control_option,
    dataset_option,
    device_option,
    force_option,
    format_option,
    hook_option,
    pass_app,
    precision_option,
    quiet_option,
    read_hook_option,
    threshold_option,
)
from actdb.query.output import render

if TYPE_CHECKING:
    from actdb.compute.cluster import ClusterSpec


@click.command()
@dataset_option("Token dataset the sets were ingested on.")
@click.option("--step", type=STEP, help="Step of every model in --models.")
@click.option("--models", help="Comma-separated models, all at --step.")
@click.option("--sets", "set_specs", help="Explicit sets, comma-separated MODEL@STEP (e.g. a@100,a@400).")
@control_option("`token` removes each neuron's per-token-id mean first (current-token detectors drop out).")
@threshold_option("Default threshold recorded on the run for displaying labels (0.5); not part of the request.")
@click.option("--seed", type=SEED, default=0, show_default=True, help="Seed of the rotation baseline.")
@click.option(
    "--baseline-draws",
    type=click.IntRange(1, 1000),
    default=8,
    show_default=True,
    help="Random rotations per model; each neuron gets the baseline's mean, sd, a z-score and its stability.",
)
@click.option(
    "--top-k",
    "topk",
    type=click.IntRange(min=0, max=1000),
    default=0,
    show_default=True,
    help="Keep K best matches per neuron.",
)
@click.option("--topk", "old_topk", type=click.IntRange(min=0, max=1000), hidden=True, help="Old spelling of --top-k.")
@click.option(
    "--adaptive-draws",
    "max_draws",
    type=click.IntRange(2, 1000),
    help="After --baseline-draws, draw more rotations (8 per round) only for the neurons whose label at the run's "
    "--threshold is still undecided at --confidence, up to this many draws; each neuron records how many it rests "
    "on (n_draws). One local pass only.",
)
@click.option(
    "--confidence",
    type=click.FloatRange(0.5, 1.0, min_open=True, max_open=True),
    default=0.95,
    show_default=True,
    help="Confidence at which --adaptive-draws calls a label decided (one-sided normal margin, pooled sd).",
)
@device_option
@precision_option
@hook_option
@click.option("--chunk-tokens", type=click.IntRange(min=1), default=8192, show_default=True)
@click.option(
    "--memory-budget",
    type=SIZE,
    help="Accumulator memory, e.g. 8GB (default: 60% of free memory; on a cluster, a share of a worker's).",
)
@cluster_option
@force_option("Recompute even if an identical complete run exists.")
@quiet_option
@pass_app
def correlate(
    app: AppContext,
    dataset_name: str | None,
    step: int | None,
    models: str | None,
    set_specs: str | None,
    control: str,
    threshold: float | None,
    seed: int,
    baseline_draws: int,
    max_draws: int | None,
    confidence: float,
    topk: int,
    old_topk: int | None,
    device: str,
    precision: str,
    hook: str,
    chunk_tokens: int,
    memory_budget: int | None,
    cluster: ClusterSpec,
    force: bool,
    quiet: bool,
) -> None:
    """Correlate every neuron of each set with all neurons of the others; score universality."""
    from actdb.compute.correlation.run import CorrelationRequest
    from actdb.compute.correlation.run import correlate as run_correlate
    from actdb.store.refs import SetRef, parse_list, parse_set_refs

    if (models is None) == (set_specs is None):
        raise click.UsageError("give either --models (with --step) or --sets")
    if models is not None:
        if step is None:
            raise click.UsageError("--models needs --step")
        refs = [SetRef(m, step) for m in parse_list(models, "models")]
    else:
        refs = parse_set_refs(set_specs)
    request = CorrelationRequest(
        sets=refs,
        dataset=dataset_name,
        control=control,
        threshold=threshold,
        seed=seed,
        baseline_draws=baseline_draws,
        max_draws=max_draws,
        confidence=confidence,
        topk=topk if old_topk is None else old_topk,
        chunk_tokens=chunk_tokens,
        memory_budget=memory_budget,
        hook=hook,
        device=device,
        precision=precision,
        cluster=cluster,
        force=force,
        progress=not quiet,
    )
    run_correlate(app.store(), request, log=click.echo)


@click.command()
@click.option("--model", help="Only this model.")
@click.option("--step", type=STEP, help="Only this step.")
@click.option("--layer", type=INDEX, help="Only this layer.")
@click.option(
    "--run",
    "run_id",
    type=INDEX,
    help="Read this correlation run (default: each set's widest run, newest among equals).",
)
@threshold_option()
@control_option("Which correlation control's runs to read.")
@click.option(
    "--sort", type=click.Choice(["excess", "layer", "max_corr", "kurtosis"]), default="excess", show_default=True
)
@click.option("--limit", type=click.IntRange(min=1), help="At most this many rows.")
@click.option(
    "--min-stability",
    type=click.FloatRange(0, 1),
    help="Only neurons universal in at least this share of baseline draws (at the same threshold).",
)
@click.option("--by-layer", is_flag=True, help="Per layer counts and percentages instead of neurons.")
@read_hook_option
@format_option
@pass_app
def universal(
    app: AppContext,
    model: str | None,
    step: int | None,
    layer: int | None,
    run_id: int | None,
    threshold: float | None,
    control: str,
    sort: str,
    limit: int | None,
    min_stability: float | None,
    by_layer: bool,
    hook: str | None,
    fmt: str,
) -> None:
    """Universal neurons: excess correlation, stability over baseline draws, z, max-corr, baseline, statistics."""
    from actdb.query.queries import universal_by_layer, universal_neurons

    scope = {
        "model": model,
        "step": step,
        "layer": layer,
        "run": run_id,
        "threshold": threshold,
        "control": control,
        "hook": hook,
    }
    if by_layer and (min_stability is not None or limit is not None):
        raise click.UsageError("--by-layer counts every neuron; --min-stability and --limit apply to neuron listings")
    if by_layer:
        rows = universal_by_layer(app.store(), **scope)
    else:
        rows = universal_neurons(app.store(), **scope, sort=sort, limit=limit, min_stability=min_stability)
    click.echo(render(rows, fmt))


@click.command()
@format_option
@pass_app
def runs(app: AppContext, fmt: str) -> None:
    """Correlation runs with members, parameters, backend, status and timings."""
    from actdb.query.queries import runs_listing

    click.echo(render(runs_listing(app.store()), fmt))


COMMANDS = (
    correlate,
    universal,
    runs,
)
