"""Random rotation baseline (Gurnee et al. 2024): seeded, truly orthogonal rotations of a layer's neurons.

Draw k of model m's layer l is `R_{m,l} P_k`: `R_{m,l}` is the Haar rotation a single-draw run uses (seeded by
run seed, model and layer), `P_k` a Haar rotation shared by every model and layer of that width (`P_0 = I`).
Given `P_k`, the products are independent Haar rotations across models and layers, and given `R_{m,l}` they
are independent across draws, so K draws cost K - 1 extra QR decompositions per width instead of one per
model, layer and draw.
"""

from __future__ import annotations

from functools import cache

import numpy as np
import scipy.linalg
from threadpoolctl import ThreadpoolController

DRAW_STREAM = 0x5EED_D4A3  # keeps the draw rotations' random stream apart from the per-model ones
EXTRA_STREAM = 0x5EED_E7A4  # the adaptive draws' rotations: a stream of their own, apart from both


@cache
def _blas() -> ThreadpoolController:
    """The process's BLAS libraries, found once (finding them takes tens of ms)."""
    return ThreadpoolController()


def _haar(rng: np.random.Generator, d: int) -> np.ndarray:
    """Haar-distributed orthogonal `(d, d)` matrix: QR of a Gaussian with the signs of R's diagonal fixed.

    The QR runs on one BLAS thread: LAPACK's blocked QR of a few-thousand-wide matrix gains little from threads,
    and on a busy machine OpenBLAS's spinning threads made a 512-wide QR cost 1.1 CPU-s instead of 0.036."""
    x = rng.standard_normal((d, d))
    with _blas().limit(limits=1, user_api="blas"):
        q, r = np.linalg.qr(x)
    return q * np.sign(np.diag(r))


def random_rotation(d: int, seed: int, key: int, layer: int) -> np.ndarray:
    """The rotation of a model's layer seeded by (run seed, key, layer); the key is the model, so a model's
    rotation is reproducible everywhere and every checkpoint of a model is rotated the same way."""
    return _haar(np.random.default_rng([seed, key, layer]), d)


def draw_rotation(d: int, seed: int, draw: int) -> np.ndarray:
    """`P_k`, the rotation that turns every model's draw-0 rotation into its draw-k rotation."""
    if draw == 0:
        return np.eye(d)
    return _haar(np.random.default_rng([seed, DRAW_STREAM, d, draw]), d)


def extra_rotation(d: int, seed: int, index: int) -> np.ndarray:
    """`E_j`, float32, the Haar rotation of an adaptive draw (`adaptive`): a QR in float32 of a float32 Gaussian
    from a stream of its own, so that it is independent of every `R_{m,l}` and `P_k`. Float32 halves the QR
    (8 against 19 ms at d = 512 on one core); `E_j` is orthogonal to ~1e-6, which moves a rotated correlation by
    about as much, far below a draw's spread (~0.02)."""
    x = np.random.default_rng([seed, EXTRA_STREAM, d, index]).standard_normal((d, d), dtype=np.float32)
    with _blas().limit(limits=1, user_api="blas"):
        q, r = scipy.linalg.qr(x, mode="economic", overwrite_a=True, check_finite=False)
    return np.ascontiguousarray(q * np.sign(np.diag(r)))


def rotation(d: int, seed: int, key: int, layer: int, draw: int = 0) -> np.ndarray:
    """Draw `draw` of the rotation of model `key`'s layer: `R_{key,layer} P_draw`."""
    base = random_rotation(d, seed, key, layer)
    return base if draw == 0 else base @ draw_rotation(d, seed, draw)
