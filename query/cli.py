"""The `actdb` command line: every user-facing command, with one-line errors and non-zero exits."""

from __future__ import annotations

import re
import sys
from importlib.metadata import version
from pathlib import Path

import click
from sqlalchemy.exc import SQLAlchemyError

from actdb.query.output import FORMATS, render
from actdb.store.config import StoreConfig
from actdb.store.database import Store
from actdb.store.errors import ActdbError


class AppContext:
    """Resolved store location, opened lazily so `--help` never touches the database."""

    def __init__(self, config: StoreConfig) -> None:
        self.config = config
        self._store: Store | None = None

    def store(self) -> Store:
        if self._store is None:
            self._store = Store.open(self.config)
        return self._store


pass_app = click.make_pass_decorator(AppContext)
format_option = click.option("--format", "fmt", type=click.Choice(FORMATS), default="table", show_default=True)


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(version("actdb"), prog_name="actdb")
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


@cli.command()
@pass_app
def init(app: AppContext) -> None:
    """Create the store (folder + database) or upgrade its schema to the latest revision."""
    store = Store.init(app.config)
    click.echo(f"store ready: {app.config.home} (database {store.engine.url.render_as_string(hide_password=True)})")


@cli.command()
@format_option
@pass_app
def status(app: AppContext, fmt: str) -> None:
    """Models, checkpoints and activation sets with their ingest status and bytes on disk."""
    from actdb.query.listings import status_rows

    columns, rows = status_rows(app.store())
    click.echo(render(columns, rows, fmt))


@cli.group()
def dataset() -> None:
    """Token datasets shared by every model: add, list, show."""


@dataset.command("add")
@click.argument("name")
@click.argument("sources", nargs=-1, required=True)
@click.option("--tokenizer", required=True, help="Tokenizer hub id or local folder (usually the model's).")
@click.option("--seq-len", type=click.IntRange(min=2), default=512, show_default=True)
@click.option("--tokens", "n_tokens", type=click.IntRange(min=1), help="Target token count (whole sequences).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the document shuffle.")
@click.option("--field", default="text", show_default=True, help="Text field of JSONL records / hub datasets.")
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
) -> None:
    """Tokenize SOURCES (files, folders, JSONL, or a Hugging Face dataset name) into dataset NAME."""
    from actdb.store.dataset_registry import add_dataset

    row = add_dataset(app.store(), name, list(sources), tokenizer, seq_len, n_tokens, seed, field)
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

    click.echo(render(*dataset_rows(app.store()), fmt))


@dataset.command("show")
@click.argument("name")
@format_option
@pass_app
def dataset_show(app: AppContext, name: str, fmt: str) -> None:
    """Everything recorded about one dataset."""
    from actdb.query.listings import dataset_rows

    columns, rows = dataset_rows(app.store(), name=name, full=True)
    click.echo(render(["field", "value"], list(zip(columns, rows[0], strict=True)), fmt))


def _parse_steps(step: int | None, steps: str | None) -> list[int]:
    if (step is None) == (steps is None):
        raise click.UsageError("give exactly one of --step N or --steps N,M,...")
    if step is not None:
        return [step]
    try:
        return [int(s) for s in steps.split(",") if s.strip()]
    except ValueError:
        raise click.BadParameter(f"--steps must be comma-separated integers, got {steps!r}") from None


