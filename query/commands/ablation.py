"""Ablation against matched random controls: `ablate` and the `ablations` listing."""

from __future__ import annotations

from typing import TYPE_CHECKING

import click

from actdb.query.options import (
    COUNT,
    INDEX,
    SEED,
    AppContext,
    control_option,
    dataset_option,
    device_option,
    force_option,
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
@click.argument("target", metavar="MODEL@STEP")
@click.option(
    "--neurons",
    "selector",
    required=True,
    help="universal, universal:LAYER, a list like 3.1234,11.3030, or @FILE with such a list.",
)
@click.option("--method", type=click.Choice(["zero", "mean"]), default="zero", show_default=True)
@dataset_option("Dataset of the activation set whose labels and means are used (default: the set's only one).")
@read_hook_option
@click.option(
    "--eval-dataset",
    help="Measure the loss on this dataset (default: --dataset). Universal neurons were selected on every "
    "sequence of their correlation run's dataset, so only sequences not identical to one of those count as "
    "held out.",
)
@click.option("--eval-sequences", metavar="START:END", help="Sequences of the evaluation dataset (default: all).")
@click.option(
    "--in-sample",
    is_flag=True,
    help="Measure on the sequences that selected the neurons (selection-biased; the behaviour before held-out "
    "evaluation became the default).",
)
@click.option(
    "--ablate-positions",
    "positions",
    type=click.Choice(["counted", "all"]),
    default="counted",
    show_default=True,
    help="Replace activations only at counted positions, or at every position (BOS/EOS, padding, excluded tokens).",
)
@click.option(
    "--tokens",
    "n_tokens",
    type=COUNT,
    help="Evaluate only the first N tokens of the evaluated sequences (rounded up to whole sequences).",
)
@click.option(
    "--controls",
    type=click.IntRange(0, 100000),
    default=19,
    show_default=True,
    help="Random sets matched per layer (19 is the fewest that can reach p < 0.05).",
)
@click.option("--each", is_flag=True, help="Also ablate each selected neuron on its own (batched).")
@click.option("--seed", type=SEED, default=0, show_default=True, help="Seed of the control draws.")
@click.option("--run", "run_id", type=INDEX, help="Correlation run whose scores choose `universal` neurons.")
@control_option("Which correlation control's scores `universal` means.")
@threshold_option()
@click.option("--batch-size", type=click.IntRange(min=1), default=8, show_default=True)
@click.option(
    "--variants-per-pass",
    type=click.IntRange(min=1),
    help="Single-neuron variants stacked per forward call with --each (default: 16 on GPU, 1 on CPU).",
)
@device_option
@force_option("Measure again even if an identical ablation is complete.")
@quiet_option
@pass_app
def ablate(
    app: AppContext,
    target: str,
    selector: str,
    method: str,
    dataset_name: str | None,
    hook: str | None,
    eval_dataset: str | None,
    eval_sequences: str | None,
    in_sample: bool,
    positions: str,
    n_tokens: int | None,
    controls: int,
    each: bool,
    seed: int,
    run_id: int | None,
    control: str,
    threshold: float | None,
    batch_size: int,
    variants_per_pass: int | None,
    device: str,
    force: bool,
    quiet: bool,
) -> None:
    """Does the model need these neurons? Cross-entropy with them replaced, against matched random controls."""
    from actdb.compute.ablation.run import AblationRequest, run_ablation

    request = AblationRequest(
        target=target,
        selector=selector,
        method=method,
        dataset=dataset_name,
        hook=hook,
        eval_dataset=eval_dataset,
        eval_sequences=eval_sequences,
        in_sample=in_sample,
        positions=positions,
        tokens=n_tokens,
        controls=controls,
        seed=seed,
        each=each,
        control=control,
        threshold=threshold,
        run_id=run_id,
        batch_size=batch_size,
        device=device,
        variants_per_pass=variants_per_pass,
        force=force,
        progress=not quiet,
    )
    run_ablation(app.store(), request, log=click.echo)


@click.command()
@click.option("--model", help="Only this model.")
@format_option
@pass_app
def ablations(app: AppContext, model: str | None, fmt: str) -> None:
    """Ablation results: clean and ablated loss, delta, and the matched random controls."""
    from actdb.query.queries import ablations_listing

    click.echo(render(ablations_listing(app.store(), model), fmt))


COMMANDS = (
    ablate,
    ablations,
)
