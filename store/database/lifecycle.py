"""One run lifecycle for ingest, correlate, persistence and ablate: claim -> running -> complete | failed.

A run row records the owning process (host, pid) and a heartbeat written by a background thread. Any later
command that opens the store read-write reaps runs whose process is gone (same host, pid no longer alive) or
whose heartbeat stopped: they become `abandoned` and their partial result rows are deleted, so nothing stays
"running" after its process died. A complete row computed from values that `ingest` later replaced becomes
`stale` (`store.database.stale`): no reader takes it, and a stale set is claimed again like a failed one. Of
two identical concurrent requests exactly one computes: the database refuses a second running row for the same
request key (a partial unique index), and for activation sets the claim is a conditional UPDATE of the set's own
row.
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

from sqlalchemy import Table, delete, exists, insert, or_, select, update
from sqlalchemy.exc import IntegrityError, SQLAlchemyError

from actdb.store.database import tables
from actdb.store.database.tables import utcnow
from actdb.store.errors import BusyError, first_line

if TYPE_CHECKING:
    from actdb.store.database.connection import Store

HEARTBEAT_SECONDS = 10.0
# A run whose heartbeat is older than this is abandoned even when its host cannot be checked (another machine):
# twelve missed heartbeats, far beyond any pause of a healthy process.
STALE_AFTER = timedelta(seconds=120)
CLAIMABLE = ("pending", "failed", "abandoned", "stale")

HOST = socket.gethostname()


def request_key(**fields: Any) -> str:
    """A stable fingerprint of a request's parameters: identical requests share it."""
    return hashlib.sha256(json.dumps(fields, sort_keys=True, default=str).encode()).hexdigest()


def core_table(table: Table | type) -> Table:
    """The Core table of a run table given as itself or as its ORM class (writers pass either)."""
    return getattr(table, "__table__", table)


def _delete_correlation_results(conn, run_id: int) -> None:
    for table in (tables.neuron_match, tables.universality, tables.layer_similarity):
        conn.execute(delete(table).where(table.c.run_id == run_id))


def _delete_ablation_results(conn, run_id: int) -> None:
    conn.execute(delete(tables.ablation_neuron).where(tables.ablation_neuron.c.ablation_id == run_id))


def _delete_trajectory_results(conn, run_id: int) -> None:
    for table in (tables.trajectory_value, tables.trajectory_point):
        conn.execute(delete(table).where(table.c.run_id == run_id))


def _delete_concept_results(conn, run_id: int) -> None:
    for table in (tables.concept_score, tables.concept_expert, tables.concept_alignment):
        conn.execute(delete(table).where(table.c.run_id == run_id))


def _delete_robustness_results(conn, run_id: int) -> None:
    for table in (tables.robustness_result, tables.robustness_control):
        conn.execute(delete(table).where(table.c.run_id == run_id))


