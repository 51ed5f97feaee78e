"""A correlation run on a Dask cluster: the engine's pieces (`correlation_shards`) as one task graph.

Per pass of (pair x block of layers) tasks that fit one task's memory, one task per token shard accumulates the
pass's sums; a fixed binary tree adds the shards; as many tasks finalize the pass, each a range of the baseline's
draws (the first also the maxima). The first pass also carries every
set's moments, finalized once. Rotations are built once per set and per draw and shipped to the finalize tasks
that need them. Dask reruns the tasks of a worker that dies (a killed process, a preempted node) from what they
were computed from, so a run survives losing workers; the results equal the single-process engine's run with
the same BLAS (see `correlation_shards`).
"""

from __future__ import annotations

import itertools
import time
import uuid
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import numpy as np

from actdb.compute.cluster import task_budget, worker_threads
from actdb.compute.correlation.engine import (
    CorrelationOptions,
    CorrelationResult,
    SetInput,
    assemble_result,
    base_rotations,
    empty_results,
    memory_budget,
    plan_passes,
)
from actdb.compute.correlation.precision import ProductPrecision, check_precision
from actdb.compute.correlation.shards import (
    EngineSpec,
    accumulate_shard,
    default_shards,
    draw_ranges,
    draw_rotations,
    finalize_pass,
    finalize_sets,
    merge_layer_pairs,
    merge_pass,
    moments_only,
    set_summary,
    shard_ranges,
    sum_shards,
)
from actdb.store.device import NUMPY, resolve_device
from actdb.store.errors import ActdbError


def cluster_options(client: Any, options: CorrelationOptions) -> CorrelationOptions:
    """The options tasks run with: the memory budget of one task (`--memory-budget`, else a share of a worker's
    memory) and a fixed product precision (`auto` would let each GPU worker decide for itself: float32)."""
    budget = options.memory_budget or task_budget(client, fallback=memory_budget(options, NUMPY))
    precision = "float32" if options.precision == "auto" else options.precision
    return replace(options, memory_budget=budget, precision=precision)


def worker_backend(client: Any, device: str, precision: str) -> str:
    """The array backend's name for `device` as a worker resolves it (workers may have GPUs the client lacks),
    after checking there that it can run `precision`; a one-line error when it cannot."""
    return client.submit(_resolve_backend, device, precision, pure=False).result()


def _resolve_backend(device: str, precision: str) -> str:
    backend = resolve_device(device).array
    check_precision(precision, backend)
    return backend.name


def correlate_on_cluster(
    client: Any,
    inputs: list[SetInput],
    tokens: np.ndarray,
    mask: np.ndarray,
    options: CorrelationOptions,
    device: str = "cpu",
    progress: Callable[[int], None] | None = None,
    shards: int | None = None,
) -> CorrelationResult:
    """Correlate every pair of `inputs` on the cluster behind `client`; `shards` token shards per pass, and as
    many finalize tasks splitting its baseline draws (default: enough to give every worker thread a task).
    `progress(rows)` is called as each shard finishes."""
    if len(inputs) < 2:
        raise ActdbError("correlation needs at least two activation sets")
    options = cluster_options(client, options)
    n_seq, seq_len = tokens.shape
    n_vocab = len(np.unique(tokens[mask]))
    passes = plan_passes(inputs, n_vocab, options, options.memory_budget)
    shards = shards or default_shards(worker_threads(client), len(passes))
    ranges = shard_ranges(n_seq, seq_len, options.chunk_tokens, shards)
    run, counter = uuid.uuid4().hex[:8], itertools.count()
    started = time.perf_counter()

    def submit(name: str, fn: Callable, *args: Any) -> Any:
        return client.submit(fn, *args, key=f"actdb-{name}-{run}-{next(counter)}", pure=False)

    # Only the futures still needed here are referenced, so that Dask frees each shard's sums once they are added
    # into the next level of the tree (and the set statistics once the last pass is finalized).
    rows: dict[Any, int] = {}  # shard futures not yet reported -> positions they read
    finals: list[Any] = []
    summary = None
    try:
        spec = client.scatter(EngineSpec(inputs, options, device), broadcast=True, hash=False)
        tok, msk = client.scatter([tokens, mask], broadcast=True, hash=False)
        summed = []
        for p, tasks in enumerate(passes):
            parts = []
            for r in ranges:
                part = submit(f"accumulate-p{p}", accumulate_shard, spec, tok, msk, tasks, p == 0, r)
                rows[part] = (r[1] - r[0]) * seq_len
                parts.append(part)
            while len(parts) > 1:  # a fixed tree: the same additions in the same order on every run
                parts = [
                    submit(f"sum-p{p}", sum_shards, parts[i : i + 2]) if i + 1 < len(parts) else parts[i]
                    for i in range(0, len(parts), 2)
                ]
            summed.append(parts[0])
        stats = submit("sets", finalize_sets, spec, tok, msk, submit("moments", moments_only, summed[0]))
        seed, cache = options.baseline_seed, options.rotation_cache
        rotations = {i: submit("rotations", base_rotations, s, seed, cache) for i, s in enumerate(inputs)}
        widths = sorted({s.d_mlp for s in inputs})
        draws = submit("draws", draw_rotations, widths, seed, options.baseline_draws, cache)
        split = draw_ranges(options.baseline_draws, shards)
        for p, tasks in enumerate(passes):
            involved = {t.a for t in tasks} | {t.b for t in tasks}
            mine = {i: rotations[i] for i in sorted(involved)}
            for k, which in enumerate(split):  # the first piece also takes the maxima
                args = (spec, tok, msk, summed[p], stats, mine, draws, k == 0, which)
                finals.append(submit(f"finalize-p{p}", finalize_pass, *args))
        summary = submit("summary", set_summary, stats)
        del summed, parts, stats, rotations, mine, draws
        _watch(rows, progress)
        return _collect(inputs, options, passes, summary, finals, started)
    except BaseException:
        client.cancel([*rows, *finals, *([summary] if summary is not None else [])])
        raise


def _watch(rows: dict[Any, int], progress: Callable[[int], None] | None) -> None:
    """Report each shard as it finishes, and forget it; a failed shard raises its error here (a one-line
    ActdbError from a worker stays one line)."""
    from distributed import as_completed

    for future in as_completed(list(rows)):
        if future.status == "error":
            future.result()
        if progress is not None:
            progress(rows[future])
        del rows[future]


def _collect(
    inputs: list[SetInput],
    options: CorrelationOptions,
    passes: list,
    summary: Any,
    finals: list[Any],
    started: float,
) -> CorrelationResult:
    """Fold the passes' results in order into the run's, as the single-process engine would have them."""
    stats = summary.result()
    results = empty_results(inputs, options.topk, options.baseline_draws)
    pairs = None
    if options.layer_similarity:
        pairs = {}
        merge_layer_pairs(pairs, stats.layer_pairs)
    phases: dict[str, float] = {}
    for future in finals:
        part = future.result()
        merge_pass(results, part, inputs)
        if pairs is not None:
            merge_layer_pairs(pairs, part.layer_pairs)
        for phase, s in part.seconds.items():
            phases[f"workers {phase}"] = phases.get(f"workers {phase}", 0.0) + s
    phases["cluster"] = time.perf_counter() - started
    sds = [m.sd for m in stats.moments]
    precision = ProductPrecision(options.precision)
    return assemble_result(inputs, results, sds, stats.n, len(passes), phases, pairs, precision)
