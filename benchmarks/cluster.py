"""Correlation on a local Dask cluster of 1 and 2 worker processes (one thread each) against the single-process
engine on the same data, in the same run: wall time, the ratio to the single process, the largest difference of
max-corr, and peak memory of the client and of each worker.

    .venv/bin/python benchmarks/cluster.py [--sets 3] [--layers 4] [--d-mlp 1024] [--tokens 200000] [--passes]

`--memory-budget` makes the run take several passes (the cluster then finalizes passes in parallel too).
"""

from __future__ import annotations

import argparse
import resource
import tempfile
import time
from pathlib import Path

import numpy as np
from synthetic_sets import SEQ_LEN, write_sets
from threadpoolctl import threadpool_limits

from actdb.compute.cluster import ClusterSpec, open_client
from actdb.compute.correlation.cluster import correlate_on_cluster
from actdb.compute.correlation.engine import CorrelationOptions, correlate_sets
from actdb.store.device import resolve_device


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def worker_peak_mb() -> float:
    """This process's own peak RSS (VmHWM): ru_maxrss would include the parent's peak, carried across fork+exec."""
    with open("/proc/self/status") as fh:
        return next(int(line.split()[1]) for line in fh if line.startswith("VmHWM")) / 1024


def max_diff(a, b) -> float:
    return max(float(np.nanmax(np.abs(a.matches[k].max_corr - b.matches[k].max_corr))) for k in a.matches)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sets", type=int, default=3)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--d-mlp", type=int, default=1024)
    ap.add_argument("--tokens", type=int, default=200_000)
    ap.add_argument("--memory-budget", type=float, help="bytes per task (several passes when small)")
    ap.add_argument("--dir", help="reuse/keep the data in this folder")
    args = ap.parse_args()
    root = Path(args.dir or tempfile.mkdtemp(prefix="actdb-cluster-bench-"))
    root.mkdir(parents=True, exist_ok=True)
    tokens_n = args.tokens // SEQ_LEN * SEQ_LEN
    sets = write_sets(root, args.sets, args.layers, args.d_mlp, tokens_n)
    tokens = np.zeros((tokens_n // SEQ_LEN, SEQ_LEN), dtype=np.int32)
    mask = np.ones_like(tokens, dtype=bool)
    budget = int(args.memory_budget) if args.memory_budget else None
    options = CorrelationOptions(memory_budget=budget)
    cpu = resolve_device("cpu").array
    print(f"data: {args.sets} sets x {args.layers} layers x {args.d_mlp} neurons x {tokens_n:,} tokens (float16)")

    started = time.perf_counter()
    single = correlate_sets(sets, tokens, mask, options, cpu)
    t_single = time.perf_counter() - started
    print(f"single process (2 BLAS threads): {t_single:.2f} s, {single.n_passes} pass(es), peak {peak_rss_mb():.0f} MB")
    with threadpool_limits(1):
        started = time.perf_counter()
        one_thread = correlate_sets(sets, tokens, mask, options, cpu)
        t_one = time.perf_counter() - started
    print(f"single process (1 BLAS thread):  {t_one:.2f} s, ratio {t_single / t_one:.2f} of the 2-thread run")

    for workers in (1, 2):
        with open_client(ClusterSpec(workers=workers)) as client:
            started = time.perf_counter()
            got = correlate_on_cluster(client, sets, tokens, mask, options)
            seconds = time.perf_counter() - started
            peaks = client.run(worker_peak_mb)
        print(
            f"cluster, {workers} worker(s) x 1 thread: {seconds:.2f} s = {t_single / seconds:.2f} of the single "
            f"process's speed ({t_one / seconds:.2f} of one thread's), {got.n_passes} pass(es); max |d max-corr| "
            f"{max_diff(got, one_thread):.1e} vs 1 BLAS thread, {max_diff(got, single):.1e} vs 2; worker peaks "
            f"{', '.join(f'{v:.0f}' for v in peaks.values())} MB, client peak {peak_rss_mb():.0f} MB"
        )


if __name__ == "__main__":
    main()
