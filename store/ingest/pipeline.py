"""The ingest pipeline: one checkpoint x one token dataset -> an HDF5 activation file + neuron statistics.

Forward passes run on the main thread (GPU when there is one); a writer thread casts nothing, it only writes
float16 rows (or quantises them to int8, block by block), folds them into the streaming statistics, and flushes.
After each flush the committed row count is recorded in SQL, so a killed ingest resumes from a point whose rows
are surely on disk. The statistics of already-written rows are rebuilt from the file on resume, batch by batch
(int8: block by block), exactly as they were first computed.

Statistics and the streamed top-K describe the values as stored, which are the values every reader gets back:
the float16 rows, or for `--dtype int8` the dequantised values (offset + scale * code), not the float16 rows
they were quantised from. So `neuron_stat` (mean, std, min, max, frac_active...) and the examples agree exactly
with what `actdb activations`, explanations and the correlation engine read, and a resume rebuilds them from the
file bit for bit. (The correlation engine uses the stored means only as a numerical shift.) int8 therefore folds
its statistics on the writer thread, after quantising, also when the forward pass runs on a GPU.
"""

from __future__ import annotations

import contextlib
import errno
import os
import queue
import re
import shutil
import string
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from sqlalchemy import delete, select, update
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session
from tqdm.auto import tqdm

from actdb.store.config import StoreConfig
from actdb.store.database import tables
from actdb.store.database.connection import Store, finite_or_none, insert_rows
from actdb.store.database.lifecycle import RunBusy, RunHandle, claim_row, running, start_run
from actdb.store.database.registry import check_new_name, find_set, get_dataset, get_or_create
from actdb.store.database.schema import ActivationSet, Checkpoint, Dataset, IngestAttempt, Model, NeuronStat
from actdb.store.database.stale import invalidate
from actdb.store.database.tables import utcnow
from actdb.store.device import resolve_device
from actdb.store.errors import ActdbError, BusyError, first_line
from actdb.store.files.activation import ActivationHeader, ActivationWriter, partial_path
from actdb.store.files.token import TokenDataset
from actdb.store.hook_names import HOOK_NAME, hook_of_model, split_hook
from actdb.store.ingest.architectures import MLPRecorder, mlp_shape
from actdb.store.ingest.model_loading import (
    context_length,
    default_revision_template,
    load_config,
    load_model,
    model_family,
    weights_fingerprint,
)
from actdb.store.ingest.neuron_stats import StreamingMoments, Workspace
from actdb.store.ingest.token_datasets import load_tokenizer, tokenizer_fingerprint
from actdb.store.ingest.top_activations import TopKTracker
from actdb.store.refs import STORED_DTYPES, check_name

FLUSH_SECONDS = float(os.environ.get("ACTDB_INGEST_FLUSH_SECONDS", "2.0"))
QUEUE_DEPTH = 4


@dataclass(kw_only=True)
class IngestRequest:
    model: str
    step: int
    dataset: str
    source: str | None = None
    revision: str | None = None
    hook: str = HOOK_NAME
    trust_remote_code: bool = False
    torch_dtype: str = "float32"  # of the forward pass; stored activations are `dtype` either way
    device: str = "auto"
    batch_size: int = 8
    dtype: str = "float16"  # stored: float16, or int8 (per block of 1024 tokens and neuron affine codes)
    top_k: int = 32  # max-activating examples kept per neuron while streaming (0: none)
    force: bool = False  # recompute a set that is complete
    replace_source: bool = False  # record a source (or weights) for this step other than the model's recorded one
    identical_weights: bool = False  # accept weights identical to another step's or another model's
    progress: bool = True


@dataclass
class IngestResult:
    set_id: int
    status: str  # "ingested", "resumed", "already complete"
    path: Path
    tokens: int
    seconds: float
    bytes: int
    examples: tuple[np.ndarray, np.ndarray] | None = None
    """The streamed top-K (values, flat token positions), each (n_layers, d_mlp, K), when this call ingested."""
    model: torch.nn.Module | None = field(default=None, repr=False)
    """The loaded model when this call ingested, for analyses of its weights that follow (vocabulary statistics)."""


@dataclass(frozen=True)
class ResolvedSource:
    """Where one step of a model loads from: the templates recorded on the model, their values, and the place
    the recorded source loads from (`StoreConfig.locate`)."""

    source_template: str
    revision_template: str | None
    source: str
    revision: str | None
    location: str