# Every run table, with what to delete when one of its runs is abandoned (activation sets keep their
# `.partial` file: a later ingest resumes from it).
RUN_TABLES: dict[Table, Callable | None] = {
    tables.activation_set: None,
    tables.ingest_attempt: None,  # a dead redo leaves its `.partial` file; the set it redoes stays complete
    tables.correlation_run: _delete_correlation_results,
    tables.persistence_run: None,
    tables.prediction_set: None,
    tables.ablation: _delete_ablation_results,
    tables.trajectory_run: _delete_trajectory_results,
    tables.concept_run: _delete_concept_results,
    tables.robustness_run: _delete_robustness_results,
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
    with contextlib.suppress(SQLAlchemyError), store.engine.connect() as conn:  # the usual case, in one read
        if not conn.scalar(select(or_(*(exists().where(t.c.status == "running") for t in RUN_TABLES)))):
            return reaped
    for table, cleanup in RUN_TABLES.items():
        c = table.c
        with contextlib.suppress(SQLAlchemyError), store.transaction() as s:  # a store that cannot be written is read
            running = s.execute(select(c.id, c.host, c.pid, c.heartbeat_at).where(c.status == "running"))
            dead = [
                row.id
                for row in running
                if _owner_gone(row.host, row.pid) or row.heartbeat_at is None or row.heartbeat_at < stale
            ]
            for run_id in dead:
                done = s.execute(
                    update(table)
                    .where(c.id == run_id, c.status == "running")
                    .values(status="abandoned", finished_at=utcnow(), error="the process running it stopped")
                )
                if done.rowcount == 1 and cleanup is not None:
                    cleanup(s, run_id)
                reaped.append((table.name, run_id))
    return reaped


def _owner_values() -> dict[str, Any]:
    now = utcnow()
    return {"status": "running", "host": HOST, "pid": os.getpid(), "heartbeat_at": now, "started_at": now}


class RunBusy(BusyError):
    """An identical request is already running as row `run_id` of `table`."""

    def __init__(self, table: Table | type, run_id: int) -> None:
        super().__init__(f"{core_table(table).name} {run_id} is computing the same request right now")
        self.table, self.run_id = table, run_id


def start_run(store: Store, table: Table | type, values: dict[str, Any]) -> int:
    """Insert a running row for a new request; BusyError(run_id) when the same request is already running."""
    c = core_table(table).c
    try:
        with store.transaction() as s:
            done = s.execute(insert(core_table(table)).values(**values, **_owner_values(), error=None))
            return done.inserted_primary_key[0]
    except IntegrityError:
        with store.transaction() as s:
            other = s.scalar(select(c.id).where(c.request_key == values["request_key"], c.status == "running"))
        if other is None:  # it finished between our insert and this read: the caller may look again
            raise BusyError("an identical request finished just now; run the command again") from None
        raise RunBusy(table, other) from None


def claim_row(store: Store, table: Table | type, row_id: int, force: bool = False, what: str | None = None) -> str:
    """Make this process the only owner of an existing row (pending, failed, abandoned, or complete with
    `force`); returns the status it had (a complete row is left alone without `force`). BusyError when a live
    process holds it; `what` names the work in that message."""
    reap_abandoned(store)
    table = core_table(table)
    c = table.c
    with store.transaction() as s:
        prior = s.scalar(select(c.status).where(c.id == row_id))
        if prior == "complete" and not force:
            return prior
        states = CLAIMABLE + (("complete",) if force else ())
        done = s.execute(
            update(table)
            .where(c.id == row_id, or_(*(c.status == st for st in states)))
            .values(**_owner_values(), error=None, finished_at=None)
        )
        if done.rowcount != 1:  # the UPDATE matched nothing: another live process holds the row
            holder = s.execute(select(c.host, c.pid).where(c.id == row_id)).one()
            raise BusyError(
                f"{what or f'{table.name} {row_id}'} is being worked on by process {holder.pid} on "
                f"{holder.host} right now; nothing to do here (it is taken over if that process dies)"
            )
    return prior


def start_or_wait(store: Store, table: Table | type, values: dict[str, Any], log: Callable[[str], None]) -> int | None:
    """A new running row for this request, or None after waiting for an identical request that another process
    was running and that completed (its results can be reused). A waited-for run that failed is claimed anew."""
    while True:
        try:
            return start_run(store, table, values)
        except RunBusy as busy:
            log(f"{core_table(table).name} {busy.run_id} is computing the same request in another process; waiting")
            if wait_for(store, table, busy.run_id) == "complete":
                return None


def release(store: Store, table: Table | type, row_id: int) -> None:
    """Give back a claimed row that never ran (an identical request completed just before the claim)."""
    c = core_table(table).c
    with store.transaction() as s:
        s.execute(delete(core_table(table)).where(c.id == row_id, c.status == "running"))


def wait_for(store: Store, table: Table | type, row_id: int, poll: float = 1.0) -> str:
    """Wait until another process's run leaves `running` (reaping it if that process dies); returns its status."""
    c = core_table(table).c
    while True:
        reap_abandoned(store)
        status = store.scalar(select(c.status).where(c.id == row_id))
        if status != "running":
            return status
        time.sleep(poll)


@dataclass
class RunHandle:
    """A run this process owns: heartbeats while alive, then `complete(...)` or (on an exception) failed."""

    store: Store
    table: Table | type
    row_id: int
    started: float = field(default_factory=time.perf_counter)
    _stop: threading.Event = field(default_factory=threading.Event)

    def beat(self, **values: Any) -> None:
        """Write the heartbeat (and progress columns) now."""
        table = core_table(self.table)
        with self.store.transaction() as s:
            s.execute(update(table).where(table.c.id == self.row_id).values(heartbeat_at=utcnow(), **values))

    def _beat_loop(self) -> None:
        while not self._stop.wait(HEARTBEAT_SECONDS):
            with contextlib.suppress(Exception):  # a busy database only delays the next beat
                self.beat()

    def complete(self, **values: Any) -> float:
        """Mark complete with result columns; returns the run's seconds."""
        seconds = time.perf_counter() - self.started
        table = core_table(self.table)
        with self.store.transaction() as s:
            s.execute(
                update(table)
                .where(table.c.id == self.row_id)
                .values(status="complete", finished_at=utcnow(), seconds=seconds, error=None, **values)
            )
        return seconds

    def fail(self, exc: BaseException) -> None:
        """Record the failure; when the database cannot be written either (a full disk), the run stays running
        and the next command reaps it as abandoned once this process has exited."""
        table = core_table(self.table)
        with contextlib.suppress(SQLAlchemyError), self.store.transaction() as s:
            s.execute(
                update(table)
                .where(table.c.id == self.row_id, table.c.status == "running")
                .values(status="failed", finished_at=utcnow(), error=first_line(exc)[:2000])
            )


@contextlib.contextmanager
def running(store: Store, table: Table | type, row_id: int) -> Iterator[RunHandle]:
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
    c = core_table(table).c
    status = store.scalar(select(c.status).where(c.id == row_id))
    if status == "running":
        handle.fail(RuntimeError("the run ended without recording its results"))
