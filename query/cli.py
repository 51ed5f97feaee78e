"""The `actdb` command line. Each command opens the store, calls one library function with keyword arguments
and renders its rows; user mistakes become one line on stderr and a non-zero exit (`main`)."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import click

from actdb import __version__
from actdb.query.options import (
    COUNT,
    INDEX,
    SEED,
    SET_REF,
    SIZE,
    STEP,
    STEPS,
    cluster_option,
    control_option,
    dataset_option,
    device_option,
    force_option,
    format_option,
    hook_option,
    precision_option,
    quiet_option,
    stored_dtype_option,
    threshold_option,
)
from actdb.query.output import json_records, render
from actdb.query.plan_command import register as register_plan
from actdb.store.config import StoreConfig
from actdb.store.errors import ActdbError, first_line

if TYPE_CHECKING:
    from actdb.compute.cluster import ClusterSpec
    from actdb.store.database import Store


class AppContext:
    """Resolved store location, opened lazily so `--help` never touches the database."""

    def __init__(self, config: StoreConfig) -> None:
        self.config = config
        self._store: Store | None = None

    def store(self) -> Store:
        """The store, opened on first use (the database layer is imported only by commands that need it)."""
        if self._store is None:
            from actdb.store.database import Store

            self._store = Store.open(self.config)
        return self._store


pass_app = click.make_pass_decorator(AppContext)


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.version_option(__version__, prog_name="actdb")
@click.option("--home", envvar="ACTDB_HOME", help="Store folder for HDF5 files [env ACTDB_HOME; ./actdb-store].")
@click.option(
    "--db",
    "database_url",
    envvar="ACTDB_DATABASE_URL",
    help="SQLAlchemy database URL [env ACTDB_DATABASE_URL; SQLite file in the store folder].",
)
@click.pass_context
def cli(ctx: click.Context, home: str | None, database_url: str | None) -> None:
    """actdb: an activation store and query tool for neuron-level studies across seeds and checkpoints."""
    ctx.obj = AppContext(StoreConfig.resolve(home, database_url))


def _echo(message: str) -> None:
    click.echo(message)


@cli.command()
@pass_app
def init(app: AppContext) -> None:
    """Create the store (folder + database) or upgrade its schema to the latest revision."""
    from actdb.store.database import Store, safe_url

    store = Store.init(app.config)
    click.echo(f"store ready: {app.config.home} (database {safe_url(app.config.database_url)})")
    for note in store.notes:
        click.echo(f"actdb: warning: {note}", err=True)


@cli.command()
@format_option
@pass_app
def status(app: AppContext, fmt: str) -> None:
    """Models, checkpoints and activation sets with their ingest status and bytes on disk."""
    from actdb.query.listings import status_rows

    click.echo(render(status_rows(app.store()), fmt))


@cli.command()
@click.option("--quick", is_flag=True, help="Check existence, headers and shapes only (skip reading every checksum).")
@format_option
@quiet_option
@pass_app
def check(app: AppContext, quick: bool, fmt: str, quiet: bool) -> None:
    """Verify every complete set's file: present, of the recorded shape, and passing its checksums (exit 1 if not)."""
    from actdb.store.check import check_store

    problems = check_store(app.store(), quick=quick, progress=not quiet, log=lambda m: click.echo(m, err=True))
    if problems or fmt != "table":
        click.echo(render(problems, fmt))
    else:
        click.echo("everything the database records as complete is present and intact")
    if problems:
        sys.exit(1)


@cli.group()
def dataset() -> None:
    """Token datasets shared by every model: add, list, show."""


