"""Similarity of K sets in one pass against K(K-1)/2 separate pairwise passes, and the cost of one Hungarian
assignment at GPT-2-small layer width.

    .venv/bin/python benchmarks/similarity.py [--sets 6] [--layers 2] [--d-mlp 512] [--tokens 25000]

Prints both timings, their ratio, the peak RSS, and the assignment's time next to the pass.
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
from scipy.optimize import linear_sum_assignment
from synthetic_sets import SEQ_LEN, write_sets

from actdb.compute.correlation.engine import CorrelationOptions, correlate_sets
from actdb.store.device import resolve_device


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sets", type=int, default=6)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--d-mlp", type=int, default=512)
    ap.add_argument("--tokens", type=int, default=25_000)
    ap.add_argument("--draws", type=int, default=1)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    backend = resolve_device(args.device).array
    root = Path(tempfile.mkdtemp(prefix="actdb-sim-"))
    with ProcessPoolExecutor(1) as pool:
        sets = pool.submit(write_sets, root, args.sets, args.layers, args.d_mlp, args.tokens).result()
    tokens = np.zeros((args.tokens // SEQ_LEN, SEQ_LEN), dtype=np.int32)
    mask = np.ones_like(tokens, dtype=bool)
    options = CorrelationOptions(layer_similarity=True, baseline_draws=args.draws)
    t0 = time.perf_counter()
    together = correlate_sets(sets, tokens, mask, options, backend)
    one_pass = time.perf_counter() - t0
    t0 = time.perf_counter()
    for a, b in combinations(sets, 2):
        correlate_sets([a, b], tokens, mask, options, backend)
    pairwise = time.perf_counter() - t0
    n_pairs = args.sets * (args.sets - 1) // 2
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(
        f"{args.sets} sets x {args.layers} x {args.d_mlp} neurons x {args.tokens} tokens: one pass {one_pass:.1f}s "
        f"(phases {', '.join(f'{k} {v:.1f}s' for k, v in together.seconds.items())}), {n_pairs} pairwise passes "
        f"{pairwise:.1f}s: {pairwise / one_pass:.2f}x; peak RSS {rss:.0f} MB"
    )
    rng = np.random.default_rng(0)
    block = np.tanh(rng.standard_normal((3072, 3072)) * 0.3)  # a correlation-like block at GPT-2-small width
    t0 = time.perf_counter()
    linear_sum_assignment(block, maximize=True)
    print(f"one Hungarian assignment at 3072 x 3072: {time.perf_counter() - t0:.2f}s")


if __name__ == "__main__":
    main()
