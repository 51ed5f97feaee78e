"""What a study makes the engine do, counted without running it: memory and passes from the engine's own
planner on synthetic inputs of the architecture's shape, and the FLOPs of every product."""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from actdb.compute.correlation.engine import (
    CorrelationOptions,
    SetInput,
    Task,
    keeps_rotations,
    pass_overhead,
    plan_passes,
    task_bytes,
)
from actdb.compute.planning.shapes import Architecture
from actdb.store.errors import ActdbError


def qr_flops(d: int) -> int:
    """FLOPs of one Haar rotation: Householder QR of a d x d matrix (geqrf, 4/3 d^3) and forming Q (orgqr, 4/3
    d^3), the LAPACK count; `baseline._haar` calls `numpy.linalg.qr`, which does both."""
    return 8 * d**3 // 3


ADD_BYTES = 8 + 4 + 8  # `acc += out`: a float64 and a float32 read, a float64 written per value


def synthetic_inputs(arch: Architecture, models: int) -> list[SetInput]:
    """One step's sets as the engine sees them: `models` sets of the architecture's shape (no files)."""
    shift = np.zeros(arch.n_neurons, dtype=np.float32)  # one array shared by every set: nothing is per model
    return [SetInput(i, "", arch.n_layers, arch.d_mlp, shift, rotation_key=i) for i in range(models)]


@dataclass(frozen=True)
class MemoryPlan:
    """How one correlation run fits its budget, in the engine planner's own accounting (`plan_passes`).

    `peak` is the least budget under which the planner packs the same passes as under `budget` (what the run
    holds at once), `minimum` the least budget under which it can run at all (one layer block per pass), and
    `one_pass` the least under which every pair fits one pass. `read_bytes` is what the run reads: the first
    pass reads every set (it also accumulates their moments), each later pass the sets its tasks involve.

    When not even one layer block fits the budget (`fits` is false: the engine would refuse the run), the passes
    are those of the `minimum` budget, and `fitting_chunk` is the largest --chunk-tokens (halving the requested
    one) with which the budget suffices, if any.
    """

    budget: int
    fits: bool
    passes: list[list[Task]]
    peak: int
    minimum: int
    one_pass: int
    read_bytes: int
    step_bytes: int
    fitting_chunk: int | None = None
    pass_reads: tuple[int, ...] = ()  # bytes each pass reads
    pass_sums: tuple[int, ...] = ()  # bytes of each pass's float64 X_a^T X_b sums (what a shard task sends)

    @property
    def n_passes(self) -> int:
        return len(self.passes)

    @property
    def amplification(self) -> float:
        """Bytes read per byte stored (at most the number of passes)."""
        return self.read_bytes / self.step_bytes


def _plan_or_none(
    inputs: list[SetInput], n_vocab: int, options: CorrelationOptions, budget: int
) -> list[list[Task]] | None:
    try:
        return plan_passes(inputs, n_vocab, options, budget)
    except ActdbError:
        return None


def _least(ok, high: int) -> int:
    """The least budget b in [1, high] with ok(b), for a monotone ok with ok(high)."""
    low = 0
    while high - low > 1:
        mid = (low + high) // 2
        if ok(mid):
            high = mid
        else:
            low = mid
    return high


@dataclass(frozen=True)
class PassLayout:
    """Where the engine planner's packing changes with the budget (see `MemoryPlan`)."""

    fits: bool
    passes: list[list[Task]]
    peak: int
    minimum: int
    one_pass: int
    fitting_chunk: int | None


