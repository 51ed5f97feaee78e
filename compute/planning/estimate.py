"""Capacity planning: the bytes, memory, passes, FLOPs and time of a study before any of it runs.

A study is `models` models at `steps` training steps on one token dataset of `tokens` positions: one activation
set per (model, step), and one correlation run per step over that step's sets. What the engine would do is taken
from the engine itself wherever it can be:

- passes, and the memory a run holds, come from `correlation.plan_passes` run on synthetic `SetInput`s of the
  architecture's shape, the default budget from `correlation.memory_budget` (its share of free memory);
- the FLOPs follow the products `correlation.CorrelationEngine` computes (`correlation_flops` names each one),
  counted as 2 FLOPs per multiply-add; each unordered pair of sets is multiplied once (`X_a^T X_b`), and both
  directions' maxima and baselines come from that one product;
- times divide FLOPs by rates: this machine's, measured in a few seconds by `measure_host` with the engine's
  own library, shapes, QR and reader (`measure_rates`; injectable, so tests time nothing) and scaled by the
  share of them the CPU engine sustains (`CPU_ENGINE_EFFICIENCY`, measured on the engine); or, for the products
  of a named accelerator, its published dense peaks (`ACCELERATORS`: a bound), with this machine's rates for the
  work the engine does on the host (the QRs, reading and converting chunks).
"""

from __future__ import annotations

import decimal
import re
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from actdb.compute.correlation.engine import (
    CorrelationOptions,
    SetInput,
    Task,
    keeps_rotations,
    memory_budget,
    pass_overhead,
    plan_passes,
    task_bytes,
)
from actdb.compute.correlation.precision import check_precision
from actdb.compute.correlation.shards import default_shards
from actdb.store.device import NUMPY, ArrayBackend
from actdb.store.errors import ActdbError
from actdb.store.refs import CONTROLS, STORED_DTYPES

TOKEN_BYTES = 4 + 1  # the token file holds an int32 id and a bool mask per position (store.files.token)
TORCH_DTYPES = ("float32", "bfloat16", "float16")
# Bounds on a request, checked before anything is built: the engine's pass planner packs one object per (pair x
# layer) task of a step, so models are bounded by the tasks they make (50k pack in about a second).
MAX_TASKS = 50_000
MAX_STEPS = 10**6
MAX_TOKENS = 10**15
MAX_WORKERS = 10**6
MAX_NEURONS = 10**8  # per set (a llama-7b set has 352,256)  # the forward pass (`ingest --torch-dtype`)
# The share of the separately timed rates (`measure_host`) that the CPU engine sustains end to end. Measured with
# `benchmarks/planner_accuracy.py` (the engine against `plan_study` on the same shapes, in one process): 0.82-0.85
# on a 2-core AVX-512 Intel machine, but 1.0 (200k-token benchmark) and 1.24 (demo step) on a 2-core AVX2 AMD EPYC.
# How the microbenchmarks relate to the engine depends on the CPU's BLAS kernels, so no factor is applied: the
# rates as measured put the estimate within 0.82-1.24 of the engine's time on both machines.
CPU_ENGINE_EFFICIENCY = 1.0


def qr_flops(d: int) -> int:
    """FLOPs of one Haar rotation: Householder QR of a d x d matrix (geqrf, 4/3 d^3) and forming Q (orgqr, 4/3
    d^3), the LAPACK count; `baseline._haar` calls `numpy.linalg.qr`, which does both."""
    return 8 * d**3 // 3


_SUFFIXES = {"": 1, "k": 10**3, "m": 10**6, "b": 10**9, "g": 10**9, "t": 10**12}


def parse_count(text: str, what: str = "a count") -> int:
    """A positive whole number written as 5000000, 5,000,000, 5_000_000, 5e6, 5M, 124M or 1.5B (k, M, B or G,
    and T are powers of 1000)."""
    m = re.fullmatch(
        r"([0-9]*\.?[0-9]+(?:e[+-]?[0-9]+)?)([kmbgt]?)", text.strip().lower().replace(",", "").replace("_", "")
    )
    if not m:
        raise ActdbError(f"cannot read {what} from {text!r} (e.g. 5000000, 5e6, 5M)")
    value = decimal.Decimal(m.group(1)) * _SUFFIXES[m.group(2)]
    if value != value.to_integral_value() or value < 1:
        raise ActdbError(f"{what} {text!r} must be a whole number of at least 1")
    return int(value)


