"""actdb's correlation engine against the research method, side by side in one process on the same activations.

The research method, written from its published description (Gurnee et al. 2024): activations of both models
already in memory as float32; one job per pair of models; per batch float32 products summed in float64 for
the correlation, then a second full pass over the data with one model's neurons rotated (a random rotation
per layer, each model rotated once up front) for the baseline, in both directions. actdb reads float16 HDF5
files, streams every pair at once, and derives the baseline from the moments (one rotation draw here, as the
research method uses one).

    .venv/bin/python benchmarks/versus_research.py [--layers 2] [--d-mlp 512] [--tokens 24576]

Prints, for one pair and for 4 models (all pairs, both directions), both times, the ratio, and each one's
share of a bare float32 GEMM doing the same products; then the same at 4x the tokens.
"""

from __future__ import annotations

import argparse
import resource
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from itertools import combinations
from pathlib import Path

import numpy as np
from synthetic_sets import SEQ_LEN, write_sets

from actdb.compute.correlation.baseline import random_rotation
from actdb.compute.correlation.engine import CorrelationOptions, correlate_sets
from actdb.store.device import resolve_device
from actdb.store.files.activation import ActivationReader

BATCH = 8192


def _corr_max(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """One pass over the batches: float32 products into float64 sums; both directions' max |r| rows."""
    n = a.shape[0]
    ab = np.zeros((a.shape[1], b.shape[1]))
    sa, sb = np.zeros(a.shape[1]), np.zeros(b.shape[1])
    qa, qb = np.zeros(a.shape[1]), np.zeros(b.shape[1])
    for s in range(0, n, BATCH):
        xa, xb = a[s : s + BATCH], b[s : s + BATCH]
        ab += xa.T @ xb
        sa += xa.sum(axis=0, dtype=np.float64)
        sb += xb.sum(axis=0, dtype=np.float64)
        qa += (xa * xa).sum(axis=0, dtype=np.float64)
        qb += (xb * xb).sum(axis=0, dtype=np.float64)
    cov = ab / n - np.outer(sa / n, sb / n)
    sd_a = np.sqrt(np.maximum(qa / n - (sa / n) ** 2, 1e-12))
    sd_b = np.sqrt(np.maximum(qb / n - (sb / n) ** 2, 1e-12))
    r = cov / np.outer(sd_a, sd_b)
    return r.max(axis=1), r.max(axis=0)


def research_method(data: list[np.ndarray], layers: int, d: int) -> float:
    """Every pair: a correlation pass, then a baseline pass over rotated data in both directions."""
    rotations = [
        [random_rotation(d, 0, k, layer).astype(np.float32) for layer in range(layers)] for k in range(len(data))
    ]

    def rotated(k: int) -> np.ndarray:
        x = data[k]
        return np.concatenate([x[:, i * d : (i + 1) * d] @ rotations[k][i] for i in range(layers)], axis=1)

    t0 = time.perf_counter()
    for i, j in combinations(range(len(data)), 2):
        _corr_max(data[i], data[j])
        _corr_max(data[i], rotated(j))
        _corr_max(rotated(i), data[j])
    return time.perf_counter() - t0


def bare_gemm(n_sets: int, neurons: int, tokens: int, pairs_products: int) -> float:
    """A float32 GEMM doing the pair products the engine needs (one per unordered pair) plus the Grams."""
    rng = np.random.default_rng(1)
    a = rng.standard_normal((BATCH, neurons), dtype=np.float32)
    b = rng.standard_normal((BATCH, neurons), dtype=np.float32)
    reps = max(1, tokens // BATCH)
    t0 = time.perf_counter()
    for _ in range(reps):
        for _ in range(pairs_products):
            a.T @ b
    return (time.perf_counter() - t0) * tokens / (reps * BATCH)


def compare(n_sets: int, layers: int, d: int, tokens: int) -> None:
    root = Path(tempfile.mkdtemp(prefix="actdb-vs-"))
    with ProcessPoolExecutor(1) as pool:
        sets = pool.submit(write_sets, root, n_sets, layers, d, tokens).result()
    ids = np.zeros((tokens // SEQ_LEN, SEQ_LEN), dtype=np.int32)
    mask = np.ones_like(ids, dtype=bool)
    data = []
    for s in sets:
        with ActivationReader(s.path) as r:
            data.append(np.concatenate(r.read_rows(0, tokens), axis=1).astype(np.float32))
    backend = resolve_device("cpu").array
    correlate_sets(sets, ids, mask, CorrelationOptions(baseline_draws=1), backend)  # warm the page cache
    t0 = time.perf_counter()
    result = correlate_sets(sets, ids, mask, CorrelationOptions(baseline_draws=1), backend)
    ours = time.perf_counter() - t0
    theirs = research_method(data, layers, d)
    pairs = n_sets * (n_sets - 1) // 2
    gemm = bare_gemm(n_sets, layers * d, tokens, pairs)
    print(
        f"{n_sets} sets x {layers} x {d} neurons x {tokens} tokens: actdb {ours:.2f}s ({gemm / ours:.2f} of a bare "
        f"GEMM of its {pairs} pair product(s); phases "
        f"{', '.join(f'{k} {v:.2f}s' for k, v in result.seconds.items())}), research method {theirs:.2f}s "
        f"({3 * gemm / theirs:.2f} of a bare GEMM of its {3 * pairs} products): actdb {theirs / ours:.2f}x faster; "
        f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB"
    )


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--d-mlp", type=int, default=512)
    ap.add_argument("--tokens", type=int, default=24_576)
    args = ap.parse_args()
    for tokens in (args.tokens, 4 * args.tokens):
        for n_sets in (2, 4):
            compare(n_sets, args.layers, args.d_mlp, tokens)


if __name__ == "__main__":
    main()
