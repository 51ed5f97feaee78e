"""The ingest pipeline: one checkpoint x one token dataset -> an HDF5 activation file + neuron statistics.

Forward passes run on the main thread (GPU when there is one); a writer thread casts nothing, it only writes
float16 rows, folds them into the streaming statistics, and flushes. After each flush the committed row count
is recorded in SQL, so a killed ingest resumes from a point whose rows are surely on disk. The statistics of
already-written rows are rebuilt from the file on resume, batch by batch, exactly as they were first computed.
"""

from __future__ import annotations

import os
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from sqlalchemy import delete, select, update
from tqdm.auto import tqdm

from actdb.store.activation_file import ActivationHeader, ActivationWriter, partial_path
from actdb.store.architectures import HOOK_NAME, MLPRecorder, mlp_shape
from actdb.store.database import Store, finite_or_none, insert_rows
from actdb.store.errors import ActdbError
from actdb.store.model_loading import default_revision_template, load_model, model_family, resolve_device
from actdb.store.neuron_stats import StreamingMoments, Workspace
from actdb.store.registry import claim_set, find_set, get_dataset, get_or_create
from actdb.store.schema import ActivationSet, Checkpoint, Model, NeuronStat, utcnow
from actdb.store.token_datasets import load_tokenizer, tokenizer_fingerprint
from actdb.store.token_file import TokenDataset

FLUSH_SECONDS = float(os.environ.get("ACTDB_INGEST_FLUSH_SECONDS", "2.0"))
QUEUE_DEPTH = 4


@dataclass
class IngestRequest:
    model: str
    step: int
    dataset: str
    source: str | None = None
    revision: str | None = None
    device: str = "auto"
    batch_size: int = 8
    dtype: str = "float16"
    force: bool = False
    progress: bool = True


@dataclass
class IngestResult:
    set_id: int
    status: str  # "ingested", "resumed", "already complete"
    path: Path
    tokens: int
    seconds: float
    bytes: int


def _format_template(template: str | None, step: int) -> str | None:
    return template.format(step=step) if template else None


