"""How fast this machine (or a named accelerator) does each kind of work the engine does: measured in about two
seconds with the engine's own library, shapes, QR and reader, or a published dense peak for an accelerator.

Every host rate is measured on one BLAS thread (threadpoolctl) in the thread's CPU seconds, the fastest of a few
short timings, then scaled by the cores: OpenBLAS threads fighting over two busy cores once made a QR look ten
times slower than one thread does, and CPU seconds do not count the time other processes hold the core.
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from actdb.compute.correlation.engine import (
    SetInput,
)
from actdb.compute.planning.operations import ADD_BYTES, qr_flops
from actdb.compute.planning.shapes import ACCELERATORS, PlanRequest
from actdb.store.device import host_cores
from actdb.store.errors import ActdbError

# The share of the separately timed rates (`measure_host`) that the CPU engine sustains end to end, checked with
# `benchmarks/planner_accuracy.py` (the engine against `plan_study` on the same shapes, in one process; see
# benchmarks/RESULTS.md). How the microbenchmarks relate to the engine depends on the CPU's BLAS kernels, so no
# factor is applied.
CPU_ENGINE_EFFICIENCY = 1.0


@dataclass(frozen=True)
class Rates:
    """What the estimate divides by: FLOP/s of each kind of product where the engine runs it, and this host's
    rates for the work the engine always does on the host."""

    products: float  # the device's pair products (float32; TF32 on CUDA under --precision auto/tf32)
    grams: float  # the device's within-layer Grams, counted as `correlation_flops` counts them
    adds: float  # values/s added into the float64 accumulators (and summed into the column sums)
    baseline: float  # the device's float32 products of the baseline phase (with covariances and rotations)
    float64: float  # the device's float64 products: the token control's between-token part
    forward: float  # the ingest forward pass
    host_qr: float  # Haar rotations' QRs on the host (NumPy), counted as `qr_flops`
    stream: float  # bytes/s of stored activations the host reads, checks and converts to float32
    overlapped: bool = False  # reads run on a thread ahead of the products (the CuPy backend), not between them
    efficiency: float = 1.0  # the share of these rates the engine sustains end to end (CPU_ENGINE_EFFICIENCY)
    source: str = ""


BEST_OF = 15  # timed repeats per rate; the fastest is kept: a busy machine only ever slows a timing down


def _best_seconds(run, repeats: int = BEST_OF) -> float:
    """The fastest of `repeats` calls after one untimed warm-up (page faults, caches), in this thread's CPU
    seconds: with one BLAS thread the work runs on the calling thread, so the time other processes hold the
    core is not counted, and the fastest call is the one their caches and memory traffic slowed least."""
    run()
    best = float("inf")
    for _ in range(repeats):
        started = time.thread_time()
        run()
        best = min(best, time.thread_time() - started)
    return best


def torch_gemm_rate(dtype: str = "float32", size: int = 4096, device: str = "cpu", tf32: bool = False) -> float:
    """FLOP/s of a (size x size) @ (size x size) product through torch: how ingest's forward pass multiplies, and
    the products of a CUDA device (best of 2 after a warm-up)."""
    import torch

    kind = getattr(torch, dtype)
    a = torch.randn(size, size, device=device).to(kind)
    b = torch.randn(size, size, device=device).to(kind)
    out = torch.empty_like(a)
    previous = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = tf32

    def run() -> None:
        torch.matmul(a, b, out=out)
        if device != "cpu":
            torch.cuda.synchronize()

    try:
        return 2 * size**3 / _best_seconds(run, 2)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = previous


def torch_add_rate(device: str, values: int = 1 << 26) -> float:
    """`add_rate` on a torch device (CuPy's `+=` does the same pass over the device's memory)."""
    import torch

    acc = torch.zeros(values, dtype=torch.float64, device=device)
    out = torch.ones(values, dtype=torch.float32, device=device)

    def run() -> None:
        acc.add_(out)
        torch.cuda.synchronize()

    return values / _best_seconds(run, 3)


def numpy_gemm_rate(dtype: str, size: int) -> float:
    """FLOP/s of a square NumPy product on the calling thread's BLAS: the baseline phase (float32, the layers'
    width), the token control (float64), and on the CPU the forward pass's float32 products."""
    rng = np.random.default_rng(0)
    a, b = (rng.standard_normal((size, size)).astype(dtype) for _ in range(2))
    out = np.empty_like(a)
    return 2 * size**3 / _best_seconds(lambda: np.matmul(a, b, out=out))


