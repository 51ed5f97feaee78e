"""Random rotation baseline (Gurnee et al. 2024): a seeded, truly orthogonal rotation of a layer's neurons."""

from __future__ import annotations

import numpy as np


def random_rotation(d: int, seed: int, key: int, layer: int) -> np.ndarray:
    """Haar-distributed orthogonal `(d, d)` matrix: QR of a Gaussian with the signs of R's diagonal fixed.

    Seeded by (run seed, key, layer); the key is the model, so a model's rotation is reproducible everywhere.
    """
    rng = np.random.default_rng([seed, key, layer])
    q, r = np.linalg.qr(rng.standard_normal((d, d)))
    return q * np.sign(np.diag(r))
