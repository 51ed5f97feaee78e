"""Blocked streaming correlation engine: one pass over the tokens accumulates every pair's cross-moments.

For K activation sets on one token dataset it streams chunks of counted positions once and accumulates, per
unordered pair (a, b) and per layer of a, `X_a^T X_b` (float32 GEMM per chunk added into float64), plus each
set's sums and within-layer Gram matrices. Data are shifted by each neuron's stored mean first, so the
float64 moments carry no cancellation. Pearson r, the best match over all neurons of all layers of the other
set, and the rotation baseline follow from the moments without a second pass: `corr(a, bR)` uses
`Cov_ab R` and `R^T Cov_b R`. With the token control, per-token-id sums are accumulated in the same pass and
each covariance loses its between-token part `S_a^T diag(1/n_v) S_b`.

The work is a list of pure tasks (pair x layer of a); a planner packs tasks into passes that fit memory.
Nothing of size n_tokens x neurons is ever held.
"""

from __future__ import annotations

import contextlib
import queue
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np

from actdb.compute.correlation.adaptive import refine_baseline
from actdb.compute.correlation.moments import SD_EPS, inverse_sd
from actdb.compute.correlation.precision import ProductPrecision, choose_precision, products_in
from actdb.compute.correlation.rotation_cache import base_key, draw_key, fill, rotation
from actdb.compute.similarity.layers import LayerPair, LayerSimilarity
from actdb.store.device import ArrayBackend
from actdb.store.errors import ActdbError
from actdb.store.files.activation import ActivationHeader, ActivationReader
from actdb.store.files.raw_chunks import float32_rows

READ_AHEAD = 2  # chunks the GPU backend reads ahead on a thread

CONTROLS = ("none", "token")  # a run's control: none, or the token control (each token id's mean activation subtracted)


@dataclass(frozen=True)
class SetInput:
    """One activation set taking part: its file, shape and the per-neuron shift (stored means).

    `rotation_key` is the set's model id: it seeds the baseline rotation, so every checkpoint of a model is
    rotated the same way and identical activations get identical baselines at any step. `expected` is the header
    SQL says the file carries: every reader (here, or a cluster worker) refuses a file that disagrees.
    """

    key: int
    path: str
    n_layers: int
    d_mlp: int
    shift: np.ndarray
    rotation_key: int = 0
    expected: ActivationHeader | None = None

    @property
    def n_neurons(self) -> int:
        return self.n_layers * self.d_mlp


@dataclass(frozen=True)
class CorrelationOptions:
    control: str = "none"  # "none" or "token"
    baseline_seed: int = 0
    topk: int = 0
    chunk_tokens: int = 8192
    memory_budget: int | None = None
    baseline_draws: int = 8  # independent rotations per model; each costs products with covariances, no pass
    layer_similarity: bool = False  # also collect layer-pair similarity of every pair of sets (and each with itself)
    precision: str = "auto"  # products on CUDA: "auto" (TF32 where a measured check allows), "tf32" or "float32"
    # adaptive draws (compute/correlation/adaptive.py): after the K draws, more for the neurons whose label at
    # this threshold is undecided at `adaptive_confidence`, up to `max_draws`; None: K draws for every neuron
    adaptive_threshold: float | None = None
    adaptive_confidence: float = 0.95
    max_draws: int = 32  # benchmarks/label_stability.py --synthetic: Jaccard 0.938 between seeds at +8.9 % CPU
    # a folder of cached Haar rotations (compute/correlation/rotation_cache.py; a run uses its store's), so no
    # pass or run computes a QR twice; None: computed in memory
    rotation_cache: str | None = None


@dataclass
class MatchResult:
    """Neurons of set a against all neurons of set b (flat index = layer * d_mlp + neuron)."""

    max_corr: np.ndarray
    best: np.ndarray
    baseline: np.ndarray  # (draws, n_a): the max corr against each rotated copy of b
    self_corr: np.ndarray | None = None
    topk_idx: np.ndarray | None = None
    topk_val: np.ndarray | None = None
    extra: np.ndarray | None = None  # (max_draws - draws, n_a): adaptive draws, NaN where not taken

    @property
    def baseline_mean(self) -> np.ndarray:
        return self.baseline.mean(axis=0)

    @property
    def baseline_sd(self) -> np.ndarray:
        """Standard deviation over draws (NaN with a single draw)."""
        if self.baseline.shape[0] < 2:
            return np.full(self.baseline.shape[1], np.nan)
        return self.baseline.std(axis=0, ddof=1)


@dataclass
class CorrelationResult:
    matches: dict[tuple[int, int], MatchResult]
    dead: dict[int, np.ndarray]
    n_tokens: int
    n_passes: int
    seconds: dict[str, float] = field(default_factory=dict)  # "accumulate", "maxima", "baseline"
    layers: dict[tuple[int, int, int, int], LayerPair] | None = None  # (set key, other key, layer, other layer)
    precision: ProductPrecision = field(default_factory=lambda: ProductPrecision("float32"))
    bytes_read: int = 0  # stored value bytes the readers returned, over every pass (and re-read, if any)
    bytes_held: int = 0  # stored value bytes of the sets' files
    cpu_seconds: dict[str, float] = field(default_factory=dict)  # the same phases in process CPU seconds

    @property
    def read_amplification(self) -> float:
        """Bytes read over the bytes the files hold: 1.0 when every stored byte was read once."""
        return self.bytes_read / self.bytes_held if self.bytes_held else float("nan")


