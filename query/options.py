"""Shared click options and parameter types of the `actdb` commands; every type parses through `store.refs`, so
the CLI, the API and the library accept the same spellings and reject the same mistakes."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import click

from actdb.query.output import FORMATS
from actdb.store.errors import ActdbError
from actdb.store.hook_names import hook_spelling, parse_hook
from actdb.store.refs import (
    CONTROLS,
    DEVICES,
    MAX_STEP,
    PRECISIONS,
    STORED_DTYPES,
    check_threshold,
    parse_bytes,
    parse_set_ref,
    parse_step,
    parse_steps,
)

if TYPE_CHECKING:
    from actdb.store.config import StoreConfig
    from actdb.store.database.connection import Store


class AppContext:
    """Resolved store location, opened lazily so `--help` never touches the database."""

    def __init__(self, config: StoreConfig) -> None:
        self.config = config
        self._store: Store | None = None

    def store(self) -> Store:
        """The store, opened on first use (the database layer is imported only by commands that need it); runs
        whose process died are marked abandoned first, so no command shows or waits for them."""
        if self._store is None:
            from actdb.store.database.connection import Store
            from actdb.store.database.lifecycle import reap_abandoned

            self._store = Store.open(self.config)
            reap_abandoned(self._store)
        return self._store


pass_app = click.make_pass_decorator(AppContext)


class _Parsed(click.ParamType):
    """A click type backed by one of the `store.refs` parsers; their one-line errors become usage errors."""

    def __init__(self, name: str, parse: Callable[[str], Any]) -> None:
        self.name = name
        self._parse = parse

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if not isinstance(value, str):
            return value
        try:
            return self._parse(value)
        except ActdbError as exc:
            self.fail(str(exc), param, ctx)


def _threshold(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise ActdbError(f"malformed threshold {text!r}; write a number in [0, 1]") from None
    return check_threshold(value)


HOOK = _Parsed("hook", parse_hook)
HOOK_SPELLING = _Parsed("hook", hook_spelling)
STEP = _Parsed("step", parse_step)
STEPS = _Parsed("steps", parse_steps)
SET_REF = _Parsed("model@step", parse_set_ref)
SIZE = _Parsed("size", parse_bytes)
THRESHOLD = _Parsed("threshold", _threshold)
SEED = click.IntRange(0, 2**32 - 1)
INDEX = click.IntRange(0, 2**31 - 1)
COUNT = click.IntRange(1, MAX_STEP)


def format_option(f: Callable) -> Callable:
    return click.option("--format", "fmt", type=click.Choice(FORMATS), default="table", show_default=True)(f)


def device_option(f: Callable) -> Callable:
    return click.option(
        "--device",
        type=click.Choice(DEVICES),
        default="auto",
        show_default=True,
        help="auto uses a GPU where there is one (CUDA for torch, CuPy for arrays).",
    )(f)


def precision_option(f: Callable) -> Callable:
    return click.option(
        "--precision",
        type=click.Choice(PRECISIONS),
        default="auto",
        show_default=True,
        help="Products on CUDA: auto uses TF32 tensor cores where a check on the first chunk keeps r within 1e-4 "
        "of float64; float32 forces full precision. The CPU always computes in float32.",
    )(f)


def control_option(help: str = "`token` removes each neuron's per-token-id mean first.") -> Callable:
    return click.option("--control", type=click.Choice(CONTROLS), default="none", show_default=True, help=help)


def dataset_option(help: str = "Token dataset (default: the only one).", required: bool = False) -> Callable:
    return click.option("--dataset", "dataset_name", required=required, help=help)


def quiet_option(f: Callable) -> Callable:
    return click.option("--quiet", is_flag=True, help="No progress bars.")(f)


def force_option(help: str) -> Callable:
    return click.option("--force", is_flag=True, help=help)


def threshold_option(
    help: str = "Excess correlation above which a neuron is universal (default: each run's recorded one, 0.5 "
    "unless `correlate --threshold` set it).",
    default: float | None = None,
) -> Callable:
    """`--threshold`: no default (each run's recorded one) unless the command has its own, which --help shows."""
    return click.option("--threshold", type=THRESHOLD, default=default, show_default=default is not None, help=help)


def cluster_option(f: Callable) -> Callable:
    """`--scheduler ADDRESS` or `--workers N`, handed to the command as one `cluster` (a `ClusterSpec`)."""

    @functools.wraps(f)
    def command(*args: Any, scheduler: str | None, workers: int | None, **kwargs: Any) -> Any:
        from actdb.compute.cluster import ClusterSpec

        return f(*args, cluster=ClusterSpec(scheduler, workers), **kwargs)

    command = click.option(
        "--workers",
        type=click.IntRange(min=1),
        help="Run the tasks on a local Dask cluster of N worker processes (one thread each).",
    )(command)
    return click.option(
        "--scheduler",
        metavar="ADDRESS",
        help="Run the tasks on an existing Dask cluster (e.g. tcp://head:8786, from dask-jobqueue or dask-cuda); "
        "workers need the store's folder at the same path.",
    )(command)


def stored_dtype_option(help: str = "Stored dtype.") -> Callable:
    return click.option("--dtype", type=click.Choice(STORED_DTYPES), default="float16", show_default=True, help=help)


HOOK_HELP = (
    "mlp.post (after the nonlinearity) or mlp.pre (before it; a gated MLP's gate); TransformerLens names "
    "(blocks.L.mlp.hook_post / hook_pre) work too."
)


def hook_option(f: Callable) -> Callable:
    return click.option(
        "--hook",
        type=HOOK,
        default="mlp.post",
        show_default=True,
        help=HOOK_HELP,
    )(f)


def read_hook_option(f: Callable) -> Callable:
    """`--hook` of a reading command: which hook's sets to read; by default the only one present."""
    return click.option(
        "--hook",
        type=HOOK,
        default=None,
        help="Read the sets of this hook (mlp.post or mlp.pre; TransformerLens names work too). Default: the only "
        "hook present; when both are, say which.",
    )(f)


def recorded_hook_option(f: Callable) -> Callable:
    """`--hook` of `ingest`: kept as typed, so that a layer in a TransformerLens name is checked against the model
    (`hook_of_model`)."""
    return click.option("--hook", type=HOOK_SPELLING, default="mlp.post", show_default=True, help=HOOK_HELP)(f)
