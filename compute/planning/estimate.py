"""The estimate of a study before any of it runs: bytes, memory, passes, FLOPs and time, from its shape
(`planning.shapes`), the engine's operations (`planning.operations`) and this machine's rates (`planning.rates`).

A study is `models` models at `steps` training steps on one token dataset of `tokens` positions: one activation
set per (model, step), and one correlation run per step over that step's sets. What the engine would do is taken
from the engine itself wherever it can be:

- passes, and the memory a run holds, come from `correlation.plan_passes` run on synthetic `SetInput`s of the
  architecture's shape, the default budget from `correlation.memory_budget` (its share of free memory);
- the FLOPs follow the products `correlation.CorrelationEngine` computes (`correlation_flops` names each one),
  counted as 2 FLOPs per multiply-add; each unordered pair of sets is multiplied once (`X_a^T X_b`), and both
  directions' maxima and baselines come from that one product;
- times divide FLOPs by rates: this machine's, measured on one core in about two seconds by `measure_host` with
  the engine's own library, shapes, QR and reader and scaled by the cores (`measure_rates`; injectable, so tests
  time nothing); or, for the products of a named accelerator, its published dense peaks (`ACCELERATORS`: a
  bound), with the host's rates for the work the engine does there (the QRs, reading and converting chunks).

The design planned is the one-pass one: the step's (pair x layer) accumulators are sharded over the workers
(each worker holds its share beside its own chunk buffers and moments), and each chunk of tokens is read once
and handed to every worker, so a step is read once when the workers together hold all of its accumulators
(read amplification 1.0). With too few workers for that, the tasks are packed into passes over the workers'
combined memory, each pass reading again. The multi-pass design of one worker (today's `correlate` without
sharding) is planned beside it for comparison. The products and the baseline phase split over the workers that
hold accumulators; reading does not (every chunk is read once, by the host); the Haar QRs are computed once per
(seed, model, layer) for the whole study (a model's rotation is the same at every step) on the host's cores.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from actdb.compute.correlation.engine import (
    SetInput,
    memory_budget,
    pass_overhead,
    task_bytes,
)
from actdb.compute.planning.operations import (
    CorrelationFlops,
    MemoryPlan,
    correlation_flops,
    ingest_flops,
    plan_memory,
    qr_flops,
    synthetic_inputs,
)
from actdb.compute.planning.rates import Rates, measure_rates
from actdb.compute.planning.research import ResearchEstimate, research_estimate
from actdb.compute.planning.shapes import ACCELERATORS, TOKEN_BYTES, PlanRequest, SizedBackend, device_backend
from actdb.store.device import NUMPY
from actdb.store.errors import ActdbError


@dataclass(frozen=True)
class StepTime:
    """Seconds of one correlation run (one step), by what the engine spends them on, with the products and the
    baseline phase already split over the workers holding accumulators."""

    products: float  # the per-chunk products
    stream: float  # the host reading, checking and converting the chunks
    read: float  # storage reads at --read-speed (0 when not given)
    baseline: float  # the device's products of the baseline phase (and the token control's)
    overlapped: bool

    @property
    def reading(self) -> float:
        return self.stream + self.read

    @property
    def accumulate(self) -> float:
        """The passes over the tokens: reads between the products on the CPU, on a thread ahead of them on GPUs."""
        return max(self.products, self.reading) if self.overlapped else self.products + self.reading

    @property
    def total(self) -> float:
        return self.accumulate + self.baseline


@dataclass(frozen=True)
class CapacityPlan:
    """Everything `actdb plan` reports for one request."""

    request: PlanRequest
    budget_source: str
    set_bytes: int
    token_bytes: int
    memory: MemoryPlan  # one worker's multi-pass design, for comparison
    design: MemoryPlan  # the planned design: accumulators sharded over the workers, each chunk read once a pass
    design_chunk: int  # the design's --chunk-tokens: the largest (halving the requested) that makes it one pass
    sharing: int  # workers holding accumulators (at most one per (pair x layer) task)
    flops: CorrelationFlops  # one step of the planned design; `qr` counts the study's QRs once (see below)
    ingest_flops: int  # one set
    rates: Rates
    step: StepTime
    qr_seconds: float  # the study's Haar QRs, once per (seed, model, layer) and per extra draw, on the host
    research: ResearchEstimate

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
        """Every step in turn on all the workers, and the study's QRs once."""
        return self.request.steps * self.step.total + self.qr_seconds

    @property
    def bound(self) -> str:
        """What the study's correlation time is mostly spent on: products (with the baseline phase), reading or
        the host's QRs."""
        steps = self.request.steps
        parts = {
            "products": steps * (self.step.products + self.step.baseline),
            "reading": steps * self.step.reading,
            "host": self.qr_seconds,
        }
        return max(parts, key=lambda k: parts[k])

    @property
    def needed_read_speed(self) -> float:
        """Bytes/s of storage reads that keep the products busy."""
        return self.design.read_bytes / self.step.products


