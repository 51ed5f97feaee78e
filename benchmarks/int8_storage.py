"""int8 against float16 storage: bytes per value, write / ingest / read throughput, and what int8 changes in the
correlations and universal-neuron labels, on the demo zoo and on GPT-2-small-sized random models.

    .venv/bin/python benchmarks/int8_storage.py [--work DIR] [--parts zoo,gpt2] [--zoo-seeds 4] [--gpt2-seeds 2]
        [--gpt2-tokens 2048] [--gpt2-draws 1] [--compress]

zoo: the demo's zoo (4 tiny GPT-2 seeds by default, 2 layers x 512 neurons, trained 800 steps on
standard-library source; reused from `--work` when already trained), its held-out dataset (24,576 tokens),
every seed at step 800 ingested once as float16 and once as int8 into two stores, each store correlated
(8 baseline draws) at the demo's threshold 0.2. gpt2: `GPT2Config()` defaults (12 layers x 3072 neurons,
random init, one model per seed, saved with save_pretrained and loaded by path), the same two ingests and
correlations (1 baseline draw by default: each draw costs 2 x 12 products of 36,864 x 3072 x 3072 per pair,
minutes on 2 cores).

For each: bytes per stored value (file size / values), ingest tokens/s (forward passes included), the storage
layer alone (ActivationWriter of the same rows, no statistics), warm reads as the correlation engine reads
(`read_rows_into`, 8192-row chunks, one layer at a time), max |delta| of every neuron's max-corr and baseline
between the two runs, and the Jaccard of the universal sets at the threshold (with their sizes). `--compress`
also writes the int8 and float16 rows with hdf5plugin's Blosc2 and Zstd filters, when it is installed.
"""

from __future__ import annotations

import argparse
import resource
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
from sqlalchemy import select

from actdb.compute.correlation.run import CorrelationRequest, correlate
from actdb.store.config import StoreConfig
from actdb.store.database.connection import Store
from actdb.store.database.labels import universal_neurons_of
from actdb.store.database.schema import ActivationSet, NeuronMatch
from actdb.store.files.activation import ActivationHeader, ActivationReader, ActivationWriter
from actdb.store.ingest.dataset_registry import add_dataset
from actdb.store.ingest.pipeline import IngestRequest, ingest
from actdb.store.ingest.zoo import checkpoint_dir, stdlib_files, stdlib_texts, train_tokenizer, train_zoo, zoo_config
from actdb.store.refs import SetRef

DTYPES = ("float16", "int8")
quiet = lambda _m: None  # noqa: E731


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def open_store(home: Path) -> Store:
    return Store.init(StoreConfig.resolve(home))


def read_throughput(path: Path, chunk: int = 8192, repeats: int = 2) -> float:
    """Values per second of warm reads in the correlation engine's pattern (best of `repeats`)."""
    best = np.inf
    with ActivationReader(path) as r:
        h = r.header
        out = np.empty((chunk, h.d_mlp), dtype=r.value_dtype)
        for _ in range(repeats):
            t0 = time.perf_counter()
            for start in range(0, h.n_tokens, chunk):
                buf = out[: min(chunk, h.n_tokens - start)]
                for layer in range(h.n_layers):
                    r.read_rows_into(layer, start, buf)
            best = min(best, time.perf_counter() - t0)
    return h.n_tokens * h.n_layers * h.d_mlp / best


def write_throughput(source: Path, work: Path, dtype: str, chunk: int = 4096) -> float:
    """Values per second of the storage layer alone: the float16 rows of `source` written as `dtype`."""
    with ActivationReader(source) as r:
        h = r.header
        rows = [r.read_rows(0, h.n_tokens)[i] for i in range(h.n_layers)]
    header = ActivationHeader(h.model, h.step, h.dataset_fingerprint, h.hook, h.n_layers, h.d_mlp, h.n_tokens, dtype)
    out = work / f"write-{dtype}.h5"
    t0 = time.perf_counter()
    w = ActivationWriter(out, header)
    for start in range(0, h.n_tokens, chunk):
        w.write_rows(start, [x[start : start + chunk] for x in rows])
    w.finish()
    seconds = time.perf_counter() - t0
    out.unlink()
    return h.n_tokens * h.n_layers * h.d_mlp / seconds


