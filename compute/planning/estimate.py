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
- times divide FLOPs by rates: this machine's, measured in a few seconds by `measure_host` with the engine's
  own library, shapes, QR and reader (`measure_rates`; injectable, so tests time nothing) and scaled by the
  share of them the CPU engine sustains (`CPU_ENGINE_EFFICIENCY`, measured on the engine); or, for the products
  of a named accelerator, its published dense peaks (`ACCELERATORS`: a bound), with this machine's rates for the
  work the engine does on the host (the QRs, reading and converting chunks).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from actdb.compute.correlation.engine import (
    memory_budget,
)
from actdb.compute.planning.operations import (
    CorrelationFlops,
    MemoryPlan,
    correlation_flops,
    ingest_flops,
    plan_memory,
    synthetic_inputs,
)
from actdb.compute.planning.rates import Rates, measure_rates
from actdb.compute.planning.shapes import ACCELERATORS, TOKEN_BYTES, PlanRequest, SizedBackend, device_backend
from actdb.store.device import NUMPY
from actdb.store.errors import ActdbError


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
        return memory_budget(options, device_backend(request.device)), f"the engine's share of the {acc.name}'s memory"
    if free_memory is None:
        raise ActdbError("--device cuda needs the GPU's free memory; plan on a machine with one, or name it")
    return memory_budget(options, SizedBackend("cupy", np, free_memory)), "the engine's share of this GPU's free memory"


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
    syrk = device_backend(request.device).name == "numpy"
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