@cli.command()
@click.argument("model")
@click.option("--step", type=int, help="Training step to ingest.")
@click.option("--steps", help="Several steps, comma-separated.")
@click.option("--dataset", "dataset_name", required=True, help="Token dataset to run the model on.")
@click.option("--source", help="Hub id or local folder; `{step}` is replaced by the step. Registers MODEL.")
@click.option("--revision", help="Revision template, e.g. checkpoint-{step} (default per family).")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
@click.option("--batch-size", type=click.IntRange(min=1), default=8, show_default=True, help="Sequences per pass.")
@click.option("--dtype", type=click.Choice(["float16"]), default="float16", show_default=True)
@click.option("--force", is_flag=True, help="Redo a set that is already complete.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
@pass_app
def ingest(
    app: AppContext,
    model: str,
    step: int | None,
    steps: str | None,
    dataset_name: str,
    source: str | None,
    revision: str | None,
    device: str,
    batch_size: int,
    dtype: str,
    force: bool,
    quiet: bool,
) -> None:
    """Record MODEL's MLP activations at each step on a dataset, with per-neuron statistics."""
    from actdb.store.ingest import IngestRequest
    from actdb.store.ingest import ingest as run_ingest

    store = app.store()
    for s in _parse_steps(step, steps):
        run_ingest(
            store,
            IngestRequest(
                model, s, dataset_name, source, revision, device, batch_size, dtype, force, progress=not quiet
            ),
            log=click.echo,
        )


def _parse_bytes(text: str | None) -> int | None:
    """'512MB', '4GB', '1.5GiB' or plain bytes."""
    if text is None:
        return None
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([KMGT]?)(?:I?B)?\s*", text.upper())
    if not m:
        raise click.BadParameter(f"cannot read a size from {text!r} (e.g. 512MB, 4GB)")
    return int(float(m.group(1)) * 1024 ** " KMGT".index(m.group(2) or " "))


@cli.command()
@click.option("--dataset", "dataset_name", help="Token dataset the sets were ingested on.")
@click.option("--step", type=int, help="Step of every model in --models.")
@click.option("--models", help="Comma-separated models, all at --step.")
@click.option("--sets", "set_specs", help="Explicit sets, comma-separated MODEL@STEP (e.g. a@100,a@400).")
@click.option(
    "--control",
    type=click.Choice(["none", "token"]),
    default="none",
    show_default=True,
    help="`token` removes each neuron's per-token-id mean first (current-token detectors drop out).",
)
@click.option("--threshold", type=float, default=0.5, show_default=True, help="Excess correlation for universal.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the rotation baseline.")
@click.option("--topk", type=click.IntRange(min=0), default=0, show_default=True, help="Keep the K best matches.")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
@click.option("--chunk-tokens", type=click.IntRange(min=1), default=8192, show_default=True)
@click.option("--memory-budget", help="Accumulator memory, e.g. 8GB (default: 60% of free memory).")
@click.option("--force", is_flag=True, help="Recompute even if an identical complete run exists.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
@pass_app
def correlate(
    app: AppContext,
    dataset_name: str | None,
    step: int | None,
    models: str | None,
    set_specs: str | None,
    control: str,
    threshold: float,
    seed: int,
    topk: int,
    device: str,
    chunk_tokens: int,
    memory_budget: str | None,
    force: bool,
    quiet: bool,
) -> None:
    """Correlate every neuron of each set with all neurons of the others; label universal neurons."""
    from actdb.compute.correlation import CorrelationOptions
    from actdb.compute.correlation_run import SetRef, resolve_sets, run_correlation

    if (models is None) == (set_specs is None):
        raise click.UsageError("give either --models (with --step) or --sets")
    if models is not None:
        if step is None:
            raise click.UsageError("--models needs --step")
        refs = [SetRef(m.strip(), step) for m in models.split(",") if m.strip()]
    else:
        refs = [SetRef.parse(x.strip()) for x in set_specs.split(",") if x.strip()]
    store = app.store()
    sets = resolve_sets(store, refs, dataset_name)
    options = CorrelationOptions(
        control=control,
        baseline_seed=seed,
        topk=topk,
        chunk_tokens=chunk_tokens,
        memory_budget=_parse_bytes(memory_budget),
    )
    run_correlation(store, sets, options, threshold, device, force, progress=not quiet, log=click.echo)


@cli.command()
@click.option("--model", "model_name", help="Compute persistence of this model (omit to list stored results).")
@click.option("--dataset", "dataset_name", help="Dataset of the analysed sets (default: the only one).")
@click.option("--steps", help="Analysed steps, comma-separated (default: every ingested step).")
@click.option("--control", type=click.Choice(["none", "token"]), default="none", show_default=True)
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
@click.option("--quiet", is_flag=True, help="No progress bar.")
@format_option
@pass_app
def persistence(
    app: AppContext,
    model_name: str | None,
    dataset_name: str | None,
    steps: str | None,
    control: str,
    device: str,
    quiet: bool,
    fmt: str,
) -> None:
    """Do universal neurons last? Per layer overlap between consecutive steps, self-correlation, emergence."""
    from actdb.query.listings import persistence_rows, single_dataset

    store = app.store()
    if model_name is not None:
        from actdb.compute.persistence import compute_persistence

        dataset_name = dataset_name or single_dataset(store)
        step_list = _parse_steps(None, steps) if steps else None
        compute_persistence(
            store,
            model_name,
            dataset_name,
            step_list,
            control,
            device,
            progress=not quiet,
            log=lambda m: click.echo(m, err=True),
        )
    click.echo(render(*persistence_rows(store, model_name, control), fmt))


@cli.command()
@click.argument("target", metavar="MODEL@STEP")
@click.option(
    "--neurons",
    "selector",
    required=True,
    help="universal, universal:LAYER, a list like 3.1234,11.3030, or @FILE with such a list.",
)
@click.option("--method", type=click.Choice(["zero", "mean"]), default="zero", show_default=True)
@click.option("--dataset", "dataset_name", help="Dataset to measure loss on (default: the set's only one).")
@click.option("--tokens", "n_tokens", type=click.IntRange(min=1), help="Evaluate only the first N tokens.")
@click.option(
    "--controls",
    type=click.IntRange(min=0),
    default=0,
    show_default=True,
    help="Random neuron sets matched per layer in size.",
)
@click.option("--each", is_flag=True, help="Also ablate each selected neuron on its own (batched).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the control draws.")
@click.option("--run", "run_id", type=int, help="Correlation run whose universal labels to use.")
@click.option(
    "--control",
    type=click.Choice(["none", "token"]),
    default="none",
    show_default=True,
    help="Which correlation control's universal labels `universal` means.",
)
@click.option("--batch-size", type=click.IntRange(min=1), default=8, show_default=True)
@click.option(
    "--variants-per-pass",
    type=click.IntRange(min=1),
    help="Single-neuron variants stacked per forward call with --each (default: 16 on GPU, 1 on CPU).",
)
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
@click.option("--quiet", is_flag=True, help="No progress bar.")
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
    batch_size: int,
    variants_per_pass: int | None,
    device: str,
    quiet: bool,
) -> None:
    """Does the model need these neurons? Cross-entropy with them replaced, against matched random controls."""
    from actdb.compute.ablation_run import run_ablation

    run_ablation(
        app.store(),
        target,
        selector,
        method,
        dataset_name,
        n_tokens,
        controls,
        seed,
        each,
        control,
        run_id,
        batch_size,
        device,
        variants_per_pass,
        progress=not quiet,
        log=click.echo,
    )


@cli.command()
@click.option("--model", help="Only this model.")
@click.option("--step", type=int, help="Only this step.")
@click.option("--layer", type=int, help="Only this layer.")
@click.option("--run", "run_id", type=int, help="Read this correlation run (default: each set's newest).")
@click.option("--threshold", type=float, help="Re-label with this excess-correlation threshold.")
@click.option("--control", type=click.Choice(["none", "token"]), default="none", show_default=True)
@click.option(
    "--sort", type=click.Choice(["excess", "layer", "max_corr", "kurtosis"]), default="excess", show_default=True
)
@click.option("--limit", type=click.IntRange(min=1), help="At most this many rows.")
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
    by_layer: bool,
    fmt: str,
) -> None:
    """Universal neurons with excess correlation, max-corr, baseline and activation statistics."""
    from actdb.query.queries import universal_by_layer, universal_neurons

    store = app.store()
    if by_layer:
        columns, rows = universal_by_layer(store, model, step, run_id, threshold, control)
        if layer is not None:
            rows = [r for r in rows if r[3] == layer]
    else:
        columns, rows = universal_neurons(store, model, step, layer, run_id, threshold, control, sort, limit)
    click.echo(render(columns, rows, fmt))


