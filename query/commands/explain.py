"""What neurons do: `neuron` (everything about one neuron), `examples`, `families`."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

import click

from actdb.query.options import (
    INDEX,
    SET_REF,
    SIZE,
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
from actdb.query.output import json_records, render

if TYPE_CHECKING:
    pass


@click.command()
@click.argument("target", metavar="MODEL@STEP", type=SET_REF)
@click.argument("neuron_id", metavar="L.N")
@click.option(
    "--examples",
    "n_examples",
    type=click.IntRange(0, 1000),
    default=5,
    show_default=True,
    help="Max-activating contexts to show (the maximum's token marked «»).",
)
@read_hook_option
@format_option
@pass_app
def neuron(app: AppContext, target, neuron_id: str, n_examples: int, hook: str | None, fmt: str) -> None:
    """Everything known about one neuron: what it does (contexts, tokens, vocabulary), statistics, matches,
    universality, history, ablations."""
    from actdb.query.explanations import neuron_explanation, unexplained_sets
    from actdb.query.queries import neuron_story
    from actdb.store.database.connection import Rows
    from actdb.store.database.registry import resolve_hook
    from actdb.store.refs import parse_neuron

    layer, index = parse_neuron(neuron_id)
    hook = resolve_hook(app.store(), hook, target.model, target.step)
    story = neuron_story(app.store(), target.model, target.step, layer, index, hook)
    explained = neuron_explanation(
        app.store(), target.model, target.step, layer, index, n_examples, fmt == "json", hook
    )
    story = {**explained, **story}
    if fmt == "json":
        doc = {"model": target.model, "step": target.step, "hook": hook, "layer": layer, "neuron": index}
        doc.update({k: json_records(rows) for k, rows in story.items()})
        click.echo(json.dumps(doc, indent=2))
        return
    if fmt == "csv":  # one table: a `section` column, then the union of the sections' columns
        columns = ["section"] + list(dict.fromkeys(c for rows in story.values() for c in rows.columns))
        merged = [{"section": title, **dict(r)} for title, rows in story.items() for r in rows]
        click.echo(render(Rows(columns, [{c: r.get(c) for c in columns} for r in merged]), "csv"))
        return
    missing = unexplained_sets(app.store(), target.model, target.step, hook)
    if missing:  # where the explanation would be: a set that is not explained, not empty tables read as "no data"
        click.echo("\n".join(missing))
        if not any(len(rows) for rows in explained.values()):
            story = {title: rows for title, rows in story.items() if title not in explained}
    for title, rows in story.items():
        click.echo(f"\n{title.replace('_', ' ')} of {target} {layer}.{index}" + (f" at {hook}" if hook else ""))
        click.echo(render(rows, fmt))


@click.command()
@click.argument("targets", metavar="MODEL@STEP[,...]")
@dataset_option("Token dataset of the sets (needed when a checkpoint has sets on several).")
@read_hook_option
@click.option("--top-k", type=click.IntRange(1, 1000), default=32, show_default=True, help="Examples per neuron.")
@click.option(
    "--min-count",
    type=click.IntRange(min=1),
    default=5,
    show_default=True,
    help="Occurrences a token needs to enter a neuron's top tokens by mean activation.",
)
@click.option("--no-vocabulary", is_flag=True, help="Skip the vocabulary statistics (no model weights are loaded).")
@click.option("--memory-budget", type=SIZE, help="Memory for the per-token sums, e.g. 4GB (default 2 GiB).")
@device_option
@force_option("Rebuild explanations that exist.")
@quiet_option
@pass_app
def examples(
    app: AppContext,
    targets: str,
    dataset_name: str | None,
    hook: str | None,
    top_k: int,
    min_count: int,
    no_vocabulary: bool,
    memory_budget: int | None,
    device: str,
    force: bool,
    quiet: bool,
) -> None:
    """Explain the neurons of sets ingested before explanations existed (or rebuild them): max-activating
    examples, token and position variance fractions, vocabulary statistics of the output weights."""
    from actdb.compute.explain.run import ExplainRequest, explain_sets
    from actdb.store.database.registry import resolve_hook
    from actdb.store.errors import ActdbError
    from actdb.store.hook_names import HOOK_NAME
    from actdb.store.refs import parse_set_refs

    refs = parse_set_refs(targets)
    hooks = {resolve_hook(app.store(), hook, ref.model, ref.step, ref.dataset or dataset_name) for ref in refs}
    if len(hooks - {None}) > 1:
        raise ActdbError(f"the sets are at different hooks ({', '.join(sorted(hooks - {None}))}); pass --hook")
    request = ExplainRequest(
        sets=refs,
        dataset=dataset_name,
        hook=next(iter(hooks - {None}), HOOK_NAME),
        top_k=top_k,
        min_count=min_count,
        vocabulary=not no_vocabulary,
        memory_budget=memory_budget,
        device=device,
        force=force,
        progress=not quiet,
    )
    explain_sets(app.store(), request, log=click.echo)


@click.command()
@click.argument("target", metavar="MODEL@STEP", type=SET_REF)
@click.option("--run", "run_id", type=INDEX, help="Read this correlation run (default: each set's widest).")
@threshold_option("Excess correlation for universal (default: the run's recorded threshold).")
@control_option()
@click.option("--by-layer", is_flag=True, help="Only the family counts per layer.")
@read_hook_option
@format_option
@pass_app
def families(
    app: AppContext,
    target,
    run_id: int | None,
    threshold: float | None,
    control: str,
    by_layer: bool,
    hook: str | None,
    fmt: str,
) -> None:
    """Universal neurons of MODEL@STEP by family (token, position, prediction, suppression, unexplained), with the
    rule and thresholds that assign them."""
    from actdb.query.explanations import families as family_listing

    rows, counts, rules = family_listing(
        app.store(), model=target.model, step=target.step, threshold=threshold, control=control, run=run_id, hook=hook
    )
    if fmt == "json":
        doc = {"rules": rules, "by_layer": json_records(counts)}
        if not by_layer:
            doc["neurons"] = json_records(rows)
        click.echo(json.dumps(doc, indent=2))
        return
    if fmt == "table":
        for rule in rules:
            click.echo(f"rule ({rule})")
    click.echo(render(counts if by_layer else rows, fmt))
    if fmt == "table" and not by_layer:
        click.echo("\nper layer")
        click.echo(render(counts, fmt))


COMMANDS = (
    neuron,
    examples,
    families,
)
