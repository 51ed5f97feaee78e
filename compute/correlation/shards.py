"""The correlation engine cut into pure pieces that run anywhere, for a cluster (`compute.cluster`).

One run is, per pass of (pair x block of layers) tasks that fit a task's memory:

1. `accumulate_shard` over each shard of the sequences: the pass's `X_a^T X_b` sums (and, in the first pass,
   every set's moments) as float64, exactly as the single-process engine accumulates them chunk by chunk;
2. `sum_shards`: the shards' float64 sums added up (in a fixed tree, so a run is reproducible);
3. `finalize_sets` once, from the first pass's moments: covariances and standard deviations;
4. `finalize_pass`: the pass's maxima and rotation baseline (split by ranges of draws over several tasks), with
   rotations built once per set (`base_rotations`) and per draw (`draw_rotations`), as the engine builds them;
5. `merge_pass` on the client, in pass order, with the engine's tie rule (the earlier layer wins).

Shards start on the engine's chunk boundaries, so every chunk product is the one the single-process engine
computes; the only difference is the order of the float64 additions of whole chunks (about 1e-16 relative).
Each piece rebuilds the engine from an `EngineSpec` and the token arrays, so nothing but arrays and small
dataclasses crosses the network.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np

from actdb.compute.correlation.engine import (
    CorrelationEngine,
    CorrelationOptions,
    MatchResult,
    SetInput,
    SetMoments,
    Task,
    TaskGroup,
    merge_topk,
)
from actdb.compute.correlation.rotation_cache import draw_key, rotation
from actdb.compute.similarity.layers import LayerPair
from actdb.store.device import resolve_device
from actdb.store.files.activation import ActivationReader

LayerPairs = dict[tuple[int, int, int, int], LayerPair]


@dataclass(frozen=True)
class EngineSpec:
    """What a worker needs to rebuild the engine: the sets, the options and the device (tokens travel apart,
    scattered once to every worker)."""

    inputs: list[SetInput]
    options: CorrelationOptions
    device: str = "cpu"


@dataclass
class ShardSums:
    """One pass's float64 sums over some sequences; shards of one pass add up to the whole pass."""

    n: int  # counted positions
    token_counts: np.ndarray
    moments: list[SetMoments] | None  # each set's sums and Grams (first pass only)
    blocks: dict[TaskGroup, np.ndarray]  # each group's X_a^T X_b
    bytes_read: dict[str, int] = field(default_factory=dict)  # per file: stored value bytes read for these sums
    bytes_held: dict[str, int] = field(default_factory=dict)  # per file read: its stored value bytes


@dataclass
class SetStatistics:
    """Every set's finished moments (covariances, sds, sums, per-token sums) that each pass's finalize needs."""

    moments: list[SetMoments]
    n: int
    token_counts: np.ndarray
    layer_pairs: LayerPairs | None  # each layer against itself, for similarity runs


@dataclass
class PassResult:
    """A pass's maxima (when `maxima`) and its baselines of `draws`, for the ordered pairs its groups touch."""

    groups: list[TaskGroup]
    results: dict[tuple[int, int], MatchResult]
    layer_pairs: LayerPairs | None
    maxima: bool
    draws: range
    seconds: dict[str, float] = field(default_factory=dict)


def default_shards(threads: int, n_passes: int) -> int:
    """Token shards per pass that give every worker thread an accumulating task (passes already spread); the
    same number of finalize tasks per pass split its baseline draws."""
    return max(1, math.ceil(threads / n_passes))


def draw_ranges(draws: int, parts: int) -> list[range]:
    """Baseline draws cut into at most `parts` consecutive ranges (the first finalize task also takes the maxima)."""
    bounds = np.linspace(0, draws, min(max(1, parts), draws) + 1).round().astype(int)
    return [range(int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:], strict=True)]


