"""A correlation run on a Dask cluster: the engine's pieces (`correlation_shards`) as one task graph.

`correlate_one_pass` (what `actdb correlate --workers/--scheduler` runs) reads every chunk of tokens once: the
(pair x block of layers) packs that fit one task's memory are accumulator shares held at once across the
workers, each fed every chunk in order (`compute.correlation.onepass`). `correlate_on_cluster`, the multi-pass
run it replaces (kept as the benchmarks' baseline), runs the packs as passes: per pass, one task per token shard
accumulates the pass's sums and a fixed binary tree adds the shards, so every pass reads the tokens again.

Either way, as many tasks finalize each pass (or share), each a range of the baseline's draws (the first also
the maxima). The first pass (share) also carries every set's moments, finalized once. Rotations are built once
per set and per draw and shipped to the finalize tasks that need them. Dask reruns the tasks of a worker that
dies (a killed process, a preempted node) from what they were computed from, so a run survives losing workers;
the results equal the single-process engine's run with the same BLAS (see `correlation_shards`).
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
    task_bytes,
)
from actdb.compute.correlation.onepass import (
    add_chunk,
    chunk_count,
    read_part,
    share_sums,
    shares_per_round,
    start_share,
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
    read_totals,
    reads_only,
    set_summary,
    shard_ranges,
    sum_shards,
)
from actdb.store.device import NUMPY, resolve_device
from actdb.store.errors import ActdbError

WINDOW = 3  # chunks a one-pass run has in flight (read, or being added) at a time


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
    held: list[Any] = []
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
        finals, held = _finalize(submit, spec, tok, msk, inputs, options, passes, summed, shards)
        del summed, parts
        _watch(rows, progress)
        return _collect(inputs, options, len(passes), held, finals, started)
    except BaseException:
        client.cancel([*rows, *finals, *held])
        raise


def correlate_one_pass(
    client: Any,
    inputs: list[SetInput],
    tokens: np.ndarray,
    mask: np.ndarray,
    options: CorrelationOptions,
    device: str = "cpu",
    progress: Callable[[int], None] | None = None,
    window: int = WINDOW,
) -> CorrelationResult:
    """Correlate every pair of `inputs` on the cluster behind `client`, reading each chunk of tokens once.

    The (pair x layer-block) packs that fit one task's memory become accumulator shares, all held at once across
    the workers (as many rounds as their memory needs: one, unless the shares exceed what the workers hold), each
    a chain of tasks fed every chunk in order (`compute.correlation.onepass`); each (chunk, set) is read by one
    task and Dask hands it to the shares that need it. At most `window` chunks are in flight at a time, so parts
    do not pile up in memory. The shares' sums are finalized as a multi-pass run's passes are; `progress(rows)`
    is called as every share has taken a chunk."""
    if len(inputs) < 2:
        raise ActdbError("correlation needs at least two activation sets")
    options = cluster_options(client, options)
    n_seq, seq_len = tokens.shape
    n_vocab = len(np.unique(tokens[mask]))
    shares = plan_passes(inputs, n_vocab, options, options.memory_budget)
    share_bytes = max(sum(task_bytes(inputs[t.a], inputs[t.b]) for t in tasks) for tasks in shares)
    workers = client.scheduler_info()["workers"]
    per_round = shares_per_round(len(shares), share_bytes, [w.get("memory_limit") for w in workers.values()])
    rounds = [list(range(i, min(len(shares), i + per_round))) for i in range(0, len(shares), per_round)]
    addresses = sorted(workers)
    n_chunks = chunk_count(n_seq, seq_len, options.chunk_tokens)
    per_chunk = max(1, options.chunk_tokens // seq_len)  # sequences
    run, counter = uuid.uuid4().hex[:8], itertools.count()
    started = time.perf_counter()

    def submit(name: str, fn: Callable, *args: Any, **kwargs: Any) -> Any:
        return client.submit(fn, *args, key=f"actdb-{name}-{run}-{next(counter)}", pure=False, **kwargs)

    states: dict[int, Any] = {}
    finals: list[Any] = []
    held: list[Any] = []
    try:
        spec = client.scatter(EngineSpec(inputs, options, device), broadcast=True, hash=False)
        tok, msk = client.scatter([tokens, mask], broadcast=True, hash=False)
        summed: dict[int, Any] = {}
        for r, members in enumerate(rounds):
            needs = {s: sorted({t.a for t in shares[s]} | {t.b for t in shares[s]}) for s in members}
            if r == 0:
                needs[members[0]] = list(range(len(inputs)))  # the moments take every set
            read = sorted({i for s in members for i in needs[s]})
            needs[members[0]] = read  # the first share of a round counts every part read
            # each share lives on one worker (spread round robin): a hint, so that a lost worker's shares are
            # recomputed elsewhere
            home = {
                s: {"workers": [addresses[n % len(addresses)]], "allow_other_workers": True}
                for n, s in enumerate(members)
            }
            for s in members:
                states[s] = submit("share", start_share, run, spec, tok, msk, shares[s], **home[s])
            in_flight: list[tuple[int, list[Any]]] = []
            for k in range(n_chunks):
                parts = {i: submit(f"read-c{k}", read_part, spec, tok, msk, k, i) for i in read}
                for s in members:
                    first = s == members[0]
                    args = (run, spec, tok, msk, states[s], k, r == 0 and first, first)
                    states[s] = submit(f"add-s{s}-c{k}", add_chunk, *args, *[parts[i] for i in needs[s]], **home[s])
                n_rows = (min(n_seq, (k + 1) * per_chunk) - k * per_chunk) * seq_len
                in_flight.append((n_rows, [states[s] for s in members]))
                del parts
                while len(in_flight) > window or (k == n_chunks - 1 and in_flight):
                    _wait_chunk(in_flight.pop(0), progress)
            for s in members:
                summed[s] = submit("sums", share_sums, states.pop(s), device)
        ordered = [summed[s] for s in range(len(shares))]
        del summed
        finals, held = _finalize(submit, spec, tok, msk, inputs, options, shares, ordered, worker_threads(client))
        del ordered
        return _collect(inputs, options, len(rounds), held, finals, started)
    except BaseException:
        client.cancel([*states.values(), *finals, *held])
        raise


def _wait_chunk(chunk: tuple[int, list[Any]], progress: Callable[[int], None] | None) -> None:
    """Wait until every share has taken a chunk (a failed step raises its error here), then report its rows."""
    from distributed import wait

    n_rows, steps = chunk
    wait(steps)
    for f in steps:
        if f.status == "error":
            f.result()
    if progress is not None:
        progress(n_rows)


def _finalize(
    submit: Callable,
    spec: Any,
    tok: Any,
    msk: Any,
    inputs: list[SetInput],
    options: CorrelationOptions,
    passes: list,
    summed: list[Any],
    pieces: int,
) -> tuple[list[Any], list[Any]]:
    """The finalize graph over each pass's (or share's) summed futures: the sets' statistics once, then each
    pass's maxima and baseline split into `pieces` ranges of draws. Returns the finalize futures and those the
    client gathers besides (the set summary first, then each pass's read counts)."""
    stats = submit("sets", finalize_sets, spec, tok, msk, submit("moments", moments_only, summed[0]))
    seed, cache = options.baseline_seed, options.rotation_cache
    rotations = {i: submit("rotations", base_rotations, s, seed, cache) for i, s in enumerate(inputs)}
    widths = sorted({s.d_mlp for s in inputs})
    draws = submit("draws", draw_rotations, widths, seed, options.baseline_draws, cache)
    split = draw_ranges(options.baseline_draws, pieces)
    finals = []
    for p, tasks in enumerate(passes):
        involved = {t.a for t in tasks} | {t.b for t in tasks}
        mine = {i: rotations[i] for i in sorted(involved)}
        for k, which in enumerate(split):  # the first piece also takes the maxima
            args = (spec, tok, msk, summed[p], stats, mine, draws, k == 0, which)
            finals.append(submit(f"finalize-p{p}", finalize_pass, *args))
    held = [submit("summary", set_summary, stats), *(submit("reads", reads_only, s) for s in summed)]
    return finals, held


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
    n_passes: int,
    held: list[Any],
    finals: list[Any],
    started: float,
) -> CorrelationResult:
    """Fold the passes' results in order into the run's, as the single-process engine would have them, with the
    bytes the run read."""
    stats = held[0].result()
    read, files = read_totals([f.result() for f in held[1:]])
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
    result = assemble_result(inputs, results, sds, stats.n, n_passes, phases, pairs, precision)
    result.bytes_read, result.bytes_held = sum(read.values()), sum(files.values())
    return result