@cli.command()
@click.argument("target", metavar="MODEL@STEP")
@click.argument("neuron_id", metavar="L.N")
@format_option
@pass_app
def neuron(app: AppContext, target: str, neuron_id: str, fmt: str) -> None:
    """Everything known about one neuron: statistics, matches, universality, history, ablations."""
    import json as _json

    from actdb.query.queries import neuron_story, parse_neuron, parse_target

    model, step = parse_target(target)
    layer, index = parse_neuron(neuron_id)
    story = neuron_story(app.store(), model, step, layer, index)
    if fmt == "json":
        doc = {"model": model, "step": step, "layer": layer, "neuron": index}
        doc.update({k: _json.loads(render(c, r, "json")) for k, (c, r) in story.items()})
        click.echo(_json.dumps(doc, indent=2))
        return
    for title, (columns, rows) in story.items():
        click.echo(f"# {title}" if fmt == "csv" else f"\n{title.replace('_', ' ')} of {model}@{step} {layer}.{index}")
        click.echo(render(columns, rows, fmt))


@cli.command()
@format_option
@pass_app
def runs(app: AppContext, fmt: str) -> None:
    """Correlation runs with members, parameters, backend, status and timings."""
    from actdb.query.queries import runs_listing

    click.echo(render(*runs_listing(app.store()), fmt))


@cli.command()
@click.option("--model", help="Only this model.")
@format_option
@pass_app
def ablations(app: AppContext, model: str | None, fmt: str) -> None:
    """Ablation results: clean and ablated loss, delta, and the matched random controls."""
    from actdb.query.queries import ablations_listing

    click.echo(render(*ablations_listing(app.store(), model), fmt))


