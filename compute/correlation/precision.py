"""Which arithmetic the correlation products use: full float32, or TF32 tensor cores on a CUDA device.

TF32 rounds each input to a 10-bit mantissa (the precision the activations were stored in as float16) and
accumulates in float32. Whether that keeps a correlation within `TOLERANCE` of float64 depends on the data, so
`auto` measures it on the run's first chunk: the fast product of two sets' shifted activations against the
same product in float64, in units of correlation (`product_error`). The choice and the measured error are
reported with the run.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np

from actdb.store.device import ArrayBackend
from actdb.store.errors import ActdbError
from actdb.store.refs import PRECISIONS

TOLERANCE = 1e-4  # largest product error, in units of correlation, that `auto` accepts for TF32
SAMPLE_ROWS = 4096  # rows of the first chunk the check multiplies (both ways: fast and float64)
SAMPLE_COLUMNS = 1024  # neurons per set in the check


@dataclass(frozen=True)
class ProductPrecision:
    """The chosen arithmetic and, when it was measured, the fast product's error in units of correlation."""

    mode: str
    error: float | None = None

    def label(self, backend: str) -> str:
        """What the run records as its backend (`backend` the array backend's name), e.g. `numpy` or `cupy+tf32`."""
        return backend if self.mode == "float32" else f"{backend}+{self.mode}"


def product_error(a: np.ndarray, b: np.ndarray, fast: Callable[[np.ndarray, np.ndarray], np.ndarray]) -> float:
    """Max |fast(a, b) - a^T b| / (|a_i| |b_j|) over the block, with the reference in float64: the error a product
    adds to a correlation of (already shifted) activations. Columns that are all zero are left out."""
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    exact = a64.T @ b64
    scale = np.outer(np.sqrt((a64 * a64).sum(axis=0)), np.sqrt((b64 * b64).sum(axis=0)))
    live = scale > 0
    if not live.any():
        return 0.0
    diff = np.abs(np.asarray(fast(a, b), dtype=np.float64) - exact)
    return float((diff[live] / scale[live]).max())


def check_precision(requested: str, backend: ArrayBackend) -> None:
    """A one-line error for a precision the backend cannot run, before anything is recorded."""
    if requested not in PRECISIONS:
        raise ActdbError(f"unknown precision {requested!r}; use {', '.join(PRECISIONS)}")
    if requested == "tf32" and backend.name != "cupy":
        raise ActdbError("--precision tf32 needs a CUDA device (--device cuda); the CPU computes in float32")


def choose_precision(requested: str, backend: ArrayBackend, sample: Callable[[], tuple] | None) -> ProductPrecision:
    """Resolve `--precision` for a backend. `sample()` returns two sets' shifted first-chunk activations (host
    float32 arrays) for the measured check; it is only called when the check runs."""
    check_precision(requested, backend)
    if backend.name != "cupy" or requested == "float32":
        return ProductPrecision("float32")
    a, b = sample() if sample is not None else (None, None)
    if a is None:
        return ProductPrecision("float32")
    a, b = a[:SAMPLE_ROWS, :SAMPLE_COLUMNS], b[:SAMPLE_ROWS, :SAMPLE_COLUMNS]
    return decide(requested, product_error(a, b, lambda x, y: backend.to_numpy(_tf32_product(backend, x, y))))


def decide(requested: str, error: float) -> ProductPrecision:
    """TF32 when asked for, or under `auto` when its measured error is within `TOLERANCE`; float32 otherwise."""
    if requested == "tf32" or (requested == "auto" and error <= TOLERANCE):
        return ProductPrecision("tf32", error)
    return ProductPrecision("float32", error)


def _tf32_product(backend: ArrayBackend, a: np.ndarray, b: np.ndarray) -> object:
    xa, xb = backend.asarray(a), backend.asarray(b)
    out = backend.xp.empty((a.shape[1], b.shape[1]), dtype=backend.xp.float32)
    with products_in(backend, "tf32"):
        backend.matmul(xa.T, xb, out=out)
    return out


@contextlib.contextmanager
def products_in(backend: ArrayBackend, mode: str) -> Iterator[None]:
    """Within the block, float32 products on a CuPy backend run in the given mode (`tf32` or `float32`)."""
    if backend.name != "cupy":
        yield
        return
    previous = _set_cublas_math(mode == "tf32")
    try:
        yield
    finally:
        _restore_cublas_math(previous)


def _set_cublas_math(tf32: bool) -> int:
    """Switch the current device's cuBLAS handle to TF32 tensor-op math (or back to default math); returns
    the previous mode. cuBLAS applies the math mode to single-precision GEMMs, which is what `cupy.matmul` on
    float32 calls."""
    from cupy.cuda import cublas, device

    handle = device.get_cublas_handle()
    previous = cublas.getMathMode(handle)
    cublas.setMathMode(handle, cublas.CUBLAS_TF32_TENSOR_OP_MATH if tf32 else cublas.CUBLAS_DEFAULT_MATH)
    return previous


def _restore_cublas_math(previous: int) -> None:
    from cupy.cuda import cublas, device

    cublas.setMathMode(device.get_cublas_handle(), previous)