def _placeholders(template: str, flag: str) -> None:
    """Only `{step}` may be substituted; anything else in braces is a mistake caught before loading."""
    try:
        fields = [f for _t, f, _s, _c in string.Formatter().parse(template) if f is not None]
    except ValueError as exc:
        raise ActdbError(f"malformed {flag} {template!r}: {exc}") from None
    unknown = sorted({f for f in fields if f != "step"})
    if unknown:
        raise ActdbError(f"{flag} {template!r} uses {{{unknown[0]}}}; only {{step}} is replaced")


def resolve_source(
    existing: Model | None, req: IngestRequest, config: StoreConfig, recorded: Checkpoint | None = None
) -> ResolvedSource:
    """The source and revision of `req.step`, from the request, or else from what the step's checkpoint
    (`recorded`) was loaded from, or else from what the model was registered with (the checkpoint's own source
    differs from the model's only after `--replace-source`). A local path is recorded absolute, or relative to
    the store folder when it lies inside it."""
    if existing is None and not req.source:
        raise ActdbError(f"model {req.model!r} is not registered yet; give --source (hub id or local path)")
    for template, flag in ((req.source, "--source"), (req.revision, "--revision")):
        if template:
            _placeholders(template, flag)
    source_template = req.source or existing.source
    if req.source and Path(source_template.format(step=req.step)).expanduser().exists():
        source_template = config.recorded_source(os.path.abspath(os.path.expanduser(source_template)))
    same = existing is not None and config.locate(source_template) == config.locate(existing.source)
    if existing is not None and not same:
        if not req.replace_source:
            raise ActdbError(
                f"model {req.model!r} was registered from {config.locate(existing.source)}, not "
                f"{config.locate(source_template)}; a different source is another model (pick another name), "
                "or say --replace-source to record this source for this step"
            )
    elif existing is not None:
        source_template = existing.source
    if req.revision:
        revision_template = req.revision  # a template with {step}, or this step's literal revision
    elif same:
        revision_template = existing.revision_template
    else:
        revision_template = default_revision_template(source_template)
    source = source_template.format(step=req.step)
    revision = revision_template.format(step=req.step) if revision_template else None
    if recorded is not None and not (req.source or req.revision):
        source, revision = recorded.source, recorded.revision
    location = config.locate(source)
    if revision and Path(location).expanduser().is_dir():
        revision = None
    if req.source and not Path(location).expanduser().exists() and req.source.startswith(("/", ".", "~")):
        raise ActdbError(f"--source {location} does not exist (for step {req.step})")
    return ResolvedSource(source_template, revision_template, source, revision, location)


def _config_layers(where: ResolvedSource, req: IngestRequest) -> int:
    """The number of layers of a model not yet registered, from its config (no weights are loaded)."""
    config = load_config(where.location, where.revision, req.trust_remote_code)
    n_layers = getattr(config, "num_hidden_layers", None)
    if not isinstance(n_layers, int):
        raise ActdbError(f"{where.location}: its config does not say how many layers it has; use --hook mlp.post")
    return n_layers


def check_steps_distinguishable(
    store: Store, model: str, source: str | None, revision: str | None, n_steps: int, identical_weights: bool = False
) -> None:
    """Several steps need a rule telling their weights apart (`{step}` in the source or revision, or the
    family's revision rule); without one every step would load the same weights, so refuse before loading
    (unless `identical_weights`: the weights really did not change)."""
    if n_steps < 2 or identical_weights:
        return
    known = store.query(select(Model.source, Model.revision_template).where(Model.name == model)).first()
    template = source or (known.source if known is not None else None)
    if template is None or "{step}" in template:
        return  # resolve_source reports a missing source
    rule = revision or (known.revision_template if known is not None and not source else None)
    rule = rule or default_revision_template(template)
    if rule is None or "{step}" not in rule:
        raise ActdbError(
            f"{n_steps} steps of {model} would all load the same weights: {template} has no {{step}} and no "
            "revision rule; put {step} in --source or --revision, pair the steps with --revisions, or say "
            "--identical-weights if the weights really are the same"
        )


def recorded_revision_template(where: ResolvedSource) -> str | None:
    """What the model row keeps as its revision rule: a template with `{step}` only (a literal revision names
    one checkpoint, not a rule for the others)."""
    return where.revision_template if where.revision_template and "{step}" in where.revision_template else None