def chunk_product_rate(width: int, rows: int) -> float:
    """FLOP/s of the CPU engine's per-chunk pair product `x_a^T x_b`, (width x rows) @ (rows x width) on float32
    chunks as the engine holds them."""
    rng = np.random.default_rng(0)
    a, b = (rng.standard_normal((rows, width), dtype=np.float32) for _ in range(2))
    out = np.empty((width, width), dtype=np.float32)
    return 2 * width * width * rows / _best_seconds(lambda: np.matmul(a.T, b, out=out))


def add_rate(values: int = 1 << 21) -> float:
    """Values/s of the accumulation `acc += out` (float64 += float32), a pass over memory per chunk and task."""
    acc = np.zeros(values)
    out = np.ones(values, dtype=np.float32)
    return values / _best_seconds(lambda: np.add(acc, out, out=acc))


def gram_rate(size: int, rows: int) -> float:
    """`d (d + 1)` FLOPs per row / s of a chunk's Gram `x^T x` in NumPy (a SYRK), as the CPU engine forms them."""
    x = np.random.default_rng(0).standard_normal((rows, size)).astype(np.float32)
    out = np.empty((size, size), dtype=np.float32)
    return size * (size + 1) * rows / _best_seconds(lambda: np.matmul(x.T, x, out=out))


def qr_rate(size: int) -> float:
    """`qr_flops`/s of the engine's own Haar rotation (`baseline._haar`)."""
    from actdb.compute.correlation.baseline import _haar

    rng = np.random.default_rng(0)
    return qr_flops(size) / _best_seconds(lambda: _haar(rng, size), 3)


