"""`trajectories`: every (seed, step) checkpoint against every other, in function space and weight space."""

from __future__ import annotations

from typing import TYPE_CHECKING

import click

from actdb.query.options import (
    INDEX,
    SEED,
    SET_REF,
    STEPS,
    AppContext,
    dataset_option,
    device_option,
    force_option,
    format_option,
    pass_app,
)
from actdb.query.output import render

if TYPE_CHECKING:
    from actdb.store.refs import SetRef


@click.command()
@dataset_option("Token dataset the predictions were made on.")
@click.option("--models", help="Comma-separated models (with --steps: every model at every step).")
@click.option("--steps", "step_list", type=STEPS, help="Comma-separated steps of every model in --models.")
@click.option("--sets", "set_specs", help="Explicit checkpoints, comma-separated MODEL@STEP.")
@click.option("--run", "run_id", type=INDEX, help="Show this trajectory run (default: the newest).")
@click.option(
    "--eps",
    type=click.FloatRange(0.0),
    default=0.0,
    show_default=True,
    help="Loss margin (nats) within which a target is a tie for the win rate.",
)
@click.option(
    "--distance",
    type=click.Choice(["disagreement", "jsd", "cka"]),
    default="disagreement",
    show_default=True,
    help="Distance of the trajectory map: 1 − top-1 agreement, mean Jensen-Shannon divergence (runs the models "
    "pairwise on --exact tokens), or 1 − linear CKA from a stored `similarity` run.",
)
@click.option(
    "--map",
    "embedding",
    type=click.Choice(["mds", "tsne"]),
    default="mds",
    show_default=True,
    help="Metric MDS (deterministic; stress-1 printed) or exact t-SNE seeded by --seed.",
)
@click.option("--seed", type=SEED, default=0, show_default=True, help="Seed of the t-SNE map.")
@click.option("--exact", "exact_tokens", type=click.IntRange(1), metavar="TOKENS", help="Tokens for --distance jsd.")
@click.option("--reference", type=SET_REF, help="Reference of the disagreement plane (default: most accurate).")
@click.option("--no-weights", "no_weights", is_flag=True, help="Skip the weight-space cosines.")
@device_option
@force_option("Recompute even if an identical complete run exists.")
@format_option
@pass_app
def trajectories(
    app: AppContext,
    dataset_name: str | None,
    models: str | None,
    step_list: list[int] | None,
    set_specs: str | None,
    run_id: int | None,
    eps: float,
    distance: str,
    embedding: str,
    seed: int,
    exact_tokens: int | None,
    reference: SetRef | None,
    no_weights: bool,
    device: str,
    force: bool,
    fmt: str,
) -> None:
    """Every checkpoint against every other from stored predictions (`actdb predictions`) and weights: win rate
    W (W + Wᵀ = 1) with Bradley-Terry strengths, top-1 disagreement, ensemble gain of two-model mixtures, weight
    cosines, and a 2-D map. Prints the tables (all values in long form with --format json/csv); `actdb report`
    draws the figures. Without checkpoints: show the newest run."""
    from actdb.query import trajectory_tables as tt
    from actdb.store.refs import SetRef, parse_list, parse_set_refs

    store = app.store()
    if models is not None or set_specs is not None:
        from actdb.compute.trajectories.run import TrajectoryRequest, compute_trajectories

        if (models is None) == (set_specs is None) or (models is not None and step_list is None):
            raise click.UsageError("give --models with --steps, or --sets")
        if exact_tokens is not None and distance != "jsd":
            raise click.UsageError("--exact goes with --distance jsd")
        refs = (
            [SetRef(m, st) for m in parse_list(models, "models") for st in step_list]
            if models is not None
            else parse_set_refs(set_specs)
        )
        request = TrajectoryRequest(
            sets=refs,
            dataset=dataset_name,
            eps=eps,
            distance=distance,
            embedding=embedding,
            seed=seed,
            weights=not no_weights,
            exact_tokens=exact_tokens,
            reference=reference,
            device=device,
            force=force,
        )
        run_id = compute_trajectories(store, request, log=lambda m: click.echo(m, err=True))
    rows = tt.long_rows(store, run_id)
    if fmt != "table":
        click.echo(render(rows, fmt))
        return
    summary = tt.run_summary(store, run_id)
    click.echo(f"== Win rate W[row, column] (eps {summary['eps']:g}; 0.5 = as good as each other) ==")
    click.echo(render(tt.wide_table(rows, "win_rate")))
    click.echo(
        f"non-transitive triples: {summary['n_nontransitive']} of {summary['n_triples']}; every pair compared on "
        f"at least {summary['n_targets']:,} targets"
    )
    click.echo("\n== Checkpoints (Bradley-Terry strength: log-odds scale, mean 0) ==")
    click.echo(render(tt.point_rows(store, run_id)))
    click.echo(f"\n== Top-1 disagreement (reference for Fort's plane: {summary['reference']}) ==")
    click.echo(render(tt.wide_table(rows, "disagreement")))
    click.echo("\n== Ensemble gain (nats): snapshots of one run vs independently trained runs ==")
    click.echo(render(tt.kind_comparison(rows)))
    if summary["weights"]:
        click.echo("\n== Weight cosine of flattened parameters ==")
        click.echo(render(tt.wide_table(rows, "weight_cosine")))
        click.echo("(cos(θi − θ0, θj − θ0) is within a seed only: across seeds it is ≈ 0 by construction)")
    stress = "" if summary["map_stress"] is None else f", stress-1 {summary['map_stress']:.3f}"
    click.echo(f"\nmap: {summary['embedding']} of {summary['distance']}{stress}; figures: `actdb report`")


COMMANDS = (trajectories,)
