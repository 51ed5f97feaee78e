"""One read pass per step: the pieces of a correlation run whose accumulators are sharded across workers.

The multi-pass cluster run (`compute.correlation.cluster.correlate_on_cluster`) packs (pair x layer-block) tasks
into passes that fit one task's memory and reads every chunk of tokens again in each pass. Here the same packs
are *shares*, all alive at once, each a chain of Dask tasks that owns its float64 accumulators for the whole
pass:

1. `read_part`: one set's rows of one chunk of whole sequences, read once from its file (shifted float32, as the
   engine reads them), with the bytes the reader returned;
2. `start_share` then `add_chunk` per chunk, in chunk order: a share adds the chunk's products into its
   accumulators (share 0 also every set's moments). Dask hands each part to every share that needs it with its
   own worker-to-worker transfers, and keeps a chain on the worker holding its accumulators (they are far larger
   than a chunk);
3. `share_sums`: a share's finished sums, the same `ShardSums` a multi-pass run's shards add up to, finalized by
   the same tasks.

A chain adds its chunks in the single-process engine's order, so its sums are that engine's bit for bit with
the same BLAS. A step adds into the accumulators it is given (no copy of a multi-GB array per chunk); each
state names the chunk it expects next, so a step that ever saw its input twice would fail loudly rather than
count a chunk twice. A lost worker's chains are recomputed by Dask from their lineage (their parts read again).
"""

from __future__ import annotations

import math
import threading
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np

from actdb.compute.correlation.engine import CorrelationEngine, SetMoments, Task, _read_chunks
from actdb.compute.correlation.shards import EngineSpec, ShardSums
from actdb.store.device import resolve_device
from actdb.store.files.activation import ActivationReader

HOLD_SHARE = 0.5  # of a worker's memory the shares it holds may use (the rest: parts in flight, finalizing)
ENGINES_KEPT = 2  # engines (per worker thread) kept between steps: one per run in flight


@dataclass
class ChunkPart:
    """One set's counted rows of one chunk (shifted float32, n_counted x neurons) and what reading them cost."""

    set_index: int
    n_rows: int  # positions of the chunk, counted or not
    ids: np.ndarray  # token ids of the counted positions
    values: np.ndarray
    path: str
    bytes_read: int
    bytes_held: int

    def __sizeof__(self) -> int:
        """What Dask weighs when it moves or places a part (its default for an object is the bare object's size)."""
        return self.values.nbytes + self.ids.nbytes + 64


@dataclass
class ShareState:
    """A share's accumulators (device arrays) after the chunks before `next_chunk`.

    Dask sizes it as a bare object (it knows no better): its worker never spills the accumulators (writing GBs per
    chunk), and the keys of a chain's consecutive steps, one object, are not counted twice; the client keeps each
    chain on its worker with a placement hint instead of relying on Dask weighing the accumulators."""

    sums: ShardSums
    next_chunk: int