@dataclass(frozen=True)
class Task:
    """Accumulate rows of one layer of set `a` against all neurons of set `b`."""

    a: int
    b: int
    layer: int


@dataclass(frozen=True)
class TaskGroup:
    """Consecutive layers [start, stop) of set `a` against set `b`, accumulated with one GEMM per chunk."""

    a: int
    b: int
    start: int
    stop: int


def group_tasks(tasks: list[Task]) -> list[TaskGroup]:
    """Merge a pass's tasks into runs of consecutive layers of the same pair (bigger, faster GEMMs)."""
    groups: list[TaskGroup] = []
    for t in tasks:
        last = groups[-1] if groups else None
        if last is not None and (last.a, last.b, last.stop) == (t.a, t.b, t.layer):
            groups[-1] = TaskGroup(t.a, t.b, last.start, t.layer + 1)
        else:
            groups.append(TaskGroup(t.a, t.b, t.layer, t.layer + 1))
    return groups


@dataclass
class SetMoments:
    """A set's float64 sums, within-layer Grams and per-token-id sums; then its covariances and sds."""

    sums: object
    grams: list
    token_sums: object | None = None
    cov: list = field(default_factory=list)
    sd: object = None


def pass_overhead(inputs: list[SetInput], n_vocab: int, options: CorrelationOptions, largest_task: int) -> int:
    """Bytes a pass holds besides its tasks' accumulators, when its largest task block is `largest_task` bytes."""
    chunk = options.chunk_tokens
    fixed = 0
    for s in inputs:
        # per set: float64 sums (N) + within-layer Grams (L d^2) + the chunk as float32, twice (the device copy
        # and, on GPUs, the chunk read ahead on the host)
        fixed += s.n_neurons * 8 + s.n_layers * s.d_mlp**2 * 8 + 2 * chunk * s.n_neurons * 4 * 2
        if options.control == "token":
            fixed += n_vocab * s.n_neurons * 8  # float64 per-token-id sums
    # finalizing one block holds about six float64 temporaries of its size (cov, r, Cov_ab R, its ratio, R^T Cov,
    # and the maxima's working copies) plus one more chunk of the widest set; the baseline holds one set's draw-0
    # rotations and one draw's (L d^2 each, with as much again while they are built) and the draw rotations
    # P_k shared by all sets ((K - 1) d^2)
    widest = max(s.d_mlp for s in inputs)
    rotations = max(3 * s.n_layers * s.d_mlp**2 * 8 for s in inputs) + (options.baseline_draws - 1) * widest**2 * 8
    finalize = 6 * largest_task + chunk * max(s.n_neurons for s in inputs) * 4 + rotations
    return fixed + finalize


def task_bytes(a: SetInput, b: SetInput) -> int:
    """Accumulator bytes of one (pair x layer-of-a) task: float64 sum + float32 GEMM output."""
    return a.d_mlp * b.n_neurons * 12


def plan_passes(inputs: list[SetInput], n_vocab: int, options: CorrelationOptions, budget: int) -> list[list[Task]]:
    """Pack (pair x layer-of-a) tasks into passes whose float64 accumulators fit `budget` bytes."""
    tasks = [
        Task(i, j, layer)
        for i in range(len(inputs))
        for j in range(i + 1, len(inputs))
        for layer in range(inputs[i].n_layers)
    ]
    sizes = [task_bytes(inputs[t.a], inputs[t.b]) for t in tasks]
    overhead = pass_overhead(inputs, n_vocab, options, max(sizes, default=0))
    room = budget - overhead
    if room < max(sizes, default=0):
        need = overhead + max(sizes, default=0)
        hint = " (the token control alone needs vocab x neurons per set)" if options.control == "token" else ""
        raise ActdbError(
            f"correlation needs at least {need / 2**20:.1f} MiB of memory for one layer block but the "
            f"budget is {budget / 2**20:.1f} MiB{hint}; lower --chunk-tokens or raise --memory-budget"
        )
    passes: list[list[Task]] = [[]]
    used = 0
    for task, size in zip(tasks, sizes, strict=True):
        if used + size > room and passes[-1]:
            passes.append([])
            used = 0
        passes[-1].append(task)
        used += size
    return passes


def keeps_rotations(inputs: list[SetInput], n_passes: int, budget: int) -> bool:
    """Whether a run keeps every set's draw-0 rotations (float32, host) from one pass to the next instead of
    redrawing them (a QR each): with several passes, when they all fit in a tenth of the memory budget."""
    return n_passes > 1 and sum(s.n_layers * s.d_mlp**2 * 4 for s in inputs) <= budget / 10


def memory_budget(options: CorrelationOptions, backend: ArrayBackend) -> int:
    """Bytes the accumulators may use: `--memory-budget`, or 60% of what the device has free."""
    return options.memory_budget or int(backend.free_memory() * 0.6)


def check_fits(
    inputs: list[SetInput], tokens: np.ndarray, mask: np.ndarray, options: CorrelationOptions, backend: ArrayBackend
) -> int:
    """The number of passes the request needs; a one-line error when not even one layer block fits, so a
    request that cannot run is refused before anything is recorded."""
    n_vocab = len(np.unique(tokens.reshape(-1)[mask.reshape(-1)]))
    return len(plan_passes(inputs, n_vocab, options, memory_budget(options, backend)))


