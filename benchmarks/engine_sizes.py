"""The correlation engine against a bare float32 GEMM doing the same products, at several sizes, in one run.

    .venv/bin/python benchmarks/engine_sizes.py [--sizes 2x2x512x25000,2x4x1024x25000,4x4x1024x50000] [--dir D]

A size is SETSxLAYERSxD_MLPxTOKENS. For each: synthetic float16 sets are written to disk (by a child process, so
the peak RSS printed is the engine's), the engine correlates them with 1 and with 8 baseline draws (reading and
converting the files included), and the bare GEMM runs the engine's products on random float32 data already in
memory: one `(N x T) @ (T x N)` per pair and one Gram per set and layer, per 8192-token chunk, through torch
(MKL, what the engine uses on the CPU) and through NumPy (OpenBLAS, which turns a Gram into a half-cost SYRK);
the faster is the baseline. Prints one line per size: times, the ratios (bare GEMM / engine: 1.0 is the
machine's limit), the engine's phases and peak RSS.
"""

from __future__ import annotations

import argparse
import pickle
import resource
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch
from synthetic_sets import SEQ_LEN, write_sets

from actdb.compute.correlation.engine import CorrelationOptions, correlate_sets
from actdb.store.device import resolve_device

CHUNK = 8192


def bare_gemm(n_sets: int, layers: int, d: int, tokens: int) -> tuple[float, float]:
    """Seconds of the engine's products on in-memory float32 data: (torch, numpy)."""
    n = layers * d
    rng = np.random.default_rng(1)
    a = rng.standard_normal((CHUNK, n), dtype=np.float32)
    b = rng.standard_normal((CHUNK, n), dtype=np.float32)
    pair_out = np.empty((n, n), dtype=np.float32)
    gram_out = np.empty((d, d), dtype=np.float32)
    pairs = n_sets * (n_sets - 1) // 2
    reps = max(1, round(tokens / CHUNK))
    ta, tb, tp, tg = (torch.from_numpy(x) for x in (a, b, pair_out, gram_out))
    times = []
    for use_torch in (True, False):
        t0 = time.perf_counter()
        for _ in range(reps):
            for _ in range(pairs):
                if use_torch:
                    torch.matmul(ta.T, tb, out=tp)
                else:
                    np.matmul(a.T, b, out=pair_out)
            for s in range(n_sets * layers):
                cols = slice((s % layers) * d, (s % layers + 1) * d)
                if use_torch:
                    torch.matmul(ta[:, cols].T, ta[:, cols], out=tg)
                else:
                    np.matmul(a[:, cols].T, a[:, cols], out=gram_out)
        times.append((time.perf_counter() - t0) * tokens / (reps * CHUNK))
    return times[0], times[1]


def measure(size: str, root: Path) -> None:
    n_sets, layers, d, tokens = (int(v) for v in size.lower().split("x"))
    tokens -= tokens % SEQ_LEN
    folder = root / size
    listing = folder / "sets.pkl"
    if not listing.exists():
        folder.mkdir(parents=True, exist_ok=True)
        with ProcessPoolExecutor(1) as pool:
            sets = pool.submit(write_sets, folder, n_sets, layers, d, tokens).result()
        listing.write_bytes(pickle.dumps(sets))
    sets = pickle.loads(listing.read_bytes())
    ids = np.zeros((tokens // SEQ_LEN, SEQ_LEN), dtype=np.int32)
    mask = np.ones_like(ids, dtype=bool)
    backend = resolve_device("cpu").array
    correlate_sets(sets, ids, mask, CorrelationOptions(baseline_draws=1), backend)  # warm the page cache
    runs = {}
    for draws in (1, 8):
        t0 = time.perf_counter()
        result = correlate_sets(sets, ids, mask, CorrelationOptions(baseline_draws=draws), backend)
        runs[draws] = (time.perf_counter() - t0, result.seconds)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    torch_s, numpy_s = bare_gemm(n_sets, layers, d, tokens)
    bare = min(torch_s, numpy_s)
    one, eight = runs[1], runs[8]
    print(
        f"{n_sets} sets x {layers * d} neurons ({layers} x {d}) x {tokens} tokens: bare GEMM {bare:.2f}s "
        f"(torch {torch_s:.2f}s, numpy {numpy_s:.2f}s); engine 1 draw {one[0]:.2f}s = {bare / one[0]:.2f} of bare "
        f"(accumulate {one[1]['accumulate']:.2f}s = {bare / one[1]['accumulate']:.2f}), 8 draws {eight[0]:.2f}s = "
        f"{bare / eight[0]:.2f} of bare; phases (8 draws) "
        + ", ".join(f"{k} {v:.2f}s" for k, v in eight[1].items())
        + f"; peak RSS {rss:.0f} MB",
        flush=True,
    )


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="2x2x512x25000,2x4x1024x25000,4x4x1024x50000,4x4x1024x200000")
    ap.add_argument("--dir", help="keep (and reuse) the synthetic sets in this folder")
    args = ap.parse_args()
    root = Path(args.dir or tempfile.mkdtemp(prefix="actdb-sizes-"))
    print(f"torch {torch.__version__} with {torch.get_num_threads()} threads; data in {root}", flush=True)
    for size in args.sizes.split(","):
        measure(size, root)


if __name__ == "__main__":
    main()
