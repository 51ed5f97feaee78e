"""`robustness run` / `robustness show`: do independently trained seeds respond alike to one intervention?"""

from __future__ import annotations

import click

from actdb.compute.robustness import INTERVENTIONS
from actdb.query.options import (
    INDEX,
    SEED,
    STEPS,
    AppContext,
    dataset_option,
    device_option,
    force_option,
    format_option,
    pass_app,
    quiet_option,
    threshold_option,
)
from actdb.query.output import render


@click.group()
def robustness() -> None:
    """Interventional robustness across seeds and training steps (Avery et al.): IR, IR_norm against controls."""


@robustness.command()
@click.option("--models", required=True, help="Comma-separated seeds of one recipe (at least two).")
@click.option("--steps", "step_list", type=STEPS, help="Steps (default: every step all seeds have ingested).")
@dataset_option("Dataset of the seeds' activation sets (labels, means, activation frequencies).")
@click.option("--eval-dataset", help="Take the contexts from this dataset (default: --dataset).")
@click.option(
    "--ablate",
    metavar="RULE",
    help="Ablate each seed's own set: universal, family:NAME, experts:CONCEPT, twins:MODEL, or L.N,... (same "
    "indices everywhere).",
)
@click.option("--generate", type=click.Choice(["replace", "swap"]), help="Generated input edits of every context.")
@click.option("--edits", type=click.Path(dir_okay=False), help='JSONL of {"context": ..., "edited": ...} pairs.')
@click.option("--method", type=click.Choice(["mean", "zero"]), default="mean", show_default=True)
@click.option("--contexts", type=click.IntRange(1), default=32, show_default=True, help="Contexts (sequences).")
@click.option(
    "--controls",
    type=click.IntRange(0, 10000),
    default=19,
    show_default=True,
    help="Random interventions per intervention (19 is the fewest that can reach p < 0.05).",
)
@click.option(
    "--top-k", "topk", type=click.IntRange(1), help="JSD over the seeds' top-K tokens plus 'other' (a lower bound)."
)
@click.option("--seed", type=SEED, default=0, show_default=True, help="Seed of controls, edits and bootstrap.")
@threshold_option()
@click.option("--batch-size", type=click.IntRange(min=1), default=8, show_default=True)
@device_option
@force_option("Measure again even if an identical run is complete.")
@quiet_option
@pass_app
def run(
    app: AppContext,
    models: str,
    step_list: list[int] | None,
    dataset_name: str | None,
    eval_dataset: str | None,
    ablate: str | None,
    generate: str | None,
    edits: str | None,
    method: str,
    contexts: int,
    controls: int,
    topk: int | None,
    seed: int,
    threshold: float | None,
    batch_size: int,
    device: str,
    force: bool,
    quiet: bool,
) -> None:
    """Apply one intervention to every seed at each step; store IR, IR_norm, controls and per-seed responses."""
    from actdb.compute.robustness.run import RobustnessRequest, run_robustness
    from actdb.store.refs import parse_list

    request = RobustnessRequest(
        models=parse_list(models, "models"),
        steps=step_list,
        dataset=dataset_name,
        eval_dataset=eval_dataset,
        ablate=ablate,
        generate=generate,
        edits=edits,
        method=method,
        contexts=contexts,
        controls=controls,
        seed=seed,
        topk=topk,
        threshold=threshold,
        batch_size=batch_size,
        device=device,
        force=force,
        progress=not quiet,
    )
    run_robustness(app.store(), request, log=click.echo)


@robustness.command()
@click.option("--run", "run_id", type=INDEX, help="Only this run (default: every complete run).")
@click.option("--intervention", type=click.Choice(INTERVENTIONS), help="Only this kind.")
@click.option("--controls", "show_controls", is_flag=True, help="List each control's IR_norm instead.")
@click.option("--wide", is_flag=True, help="Every column of v_robustness_by_step.")
@format_option
@pass_app
def show(
    app: AppContext, run_id: int | None, intervention: str | None, show_controls: bool, wide: bool, fmt: str
) -> None:
    """Per step: IR, IR_norm with its 95 % CI over contexts, control mean, excess and p (with its floor)."""
    from actdb.query.robustness_tables import robustness_by_step, robustness_controls

    store = app.store()
    if show_controls:
        rows = robustness_controls(store, run_id)
    else:
        rows = robustness_by_step(store, run_id, intervention, wide)
    click.echo(render(rows, fmt))


COMMANDS = (robustness,)