@dataclass(frozen=True)
class Architecture:
    """The shape that matters for planning: layers x MLP width, and the parameters a forward pass multiplies."""

    name: str
    n_layers: int
    d_mlp: int
    params: int
    d_model: int | None = None
    vocab: int | None = None

    @property
    def n_neurons(self) -> int:
        return self.n_layers * self.d_mlp

    def describe(self) -> str:
        d_model = f", d_model {self.d_model:,}" if self.d_model else ""
        vocab = f", vocab {self.vocab:,}" if self.vocab else ""
        return (
            f"{self.n_layers} layers x {self.d_mlp:,} MLP neurons = {self.n_neurons:,} per set{d_model}, "
            f"{self.params / 1e6:,.1f}M params{vocab}"
        )


# Checked against transformers' configs instantiated offline on the meta device, parameters counted there
# (tests/test_plan.py does it again): GPT2Config() is gpt2-small, GPT2Config(n_layer, n_embd, n_head) with the
# hub's sizes the larger GPT-2s (tied embeddings, d_mlp = 4 d_model); pythia-* are GPTNeoXConfig with the hub's
# sizes (vocab padded to 50,304, untied embeddings); llama-7b is LlamaConfig().
ARCHITECTURES: dict[str, Architecture] = {
    a.name: a
    for a in (
        Architecture("gpt2-small", 12, 3072, 124_439_808, 768, 50257),
        Architecture("gpt2-medium", 24, 4096, 354_823_168, 1024, 50257),
        Architecture("gpt2-large", 36, 5120, 774_030_080, 1280, 50257),
        Architecture("gpt2-xl", 48, 6400, 1_557_611_200, 1600, 50257),
        Architecture("pythia-70m", 6, 2048, 70_426_624, 512, 50304),
        Architecture("pythia-160m", 12, 3072, 162_322_944, 768, 50304),
        Architecture("pythia-410m", 24, 4096, 405_334_016, 1024, 50304),
        Architecture("pythia-1b", 16, 8192, 1_011_781_632, 2048, 50304),
        Architecture("pythia-1.4b", 24, 8192, 1_414_647_808, 2048, 50304),
        Architecture("llama-7b", 32, 11008, 6_738_415_616, 4096, 32000),
    )
}
ALIASES = {"gpt2": "gpt2-small"}


def architecture(name: str) -> Architecture:
    """A known architecture by name; a one-line error listing the known ones otherwise."""
    key = name.strip().lower()
    key = ALIASES.get(key, key)
    if key not in ARCHITECTURES:
        raise ActdbError(
            f"unknown architecture {name!r}; known: {', '.join(ARCHITECTURES)} "
            "(or give --layers, --d-mlp and --params for another shape)"
        )
    return ARCHITECTURES[key]


def custom_architecture(
    n_layers: int, d_mlp: int, params: int, d_model: int | None = None, vocab: int | None = None
) -> Architecture:
    """A shape given by hand (`--layers --d-mlp --params`)."""
    for label, value in (("--layers", n_layers), ("--d-mlp", d_mlp), ("--params", params)):
        if value < 1:
            raise ActdbError(f"{label} must be at least 1, got {value}")
    return Architecture(f"custom {n_layers}x{d_mlp}", n_layers, d_mlp, params, d_model, vocab)


@dataclass(frozen=True)
class Accelerator:
    """An accelerator's published dense peaks (FLOP/s, without structured sparsity) and memory (bytes)."""

    name: str
    tf32: float  # TF32 tensor cores: the engine's products under --precision auto/tf32
    fp32: float  # plain float32: products under --precision float32, the baseline's products, a float32 forward
    fp64: float  # FP64 tensor cores: the token control's float64 products
    bf16: float  # BF16/FP16 tensor cores: a 16-bit forward pass
    memory: int
    bandwidth: float  # bytes/s of device memory: the accumulators' additions
    source: str


