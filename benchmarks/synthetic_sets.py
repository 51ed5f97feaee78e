"""Synthetic float16 activation sets for the correlation benchmarks: shared latent features plus noise, written
through actdb's own ActivationWriter (imported by the benchmark scripts that sit next to this file)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from actdb.compute.correlation.engine import SetInput
from actdb.store.files.activation import ActivationHeader, ActivationWriter

SEQ_LEN = 512


def write_sets(root: Path, n_sets: int, n_layers: int, d_mlp: int, n_tokens: int) -> list[SetInput]:
    rng = np.random.default_rng(0)
    sets = []
    block = 16384
    mix = [rng.standard_normal((64, n_layers * d_mlp)).astype(np.float32) * 0.3 for _ in range(n_sets)]
    writers = [
        ActivationWriter(
            root / f"s{k}.h5", ActivationHeader(f"m{k}", 0, "bench", "mlp.post", n_layers, d_mlp, n_tokens, "float16")
        )
        for k in range(n_sets)
    ]
    sums = [np.zeros(n_layers * d_mlp) for _ in range(n_sets)]
    for start in range(0, n_tokens, block):
        n = min(block, n_tokens - start)
        latent = rng.standard_normal((n, 64)).astype(np.float32)
        for k, w in enumerate(writers):
            x = (latent @ mix[k] + rng.standard_normal((n, n_layers * d_mlp), dtype=np.float32)).astype(np.float16)
            sums[k] += x.sum(axis=0, dtype=np.float64)
            w.write_rows(start, [x[:, i * d_mlp : (i + 1) * d_mlp] for i in range(n_layers)])
    for k, w in enumerate(writers):
        w.finish()
        sets.append(SetInput(k, str(w.path), n_layers, d_mlp, sums[k] / n_tokens, rotation_key=k))
    return sets
