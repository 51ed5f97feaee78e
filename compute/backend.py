"""The array-module seam: CuPy when a CUDA device is usable, NumPy otherwise; one code path for both."""

from __future__ import annotations

from dataclasses import dataclass
from types import ModuleType

import numpy as np

from actdb.store.errors import ActdbError


@dataclass(frozen=True)
class Backend:
    """An array module plus the few operations that differ between NumPy and CuPy."""

    name: str
    xp: ModuleType

    def asarray(self, a: np.ndarray, dtype=None):
        return self.xp.asarray(a, dtype=dtype)

    def to_numpy(self, a) -> np.ndarray:
        return a.get() if self.name == "cupy" else np.asarray(a)

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

    def segment_sum(self, values, segments, n_segments: int):
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


def cupy_usable() -> bool:
    try:
        import cupy

        return bool(cupy.is_available())
    except Exception:
        return False


def get_backend(device: str = "auto") -> Backend:
    """`auto` picks CuPy when usable; `cuda` without a usable device is a clear error."""
    if device not in ("auto", "cpu", "cuda"):
        raise ActdbError(f"unknown device {device!r}; use auto, cpu or cuda")
    if device == "cpu" or (device == "auto" and not cupy_usable()):
        return Backend("numpy", np)
    if not cupy_usable():
        raise ActdbError(
            "--device cuda was asked for but CuPy cannot use a CUDA device "
            "(install the `gpu` extra: pip install 'actdb[gpu]')"
        )
    import cupy

    return Backend("cupy", cupy)