def ingest(store: Store, req: IngestRequest, log: Callable[[str], None] = print) -> IngestResult:
    """Ingest one checkpoint of one model on one dataset; a complete set is a no-op unless `force`."""
    if req.dtype != "float16":
        raise ActdbError(f"--dtype {req.dtype} is not supported yet (float16 is)")
    if req.batch_size < 1:
        raise ActdbError("--batch-size must be at least 1")
    with store.session() as s:
        ds = get_dataset(s, req.dataset)
        existing = s.scalar(select(Model).where(Model.name == req.model))
        done = find_set(s, req.model, req.step, req.dataset, HOOK_NAME)
    if done is not None and done.status == "complete" and not req.force:
        log(f"{req.model}@{req.step} on {req.dataset}: already complete ({done.path}); --force redoes it")
        return IngestResult(done.id, "already complete", Path(done.path), done.n_tokens, 0.0, done.bytes or 0)
    if existing is None and not req.source:
        raise ActdbError(f"model {req.model!r} is not registered yet; give --source (hub id or local path)")
    source_template = req.source or existing.source
    if Path(source_template.format(step=req.step)).expanduser().exists():
        source_template = os.path.abspath(os.path.expanduser(source_template))
    revision_template = req.revision or (
        existing.revision_template if existing is not None else default_revision_template(source_template)
    )
    source = _format_template(source_template, req.step)
    revision = _format_template(revision_template, req.step)
    if revision and Path(source).expanduser().is_dir():
        revision = None
    tokens = TokenDataset.load(ds.path)
    device = resolve_device(req.device)
    model = load_model(source, revision, device)
    _check_tokenizer(source, revision, ds.tokenizer_fingerprint, tokens, model)
    n_layers, d_mlp = mlp_shape(model)
    if existing is not None and (existing.n_layers, existing.d_mlp) != (n_layers, d_mlp):
        raise ActdbError(
            f"{source} has {n_layers} layers x {d_mlp} neurons but model {req.model!r} was registered "
            f"with {existing.n_layers} x {existing.d_mlp}; use another model name"
        )
    model_row = get_or_create(
        store,
        Model,
        {"name": req.model},
        {
            "family": model_family(source_template, model.config.model_type),
            "architecture": model.config.model_type,
            "n_layers": n_layers,
            "d_mlp": d_mlp,
            "source": source_template,
            "revision_template": revision_template,
            "seed": None,
        },
    )
    ckpt = get_or_create(
        store,
        Checkpoint,
        {"model_id": model_row.id, "step": req.step},
        {"source": source, "revision": revision, "source_sha": getattr(model.config, "_commit_hash", None)},
    )
    path = store.config.activation_path(req.model, req.step, req.dataset, HOOK_NAME)
    aset = get_or_create(
        store,
        ActivationSet,
        {"checkpoint_id": ckpt.id, "dataset_id": ds.id, "hook": HOOK_NAME},
        {"dtype": req.dtype, "path": str(path), "status": "pending", "tokens_done": 0, "n_tokens": tokens.tokens.size},
    )
    prior = claim_set(store, aset.id, req.force)
    if prior == "complete" and not req.force:
        log(f"{req.model}@{req.step} on {req.dataset}: already complete ({aset.path})")
        return IngestResult(aset.id, "already complete", path, aset.n_tokens, 0.0, aset.bytes or 0)
    header = ActivationHeader(
        model=req.model,
        step=req.step,
        dataset_fingerprint=ds.token_sha256,
        hook=HOOK_NAME,
        n_layers=n_layers,
        d_mlp=d_mlp,
        n_tokens=int(tokens.tokens.size),
        dtype=req.dtype,
    )
    started = time.perf_counter()
    try:
        committed = 0
        if req.force:  # redo from scratch, whatever a partial file holds
            partial_path(path).unlink(missing_ok=True)
        else:
            with store.session() as s:
                committed = s.get(ActivationSet, aset.id).tokens_done
        run = _IngestRun(store, aset.id, path, header, tokens, model, device, req)
        resumed_from = run.execute(committed)
        size = path.stat().st_size
        seconds = time.perf_counter() - started
        _store_stats(store, aset.id, run.moments)
        with store.session() as s:
            s.execute(
                update(ActivationSet)
                .where(ActivationSet.id == aset.id)
                .values(
                    status="complete",
                    tokens_done=header.n_tokens,
                    bytes=size,
                    finished_at=utcnow(),
                    seconds=seconds,
                    owner=None,
                    error=None,
                )
            )
    except BaseException as exc:
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        with store.session() as s:
            s.execute(
                update(ActivationSet)
                .where(ActivationSet.id == aset.id)
                .values(status="failed", error=message[:2000], owner=None, finished_at=utcnow())
            )
        if isinstance(exc, OSError):
            raise ActdbError(f"writing {path} failed: {exc.strerror or message}") from None
        raise
    status = "resumed" if resumed_from else "ingested"
    log(
        f"{req.model}@{req.step} on {req.dataset}: {status}"
        + (f" from token {resumed_from}" if resumed_from else "")
        + f", {header.n_tokens} tokens in {seconds:.1f}s -> {path}"
    )
    return IngestResult(aset.id, status, path, header.n_tokens, seconds, size)


def _check_tokenizer(source: str, revision: str | None, fingerprint: str, tokens: TokenDataset, model) -> None:
    try:
        tokenizer = load_tokenizer(source, revision)
    except ActdbError:
        tokenizer = None  # checkpoints saved without a tokenizer: only the vocabulary-size check applies
    if tokenizer is not None and tokenizer_fingerprint(tokenizer) != fingerprint:
        raise ActdbError(
            f"tokenizer mismatch: {source} ships a tokenizer whose vocabulary differs from the one "
            "the dataset was built with"
        )
    vocab = int(model.config.vocab_size)
    if int(tokens.tokens.max()) >= vocab:
        raise ActdbError(
            f"tokenizer mismatch: dataset token ids reach {int(tokens.tokens.max())} but {source} "
            f"has a vocabulary of {vocab}"
        )


