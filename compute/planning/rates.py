"""How fast this machine (or a named accelerator) does each kind of work the engine does: measured in a few
seconds with the engine's own library, shapes, QR and reader, or a published dense peak for an accelerator."""

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
from actdb.store.errors import ActdbError

# The share of the separately timed rates (`measure_host`) that the CPU engine sustains end to end. Measured with
# `benchmarks/planner_accuracy.py` (the engine against `plan_study` on the same shapes, in one process): 0.82-0.85
# on a 2-core AVX-512 Intel machine, but 1.0 (200k-token benchmark) and 1.24 (demo step) on a 2-core AVX2 AMD EPYC.
# How the microbenchmarks relate to the engine depends on the CPU's BLAS kernels, so no factor is applied: the
# rates as measured put the estimate within 0.82-1.24 of the engine's time on both machines.
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


def _best_seconds(run, repeats: int) -> float:
    """The fastest of `repeats` timed calls after one untimed warm-up (thread pools, page faults)."""
    run()
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - started)
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


def numpy_gemm_rate(dtype: str, size: int) -> float:
    """FLOP/s of a square NumPy product (best of 2 after a warm-up): how the CPU engine multiplies, per chunk
    (float32, 4096 wide), in the baseline phase (float32, the layers' width) and for the token control
    (float64)."""
    rng = np.random.default_rng(0)
    a, b = (rng.standard_normal((size, size)).astype(dtype) for _ in range(2))
    out = np.empty_like(a)
    return 2 * size**3 / _best_seconds(lambda: np.matmul(a, b, out=out), 2)


def chunk_product_rate(width: int, rows: int) -> float:
    """FLOP/s of the CPU engine's per-chunk pair product `x_a^T x_b`, (width x rows) @ (rows x width) on float32
    chunks as the engine holds them (best of 2 after a warm-up)."""
    rng = np.random.default_rng(0)
    a, b = (rng.standard_normal((rows, width), dtype=np.float32) for _ in range(2))
    out = np.empty((width, width), dtype=np.float32)
    return 2 * width * width * rows / _best_seconds(lambda: np.matmul(a.T, b, out=out), 2)


def add_rate(values: int = 1 << 22) -> float:
    """Values/s of the accumulation `acc += out` (float64 += float32), a pass over memory per chunk and task."""
    acc = np.zeros(values)
    out = np.ones(values, dtype=np.float32)
    return values / _best_seconds(lambda: np.add(acc, out, out=acc), 3)


def torch_add_rate(device: str, values: int = 1 << 26) -> float:
    """`add_rate` on a torch device (CuPy's `+=` does the same pass over the device's memory)."""
    import torch

    acc = torch.zeros(values, dtype=torch.float64, device=device)
    out = torch.ones(values, dtype=torch.float32, device=device)

    def run() -> None:
        acc.add_(out)
        torch.cuda.synchronize()

    return values / _best_seconds(run, 3)


def gram_rate(size: int, rows: int = 8192) -> float:
    """`d (d + 1)` FLOPs per row / s of a chunk's Gram `x^T x` in NumPy (a SYRK), as the CPU engine forms them."""
    x = np.random.default_rng(0).standard_normal((rows, size)).astype(np.float32)
    out = np.empty((size, size), dtype=np.float32)
    return size * (size + 1) * rows / _best_seconds(lambda: np.matmul(x.T, x, out=out), 2)


def _mean_seconds_after(run, before, repeats: int) -> float:
    """Mean seconds of `run()` called right after `before()` (untimed), after one warm-up."""
    before()
    run()
    total = 0.0
    for _ in range(repeats):
        before()
        started = time.perf_counter()
        run()
        total += time.perf_counter() - started
    return total / repeats


def qr_rate(size: int, repeats: int = 3) -> float:
    """`qr_flops`/s of the engine's own Haar rotation (`baseline._haar`), each drawn right after a NumPy product
    as in the baseline phase."""
    from actdb.compute.correlation.baseline import _haar

    rng = np.random.default_rng(0)
    b = rng.standard_normal((size, size)).astype(np.float32)
    out = np.empty_like(b)
    return qr_flops(size) / _mean_seconds_after(lambda: _haar(rng, size), lambda: np.matmul(b, b, out=out), repeats)


