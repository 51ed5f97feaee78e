"""Every pairwise trajectory matrix (win rate, top-1 disagreement, ensemble gain) of K checkpoints from stored
predictions, against the direct per-pair computation over whole arrays, at the demo's size and at 25 checkpoints
x 1M tokens of synthetic losses.

    .venv/bin/python benchmarks/trajectories.py [--checkpoints 25] [--tokens 1000000] [--sizes 5,10,25]

Prints, per size: reading the K prediction files, `pair_matrices` (blocked, all ordered pairs), the direct
baseline (each unordered pair on whole arrays, in the same run) and their ratio, and the peak memory that
`pair_matrices` allocates beyond its inputs (tracemalloc: NumPy reports its buffers to it) — which should not grow
with the number of pairs.
"""

from __future__ import annotations

import argparse
import resource
import tempfile
import time
import tracemalloc
from itertools import combinations
from pathlib import Path

import numpy as np

from actdb.compute.trajectories.math import pair_matrices
from actdb.store.files.identity import SidecarIdentity
from actdb.store.files.prediction import Predictions, read_predictions, write_predictions


def synthetic(k: int, n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Losses of K checkpoints that share most of their per-token difficulty (as trained seeds do), NaN on the
    ~3% of targets a dataset mask drops; top-1 ids agreeing where the shared part dominates."""
    rng = np.random.default_rng(seed)
    difficulty = rng.gamma(2.0, 1.5, n)
    losses = (difficulty + rng.normal(0, 0.6, (k, n))).clip(0.01).astype(np.float32)
    losses[:, rng.random(n) < 0.03] = np.nan
    top1 = np.where(rng.random((k, n)) < 0.7, (difficulty * 10).astype(np.int32), rng.integers(0, 500, (k, n)))
    return losses, top1.astype(np.int32)


def direct(losses: np.ndarray, top1: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The definitions per unordered pair on whole arrays (what one writes without blocking)."""
    k = len(losses)
    win, dis, gain = np.full((k, k), 0.5), np.zeros((k, k)), np.zeros((k, k))
    for a, b in combinations(range(k), 2):
        c = np.isfinite(losses[a]) & np.isfinite(losses[b])
        la, lb = losses[a, c].astype(np.float64), losses[b, c].astype(np.float64)
        win[a, b] = np.mean((la < lb) + 0.5 * (la == lb))
        win[b, a] = 1 - win[a, b]
        dis[a, b] = dis[b, a] = np.mean(top1[a, c] != top1[b, c])
        gain[a, b] = gain[b, a] = np.mean((la + lb) / 2) - np.mean(-np.logaddexp(-la, -lb) + np.log(2))
    return win, dis, gain


def measure(k: int, n: int, root: Path, baseline: bool) -> None:
    losses, top1 = synthetic(k, n)
    paths = []
    for i in range(k):
        paths.append(root / f"c{k}-{i}.predictions.h5")
        identity = SidecarIdentity(model=f"c{k}", step=i, dataset_fingerprint="synthetic")
        write_predictions(paths[-1], Predictions(top1[i], losses[i]), identity)
    del losses, top1
    t0 = time.perf_counter()
    preds = [read_predictions(p) for p in paths]
    losses = np.stack([p.loss for p in preds])
    top1 = np.stack([p.top1 for p in preds])
    del preds
    read = time.perf_counter() - t0
    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    t0, c0 = time.perf_counter(), time.process_time()
    m = pair_matrices(losses, top1)
    blocked, blocked_cpu = time.perf_counter() - t0, time.process_time() - c0
    extra = (tracemalloc.get_traced_memory()[1] - base) / 2**20
    tracemalloc.stop()
    inputs = (losses.nbytes + top1.nbytes) / 2**20
    line = (
        f"K={k} x {n:,} tokens ({k * k} ordered pairs): read {read:.2f}s, pair_matrices {blocked:.2f}s "
        f"(CPU {blocked_cpu:.2f}s), "
        f"inputs {inputs:.0f} MiB, peak beyond inputs {extra:.0f} MiB"
    )
    if baseline:
        t0, c0 = time.perf_counter(), time.process_time()
        win, dis, gain = direct(losses, top1)
        slow, slow_cpu = time.perf_counter() - t0, time.process_time() - c0
        agree = max(
            np.abs(win - m.win_rate).max(), np.abs(dis - m.disagreement).max(), np.abs(gain - m.ensemble_gain).max()
        )
        line += (
            f"; direct per pair {slow:.2f}s (CPU {slow_cpu:.2f}s): {slow / blocked:.2f}x wall, "
            f"{slow_cpu / blocked_cpu:.2f}x CPU; max |difference| {agree:.1e}"
        )
    print(line, flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=1_000_000)
    ap.add_argument("--sizes", default="5,10,25", help="numbers of checkpoints at --tokens")
    ap.add_argument("--demo", default="12x24576", help="the demo's checkpoints x tokens (4 seeds x 3 steps)")
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="actdb-traj-"))
    k, n = (int(x) for x in args.demo.split("x"))
    measure(k, n, root, baseline=True)
    sizes = [int(s) for s in args.sizes.split(",")]
    for k in sizes:
        measure(k, args.tokens, root, baseline=k == max(sizes))
    print(f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB")


if __name__ == "__main__":
    main()