class _IngestRun:
    """State of one ingest: the writer thread, the statistics, and progress reporting."""

    def __init__(
        self,
        store: Store,
        set_id: int,
        path: Path,
        header: ActivationHeader,
        tokens: TokenDataset,
        model,
        device: torch.device,
        req: IngestRequest,
    ) -> None:
        self.store, self.set_id, self.path, self.header = store, set_id, path, header
        self.tokens, self.model, self.device, self.req = tokens, model, device, req
        workspace = Workspace()
        self.moments = [StreamingMoments(header.d_mlp, workspace) for _ in range(header.n_layers)]
        self.seq_len = tokens.seq_len
        self.rows_per_batch = req.batch_size * self.seq_len

    def _batch_mask(self, start_row: int, stop_row: int) -> np.ndarray:
        return self.tokens.mask.reshape(-1)[start_row:stop_row]

    def _fold(self, start_row: int, rows: list[np.ndarray]) -> None:
        mask = self._batch_mask(start_row, start_row + rows[0].shape[0])
        for moments, block in zip(self.moments, rows, strict=True):
            moments.update(block[mask])

    def execute(self, committed: int) -> int:
        """Write every remaining batch; returns the row the run resumed from (0 for a fresh start)."""
        writer = ActivationWriter(self.path, self.header)
        try:
            start = min(writer.tokens_done, committed)
            start -= start % self.rows_per_batch
            writer.file.attrs["tokens_done"] = start
            self._rebuild_stats(writer, start)
            self._forward_all(writer, start)
        except BaseException:
            writer.close()
            raise
        writer.finish()
        return start

    def _rebuild_stats(self, writer: ActivationWriter, stop: int) -> None:
        for begin in range(0, stop, self.rows_per_batch):
            end = min(begin + self.rows_per_batch, stop)
            self._fold(begin, [ds[begin:end] for ds in writer.layers])

    def _forward_all(self, writer: ActivationWriter, start_row: int) -> None:
        n_rows = self.header.n_tokens
        work: queue.Queue = queue.Queue(maxsize=QUEUE_DEPTH)
        failure: list[BaseException] = []
        committed = [start_row]

        def write_loop() -> None:
            last_flush = time.monotonic()
            try:
                while (item := work.get()) is not None:
                    begin, rows = item
                    writer.write_rows(begin, rows)
                    self._fold(begin, rows)
                    end = begin + rows[0].shape[0]
                    if time.monotonic() - last_flush > FLUSH_SECONDS or end == n_rows:
                        writer.flush()
                        committed[0] = end
                        last_flush = time.monotonic()
            except BaseException as exc:
                failure.append(exc)
                while work.get() is not None:
                    pass

        thread = threading.Thread(target=write_loop, name="actdb-writer", daemon=True)
        thread.start()
        bar = tqdm(
            total=n_rows,
            initial=start_row,
            unit="tok",
            unit_scale=True,
            disable=not self.req.progress,
            desc=f"ingest {self.header.model}@{self.header.step}",
            dynamic_ncols=True,
        )
        last_report = time.monotonic()
        base = self.model.base_model
        flat = self.tokens.tokens
        try:
            with MLPRecorder(self.model) as rec, torch.inference_mode():
                for seq0 in range(start_row // self.seq_len, self.tokens.n_sequences, self.req.batch_size):
                    if failure:
                        break
                    ids = torch.from_numpy(flat[seq0 : seq0 + self.req.batch_size].astype(np.int64)).to(self.device)
                    base(input_ids=ids, use_cache=False)
                    rows = [o.reshape(-1, o.shape[-1]).to(torch.float16).cpu().numpy() for o in rec.outputs]
                    work.put((seq0 * self.seq_len, rows))
                    bar.update(rows[0].shape[0])
                    if time.monotonic() - last_report > FLUSH_SECONDS:
                        self._report(committed[0])
                        last_report = time.monotonic()
        finally:
            work.put(None)
            thread.join()
            bar.close()
        if failure:
            raise failure[0]
        self._report(committed[0])

    def _report(self, committed: int) -> None:
        with self.store.session() as s:
            s.execute(
                update(ActivationSet)
                .where(ActivationSet.id == self.set_id)
                .values(tokens_done=committed, heartbeat_at=utcnow())
            )


def _store_stats(store: Store, set_id: int, moments: list[StreamingMoments]) -> None:
    rows = []
    for layer, m in enumerate(moments):
        r = m.result()
        for i in range(len(r.mean)):
            rows.append(
                {
                    "set_id": set_id,
                    "layer": layer,
                    "neuron": i,
                    "count": r.count,
                    "mean": float(r.mean[i]),
                    "std": float(r.std[i]),
                    "skew": finite_or_none(r.skew[i]),
                    "kurtosis": finite_or_none(r.kurtosis[i]),
                    "frac_active": float(r.frac_active[i]),
                    "min": float(r.min[i]),
                    "max": float(r.max[i]),
                }
            )
    with store.session() as s:
        s.execute(delete(NeuronStat).where(NeuronStat.set_id == set_id))
        insert_rows(s, NeuronStat, rows)
