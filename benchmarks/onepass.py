"""One read pass per step vs the multi-pass cluster run, on the same local Dask cluster in the same run: bytes
read (the reader's counter), read amplification, wall time, the ratio of the two, the largest difference of
max-corr between them, and the workers' peak memory.

    .venv/bin/python benchmarks/onepass.py [--sets 3] [--layers 4] [--d-mlp 512] [--tokens 32768] [--passes 5]
        [--workers 2] [--repeats 2]

`--passes` picks the smallest `--memory-budget` at which the multi-pass run needs at most that many passes (the
one-pass run gets the same budget: the same (pair x layer-block) packs become its shares). The two runs alternate
`--repeats` times so that both see the same load on a shared machine; the best time of each is compared.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
from synthetic_sets import SEQ_LEN, write_sets

from actdb.compute.cluster import ClusterSpec, open_client
from actdb.compute.correlation.cluster import correlate_on_cluster, correlate_one_pass
from actdb.compute.correlation.engine import CorrelationOptions, pass_overhead, plan_passes, task_bytes


def worker_peak_mb() -> float:
    """This process's own peak RSS (VmHWM)."""
    with open("/proc/self/status") as fh:
        return next(int(line.split()[1]) for line in fh if line.startswith("VmHWM")) / 1024


def budget_for(sets: list, options: CorrelationOptions, passes: int) -> int:
    """The smallest budget (in steps of a tenth of a task) at which the tasks pack into at most `passes` passes."""
    task = task_bytes(sets[0], sets[1])
    budget = pass_overhead(sets, 1, options, task) + task
    while len(plan_passes(sets, 1, options, budget)) > passes:
        budget += task // 10
    return budget


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sets", type=int, default=3)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--d-mlp", type=int, default=512)
    ap.add_argument("--tokens", type=int, default=32768)
    ap.add_argument("--passes", type=int, default=5)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--dir", help="reuse/keep the data in this folder")
    args = ap.parse_args()
    root = Path(args.dir or tempfile.mkdtemp(prefix="actdb-onepass-bench-"))
    root.mkdir(parents=True, exist_ok=True)
    tokens_n = args.tokens // SEQ_LEN * SEQ_LEN
    sets = write_sets(root, args.sets, args.layers, args.d_mlp, tokens_n)
    tokens = np.zeros((tokens_n // SEQ_LEN, SEQ_LEN), dtype=np.int32)
    mask = np.ones_like(tokens, dtype=bool)
    options = CorrelationOptions(memory_budget=budget_for(sets, CorrelationOptions(), args.passes))
    n_passes = len(plan_passes(sets, 1, options, options.memory_budget))
    print(
        f"data: {args.sets} sets x {args.layers} layers x {args.d_mlp} neurons x {tokens_n:,} tokens (float16), "
        f"memory budget {options.memory_budget / 2**20:.1f} MiB per task: {n_passes} (pair x layer-block) packs; "
        f"{args.workers} worker(s) x 1 thread"
    )
    runs = {"multi-pass": correlate_on_cluster, "one-pass": correlate_one_pass}
    best: dict[str, float] = {}
    results = {}
    with open_client(ClusterSpec(workers=args.workers)) as client:
        for _ in range(args.repeats):
            for name, run in runs.items():
                started = time.perf_counter()
                results[name] = run(client, sets, tokens, mask, options)
                best[name] = min(best.get(name, float("inf")), time.perf_counter() - started)
        peaks = client.run(worker_peak_mb)
    for name, r in results.items():
        print(
            f"{name:>10}: best of {args.repeats} {best[name]:.2f} s, {r.n_passes} read pass(es), read "
            f"{r.bytes_read / 1e6:,.0f} MB of {r.bytes_held / 1e6:,.0f} MB stored (read amplification "
            f"{r.read_amplification:.2f})"
        )
    one, multi = results["one-pass"], results["multi-pass"]
    diff = max(float(np.nanmax(np.abs(one.matches[k].max_corr - multi.matches[k].max_corr))) for k in one.matches)
    print(
        f"one-pass / multi-pass: {multi.bytes_read / one.bytes_read:.2f}x fewer bytes read, "
        f"{best['multi-pass'] / best['one-pass']:.2f}x the speed; max |d max-corr| {diff:.1e}; worker peaks "
        f"{', '.join(f'{v:.0f}' for v in peaks.values())} MB"
    )


if __name__ == "__main__":
    main()