def ingest(store: Store, req: IngestRequest, log: Callable[[str], None] = print) -> IngestResult:
    """Ingest one checkpoint of one model on one dataset; a complete set is a no-op unless `force`."""
    if req.dtype not in STORED_DTYPES:
        raise ActdbError(f"--dtype {req.dtype} is not supported (use {' or '.join(STORED_DTYPES)})")
    if req.batch_size < 1:
        raise ActdbError("--batch-size must be at least 1")
    if not 0 <= req.top_k <= MAX_TOP_K:
        raise ActdbError(f"--top-k must be in 0..{MAX_TOP_K}")
    hook, layer = split_hook(req.hook)
    with store.session() as s:
        ds = get_dataset(s, req.dataset)
        existing = s.scalar(select(Model).where(Model.name == req.model))
        if existing is None:
            check_name(req.model, "model name")
            check_new_name(s, tables.model, req.model, "model name")
        done = find_set(s, req.model, req.step, req.dataset, hook)
        recorded = s.scalar(
            select(Checkpoint)
            .join(Model, Model.id == Checkpoint.model_id)
            .where(Model.name == req.model, Checkpoint.step == req.step)
        )
    where = resolve_source(existing, req, store.config, recorded)  # another --source is refused even when complete
    if layer is not None:  # a name picking one layer: refused, saying whether that layer exists
        n_layers = existing.n_layers if existing is not None else _config_layers(where, req)
        hook_of_model(req.hook, req.model, n_layers)
    req.hook = hook
    if done is not None and done.status == "complete" and not req.force:
        stored = f", stored as {done.dtype}" if done.dtype != req.dtype else ""
        log(
            f"{req.model}@{req.step} on {req.dataset} ({req.hook}): already complete ({done.path}{stored}); "
            "--force redoes it"
        )
        path = store.config.file(done.path)
        return IngestResult(done.id, "already complete", path, done.n_tokens, 0.0, done.bytes or 0)
    tokens = TokenDataset.load(store.config.file(ds.path))
    device = resolve_device(req.device).torch
    config = load_config(where.location, where.revision, req.trust_remote_code)
    _check_model_fits(where, config, ds, tokens)  # before any weights load
    model = load_model(
        where.location,
        where.revision,
        device,
        config=config,
        trust_remote_code=req.trust_remote_code,
        torch_dtype=req.torch_dtype,
    )
    n_layers, d_mlp = mlp_shape(model)
    if existing is not None and (existing.n_layers, existing.d_mlp) != (n_layers, d_mlp):
        raise ActdbError(
            f"{where.location} has {n_layers} layers x {d_mlp} neurons but model {req.model!r} was registered "
            f"with {existing.n_layers} x {existing.d_mlp}; use another model name"
        )
    rel_path = store.config.activation_path(req.model, req.step, req.dataset, req.hook)
    needed = n_layers * d_mlp * int(tokens.tokens.size) * np.dtype(req.dtype).itemsize
    _check_space(store.config.file(rel_path), needed, req.force)
    redo = done is not None and done.status == "complete"  # with --force: the set stays complete until redone
    ckpt, identity = _register_checkpoint(store, req, where, model, n_layers, d_mlp)
    if redo:
        return _redo_complete_set(store, done, req, ckpt.id, identity, tokens, model, device, ds.fingerprint, log)
    _record_checkpoint(store, ckpt.id, identity, f"{req.model}@{req.step}", log)
    aset = get_or_create(
        store,
        tables.activation_set,
        {"checkpoint_id": ckpt.id, "dataset_id": ds.id, "hook": req.hook},
        {"dtype": req.dtype, "path": rel_path, "status": "pending", "tokens_done": 0, "n_tokens": tokens.tokens.size},
    )
    what = f"{req.model}@{req.step} on {req.dataset} (ingest)"
    if claim_row(store, ActivationSet, aset.id, req.force, what) == "complete" and not req.force:
        log(f"{req.model}@{req.step} on {req.dataset}: already complete ({aset.path})")
        path = store.config.file(aset.path)
        return IngestResult(aset.id, "already complete", path, aset.n_tokens, 0.0, aset.bytes or 0)
    if aset.dtype != req.dtype:  # a redone or resumed set takes the requested dtype (a mismatched .partial is redone)
        with store.session() as s:
            s.execute(update(ActivationSet).where(ActivationSet.id == aset.id).values(dtype=req.dtype))
    header = ActivationHeader(
        model=req.model,
        step=req.step,
        dataset_fingerprint=ds.fingerprint,
        hook=req.hook,
        n_layers=n_layers,
        d_mlp=d_mlp,
        n_tokens=int(tokens.tokens.size),
        dtype=req.dtype,
    )
    path = store.config.file(aset.path)
    with running(store, ActivationSet, aset.id) as handle:
        try:
            with _space_reserve(store.config.home):  # released first on failure, so the failure can be recorded
                run = _IngestRun(handle, path, header, tokens, model, device, req)
                resumed_from = run.execute(_committed_rows(store, aset.id, path, req.force))
                with ingest_stage("storing the neuron statistics in SQL"):
                    _store_stats(store, aset.id, _stat_rows(aset.id, run.moments))
        except StageFailure as failed:
            raise ActdbError(f"{failed.stage} failed: {_write_error(failed.cause)}; {RESUME}") from failed.cause
        except (OSError, RuntimeError, OperationalError) as exc:  # h5py reports failed writes as either error
            raise ActdbError(f"writing {path} failed: {_write_error(exc)}; {RESUME}") from None
        size = path.stat().st_size
        seconds = handle.complete(tokens_done=header.n_tokens, bytes=size)
    status = "resumed" if resumed_from else "ingested"
    log(
        f"{req.model}@{req.step} on {req.dataset}: {status}"
        + (f" from token {resumed_from}" if resumed_from else "")
        + f", {header.n_tokens} tokens in {seconds:.1f}s -> {aset.path}"
    )
    examples = run.tracker.result() if run.tracker is not None else None
    return IngestResult(aset.id, status, path, header.n_tokens, seconds, size, examples, model)