def compress_sizes(source: Path, work: Path) -> list[str]:
    """Bytes per value and write/read rates of the rows of `source` under hdf5plugin's filters."""
    try:
        import h5py
        import hdf5plugin
    except ImportError:
        return ["hdf5plugin is not installed: compression not measured"]
    from actdb.store.files.activation import chunk_shape, quantise

    with ActivationReader(source) as r:
        h = r.header
        rows = r.read_rows(0, h.n_tokens)
    block = chunk_shape(h.n_tokens, h.d_mlp)[0]
    codes = []
    for x in rows:
        c = np.empty(x.shape, np.int8)
        for s in range(0, h.n_tokens, block):
            c[s : s + block] = quantise(x[s : s + block])[0]
        codes.append(c)
    filters = {
        "none": {},
        "zstd-3": hdf5plugin.Zstd(clevel=3),
        "blosc2-lz4-shuffle": hdf5plugin.Blosc2(cname="lz4", clevel=5, filters=hdf5plugin.Blosc2.SHUFFLE),
        "blosc2-zstd-shuffle": hdf5plugin.Blosc2(cname="zstd", clevel=3, filters=hdf5plugin.Blosc2.SHUFFLE),
    }
    lines = []
    values = h.n_tokens * h.n_layers * h.d_mlp
    for dtype, data in (("float16", rows), ("int8", codes)):
        for name, flt in filters.items():
            path = work / f"c-{dtype}-{name}.h5"
            t0 = time.perf_counter()
            with h5py.File(path, "w") as f:
                for i, x in enumerate(data):
                    f.create_dataset(
                        f"l{i}", data=x, chunks=chunk_shape(h.n_tokens, h.d_mlp), fletcher32=not flt, **flt
                    )
            wt = time.perf_counter() - t0
            t0 = time.perf_counter()
            with h5py.File(path, "r") as f:
                for i in range(len(data)):
                    f[f"l{i}"][:]
            rt = time.perf_counter() - t0
            lines.append(
                f"  {dtype:8s} {name:20s} {path.stat().st_size / values:.3f} B/value, write "
                f"{values / wt / 1e6:.0f} M values/s, read {values / rt / 1e6:.0f} M values/s"
            )
            path.unlink()
    return lines


def ingest_all(
    store: Store, sources: dict[str, str], step: int, dataset: str, dtype: str, batch: int
) -> dict[str, tuple[Path, float]]:
    """{model: (file, ingest seconds)} for each model at `step`."""
    out = {}
    for model, source in sources.items():
        req = IngestRequest(
            model=model, step=step, dataset=dataset, source=source, dtype=dtype, batch_size=batch, progress=False
        )
        res = ingest(store, req, log=quiet)
        out[model] = (res.path, res.seconds)
    return out


def run_correlation(
    store: Store,
    models: list[str],
    step: int,
    dataset: str,
    threshold: float,
    draws: int,
    chunk: int = 8192,
    budget: int | None = None,
) -> int:
    req = CorrelationRequest(
        chunk_tokens=chunk,
        memory_budget=budget,
        sets=[SetRef(m, step) for m in models],
        dataset=dataset,
        threshold=threshold,
        baseline_draws=draws,
        device="cpu",
        progress=False,
    )
    return correlate(store, req, log=quiet).run_id


