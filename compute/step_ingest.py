"""`actdb ingest`: each step ingested, explained and (on request) its predictions recorded, here in turn or, with
`--scheduler/--workers`, one step per Dask task.

Each task opens the store itself and runs the ordinary ingest (and explanation) of one checkpoint, so the run
lifecycle applies unchanged: the database claim keeps each set done once, however many tasks or users ask for
it, and a task whose worker dies leaves a running row that the retry reaps (at once on the same machine, once
its heartbeat is stale on another) and resumes from its last flushed row. Workers on other machines need the
store folder at the same path and a database they can all reach: PostgreSQL, not an SQLite file.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from dataclasses import replace

from tqdm.auto import tqdm

from actdb.compute.cluster import ClusterSpec, open_client
from actdb.compute.explain.run import ingest_and_explain
from actdb.compute.similarity.predictions import PredictionRequest, compute_predictions
from actdb.store.config import StoreConfig
from actdb.store.database.connection import Store
from actdb.store.database.lifecycle import HEARTBEAT_SECONDS, STALE_AFTER
from actdb.store.errors import ActdbError, BusyError, first_line
from actdb.store.ingest.pipeline import IngestRequest


def check_cluster_database(config: StoreConfig, cluster: ClusterSpec) -> None:
    """Refuse a cluster that may span machines when the metadata is an SQLite file only this machine can lock."""
    if cluster.multi_machine and config.is_sqlite:
        raise ActdbError(
            "an SQLite store cannot be shared by workers on other machines; point --db at PostgreSQL "
            "(e.g. postgresql://user@host/actdb) or use --workers N on this machine"
        )


def ingest_step(store: Store, request: IngestRequest, predictions: bool, log: Callable[[str], None] = print) -> None:
    """One step: ingest and explain its set, then, when asked, record its predictions (a second pass)."""
    ingest_and_explain(store, request, log=log)
    if predictions:
        target = PredictionRequest(
            target=f"{request.model}@{request.step}",
            dataset=request.dataset,
            batch_size=request.batch_size,
            device=request.device,
            progress=request.progress,
        )
        compute_predictions(store, target, log=log)


def _ingest_task(config: StoreConfig, request: IngestRequest, predictions: bool) -> list[str]:
    """One step on a worker, with its own connection to the store; returns what it logged. A set held by
    another process (a live one, or the dead worker this task replaces on another machine, whose heartbeat turns
    stale after `STALE_AFTER`) is waited for, then resumed or found complete."""
    messages: list[str] = []
    deadline = time.monotonic() + STALE_AFTER.total_seconds() + 2 * HEARTBEAT_SECONDS
    store = Store.open(config)
    try:
        while True:
            try:
                ingest_step(store, request, predictions, log=messages.append)
                break
            except BusyError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(HEARTBEAT_SECONDS)
    finally:
        store.close()
    return messages


def ingest_on_cluster(
    config: StoreConfig,
    requests: list[IngestRequest],
    cluster: ClusterSpec,
    *,
    predictions: bool = False,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> None:
    """Ingest every request as its own task; the sets that fail are named in one line after the others finish."""
    from distributed import as_completed

    check_cluster_database(config, cluster)
    run = uuid.uuid4().hex[:8]
    with open_client(cluster) as client:
        futures = {
            client.submit(
                _ingest_task,
                config,
                replace(r, progress=False),
                predictions,
                key=f"actdb-ingest-{r.model}@{r.step}-{run}",
                pure=False,
            ): f"{r.model}@{r.step}"
            for r in requests
        }
        failed = []
        with tqdm(total=len(futures), unit="set", disable=not progress, desc=f"ingest on {cluster.describe()}") as bar:
            for future in as_completed(list(futures)):
                if future.status == "error":
                    failed.append(f"{futures[future]}: {first_line(future.exception())}")
                else:
                    for message in future.result():
                        log(message)
                bar.update(1)
    if failed:
        raise ActdbError(f"{len(failed)} of {len(requests)} set(s) failed ({'; '.join(failed)}); the others are stored")
