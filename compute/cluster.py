"""One way to reach a Dask cluster: an existing scheduler (`--scheduler ADDRESS`: SLURM through dask-jobqueue,
dask-cuda's GPU workers, ...) or a local cluster of worker processes (`--workers N`, one thread each).

`distributed` is imported only here and only when a cluster is asked for: it costs most of a second at start-up.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from actdb.store.errors import ActdbError

CONNECT_SECONDS = 20
TASK_SHARE = 0.3  # of a worker thread's memory one task's accumulators may use: a reduce holds three partials


@dataclass(frozen=True)
class ClusterSpec:
    """Where tasks run: `scheduler` (an address) or `workers` local processes; neither means in this process."""

    scheduler: str | None = None
    workers: int | None = None

    def __post_init__(self) -> None:
        if self.scheduler is not None and self.workers is not None:
            raise ActdbError("give --scheduler (an existing cluster) or --workers (a local one), not both")
        if self.workers is not None and self.workers < 1:
            raise ActdbError("--workers must be at least 1")
        if self.scheduler is not None and not self.scheduler.strip():
            raise ActdbError("--scheduler needs an address, e.g. tcp://10.0.0.5:8786")

    @property
    def enabled(self) -> bool:
        return self.scheduler is not None or self.workers is not None

    @property
    def multi_machine(self) -> bool:
        """An existing scheduler may place workers on other machines; a local cluster never does."""
        return self.scheduler is not None

    def describe(self) -> str:
        return f"the cluster at {self.scheduler}" if self.scheduler else f"a local cluster of {self.workers} worker(s)"


@contextlib.contextmanager
def open_client(spec: ClusterSpec) -> Iterator[Any]:
    """A `distributed.Client` on the requested cluster, closed (and a local cluster shut down) on exit."""
    try:
        from distributed import Client, LocalCluster
    except ImportError:
        raise ActdbError("cluster execution needs dask.distributed: pip install distributed") from None
    logging.getLogger("distributed").setLevel(logging.ERROR)
    if spec.scheduler is not None:
        try:
            client = Client(spec.scheduler, timeout=CONNECT_SECONDS)
        except (OSError, TimeoutError, ValueError) as exc:
            raise ActdbError(f"cannot reach the Dask scheduler at {spec.scheduler}: {exc}") from None
        with client:
            yield client
        return
    cluster = LocalCluster(
        n_workers=spec.workers,
        threads_per_worker=1,
        processes=True,
        dashboard_address=":0",  # a free port: several clusters may run on one machine
        silence_logs=logging.CRITICAL,  # a failed task reaches the client as its one-line error
    )
    with cluster, Client(cluster) as client:
        yield client


def worker_threads(client: Any) -> int:
    """Threads over all workers (at least 1)."""
    workers = client.scheduler_info()["workers"].values()
    return max(1, sum(int(w.get("nthreads", 1)) for w in workers))


def task_budget(client: Any, fallback: int) -> int:
    """Bytes one task's accumulators may use: a share of the smallest worker's memory per thread (`fallback`
    when workers set no limit)."""
    workers = client.scheduler_info()["workers"].values()
    limits = [int(w["memory_limit"]) / max(1, int(w.get("nthreads", 1))) for w in workers if w.get("memory_limit")]
    if not limits:
        return fallback
    return int(min(limits) * TASK_SHARE)