def _redo_complete_set(
    store: Store,
    done: ActivationSet,
    req: IngestRequest,
    checkpoint_id: int,
    identity: dict,
    tokens: TokenDataset,
    model: torch.nn.Module,
    device: torch.device,
    fingerprint: str,
    log: Callable[[str], None],
) -> IngestResult:
    """`ingest --force` of a complete set: the new file is written beside the old one (`.partial`) under an
    `ingest_attempt` row, and only when it is complete does it replace the old file, statistics, dtype and the
    checkpoint's recorded weights. Until then the set stays complete and readable; a failed redo is recorded as a
    failed attempt (with its error) and leaves the set exactly as it was. When the replacement's values differ
    from the old ones (another dtype, other statistics, other weights), what was computed from them turns stale
    in the same transaction (`store.database.stale`)."""
    n_layers, d_mlp = mlp_shape(model)
    header = ActivationHeader(
        model=req.model,
        step=req.step,
        dataset_fingerprint=fingerprint,
        hook=req.hook,
        n_layers=n_layers,
        d_mlp=d_mlp,
        n_tokens=int(tokens.tokens.size),
        dtype=req.dtype,
    )
    path = store.config.file(done.path)
    values = {"set_id": done.id, "request_key": f"redo-set-{done.id}", "dtype": req.dtype, "tokens_done": 0}
    try:
        attempt_id = start_run(store, IngestAttempt, values)
    except RunBusy:
        raise BusyError(
            f"{req.model}@{req.step} on {req.dataset} ({req.hook}) is being redone by another process right now"
        ) from None
    with running(store, IngestAttempt, attempt_id) as handle:
        try:
            with _space_reserve(store.config.home):
                run = _IngestRun(handle, path, header, tokens, model, device, req)
                run.execute(_committed_rows(store, done.id, path, force=True))
        except (OSError, RuntimeError, OperationalError) as exc:
            raise ActdbError(f"redoing {path} failed: {_write_error(exc)}; {KEPT}") from None
        size = path.stat().st_size
        seconds = time.perf_counter() - handle.started
        stats = _stat_rows(done.id, run.moments)
        with store.session() as s:  # the replacement's statistics, dtype, weights and what they invalidate, at once
            changed = done.dtype != req.dtype or not _same_stats(s, done.id, stats)
            _store_stats(store, done.id, stats, s)
            s.execute(
                update(ActivationSet)
                .where(ActivationSet.id == done.id)
                .values(dtype=req.dtype, bytes=size, tokens_done=header.n_tokens, finished_at=utcnow(), seconds=seconds)
            )
            redone = (done.id, f"{req.model}@{req.step} on {req.dataset} ({req.hook})")
            _replace_identity(s, checkpoint_id, identity, f"{req.model}@{req.step}", log, redone, changed)
        handle.complete(tokens_done=header.n_tokens)
    what = f"{req.model}@{req.step} on {req.dataset}"
    log(f"{what}: re-ingested, {header.n_tokens} tokens in {seconds:.1f}s -> {done.path}")
    examples = run.tracker.result() if run.tracker is not None else None
    return IngestResult(done.id, "ingested", path, header.n_tokens, seconds, size, examples, model)