def layout_by_bisection(inputs: list[SetInput], n_vocab: int, options: CorrelationOptions, budget: int) -> PassLayout:
    """Any sets: the budgets at which the planner's plan changes, by bisection on the planner itself (each step
    packs every task again, so this grows with models^2 x layers x log(budget))."""
    unlimited = 1 << 62

    def plan(b: int) -> list[list[Task]] | None:
        return _plan_or_none(inputs, n_vocab, options, b)

    def one_pass(b: int) -> bool:
        found = plan(b)
        return found is not None and len(found) == 1

    found = plan(budget)
    fits = found is not None
    minimum = _least(lambda b: plan(b) is not None, budget if fits else unlimited)
    passes = found if found is not None else plan_passes(inputs, n_vocab, options, minimum)
    peak = _least(lambda b: plan(b) == passes, max(budget, minimum))
    single = _least(one_pass, unlimited)
    fitting = None
    chunk = options.chunk_tokens // 2
    while not fits and fitting is None and chunk >= 256:
        if _plan_or_none(inputs, n_vocab, replace(options, chunk_tokens=chunk), budget) is not None:
            fitting = chunk
        chunk //= 2
    return PassLayout(fits, passes, peak, minimum, single, fitting)


def layout_by_counts(inputs: list[SetInput], n_vocab: int, options: CorrelationOptions, budget: int) -> PassLayout:
    """Sets of one shape (the planner's synthetic step): every task block has one size, so the engine's greedy
    packing puts floor(room / size) tasks in a pass, room = budget - `pass_overhead`, and each budget where the
    plan changes follows from counts; the planner itself packs only the final passes."""
    size = task_bytes(inputs[0], inputs[0])
    n_tasks = len(inputs) * (len(inputs) - 1) // 2 * inputs[0].n_layers
    overhead = pass_overhead(inputs, n_vocab, options, size)
    minimum = overhead + size
    fits = budget >= minimum
    per_pass = min(n_tasks, (max(budget, minimum) - overhead) // size)
    fitting = None
    chunk = options.chunk_tokens // 2
    while not fits and fitting is None and chunk >= 256:
        if pass_overhead(inputs, n_vocab, replace(options, chunk_tokens=chunk), size) + size <= budget:
            fitting = chunk
        chunk //= 2
    passes = plan_passes(inputs, n_vocab, options, max(budget, minimum))
    return PassLayout(fits, passes, overhead + per_pass * size, minimum, overhead + n_tasks * size, fitting)


def plan_memory(
    inputs: list[SetInput], n_vocab: int, options: CorrelationOptions, budget: int, n_tokens: int, itemsize: int
) -> MemoryPlan:
    """Run the engine's planner at `budget` and find the budgets at which its plan changes: from counts when the
    sets share one shape, else by bisection on the planner itself."""
    uniform = len({(s.n_layers, s.d_mlp) for s in inputs}) == 1
    layout = (layout_by_counts if uniform else layout_by_bisection)(inputs, n_vocab, options, budget)
    passes = layout.passes
    per_set = [n_tokens * s.n_neurons * itemsize for s in inputs]
    reads, sums = [], []
    for p, tasks in enumerate(passes):
        wanted = range(len(inputs)) if p == 0 else {t.a for t in tasks} | {t.b for t in tasks}
        reads.append(sum(per_set[i] for i in wanted))
        sums.append(sum(inputs[t.a].d_mlp * inputs[t.b].n_neurons * 8 for t in tasks))
    return MemoryPlan(
        budget,
        layout.fits,
        passes,
        layout.peak,
        layout.minimum,
        layout.one_pass,
        sum(reads),
        sum(per_set),
        layout.fitting_chunk,
        tuple(reads),
        tuple(sums),
    )


@dataclass(frozen=True)
class CorrelationFlops:
    """FLOPs (2 per multiply-add) of one correlation run, by the engine operation (`CorrelationEngine`) they count."""

    pair_products: int  # _accumulate: X_a^T X_b per chunk, each unordered pair once (float32 / TF32)
    grams: int  # _accumulate_moments: X_l^T X_l per chunk, set and layer (a SYRK on the CPU: one triangle)
    sums: int  # _accumulate_moments: column sums (one addition per value)
    adds: int  # _accumulate: each chunk's float32 products added into the float64 accumulators
    baseline: int  # per draw: Cov_ab R_b (P_k) (_baseline_forward) and (P_k^T) R_a^T Cov_ab (_baseline_backward)
    rotation_sd: int  # _baseline, per pass, set, draw and layer: C R (draw 0) or (R^T C R) P_k for the rotated sds
    draw_products: int  # _baseline, per pass, set and layer when there are draws > 0: R^T (C R), float32
    qr: int  # Haar QRs on the host: each set's layers per pass it takes part in (once when kept), P_k once per draw
    control: int = 0  # the token control: S_a^T diag(1/n_v) S_b per block and per set's layers (float64)

    @property
    def products(self) -> int:
        """The per-chunk products (pair products and Grams), which grow with the tokens."""
        return self.pair_products + self.grams

    @property
    def baseline_phase(self) -> int:
        """The float32 products of the baseline phase, which grow with the draws and the passes, not the tokens."""
        return self.baseline + self.rotation_sd + self.draw_products

    @property
    def total(self) -> int:
        return self.products + self.sums + self.adds + self.baseline_phase + self.qr + self.control


def correlation_flops(
    inputs: list[SetInput],
    passes: list[list[Task]],
    n_tokens: int,
    options: CorrelationOptions,
    n_vocab: int,
    syrk: bool = True,
    budget: int | None = None,
) -> CorrelationFlops:
    """Count the engine's operations for one run over `n_tokens` counted positions, pass by pass as planned.
    `syrk`: the Grams `x^T x` run as a SYRK, which computes one triangle (d (d + 1) FLOPs per token and layer):
    NumPy does that on the CPU; CuPy runs a full GEMM (2 d^2). `budget` (default: the options') decides, as in the
    engine, whether the draw-0 rotations are kept across passes (`keeps_rotations`) or drawn again in each."""
    t, draws = n_tokens, options.baseline_draws
    pair = sum(2 * a.n_neurons * b.n_neurons * t for i, a in enumerate(inputs) for b in inputs[i + 1 :])
    per_gram = (lambda d: d * (d + 1)) if syrk else (lambda d: 2 * d * d)
    grams = sum(s.n_layers * per_gram(s.d_mlp) * t for s in inputs)
    sums = sum(s.n_neurons * t for s in inputs)
    chunks = -(-t // options.chunk_tokens)
    baseline = rotation_sd = draw_products = qr = control = adds = 0
    budget = budget if budget is not None else options.memory_budget
    kept = budget is not None and keeps_rotations(inputs, len(passes), budget)
    drawn: set[int] = set()
    for tasks in passes:
        for task in tasks:
            a, b = inputs[task.a], inputs[task.b]
            adds += chunks * a.d_mlp * b.n_neurons
            # forward: the (d_a x N_b) block times each of b's layers' rotations; backward: R_a^T times the block
            baseline += draws * (2 * a.d_mlp * b.n_neurons * b.d_mlp + 2 * a.d_mlp**2 * b.n_neurons)
            if options.control == "token":
                control += 2 * a.d_mlp * n_vocab * b.n_neurons
        for key in sorted({task.a for task in tasks} | {task.b for task in tasks}):
            s = inputs[key]
            rotation_sd += draws * s.n_layers * 2 * s.d_mlp**3
            draw_products += (draws > 1) * s.n_layers * 2 * s.d_mlp**3
            if not (kept and key in drawn):
                qr += s.n_layers * qr_flops(s.d_mlp)
            drawn.add(key)
    qr += sum((draws - 1) * qr_flops(d) for d in {s.d_mlp for s in inputs})  # P_k, cached for the whole run
    if options.control == "token":
        control += sum(2 * s.n_layers * s.d_mlp**2 * n_vocab for s in inputs)  # _finalize_set's covariances
    return CorrelationFlops(pair, grams, sums, adds, baseline, rotation_sd, draw_products, qr, control)


def ingest_flops(arch: Architecture, tokens: int) -> int:
    """A forward pass over the tokens, 2 x params x tokens (every parameter one multiply-add per token)."""
    return 2 * arch.params * tokens