# NVIDIA's spec sheets print the tensor-core TF32/BF16 peaks "with sparsity"; the dense peak is half of that.
ACCELERATORS: dict[str, Accelerator] = {
    # NVIDIA H100 Tensor Core GPU datasheet, H100 SXM column: FP64 Tensor Core 67, FP32 67, TF32 Tensor Core
    # 989*, BF16 Tensor Core 1,979* TFLOPS (* with sparsity); 80 GB HBM3 at 3.35 TB/s.
    "h100": Accelerator(
        "H100 SXM", 494.7e12, 66.9e12, 66.9e12, 989.4e12, 80 * 10**9, 3.35e12, "NVIDIA H100 datasheet, SXM"
    ),
    # NVIDIA A100 Tensor Core GPU datasheet (nvidia-a100-datasheet-us-nvidia-1758950-r4-web.pdf), A100 80GB SXM:
    # FP64 Tensor Core 19.5, FP32 19.5, TF32 Tensor Core 156 (312*), BF16 Tensor Core 312 (624*) TFLOPS; 80 GB
    # HBM2e at 2,039 GB/s.
    "a100": Accelerator(
        "A100 SXM 80GB", 156e12, 19.5e12, 19.5e12, 312e12, 80 * 10**9, 2.039e12, "NVIDIA A100 datasheet, SXM"
    ),
    # NVIDIA H200 Tensor Core GPU datasheet, H200 SXM: the H100 SXM's peaks (FP64 Tensor Core 67, FP32 67, TF32
    # Tensor Core 989*, BF16 Tensor Core 1,979* TFLOPS); 141 GB HBM3e at 4.8 TB/s.
    "h200": Accelerator(
        "H200 SXM", 494.7e12, 66.9e12, 66.9e12, 989.4e12, 141 * 10**9, 4.8e12, "NVIDIA H200 datasheet, SXM"
    ),
}
ADD_BYTES = 8 + 4 + 8  # `acc += out`: a float64 and a float32 read, a float64 written per value
DEVICES = ("cpu", "cuda", *ACCELERATORS)


@dataclass(frozen=True)
class Rates:
    """What the estimate divides by: FLOP/s of each kind of product where the engine runs it, and this host's
    rates for the work the engine always does on the host."""

    products: float  # the device's pair products (float32; TF32 on CUDA under --precision auto/tf32)
    grams: float  # the device's within-layer Grams, counted as `correlation_flops` counts them
    adds: float  # values/s added into the float64 accumulators (and summed into the column sums)
    baseline: float  # the device's float32 products of the baseline phase (with covariances and rotations)
    float64: float  # the device's float64 products: the token control's between-token part
    forward: float  # the ingest forward pass
    host_qr: float  # Haar rotations' QRs on the host (NumPy), counted as `qr_flops`
    stream: float  # bytes/s of stored activations the host reads, checks and converts to float32
    overlapped: bool = False  # reads run on a thread ahead of the products (the CuPy backend), not between them
    efficiency: float = 1.0  # the share of these rates the engine sustains end to end (CPU_ENGINE_EFFICIENCY)
    source: str = ""


