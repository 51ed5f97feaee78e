"""One run lifecycle for ingest, correlate, persistence and ablate: claim -> running -> complete | failed.

A run row records the owning process (host, pid) and a heartbeat written by a background thread. Any later
command that opens the store read-write reaps runs whose process is gone (same host, pid no longer alive) or
whose heartbeat stopped: they become `abandoned` and their partial result rows are deleted, so nothing stays
"running" after its process died. Of two identical concurrent requests exactly one computes: the database
refuses a second running row for the same request key (a partial unique index), and for activation sets the
claim is a conditional UPDATE of the set's own row.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from typing import TYPE_CHECKING, Any

from sqlalchemy import delete, or_, select, update
from sqlalchemy.exc import IntegrityError, SQLAlchemyError

from actdb.store.database.schema import (
    Ablation,
    AblationNeuron,
    ActivationSet,
    ConceptAlignment,
    ConceptExpert,
    ConceptRun,
    ConceptScore,
    CorrelationRun,
    LayerSimilarity,
    NeuronMatch,
    PersistenceRun,
    PredictionSet,
    Universality,
    utcnow,
)
from actdb.store.errors import BusyError, first_line

if TYPE_CHECKING:
    from actdb.store.database.connection import Store

HEARTBEAT_SECONDS = 10.0
# A run whose heartbeat is older than this is abandoned even when its host cannot be checked (another machine):
# twelve missed heartbeats, far beyond any pause of a healthy process.
STALE_AFTER = timedelta(seconds=120)
CLAIMABLE = ("pending", "failed", "abandoned")

HOST = socket.gethostname()


def request_key(**fields: Any) -> str:
    """A stable fingerprint of a request's parameters: identical requests share it."""
    return hashlib.sha256(json.dumps(fields, sort_keys=True, default=str).encode()).hexdigest()


def _delete_correlation_results(session, run_id: int) -> None:
    for table in (NeuronMatch, Universality, LayerSimilarity):
        session.execute(delete(table).where(table.run_id == run_id))


def _delete_ablation_results(session, run_id: int) -> None:
    session.execute(delete(AblationNeuron).where(AblationNeuron.ablation_id == run_id))


def _delete_concept_results(session, run_id: int) -> None:
    for table in (ConceptScore, ConceptExpert, ConceptAlignment):
        session.execute(delete(table).where(table.run_id == run_id))


# Every run table, with what to delete when one of its runs is abandoned (activation sets keep their
# `.partial` file: a later ingest resumes from it).
RUN_TABLES: dict[type, Callable | None] = {
    ActivationSet: None,
    CorrelationRun: _delete_correlation_results,
    PersistenceRun: None,
    PredictionSet: None,
    Ablation: _delete_ablation_results,
    ConceptRun: _delete_concept_results,
}


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _owner_gone(host: str | None, pid: int | None) -> bool:
    return host == HOST and pid is not None and not _pid_alive(pid)


def reap_abandoned(store: Store) -> list[tuple[str, int]]:
    """Mark running runs whose process is gone as abandoned and delete their partial rows; returns them."""
    stale = utcnow() - STALE_AFTER
    reaped = []
    for table, cleanup in RUN_TABLES.items():
        with contextlib.suppress(SQLAlchemyError), store.session() as s:  # a store that cannot be written is read
            running = s.execute(
                select(table.id, table.host, table.pid, table.heartbeat_at).where(table.status == "running")
            )
            dead = [
                row.id
                for row in running
                if _owner_gone(row.host, row.pid) or row.heartbeat_at is None or row.heartbeat_at < stale
            ]
            for run_id in dead:
                done = s.execute(
                    update(table)
                    .where(table.id == run_id, table.status == "running")
                    .values(status="abandoned", finished_at=utcnow(), error="the process running it stopped")
                )
                if done.rowcount == 1 and cleanup is not None:
                    cleanup(s, run_id)
                reaped.append((table.__tablename__, run_id))
    return reaped


def _owner_values() -> dict[str, Any]:
    now = utcnow()
    return {"status": "running", "host": HOST, "pid": os.getpid(), "heartbeat_at": now, "started_at": now}


class RunBusy(BusyError):
    """An identical request is already running as row `run_id` of `table`."""

    def __init__(self, table: type, run_id: int) -> None:
        super().__init__(f"{table.__tablename__} {run_id} is computing the same request right now")
        self.table, self.run_id = table, run_id


def start_run(store: Store, table: type, values: dict[str, Any]) -> int:
    """Insert a running row for a new request; BusyError(run_id) when the same request is already running."""
    try:
        with store.session() as s:
            row = table(**values, **_owner_values(), error=None)
            s.add(row)
            s.flush()
            return row.id
    except IntegrityError:
        with store.session() as s:
            other = s.scalar(
                select(table.id).where(table.request_key == values["request_key"], table.status == "running")
            )
        if other is None:  # it finished between our insert and this read: the caller may look again
            raise BusyError("an identical request finished just now; run the command again") from None
        raise RunBusy(table, other) from None