def _read_chunks(
    readers: list[ActivationReader],
    sets: list[SetInput],
    wanted: list[int],
    tokens: np.ndarray,
    mask: np.ndarray,
    seq_len: int,
    chunk_tokens: int,
    ring_size: int = 1,
    sequences: tuple[int, int] | None = None,
) -> Iterator[tuple[int, np.ndarray, dict]]:
    """Yield (n_rows, token ids, {set: shifted float32 (n_counted, N)}) for chunks of whole sequences.

    `tokens` and `mask` are flat over all positions; `sequences` = [first, stop) restricts the chunks to a shard
    (`first` a multiple of the chunk's sequences, so a shard's chunks are exactly the whole run's). Every buffer
    is allocated once and reused (fresh multi-MB arrays per chunk cost page faults): rows are read straight into
    the set's float32 chunk as `stored - shift` by `read_shifted_into` (raw chunks, checksums verified; through a
    staging buffer when some positions are not counted; both start on a cache line, see `float32_rows`). A
    yielded chunk stays valid until `ring_size` more are yielded (1 when the consumer finishes each chunk before
    asking for the next). The products that follow run in NumPy's BLAS, and a second thread pool (torch's) next to
    it slowed both: the NumPy route's float16 copies by torch run in pieces small enough that torch never wakes
    its pool.
    """
    seqs = max(1, chunk_tokens // seq_len)
    rows = seqs * seq_len
    first_seq, n_seq = sequences or (0, tokens.shape[0] // seq_len)
    shifts = {i: sets[i].shift.astype(np.float32) for i in wanted}
    staged = {}  # chunks with uncounted positions: a layer's shifted rows, before the counted ones are taken
    ring = {i: [float32_rows(rows, sets[i].n_neurons) for _ in range(ring_size)] for i in wanted}
    for k, s0 in enumerate(range(first_seq, n_seq, seqs)):
        r0, r1 = s0 * seq_len, min(n_seq, s0 + seqs) * seq_len
        m = mask[r0:r1]
        keep = None if bool(m.all()) else np.flatnonzero(m)
        n_counted = r1 - r0 if keep is None else len(keep)
        out = {}
        for i in wanted:
            x = ring[i][k % ring_size][:n_counted]
            d = sets[i].d_mlp
            for layer in range(sets[i].n_layers):
                cols = slice(layer * d, (layer + 1) * d)
                if keep is None:
                    readers[i].read_shifted_into(layer, r0, x[:, cols], shifts[i][cols])
                    continue
                if i not in staged:
                    staged[i] = float32_rows(rows, d)
                stage = staged[i][: r1 - r0]
                readers[i].read_shifted_into(layer, r0, stage, shifts[i][cols])
                x[:, cols] = stage[keep]
            out[i] = x
        yield r1 - r0, tokens[r0:r1][m], out


def _read_ahead(chunks: Iterator, depth: int = READ_AHEAD) -> Iterator:
    """Run a chunk iterator on a thread, `depth` chunks ahead (for GPUs: the host reads while the device works).

    Not used on the CPU backend: there BLAS already occupies every core, and a competing reader thread stalls
    its spinning worker threads (measured: 0.55-0.63 of bare GEMM with read-ahead vs 0.85+ without).
    """
    q: queue.Queue = queue.Queue(maxsize=depth)

    def produce() -> None:
        try:
            for item in chunks:
                q.put(item)
        except BaseException as exc:
            q.put(exc)
            return
        q.put(None)

    thread = threading.Thread(target=produce, daemon=True, name="actdb-reader")
    thread.start()
    while (item := q.get()) is not None:
        if isinstance(item, BaseException):
            raise item
        yield item
    thread.join()


def correlate_sets(
    inputs: list[SetInput],
    tokens: np.ndarray,
    mask: np.ndarray,
    options: CorrelationOptions,
    backend: ArrayBackend,
    progress: Callable[[int], None] | None = None,
) -> CorrelationResult:
    """Correlate every pair of `inputs` over the counted positions of `tokens (n_seq, seq_len)`."""
    if len(inputs) < 2:
        raise ActdbError("correlation needs at least two activation sets")
    if options.control not in CONTROLS:
        raise ActdbError(f"unknown control {options.control!r}; use none or token")
    readers = [ActivationReader(s.path, expected=s.expected) for s in inputs]
    try:
        result = CorrelationEngine(inputs, readers, tokens, mask, options, backend, progress).run()
        result.bytes_read = sum(r.bytes_read for r in readers)
        result.bytes_held = sum(r.held_bytes for r in readers)
        return result
    finally:
        for r in readers:
            r.close()


class CorrelationEngine:
    """One correlation request: the flat token stream, the per-set moments, and the per-pair results."""

    def __init__(
        self,
        inputs: list[SetInput],
        readers: list[ActivationReader],
        tokens: np.ndarray,
        mask: np.ndarray,
        options: CorrelationOptions,
        backend: ArrayBackend,
        progress: Callable[[int], None] | None,
    ) -> None:
        self.inputs, self.readers, self.options, self.backend = inputs, readers, options, backend
        self.progress = progress
        self.seq_len = tokens.shape[1]
        self.flat_tokens, self.flat_mask = tokens.reshape(-1), mask.reshape(-1)
        used_ids = np.unique(self.flat_tokens[self.flat_mask])
        # dense index of the token ids that occur, so per-token sums need (distinct ids x neurons), not vocab x
        self.vocab_index = np.full(int(self.flat_tokens.max()) + 1, -1, dtype=np.int64)
        self.vocab_index[used_ids] = np.arange(len(used_ids))
        self.n_vocab = len(used_ids)
        self.control = options.control == "token"
        self.passes = plan_passes(inputs, self.n_vocab, options, memory_budget(options, backend))
        xp = backend.xp
        self.moments: list[SetMoments] = []  # allocated by the pass that accumulates them (the first)
        self.token_counts = np.zeros(self.n_vocab)
        self.inv_counts = None
        self.n = 0
        if options.baseline_draws < 1:
            raise ActdbError("--baseline-draws must be at least 1")
        self.results = empty_results(inputs, options.topk, options.baseline_draws)
        if options.adaptive_threshold is not None and len(self.passes) > 1:
            raise ActdbError(
                f"adaptive baseline draws need the run in one pass (this one needs {len(self.passes)}); raise "
                "--memory-budget or leave out --adaptive-draws"
            )
        self.adaptive_draws = 0  # neuron-draws added by the adaptive rounds
        self.draw_rotations: dict[tuple[int, int], np.ndarray] = {}
        self.similarity = LayerSimilarity(xp, backend.to_numpy) if options.layer_similarity else None
        self.seconds: dict[str, float] = {}
        self.cpu_seconds: dict[str, float] = {}  # per phase, `time.process_time` (all threads): steadier under load
        self.buffers: dict[object, object] = {}
        self.base_cache: dict[int, list[np.ndarray]] = {}  # draw-0 rotations kept across passes (see _base_rotations)
        self.precision: ProductPrecision | None = None  # chosen on the first chunk

    def run(self) -> CorrelationResult:
        with self._timed("rotations"):
            self._fill_rotation_cache()
        for p, tasks in enumerate(self.passes):
            with self._timed("accumulate"):
                acc = self._accumulate(tasks, first=p == 0)
                if p == 0:
                    self._finalize_sets()
            self._finalize_pass(acc)
            if self.options.adaptive_threshold is not None:
                with self._timed("adaptive"):
                    self.adaptive_draws = refine_baseline(self, acc)
            del acc
        return self._result()

    @contextlib.contextmanager
    def _timed(self, phase: str) -> Iterator[None]:
        started, cpu = time.perf_counter(), time.process_time()
        try:
            yield
        finally:
            if self.backend.name == "cupy":
                self.backend.xp.cuda.Stream.null.synchronize()
            self.seconds[phase] = self.seconds.get(phase, 0.0) + time.perf_counter() - started
            self.cpu_seconds[phase] = self.cpu_seconds.get(phase, 0.0) + time.process_time() - cpu

    def _finalize_pass(self, acc: dict[TaskGroup, object], maxima: bool = True, draws: range | None = None) -> None:
        """Turn a pass's accumulators into covariances (in place), take the maxima of each (pair x layer), then
        the rotation baseline: for each set and draw, its rotations are built once and applied to every block
        that involves the set, so one set's rotations of one draw are in memory at a time. The baseline works on
        float32 copies of the covariances (the accumulation's float32 buffers are free by then): a baseline
        maximum only needs ~1e-6, and float32 products run at twice the rate. A cluster splits this work: the
        maxima (`maxima`) and ranges of baseline `draws` (default: all) in separate tasks."""
        xp = self.backend.xp
        with self._timed("maxima"):
            for g in list(acc):
                block = acc[g]
                self._to_covariance(g, block)
                for layer in range(g.start, g.stop) if maxima else ():
                    _task_maxima(Task(g.a, g.b, layer), self._rows(g, block, layer), self)
                acc[g] = block.astype(xp.float32)
                del block
        with self._timed("baseline"):
            self._baseline(acc, range(self.options.baseline_draws) if draws is None else draws)

    def _baseline(self, acc: dict[TaskGroup, object], draws: range) -> None:
        """Each set's rotation baseline over `draws`. Draw k rotates a layer by `R P_k` (`R` the set's draw-0
        rotation of the layer, `P_k` shared by the width), so the products with `R` are formed once per set and
        every draw k >= 1 multiplies them by `P_k` alone: `(Cov_ab R_b) P_k`, `P_k^T (R_a^T Cov_ab)` and
        `diag(P_k^T (R^T C R) P_k)`, one product per block and draw instead of two, and `R P_k` never formed."""
        xp = self.backend.xp
        for key in sorted({g.a for g in acc} | {g.b for g in acc}):
            s = self.inputs[key]
            base = [self.backend.asarray(r) for r in self._base_rotations(key)]
            covs = [c.astype(xp.float32) for c in self.moments[key].cov]
            cov_rot = [c @ r for c, r in zip(covs, base, strict=True)]  # C R per layer
            # R^T C R: only draws k >= 1 need it, diag(P_k^T (R^T C R) P_k) their rotated sds
            rotated_cov = [r.T @ cr for r, cr in zip(base, cov_rot, strict=True)] if any(draws) else []
            rot_sds = {}
            for draw in draws:
                p = None if draw == 0 else self._draw_rotation(s.d_mlp, draw)
                rot_sds[draw] = _rotated_sd(base, cov_rot, rotated_cov, p, xp)
                if self.similarity is not None:
                    self._observe_self_baseline(key, base, p, rot_sds[draw], draw)
            del cov_rot, rotated_cov
            # one block's products with R at a time, each taken by every draw's P_k
            for g, block in acc.items():
                if g.b == key:
                    rotated = _rotate_columns(block, base, xp)
                    for draw in draws:
                        p = None if draw == 0 else self._draw_rotation(s.d_mlp, draw)
                        scaled = rotated.copy() if p is None else _times_each_width(rotated, p, s.d_mlp)
                        _baseline_forward(g, scaled, rot_sds[draw], draw, self)
                if g.a == key:
                    rotated = _rotate_rows(block, base, g.start, xp)
                    for draw in draws:
                        p = None if draw == 0 else self._draw_rotation(s.d_mlp, draw)
                        scaled = rotated.copy() if p is None else p.T @ rotated
                        _baseline_backward(g, scaled, rot_sds[draw], draw, self)
                rotated = scaled = None

    def _fill_rotation_cache(self) -> None:
        """The run's QRs (every set's draw-0 rotations, every width's draws) computed side by side on the host's
        cores before the first pass, into the rotation cache, where the baseline phase reads them; a run without a
        cache computes them when it needs them, one after another."""
        seed, draws = self.options.baseline_seed, range(1, self.options.baseline_draws)
        keys = [base_key(s.d_mlp, seed, s.rotation_key, layer) for s in self.inputs for layer in range(s.n_layers)]
        keys += [draw_key(d, seed, k) for d in sorted({s.d_mlp for s in self.inputs}) for k in draws]
        fill(self.options.rotation_cache, keys)

    def _draw_rotation(self, d: int, draw: int) -> object:
        """`P_draw` of width `d` on the device, drawn (or read from the rotation cache) once per run."""
        if (d, draw) not in self.draw_rotations:
            key = draw_key(d, self.options.baseline_seed, draw)
            self.draw_rotations[(d, draw)] = self.backend.asarray(rotation(self.options.rotation_cache, key))
        return self.draw_rotations[(d, draw)]

    def _observe_self_baseline(self, key: int, base: list, p: object, rot_sd: object, draw: int) -> None:
        """Layer similarity's diagonal baseline: each layer against its own rotated copy `R P_k` (formed here)."""
        s, m = self.inputs[key], self.moments[key]
        for layer in range(s.n_layers):
            rows = slice(layer * s.d_mlp, (layer + 1) * s.d_mlp)
            rot = base[layer] if p is None else base[layer] @ p
            cov, sd = m.cov[layer], m.sd[rows]
            self.similarity.observe_self_baseline(key, layer, cov, rot.astype(cov.dtype), rot_sd[rows], sd, draw)

    def _base_rotations(self, key: int) -> list[np.ndarray]:
        """A set's draw-0 rotations (float32, host). Each is a d x d QR (seconds at d = 3072), read from the
        rotation cache when the run has one; with several passes they are kept for the next pass when all sets'
        fit in a tenth of the memory budget."""
        if key in self.base_cache:
            return self.base_cache[key]
        rotations = base_rotations(self.inputs[key], self.options.baseline_seed, self.options.rotation_cache)
        adaptive = self.options.adaptive_threshold is not None  # its rounds use them again (one pass)
        if adaptive or keeps_rotations(self.inputs, len(self.passes), memory_budget(self.options, self.backend)):
            self.base_cache[key] = rotations
        return rotations

    def _rows(self, g: TaskGroup, block: object, layer: int) -> object:
        d = self.inputs[g.a].d_mlp
        return block[(layer - g.start) * d : (layer - g.start + 1) * d]

    def _to_covariance(self, g: TaskGroup, block: object) -> None:
        """acc / n - mean_a mean_b^T, or without the between-token part under the token control:
        Cov_ab - S_a^T diag(1/n_v) S_b / n. In place: the accumulator is not needed afterwards."""
        xp, n = self.backend.xp, self.n
        ma, mb = self.moments[g.a], self.moments[g.b]
        d = self.inputs[g.a].d_mlp
        rows = slice(g.start * d, g.stop * d)
        block /= n
        if self.inv_counts is None:
            block -= xp.outer(ma.sums[rows] / n, mb.sums / n)
        else:
            block -= (ma.token_sums[:, rows].T * self.inv_counts) @ mb.token_sums / n

    def _accumulate(
        self, tasks: list[Task], first: bool, sequences: tuple[int, int] | None = None
    ) -> dict[TaskGroup, object]:
        """One pass over the tokens (or a shard of its `sequences`): every group's `X_a^T X_b` (and, in the
        first pass, the sets' moments)."""
        xp, inputs = self.backend.xp, self.inputs
        wanted = sorted(range(len(inputs))) if first else sorted({t.a for t in tasks} | {t.b for t in tasks})
        if first:
            self.moments = self._zero_moments()
        acc = self._zero_accumulators(tasks)
        out = {g: xp.empty(a.shape, dtype=xp.float32) for g, a in acc.items()}
        ahead = self.backend.name == "cupy"
        chunks = _read_chunks(
            self.readers,
            inputs,
            wanted,
            self.flat_tokens,
            self.flat_mask,
            self.seq_len,
            self.options.chunk_tokens,
            ring_size=READ_AHEAD + 2 if ahead else 1,
            sequences=sequences,
        )
        for n_rows, ids, chunk in _read_ahead(chunks) if ahead else chunks:
            self._add_chunk(acc, out, ids, chunk, first)
            if self.progress:
                self.progress(n_rows)
        return acc

    def _zero_moments(self) -> list[SetMoments]:
        xp = self.backend.xp
        return [
            SetMoments(
                xp.zeros(s.n_neurons),
                [xp.zeros((s.d_mlp, s.d_mlp)) for _ in range(s.n_layers)],
                xp.zeros((self.n_vocab, s.n_neurons)) if self.control else None,
            )
            for s in self.inputs
        ]

    def _zero_accumulators(self, tasks: list[Task]) -> dict[TaskGroup, object]:
        """float64 zeros for each group of `tasks`: its rows of a against all neurons of b."""
        xp, inputs = self.backend.xp, self.inputs
        return {
            g: xp.zeros(((g.stop - g.start) * inputs[g.a].d_mlp, inputs[g.b].n_neurons)) for g in group_tasks(tasks)
        }

    def _add_chunk(
        self, acc: dict[TaskGroup, object], out: dict[TaskGroup, object], ids: np.ndarray, chunk: dict, first: bool
    ) -> None:
        """Add one chunk's products into the groups' accumulators `acc` (through the float32 buffers `out`),
        and with `first` into the sets' moments too."""
        backend, inputs = self.backend, self.inputs
        if self.precision is None:
            pair = list(chunk.values())[:2]
            self.precision = choose_precision(self.options.precision, backend, lambda p=pair: (p[0], p[1]))
        xs = {i: backend.asarray(x) for i, x in chunk.items()}
        with products_in(backend, self.precision.mode):
            if first:
                self._accumulate_moments(ids, xs)
            for g in acc:
                d = inputs[g.a].d_mlp
                backend.matmul(xs[g.a][:, g.start * d : g.stop * d].T, xs[g.b], out=out[g])
                acc[g] += out[g]

    def _accumulate_moments(self, ids: np.ndarray, xs: dict[int, object]) -> None:
        xp, backend = self.backend.xp, self.backend
        self.n += ids.shape[0]
        seg = self.vocab_index[ids]
        if self.control:
            self.token_counts += np.bincount(seg, minlength=self.n_vocab)
            seg_dev = backend.asarray(seg)
        for i, x in xs.items():
            s, m = self.inputs[i], self.moments[i]
            m.sums += x.sum(axis=0, dtype=xp.float64)
            gram = self._out((s.d_mlp, s.d_mlp))
            for layer in range(s.n_layers):
                xl = x[:, layer * s.d_mlp : (layer + 1) * s.d_mlp]
                m.grams[layer] += backend.matmul(xl.T, xl, out=gram)
            if self.control:
                m.token_sums += backend.segment_sum(x, seg_dev, self.n_vocab)

    def _out(self, shape: tuple[int, int]) -> object:
        """A reused float32 output buffer of this shape for the per-chunk products."""
        if shape not in self.buffers:
            self.buffers[shape] = self.backend.xp.empty(shape, dtype=self.backend.xp.float32)
        return self.buffers[shape]

    def _finalize_sets(self) -> None:
        if self.n < 2:
            raise ActdbError("the dataset has fewer than two counted positions")
        if self.control:
            self.inv_counts = self.backend.asarray(1.0 / np.maximum(self.token_counts, 1))
        for i, (s, m) in enumerate(zip(self.inputs, self.moments, strict=True)):
            _finalize_set(s, m, self.n, self.inv_counts, self.backend.xp)
            if self.similarity is not None:
                for layer in range(s.n_layers):
                    rows = slice(layer * s.d_mlp, (layer + 1) * s.d_mlp)
                    self.similarity.observe_self(i, layer, m.cov[layer], m.sd[rows])

    def _result(self) -> CorrelationResult:
        sds = [self.backend.to_numpy(m.sd) for m in self.moments]
        pairs = None if self.similarity is None else self.similarity.pairs
        result = assemble_result(
            self.inputs, self.results, sds, self.n, len(self.passes), self.seconds, pairs, self.precision
        )
        result.cpu_seconds = dict(self.cpu_seconds)
        return result


def assemble_result(
    inputs: list[SetInput],
    results: dict[tuple[int, int], MatchResult],
    sds: list[np.ndarray],
    n: int,
    n_passes: int,
    seconds: dict[str, float],
    layer_pairs: dict[tuple[int, int, int, int], LayerPair] | None,
    precision: ProductPrecision | None,
) -> CorrelationResult:
    """The finished result keyed by set keys: dead neurons (and maxima that never became finite) read as NaN."""
    dead = {s.key: sd <= SD_EPS for s, sd in zip(inputs, sds, strict=True)}
    matches = {(inputs[a].key, inputs[b].key): r for (a, b), r in results.items()}
    for (a, _b), r in matches.items():
        undefined = dead[a] | ~np.isfinite(r.max_corr)
        r.max_corr[undefined] = np.nan
        r.baseline[:, undefined | ~np.isfinite(r.baseline).any(axis=0)] = np.nan
        r.best[undefined] = -1
    layers = None
    if layer_pairs is not None:
        keys = [s.key for s in inputs]
        layers = {(keys[a], keys[b], la, lb): v for (a, b, la, lb), v in layer_pairs.items()}
    precision = precision or ProductPrecision("float32")
    return CorrelationResult(matches, dead, n, n_passes, dict(seconds), layers, precision)


def base_rotations(s: SetInput, seed: int, cache: str | None = None) -> list[np.ndarray]:
    """A set's draw-0 rotation of every layer (float32): the same for every checkpoint of its model; from the
    rotation cache folder `cache` when given (computed and kept there the first time)."""
    return [rotation(cache, base_key(s.d_mlp, seed, s.rotation_key, layer)) for layer in range(s.n_layers)]


def empty_results(inputs: list[SetInput], topk: int, draws: int) -> dict[tuple[int, int], MatchResult]:
    out = {}
    for a, sa in enumerate(inputs):
        for b, sb in enumerate(inputs):
            if a == b:
                continue
            n_a = sa.n_neurons
            out[(a, b)] = MatchResult(
                np.full(n_a, -np.inf),
                np.full(n_a, -1, dtype=np.int64),
                np.full((draws, n_a), -np.inf),
                np.full(n_a, np.nan) if sa.n_neurons == sb.n_neurons else None,
                np.full((n_a, topk), -1, dtype=np.int64) if topk else None,
                np.full((n_a, topk), -np.inf) if topk else None,
            )
    return out


def _finalize_set(s: SetInput, m: SetMoments, n: int, inv_counts, xp) -> None:
    """Covariances from the moments: within-layer Cov (for rotations) and per-neuron standard deviations."""
    mean = m.sums / n
    d = s.d_mlp
    sds = []
    for layer in range(s.n_layers):
        sl = slice(layer * d, (layer + 1) * d)
        if inv_counts is None:
            cov = m.grams[layer] / n - xp.outer(mean[sl], mean[sl])
        else:
            ts = m.token_sums[:, sl]
            cov = m.grams[layer] / n - (ts.T * inv_counts) @ ts / n
        m.cov.append(cov)
        sds.append(xp.sqrt(xp.clip(xp.diagonal(cov), 0, None)))
    m.sd = xp.concatenate(sds)
    m.grams = []


def _masked_ratio(num, sd_rows, sd_cols, xp):
    """num / outer(sd_rows, sd_cols), with -inf wherever either side is dead so it never wins a max."""
    live_r = sd_rows > SD_EPS
    live_c = sd_cols > SD_EPS
    r = num / xp.outer(xp.where(live_r, sd_rows, 1.0), xp.where(live_c, sd_cols, 1.0))
    xp.clip(r, -1.0, 1.0, out=r)  # float32 per-chunk GEMMs can overshoot |r| = 1 by ~1e-6
    r[~live_r, :] = -xp.inf
    r[:, ~live_c] = -xp.inf
    return r


def _task_maxima(t: Task, cov: object, engine: CorrelationEngine) -> None:
    """Row maxima of one (pair x layer) correlation block for a, running column maxima for b, self-correlation."""
    backend, inputs, moments = engine.backend, engine.inputs, engine.moments
    xp = backend.xp
    d = inputs[t.a].d_mlp
    rows = slice(t.layer * d, (t.layer + 1) * d)
    r = _masked_ratio(cov, moments[t.a].sd[rows], moments[t.b].sd, xp)
    fwd, back = engine.results[(t.a, t.b)], engine.results[(t.b, t.a)]
    _row_max(r, fwd, rows, engine.options.topk, backend)
    _col_max(r, back, t.layer * d, engine.options.topk, backend)
    if fwd.self_corr is not None:
        diag = backend.to_numpy(xp.diagonal(r[:, rows]))
        fwd.self_corr[rows] = np.where(np.isfinite(diag), diag, np.nan)
        back.self_corr[rows] = fwd.self_corr[rows]
    if engine.similarity is not None:
        ma, mb = moments[t.a], moments[t.b]
        engine.similarity.observe_block(t.a, t.b, t.layer, r, cov, ma.sd[rows], mb.sd, ma.cov, mb.cov)


def _rotate_columns(block: object, base: list, xp) -> object:
    """`Cov_ab R_b`: each of b's layers' columns of a block (float32) times that layer's draw-0 rotation."""
    d = base[0].shape[0]
    return xp.concatenate([block[:, lb * d : (lb + 1) * d] @ r for lb, r in enumerate(base)], axis=1)


def _rotate_rows(block: object, base: list, start: int, xp) -> object:
    """`R_a^T Cov_ab` per layer of a in a block of a's layers from `start` on: (layers, d_a, N_b), float32."""
    d = base[0].shape[0]
    return xp.stack([base[start + i].T @ block[i * d : (i + 1) * d] for i in range(block.shape[0] // d)])


def _times_each_width(rotated: object, p: object, d: int) -> object:
    """Every `d`-wide column block of `rotated` (rows x L d, contiguous) times `p`: one product of all rows of
    all blocks, as (rows L) x d."""
    n_rows, n_cols = rotated.shape
    return (rotated.reshape(n_rows * (n_cols // d), d) @ p).reshape(n_rows, n_cols)


def _rotated_sd(base: list, cov_rot: list, rotated_cov: list, p: object, xp) -> object:
    """The rotated neurons' standard deviations of every layer, sqrt(diag(R^T C R)) for draw 0 from `C R`, and
    sqrt(diag(P^T (R^T C R) P)) for a draw's `p`, without forming either product matrix's square."""
    if p is None:
        sq = [((cr * r).sum(axis=0, dtype=xp.float64)) for cr, r in zip(cov_rot, base, strict=True)]
    else:
        sq = [((m @ p) * p).sum(axis=0, dtype=xp.float64) for m in rotated_cov]
    return xp.concatenate([xp.sqrt(xp.clip(v, 0, None)) for v in sq])


def _baseline_forward(g: TaskGroup, scaled: object, rot_sd: object, draw: int, engine: CorrelationEngine) -> None:
    """Max over b's rotated neurons for each neuron of a's layers in `g`: corr(a_i, (bR)_j) =
    (Cov_ab R)_ij / (sd_a_i sqrt((R^T Cov_b R)_jj)), from the moments alone (`scaled` holds Cov_ab R, and is
    scaled in place). Dividing by sd_a_i > 0 does not change which j is largest, so each row's max is taken over
    Cov_ab R scaled by the columns' 1/sd only."""
    xp, sb = engine.backend.xp, engine.inputs[g.b]
    d = engine.inputs[g.a].d_mlp
    rows = slice(g.start * d, g.stop * d)
    inv_cols, dead_cols = inverse_sd(rot_sd, xp)
    scaled *= inv_cols
    if bool(dead_cols.any()):
        scaled[:, dead_cols] = -xp.inf
    inv_rows, _dead = inverse_sd(engine.moments[g.a].sd[rows], xp)
    best = xp.clip(scaled.max(axis=1) * inv_rows, -1.0, 1.0)
    engine.results[(g.a, g.b)].baseline[draw, rows] = engine.backend.to_numpy(best)
    if engine.similarity is not None:
        for i, layer in enumerate(range(g.start, g.stop)):
            own = slice(i * d, (i + 1) * d)
            engine.similarity.observe_baseline_forward(g.a, g.b, layer, scaled[own], inv_rows[own], draw, sb.d_mlp)


def _baseline_backward(g: TaskGroup, scaled: object, rot_sd: object, draw: int, engine: CorrelationEngine) -> None:
    """Running max, for every neuron of b, over the rotated neurons of each of a's layers in `g`: `scaled`
    (layers, d_a, N_b) holds R_a^T Cov_ab, scaled in place the same way by the rotated neurons' 1/sd before the
    column max."""
    xp = engine.backend.xp
    d = engine.inputs[g.a].d_mlp
    inv_cols, _dead = inverse_sd(engine.moments[g.b].sd, xp)
    target = engine.results[(g.b, g.a)].baseline[draw]
    for i, layer in enumerate(range(g.start, g.stop)):
        layer_scaled = scaled[i]
        inv_rows, dead_rows = inverse_sd(rot_sd[layer * d : (layer + 1) * d], xp)
        layer_scaled *= inv_rows[:, None]
        if bool(dead_rows.any()):
            layer_scaled[dead_rows, :] = -xp.inf
        best = xp.clip(layer_scaled.max(axis=0) * inv_cols, -1.0, 1.0)
        np.maximum(target, engine.backend.to_numpy(best), out=target)
        if engine.similarity is not None:
            db = engine.inputs[g.b].d_mlp
            engine.similarity.observe_baseline_backward(g.a, g.b, layer, layer_scaled, inv_cols, draw, db)


def _row_max(r, res: MatchResult, rows: slice, topk: int, backend: ArrayBackend) -> None:
    xp = backend.xp
    best = xp.argmax(r, axis=1)
    res.best[rows] = backend.to_numpy(best)
    res.max_corr[rows] = backend.to_numpy(xp.take_along_axis(r, best[:, None], axis=1)[:, 0])
    if topk:
        k = min(topk, r.shape[1])
        idx = xp.argpartition(-r, k - 1, axis=1)[:, :k]
        val = xp.take_along_axis(r, idx, axis=1)
        order = xp.argsort(-val, axis=1)
        res.topk_idx[rows, :k] = backend.to_numpy(xp.take_along_axis(idx, order, axis=1))
        res.topk_val[rows, :k] = backend.to_numpy(xp.take_along_axis(val, order, axis=1))


def _col_max(r, res: MatchResult, row_offset: int, topk: int, backend: ArrayBackend) -> None:
    xp = backend.xp
    best = xp.argmax(r, axis=0)
    val = backend.to_numpy(xp.take_along_axis(r, best[None, :], axis=0)[0])
    better = val > res.max_corr
    res.max_corr[better] = val[better]
    res.best[better] = backend.to_numpy(best)[better] + row_offset
    if topk:
        k = min(topk, r.shape[0])
        idx = xp.argpartition(-r, k - 1, axis=0)[:k].T
        cand_val = backend.to_numpy(xp.take_along_axis(r.T, idx, axis=1))
        merge_topk(res, cand_val, backend.to_numpy(idx) + row_offset)


def merge_topk(res: MatchResult, cand_val: np.ndarray, cand_idx: np.ndarray) -> None:
    """Keep each neuron's `topk` best of its current list and the candidates (earlier entries win ties)."""
    topk = res.topk_val.shape[1]
    all_val = np.concatenate([res.topk_val, cand_val], axis=1)
    all_idx = np.concatenate([res.topk_idx, cand_idx], axis=1)
    order = np.argsort(-all_val, axis=1, kind="stable")[:, :topk]
    res.topk_val[:] = np.take_along_axis(all_val, order, axis=1)
    res.topk_idx[:] = np.take_along_axis(all_idx, order, axis=1)