@dataset.command("add")
@click.argument("name")
@click.argument("sources", nargs=-1, required=True)
@click.option("--tokenizer", required=True, help="Tokenizer hub id or local folder (usually the model's).")
@click.option("--seq-len", type=click.IntRange(2, 2**20), default=512, show_default=True)
@click.option("--tokens", "n_tokens", type=COUNT, help="Target token count (whole sequences).")
@click.option("--seed", type=SEED, default=0, show_default=True, help="Seed of the document shuffle.")
@click.option("--field", default="text", show_default=True, help="Text field of JSONL records / hub datasets.")
@click.option(
    "--exclude-tokens",
    help="Tokens that never count, besides BOS/EOS/padding: comma-separated ids, vocabulary tokens or text like "
    "\\n; `gurnee` = the newline token, as in Gurnee et al. 2024.",
)
@pass_app
def dataset_add(
    app: AppContext,
    name: str,
    sources: tuple[str, ...],
    tokenizer: str,
    seq_len: int,
    n_tokens: int | None,
    seed: int,
    field: str,
    exclude_tokens: str | None,
) -> None:
    """Tokenize SOURCES (files, folders, JSONL, or a Hugging Face dataset name) into dataset NAME."""
    from actdb.store.dataset_registry import add_dataset

    row = add_dataset(
        app.store(),
        name=name,
        sources=list(sources),
        tokenizer=tokenizer,
        seq_len=seq_len,
        n_tokens=n_tokens,
        seed=seed,
        field=field,
        exclude_tokens=exclude_tokens,
        log=lambda m: click.echo(f"actdb: {m}", err=True),
    )
    click.echo(
        f"dataset {row.name}: {row.n_sequences} sequences x {row.seq_len} = {row.n_tokens} tokens "
        f"({row.n_counted} counted), sha256 {row.token_sha256[:12]}"
    )


@dataset.command("list")
@format_option
@pass_app
def dataset_list(app: AppContext, fmt: str) -> None:
    """All token datasets."""
    from actdb.query.listings import dataset_rows

    click.echo(render(dataset_rows(app.store()), fmt))


@dataset.command("show")
@click.argument("name")
@format_option
@pass_app
def dataset_show(app: AppContext, name: str, fmt: str) -> None:
    """Everything recorded about one dataset."""
    from actdb.query.listings import dataset_rows
    from actdb.store.database import Rows

    row = dataset_rows(app.store(), name=name, full=True)[0]
    click.echo(render(Rows(["field", "value"], [{"field": k, "value": v} for k, v in row.items()]), fmt))


def _steps(step: int | None, steps: list[int] | None) -> list[int]:
    if (step is None) == (steps is None):
        raise click.UsageError("give exactly one of --step N or --steps N,M,...")
    return [step] if step is not None else steps


@cli.command()
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
@hook_option
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
@force_option("Redo a complete set; accept another source or weights identical to another step's.")
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
    quiet: bool,
) -> None:
    """Record MODEL's MLP activations at each step on a dataset, with per-neuron statistics and explanations.
    With --workers or --scheduler, each step is one task on a Dask cluster."""
    from actdb.compute.step_ingest import ingest_on_cluster, ingest_step
    from actdb.store.ingest import IngestRequest, check_steps_distinguishable

    step_list = _steps(step, steps)
    per_step = _paired_revisions(step_list, revision, revisions)
    store = app.store()
    if revisions is None:
        check_steps_distinguishable(store, model, source, revision, len(step_list), force)
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
            progress=not quiet,
        )
        for s, rev in zip(step_list, per_step, strict=True)
    ]
    if cluster.enabled:
        ingest_on_cluster(store.config, requests, cluster, predictions=with_predictions, progress=not quiet, log=_echo)
        return
    for request in requests:
        ingest_step(store, request, with_predictions, log=_echo)


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


@cli.command()
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
@click.option("--topk", type=click.IntRange(min=0, max=1000), default=0, show_default=True, help="Keep K best matches.")
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
    topk: int,
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
    from actdb.compute.correlation_run import CorrelationRequest
    from actdb.compute.correlation_run import correlate as run_correlate
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
        topk=topk,
        chunk_tokens=chunk_tokens,
        memory_budget=memory_budget,
        hook=hook,
        device=device,
        precision=precision,
        cluster=cluster,
        force=force,
        progress=not quiet,
    )
    run_correlate(app.store(), request, log=_echo)