@dataclass(frozen=True)
class PlanRequest:
    """A study to plan. `read_speed` (bytes/s) is the storage's, when known; otherwise reads are assumed to keep
    up and the plan says how fast they would need to be."""

    arch: Architecture
    models: int
    steps: int
    tokens: int
    dtype: str = "float16"
    device: str = "cpu"
    workers: int = 1
    memory_budget: int | None = None
    precision: str = "auto"
    torch_dtype: str = "float32"
    control: str = "none"
    baseline_draws: int = CorrelationOptions.baseline_draws
    chunk_tokens: int = CorrelationOptions.chunk_tokens
    read_speed: float | None = None

    def check(self) -> None:
        """One-line errors for a request that cannot be planned, checked on the counts before anything is built."""
        if self.models < 2:
            raise ActdbError(f"--models must be at least 2 (each step correlates its models' sets), got {self.models}")
        for label, value, most in (
            ("--steps", self.steps, MAX_STEPS),
            ("--tokens", self.tokens, MAX_TOKENS),
            ("--workers", self.workers, MAX_WORKERS),
            ("--chunk-tokens", self.chunk_tokens, MAX_TOKENS),
        ):
            if value > most:
                raise ActdbError(f"{label} {value:,} is more than the planner takes ({most:,})")
        if self.arch.n_neurons > MAX_NEURONS:
            raise ActdbError(
                f"{self.arch.n_layers:,} layers x {self.arch.d_mlp:,} neurons is more than the planner takes per set "
                f"({MAX_NEURONS:,} neurons)"
            )
        tasks = self.models * (self.models - 1) // 2 * self.arch.n_layers
        if tasks > MAX_TASKS:
            most = 1
            while (most + 1) * most // 2 * self.arch.n_layers <= MAX_TASKS:
                most += 1
            if most < 2:
                raise ActdbError(f"{self.arch.n_layers:,} layers make more (pair x layer) tasks than the planner packs")
            raise ActdbError(
                f"--models {self.models:,} makes {tasks:,} (pair x layer) tasks per step, more than the planner packs "
                f"({MAX_TASKS:,}); with {self.arch.n_layers} layers plan at most {most:,} models (a step's cost "
                "grows with models^2: plan a part and scale)"
            )
        for label, value in (
            ("--steps", self.steps),
            ("--workers", self.workers),
            ("--baseline-draws", self.baseline_draws),
            ("--chunk-tokens", self.chunk_tokens),
        ):
            if value < 1:
                raise ActdbError(f"{label} must be at least 1, got {value}")
        if self.tokens < 2:
            raise ActdbError(f"--tokens must be at least 2, got {self.tokens}")
        if self.device not in DEVICES:
            raise ActdbError(f"unknown device {self.device!r}; use {', '.join(DEVICES)}")
        if self.dtype not in STORED_DTYPES:
            raise ActdbError(f"unknown stored dtype {self.dtype!r}; ingest writes {', '.join(STORED_DTYPES)}")
        if self.torch_dtype not in TORCH_DTYPES:
            raise ActdbError(f"unknown forward dtype {self.torch_dtype!r}; use {', '.join(TORCH_DTYPES)}")
        if self.control not in CONTROLS:
            raise ActdbError(f"unknown control {self.control!r}; use {', '.join(CONTROLS)}")
        if self.control == "token" and self.arch.vocab is None:
            raise ActdbError("--control token needs the vocabulary size: give --vocab with a custom shape")
        if self.read_speed is not None and self.read_speed <= 0:
            raise ActdbError("--read-speed must be positive")
        check_precision(self.precision, _backend(self.device))

    @property
    def options(self) -> CorrelationOptions:
        """The engine options a correlation run of this study uses."""
        return CorrelationOptions(
            control=self.control,
            chunk_tokens=self.chunk_tokens,
            memory_budget=self.memory_budget,
            baseline_draws=self.baseline_draws,
            precision=self.precision,
        )

    @property
    def n_vocab(self) -> int:
        """Distinct token ids the token control keeps sums for: at most the vocabulary, at most the tokens."""
        return min(self.arch.vocab or self.tokens, self.tokens)


@dataclass(frozen=True)
class _SizedBackend(ArrayBackend):
    """A stand-in for a device the planner does not have: an array backend whose free memory is given."""

    memory: int = 0

    def free_memory(self) -> int:
        return self.memory


def _backend(device: str) -> ArrayBackend:
    """The backend a run on `device` uses (CuPy for a GPU, NumPy for the CPU), for the engine's own checks."""
    if device == "cpu":
        return NUMPY
    if device in ACCELERATORS:
        return _SizedBackend("cupy", np, ACCELERATORS[device].memory)
    return _SizedBackend("cupy", np, 0)


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
class ClusterTasks:
    """How `correlate --workers/--scheduler` cuts one step: each pass into `shards` token shards, one task each,
    whose sums a tree of additions joins; every task holds at most the per-task budget."""

    shards: int
    tasks: int
    read_per_task: int  # the largest: its pass's reads over its shards
    sent_per_task: int  # the largest shard sums a task hands to the reduction


