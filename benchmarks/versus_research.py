"""actdb's correlation engine against the research code itself, side by side in one process on the same data.

The research code is Gurnee et al. (2024), github.com/wesg52/universal-neurons: its `StreamingPearsonComputer`
(`correlations_fast.py`, float32 products summed in float64) is loaded at run time from a local clone named by
--research-repo (nothing of it is copied here). It is fed the very activations actdb reads, converted to float32
and held in memory in its layout (layers, neurons, tokens), cut into its default batches of 32 x 512 tokens
before the clock starts: its best case (the research code itself recomputes them with forward passes). Per pair
of models it runs as the research workflow does: one job for the correlation and one for the rotation baseline,
whose second model's activations are first rotated layer by layer (`correlations_fast.run_correlation_experiment`,
the rotation included in the timing); both directions' maxima come from each job's full matrix, as its
`summarize_correlation_matrix` of the matrix and its transpose does. actdb reads the float16 HDF5 files, checks
and converts them, and derives its baseline from the moments with its default 8 draws.

    git clone https://github.com/wesg52/universal-neurons /tmp/universal-neurons   # or any local clone
    .venv/bin/pip install einops        # the only package the class needs that actdb does not install
    .venv/bin/python benchmarks/versus_research.py --research-repo /tmp/universal-neurons [--threads 2]

The module's other imports (transformer_lens, datasets and the plotting in `analysis.correlations`) serve its
command line, not the class: where they are not installed, empty modules stand in for them during the import.
Prints, for one pair and for 4 models (every pair), at the demo's tokens and 4x, both times, the ratio, and each
one's share of a bare float32 GEMM doing the products it needs, and the CPU seconds each used (all threads: on
a machine busy with other work, wall times follow the share of the cores each gets, CPU seconds do not).
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import resource
import sys
import tempfile
import time
import types
from concurrent.futures import ProcessPoolExecutor
from itertools import combinations
from pathlib import Path

import numpy as np
from synthetic_sets import SEQ_LEN, write_sets
from threadpoolctl import threadpool_limits

from actdb.compute.correlation.baseline import random_rotation
from actdb.compute.correlation.engine import CorrelationOptions, correlate_sets
from actdb.store.device import resolve_device
from actdb.store.files.activation import ActivationReader

RESEARCH_BATCH = 32 * 512  # correlations_fast.py's default --batch_size of 512-token sequences
ONLY_FOR_ITS_CLI = ("datasets", "transformer_lens", "analysis", "analysis.correlations")


def load_research_class(repo: Path) -> type:
    """`StreamingPearsonComputer` from the clone's `correlations_fast.py`, imported by path."""
    source = repo / "correlations_fast.py"
    if not source.is_file():
        raise SystemExit(f"{source} not found: --research-repo names a clone of wesg52/universal-neurons")
    sys.path.insert(0, str(repo))  # its `from utils import *`
    stand_ins = {}
    for name in ONLY_FOR_ITS_CLI:
        if importlib.util.find_spec(name.split(".")[0]) is None or name == "analysis.correlations":
            module = types.ModuleType(name)
            module.HookedTransformer = module.summarize_correlation_matrix = module.flatten_layers = None
            stand_ins[name] = sys.modules.setdefault(name, module)
    try:
        spec = importlib.util.spec_from_file_location("universal_neurons_correlations_fast", source)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(repo))
        for name, module_in in stand_ins.items():
            if sys.modules.get(name) is module_in:
                del sys.modules[name]
    return module.StreamingPearsonComputer


def research_jobs(cls: type, data: list, layers: int, d: int, threads: int) -> tuple[float, float, float]:
    """Every pair's correlation job and rotation-baseline job through the research class: (seconds of the
    whole method, seconds inside the class alone, CPU seconds of the whole method)."""
    import torch

    torch.set_num_threads(threads)
    model = types.SimpleNamespace(cfg=types.SimpleNamespace(n_layers=layers, d_mlp=d))
    rotations = [
        [torch.from_numpy(random_rotation(d, 0, k, layer).astype(np.float32)) for layer in range(layers)]
        for k in range(len(data))
    ]
    in_class = 0.0
    started, cpu = time.perf_counter(), time.process_time()
    for i, j in combinations(range(len(data)), 2):
        for baseline in (False, True):
            computer = cls(model, model)
            for b1, b2 in zip(data[i], data[j], strict=True):
                if baseline:  # correlations_fast.run_correlation_experiment's rotation of model 2's neurons
                    b2 = torch.stack(
                        [torch.einsum("n t, m n -> m t", b2[layer], rotations[j][layer]) for layer in range(layers)]
                    )
                t0 = time.perf_counter()
                computer.update_correlation_data(b1, b2)
                in_class += time.perf_counter() - t0
            t0 = time.perf_counter()
            r = computer.compute_correlation().reshape(layers * d, layers * d).float()
            r.abs().amax(dim=1), r.abs().amax(dim=0)  # both directions' maxima, as its summaries
            in_class += time.perf_counter() - t0
    return time.perf_counter() - started, in_class, time.process_time() - cpu


