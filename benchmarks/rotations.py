"""What a Haar rotation of the baseline costs computed (a QR) and read back from the rotation cache, on one core.

    .venv/bin/python benchmarks/rotations.py [--d-mlp 3072] [--rotations 2] [--repeats 3] [--dir DIR]

Computes `--rotations` draw-0 rotations of width `--d-mlp` (`rotation_cache.base_key(...).compute()`: a Gaussian
matrix, LAPACK's QR, the sign fix, float32), writes them to a rotation cache, and reads them back (header check,
SHA-256 of the bytes) `--repeats` times from the page cache. Pinned to one core with one BLAS thread; times are
CPU seconds of this process (the machine this was written on is shared and busy; wall seconds in brackets). The
ratio is what a run saves per rotation once the cache holds it; the last lines scale the measured costs to a
study of `--models` models of `--layers` layers with `--draws` baseline draws.
"""

from __future__ import annotations

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # one core: before NumPy loads its BLAS
os.environ.setdefault("OMP_NUM_THREADS", "1")

import argparse
import resource
import tempfile
import time
from pathlib import Path

from actdb.compute.correlation.rotation_cache import base_key, read_cached, write_cached


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--d-mlp", type=int, default=3072)
    ap.add_argument("--rotations", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dir", help="the cache folder (a temporary one by default)")
    ap.add_argument("--cpu", type=int, default=0, help="the core to pin to")
    ap.add_argument("--models", type=int, default=5, help="for the study-scale estimate")
    ap.add_argument("--layers", type=int, default=12, help="for the study-scale estimate")
    ap.add_argument("--draws", type=int, default=8, help="for the study-scale estimate")
    args = ap.parse_args()
    os.sched_setaffinity(0, {args.cpu})
    folder = Path(args.dir or tempfile.mkdtemp(prefix="actdb-rotations-"))
    keys = [base_key(args.d_mlp, 0, 1, layer) for layer in range(args.rotations)]
    compute = write = read = 0.0
    compute_wall = read_wall = 0.0
    for key in keys:
        c0, w0 = time.process_time(), time.perf_counter()
        data = key.compute()
        compute += time.process_time() - c0
        compute_wall += time.perf_counter() - w0
        c0 = time.process_time()
        write_cached(folder / key.file_name, key, data)
        write += time.process_time() - c0
    best = float("inf")
    for _ in range(args.repeats):
        c0, w0 = time.process_time(), time.perf_counter()
        for key in keys:
            got, wrong = read_cached(folder / key.file_name, key)
            assert got is not None, wrong
        best, read_wall = min(best, time.process_time() - c0), time.perf_counter() - w0
    read = best
    n, size = len(keys), args.d_mlp**2 * 4
    flops = 8 / 3 * args.d_mlp**3  # Householder QR (4/3 d^3) and forming Q (4/3 d^3), as the planner counts it
    print(f"rotation of width {args.d_mlp} ({size / 2**20:.0f} MiB float32), {n} of them, one core, CPU seconds:")
    print(
        f"  computed (QR)      {compute / n:8.3f} s each ({compute_wall / n:.3f} wall), "
        f"{flops / (compute / n) / 1e9:.2f} GFLOP/s"
    )
    print(f"  written to cache   {write / n:8.3f} s each (SHA-256 included)")
    print(
        f"  read from cache    {read / n:8.3f} s each ({read_wall / n:.3f} wall), {size / (read / n) / 1e9:.2f} GB/s "
        f"with the check; x{compute / read:.0f} faster than computing"
    )
    per_model = args.layers
    total = args.models * per_model + (args.draws - 1)
    print(
        f"  a study of {args.models} models x {args.layers} layers, {args.draws} draws: {total} rotations, "
        f"{total * compute / n / 60:.1f} CPU min to compute once, {total * read / n:.1f} CPU s to read per pass, "
        f"{total * size / 2**30:.2f} GiB of cache"
    )
    print(f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB")


if __name__ == "__main__":
    main()