def shard_ranges(n_seq: int, seq_len: int, chunk_tokens: int, shards: int) -> list[tuple[int, int]]:
    """Split the sequences into at most `shards` ranges of whole engine chunks (so shard chunks are the run's)."""
    per_chunk = max(1, chunk_tokens // seq_len)
    n_chunks = math.ceil(n_seq / per_chunk)
    bounds = np.linspace(0, n_chunks, min(max(1, shards), n_chunks) + 1).round().astype(int)
    return [(int(a) * per_chunk, min(n_seq, int(b) * per_chunk)) for a, b in zip(bounds[:-1], bounds[1:], strict=True)]


@contextlib.contextmanager
def _engine(spec: EngineSpec, tokens: np.ndarray, mask: np.ndarray, read: bool = False) -> Iterator[CorrelationEngine]:
    readers: list[ActivationReader] = []
    try:
        readers = [ActivationReader(s.path, expected=s.expected) for s in spec.inputs] if read else []
        backend = resolve_device(spec.device).array
        yield CorrelationEngine(spec.inputs, readers, tokens, mask, spec.options, backend, None)
    finally:
        for r in readers:
            r.close()


def accumulate_shard(
    spec: EngineSpec, tokens: np.ndarray, mask: np.ndarray, tasks: list[Task], first: bool, sequences: tuple[int, int]
) -> ShardSums:
    """A pass's sums over the sequences [first, stop)."""
    with _engine(spec, tokens, mask, read=True) as engine:
        acc = engine._accumulate(tasks, first, sequences)
        host = engine.backend.to_numpy
        moments = None
        if first:
            moments = [
                SetMoments(
                    host(m.sums), [host(g) for g in m.grams], None if m.token_sums is None else host(m.token_sums)
                )
                for m in engine.moments
            ]
        read = {str(r.path): r.bytes_read for r in engine.readers if r.bytes_read}
        held = {str(r.path): r.held_bytes for r in engine.readers if r.bytes_read}
        return ShardSums(engine.n, engine.token_counts, moments, {g: host(a) for g, a in acc.items()}, read, held)


def _total(arrays: list[np.ndarray]) -> np.ndarray:
    out = arrays[0].copy()
    for a in arrays[1:]:
        out += a
    return out


def sum_shards(parts: list[ShardSums]) -> ShardSums:
    """The sums of several shards, in fresh arrays (the parts may be held for a retry elsewhere)."""
    moments = None
    if parts[0].moments is not None:
        moments = [
            SetMoments(
                _total([p.moments[i].sums for p in parts]),
                [_total([p.moments[i].grams[layer] for p in parts]) for layer in range(len(m.grams))],
                None if m.token_sums is None else _total([p.moments[i].token_sums for p in parts]),
            )
            for i, m in enumerate(parts[0].moments)
        ]
    blocks = {g: _total([p.blocks[g] for p in parts]) for g in parts[0].blocks}
    read, held = read_totals(parts)
    return ShardSums(sum(p.n for p in parts), _total([p.token_counts for p in parts]), moments, blocks, read, held)


def read_totals(parts: list[ShardSums]) -> tuple[dict[str, int], dict[str, int]]:
    """Bytes read per file over several pieces (added up) and the bytes each file holds."""
    read: dict[str, int] = {}
    held: dict[str, int] = {}
    for p in parts:
        for path, n in p.bytes_read.items():
            read[path] = read.get(path, 0) + n
        held.update(p.bytes_held)
    return read, held


def reads_only(sums: ShardSums) -> ShardSums:
    """A piece's read counts alone (what the client gathers to report the read amplification)."""
    return ShardSums(sums.n, sums.token_counts, None, {}, sums.bytes_read, sums.bytes_held)


def moments_only(sums: ShardSums) -> ShardSums:
    """The first pass's moments without its blocks (what `finalize_sets` needs, a fraction of the size)."""
    return ShardSums(sums.n, sums.token_counts, sums.moments, {})


def finalize_sets(spec: EngineSpec, tokens: np.ndarray, mask: np.ndarray, sums: ShardSums) -> SetStatistics:
    """Covariances and standard deviations of every set from the summed moments."""
    with _engine(spec, tokens, mask) as engine:
        dev = engine.backend.asarray
        engine.moments = [
            SetMoments(dev(m.sums), [dev(g) for g in m.grams], None if m.token_sums is None else dev(m.token_sums))
            for m in sums.moments
        ]
        engine.n, engine.token_counts = sums.n, sums.token_counts
        engine._finalize_sets()
        host = engine.backend.to_numpy
        moments = [
            SetMoments(
                host(m.sums),
                [],
                None if m.token_sums is None else host(m.token_sums),
                [host(c) for c in m.cov],
                host(m.sd),
            )
            for m in engine.moments
        ]
        pairs = None if engine.similarity is None else engine.similarity.pairs
        return SetStatistics(moments, sums.n, sums.token_counts, pairs)


def set_summary(stats: SetStatistics) -> SetStatistics:
    """What the client keeps of the set statistics: standard deviations and layer pairs, no covariances."""
    moments = [SetMoments(None, [], None, [], m.sd) for m in stats.moments]
    return SetStatistics(moments, stats.n, stats.token_counts, stats.layer_pairs)


def draw_rotations(
    widths: list[int], seed: int, draws: int, cache: str | None = None
) -> dict[tuple[int, int], np.ndarray]:
    """The rotations P_k of draws 1.. shared by every set of each width (float32), as the engine draws them
    (from the rotation cache folder `cache` when given)."""
    return {(d, k): rotation(cache, draw_key(d, seed, k)) for d in widths for k in range(1, draws)}


def finalize_pass(
    spec: EngineSpec,
    tokens: np.ndarray,
    mask: np.ndarray,
    sums: ShardSums,
    stats: SetStatistics,
    rotations: dict[int, list[np.ndarray]],
    draws: dict[tuple[int, int], np.ndarray],
    maxima: bool = True,
    which: range | None = None,
) -> PassResult:
    """One pass's maxima (when `maxima`) and rotation baseline of the draws `which` (default: all). The summed
    blocks are copied before they become covariances: several such tasks read them."""
    with _engine(spec, tokens, mask) as engine:
        backend = engine.backend
        engine.n, engine.token_counts = stats.n, stats.token_counts
        engine.moments = [
            SetMoments(
                backend.asarray(m.sums),
                [],
                None if m.token_sums is None else backend.asarray(m.token_sums),
                [backend.asarray(c) for c in m.cov],
                backend.asarray(m.sd),
            )
            for m in stats.moments
        ]
        if engine.control:
            engine.inv_counts = backend.asarray(1.0 / np.maximum(stats.token_counts, 1))
        engine.base_cache = dict(rotations)
        engine.draw_rotations = {k: backend.asarray(v) for k, v in draws.items()}
        groups = list(sums.blocks)
        which = range(spec.options.baseline_draws) if which is None else which
        blocks = {g: backend.asarray(b) for g, b in sums.blocks.items()}
        blocks = {g: b.copy() if b is sums.blocks[g] else b for g, b in blocks.items()}
        engine._finalize_pass(blocks, maxima, which)
        touched = {(g.a, g.b) for g in groups} | {(g.b, g.a) for g in groups}
        results = {pair: engine.results[pair] for pair in touched}
        pairs = None if engine.similarity is None else engine.similarity.pairs
        return PassResult(groups, results, pairs, maxima, which, dict(engine.seconds))


def merge_pass(results: dict[tuple[int, int], MatchResult], part: PassResult, inputs: list[SetInput]) -> None:
    """Fold a piece of a pass into the run's results, passes in order: a's rows of each group are the pass's own
    (its baseline rows per draw range); b's running maxima over a's layers keep the earlier value on ties, as the
    engine does, and its baselines are maxima too (draws a piece did not compute stay -inf there)."""
    draws = slice(part.draws.start, part.draws.stop)
    for g in part.groups:
        rows = slice(g.start * inputs[g.a].d_mlp, g.stop * inputs[g.a].d_mlp)
        src, dst = part.results[(g.a, g.b)], results[(g.a, g.b)]
        dst.baseline[draws, rows] = src.baseline[draws, rows]
        if not part.maxima:
            continue
        dst.max_corr[rows], dst.best[rows] = src.max_corr[rows], src.best[rows]
        if dst.topk_idx is not None:
            dst.topk_idx[rows], dst.topk_val[rows] = src.topk_idx[rows], src.topk_val[rows]
        if dst.self_corr is not None:
            dst.self_corr[rows] = src.self_corr[rows]
            results[(g.b, g.a)].self_corr[rows] = part.results[(g.b, g.a)].self_corr[rows]
    for b, a in sorted({(g.b, g.a) for g in part.groups}):
        src, dst = part.results[(b, a)], results[(b, a)]
        np.maximum(dst.baseline, src.baseline, out=dst.baseline)
        if not part.maxima:
            continue
        better = src.max_corr > dst.max_corr
        dst.max_corr[better], dst.best[better] = src.max_corr[better], src.best[better]
        if dst.topk_idx is not None:
            merge_topk(dst, src.topk_val, src.topk_idx)


def merge_layer_pairs(total: LayerPairs, part: LayerPairs) -> None:
    """Fold a piece's layer-pair statistics in: each statistic is set by exactly one piece, baselines per draw."""
    for key, p in part.items():
        t = total.setdefault(key, LayerPair())
        if not math.isnan(p.mean_max_corr):
            t.mean_max_corr = p.mean_max_corr
        if not math.isnan(p.cka):
            t.cka = p.cka
        if p.matched_corr is not None:
            t.matched_corr = p.matched_corr
        t.baseline.update(p.baseline)