def cluster_tasks(memory: MemoryPlan, threads: int) -> ClusterTasks:
    """The accumulating tasks of one step on `threads` worker threads (the engine's own shard rule)."""
    shards = default_shards(threads, memory.n_passes)
    return ClusterTasks(
        shards,
        shards * memory.n_passes,
        max(memory.pass_reads, default=0) // shards,
        max(memory.pass_sums, default=0) if shards > 1 else 0,
    )


@dataclass(frozen=True)
class CorrelationFlops:
    """FLOPs (2 per multiply-add) of one correlation run, by the engine operation (`CorrelationEngine`) they count."""

    pair_products: int  # _accumulate: X_a^T X_b per chunk, each unordered pair once (float32 / TF32)
    grams: int  # _accumulate_moments: X_l^T X_l per chunk, set and layer (a SYRK on the CPU: one triangle)
    sums: int  # _accumulate_moments: column sums (one addition per value)
    adds: int  # _accumulate: each chunk's float32 products added into the float64 accumulators
    baseline: int  # per draw: Cov_ab R_b (_baseline_forward) and R_a^T Cov_ab (_baseline_backward), float32
    rotation_sd: int  # _rotations, per pass, set, draw and layer: Cov R for the rotated neurons' sd, float32
    draw_products: int  # _rotations, per pass, set, draw > 0 and layer: R P_k, float32
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
            draw_products += (draws - 1) * s.n_layers * 2 * s.d_mlp**3
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


@dataclass(frozen=True)
class StepTime:
    """Seconds of one correlation run (one step), by what the engine spends them on."""

    products: float  # the per-chunk products
    stream: float  # the host reading, checking and converting the chunks
    read: float  # storage reads at --read-speed (0 when not given)
    baseline: float  # the device's products of the baseline phase (and the token control's)
    host: float  # the QRs on the host
    overlapped: bool

    @property
    def accumulate(self) -> float:
        """The passes over the tokens: reads between the products on the CPU, on a thread ahead of them on GPUs."""
        reading = self.stream + self.read
        return max(self.products, reading) if self.overlapped else self.products + reading

    @property
    def total(self) -> float:
        return self.accumulate + self.baseline + self.host


@dataclass(frozen=True)
class CapacityPlan:
    """Everything `actdb plan` reports for one request."""

    request: PlanRequest
    budget_source: str
    set_bytes: int
    token_bytes: int
    memory: MemoryPlan
    flops: CorrelationFlops  # one step
    ingest_flops: int  # one set
    rates: Rates
    step: StepTime

    @property
    def n_sets(self) -> int:
        return self.request.models * self.request.steps

    @property
    def activation_bytes(self) -> int:
        return self.n_sets * self.set_bytes

    @property
    def total_bytes(self) -> int:
        return self.activation_bytes + self.token_bytes

    @property
    def ingest_seconds(self) -> float:
        """One set's forward pass at the forward rate."""
        return self.ingest_flops / self.rates.forward

    @property
    def ingest_total_seconds(self) -> float:
        """Every set's, spread over the workers (perfect scaling)."""
        return self.n_sets * self.ingest_seconds / self.request.workers

    @property
    def correlation_total_seconds(self) -> float:
        """Every step's run, spread over the workers (perfect scaling)."""
        return self.request.steps * self.step.total / self.request.workers

    @property
    def needed_read_speed(self) -> float:
        """Bytes/s of storage reads that keep the products busy."""
        return self.memory.read_bytes / self.step.products


def default_budget(request: PlanRequest, free_memory: int | None = None) -> tuple[int, str]:
    """The budget a run would get (`correlation.memory_budget`): --memory-budget, or the engine's share of the
    device's free memory: this machine's available RAM for cpu, the spec sheet's memory for a named
    accelerator, `free_memory` (measured) for cuda."""
    options = request.options
    if request.memory_budget is not None:
        return memory_budget(options, NUMPY), "--memory-budget"
    if request.device == "cpu":
        return memory_budget(options, NUMPY), "the engine's share of this machine's available memory"
    if request.device in ACCELERATORS:
        acc = ACCELERATORS[request.device]
        return memory_budget(options, _backend(request.device)), f"the engine's share of the {acc.name}'s memory"
    if free_memory is None:
        raise ActdbError("--device cuda needs the GPU's free memory; plan on a machine with one, or name it")
    return memory_budget(
        options, _SizedBackend("cupy", np, free_memory)
    ), "the engine's share of this GPU's free memory"


