"""GPU check (≤ 5 minutes on one GPU): CuPy correlation results equal the NumPy ones to 1e-4, and the CuPy
engine's throughput as a ratio to a bare CuPy GEMM of the same shapes.

    python benchmarks/gpu_check.py [--sets 3] [--layers 4] [--d-mlp 1024] [--tokens 100000]

Needs CuPy (`pip install -e ".[gpu]"`); without a usable CUDA device it says so and exits 2. Record the
printed lines in benchmarks/RESULTS.md with the GPU they came from.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from synthetic_sets import SEQ_LEN, write_sets

from actdb.compute.correlation.engine import CorrelationOptions, correlate_sets
from actdb.store.device import cupy_usable, resolve_device


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sets", type=int, default=3)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--d-mlp", type=int, default=1024)
    ap.add_argument("--tokens", type=int, default=100_000)
    args = ap.parse_args()
    if not cupy_usable():
        print("no usable CUDA device for CuPy; nothing to check")
        sys.exit(2)
    root = Path(tempfile.mkdtemp(prefix="actdb-gpu-check-"))
    sets = write_sets(root, args.sets, args.layers, args.d_mlp, args.tokens)
    tokens = np.zeros((args.tokens // SEQ_LEN, SEQ_LEN), dtype=np.int32)
    tokens[:] = np.arange(tokens.size).reshape(tokens.shape) % 97  # token ids for the token control
    mask = np.ones_like(tokens, dtype=bool)
    worst = 0.0
    for control in ("none", "token"):
        opts = CorrelationOptions(control=control, topk=3)
        t0 = time.perf_counter()
        gpu = correlate_sets(sets, tokens, mask, opts, resolve_device("cuda").array)
        gpu_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        cpu = correlate_sets(sets, tokens, mask, opts, resolve_device("cpu").array)
        cpu_s = time.perf_counter() - t0
        for key, m in cpu.matches.items():
            g = gpu.matches[key]
            for a, b in ((m.max_corr, g.max_corr), (m.baseline, g.baseline), (m.topk_val, g.topk_val)):
                worst = max(worst, float(np.nanmax(np.abs(a - b))))
        print(f"control {control}: cupy {gpu_s:.1f}s, numpy {cpu_s:.1f}s, max |difference| so far {worst:.2e}")
    import cupy

    n = gpu.n_tokens
    n_neurons = args.layers * args.d_mlp
    pairs = args.sets * (args.sets - 1) // 2
    flops = pairs * n_neurons * n_neurons * n * 2 + args.sets * args.layers * args.d_mlp**2 * n * 2
    t0 = time.perf_counter()
    correlate_sets(sets, tokens, mask, CorrelationOptions(), resolve_device("cuda").array)
    engine_s = time.perf_counter() - t0
    a = cupy.random.standard_normal((8192, n_neurons), dtype=cupy.float32)
    g = cupy.ascontiguousarray(a[:, : args.d_mlp])
    reps = max(1, n // 8192)
    cupy.cuda.Stream.null.synchronize()
    t0 = time.perf_counter()
    for _ in range(reps):
        for _ in range(pairs):
            c = a.T @ a
        for _ in range(args.sets * args.layers):
            c = g.T @ g
    cupy.cuda.Stream.null.synchronize()
    del c
    gemm_s = (time.perf_counter() - t0) * n / (reps * 8192)
    print(
        f"engine {flops / engine_s / 1e9:.0f} GFLOP/s, bare CuPy GEMM {flops / gemm_s / 1e9:.0f} GFLOP/s, "
        f"ratio {gemm_s / engine_s:.2f}"
    )
    print(f"agreement with NumPy: max |difference| {worst:.2e} -> {'OK' if worst <= 1e-4 else 'FAILED'} (<= 1e-4)")
    sys.exit(0 if worst <= 1e-4 else 1)


if __name__ == "__main__":
    main()