def matches(store: Store, run_id: int) -> dict:
    """{(model, other, layer, neuron): (max_corr, baseline)} of a run."""
    with store.session() as s:
        names = {a.id: a.path.split("/")[1] for a in s.scalars(select(ActivationSet))}
        return {
            (names[m.set_id], names[m.other_set_id], m.layer, m.neuron): (m.max_corr, m.baseline_max_corr)
            for m in s.scalars(select(NeuronMatch).where(NeuronMatch.run_id == run_id))
            if m.max_corr is not None
        }


def universal(store: Store, run_id: int, threshold: float) -> set:
    with store.session() as s:
        sets = {a.id: a.path.split("/")[1] for a in s.scalars(select(ActivationSet))}
    return {(name, *ln) for sid, name in sets.items() for ln in universal_neurons_of(store, run_id, sid, threshold)}


def compare(stores: dict, runs: dict, thresholds: list[float]) -> list[str]:
    a, b = matches(stores["float16"], runs["float16"]), matches(stores["int8"], runs["int8"])
    assert a.keys() == b.keys(), "the two runs matched different neurons"
    d = np.array([np.subtract(b[k], a[k]) for k in a])
    lines = [
        f"  neurons x other models compared: {len(a)}",
        f"  max |delta max-corr| = {np.abs(d[:, 0]).max():.2e} (mean {np.abs(d[:, 0]).mean():.1e}), "
        f"max |delta baseline| = {np.abs(d[:, 1]).max():.2e} (mean {np.abs(d[:, 1]).mean():.1e})",
    ]
    for t in thresholds:
        ua, ub = universal(stores["float16"], runs["float16"], t), universal(stores["int8"], runs["int8"], t)
        jac = len(ua & ub) / len(ua | ub) if ua | ub else float("nan")
        lines.append(f"  universal at excess > {t}: float16 {len(ua)}, int8 {len(ub)}, Jaccard {jac:.3f}")
    return lines


def storage_lines(files: dict, n_tokens: int) -> list[str]:
    lines = []
    for dtype in DTYPES:
        paths = [p for p, _s in files[dtype].values()]
        with ActivationReader(paths[0]) as r:
            values = r.header.n_tokens * r.header.n_layers * r.header.d_mlp
        size = np.mean([p.stat().st_size for p in paths])
        ingest_tps = n_tokens * len(paths) / sum(s for _p, s in files[dtype].values())
        write = write_throughput(paths[0], paths[0].parent, dtype)
        read = read_throughput(paths[0])
        lines.append(
            f"  {dtype:8s} {size / values:.3f} B/value ({size / 1e6:.1f} MB a set), ingest {ingest_tps:,.0f} tokens/s, "
            f"storage layer write {write / 1e6:.0f} M values/s, warm read {read / 1e6:.0f} M values/s"
        )
    return lines


def both(work: Path, dataset_args: dict, sources: dict, step: int, batch: int) -> tuple[dict, dict]:
    stores, files = {}, {}
    shutil.rmtree(work, ignore_errors=True)  # fresh stores: every ingest and correlation is timed
    for dtype in DTYPES:
        stores[dtype] = open_store(work / dtype)
        add_dataset(stores[dtype], log=quiet, **dataset_args)
        files[dtype] = ingest_all(stores[dtype], sources, step, dataset_args["name"], dtype, batch)
    return stores, files


