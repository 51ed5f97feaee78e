"""The correlation engine's chunk reader against a bare read of the same stored bytes from the page cache, on one
core: GB/s of stored bytes per core, and the ratio to the bare reads.

    .venv/bin/python benchmarks/reader.py [--tokens 32768] [--d-mlp 3072] [--layers 2] [--dtypes float16,int8]
        [--repeats 5] [--dir DIR] [--cpu 0]

Writes one activation file per dtype (GELU-like values, actdb's 1024 x 128 chunks with Fletcher-32), reads it
once to warm the page cache, then times, pinned to one core with one BLAS thread, best of `--repeats` rounds in
which the variants take turns:

    bare file        the file's bytes read into one reused 8 MiB buffer (no HDF5, no checks)
    bare chunks      every chunk's stored bytes by h5py's read_direct_chunk into a reused buffer (no checks)
    read + check     the same chunks, their Fletcher-32 verified by `fletcher32_rows` (what a host must do
                     when the device converts)
    engine reader    the engine's reads in a pass (`_read_chunks` per chunk): 8192-token chunks of every layer,
                     checked, converted to float32 and shifted by the neurons' means into the chunk the
                     products use, into buffers allocated once: by the C pass (`_fused_chunks`) where it is
                     built
    engine, NumPy    the same through the NumPy/torch route (Fletcher-32 by BLAS sums, then conversions), the
                     route without the C extension (ACTDB_READER=numpy)
    _read_chunks     the engine's generator itself over the whole file, allocating its buffers (page faults
                     of a fresh chunk, which a pass over more tokens spreads thinner)
    HDF5 + NumPy     the reader before #29: HDF5's read with its Fletcher-32 filter, NumPy's float16 cast and the
                     shift (int8: HDF5's read, dequantised, shifted)

Then, where the machine has a second core, whether the reads overlap a pass's products (`--overlap-width`): wall
seconds of the engine reader's reads alone (a thread pinned to the second core, as `_read_ahead` would run them),
of products alone (one BLAS thread on the first core: `x[:, :w].T @ x[:, :w]` per 8192-token chunk), and of both
at once; overlap = (reads + products) / both, 2 when they run side by side, 1 when one waits for the other.

Rates are stored bytes over CPU seconds of this process (`time.process_time`): the machine this was written on is
shared and busy, and wall time there measures the other tenants. Wall-clock rates are printed beside them.
"""

from __future__ import annotations

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # one core: before NumPy loads its BLAS
os.environ.setdefault("OMP_NUM_THREADS", "1")

import argparse
import resource
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import h5py
import numpy as np

from actdb.compute.correlation.engine import SetInput, _read_chunks
from actdb.store.files import raw_chunks
from actdb.store.files.activation import (
    ActivationHeader,
    ActivationReader,
    ActivationWriter,
    layer_key,
)
from actdb.store.files.fletcher32 import fletcher32_rows, scratch_for
from actdb.store.files.raw_chunks import float32_rows

SEQ_LEN = 128
CHUNK_TOKENS = 8192


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def write_file(path: Path, dtype: str, n_tokens: int, d: int, layers: int) -> None:
    rng = np.random.default_rng(0)
    w = ActivationWriter(path, ActivationHeader("bench", 0, "fp", "mlp_post", layers, d, n_tokens, dtype))
    for start in range(0, n_tokens, 4096):
        n = min(4096, n_tokens - start)
        pre = rng.standard_normal((n, d), dtype=np.float32)
        rows = pre * 0.5 * (1 + np.tanh(0.8 * pre))  # GELU-like: skewed, many values near 0 (float16 subnormals)
        w.write_rows(start, [rows.astype(np.float16) if dtype == "float16" else rows for _ in range(layers)])
    w.finish()


def stored_bytes(path: Path) -> int:
    """Bytes of the layers' chunks as stored (values and checksums): what every variant reads."""
    total = 0
    with h5py.File(path, "r") as f:
        for name in f:
            if name.startswith("layer_") and name.count("_") == 1:
                ds = f[name]
                total += sum(ds.id.get_chunk_info(i).size for i in range(ds.id.get_num_chunks()))
    return total


def bare_file(path: Path) -> Callable[[], None]:
    buf = bytearray(8 * 2**20)

    def run() -> None:
        with open(path, "rb", buffering=0) as fh:
            while fh.readinto(buf):
                pass

    return run


def chunk_corners(ds: h5py.Dataset) -> list[tuple[int, int]]:
    rows, cols = ds.chunks
    return [(r, c) for r in range(0, ds.shape[0], rows) for c in range(0, ds.shape[1], cols)]


