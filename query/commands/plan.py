"""`actdb plan`: what a study will cost before any of it runs (bytes, memory, passes, FLOPs, time).

`query/cli.py` adds `COMMANDS` to the group; the planning itself is `actdb.compute.planning`, imported when the
command runs so that `actdb --help` stays light.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import click

from actdb.query.options import SIZE, format_option, stored_dtype_option
from actdb.query.output import render
from actdb.store.errors import ActdbError

# `compute.planning.shapes.DEVICES`, spelled here so that `actdb --help` does not import the planner (a test
# keeps the two equal)
PLAN_DEVICES = ("cpu", "cuda", "h100", "a100", "h200")

if TYPE_CHECKING:
    from actdb.compute.planning.estimate import CapacityPlan
    from actdb.store.database.connection import Rows


class _Count(click.ParamType):
    """A whole number written as 5000000, 5e6, 5M or 1.5B (`capacity.parse_count`)."""

    name = "count"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if not isinstance(value, str):
            return value
        from actdb.compute.planning.shapes import parse_count

        try:
            return parse_count(value, f"--{param.name.replace('_', '-')}" if param and param.name else "a count")
        except ActdbError as exc:
            self.fail(str(exc), param, ctx)


COUNT = _Count()


@click.command()
@click.option("--models", type=click.IntRange(min=1), required=True, help="Models (e.g. seeds) per step.")
@click.option("--steps", type=click.IntRange(min=1), required=True, help="Training steps (checkpoints) per model.")
@click.option("--tokens", type=COUNT, required=True, help="Token positions of the dataset, e.g. 5000000, 5e6 or 5M.")
@click.option(
    "--arch",
    help="A known architecture: gpt2-small, gpt2-medium, gpt2-large, gpt2-xl, pythia-70m, pythia-160m, "
    "pythia-410m, pythia-1b, pythia-1.4b, llama-7b; or give --layers, --d-mlp and --params instead.",
)
@click.option("--layers", type=click.IntRange(min=1), help="Custom shape: layers.")
@click.option("--d-mlp", type=click.IntRange(min=1), help="Custom shape: MLP neurons per layer.")
@click.option("--params", type=COUNT, help="Custom shape: parameters, e.g. 124M.")
@click.option("--d-model", type=click.IntRange(min=1), help="Custom shape: residual width (shown only).")
@click.option("--vocab", type=click.IntRange(min=1), help="Custom shape: vocabulary (needed by --control token).")
@stored_dtype_option()
@click.option(
    "--torch-dtype",
    type=click.Choice(["float32", "bfloat16", "float16"]),
    default="float32",
    show_default=True,
    help="Precision of the ingest forward pass.",
)
@click.option(
    "--device",
    type=click.Choice(PLAN_DEVICES, case_sensitive=False),
    default="cpu",
    show_default=True,
    help="cpu or cuda: this machine, its rates measured for a few seconds; h100, a100 or h200: that "
    "accelerator's published dense peaks (this machine's rates for the host's share of the work).",
)
@click.option(
    "--precision",
    type=click.Choice(["auto", "tf32", "float32"]),
    default="auto",
    show_default=True,
    help="Products on CUDA, as `correlate --precision`: auto and tf32 are planned at the TF32 rate (auto falls "
    "back to float32 when its first-chunk check fails).",
)
@click.option(
    "--workers",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    help="Workers in parallel (Dask worker threads, or machines each running one).",
)
@click.option("--memory-budget", type=SIZE, help="Accumulator memory, e.g. 8GB (default: the engine's default).")
@click.option("--chunk-tokens", type=click.IntRange(min=1), help="As `correlate --chunk-tokens` (default 8192).")
@click.option("--baseline-draws", type=click.IntRange(1, 1000), help="As `correlate --baseline-draws` (default 8).")
@click.option(
    "--control",
    type=click.Choice(["none", "token"]),
    default="none",
    show_default=True,
    help="As `correlate --control`; token keeps per-token-id sums (vocabulary x neurons per set) in memory.",
)
@click.option("--read-speed", type=SIZE, help="Storage read speed per second, e.g. 2GB (default: assume it keeps up).")
@click.option(
    "--host-cores",
    type=click.IntRange(min=1),
    help="Cores of the host that reads chunks and computes QRs (default: this machine's); rates are measured "
    "on one core and scaled.",
)
@format_option
def plan(
    models: int,
    steps: int,
    tokens: int,
    arch: str | None,
    layers: int | None,
    d_mlp: int | None,
    params: int | None,
    d_model: int | None,
    vocab: int | None,
    dtype: str,
    torch_dtype: str,
    device: str,
    precision: str,
    workers: int,
    memory_budget: int | None,
    chunk_tokens: int | None,
    baseline_draws: int | None,
    control: str,
    read_speed: int | None,
    host_cores: int | None,
    fmt: str,
) -> None:
    """Plan a study before running it: --models x --steps activation sets on --tokens positions. Prints bytes,
    each step's correlation memory and passes (the engine's own planner), FLOPs of ingest and correlation, and
    an estimated time from this machine's measured rates or an accelerator's published peaks."""
    from actdb.compute.planning.estimate import plan_study
    from actdb.compute.planning.shapes import PlanRequest, architecture, custom_architecture

    custom = (layers, d_mlp, params)
    if arch is not None and any(v is not None for v in (*custom, d_model, vocab)):
        raise click.UsageError("give either --arch or a custom shape (--layers, --d-mlp, --params), not both")
    if arch is None and any(v is None for v in custom):
        raise click.UsageError("give --arch, or all of --layers, --d-mlp and --params")
    shape = architecture(arch) if arch is not None else custom_architecture(layers, d_mlp, params, d_model, vocab)
    extra = {k: v for k, v in (("chunk_tokens", chunk_tokens), ("baseline_draws", baseline_draws)) if v is not None}
    request = PlanRequest(
        arch=shape,
        models=models,
        steps=steps,
        tokens=tokens,
        dtype=dtype,
        device=device.strip().lower(),
        workers=workers,
        memory_budget=memory_budget,
        precision=precision,
        torch_dtype=torch_dtype,
        control=control,
        read_speed=read_speed,
        host_cores=host_cores,
        **extra,
    )
    request.check()  # mistakes are reported before the rates are measured
    rows = plan_rows(plan_study(request), fmt)
    click.echo(_table(rows) if fmt == "table" else render(rows, fmt))


def _table(rows: Rows) -> str:
    """`render`'s aligned table, but with text columns left-aligned: the notes are sentences."""
    widths = {c: max([len(c)] + [len(str(r[c])) for r in rows]) for c in rows.columns}
    lines = ["  ".join(c.ljust(widths[c]) for c in rows.columns).rstrip()]
    lines.append("  ".join("-" * widths[c] for c in rows.columns))
    for r in rows:
        cells = [str(r[c]).rjust(widths[c]) if c == "value" else str(r[c]).ljust(widths[c]) for c in rows.columns]
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines)


