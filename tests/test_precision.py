"""The products' precision check: its error measure against float64, the TF32 decision, and refusals."""

from __future__ import annotations

import numpy as np
import pytest

from actdb.compute.correlation.precision import TOLERANCE, check_precision, choose_precision, decide, product_error
from actdb.store.device import NUMPY
from actdb.store.errors import ActdbError


def keep_mantissa(x: np.ndarray, bits: int) -> np.ndarray:
    """Round float32 values to `bits` mantissa bits (TF32 keeps 10, bfloat16 7): what tensor cores see."""
    u = x.astype(np.float32).view(np.uint32).astype(np.uint64)
    drop = 23 - bits
    u = ((u + (1 << (drop - 1))) >> drop) << drop
    return u.astype(np.uint32).view(np.float32)


@pytest.fixture(scope="module")
def shifted_pair() -> tuple[np.ndarray, np.ndarray]:
    """Two sets' activations sharing latent features, stored as float16 and shifted by their means."""
    rng = np.random.default_rng(0)
    latent = rng.standard_normal((4096, 16))
    a = (latent @ rng.standard_normal((16, 256)) + rng.standard_normal((4096, 256))).astype(np.float16)
    b = (latent @ rng.standard_normal((16, 256)) + rng.standard_normal((4096, 256))).astype(np.float16)
    a, b = a.astype(np.float32), b.astype(np.float32)
    return a - a.mean(axis=0), b - b.mean(axis=0)


def test_product_error_is_the_correlation_error_against_float64(shifted_pair):
    a, b = shifted_pair
    assert product_error(a, b, lambda x, y: x.astype(np.float64).T @ y.astype(np.float64)) == 0.0
    assert product_error(a, b, lambda x, y: x.T @ y) < 1e-6  # float32 products summed in float32
    # the measure is in units of correlation: a product off by 1e-3 * |a_i| |b_j| reads as 1e-3
    norms = np.outer(np.linalg.norm(a.astype(np.float64), axis=0), np.linalg.norm(b.astype(np.float64), axis=0))
    off = product_error(a, b, lambda x, y: x.astype(np.float64).T @ y.astype(np.float64) + 1e-3 * norms)
    assert off == pytest.approx(1e-3, rel=1e-9)


def test_auto_takes_tf32_rounding_and_refuses_coarser_inputs(shifted_pair):
    a, b = shifted_pair
    tf32 = product_error(a, b, lambda x, y: keep_mantissa(x, 10).T @ keep_mantissa(y, 10))
    bf16 = product_error(a, b, lambda x, y: keep_mantissa(x, 7).T @ keep_mantissa(y, 7))
    assert tf32 < TOLERANCE < bf16
    assert decide("auto", tf32).mode == "tf32"
    assert decide("auto", bf16).mode == "float32"
    assert decide("tf32", bf16).mode == "tf32"  # asked for explicitly: used, with its error reported
    assert decide("float32", 0.0).mode == "float32"
    assert decide("auto", tf32).label("numpy") == "numpy+tf32"


def test_the_cpu_computes_in_float32():
    assert choose_precision("auto", NUMPY, None).mode == "float32"
    assert choose_precision("float32", NUMPY, None).label("numpy") == "numpy"
    with pytest.raises(ActdbError, match="needs a CUDA device"):
        check_precision("tf32", NUMPY)
    with pytest.raises(ActdbError, match="unknown precision"):
        check_precision("half", NUMPY)
