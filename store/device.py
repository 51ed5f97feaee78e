"""One resolver for `--device auto|cpu|cuda`: the torch device for forward passes and the array backend (CuPy on
a CUDA device, NumPy otherwise) for the correlation engine. Both are looked up lazily, so a command that only
needs one of them never imports or checks the other."""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import cached_property
from types import ModuleType
from typing import Any

import numpy as np

from actdb.store.errors import ActdbError
from actdb.store.refs import DEVICES


@dataclass(frozen=True)
class ArrayBackend:
    """An array module plus the few operations that differ between NumPy and CuPy."""

    name: str
    xp: ModuleType

    def asarray(self, a: np.ndarray, dtype: Any = None) -> Any:
        return self.xp.asarray(a, dtype=dtype)

    def to_numpy(self, a: Any) -> np.ndarray:
        return a.get() if self.name == "cupy" else np.asarray(a)

    def matmul(self, a: Any, b: Any, out: Any) -> Any:
        """`out = a @ b` into a reused buffer (NumPy turns `x.T @ x` into a half-cost SYRK)."""
        return self.xp.matmul(a, b, out=out)

    def free_memory(self) -> int:
        """Bytes the accumulators may use: free device memory, or available RAM on the host."""
        if self.name == "cupy":
            free, _total = self.xp.cuda.runtime.memGetInfo()
            return int(free)
        try:
            with open("/proc/meminfo") as fh:
                info = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in fh}
            return info.get("MemAvailable", 8 * 2**30)
        except OSError:
            return 8 * 2**30

    def segment_sum(self, values: Any, segments: Any, n_segments: int) -> Any:
        """Row sums of `values (T, N)` grouped by `segments (T,)` into `(n_segments, N)` float64."""
        xp = self.xp
        out = xp.zeros((n_segments, values.shape[1]), dtype=xp.float64)
        if values.shape[0] == 0:
            return out
        if self.name == "cupy":
            import cupyx

            cupyx.scatter_add(out, segments, values.astype(xp.float64))
            return out
        order = np.argsort(segments, kind="stable")
        seg_sorted = segments[order]
        starts = np.flatnonzero(np.r_[True, seg_sorted[1:] != seg_sorted[:-1]])
        out[seg_sorted[starts]] = np.add.reduceat(values[order].astype(np.float64), starts, axis=0)
        return out


NUMPY = ArrayBackend("numpy", np)


def cupy_usable() -> bool:
    try:
        import cupy

        return bool(cupy.is_available())
    except Exception:
        return False


def _torch_cuda() -> bool:
    import torch

    return bool(torch.cuda.is_available())


@dataclass(frozen=True)
class Device:
    """A resolved `--device` choice."""

    choice: str

    @cached_property
    def torch(self):
        """The torch device for forward passes: CUDA when asked for (or available under `auto`), else CPU."""
        import torch

        if self.choice == "cuda" and not _torch_cuda():
            raise ActdbError("--device cuda was asked for but no CUDA device is available to torch")
        return torch.device("cuda" if self.choice == "cuda" or (self.choice == "auto" and _torch_cuda()) else "cpu")

    @cached_property
    def array(self) -> ArrayBackend:
        """The array backend for the correlation engine: CuPy on a usable CUDA device, NumPy otherwise."""
        if self.choice == "cpu" or (self.choice == "auto" and not cupy_usable()):
            return NUMPY
        if not cupy_usable():
            raise ActdbError(
                "--device cuda was asked for but CuPy cannot use a CUDA device "
                "(install the `gpu` extra: pip install 'actdb[gpu]')"
            )
        import cupy

        return ArrayBackend("cupy", cupy)


def resolve_device(choice: str = "auto") -> Device:
    """`auto` uses a GPU where there is one; `cuda` without a usable one is a one-line error when first used."""
    if choice not in DEVICES:
        raise ActdbError(f"unknown device {choice!r}; use auto, cpu or cuda")
    return Device(choice)


def host_cores() -> int:
    """The CPU cores this process may run on (its affinity mask, which `taskset` or a container narrows), not the
    machine's count: parallel work sized by it never oversubscribes the cores a user gave."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS and Windows have no affinity call
        return os.cpu_count() or 1