def _bytes(n: float) -> str:
    for unit, size in (("PB", 1e15), ("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= size:
            return f"{n / size:.4g} {unit}"
    return f"{n:.0f} B"


def _gib(n: float) -> str:
    return f"{n / 2**30:.1f} GiB"


def _rate(flops: float) -> str:
    return f"{flops / 1e12:.4g} TFLOP/s" if flops >= 1e12 else f"{flops / 1e9:.4g} GFLOP/s"


def _seconds(s: float) -> str:
    for unit, size in (("years", 365 * 86400), ("days", 86400), ("h", 3600), ("min", 60)):
        if s >= 2 * size:
            return f"{s / size:.3g} {unit}"
    return f"{s:.3g} s"


def plan_rows(p: CapacityPlan, fmt: str = "table") -> Rows:
    """The plan as rows of quantity, value and note: values as readable text for a table, as numbers with
    their unit (B, FLOP, s, FLOP/s, B/s) for CSV and JSON."""
    from actdb.store.database.connection import Rows

    r, a, m, f, t = p.request, p.request.arch, p.memory, p.flops, p.step
    k, n = r.models, a.n_neurons
    pairs = k * (k - 1) // 2
    accel = r.device not in ("cpu",)
    workers = f"{r.workers} worker{'s' if r.workers > 1 else ''}, perfect scaling assumed"
    rows: list[tuple[str, float | int | str, str, str, str]] = []

    def add(quantity: str, value: float | int | str, unit: str, shown: str, note: str = "") -> None:
        rows.append((quantity, value, unit, shown, note))

    add("study", p.n_sets, "sets", f"{k} models x {r.steps} steps = {p.n_sets} sets", f"{a.name}: {a.describe()}")
    add("tokens", r.tokens, "tokens", f"{r.tokens:,}", "positions per set (one token dataset)")
    itemsize = p.set_bytes // (r.tokens * n)
    add(
        "activations per set",
        p.set_bytes,
        "B",
        _bytes(p.set_bytes),
        f"{r.tokens:,} tokens x {n:,} neurons x {itemsize} B ({r.dtype}); HDF5 metadata, checksums and the "
        "explanation sidecar add little",
    )
    add("token file", p.token_bytes, "B", _bytes(p.token_bytes), "int32 ids + bool mask, 5 B per token, stored once")
    add(
        "stored in total",
        p.total_bytes,
        "B",
        _bytes(p.total_bytes),
        f"{p.n_sets} sets ({_bytes(p.activation_bytes)}) + the token file",
    )
    add("memory budget", m.budget, "B", _gib(m.budget), p.budget_source)
    if m.fits:
        add(
            "memory per correlation run",
            m.peak,
            "B",
            _gib(m.peak),
            f"the engine planner's accounting at this budget; one layer block per pass needs {_gib(m.minimum)}, "
            f"one pass {_gib(m.one_pass)}",
        )
    else:
        cure = (
            f"with --chunk-tokens {m.fitting_chunk} it fits"
            if m.fitting_chunk
            else "lower --chunk-tokens or raise --memory-budget"
        )
        add(
            "memory per correlation run",
            m.minimum,
            "B",
            f"DOES NOT FIT: needs {_gib(m.minimum)}",
            f"for one layer block per pass, over the budget: the engine would refuse the run ({cure}); "
            f"what follows assumes {_gib(m.minimum)}; one pass needs {_gib(m.one_pass)}",
        )
    d = p.design
    if r.workers > 1 and m.fits:
        per_worker = -(-pairs * a.n_layers // p.sharing)
        add(
            "accumulators sharded",
            p.sharing,
            "workers",
            f"over {p.sharing} worker{'s' if p.sharing > 1 else ''}",
            f"each worker holds up to {per_worker} of the {pairs * a.n_layers} (pair x layer) accumulator blocks "
            "for a whole pass beside its own chunk buffers and moments; every chunk is read once and handed to "
            "each worker",
        )
    add(
        "passes per step",
        d.n_passes,
        "passes",
        str(d.n_passes),
        f"{pairs} pairs x {a.n_layers} layers = {pairs * a.n_layers} (pair x layer) tasks packed by plan_passes "
        + (
            f"into the {r.workers} workers' memory together"
            + (f" at --chunk-tokens {p.design_chunk}" if p.design_chunk != r.chunk_tokens else "")
            + f"; one worker alone needs {m.n_passes}"
            if r.workers > 1 and m.fits
            else "into one worker's memory"
        ),
    )
    add(
        "data read per step",
        d.read_bytes,
        "B",
        _bytes(d.read_bytes),
        f"read amplification {d.amplification:.3g}x over {_bytes(d.step_bytes)}"
        + (
            f" (one worker's multi-pass design: {m.amplification:.3g}x, {_bytes(m.read_bytes)})"
            if d is not m
            else ": the first pass reads every set, each later pass the sets its tasks involve"
        ),
    )
    add(
        "read amplification",
        d.amplification,
        "x",
        f"{d.amplification:.3g}x",
        "bytes read per byte stored, this design; multi-pass design on one worker "
        f"{m.amplification:.3g}x ({m.n_passes} passes)",
    )
    add(
        "ingest FLOPs per set",
        p.ingest_flops,
        "FLOP",
        f"{p.ingest_flops:.3e}",
        f"forward pass, 2 x {a.params:,} params x {r.tokens:,} tokens (counts the unembedding, which ingest skips)",
    )
    add("ingest FLOPs in total", p.ingest_flops * p.n_sets, "FLOP", f"{p.ingest_flops * p.n_sets:.3e}")
    add(
        "correlation FLOPs per step",
        f.total,
        "FLOP",
        f"{f.total:.3e}",
        "2 FLOPs per multiply-add; each unordered pair of sets is multiplied once",
    )
    add(
        "  pair products",
        f.pair_products,
        "FLOP",
        f"{f.pair_products:.3e}",
        f"{pairs} unordered pairs x 2 x {n:,}^2 x {r.tokens:,} tokens = {f.pair_products / 2:.3e} multiply-adds; "
        "both directions' maxima and baselines come from each X_a^T X_b",
    )
    add(
        "  within-layer Grams",
        f.grams,
        "FLOP",
        f"{f.grams:.3e}",
        f"{k} sets x {a.n_layers} layers x "
        + (
            f"{a.d_mlp:,} x {a.d_mlp + 1:,} x tokens (NumPy's SYRK: one triangle)"
            if r.device == "cpu"
            else f"2 x {a.d_mlp:,}^2 x tokens"
        ),
    )
    add("  column sums", f.sums, "FLOP", f"{f.sums:.3e}", f"{k} sets x {n:,} x tokens additions")
    add(
        "  accumulator additions",
        f.adds,
        "FLOP",
        f"{f.adds:.3e}",
        f"each {r.chunk_tokens:,}-token chunk's products added into the float64 accumulators",
    )
    add(
        "  baseline products",
        f.baseline,
        "FLOP",
        f"{f.baseline:.3e}",
        f"{r.baseline_draws} draws x (Cov_ab R_b + R_a^T Cov_ab) per pair and layer, float32, no pass over tokens",
    )
    rotations = f.rotation_sd + f.draw_products + f.qr
    add(
        "  rotations",
        rotations,
        "FLOP",
        f"{rotations:.3e}",
        f"per pass and set: C R, R^T C R once, (R^T C R) P_k per extra draw (float32); Haar QRs on the host (8/3 d^3 "
        f"each) once for the study: {k} models x {a.n_layers} layers + {r.baseline_draws - 1} extra draws, kept "
        "per (seed, model, layer)",
    )
    if f.control:
        add("  token control", f.control, "FLOP", f"{f.control:.3e}", "between-token products, float64")
    add("correlation FLOPs in total", f.total * r.steps, "FLOP", f"{f.total * r.steps:.3e}", f"{r.steps} steps")
    rates = p.rates
    add("product rate", rates.products, "FLOP/s", _rate(rates.products), rates.source)
    where = "the device" if accel else "this machine"
    add(
        "reading rate",
        rates.stream,
        "B/s",
        f"{_bytes(rates.stream)}/s",
        "this machine's: chunks read from the page cache, checked and converted by the engine's reader"
        + (f"; storage at {_bytes(r.read_speed)}/s besides" if r.read_speed else "; storage assumed to keep up"),
    )
    add(
        "other rates",
        rates.baseline,
        "FLOP/s",
        _rate(rates.baseline),
        f"baseline phase on {where}; Grams {_rate(rates.grams)}, accumulator additions {rates.adds / 1e9:.3g} G/s, "
        f"QR {_rate(rates.host_qr)} on the host; ingest's forward pass {_rate(rates.forward)}",
    )
    add(
        "ingest time",
        p.ingest_total_seconds,
        "s",
        _seconds(p.ingest_total_seconds),
        f"{_seconds(p.ingest_seconds)} per set at {_rate(rates.forward)}, the forward pass only (writing and "
        f"statistics add; see benchmarks/RESULTS.md); {workers}",
    )
    how = "overlapping the products" if t.overlapped else "between the products"
    split = f" over {p.sharing} workers" if p.sharing > 1 else ""
    add(
        "correlation time per step",
        t.total,
        "s",
        _seconds(t.total),
        f"products {_seconds(t.products)}{split}; reading {_seconds(t.reading)} ({how}, once by the host); "
        f"baseline {_seconds(t.baseline)}{split}"
        + (
            f"; the engine sustains {rates.efficiency:.2f} of the rates measured alone" if rates.efficiency != 1 else ""
        ),
    )
    add(
        "QRs for the study",
        p.qr_seconds,
        "s",
        _seconds(p.qr_seconds),
        f"{p.flops.qr:.3e} FLOP at {_rate(rates.host_qr)} on the host, once (rotation cache)",
    )
    add(
        "correlation time in total",
        p.correlation_total_seconds,
        "s",
        _seconds(p.correlation_total_seconds),
        f"{r.steps} steps in turn, each on all {r.workers} worker(s), and the QRs once"
        + ("; device rates at their published peaks" if accel and r.device != "cuda" else ""),
    )
    add(
        "bound",
        p.bound,
        "",
        p.bound,
        f"over the study: products and baseline {_seconds(r.steps * (t.products + t.baseline))}, reading "
        f"{_seconds(r.steps * t.reading)}, host QRs {_seconds(p.qr_seconds)}",
    )
    rs = p.research
    add(
        "research method time",
        rs.total,
        "s",
        _seconds(rs.total),
        f"Gurnee et al.'s universal-neurons code on the same {r.workers} worker(s) and rates: {rs.jobs} jobs "
        f"(pairs x steps x correlation and baseline) in {rs.rounds} rounds of {_seconds(rs.job)}: forward passes "
        f"recomputed {_seconds(rs.forward)}, float32 products {_seconds(rs.products)}, "
        f"float64 additions {_seconds(rs.adds)}, baseline rotation {_seconds(rs.rotation)}",
    )
    add(
        "research / actdb",
        rs.total / p.correlation_total_seconds,
        "x",
        f"{rs.total / p.correlation_total_seconds:.3g}x",
        "the research method's estimated time over actdb's (above 1: actdb is faster); actdb reads stored "
        "activations, the research method recomputes them",
    )
    if accel:
        add(
            "read speed to keep up",
            p.needed_read_speed,
            "B/s",
            f"{_bytes(p.needed_read_speed)}/s",
            f"storage and host decoding that keep the products busy; this host decodes "
            f"{_bytes(rates.stream)}/s" + (f", storage given {_bytes(r.read_speed)}/s" if r.read_speed else ""),
        )
    if fmt == "table":
        return Rows(["quantity", "value", "note"], [{"quantity": q, "value": s, "note": o} for q, _v, _u, s, o in rows])
    return Rows(
        ["quantity", "value", "unit", "note"],
        [{"quantity": q.strip(), "value": v, "unit": u, "note": o} for q, v, u, _s, o in rows],
    )


COMMANDS = (plan,)