@cli.command()
@click.argument("query", required=False)
@click.option("--schema", is_flag=True, help="List tables and views with their columns.")
@format_option
@pass_app
def sql(app: AppContext, query: str | None, schema: bool, fmt: str) -> None:
    """Run one read-only SQL statement against the store (writes are refused)."""
    from actdb.query.sql_console import run_readonly, schema_listing

    app.store()
    if schema:
        click.echo(render(*schema_listing(app.config), fmt))
    elif query:
        click.echo(render(*run_readonly(app.config, query), fmt))
    else:
        raise click.UsageError("give a SQL query or --schema")


@cli.command()
@click.argument("target", metavar="MODEL@STEP")
@click.option("--layer", type=int, required=True)
@click.option("--neurons", help="Comma-separated neuron indices (default: all).")
@click.option("--tokens", "token_range", help="START:END token rows (default: all).")
@click.option("--dataset", "dataset_name", help="Dataset of the set (default: the only one).")
@click.option("--counted-only", is_flag=True, help="Drop positions that are not counted (BOS/EOS/padding).")
@click.option("--out", "out_path", required=True, type=click.Path(dir_okay=False), help="FILE.npy or FILE.csv")
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
    """Write raw activations of one layer (optionally some neurons / tokens) to .npy or .csv."""
    from actdb.query.api import ActdbStore

    api = ActdbStore(app.store())
    arr = api.read_layer(
        target, layer, neurons=neurons, tokens=token_range, dataset=dataset_name, counted_only=counted_only
    )
    api.write_array(arr, out_path)
    click.echo(f"wrote {arr.shape[0]} tokens x {arr.shape[1]} neurons to {out_path}")


@cli.command()
@click.option("--out", "out_dir", default="actdb-report", show_default=True, type=click.Path(file_okay=False))
@pass_app
def report(app: AppContext, out_dir: str) -> None:
    """A static HTML page with PNG plots of everything in the store."""
    from actdb.query.report import build_report

    path = build_report(app.store(), Path(out_dir))
    click.echo(f"report written to {path}")


@cli.command()
@click.option("--seeds", type=click.IntRange(min=2), default=4, show_default=True, help="Independently seeded models.")
@click.option(
    "--steps",
    default="0,50,200,800",
    show_default=True,
    help="Checkpoints to analyse (the last one is the training length).",
)
@click.option(
    "--tokens",
    "n_tokens",
    type=click.IntRange(min=256),
    default=24576,
    show_default=True,
    help="Tokens in the analysis dataset.",
)
@click.option(
    "--controls", type=click.IntRange(min=0), default=8, show_default=True, help="Random neuron sets in the ablation."
)
@click.option(
    "--threshold",
    type=float,
    default=0.2,
    show_default=True,
    help="Excess correlation for universal (tiny models' rotation baseline is ~0.4; see README).",
)
@click.option("--zoo", type=click.Path(file_okay=False), help="Folder of the model zoo (default: <home>/zoo).")
@click.option("--quiet", is_flag=True, help="No progress bars.")
@pass_app
def demo(
    app: AppContext,
    seeds: int,
    steps: str,
    n_tokens: int,
    controls: int,
    threshold: float,
    zoo: str | None,
    quiet: bool,
) -> None:
    """The whole study on a local zoo of tiny GPT-2 seeds: train, ingest, correlate, persist, ablate, report."""
    from actdb.query.demo import run_demo

    step_list = _parse_steps(None, steps)
    if len(step_list) < 2 or min(step_list) < 0:
        raise click.BadParameter("--steps needs at least two non-negative steps")
    store = Store.init(app.config)
    run_demo(
        store,
        seeds,
        tuple(step_list),
        n_tokens,
        controls,
        threshold,
        Path(zoo) if zoo else None,
        progress=not quiet,
        echo=click.echo,
    )


def main(argv: list[str] | None = None) -> None:
    """Console entry point: user mistakes become one line on stderr and exit status 1 (2 for usage errors)."""
    try:
        cli.main(args=argv, prog_name="actdb", standalone_mode=False)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except click.Abort:
        click.echo("actdb: aborted", err=True)
        sys.exit(130)
    except click.UsageError as exc:
        ctx = f" (see `{exc.ctx.command_path} --help`)" if exc.ctx else ""
        click.echo(f"actdb: {exc.format_message()}{ctx}", err=True)
        sys.exit(2)
    except click.ClickException as exc:
        click.echo(f"actdb: {exc.format_message()}", err=True)
        sys.exit(exc.exit_code)
    except ActdbError as exc:
        click.echo(f"actdb: error: {exc}", err=True)
        sys.exit(1)
    except SQLAlchemyError as exc:
        detail = str(getattr(exc, "orig", None) or exc).strip().splitlines()[0]
        click.echo(f"actdb: database error: {detail}", err=True)
        sys.exit(1)
    except KeyboardInterrupt:
        click.echo("actdb: interrupted", err=True)
        sys.exit(130)


if __name__ == "__main__":
    main()