def plan_study(request: PlanRequest, rates: Rates | None = None, free_memory: int | None = None) -> CapacityPlan:
    """Plan a study: bytes, memory and passes from the engine's planner, FLOPs from the engine's products, times
    from `rates` (measured with `measure_rates` when not given)."""
    request.check()
    if rates is None:
        rates, free_memory = measure_rates(request)
    arch, itemsize = request.arch, np.dtype(request.dtype).itemsize
    inputs = synthetic_inputs(arch, request.models)
    budget, budget_source = default_budget(request, free_memory)
    memory = plan_memory(inputs, request.n_vocab, request.options, budget, request.tokens, itemsize)
    syrk = _backend(request.device).name == "numpy"
    flops = correlation_flops(
        inputs, memory.passes, request.tokens, request.options, request.n_vocab, syrk, memory.budget
    )
    slower = 1 / rates.efficiency
    step = StepTime(
        products=slower
        * (flops.pair_products / rates.products + flops.grams / rates.grams + (flops.adds + flops.sums) / rates.adds),
        stream=slower * memory.read_bytes / rates.stream,
        read=memory.read_bytes / request.read_speed if request.read_speed else 0.0,
        baseline=slower
        * (flops.baseline_phase / rates.baseline + (flops.control / rates.float64 if flops.control else 0.0)),
        host=slower * flops.qr / rates.host_qr,
        overlapped=rates.overlapped,
    )
    return CapacityPlan(
        request,
        budget_source,
        request.tokens * arch.n_neurons * itemsize,
        request.tokens * TOKEN_BYTES,
        memory,
        flops,
        ingest_flops(arch, request.tokens),
        rates,
        step,
    )


def _best_seconds(run, repeats: int) -> float:
    """The fastest of `repeats` timed calls after one untimed warm-up (thread pools, page faults)."""
    run()
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - started)
    return best


def torch_gemm_rate(dtype: str = "float32", size: int = 4096, device: str = "cpu", tf32: bool = False) -> float:
    """FLOP/s of a (size x size) @ (size x size) product through torch: how ingest's forward pass multiplies, and
    the products of a CUDA device (best of 2 after a warm-up)."""
    import torch

    kind = getattr(torch, dtype)
    a = torch.randn(size, size, device=device).to(kind)
    b = torch.randn(size, size, device=device).to(kind)
    out = torch.empty_like(a)
    previous = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = tf32

    def run() -> None:
        torch.matmul(a, b, out=out)
        if device != "cpu":
            torch.cuda.synchronize()

    try:
        return 2 * size**3 / _best_seconds(run, 2)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = previous


def numpy_gemm_rate(dtype: str, size: int) -> float:
    """FLOP/s of a square NumPy product (best of 2 after a warm-up): how the CPU engine multiplies, per chunk
    (float32, 4096 wide), in the baseline phase (float32, the layers' width) and for the token control
    (float64)."""
    rng = np.random.default_rng(0)
    a, b = (rng.standard_normal((size, size)).astype(dtype) for _ in range(2))
    out = np.empty_like(a)
    return 2 * size**3 / _best_seconds(lambda: np.matmul(a, b, out=out), 2)


def chunk_product_rate(width: int, rows: int) -> float:
    """FLOP/s of the CPU engine's per-chunk pair product `x_a^T x_b`, (width x rows) @ (rows x width) on float32
    chunks as the engine holds them (best of 2 after a warm-up)."""
    rng = np.random.default_rng(0)
    a, b = (rng.standard_normal((rows, width), dtype=np.float32) for _ in range(2))
    out = np.empty((width, width), dtype=np.float32)
    return 2 * width * width * rows / _best_seconds(lambda: np.matmul(a.T, b, out=out), 2)


def add_rate(values: int = 1 << 22) -> float:
    """Values/s of the accumulation `acc += out` (float64 += float32), a pass over memory per chunk and task."""
    acc = np.zeros(values)
    out = np.ones(values, dtype=np.float32)
    return values / _best_seconds(lambda: np.add(acc, out, out=acc), 3)


