"""Concept-expert neurons: `concept add|run|show|experts`."""

from __future__ import annotations

import click

from actdb.compute.concepts import MANTEL_PERMUTATIONS
from actdb.query.options import (
    SEED,
    AppContext,
    dataset_option,
    device_option,
    force_option,
    format_option,
    hook_option,
    pass_app,
    quiet_option,
)
from actdb.query.output import render


@click.group()
def concept() -> None:
    """Which neurons encode a concept, across seeds and steps, and does their geometry match a reference?"""


@concept.command("add")
@click.argument("name")
@click.argument("file", type=click.Path(dir_okay=False))
@pass_app
def add(app: AppContext, name: str, file: str) -> None:
    """Store a concepts file (JSONL: concept, parents, positive, negative) under NAME."""
    from actdb.compute.concepts.run import add_concept_set

    set_id, concepts, created = add_concept_set(app.store(), name, file)
    state = "stored" if created else "already stored (same content)"
    click.echo(f"concept set {name} ({set_id}): {len(concepts.concepts)} concepts, {state}")


@concept.command("run")
@click.argument("name")
@click.option("--sets", help="Checkpoints MODEL@STEP,... (each needs a complete activation set).")
@click.option("--models", help="Models A,B,... (with --steps).")
@click.option("--steps", help="Steps S1,S2,... of every model in --models.")
@dataset_option("Dataset of the activation sets beside which the AP sidecars go (default: the only one).")
@hook_option
@click.option("--pool", type=click.Choice(["max", "mean"]), default="max", show_default=True)
@click.option("--mask-concept-token", is_flag=True, help="Drop the concept word's own tokens (token detectors).")
@click.option("--k", type=click.IntRange(min=1), default=100, show_default=True, help="Experts kept per concept.")
@click.option("--tau", type=click.FloatRange(0, 1), default=0.9, show_default=True, help="AP counted as expert.")
@click.option("--permutations", type=click.IntRange(min=0), default=20, show_default=True, help="Label shuffles.")
@click.option(
    "--mantel-permutations",
    type=click.IntRange(min=0),
    default=MANTEL_PERMUTATIONS,
    show_default=True,
    help="Permutations of the Mantel test behind the stored taxonomy and human-reference RSA p-values.",
)
@click.option("--human", type=click.Path(dir_okay=False), help="Human reference CSV (pairs or triplets).")
@click.option("--seed", type=SEED, default=0, show_default=True, help="Seed of negatives and permutations.")
@click.option("--batch-size", type=click.IntRange(min=1), default=16, show_default=True)
@device_option
@force_option("Score again even if an identical run is complete.")
@quiet_option
@pass_app
def run(app: AppContext, name: str, quiet: bool, dataset_name: str | None, **options: object) -> None:
    """Score every neuron of each checkpoint as an expert of each concept (AP, AUROC, permutation null)."""
    from actdb.compute.concepts.run import ConceptRequest, run_concepts

    request = ConceptRequest(name=name, dataset=dataset_name, **options)
    run_concepts(app.store(), request, log=(lambda _m: None) if quiet else click.echo)


@concept.command("show")
@click.argument("name")
@click.option("--human", type=click.Path(dir_okay=False), help="Human reference CSV (pairs or triplets).")
@click.option("--pool", type=click.Choice(["max", "mean"]), default="max", show_default=True, help="Runs of this pool.")
@click.option("--mask-concept-token", "mask", is_flag=True, help="The runs with the concept word's tokens dropped.")
@click.option(
    "--mantel-permutations",
    type=click.IntRange(min=0),
    help="Permutations of the Mantel test, run here for every RSA. "
    "Default: each run's test as `concept run` stored it; "
    "where none fits (--similarity jaccard, --layer, a --human reference the run was not scored with), "
    f"{MANTEL_PERMUTATIONS} here. The columns taxonomy_permutations and human_permutations give the counts.",
)
@click.option(
    "--similarity",
    type=click.Choice(["spearman", "jaccard"]),
    default="spearman",
    show_default=True,
    help="Concept x concept: Spearman of AP vectors, or Jaccard of expert sets.",
)
@click.option("--layer", type=click.IntRange(min=0), help="Similarity from this layer's neurons only.")
@format_option
@pass_app
def show(
    app: AppContext,
    name: str,
    human: str | None,
    pool: str,
    mask: bool,
    mantel_permutations: int | None,
    similarity: str,
    layer: int | None,
    fmt: str,
) -> None:
    """Per step: concepts, mean best AP, experts, twin overlap vs chance, seed-seed and reference RSA, hierarchy."""
    from actdb.compute.concepts.analysis import concept_table

    table, emergence = concept_table(
        app.store(),
        name,
        human=human,
        pool=pool,
        mask=mask,
        mantel_permutations=mantel_permutations,
        similarity=similarity,
        layer=layer,
    )
    click.echo(render(table, fmt))
    if fmt == "table":
        click.echo(render(emergence, fmt))


@concept.command("experts")
@click.argument("name")
@click.argument("concept_name", metavar="CONCEPT")
@click.option("--model", help="Only this model.")
@click.option("--step", type=click.IntRange(min=0), help="Only this step.")
@format_option
@pass_app
def experts(app: AppContext, name: str, concept_name: str, model: str | None, step: int | None, fmt: str) -> None:
    """The concept's top-k neurons per checkpoint, with universality, family and twins."""
    from actdb.compute.concepts.analysis import concept_experts

    click.echo(render(concept_experts(app.store(), name, concept_name, model, step), fmt))


COMMANDS = (concept,)
