"""Similarity of whole sets: `similarity` (neuron-level, layer geometry and, with --function, predictions)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import click

from actdb.query.options import (
    COUNT,
    INDEX,
    SEED,
    SIZE,
    STEPS,
    AppContext,
    cluster_option,
    control_option,
    dataset_option,
    device_option,
    force_option,
    format_option,
    hook_option,
    pass_app,
    quiet_option,
)
from actdb.query.output import render

if TYPE_CHECKING:
    from actdb.compute.cluster import ClusterSpec


@click.command()
@dataset_option("Token dataset the sets were ingested on.")
@click.option("--models", help="Comma-separated models (with --steps: every model at every step).")
@click.option("--steps", "step_list", type=STEPS, help="Comma-separated steps of every model in --models.")
@click.option("--sets", "set_specs", help="Explicit sets, comma-separated MODEL@STEP.")
@click.option("--run", "run_id", type=INDEX, help="List this similarity run (default: the newest).")
@control_option("`token` removes each neuron's per-token-id mean first.")
@click.option("--seed", type=SEED, default=0, show_default=True, help="Seed of the rotation baseline.")
@click.option("--baseline-draws", type=click.IntRange(1, 1000), default=8, show_default=True)
@click.option("--by-layer", is_flag=True, help="Every layer pair instead of per-pair means over same-index layers.")
@click.option(
    "--function",
    "by_function",
    is_flag=True,
    help="Compare what the checkpoints predict (top-1 agreement, loss correlation) instead of their neurons.",
)
@click.option(
    "--exact",
    "exact_tokens",
    type=COUNT,
    metavar="TOKENS",
    help="With --function: also the Jensen-Shannon divergence of the full next-token distributions on the first "
    "TOKENS tokens, rounded up to whole sequences (runs two models side by side).",
)
@hook_option
@device_option
@click.option("--memory-budget", type=SIZE, help="Accumulator memory, e.g. 8GB (default: 60% of free memory).")
@cluster_option
@force_option("Recompute even if an identical complete run exists.")
@quiet_option
@format_option
@pass_app
def similarity(
    app: AppContext,
    dataset_name: str | None,
    models: str | None,
    step_list: list[int] | None,
    set_specs: str | None,
    run_id: int | None,
    control: str,
    seed: int,
    baseline_draws: int,
    by_layer: bool,
    by_function: bool,
    exact_tokens: int | None,
    hook: str,
    device: str,
    memory_budget: int | None,
    cluster: ClusterSpec,
    force: bool,
    quiet: bool,
    fmt: str,
) -> None:
    """How alike whole sets are (seeds x steps), in one pass: per layer pair mean max-corr against its rotation
    baseline, one-to-one matched correlation and linear CKA. Without sets: list the newest similarity run."""
    from actdb.query.queries import similarity_listing
    from actdb.store.refs import SetRef, parse_list, parse_set_refs

    store = app.store()
    if exact_tokens is not None and not by_function:
        raise click.UsageError("--exact goes with --function")
    if models is not None or set_specs is not None:
        from actdb.compute.correlation.run import CorrelationRequest
        from actdb.compute.correlation.run import correlate as run_correlate

        if (models is None) == (set_specs is None) or (models is not None and step_list is None):
            raise click.UsageError("give --models with --steps, or --sets")
        refs = (
            [SetRef(m, st) for m in parse_list(models, "models") for st in step_list]
            if models is not None
            else parse_set_refs(set_specs)
        )
        if by_function:
            from actdb.compute.similarity.function import FunctionRequest, function_similarity

            request = FunctionRequest(sets=refs, dataset=dataset_name, exact_tokens=exact_tokens, device=device)
            click.echo(render(function_similarity(store, request, log=lambda m: click.echo(m, err=True)), fmt))
            return
        request = CorrelationRequest(
            sets=refs,
            dataset=dataset_name,
            control=control,
            seed=seed,
            baseline_draws=baseline_draws,
            memory_budget=memory_budget,
            hook=hook,
            similarity=True,
            device=device,
            cluster=cluster,
            force=force,
            progress=not quiet,
        )
        run_id = run_correlate(store, request, log=lambda m: click.echo(m, err=True)).run_id
    elif by_function:
        raise click.UsageError("--function needs the checkpoints: --models with --steps, or --sets")
    click.echo(render(similarity_listing(store, run=run_id, control=control, by_layer=by_layer), fmt))


COMMANDS = (similarity,)