def bare_chunks(path: Path, check: bool) -> Callable[[], None]:
    f = h5py.File(path, "r")
    layers = [f[name] for name in sorted(f) if name.startswith("layer_") and name.count("_") == 1]
    rows, cols = layers[0].chunks
    chunk = rows * cols * layers[0].dtype.itemsize + 4
    group = 8
    buf = np.empty(group * chunk, dtype=np.uint8)
    scratch = scratch_for(chunk - 4, group)

    def run() -> None:
        for ds in layers:
            corners = chunk_corners(ds)
            for g in range(0, len(corners), group):
                part = corners[g : g + group]
                for k, corner in enumerate(part):
                    ds.id.read_direct_chunk(corner, out=buf[k * chunk : (k + 1) * chunk])
                if check:
                    pieces = buf[: len(part) * chunk].reshape(len(part), chunk)
                    sums = fletcher32_rows(pieces[:, :-4], scratch)
                    stored = pieces[:, -4:].copy().view("<u4").reshape(-1)
                    assert (sums == stored).all()

    return run


def engine_reader(path: Path, layers: int, d: int, n_tokens: int, fused: bool = True) -> Callable[[], None]:
    """`_read_chunks`'s work per chunk in a pass's steady state: every layer's rows, checked, converted and
    shifted into the chunk's columns (its buffers allocated and touched once, as a pass reuses them); `fused`
    False: by the NumPy route even where the C pass is built."""
    reader = ActivationReader(path)
    shift = np.random.default_rng(1).standard_normal(layers * d).astype(np.float32) * 0.1
    x = float32_rows(CHUNK_TOKENS, layers * d)  # as the engine allocates its chunk
    x[:] = 1  # touched: a pass reuses its chunk
    route, raw_chunks.FUSED = raw_chunks.FUSED, raw_chunks.FUSED if fused else None
    reader.read_shifted_into(0, 0, x[:1, :d], shift[:d])  # the reader's chunk reader takes the route now
    raw_chunks.FUSED = route

    def run() -> None:
        for r0 in range(0, n_tokens, CHUNK_TOKENS):
            out = x[: min(CHUNK_TOKENS, n_tokens - r0)]
            for layer in range(layers):
                cols = slice(layer * d, (layer + 1) * d)
                reader.read_shifted_into(layer, r0, out[:, cols], shift[cols])

    return run


def read_chunks(path: Path, layers: int, d: int, n_tokens: int) -> Callable[[], None]:
    """`engine._read_chunks` itself, a whole pass over the file, its buffers' first use included."""
    reader = ActivationReader(path)
    shift = np.random.default_rng(1).standard_normal(layers * d).astype(np.float32) * 0.1
    s = SetInput(0, str(path), layers, d, shift)
    tokens = np.zeros(n_tokens, dtype=np.int64)
    mask = np.ones(n_tokens, dtype=bool)

    def run() -> None:
        for _ in _read_chunks([reader], [s], [0], tokens, mask, SEQ_LEN, CHUNK_TOKENS):
            pass

    return run


def hdf5_numpy(path: Path, layers: int, d: int, n_tokens: int) -> Callable[[], None]:
    """The engine's read before #29: read_rows_into a buffer of stored values, cast into the chunk, shift."""
    reader = ActivationReader(path)
    shift = np.random.default_rng(1).standard_normal(layers * d).astype(np.float32) * 0.1
    stored = np.empty((CHUNK_TOKENS, d), dtype=reader.value_dtype)
    x = np.ones((CHUNK_TOKENS, layers * d), dtype=np.float32)

    def run() -> None:
        for r0 in range(0, n_tokens, CHUNK_TOKENS):
            raw = stored[: min(CHUNK_TOKENS, n_tokens - r0)]
            out = x[: raw.shape[0]]
            for layer in range(layers):
                cols = slice(layer * d, (layer + 1) * d)
                reader.read_rows_into(layer, r0, raw)
                np.copyto(out[:, cols], raw)
                np.subtract(out[:, cols], shift[cols], out=out[:, cols])

    return run