def stream_rate(d_mlp: int, chunk_tokens: int, n_layers: int = 2, chunks: int = 3) -> float:
    """Bytes/s at which the engine's own reader (`correlation._read_chunks`) reads, checks and converts a
    freshly written activation file (from the page cache: the storage's speed is --read-speed's business), with
    a NumPy product after each chunk as in the engine."""
    from actdb.compute.correlation.engine import _read_chunks
    from actdb.store.files.activation import ActivationHeader, ActivationReader, ActivationWriter

    width, seq_len = min(d_mlp, 512), 512
    tokens = (chunks + 1) * max(seq_len, chunk_tokens // seq_len * seq_len)
    with tempfile.TemporaryDirectory(prefix="actdb-plan-") as tmp:
        path = Path(tmp) / "probe.h5"
        writer = ActivationWriter(
            path, ActivationHeader("probe", 0, "probe", "mlp.post", n_layers, width, tokens, "float16")
        )
        try:
            block = np.random.default_rng(0).standard_normal((tokens, width)).astype(np.float16)
            writer.write_rows(0, [block] * n_layers)
            writer.finish()
        finally:
            writer.close()
        probe = SetInput(0, str(path), n_layers, width, np.zeros(n_layers * width, dtype=np.float32))
        ids, mask = np.zeros(tokens, dtype=np.int32), np.ones(tokens, dtype=bool)
        gram = np.empty((width, width), dtype=np.float32)
        with ActivationReader(path) as reader:
            stream = _read_chunks([reader], [probe], [0], ids, mask, seq_len, chunk_tokens)
            rows, seconds = 0, 0.0
            for k in range(chunks + 1):
                started = time.perf_counter()
                n, _ids, chunk = next(stream)
                if k:  # the first chunk allocates the reused buffers
                    rows, seconds = rows + n, seconds + time.perf_counter() - started
                x = chunk[0][:, :width]
                np.matmul(x.T, x, out=gram)
    return rows * n_layers * width * 2 / seconds


@dataclass(frozen=True)
class HostRates:
    """This machine's measured rates: NumPy's per-chunk pair products (the CPU engine's), its Grams (SYRK), the
    accumulators' additions, float32 products at the layers' width (the baseline phase) and float64 ones (the
    token control's; 0 when not measured), the engine's QR and reader, and torch's products in the forward
    pass's dtype (ingest)."""

    products: float
    grams: float
    adds: float
    float32: float
    float64: float
    qr: float
    stream: float
    forward: float
    width: int = 0  # the width the baseline-phase products were measured at


def measure_host(request: PlanRequest) -> HostRates:
    """Time this machine for a few seconds, with the engine's own libraries and shapes: a chunk's pair product
    (at most 4096 neurons a side), Grams and baseline-phase products at the architecture's width (at most 2048),
    the accumulators' additions, the engine's QR (at most 1024 wide; FLOPs scale as d^3) and its reader on a small
    file, and a torch product for ingest's forward pass."""
    d = request.arch.d_mlp
    width = min(d, 2048)
    return HostRates(
        products=chunk_product_rate(min(request.arch.n_neurons, 4096), request.chunk_tokens),
        grams=gram_rate(width, request.chunk_tokens),
        adds=add_rate(),
        float32=numpy_gemm_rate("float32", width),
        float64=numpy_gemm_rate("float64", width) if request.control == "token" else 0.0,
        qr=qr_rate(min(d, 1024)),
        stream=stream_rate(d, request.chunk_tokens),
        forward=torch_gemm_rate(request.torch_dtype, 4096 if request.torch_dtype == "float32" else 2048),
        width=width,
    )


def rates_for(request: PlanRequest, host: HostRates, gpu: Rates | None = None) -> Rates:
    """The rates of a run on the request's device: all of this machine's on `cpu`; a named accelerator's
    published dense peaks for the products it runs (`ACCELERATORS`), `gpu`'s (measured) for `cuda`, with this
    machine's for the host's share (the QRs, reading and converting chunks: the engine does those on the host
    wherever its products run)."""
    shared = {"host_qr": host.qr, "stream": host.stream}
    note = f"QRs and reading at this machine's measured rates (QR at width {min(host.width, 1024)})"
    if request.device == "cpu":
        return Rates(
            host.products,
            host.grams,
            host.adds,
            host.float32,
            host.float64,
            host.forward,
            **shared,
            efficiency=CPU_ENGINE_EFFICIENCY,
            source=f"measured on this machine: NumPy (the CPU engine's library) on a chunk's pair product, Grams "
            f"and baseline-phase products {host.width} wide; torch for ingest; {note}",
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
    """This machine's rates (`measure_host`, a few seconds) for the request's device, and for `cuda` the GPU's
    free memory, with its products measured through torch too."""
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