@cli.command()
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
        from actdb.compute.correlation_run import CorrelationRequest
        from actdb.compute.correlation_run import correlate as run_correlate

        if (models is None) == (set_specs is None) or (models is not None and step_list is None):
            raise click.UsageError("give --models with --steps, or --sets")
        refs = (
            [SetRef(m, st) for m in parse_list(models, "models") for st in step_list]
            if models is not None
            else parse_set_refs(set_specs)
        )
        if by_function:
            from actdb.compute.function_similarity import FunctionRequest, function_similarity

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


@cli.command()
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
    from actdb.compute.predictions import PredictionRequest, compute_predictions

    for target in targets:
        request = PredictionRequest(
            target=target,
            dataset=dataset_name,
            batch_size=batch_size,
            device=device,
            force=force,
            progress=not quiet,
        )
        compute_predictions(app.store(), request, log=_echo)


@cli.command()
@click.option("--model", "model_name", help="Compute persistence of this model (omit to list stored results).")
@dataset_option("Dataset of the analysed sets (default: the only one).")
@click.option("--steps", type=STEPS, help="Analysed steps, comma-separated (default: every ingested step).")
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
    control: str,
    threshold: float | None,
    device: str,
    quiet: bool,
    fmt: str,
) -> None:
    """Do universal neurons last? Per layer overlap between consecutive steps, self-correlation, emergence."""
    from actdb.query.queries import persistence_listing
    from actdb.store.registry import only_dataset

    store = app.store()
    if model_name is not None:
        from actdb.compute.persistence import PersistenceRequest, compute_persistence

        request = PersistenceRequest(
            model=model_name,
            dataset=dataset_name or only_dataset(store, model_name),
            steps=steps,
            control=control,
            threshold=threshold,
            device=device,
            progress=not quiet,
        )
        outcome = compute_persistence(store, request, log=lambda m: click.echo(m, err=True))
        threshold = outcome.threshold
    click.echo(render(persistence_listing(store, model_name, control if model_name else None, threshold), fmt))