def torch_add_rate(device: str, values: int = 1 << 26) -> float:
    """`add_rate` on a torch device (CuPy's `+=` does the same pass over the device's memory)."""
    import torch

    acc = torch.zeros(values, dtype=torch.float64, device=device)
    out = torch.ones(values, dtype=torch.float32, device=device)

    def run() -> None:
        acc.add_(out)
        torch.cuda.synchronize()

    return values / _best_seconds(run, 3)


def gram_rate(size: int, rows: int = 8192) -> float:
    """`d (d + 1)` FLOPs per row / s of a chunk's Gram `x^T x` in NumPy (a SYRK), as the CPU engine forms them."""
    x = np.random.default_rng(0).standard_normal((rows, size)).astype(np.float32)
    out = np.empty((size, size), dtype=np.float32)
    return size * (size + 1) * rows / _best_seconds(lambda: np.matmul(x.T, x, out=out), 2)


def _mean_seconds_after(run, before, repeats: int) -> float:
    """Mean seconds of `run()` called right after `before()` (untimed), after one warm-up."""
    before()
    run()
    total = 0.0
    for _ in range(repeats):
        before()
        started = time.perf_counter()
        run()
        total += time.perf_counter() - started
    return total / repeats


def qr_rate(size: int, repeats: int = 3) -> float:
    """`qr_flops`/s of the engine's own Haar rotation (`baseline._haar`), each drawn right after a NumPy product
    as in the baseline phase."""
    from actdb.compute.correlation.baseline import _haar

    rng = np.random.default_rng(0)
    b = rng.standard_normal((size, size)).astype(np.float32)
    out = np.empty_like(b)
    return qr_flops(size) / _mean_seconds_after(lambda: _haar(rng, size), lambda: np.matmul(b, b, out=out), repeats)