def bare_gemm(neurons: int, tokens: int, products: int, threads: int) -> float:
    """Seconds of a bare float32 GEMM doing `products` (N x T) @ (T x N) products in research-batch pieces."""
    rng = np.random.default_rng(1)
    a = rng.standard_normal((RESEARCH_BATCH, neurons), dtype=np.float32)
    b = rng.standard_normal((RESEARCH_BATCH, neurons), dtype=np.float32)
    out = np.empty((neurons, neurons), dtype=np.float32)
    reps = max(1, tokens // RESEARCH_BATCH)
    with threadpool_limits(threads):
        np.matmul(a.T, b, out=out)
        t0 = time.perf_counter()
        for _ in range(reps * products):
            np.matmul(a.T, b, out=out)
        return (time.perf_counter() - t0) * tokens / (reps * RESEARCH_BATCH)


def compare(cls: type, n_sets: int, layers: int, d: int, tokens: int, threads: int, draws: int) -> float:
    import torch

    root = Path(tempfile.mkdtemp(prefix="actdb-vs-"))
    with ProcessPoolExecutor(1) as pool:
        sets = pool.submit(write_sets, root, n_sets, layers, d, tokens).result()
    ids = np.zeros((tokens // SEQ_LEN, SEQ_LEN), dtype=np.int32)
    mask = np.ones_like(ids, dtype=bool)
    data = []  # the same values as float32, in the research layout (layers, neurons, tokens), batch by batch
    for s in sets:
        with ActivationReader(s.path) as r:
            x = np.stack(r.read_rows(0, tokens)).astype(np.float32).transpose(0, 2, 1)
        data.append(
            [
                torch.from_numpy(np.ascontiguousarray(x[:, :, b : b + RESEARCH_BATCH]))
                for b in range(0, tokens, RESEARCH_BATCH)
            ]
        )
    backend = resolve_device("cpu").array
    options = CorrelationOptions(baseline_draws=draws)
    with threadpool_limits(threads):
        correlate_sets(sets, ids, mask, options, backend)  # warm the page cache
        t0, cpu = time.perf_counter(), time.process_time()
        result = correlate_sets(sets, ids, mask, options, backend)
        ours, ours_cpu = time.perf_counter() - t0, time.process_time() - cpu
    theirs, in_class, theirs_cpu = research_jobs(cls, data, layers, d, threads)
    pairs = n_sets * (n_sets - 1) // 2
    gemm = bare_gemm(layers * d, tokens, pairs, threads)
    print(
        f"{n_sets} sets x {layers} x {d} neurons x {tokens:,} tokens, {threads} threads each: actdb {ours:.2f} s "
        f"({gemm / ours:.2f} of a bare GEMM of its {pairs} pair product(s); {draws} draws; phases "
        f"{', '.join(f'{k} {v:.2f}' for k, v in result.seconds.items())}); research code {theirs:.2f} s, "
        f"{in_class:.2f} s in StreamingPearsonComputer ({2 * gemm / in_class:.2f} of a bare GEMM of its "
        f"{2 * pairs} products): actdb {theirs / ours:.2f}x the research code ({in_class / ours:.2f}x its class "
        f"alone); CPU seconds (all threads) actdb {ours_cpu:.2f}, research code {theirs_cpu:.2f}: "
        f"{theirs_cpu / ours_cpu:.2f}x; load average {os.getloadavg()[0]:.1f}; "
        f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB",
        flush=True,
    )
    return theirs / ours


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--research-repo", type=Path, required=True, help="a local clone of wesg52/universal-neurons")
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--d-mlp", type=int, default=512)
    ap.add_argument("--tokens", type=int, default=24_576)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--draws", type=int, default=CorrelationOptions.baseline_draws)
    args = ap.parse_args()
    cls = load_research_class(args.research_repo)
    for tokens in (args.tokens, 4 * args.tokens):
        for n_sets in (2, 4):
            compare(cls, n_sets, args.layers, args.d_mlp, tokens, args.threads, args.draws)


if __name__ == "__main__":
    main()
