"""Correlation engine throughput against a bare GEMM of the same shapes, read throughput, peak RSS, and the
naive way (np.corrcoef on concatenated arrays) for comparison.

    .venv/bin/python benchmarks/correlate.py [--sets 3] [--layers 4] [--d-mlp 1024] [--tokens 200000]

Writes synthetic float16 activation sets to disk (shared latent features + noise), correlates them with the
NumPy backend (or CuPy with --device cuda) and prints one line per measurement.
"""

from __future__ import annotations

import argparse
import resource
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from synthetic_sets import SEQ_LEN, write_sets

from actdb.compute.correlation.engine import CorrelationOptions, correlate_sets
from actdb.store.device import resolve_device


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sets", type=int, default=3)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--d-mlp", type=int, default=1024)
    ap.add_argument("--tokens", type=int, default=200_000)
    ap.add_argument("--naive-tokens", type=int, default=20_000, help="tokens for the np.corrcoef comparison")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dir", help="reuse/keep the data in this folder")
    ap.add_argument("--baseline-draws", type=int, default=8, help="rotation draws of the engine run")
    ap.add_argument("--compare-draws", type=int, help="also run the engine with this many draws and compare times")
    ap.add_argument("--skip-naive", action="store_true", help="skip the np.corrcoef comparison")
    args = ap.parse_args()
    backend = resolve_device(args.device).array
    root = Path(args.dir or tempfile.mkdtemp(prefix="actdb-bench-"))
    root.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    with ProcessPoolExecutor(1) as pool:  # a child writes the files, so peak RSS below is the engine's own
        sets = pool.submit(write_sets, root, args.sets, args.layers, args.d_mlp, args.tokens).result()
    n_neurons = args.layers * args.d_mlp
    gb = args.sets * n_neurons * args.tokens * 2 / 1e9
    print(
        f"wrote {args.sets} sets x {n_neurons} neurons x {args.tokens} tokens ({gb:.2f} GB) "
        f"in {time.perf_counter() - t0:.1f}s"
    )
    n_seq = args.tokens // SEQ_LEN
    tokens = np.zeros((n_seq, SEQ_LEN), dtype=np.int32)
    mask = np.ones_like(tokens, dtype=bool)
    if args.compare_draws is not None:  # first, so that both runs find the files equally warm in the page cache
        t0 = time.perf_counter()
        other = correlate_sets(sets, tokens, mask, CorrelationOptions(baseline_draws=args.compare_draws), backend)
        other_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    result = correlate_sets(sets, tokens, mask, CorrelationOptions(baseline_draws=args.baseline_draws), backend)
    engine_s = time.perf_counter() - t0
    engine_rss = peak_rss_mb()
    if args.compare_draws is not None:
        extra = result.seconds["baseline"] - other.seconds["baseline"]
        print(
            f"baseline draws: {args.baseline_draws} draws {engine_s:.1f}s, {args.compare_draws} draw(s) "
            f"{other_s:.1f}s: {100 * (engine_s - other_s) / other_s:+.1f}% wall; the baseline phase took "
            f"{result.seconds['baseline']:.1f}s vs {other.seconds['baseline']:.1f}s, i.e. the extra draws cost "
            f"{100 * extra / other_s:.1f}% of the {args.compare_draws}-draw run"
        )
    print("phases: " + ", ".join(f"{k} {v:.1f}s" for k, v in result.seconds.items()))
    n = result.n_tokens
    pairs = args.sets * (args.sets - 1) // 2
    flops = pairs * n_neurons * n_neurons * n * 2 + args.sets * args.layers * args.d_mlp**2 * n * 2
    engine_gflops = flops / engine_s / 1e9
    xp = backend.xp
    # the engine's own GEMMs per 8192-token chunk: one (N x T) @ (T x N) per pair, one Gram per set and layer
    a = xp.asarray(np.random.default_rng(1).standard_normal((8192, n_neurons), dtype=np.float32))
    b = xp.asarray(np.random.default_rng(2).standard_normal((8192, n_neurons), dtype=np.float32))
    g = xp.asarray(a[:, : args.d_mlp])
    t0 = time.perf_counter()
    reps = max(1, n // 8192)
    for _ in range(reps):
        for _ in range(pairs):
            c = a.T @ b
        for _ in range(args.sets * args.layers):
            c = g.T @ g
    if backend.name == "cupy":
        xp.cuda.Stream.null.synchronize()
    del c
    gemm_s = (time.perf_counter() - t0) * n / (reps * 8192)
    gemm_gflops = flops / gemm_s / 1e9
    print(
        f"engine: {engine_s:.1f}s, {engine_gflops:.0f} GFLOP/s on {backend.name}, {result.n_passes} pass(es), "
        f"{gb * result.n_passes / engine_s:.2f} GB/s of activations streamed"
    )
    print(f"bare GEMM of the same shapes: {gemm_s:.1f}s, {gemm_gflops:.0f} GFLOP/s")
    print(f"ratio engine / bare GEMM: {engine_gflops / gemm_gflops:.2f}")
    print(f"peak RSS of the engine process after the engine ran: {engine_rss:.0f} MB")
    if args.skip_naive:
        return
    m = min(args.naive_tokens, args.tokens)
    from actdb.store.files.activation import ActivationReader

    data = []
    for s in sets:
        with ActivationReader(s.path) as r:
            data.append(np.concatenate(r.read_rows(0, m), axis=1).astype(np.float64))
    t0 = time.perf_counter()
    full = np.corrcoef(np.concatenate(data, axis=1).T)
    naive_s = time.perf_counter() - t0
    print(
        f"naive np.corrcoef on {m} tokens: {naive_s:.1f}s ({full.nbytes / 1e9:.1f} GB matrix), "
        f"extrapolated to {n} tokens: {naive_s * n / m:.0f}s and {args.sets * n_neurons * n * 8 / 1e9:.1f} GB "
        "of float64 input"
    )


if __name__ == "__main__":
    main()