MAX_TOP_K = 1000
KEPT = "the complete set is kept as it was (the failed attempt is recorded); `actdb ingest --force` tries again"


class StageFailure(Exception):
    """An ingest stage (forward pass, writing the file, statistics...) failed; `stage` names it for the message."""

    def __init__(self, stage: str, cause: Exception) -> None:
        super().__init__(f"{stage} failed: {cause}")
        self.stage, self.cause = stage, cause


@contextlib.contextmanager
def ingest_stage(stage: str) -> Iterator[None]:
    """Run a block as the named ingest stage: any error in it (a model's own forward pass can raise anything;
    h5py raises OSError or RuntimeError) becomes a `StageFailure` naming the stage. One-line `ActdbError`s and
    an inner stage's failure pass through unchanged."""
    try:
        yield
    except (ActdbError, StageFailure):
        raise
    except Exception as exc:
        raise StageFailure(stage, exc) from exc


RESUME = "the rows flushed so far are kept in the .partial file and `actdb ingest` resumes from them"
RESERVE_BYTES = 8 * 2**20  # room kept free while writing, so a full disk can still record the failure in SQL
SPACE_MARGIN = 1.02  # HDF5 chunk index, checksums and attributes on top of the raw float16 rows


def _check_space(path: Path, needed: int, force: bool) -> None:
    """Refuse an ingest the disk cannot hold before anything is written (a resumed file counts as written)."""
    partial = partial_path(path)
    have = partial.stat().st_size if partial.exists() and not force else 0
    folder = next(p for p in (path.parent, *path.parents) if p.exists())
    free = shutil.disk_usage(folder).free
    short = int(needed * SPACE_MARGIN) + RESERVE_BYTES - have - free
    if short > 0:
        raise ActdbError(
            f"the activation file needs about {_size(needed)} but {folder} has {_size(free)} free; free space, or "
            "ingest fewer tokens (a smaller dataset)"
        )