def chunk_count(n_seq: int, seq_len: int, chunk_tokens: int) -> int:
    """Chunks of whole sequences the engine reads the tokens in."""
    return math.ceil(n_seq / max(1, chunk_tokens // seq_len))


def shares_per_round(n_shares: int, share_bytes: int, worker_memory: list[int | None]) -> int:
    """How many shares the workers hold at once: per worker, as many as fit `HOLD_SHARE` of its memory (at least
    one); every share when a worker sets no limit."""
    if not worker_memory or any(not m for m in worker_memory):
        return n_shares
    return max(1, sum(max(1, int(m * HOLD_SHARE // max(1, share_bytes))) for m in worker_memory))


_local = threading.local()


def _engine(run: str, spec: EngineSpec, tokens: np.ndarray, mask: np.ndarray) -> CorrelationEngine:
    """This thread's engine for `run` (without readers), kept between steps: building one indexes the tokens."""
    engines: OrderedDict[str, CorrelationEngine] = getattr(_local, "engines", None) or OrderedDict()
    _local.engines = engines
    if run not in engines:
        backend = resolve_device(spec.device).array
        engines[run] = CorrelationEngine(spec.inputs, [], tokens, mask, spec.options, backend, None)
        while len(engines) > ENGINES_KEPT:
            engines.popitem(last=False)
    engines.move_to_end(run)
    return engines[run]


def read_part(spec: EngineSpec, tokens: np.ndarray, mask: np.ndarray, chunk: int, set_index: int) -> ChunkPart:
    """Set `set_index`'s rows of chunk `chunk`, read and checked (checksums, header) as the engine reads them."""
    s, seq_len = spec.inputs[set_index], tokens.shape[1]
    seqs = max(1, spec.options.chunk_tokens // seq_len)
    sequences = (chunk * seqs, min(tokens.shape[0], (chunk + 1) * seqs))
    with ActivationReader(s.path, expected=s.expected) as reader:
        readers = [reader if i == set_index else None for i in range(len(spec.inputs))]
        flat_tokens, flat_mask = tokens.reshape(-1), mask.reshape(-1)
        args = (readers, spec.inputs, [set_index], flat_tokens, flat_mask, seq_len, spec.options.chunk_tokens)
        n_rows, ids, values = next(_read_chunks(*args, sequences=sequences))
        return ChunkPart(set_index, n_rows, ids, values[set_index], s.path, reader.bytes_read, reader.held_bytes)


def start_share(run: str, spec: EngineSpec, tokens: np.ndarray, mask: np.ndarray, tasks: list[Task]) -> ShareState:
    """A share's zero accumulators before chunk 0 (the moments, for the share that holds them, come with its
    first chunk)."""
    engine = _engine(run, spec, tokens, mask)
    return ShareState(ShardSums(0, np.zeros(engine.n_vocab), None, engine._zero_accumulators(tasks)), 0)


def add_chunk(
    run: str,
    spec: EngineSpec,
    tokens: np.ndarray,
    mask: np.ndarray,
    state: ShareState,
    chunk: int,
    moments: bool,
    counts: bool,
    *parts: ChunkPart,
) -> ShareState:
    """Add chunk `chunk`'s products (from its `parts`, one per set the share needs) into the share's accumulators,
    in place. The share holding the moments (`moments`) is given every set's part and adds every set's sums and
    Grams; the one that `counts` is given every part read for this round and adds up the bytes read, each part
    once."""
    if state.next_chunk != chunk:
        raise RuntimeError(f"an accumulator share expected chunk {state.next_chunk} and was given chunk {chunk}")
    engine = _engine(run, spec, tokens, mask)
    sums = state.sums
    if counts:
        for p in parts:
            sums.bytes_read[p.path] = sums.bytes_read.get(p.path, 0) + p.bytes_read
            sums.bytes_held[p.path] = p.bytes_held
    if moments:
        if sums.moments is None:
            sums.moments = engine._zero_moments()
        engine.moments, engine.n, engine.token_counts = sums.moments, sums.n, sums.token_counts
        values = {p.set_index: p.values for p in parts}
    else:
        used = {g.a for g in sums.blocks} | {g.b for g in sums.blocks}
        values = {p.set_index: p.values for p in parts if p.set_index in used}
    out = {g: engine._out(a.shape) for g, a in sums.blocks.items()}
    engine._add_chunk(sums.blocks, out, parts[0].ids, values, moments)
    if moments:
        sums.n, sums.token_counts = engine.n, engine.token_counts
    state.next_chunk = chunk + 1
    return state


def share_sums(state: ShareState, device: str) -> ShardSums:
    """A finished share's sums on the host (what the finalize tasks take)."""
    host = resolve_device(device).array.to_numpy
    s = state.sums
    moments = None
    if s.moments is not None:
        moments = [
            SetMoments(host(m.sums), [host(g) for g in m.grams], None if m.token_sums is None else host(m.token_sums))
            for m in s.moments
        ]
    blocks = {g: host(a) for g, a in s.blocks.items()}
    return ShardSums(s.n, s.token_counts, moments, blocks, s.bytes_read, s.bytes_held)