@cli.command()
@click.argument("target", metavar="MODEL@STEP")
@click.option(
    "--neurons",
    "selector",
    required=True,
    help="universal, universal:LAYER, a list like 3.1234,11.3030, or @FILE with such a list.",
)
@click.option("--method", type=click.Choice(["zero", "mean"]), default="zero", show_default=True)
@dataset_option("Dataset to measure loss on (default: the set's only one).")
@click.option(
    "--tokens", "n_tokens", type=COUNT, help="Evaluate only the first N tokens (rounded up to whole sequences)."
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
    from actdb.compute.ablation_run import AblationRequest, run_ablation

    request = AblationRequest(
        target=target,
        selector=selector,
        method=method,
        dataset=dataset_name,
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
    run_ablation(app.store(), request, log=_echo)


@cli.command()
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
    fmt: str,
) -> None:
    """Universal neurons: excess correlation, stability over baseline draws, z, max-corr, baseline, statistics."""
    from actdb.query.queries import universal_by_layer, universal_neurons

    scope = {"model": model, "step": step, "layer": layer, "run": run_id, "threshold": threshold, "control": control}
    if by_layer and (min_stability is not None or limit is not None):
        raise click.UsageError("--by-layer counts every neuron; --min-stability and --limit apply to neuron listings")
    if by_layer:
        rows = universal_by_layer(app.store(), **scope)
    else:
        rows = universal_neurons(app.store(), **scope, sort=sort, limit=limit, min_stability=min_stability)
    click.echo(render(rows, fmt))


@cli.command()
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
@format_option
@pass_app
def neuron(app: AppContext, target, neuron_id: str, n_examples: int, fmt: str) -> None:
    """Everything known about one neuron: what it does (contexts, tokens, vocabulary), statistics, matches,
    universality, history, ablations."""
    from actdb.query.explanations import neuron_explanation
    from actdb.query.queries import neuron_story
    from actdb.store.database import Rows
    from actdb.store.refs import parse_neuron

    layer, index = parse_neuron(neuron_id)
    story = neuron_story(app.store(), target.model, target.step, layer, index)
    explained = neuron_explanation(app.store(), target.model, target.step, layer, index, n_examples, fmt == "json")
    story = {**explained, **story}
    if fmt == "json":
        doc = {"model": target.model, "step": target.step, "layer": layer, "neuron": index}
        doc.update({k: json_records(rows) for k, rows in story.items()})
        click.echo(json.dumps(doc, indent=2))
        return
    if fmt == "csv":  # one table: a `section` column, then the union of the sections' columns
        columns = ["section"] + list(dict.fromkeys(c for rows in story.values() for c in rows.columns))
        merged = [{"section": title, **dict(r)} for title, rows in story.items() for r in rows]
        click.echo(render(Rows(columns, [{c: r.get(c) for c in columns} for r in merged]), "csv"))
        return
    for title, rows in story.items():
        click.echo(f"\n{title.replace('_', ' ')} of {target} {layer}.{index}")
        click.echo(render(rows, fmt))


@cli.command()
@click.argument("targets", metavar="MODEL@STEP[,...]")
@dataset_option("Token dataset of the sets (needed when a checkpoint has sets on several).")
@hook_option
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
    hook: str,
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
    from actdb.compute.explanations import ExplainRequest, explain_sets
    from actdb.store.refs import parse_set_refs

    request = ExplainRequest(
        sets=parse_set_refs(targets),
        dataset=dataset_name,
        hook=hook,
        top_k=top_k,
        min_count=min_count,
        vocabulary=not no_vocabulary,
        memory_budget=memory_budget,
        device=device,
        force=force,
        progress=not quiet,
    )
    explain_sets(app.store(), request, log=_echo)


@cli.command()
@click.argument("target", metavar="MODEL@STEP", type=SET_REF)
@click.option("--run", "run_id", type=INDEX, help="Read this correlation run (default: each set's widest).")
@threshold_option("Excess correlation for universal (default: the run's recorded threshold).")
@control_option()
@click.option("--by-layer", is_flag=True, help="Only the family counts per layer.")
@format_option
@pass_app
def families(
    app: AppContext, target, run_id: int | None, threshold: float | None, control: str, by_layer: bool, fmt: str
) -> None:
    """Universal neurons of MODEL@STEP by family (token, position, prediction, suppression, unexplained), with the
    rule and thresholds that assign them."""
    from actdb.query.explanations import families as family_listing

    rows, counts, rules = family_listing(
        app.store(), model=target.model, step=target.step, threshold=threshold, control=control, run=run_id
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


@cli.command()
@format_option
@pass_app
def runs(app: AppContext, fmt: str) -> None:
    """Correlation runs with members, parameters, backend, status and timings."""
    from actdb.query.queries import runs_listing

    click.echo(render(runs_listing(app.store()), fmt))


@cli.command()
@click.option("--model", help="Only this model.")
@format_option
@pass_app
def ablations(app: AppContext, model: str | None, fmt: str) -> None:
    """Ablation results: clean and ablated loss, delta, and the matched random controls."""
    from actdb.query.queries import ablations_listing

    click.echo(render(ablations_listing(app.store(), model), fmt))


@cli.command()
@click.argument("query", required=False)
@click.option("--schema", is_flag=True, help="List tables and views with their columns.")
@click.option(
    "--timeout", type=click.FloatRange(0.1, 86400), default=30.0, show_default=True, help="Cancel after SECONDS."
)
@format_option
@pass_app
def sql(app: AppContext, query: str | None, schema: bool, timeout: float, fmt: str) -> None:
    """Run one read-only SQL statement against the store (it cannot write, by construction)."""
    from actdb.query.sql_console import run_readonly, schema_listing
    from actdb.store.database import Rows

    app.store()
    if schema:
        click.echo(render(Rows.from_tuples(*schema_listing(app.config)), fmt))
    elif query:
        click.echo(render(Rows.from_tuples(*run_readonly(app.config, query, timeout=timeout)), fmt))
    else:
        raise click.UsageError("give a SQL query or --schema")


@cli.command()
@click.argument("target", metavar="MODEL@STEP")
@click.option("--layer", type=INDEX, required=True)
@click.option("--neurons", help="Comma-separated neuron indices (default: all).")
@click.option("--tokens", "token_range", help="START:END token rows (default: all).")
@dataset_option("Dataset of the set (default: the only one).")
@click.option("--counted-only", is_flag=True, help="Drop positions that are not counted (BOS/EOS/padding).")
@click.option(
    "--out", "out_path", required=True, type=click.Path(dir_okay=False), help="FILE.csv, FILE.parquet or FILE.npy"
)
@pass_app
def export(
    app: AppContext,
    target: str,
    layer: int,
    neurons: str | None,
    token_range: str | None,
    dataset_name: str | None,
    counted_only: bool,
    out_path: str,
) -> None:
    """Write activations of one layer (neurons in the order given) to CSV or Parquet, with each row's token
    index, sequence, position, token id and counted flag, or the bare values to .npy."""
    from actdb.query.api import ActdbStore

    acts = ActdbStore(app.store()).activations(
        target, layer, neurons=neurons, tokens=token_range, dataset=dataset_name, counted_only=counted_only
    )
    acts.write(out_path)
    click.echo(f"wrote {acts.values.shape[0]} tokens x {acts.values.shape[1]} neurons to {out_path}")


@cli.command()
@click.option("--out", "out_dir", default="actdb-report", show_default=True, type=click.Path(file_okay=False))
@threshold_option()
@pass_app
def report(app: AppContext, out_dir: str, threshold: float | None) -> None:
    """A static HTML page with PNG plots of everything in the store."""
    from actdb.query.report import build_report

    path = build_report(app.store(), Path(out_dir), threshold=threshold)
    click.echo(f"report written to {path}")


@cli.command()
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
@threshold_option("Excess correlation for universal (tiny models' rotation baseline is ~0.4; see README).")
@click.option("--zoo", type=click.Path(file_okay=False), help="Folder of the model zoo (default: <home>/zoo).")
@quiet_option
@pass_app
def demo(
    app: AppContext,
    seeds: int,
    steps: list[int],
    n_tokens: int,
    controls: int,
    threshold: float | None,
    zoo: str | None,
    quiet: bool,
) -> None:
    """The whole study on a local zoo of tiny GPT-2 seeds: train, ingest, correlate, persist, ablate, report."""
    from actdb.query.demo import DemoRequest, run_demo
    from actdb.store.database import Store

    if len(steps) < 2:
        raise click.BadParameter("--steps needs at least two steps")
    request = DemoRequest(
        seeds=seeds,
        checkpoints=tuple(steps),
        tokens=n_tokens,
        controls=controls,
        threshold=0.2 if threshold is None else threshold,
        zoo=Path(zoo) if zoo else None,
        progress=not quiet,
    )
    run_demo(Store.init(app.config), request, echo=_echo)


register_plan(cli)


def main(argv: list[str] | None = None) -> None:
    """Console entry point: user mistakes become one line on stderr and exit status 1 (2 for usage errors)."""
    _exit(_run(argv))


def _run(argv: list[str] | None) -> int:
    try:
        cli.main(args=argv, prog_name="actdb", standalone_mode=False)
    except click.exceptions.Exit as exc:
        return exc.exit_code
    except click.Abort:
        return _fail("aborted", 130)
    except click.UsageError as exc:
        ctx = f" (see `{exc.ctx.command_path} --help`)" if exc.ctx else ""
        return _fail(f"{first_line(click.ClickException(exc.format_message()))}{ctx}", 2)
    except click.ClickException as exc:
        return _fail(exc.format_message(), exc.exit_code)
    except ActdbError as exc:
        return _fail(f"error: {exc}", 1)
    except KeyboardInterrupt:
        return _fail("interrupted", 130)
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else 1
    except Exception as exc:
        sa = sys.modules.get("sqlalchemy.exc")  # a database error needs the database layer, already imported
        if sa is not None and isinstance(exc, sa.SQLAlchemyError):
            return _fail(f"database error: {first_line(exc)}", 1)
        raise
    return 0


def _fail(message: str, code: int) -> int:
    click.echo(f"actdb: {message}", err=True)
    return code


def _exit(code: int) -> None:
    files = sys.modules.get("actdb.store.activation_file")  # only commands that opened HDF5 files import it
    if files is not None and files.unclosable_files():  # HDF5 would fail finalizing a file it cannot flush
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


if __name__ == "__main__":
    main()
