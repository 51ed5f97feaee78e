"""What does a bit-reproducible zoo cost? Trains the same zoo seeds twice in this process: as version 1 did
(`train_threads=None`: torch's default thread count, non-deterministic algorithms allowed) and as `train_zoo` does
now (`reproducible_training`: a fixed thread count, deterministic algorithms), and prints both wall times, their
ratio, the peak RSS, and whether the two zoos' weights agree bit for bit.

With `--processes`, compares instead the reproducible zoo's seeds trained in turn (one process) with the same
seeds trained side by side (one process per core, as `train_zoo` does): wall and CPU seconds (the children's
included), the wall ratio, and whether every checkpoint's weights agree bit for bit.

    .venv/bin/python benchmarks/zoo_training.py [--seeds 1] [--steps 800] [--fixed-first]
    .venv/bin/python benchmarks/zoo_training.py --processes --seeds 4 --steps 100
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import tempfile
import time
from pathlib import Path

import torch

from actdb.store.device import host_cores
from actdb.store.ingest.zoo import TRAIN_THREADS, checkpoint_dir, train_zoo, weight_digest, zoo_config


def _train(root: Path, seeds: int, steps: int, threads: int | None) -> tuple[float, float, list[str]]:
    """Wall seconds, CPU seconds (all threads) and the weight digests of one zoo training."""
    config = zoo_config(seeds, steps, [steps], train_threads=threads)
    start, cpu = time.perf_counter(), time.process_time()
    train_zoo(root, config, progress=False)
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu
    return seconds, cpu_seconds, [weight_digest(checkpoint_dir(root, k, steps)) for k in range(seeds)]


def _cpu_seconds() -> float:
    """CPU seconds of this process and of its reaped children (the training processes)."""
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + children.ru_utime + children.ru_stime


def _compare_processes(root: Path, seeds: int, steps: int) -> None:
    """The same reproducible zoo trained in turn and side by side; the sequential arm runs first."""
    checkpoints = sorted({0, steps // 4, steps})
    config = zoo_config(seeds, steps, checkpoints)
    results = {}
    for name, processes in (("in turn", 1), ("side by side", None)):
        shutil.copytree(root / "warm" / "tokenizer", root / name / "tokenizer")
        start, cpu = time.perf_counter(), _cpu_seconds()
        train_zoo(root / name, config, progress=False, processes=processes)
        seconds, cpu_seconds = time.perf_counter() - start, _cpu_seconds() - cpu
        digests = [weight_digest(checkpoint_dir(root / name, k, s)) for k in range(seeds) for s in checkpoints]
        results[name] = (seconds, cpu_seconds, digests)
    (turn, turn_cpu, turn_digests), (side, side_cpu, side_digests) = results.values()
    print(f"{seeds} seed(s) x {steps} steps, checkpoints {checkpoints}; {host_cores()} cores; load {os.getloadavg()}")
    print(f"in turn (1 process):             {turn:.1f} s wall, {turn_cpu:.1f} s CPU")
    print(
        f"side by side ({min(seeds, host_cores())} processes): {side:.1f} s wall, {side_cpu:.1f} s CPU "
        f"(wall {side / turn:.2f}x)"
    )
    print(
        f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB (this process), "
        f"{resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024:.0f} MiB (largest training process)"
    )
    print(f"every checkpoint's weights bit-identical between the two: {turn_digests == side_digests}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, default=1)
    ap.add_argument("--steps", type=int, default=800)
    ap.add_argument("--fixed-first", action="store_true", help="train the reproducible zoo first")
    ap.add_argument("--processes", action="store_true", help="seeds in turn vs side by side (reproducible zoo)")
    args = ap.parse_args()
    threads = torch.get_num_threads()
    root = Path(tempfile.mkdtemp(prefix="actdb-zoo-bench-"))
    # the tokenizer is trained once, outside both timings
    train_zoo(root / "warm", zoo_config(1, 1, [1]), progress=False)
    if args.processes:
        _compare_processes(root, args.seeds, args.steps)
        return
    for name in ("default", "fixed"):
        shutil.copytree(root / "warm" / "tokenizer", root / name / "tokenizer")
    if args.fixed_first:  # the other order, to see what warming up costs whichever runs first
        after, after_cpu, after_digests = _train(root / "fixed", args.seeds, args.steps, TRAIN_THREADS)
        before, before_cpu, before_digests = _train(root / "default", args.seeds, args.steps, None)
    else:
        before, before_cpu, before_digests = _train(root / "default", args.seeds, args.steps, None)
        after, after_cpu, after_digests = _train(root / "fixed", args.seeds, args.steps, TRAIN_THREADS)
    print(f"torch {torch.__version__}, {threads} threads by default; {args.seeds} seed(s) x {args.steps} steps")
    print(f"default ({threads} threads, non-deterministic allowed): {before:.1f} s wall, {before_cpu:.1f} s CPU")
    print(
        f"reproducible ({TRAIN_THREADS} thread, deterministic):   {after:.1f} s wall, {after_cpu:.1f} s CPU "
        f"(wall {after / before:.2f}x)"
    )
    print(f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")
    print(f"weights bit-identical between the two: {before_digests == after_digests}")


if __name__ == "__main__":
    main()