def study_qr_flops(inputs: list[SetInput], draws: int) -> int:
    """The study's Haar QRs with rotations cached per (seed, model, layer): each model's layers once (every step
    of a model is rotated the same way), and one P_k per extra draw and width."""
    per_model = sum(s.n_layers * qr_flops(s.d_mlp) for s in inputs)
    return per_model + sum((draws - 1) * qr_flops(d) for d in {s.d_mlp for s in inputs})


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
        return memory_budget(options, device_backend(request.device)), f"the engine's share of the {acc.name}'s memory"
    if free_memory is None:
        raise ActdbError("--device cuda needs the GPU's free memory; plan on a machine with one, or name it")
    return memory_budget(options, SizedBackend("cupy", np, free_memory)), "the engine's share of this GPU's free memory"


def sharded_budget(inputs: list[SetInput], n_vocab: int, request: PlanRequest, budget: int, workers: int) -> int:
    """The budget under which the engine's planner packs into one pass what `workers` workers of `budget` each
    hold: each keeps its own chunk buffers and moments (`pass_overhead`) and whole task blocks in the rest."""
    size = task_bytes(inputs[0], inputs[0])
    overhead = pass_overhead(inputs, n_vocab, request.options, size)
    per_worker = (budget - overhead) // size
    if per_worker < 1 or workers == 1:
        return budget
    return overhead + workers * per_worker * size


SMALLEST_CHUNK = 512  # the sharded design halves --chunk-tokens down to this to fit one pass
PACKINGS_TRIED = 32  # worker counts below --workers whose packing may read less (the planner packs greedily)


def sharded_design(
    inputs: list[SetInput], request: PlanRequest, budget: int, itemsize: int, memory: MemoryPlan
) -> tuple[MemoryPlan, int]:
    """The passes of the workers sharing a step's accumulators: one pass at the largest halving of the requested
    --chunk-tokens (down to `SMALLEST_CHUNK`) with which the whole step fits the workers together (each worker's
    chunk buffers shrink with the chunk); else, at the requested chunk, the packing into the memory of W' <= W
    workers that reads least (W itself, the `PACKINGS_TRIED` counts below it, or one worker, `memory`): a packing
    that fits fewer workers' memory fits W workers' too, and the engine's greedy packing can read more with more
    room (its passes cut the pairs at other places)."""
    if request.workers == 1 or not memory.fits:
        return memory, request.chunk_tokens

    def packed(shrunk: PlanRequest, workers: int) -> MemoryPlan:
        combined = sharded_budget(inputs, request.n_vocab, shrunk, budget, workers)
        return plan_memory(inputs, request.n_vocab, shrunk.options, combined, request.tokens, itemsize)

    chunk = request.chunk_tokens
    while chunk >= SMALLEST_CHUNK:
        plan = packed(replace(request, chunk_tokens=chunk), request.workers)
        if plan.n_passes == 1:
            return plan, chunk
        chunk //= 2
    best = memory
    for workers in range(request.workers, max(1, request.workers - PACKINGS_TRIED), -1):
        plan = packed(request, workers)
        if plan.read_bytes < best.read_bytes:
            best = plan
    return best, request.chunk_tokens


def plan_study(request: PlanRequest, rates: Rates | None = None, free_memory: int | None = None) -> CapacityPlan:
    """Plan a study: bytes, memory and passes from the engine's planner (one worker, and the workers sharing the
    accumulators), FLOPs from the engine's products, times from `rates` (measured with `measure_rates` when not
    given), and the research method's time at the same rates."""
    request.check()
    if rates is None:
        rates, free_memory = measure_rates(request)
    arch, itemsize = request.arch, np.dtype(request.dtype).itemsize
    inputs = synthetic_inputs(arch, request.models)
    budget, budget_source = default_budget(request, free_memory)
    memory = plan_memory(inputs, request.n_vocab, request.options, budget, request.tokens, itemsize)
    design, chunk = sharded_design(inputs, request, budget, itemsize, memory)
    n_tasks = request.models * (request.models - 1) // 2 * arch.n_layers
    sharing = min(request.workers, n_tasks)
    syrk = device_backend(request.device).name == "numpy"
    options = replace(request.options, chunk_tokens=chunk)
    flops = correlation_flops(inputs, design.passes, request.tokens, options, request.n_vocab, syrk, design.budget)
    flops = replace(flops, qr=study_qr_flops(inputs, request.baseline_draws))
    slower = 1 / rates.efficiency
    step = StepTime(
        products=slower
        * (flops.pair_products / rates.products + flops.grams / rates.grams + (flops.adds + flops.sums) / rates.adds)
        / sharing,
        stream=slower * design.read_bytes / rates.stream,
        read=design.read_bytes / request.read_speed if request.read_speed else 0.0,
        baseline=slower
        * (flops.baseline_phase / rates.baseline + (flops.control / rates.float64 if flops.control else 0.0))
        / sharing,
        overlapped=rates.overlapped,
    )
    return CapacityPlan(
        request,
        budget_source,
        request.tokens * arch.n_neurons * itemsize,
        request.tokens * TOKEN_BYTES,
        memory,
        design,
        chunk,
        sharing,
        flops,
        ingest_flops(arch, request.tokens),
        rates,
        step,
        slower * flops.qr / rates.host_qr,
        research_estimate(request, rates),
    )