def zoo_part(work: Path, seeds: int, compress: bool) -> None:
    steps = [0, 50, 200, 800]
    config = zoo_config(seeds, 800, steps)
    t0 = time.perf_counter()
    zoo = work / f"zoo-{seeds}"
    tok = train_zoo(zoo, config, progress=False)
    size = f"{config['n_layers']} layers x {config['d_mlp']} neurons"
    print(f"demo zoo: {seeds} seeds x {size} (trained or reused in {time.perf_counter() - t0:.0f}s)")
    held_out = [str(p) for p in stdlib_files()[config["train_files"] :]]
    ds = dict(name="heldout", sources=held_out, tokenizer=str(tok), seq_len=config["seq_len"], n_tokens=24576, seed=0)
    ds["exclude_tokens"] = "gurnee"
    sources = {f"seed{k}": str(checkpoint_dir(zoo, k, 800)) for k in range(seeds)}
    stores, files = both(work / "zoo-stores", ds, sources, 800, 16)
    n_tokens = 24576
    print("storage (step 800, 24,576 tokens):")
    for line in storage_lines(files, n_tokens):
        print(line)
    runs = {dt: run_correlation(stores[dt], list(sources), 800, "heldout", 0.2, 8) for dt in DTYPES}
    print(f"correlation ({seeds} seeds at step 800, 8 baseline draws), int8 minus float16:")
    for line in compare(stores, runs, [0.2, 0.1, 0.5]):
        print(line)
    if compress:
        print("compression of seed0@800 (Blosc2 / Zstd from hdf5plugin, checksums off as those filters cannot stack):")
        for line in compress_sizes(files["float16"]["seed0"][0], work):
            print(line)
    print(f"peak RSS so far: {peak_mb():.0f} MB")


def gpt2_part(work: Path, seeds: int, tokens: int, draws: int, compress: bool) -> None:
    import torch
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    tok = (
        train_tokenizer(stdlib_texts(max_files=40), 1000, work / "tok") if not (work / "tok").exists() else work / "tok"
    )
    sources = {}
    for k in range(seeds):
        out = work / f"gpt2-seed{k}"
        if not (out / "tokenizer_config.json").exists():
            torch.manual_seed(k)
            GPT2LMHeadModel(GPT2Config()).save_pretrained(out)
            AutoTokenizer.from_pretrained(tok).save_pretrained(out)  # the dataset's tokenizer ships with the model
        sources[f"gpt2s{k}"] = str(out)
    ds = dict(
        name="bench", sources=[str(p) for p in stdlib_files()], tokenizer=str(tok), seq_len=512, n_tokens=tokens, seed=0
    )
    stores, files = both(work / "gpt2-stores", ds, sources, 0, 8)
    print(f"GPT-2-small-sized random models: {seeds} seeds x 12 layers x 3072 neurons, {tokens} tokens of 512")
    for line in storage_lines(files, tokens):
        print(line)
    t0 = time.perf_counter()
    # two sets of 36,864 neurons need 14.3 GiB at 1024-token chunks (24 GiB at the default 8192)
    runs = {dt: run_correlation(stores[dt], list(sources), 0, "bench", 0.5, draws, 1024, 16 * 2**30) for dt in DTYPES}
    print(f"correlation ({draws} baseline draw(s), {time.perf_counter() - t0:.0f}s for both), int8 minus float16:")
    for line in compare(stores, runs, [0.5, 0.1, 0.05]):
        print(line)
    if compress:
        print("compression of one GPT-2-sized set:")
        for line in compress_sizes(next(iter(files["float16"].values()))[0], work):
            print(line)
    print(f"peak RSS so far: {peak_mb():.0f} MB")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", type=Path, default=None, help="Folder kept between runs (the zoo is reused).")
    ap.add_argument("--parts", default="zoo,gpt2")
    ap.add_argument("--zoo-seeds", type=int, default=4, help="Seeds of the demo zoo (the demo trains 4).")
    ap.add_argument("--gpt2-seeds", type=int, default=2)
    ap.add_argument("--gpt2-tokens", type=int, default=2048)
    ap.add_argument("--gpt2-draws", type=int, default=1)
    ap.add_argument("--compress", action="store_true")
    args = ap.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="actdb-int8-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    import torch

    print(f"work folder {work}; torch threads {torch.get_num_threads()}")
    parts = args.parts.split(",")
    if "zoo" in parts:
        zoo_part(work, args.zoo_seeds, args.compress)
    if "gpt2" in parts:
        gpt2_part(work, args.gpt2_seeds, args.gpt2_tokens, args.gpt2_draws, args.compress)
    print(f"peak RSS: {peak_mb():.0f} MB")


if __name__ == "__main__":
    main()