def _size(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


@contextlib.contextmanager
def _space_reserve(home: Path) -> Iterator[None]:
    """A ballast file held while writing and removed first when anything fails: if the disk fills up anyway
    (another process), its space lets the database record the failure."""
    ballast = home / f".actdb-reserve-{os.getpid()}"
    try:
        with ballast.open("wb") as fh:
            fh.write(b"\0" * RESERVE_BYTES)
            fh.flush()
            os.fsync(fh.fileno())
    except OSError:
        ballast.unlink(missing_ok=True)
    try:
        yield
    finally:
        ballast.unlink(missing_ok=True)


def _write_error(exc: Exception) -> str:
    """One line for a failed write (HDF5's own messages span lines and name buffers and offsets)."""
    found = re.search(r"errno = (\d+)", str(exc))
    code = getattr(exc, "errno", None) or (int(found.group(1)) if found else None)
    if code in (errno.ENOSPC, errno.EDQUOT) or "disk is full" in first_line(exc):
        return "no space left on the device"
    if code == errno.EFBIG:
        return "the file grew beyond what this file system (or a file-size limit) allows"
    return getattr(exc, "strerror", None) or first_line(exc)


def _committed_rows(store: Store, set_id: int, path: Path, force: bool) -> int:
    """Rows surely on disk from an earlier attempt (0 with `force`, which discards any partial file)."""
    if force:
        partial_path(path).unlink(missing_ok=True)
        return 0
    with store.session() as s:
        return s.get(ActivationSet, set_id).tokens_done


def _register_checkpoint(
    store: Store, req: IngestRequest, where: ResolvedSource, model: torch.nn.Module, n_layers: int, d_mlp: int
) -> tuple[Checkpoint, dict]:
    """The model and checkpoint rows, after checking that these weights are what MODEL@STEP means: not another
    model's checkpoint, not another step's weights (a source without `{step}`) and not different from what this
    step was ingested from; with the identity of these weights, which `_record_checkpoint` writes (at once, or for
    a redone complete set only once the replacement is complete)."""
    weights = weights_fingerprint(model)
    elsewhere = store.query(
        select(Model.name.label("model"), Checkpoint.step)
        .join(Model, Model.id == Checkpoint.model_id)
        .where(Checkpoint.weights_sha256 == weights, Model.name != req.model)
        .limit(1)
    ).first()
    if elsewhere is not None and not req.identical_weights:
        raise ActdbError(
            f"{where.location} has exactly the weights of {elsewhere.model}@{elsewhere.step}: recording them as "
            f"{req.model}@{req.step} would store one model under two names; check --source (or say "
            "--identical-weights for a deliberate copy)"
        )
    model_row = get_or_create(
        store,
        tables.model,
        {"name": req.model},
        {
            "family": model_family(where.source_template, model.config.model_type),
            "architecture": model.config.model_type,
            "n_layers": n_layers,
            "d_mlp": d_mlp,
            "source": where.source_template,
            "revision_template": recorded_revision_template(where),
            "seed": None,
        },
    )
    with store.session() as s:
        twin = s.scalar(
            select(Checkpoint.step).where(
                Checkpoint.model_id == model_row.id, Checkpoint.weights_sha256 == weights, Checkpoint.step != req.step
            )
        )
        known = s.scalar(select(Checkpoint).where(Checkpoint.model_id == model_row.id, Checkpoint.step == req.step))
    if twin is not None and not req.identical_weights:
        rule = "--source has no {step}" if "{step}" not in where.source_template else "the source names no step"
        if where.revision_template is None:
            rule += " and no revision rule (--revision) gives each step its own revision"
        raise ActdbError(
            f"{where.location} at step {req.step} has exactly the weights of {req.model}@{twin}: {rule}; "
            "fix the source (or say --identical-weights if the weights really did not change)"
        )
    if known is not None and known.weights_sha256 not in (None, weights) and not req.replace_source:
        raise ActdbError(
            f"{req.model}@{req.step} was ingested from other weights ({known.source}); say --replace-source to "
            "record these instead"
        )
    values = {
        "source": where.source,
        "revision": where.revision,
        "source_sha": getattr(model.config, "_commit_hash", None),
        "weights_sha256": weights,
    }
    ckpt = get_or_create(store, tables.checkpoint, {"model_id": model_row.id, "step": req.step}, values)
    return ckpt, values


def _record_checkpoint(
    store: Store, checkpoint_id: int, identity: dict, checkpoint: str, log: Callable[[str], None]
) -> None:
    """Record where a checkpoint's weights came from (source, revision, commit, weights fingerprint); when they
    are other weights than before, everything computed from the old ones turns stale in the same transaction."""
    with store.session() as s:
        _replace_identity(s, checkpoint_id, identity, checkpoint, log)


def _replace_identity(
    s: Session,
    checkpoint_id: int,
    identity: dict,
    checkpoint: str,
    log: Callable[[str], None],
    redone: tuple[int, str] | None = None,
    values_changed: bool = False,
) -> None:
    """Write the checkpoint's identity and, within the caller's transaction, invalidate what its old weights
    produced, or (`values_changed`) what the old values of the set just redone (`redone`: its id and name)
    produced (`store.database.stale`); logs one line saying what."""
    before = s.scalar(select(Checkpoint.weights_sha256).where(Checkpoint.id == checkpoint_id))
    s.execute(update(Checkpoint).where(Checkpoint.id == checkpoint_id).values(**identity))
    new = identity["weights_sha256"]
    weights_changed = before is not None and before != new
    if not (weights_changed or (redone is not None and values_changed)):
        return
    if weights_changed:
        reason = f"the weights of {checkpoint} were replaced (sha256 {before[:12]}… -> {new[:12]}…)"
    else:
        reason = f"the stored values of {redone[1]} were replaced"
    invalidated = invalidate(s, checkpoint_id, redone[0] if redone else None, weights_changed, reason)
    log(f"{reason}; {invalidated.summary()}")


def _check_model_fits(where: ResolvedSource, config: object, ds: Dataset, tokens: TokenDataset) -> None:
    """The dataset must be readable by this model: same tokenizer, ids within its vocabulary, sequences within
    its context."""
    source = where.location
    try:
        tokenizer = load_tokenizer(source, where.revision)
    except ActdbError:
        tokenizer = None  # checkpoints saved without a tokenizer: only the vocabulary-size check applies
    if tokenizer is not None and tokenizer_fingerprint(tokenizer) != ds.tokenizer_fingerprint:
        raise ActdbError(
            f"tokenizer mismatch: {source} ships a tokenizer whose vocabulary differs from the one "
            "the dataset was built with"
        )
    vocab = int(config.vocab_size)
    if int(tokens.tokens.max()) >= vocab:
        raise ActdbError(
            f"tokenizer mismatch: dataset token ids reach {int(tokens.tokens.max())} but {source} "
            f"has a vocabulary of {vocab}"
        )
    limit = context_length(config)
    if limit is not None and tokens.seq_len > limit:
        raise ActdbError(
            f"dataset {ds.name!r} has sequences of {tokens.seq_len} tokens but {source} reads at most {limit}; "
            "build a dataset with a smaller --seq-len"
        )


class _IngestRun:
    """State of one ingest: the writer thread, the statistics, and progress reporting."""

    def __init__(
        self,
        handle: RunHandle,
        path: Path,
        header: ActivationHeader,
        tokens: TokenDataset,
        model: torch.nn.Module,
        device: torch.device,
        req: IngestRequest,
    ) -> None:
        self.handle, self.path, self.header = handle, path, header
        self.tokens, self.model, self.device, self.req = tokens, model, device, req
        workspace = Workspace()
        self.moments = [StreamingMoments(header.d_mlp, workspace) for _ in range(header.n_layers)]
        self.tracker = TopKTracker(header.n_layers, header.d_mlp, req.top_k) if req.top_k else None
        self.seq_len = tokens.seq_len
        self.rows_per_batch = req.batch_size * self.seq_len

    def _fold(self, start_row: int, rows: list[np.ndarray], moments: bool = True) -> None:
        """Fold rows as stored into the statistics (unless the forward device already did) and the top-K."""
        if not moments and self.tracker is None:
            return
        mask = self.tokens.mask.reshape(-1)[start_row : start_row + rows[0].shape[0]]
        positions = start_row + np.flatnonzero(mask) if self.tracker is not None else None
        for layer, (stats, block) in enumerate(zip(self.moments, rows, strict=True)):
            counted = block[mask]
            if moments:
                stats.update(counted)
            if self.tracker is not None:
                self.tracker.update(layer, counted, positions)

    def _fold_on_device(self, start_row: int, halves: list[torch.Tensor]) -> None:
        """Statistics of a batch where the forward pass ran (a GPU): only per-neuron sums reach the host."""
        mask = self.tokens.mask.reshape(-1)[start_row : start_row + halves[0].shape[0]]
        keep = torch.from_numpy(mask).to(halves[0].device)
        for stats, half in zip(self.moments, halves, strict=True):
            stats.update(half[keep])

    def execute(self, committed: int) -> int:
        """Write every remaining batch; returns the row the run resumed from (0 for a fresh start)."""
        with ingest_stage(f"creating {self.path}"):
            writer = ActivationWriter(self.path, self.header)
        try:
            start = writer.rewind(min(writer.tokens_done, committed), self.rows_per_batch)
            try:
                self._rebuild_stats(writer, start)
            except (ActdbError, OSError, RuntimeError, KeyError):  # the kept rows do not read back: redo them
                writer.close()
                partial_path(self.path).unlink(missing_ok=True)
                workspace = Workspace()
                self.moments = [StreamingMoments(self.header.d_mlp, workspace) for _ in self.moments]
                if self.tracker is not None:
                    self.tracker = TopKTracker(self.header.n_layers, self.header.d_mlp, self.req.top_k)
                writer, start = ActivationWriter(self.path, self.header), 0
            self._forward_all(writer, start)
        except BaseException:
            writer.close()
            raise
        with ingest_stage(f"writing {self.path}"):
            writer.finish()
        return start

    def _rebuild_stats(self, writer: ActivationWriter, stop: int) -> None:
        """Fold the kept rows `[0, stop)` in the pieces they were first folded in (batches, or int8 blocks)."""
        unit = writer.fold_rows or self.rows_per_batch
        for begin in range(0, stop, unit):
            self._fold(begin, writer.stored_rows(begin, min(begin + unit, stop)))

    def _forward_all(self, writer: ActivationWriter, resume_row: int) -> None:
        """Forward passes from the batch holding `resume_row`; rows before it (the file has them) are not written
        again."""
        n_rows = self.header.n_tokens
        start_row = resume_row - resume_row % self.rows_per_batch
        # a GPU computes the statistics of float16 rows; int8 rows are folded as stored, on the writer thread
        on_device = self.device.type != "cpu" and self.header.dtype == "float16"
        work: queue.Queue = queue.Queue(maxsize=QUEUE_DEPTH)
        failure: list[BaseException] = []
        committed = [resume_row]

        def fold(begin: int, rows: list[np.ndarray]) -> None:
            with ingest_stage("statistics (moments and top activations)"):
                self._fold(begin, rows, moments=not on_device)

        def write_loop() -> None:
            last_flush = time.monotonic()
            try:
                while (item := work.get()) is not None:
                    begin, rows = item
                    end = begin + rows[0].shape[0]
                    if begin < resume_row:  # the first batch of a resumed int8 ingest: the file has its start
                        rows, begin = [r[resume_row - begin :] for r in rows], resume_row
                    with ingest_stage(f"writing {self.path}"):
                        if begin < end:
                            writer.write_rows(begin, rows, on_stored=fold)
                        if time.monotonic() - last_flush > FLUSH_SECONDS or end == n_rows:
                            writer.flush()
                            committed[0] = writer.tokens_done  # only what a flush put on disk goes to SQL
                            last_flush = time.monotonic()
            except BaseException as exc:  # handed to the main thread
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
            with MLPRecorder(self.model, self.req.hook) as rec, torch.inference_mode():
                for seq0 in range(start_row // self.seq_len, self.tokens.n_sequences, self.req.batch_size):
                    if failure:
                        break
                    ids = torch.from_numpy(flat[seq0 : seq0 + self.req.batch_size].astype(np.int64)).to(self.device)
                    with ingest_stage(f"forward pass (sequences {seq0}..{seq0 + len(ids) - 1})"):
                        base(input_ids=ids, use_cache=False)
                        halves = [o.reshape(-1, o.shape[-1]).to(torch.float16) for o in rec.outputs]
                    if on_device:
                        with ingest_stage("statistics (moments on the device)"):
                            self._fold_on_device(seq0 * self.seq_len, halves)
                    rows = [h.cpu().numpy() for h in halves]
                    work.put((seq0 * self.seq_len, rows))
                    bar.update(rows[0].shape[0])
                    if time.monotonic() - last_report > FLUSH_SECONDS:
                        self.handle.beat(tokens_done=committed[0])
                        last_report = time.monotonic()
        finally:
            work.put(None)
            thread.join()
            bar.close()
        if failure:
            raise failure[0]
        self.handle.beat(tokens_done=committed[0])


def _stat_rows(set_id: int, moments: list[StreamingMoments]) -> list[dict]:
    """The `neuron_stat` rows of a set from its streamed moments."""
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
    return rows


def _same_stats(s: Session, set_id: int, rows: list[dict]) -> bool:
    """Whether the set's recorded statistics equal `rows` exactly: every neuron's count, moments, fraction
    active, min and max (what a redo of unchanged values reproduces bit for bit)."""
    stat = tables.neuron_stat
    columns = [c for c in rows[0] if c != "set_id"] if rows else []
    stored = s.execute(
        select(*(stat.c[c] for c in columns)).where(stat.c.set_id == set_id).order_by(stat.c.layer, stat.c.neuron)
    ).all()
    return len(stored) == len(rows) and all(
        tuple(old) == tuple(new[c] for c in columns) for old, new in zip(stored, rows, strict=True)
    )


def _store_stats(store: Store, set_id: int, rows: list[dict], session: Session | None = None) -> None:
    """Replace the set's `neuron_stat` rows (in `session`'s transaction when given)."""
    with contextlib.nullcontext(session) if session is not None else store.session() as s:
        s.execute(delete(NeuronStat).where(NeuronStat.set_id == set_id))
        insert_rows(s, NeuronStat, rows)
