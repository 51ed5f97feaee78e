"""Host work that BLAS does badly on several threads, run side by side instead: each task on one BLAS thread, the
tasks on the cores this process may use. A LAPACK QR or `eigh` is mostly panel factorisations whose threads wait
on each other: on 2 shared cores (load ~10) eight 512 x 512 QRs took 19 s on two OpenBLAS threads and 0.9 s on
one, and a 512-wide float64 `eigh` 0.94 CPU-s against 0.029, with bit-equal results (benchmarks/RESULTS.md)."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

from threadpoolctl import threadpool_limits

from actdb.store.device import host_cores

Item = TypeVar("Item")
Result = TypeVar("Result")


def map_on_cores(fn: Callable[[Item], Result], items: Iterable[Item]) -> list[Result]:
    """`[fn(item) for item in items]`, the calls on as many threads as there are cores (and items), each call on
    one BLAS thread."""
    items = list(items)
    workers = max(1, min(len(items), host_cores()))
    with threadpool_limits(1, "blas"), ThreadPoolExecutor(workers) as pool:
        return list(pool.map(fn, items))
