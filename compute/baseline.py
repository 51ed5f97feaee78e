"""Random rotation baseline (Gurnee et al. 2024): a seeded, truly orthogonal rotation of a layer's neurons."""

from __future__ import annotations

import numpy as np


def random_rotation(d: int, seed: int, key: int, layer: int, draw: int = 0) -> np.ndarray:
    """Haar-distributed orthogonal `(d, d)` matrix: QR of a Gaussian with the signs of R's diagonal fixed.

    Seeded by (run seed, key, layer, draw); the key is the model, so a model's rotations are reproducible
    everywhere. Draw 0 keeps the seeding of single-draw runs, so K = 1 reproduces them exactly.
    """
    rng = np.random.default_rng([seed, key, layer] if draw == 0 else [seed, key, layer, draw])
    q, r = np.linalg.qr(rng.standard_normal((d, d)))
    return q * np.sign(np.diag(r))