def stream_rate(d_mlp: int, chunk_tokens: int, n_layers: int = 2, chunks: int = 3) -> float:
    """Bytes/s at which the engine's own reader (`correlation._read_chunks`) reads, checks and converts a
    freshly written activation file (from the page cache: the storage's speed is --read-speed's business), with
    a NumPy product after each chunk as in the engine."""
    from actdb.compute.correlation.engine import _read_chunks
    from actdb.store.files.activation import ActivationHeader, ActivationReader, ActivationWriter

    width, seq_len = min(d_mlp, 512), 512
    tokens = (chunks + 1) * max(seq_len, chunk_tokens // seq_len * seq_len)
    with tempfile.TemporaryDirectory(prefix="actdb-plan-") as tmp:
        path = Path(tmp) / "probe.h5"
        writer = ActivationWriter(
            path, ActivationHeader("probe", 0, "probe", "mlp.post", n_layers, width, tokens, "float16")
        )
        try:
            block = np.random.default_rng(0).standard_normal((tokens, width)).astype(np.float16)
            writer.write_rows(0, [block] * n_layers)
            writer.finish()
        finally:
            writer.close()
        probe = SetInput(0, str(path), n_layers, width, np.zeros(n_layers * width, dtype=np.float32))
        ids, mask = np.zeros(tokens, dtype=np.int32), np.ones(tokens, dtype=bool)
        gram = np.empty((width, width), dtype=np.float32)
        with ActivationReader(path) as reader:
            stream = _read_chunks([reader], [probe], [0], ids, mask, seq_len, chunk_tokens)
            rows, seconds = 0, 0.0
            for k in range(chunks + 1):
                started = time.perf_counter()
                n, _ids, chunk = next(stream)
                if k:  # the first chunk allocates the reused buffers
                    rows, seconds = rows + n, seconds + time.perf_counter() - started
                x = chunk[0][:, :width]
                np.matmul(x.T, x, out=gram)
    return rows * n_layers * width * 2 / seconds


@dataclass(frozen=True)
class HostRates:
    """This machine's measured rates: NumPy's per-chunk pair products (the CPU engine's), its Grams (SYRK), the
    accumulators' additions, float32 products at the layers' width (the baseline phase) and float64 ones (the
    token control's; 0 when not measured), the engine's QR and reader, and torch's products in the forward
    pass's dtype (ingest)."""

    products: float
    grams: float
    adds: float
    float32: float
    float64: float
    qr: float
    stream: float
    forward: float
    width: int = 0  # the width the baseline-phase products were measured at


def measure_host(request: PlanRequest) -> HostRates:
    """Time this machine for a few seconds, with the engine's own libraries and shapes: a chunk's pair product
    (at most 4096 neurons a side), Grams and baseline-phase products at the architecture's width (at most 2048),
    the accumulators' additions, the engine's QR (at most 1024 wide; FLOPs scale as d^3) and its reader on a small
    file, and a torch product for ingest's forward pass."""
    d = request.arch.d_mlp
    width = min(d, 2048)
    return HostRates(
        products=chunk_product_rate(min(request.arch.n_neurons, 4096), request.chunk_tokens),
        grams=gram_rate(width, request.chunk_tokens),
        adds=add_rate(),
        float32=numpy_gemm_rate("float32", width),
        float64=numpy_gemm_rate("float64", width) if request.control == "token" else 0.0,
        qr=qr_rate(min(d, 1024)),
        stream=stream_rate(d, request.chunk_tokens),
        forward=torch_gemm_rate(request.torch_dtype, 4096 if request.torch_dtype == "float32" else 2048),
        width=width,
    )


def rates_for(request: PlanRequest, host: HostRates, gpu: Rates | None = None) -> Rates:
    """The rates of a run on the request's device: all of this machine's on `cpu`; a named accelerator's
    published dense peaks for the products it runs (`ACCELERATORS`), `gpu`'s (measured) for `cuda`, with this
    machine's for the host's share (the QRs, reading and converting chunks: the engine does those on the host
    wherever its products run)."""
    shared = {"host_qr": host.qr, "stream": host.stream}
    note = f"QRs and reading at this machine's measured rates (QR at width {min(host.width, 1024)})"
    if request.device == "cpu":
        return Rates(
            host.products,
            host.grams,
            host.adds,
            host.float32,
            host.float64,
            host.forward,
            **shared,
            efficiency=CPU_ENGINE_EFFICIENCY,
            source=f"measured on this machine: NumPy (the CPU engine's library) on a chunk's pair product, Grams "
            f"and baseline-phase products {host.width} wide; torch for ingest; {note}",
        )
    if request.device in ACCELERATORS:
        acc = ACCELERATORS[request.device]
        products = acc.fp32 if request.precision == "float32" else acc.tf32
        return Rates(
            products,
            products,
            acc.bandwidth / ADD_BYTES,
            acc.fp32,
            acc.fp64,
            acc.fp32 if request.torch_dtype == "float32" else acc.bf16,
            **shared,
            overlapped=True,
            source=f"{acc.source}: dense peaks, which the products do not exceed; {note}",
        )
    if gpu is None:
        raise ActdbError("--device cuda needs this machine's GPU measured (measure_rates)")
    return replace(gpu, **shared, overlapped=True, source=f"measured on this machine's GPU through torch; {note}")


def measure_rates(request: PlanRequest) -> tuple[Rates, int | None]:
    """This machine's rates (`measure_host`, a few seconds) for the request's device, and for `cuda` the GPU's
    free memory, with its products measured through torch too."""
    host = measure_host(request)
    if request.device != "cuda":
        return rates_for(request, host), None
    import torch

    if not torch.cuda.is_available():
        raise ActdbError(
            "--device cuda measures this machine's GPU, but torch sees none here; name an accelerator "
            f"({', '.join(ACCELERATORS)}) to plan from its published peaks"
        )
    products = torch_gemm_rate("float32", 4096, "cuda", tf32=request.precision != "float32")
    gpu = Rates(
        products=products,
        grams=products,
        adds=torch_add_rate("cuda"),
        baseline=torch_gemm_rate("float32", 4096, "cuda"),
        float64=torch_gemm_rate("float64", 4096, "cuda"),
        forward=torch_gemm_rate(request.torch_dtype, 4096, "cuda"),
        host_qr=0.0,
        stream=0.0,
    )
    return rates_for(request, host, gpu), int(torch.cuda.mem_get_info()[0])