def claim_row(store: Store, table: type, row_id: int, force: bool = False, what: str | None = None) -> str:
    """Make this process the only owner of an existing row (pending, failed, abandoned, or complete with
    `force`); returns the status it had (a complete row is left alone without `force`). BusyError when a live
    process holds it; `what` names the work in that message."""
    reap_abandoned(store)
    with store.session() as s:
        prior = s.scalar(select(table.status).where(table.id == row_id))
        if prior == "complete" and not force:
            return prior
        states = CLAIMABLE + (("complete",) if force else ())
        done = s.execute(
            update(table)
            .where(table.id == row_id, or_(*(table.status == st for st in states)))
            .values(**_owner_values(), error=None, finished_at=None)
        )
        if done.rowcount != 1:
            s.rollback()
            holder = s.execute(select(table.host, table.pid).where(table.id == row_id)).one()
            raise BusyError(
                f"{what or f'{table.__tablename__} {row_id}'} is being worked on by process {holder.pid} on "
                f"{holder.host} right now; nothing to do here (it is taken over if that process dies)"
            )
    return prior


def start_or_wait(store: Store, table: type, values: dict[str, Any], log: Callable[[str], None]) -> int | None:
    """A new running row for this request, or None after waiting for an identical request that another process
    was running and that completed (its results can be reused). A waited-for run that failed is claimed anew."""
    while True:
        try:
            return start_run(store, table, values)
        except RunBusy as busy:
            log(f"{table.__tablename__} {busy.run_id} is computing the same request in another process; waiting")
            if wait_for(store, table, busy.run_id) == "complete":
                return None


def release(store: Store, table: type, row_id: int) -> None:
    """Give back a claimed row that never ran (an identical request completed just before the claim)."""
    with store.session() as s:
        s.execute(delete(table).where(table.id == row_id, table.status == "running"))


def wait_for(store: Store, table: type, row_id: int, poll: float = 1.0) -> str:
    """Wait until another process's run leaves `running` (reaping it if that process dies); returns its status."""
    while True:
        reap_abandoned(store)
        status = store.scalar(select(table.status).where(table.id == row_id))
        if status != "running":
            return status
        time.sleep(poll)


@dataclass
class RunHandle:
    """A run this process owns: heartbeats while alive, then `complete(...)` or (on an exception) failed."""

    store: Store
    table: type
    row_id: int
    started: float = field(default_factory=time.perf_counter)
    _stop: threading.Event = field(default_factory=threading.Event)

    def beat(self, **values: Any) -> None:
        """Write the heartbeat (and progress columns) now."""
        with self.store.session() as s:
            s.execute(update(self.table).where(self.table.id == self.row_id).values(heartbeat_at=utcnow(), **values))

    def _beat_loop(self) -> None:
        while not self._stop.wait(HEARTBEAT_SECONDS):
            with contextlib.suppress(Exception):  # a busy database only delays the next beat
                self.beat()

    def complete(self, **values: Any) -> float:
        """Mark complete with result columns; returns the run's seconds."""
        seconds = time.perf_counter() - self.started
        with self.store.session() as s:
            s.execute(
                update(self.table)
                .where(self.table.id == self.row_id)
                .values(status="complete", finished_at=utcnow(), seconds=seconds, error=None, **values)
            )
        return seconds

    def fail(self, exc: BaseException) -> None:
        """Record the failure; when the database cannot be written either (a full disk), the run stays running
        and the next command reaps it as abandoned once this process has exited."""
        with contextlib.suppress(SQLAlchemyError), self.store.session() as s:
            s.execute(
                update(self.table)
                .where(self.table.id == self.row_id, self.table.status == "running")
                .values(status="failed", finished_at=utcnow(), error=first_line(exc)[:2000])
            )


@contextlib.contextmanager
def running(store: Store, table: type, row_id: int) -> Iterator[RunHandle]:
    """Own a claimed run for the duration of the block: heartbeats on a thread; any exception marks it failed
    (with the first line of the error) and propagates; a block that forgets `complete()` fails the run too."""
    handle = RunHandle(store, table, row_id)
    beater = threading.Thread(target=handle._beat_loop, name=f"actdb-heartbeat-{row_id}", daemon=True)
    beater.start()
    try:
        yield handle
    except BaseException as exc:
        handle._stop.set()
        beater.join()
        handle.fail(exc)
        raise
    handle._stop.set()
    beater.join()
    status = store.scalar(select(table.status).where(table.id == row_id))
    if status == "running":
        handle.fail(RuntimeError("the run ended without recording its results"))