def overlap(path: Path, layers: int, d: int, n_tokens: int, width: int, cores: tuple[int, int]) -> str:
    """Wall seconds of the reads alone (on a thread pinned to `cores[1]`), of the products alone (this thread,
    pinned to `cores[0]`) and of both at once, and the overlap (reads + products) / both."""
    read = engine_reader(path, layers, d, n_tokens)
    x = float32_rows(CHUNK_TOKENS, layers * d)
    x[:] = np.random.default_rng(2).standard_normal(x.shape, dtype=np.float32)
    n_chunks = -(-n_tokens // CHUNK_TOKENS)

    def products() -> None:
        for _ in range(n_chunks):
            np.matmul(x[:, :width].T, x[:, :width])

    def reads() -> None:
        os.sched_setaffinity(0, {cores[1]})  # this thread only
        read()

    def wall(run: Callable[[], None]) -> float:
        w0 = time.perf_counter()
        run()
        return time.perf_counter() - w0

    def on_thread(run: Callable[[], None]) -> Callable[[], None]:
        def go() -> None:
            t = threading.Thread(target=run)
            t.start()
            t.join()

        return go

    def both() -> None:
        t = threading.Thread(target=reads)
        t.start()
        products()
        t.join()

    best = {"reads": float("inf"), "products": float("inf"), "both": float("inf")}
    for _ in range(3):
        best["reads"] = min(best["reads"], wall(on_thread(reads)))
        best["products"] = min(best["products"], wall(products))
        best["both"] = min(best["both"], wall(both))
    ratio = (best["reads"] + best["products"]) / best["both"]
    return (
        f"reads {best['reads']:.3f} s, products {best['products']:.3f} s, both {best['both']:.3f} s (wall): "
        f"overlap {ratio:.2f} (2 = side by side)"
    )


def timed(variants: dict[str, Callable[[], None]], repeats: int) -> dict[str, tuple[float, float]]:
    """Best (CPU seconds, wall seconds) of each variant over `repeats` rounds, the variants taking turns within
    a round so that all of them meet the same neighbours on a shared machine."""
    best = {name: (float("inf"), float("inf")) for name in variants}
    for _ in range(repeats):
        for name, run in variants.items():
            c0, w0 = time.process_time(), time.perf_counter()
            run()
            cpu, wall = time.process_time() - c0, time.perf_counter() - w0
            best[name] = (min(best[name][0], cpu), min(best[name][1], wall))
    return best


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=32768)
    ap.add_argument("--d-mlp", type=int, default=3072)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--dtypes", default="float16,int8")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--no-torch", action="store_true", help="convert float16 by NumPy bit operations")
    ap.add_argument("--dir", help="keep the files in this folder (reused when present)")
    ap.add_argument("--cpu", type=int, default=0, help="the core to pin to")
    ap.add_argument("--overlap-width", type=int, default=512, help="columns of the products' X^T X (0: skip)")
    args = ap.parse_args()
    allowed = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {args.cpu})
    if args.no_torch:
        raw_chunks._TORCH[:] = [None]
    else:
        import torch  # noqa: F401  (loaded before timing, as a correlation run has it loaded)
    folder = Path(args.dir or tempfile.mkdtemp(prefix="actdb-reader-"))
    folder.mkdir(parents=True, exist_ok=True)
    print(
        f"reader benchmark: {args.tokens} tokens x {args.layers} layers x {args.d_mlp} neurons, pinned to core "
        f"{args.cpu}, best of {args.repeats}; rates are stored bytes per CPU second (wall in brackets)"
    )
    fused = raw_chunks.FUSED
    print("engine reader: " + (f"C pass ({fused.instructions()})" if fused else "NumPy route (no C pass built)"))
    for dtype in args.dtypes.split(","):
        path = folder / f"{dtype}-{args.tokens}-{args.layers}-{args.d_mlp}.h5"
        if not path.exists():
            write_file(path, dtype, args.tokens, args.d_mlp, args.layers)
        size = stored_bytes(path)
        bare_file(path)()  # into the page cache
        variants = {
            "bare file": bare_file(path),
            "bare chunks": bare_chunks(path, check=False),
            "read + check": bare_chunks(path, check=True),
            "engine reader": engine_reader(path, args.layers, args.d_mlp, args.tokens),
            "engine, NumPy": engine_reader(path, args.layers, args.d_mlp, args.tokens, fused=False),
            "_read_chunks": read_chunks(path, args.layers, args.d_mlp, args.tokens),
            "HDF5 + NumPy": hdf5_numpy(path, args.layers, args.d_mlp, args.tokens),
        }
        times = timed(variants, args.repeats)
        print(f"\n{dtype}: {size / 2**20:.0f} MiB of stored chunks ({layer_key(0)} .. {layer_key(args.layers - 1)})")
        for name, (cpu, wall) in times.items():
            print(
                f"  {name:14s} {size / cpu / 1e9:6.2f} GB/s per core ({size / wall / 1e9:5.2f} wall)  "
                f"x{times['bare chunks'][0] / cpu:5.2f} of bare chunks  "
                f"x{times['bare file'][0] / cpu:5.2f} of bare file"
            )
        speedup = times["HDF5 + NumPy"][0] / times["engine reader"][0]
        print(f"  engine reader vs the reader before #29: {speedup:.2f}x")
        print(f"  engine reader / bare chunks per core: {times['bare chunks'][0] / times['engine reader'][0]:.2f}")
        others = sorted(allowed - {args.cpu})
        if args.overlap_width and others:
            os.sched_setaffinity(0, {args.cpu})
            cores = (args.cpu, others[0])
            result = overlap(path, args.layers, args.d_mlp, args.tokens, args.overlap_width, cores)
            print(f"  overlap on cores {cores}: {result}")
    print(f"\npeak RSS {peak_rss_mb():.0f} MB")


if __name__ == "__main__":
    main()