def stream_rate(d_mlp: int, chunk_tokens: int, n_layers: int = 2, chunks: int = 12, passes: int = 4) -> float:
    """Bytes/s at which the engine's own reader (`correlation._read_chunks`) reads, checks and converts a
    freshly written activation file (from the page cache: the storage's speed is --read-speed's business): the
    fastest of `passes` timed passes over all its `chunks` chunks, after an untimed one (which allocates the
    reused buffers). A timing covers a whole pass (24 MB at the default shape), not one chunk: the fastest single
    2 MB chunk of one pass was the rate before, and two runs of `actdb plan` on a quiet machine differed by 12 %
    in it. The file's values are one random block repeated, so writing it costs little."""
    from actdb.compute.correlation.engine import _read_chunks
    from actdb.store.files.activation import ActivationHeader, ActivationReader, ActivationWriter

    width, seq_len = min(d_mlp, 512), 512
    rows = max(seq_len, chunk_tokens // seq_len * seq_len)
    tokens = chunks * rows
    with tempfile.TemporaryDirectory(prefix="actdb-plan-") as tmp:
        path = Path(tmp) / "probe.h5"
        writer = ActivationWriter(
            path, ActivationHeader("probe", 0, "probe", "mlp.post", n_layers, width, tokens, "float16")
        )
        try:
            block = np.random.default_rng(0).standard_normal((seq_len, width), dtype=np.float32).astype(np.float16)
            writer.write_rows(0, [np.tile(block, (tokens // seq_len, 1))] * n_layers)
            writer.finish()
        finally:
            writer.close()
        probe = SetInput(0, str(path), n_layers, width, np.zeros(n_layers * width, dtype=np.float32))
        ids, mask = np.zeros(tokens, dtype=np.int32), np.ones(tokens, dtype=bool)
        with ActivationReader(path) as reader:

            def one_pass() -> None:
                for _chunk in _read_chunks([reader], [probe], [0], ids, mask, seq_len, rows):
                    pass

            seconds = _best_seconds(one_pass, passes)
    return n_layers * width * 2 * tokens / seconds


@dataclass(frozen=True)
class HostRates:
    """This machine's rates per core (each measured on one BLAS thread): NumPy's per-chunk pair products (the
    CPU engine's), its Grams (SYRK), the accumulators' additions, float32 products at the layers' width (the
    baseline phase; also the CPU's forward pass) and float64 ones (the token control's; 0 when not measured),
    the engine's QR and reader; and the cores they scale by."""

    products: float
    grams: float
    adds: float
    float32: float
    float64: float
    qr: float
    stream: float
    forward: float
    width: int = 0  # the width the baseline-phase products were measured at
    cores: int = 1  # this machine's

    def scaled(self, cores: int) -> HostRates:
        """The rates of `cores` such cores working at once (perfect scaling)."""
        rates = ("products", "grams", "adds", "float32", "float64", "qr", "stream", "forward")
        return replace(self, cores=cores, **{k: getattr(self, k) * cores for k in rates})


# What one core is timed on, kept small so that every rate is a few short timings: products FLOPs do not depend
# on the width beyond the BLAS kernel's blocking, a QR's rate grows with its width (a narrower one is slower, so
# the estimate errs long), and the reader's rate is per stored byte.
PROBE_WIDTH = 768
PROBE_ROWS = 2048
STREAM_ROWS = 2048  # rows of the reader probe's chunks, at most


def measure_host(request: PlanRequest) -> HostRates:
    """Time one core of this machine for about two seconds with the engine's own libraries: a chunk's pair
    product, a Gram and a baseline-phase product (at most `PROBE_WIDTH` wide), the accumulators' additions, the
    engine's QR and its reader on a small file (the host's share of every device); the products only where the
    request's device is this CPU. Per core: `HostRates.scaled` gives the whole machine."""
    from threadpoolctl import threadpool_limits

    width = min(request.arch.d_mlp, PROBE_WIDTH)
    cpu = request.device == "cpu"
    with threadpool_limits(1):
        float32 = numpy_gemm_rate("float32", width) if cpu else 0.0
        return HostRates(
            products=chunk_product_rate(min(request.arch.n_neurons, PROBE_WIDTH), PROBE_ROWS) if cpu else 0.0,
            grams=gram_rate(width, PROBE_ROWS) if cpu else 0.0,
            adds=add_rate() if cpu else 0.0,
            float32=float32,
            float64=numpy_gemm_rate("float64", width) if cpu and request.control == "token" else 0.0,
            qr=qr_rate(width),
            stream=stream_rate(request.arch.d_mlp, min(request.chunk_tokens, STREAM_ROWS)),
            forward=float32,
            width=width,
            cores=1,
        )


def rates_for(request: PlanRequest, host: HostRates, gpu: Rates | None = None) -> Rates:
    """The rates of a run on the request's device from per-core `host` rates scaled by the request's host cores:
    all of them on `cpu`; a named accelerator's published dense peaks for the products it runs
    (`ACCELERATORS`), `gpu`'s (measured) for `cuda`, with the host's for its share (the QRs, reading and
    converting chunks: the engine does those on the host wherever its products run)."""
    cores = request.host_cores or host_cores()
    whole = host.scaled(cores)
    shared = {"host_qr": whole.qr, "stream": whole.stream}
    note = (
        f"QRs and reading at this machine's rates measured on one core x {cores} host core(s) "
        f"(QR at width {host.width})"
    )
    if request.device == "cpu":
        return Rates(
            whole.products,
            whole.grams,
            whole.adds,
            whole.float32,
            whole.float64,
            whole.forward,
            **shared,
            efficiency=CPU_ENGINE_EFFICIENCY,
            source=f"measured on one core of this machine x {cores} core(s): NumPy (the CPU engine's library) on "
            f"a chunk's pair product, Grams and baseline-phase products {host.width} wide (also the forward "
            f"pass's rate); {note}",
        )
    if request.device in ACCELERATORS:
        acc = ACCELERATORS[request.device]
        products = acc.fp32 if request.precision == "float32" else acc.tf32
        return Rates(
            products,
            products,
            acc.bandwidth / ADD_BYTES,
            acc.fp32,
            acc.fp64,
            acc.fp32 if request.torch_dtype == "float32" else acc.bf16,
            **shared,
            overlapped=True,
            source=f"{acc.source}: dense peaks, which the products do not exceed; {note}",
        )
    if gpu is None:
        raise ActdbError("--device cuda needs this machine's GPU measured (measure_rates)")
    return replace(gpu, **shared, overlapped=True, source=f"measured on this machine's GPU through torch; {note}")


def measure_rates(request: PlanRequest) -> tuple[Rates, int | None]:
    """This machine's rates (`measure_host`, about two seconds) for the request's device, and for `cuda` the
    GPU's free memory, with its products measured through torch too."""
    host = measure_host(request)
    if request.device != "cuda":
        return rates_for(request, host), None
    import torch

    if not torch.cuda.is_available():
        raise ActdbError(
            "--device cuda measures this machine's GPU, but torch sees none here; name an accelerator "
            f"({', '.join(ACCELERATORS)}) to plan from its published peaks"
        )
    products = torch_gemm_rate("float32", 4096, "cuda", tf32=request.precision != "float32")
    gpu = Rates(
        products=products,
        grams=products,
        adds=torch_add_rate("cuda"),
        baseline=torch_gemm_rate("float32", 4096, "cuda"),
        float64=torch_gemm_rate("float64", 4096, "cuda"),
        forward=torch_gemm_rate(request.torch_dtype, 4096, "cuda"),
        host_qr=0.0,
        stream=0.0,
    )
    return rates_for(request, host, gpu), int(torch.cuda.mem_get_info()[0])
