"""What a study is: the architectures and accelerators it may name, its request (models x steps x tokens), and
counts as users write them (5M, 1.5B)."""

from __future__ import annotations

import decimal
import re
from dataclasses import dataclass

import numpy as np

from actdb.compute.correlation.engine import (
    CorrelationOptions,
)
from actdb.compute.correlation.precision import check_precision
from actdb.store.device import NUMPY, ArrayBackend
from actdb.store.errors import ActdbError
from actdb.store.refs import CONTROLS, STORED_DTYPES

TOKEN_BYTES = 4 + 1  # the token file holds an int32 id and a bool mask per position (store.files.token)


TORCH_DTYPES = ("float32", "bfloat16", "float16")  # the forward pass (`ingest --torch-dtype`)
# Bounds on a request, checked before anything is built: the engine's pass planner packs one object per (pair x
# layer) task of a step, so models are bounded by the tasks they make (50k pack in about a second).
MAX_TASKS = 50_000
MAX_STEPS = 10**6
MAX_TOKENS = 10**15
MAX_WORKERS = 10**6
MAX_NEURONS = 10**8  # per set (a llama-7b set has 352,256)


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


DEVICES = ("cpu", "cuda", *ACCELERATORS)


@dataclass(frozen=True)
class SizedBackend(ArrayBackend):
    """A stand-in for a device the planner does not have: an array backend whose free memory is given."""

    memory: int = 0

    def free_memory(self) -> int:
        return self.memory


def device_backend(device: str) -> ArrayBackend:
    """The backend a run on `device` uses (CuPy for a GPU, NumPy for the CPU), for the engine's own checks."""
    if device == "cpu":
        return NUMPY
    if device in ACCELERATORS:
        return SizedBackend("cupy", np, ACCELERATORS[device].memory)
    return SizedBackend("cupy", np, 0)


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
    host_cores: int | None = None  # the host's cores that QR and read (default: this machine's)

    def check(self) -> None:
        """One-line errors for a request that cannot be planned, checked on the counts before anything is built."""
        if self.models < 2:
            raise ActdbError(f"--models must be at least 2 (each step correlates its models' sets), got {self.models}")
        for label, value, most in (
            ("--steps", self.steps, MAX_STEPS),
            ("--tokens", self.tokens, MAX_TOKENS),
            ("--workers", self.workers, MAX_WORKERS),
            ("--chunk-tokens", self.chunk_tokens, MAX_TOKENS),
            ("--host-cores", self.host_cores or 1, MAX_WORKERS),
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
            ("--host-cores", self.host_cores or 1),
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
        check_precision(self.precision, device_backend(self.device))

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
