"""`actdb correlate`: resolve activation sets, reuse or claim a correlation run, compute it, store its results.

A request is identified by its sets, control, baseline seed and top-k; the threshold is not part of it (it only
sets the run's default for displaying labels). An identical complete run is reused; an identical running one
is waited for; otherwise this process claims a new run row and computes it under the run lifecycle.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
from sqlalchemy import bindparam, select, update
from tqdm.auto import tqdm

from actdb.compute.cluster import ClusterSpec, open_client, worker_threads
from actdb.compute.correlation.cluster import cluster_options, correlate_one_pass, worker_backend
from actdb.compute.correlation.engine import CorrelationOptions, CorrelationResult, SetInput, check_fits, correlate_sets
from actdb.compute.correlation.precision import check_precision
from actdb.compute.correlation.rotation_cache import FOLDER as ROTATION_FOLDER
from actdb.compute.correlation.universality import describe_draws, format_draws, score_universality
from actdb.store.database.connection import Store, finite_or_none, insert_rows
from actdb.store.database.labels import stability_at
from actdb.store.database.lifecycle import RunHandle, release, request_key, running, start_or_wait
from actdb.store.database.registry import resolve_sets
from actdb.store.database.schema import (
    ActivationSet,
    Checkpoint,
    CorrelationRun,
    Dataset,
    LayerSimilarity,
    Model,
    NeuronMatch,
    NeuronStat,
    RunMember,
    Universality,
)
from actdb.store.database.tables import DEFAULT_THRESHOLD
from actdb.store.device import NUMPY, resolve_device
from actdb.store.errors import ActdbError
from actdb.store.files.activation import ActivationReader
from actdb.store.files.token import TokenDataset
from actdb.store.hook_names import HOOK_NAME
from actdb.store.refs import CONTROLS, SetRef, check_threshold
from actdb.store.set_files import expected_header

MAX_SEED = 2**32 - 1
MAX_DRAWS = 1000


@dataclass(kw_only=True)
class CorrelationRequest:
    """What `actdb correlate` asks for; `threshold` is the run's display default (0.5 when None)."""

    sets: list[SetRef]
    dataset: str | None = None
    control: str = "none"
    threshold: float | None = None
    seed: int = 0
    baseline_draws: int = 8
    max_draws: int | None = None  # adaptive: up to this many draws for the neurons undecided at `threshold`
    confidence: float = 0.95  # of the adaptive decision
    topk: int = 0
    chunk_tokens: int = 8192
    memory_budget: int | None = None
    hook: str = HOOK_NAME
    similarity: bool = False  # a similarity run: layer-pair statistics of every pair of sets, no neuron rows
    device: str = "auto"
    precision: str = "auto"  # of the products on CUDA; not part of the request key (all agree to 1e-4)
    cluster: ClusterSpec = ClusterSpec()  # where the engine's tasks run; not part of the request key
    force: bool = False
    progress: bool = True

    def options(self) -> CorrelationOptions:
        if self.control not in CONTROLS:
            raise ActdbError(f"unknown control {self.control!r}; use none or token")
        if not 0 <= self.seed <= MAX_SEED:
            raise ActdbError(f"--seed must be in 0..{MAX_SEED}")
        if self.topk < 0 or self.chunk_tokens < 1:
            raise ActdbError("--top-k must be >= 0 and --chunk-tokens >= 1")
        if not 1 <= self.baseline_draws <= MAX_DRAWS:
            raise ActdbError(f"--baseline-draws must be in 1..{MAX_DRAWS}")
        adaptive = self.max_draws is not None
        if adaptive and not self.baseline_draws < self.max_draws <= MAX_DRAWS:
            raise ActdbError(f"--adaptive-draws must be above --baseline-draws and at most {MAX_DRAWS}")
        if adaptive and self.baseline_draws < 2:
            raise ActdbError("--adaptive-draws needs --baseline-draws of at least 2 (a spread to decide with)")
        if not 0.5 < self.confidence < 1:
            raise ActdbError(f"--confidence {self.confidence} must lie between 0.5 and 1")
        return CorrelationOptions(
            adaptive_threshold=(DEFAULT_THRESHOLD if self.threshold is None else self.threshold) if adaptive else None,
            adaptive_confidence=self.confidence,
            max_draws=self.max_draws or self.baseline_draws,
            control=self.control,
            baseline_seed=self.seed,
            baseline_draws=self.baseline_draws,
            layer_similarity=self.similarity,
            topk=self.topk,
            chunk_tokens=self.chunk_tokens,
            memory_budget=self.memory_budget,
            precision=self.precision,
        )


@dataclass(frozen=True)
class _Work:
    """What a checked request computes with: the engine's inputs and tokens, the device, the array backend's
    name, and the Dask client when the tasks run on a cluster."""

    inputs: list[SetInput]
    tokens: TokenDataset
    device: str
    backend: str
    client: Any = None


@dataclass
class RunOutcome:
    run_id: int
    reused: bool
    seconds: float
    n_tokens: int
    n_passes: int
    n_dead: int
    backend: str


def correlate(store: Store, req: CorrelationRequest, log: Callable[[str], None] = print) -> RunOutcome:
    """Resolve the request's sets and correlate them."""
    options = req.options()
    check_threshold(req.threshold)
    if len(req.sets) < 2:
        raise ActdbError("correlation needs at least two activation sets (models x steps)")
    sets = resolve_sets(store, req.sets, req.dataset, req.hook)
    return run_correlation(
        store,
        sets,
        options,
        threshold=req.threshold,
        device=req.device,
        force=req.force,
        progress=req.progress,
        log=log,
        cluster=req.cluster,
    )


def correlation_key(set_ids: list[int], options: CorrelationOptions) -> str:
    """The request key; migration 0005 computes the same for runs recorded before it (one baseline draw, which
    is left out of the key so that those runs keep theirs)."""
    fields = {"control": options.control, "seed": options.baseline_seed, "topk": options.topk}
    if options.baseline_draws != 1:
        fields["draws"] = options.baseline_draws
    if options.layer_similarity:
        fields["similarity"] = True
    if options.adaptive_threshold is not None:  # the extra draws depend on the threshold they decide
        fields["adaptive"] = [options.adaptive_threshold, options.adaptive_confidence, options.max_draws]
    return request_key(kind="correlate", sets=sorted(set_ids), **fields)


def run_correlation(
    store: Store,
    sets: list[ActivationSet],
    options: CorrelationOptions,
    *,
    threshold: float | None = None,
    device: str = "auto",
    force: bool = False,
    progress: bool = True,
    log: Callable[[str], None] = print,
    cluster: ClusterSpec = ClusterSpec(),
) -> RunOutcome:
    """Correlate `sets`, or reuse (or wait for) an identical run; a failure leaves the run marked failed. With
    `cluster`, the engine's tasks run on Dask workers (started only when something is to be computed)."""
    key = correlation_key([a.id for a in sets], options)
    if options.rotation_cache is None:  # rotations are kept beside the store's activation files
        options = replace(options, rotation_cache=str(store.config.home / ROTATION_FOLDER))
    if not force and (done := complete_run(store, key)) is not None:
        return _reuse(store, done, threshold, log)
    with open_client(cluster) if cluster.enabled else contextlib.nullcontext() as client:
        backend, inputs, tokens = _check_request(store, sets, options, device, client)
        while True:
            done = None if force else complete_run(store, key)
            if done is not None:
                return _reuse(store, done, threshold, log)
            values = _run_values(store, sets, options, key, threshold, backend)
            run_id = start_or_wait(store, CorrelationRun, values, log)
            if run_id is None:  # an identical request completed meanwhile: reuse it
                force = False
                continue
            if not force and complete_run(store, key) is not None:
                release(store, CorrelationRun, run_id)  # it completed between our look and our claim
                continue
            with running(store, CorrelationRun, run_id) as handle:
                work = _Work(inputs, tokens, device, backend, client)
                return _compute(store, handle, sets, options, work, progress, log)


def _check_request(
    store: Store, sets: list[ActivationSet], options: CorrelationOptions, device: str, client: Any = None
) -> tuple[str, list[SetInput], TokenDataset]:
    """Everything that can refuse the request does so before a run is recorded: device (on a worker, on a
    cluster), files, memory (of one cluster task, on a cluster). Returns the array backend's name and the
    engine's inputs, which the computation then uses."""
    if client is None:
        backend = resolve_device(device).array
        check_precision(options.precision, backend)
    else:
        name = worker_backend(client, device, options.precision)
        options, backend = cluster_options(client, options), NUMPY  # the budget is the task's: no device lookup
    inputs, tokens = engine_inputs(store, sets)
    for i in inputs:
        if not Path(i.path).exists():
            raise ActdbError(f"activation file {i.path} does not exist; `actdb check` lists what is missing")
        ActivationReader(i.path, expected=i.expected).close()  # each file is the set SQL says, before a run row
    n_passes = check_fits(inputs, tokens.tokens, tokens.mask, options, backend)
    if options.adaptive_threshold is not None and (client is not None or n_passes > 1):
        where = "on a Dask cluster" if client is not None else f"in {n_passes} passes"
        raise ActdbError(
            f"adaptive baseline draws need the covariances of every pair at once, in one local pass; this run "
            f"would go {where} (raise --memory-budget, or leave out --adaptive-draws)"
        )
    return (backend.name if client is None else name), inputs, tokens


def engine_inputs(store: Store, sets: list[ActivationSet]) -> tuple[list[SetInput], TokenDataset]:
    """What the engine correlates for `sets`: each set's file and stored means, and their token dataset."""
    with store.session() as s:
        inputs = [_set_input(store, s, a) for a in sets]
        dataset_path = s.get(Dataset, sets[0].dataset_id).path
    return inputs, TokenDataset.load(store.config.file(dataset_path))


def complete_run(store: Store, key: str) -> CorrelationRun | None:
    """The newest complete run of a request key."""
    with store.session() as s:
        return s.scalar(
            select(CorrelationRun)
            .where(CorrelationRun.request_key == key, CorrelationRun.status == "complete")
            .order_by(CorrelationRun.id.desc())
            .limit(1)
        )


def _reuse(store: Store, done: CorrelationRun, threshold: float | None, log: Callable[[str], None]) -> RunOutcome:
    note = ""
    if threshold is not None and threshold != done.threshold:
        _set_display_threshold(store, done.id, threshold)
        note = f"; its display threshold is now {threshold} (was {done.threshold})"
    log(f"run {done.id} already holds these results (complete){note}; --force recomputes")
    return RunOutcome(
        done.id, True, done.seconds or 0.0, done.n_tokens or 0, done.n_passes or 0, done.n_dead or 0, done.backend
    )


def _set_display_threshold(store: Store, run_id: int, threshold: float) -> None:
    """Record a new display threshold and re-stamp the stored stability, which is relative to it."""
    u = Universality.__table__.c
    with store.session() as s:
        rows = s.execute(select(u.set_id, u.layer, u.neuron, u.excess_draws).where(u.run_id == run_id)).all()
        stamped = [
            {"s": r.set_id, "l": r.layer, "n": r.neuron, "v": stability_at(r.excess_draws, threshold)} for r in rows
        ]
        stmt = (
            update(Universality.__table__)
            .where(u.run_id == run_id, u.set_id == bindparam("s"), u.layer == bindparam("l"))
            .where(u.neuron == bindparam("n"))
            .values(stability=bindparam("v"))
        )
        if stamped:
            s.connection().execute(stmt, stamped)
        s.execute(update(CorrelationRun).where(CorrelationRun.id == run_id).values(threshold=threshold))


def _run_values(
    store: Store,
    sets: list[ActivationSet],
    options: CorrelationOptions,
    key: str,
    threshold: float | None,
    backend: str,
) -> dict:
    with store.session() as s:
        models = {s.scalar(select(Checkpoint.model_id).where(Checkpoint.id == a.checkpoint_id)) for a in sets}
    kind = "cross_model" if len(models) == len(sets) else "within_model"
    return {
        "request_key": key,
        "dataset_id": sets[0].dataset_id,
        "kind": "similarity" if options.layer_similarity else kind,
        "control": options.control,
        "threshold": DEFAULT_THRESHOLD if threshold is None else threshold,
        "baseline_seed": options.baseline_seed,
        "baseline_draws": options.baseline_draws,
        "topk": options.topk,
        "backend": backend,
    }


def _compute(
    store: Store,
    handle: RunHandle,
    sets: list[ActivationSet],
    options: CorrelationOptions,
    work: _Work,
    progress: bool,
    log: Callable[[str], None],
) -> RunOutcome:
    with store.session() as s:
        for pos, a in enumerate(sets):
            s.add(RunMember(run_id=handle.row_id, set_id=a.id, position=pos))
        run = s.get(CorrelationRun, handle.row_id)
        kind, threshold = run.kind, run.threshold
    inputs, tokens, client = work.inputs, work.tokens, work.client
    total = tokens.tokens.size
    bar = tqdm(
        total=total,
        unit="tok",
        unit_scale=True,
        disable=not progress,
        desc=f"correlate run {handle.row_id}",
        dynamic_ncols=True,
    )

    def advance(n_rows: int) -> None:
        if bar.n + n_rows > bar.total:  # later passes read the tokens again
            bar.total += total
        bar.update(n_rows)

    started = time.perf_counter()
    try:
        if client is None:
            backend = resolve_device(work.device).array
            result = correlate_sets(inputs, tokens.tokens, tokens.mask, options, backend, advance)
        else:
            result = correlate_one_pass(client, inputs, tokens.tokens, tokens.mask, options, work.device, advance)
    finally:
        bar.close()
    engine = time.perf_counter() - started
    n_dead = _store_results(store, handle.row_id, inputs, result, kind, threshold)
    writing = time.perf_counter() - started - engine
    label = result.precision.label(work.backend)
    seconds = handle.complete(
        n_tokens=result.n_tokens,
        n_passes=result.n_passes,
        n_dead=n_dead,
        backend=label,
        bytes_read=result.bytes_read,
        bytes_held=result.bytes_held,
    )
    checked = "" if result.precision.error is None else f"; product error {result.precision.error:.1e} of r"
    if client is not None:
        checked += f"; {worker_threads(client)} Dask worker thread(s)"
    if options.adaptive_threshold is not None and kind == "cross_model":
        checked += f"; {describe_draws(score_universality(result), options.baseline_draws)}"
        cpu = result.cpu_seconds
        checked += (
            f" (adaptive phase {result.seconds.get('adaptive', 0.0):.2f}s, {cpu.get('adaptive', 0.0):.2f} of the "
            f"engine's {sum(cpu.values()):.2f} CPU-s)"
        )
    log(
        f"run {handle.row_id}: {len(sets)} sets, {result.n_tokens} counted tokens, {result.n_passes} pass(es) "
        f"reading {result.bytes_read / 1e6:.1f} MB of {result.bytes_held / 1e6:.1f} MB stored (read amplification "
        f"{result.read_amplification:.2f}), "
        f"{n_dead} dead neurons, {seconds:.1f}s on {label} (engine {engine:.2f}s, results written in "
        f"{writing:.2f}s{checked})"
    )
    return RunOutcome(handle.row_id, False, seconds, result.n_tokens, result.n_passes, n_dead, label)


def _set_input(store: Store, session, aset: ActivationSet) -> SetInput:
    model = session.scalar(select(Model).join(Checkpoint).where(Checkpoint.id == aset.checkpoint_id))
    means = np.zeros(model.n_layers * model.d_mlp)
    for layer, neuron, mean in session.execute(
        select(NeuronStat.layer, NeuronStat.neuron, NeuronStat.mean).where(NeuronStat.set_id == aset.id)
    ):
        means[layer * model.d_mlp + neuron] = mean
    path = str(store.config.file(aset.path))
    expected = expected_header(session, aset)
    return SetInput(aset.id, path, model.n_layers, model.d_mlp, means, rotation_key=model.id, expected=expected)


def _match_rows(run_id: int, inputs: list[SetInput], result: CorrelationResult) -> list[dict]:
    """neuron_match rows. `self_corr` (a neuron against the same-index neuron of the other set) is kept only
    between checkpoints of one model, where it means something."""
    shapes = {s.key: s.d_mlp for s in inputs}
    model_of = {s.key: s.rotation_key for s in inputs}
    rows = []
    for (a, b), m in result.matches.items():
        da, db = shapes[a], shapes[b]
        same_model = m.self_corr is not None and model_of[a] == model_of[b]
        with np.errstate(invalid="ignore"):
            baseline_mean, baseline_sd = m.baseline_mean, m.baseline_sd
        for i in range(len(m.max_corr)):
            best = int(m.best[i])
            topk = None
            if m.topk_idx is not None:
                topk = json.dumps(
                    [
                        [int(j) // db, int(j) % db, round(float(v), 6)]
                        for j, v in zip(m.topk_idx[i], m.topk_val[i], strict=True)
                        if j >= 0
                    ]
                )
            rows.append(
                {
                    "run_id": run_id,
                    "set_id": a,
                    "other_set_id": b,
                    "layer": i // da,
                    "neuron": i % da,
                    "max_corr": finite_or_none(m.max_corr[i]),
                    "best_layer": best // db if best >= 0 else None,
                    "best_neuron": best % db if best >= 0 else None,
                    "baseline_max_corr": finite_or_none(baseline_mean[i]),
                    "baseline_sd": finite_or_none(baseline_sd[i]),
                    "topk": topk,
                    "self_corr": finite_or_none(m.self_corr[i]) if same_model else None,
                }
            )
    return rows


def _layer_rows(run_id: int, result: CorrelationResult) -> list[dict]:
    rows = []
    for (a, b, la, lb), pair in result.layers.items():
        draws = np.array(list(pair.baseline.values()))
        rows.append(
            {
                "run_id": run_id,
                "set_id": a,
                "other_set_id": b,
                "layer": la,
                "other_layer": lb,
                "mean_max_corr": finite_or_none(pair.mean_max_corr),
                "mean_baseline": finite_or_none(draws.mean()) if draws.size else None,
                "baseline_sd": finite_or_none(draws.std(ddof=1)) if draws.size > 1 else None,
                "matched_corr": None if pair.matched_corr is None else finite_or_none(pair.matched_corr),
                "cka": finite_or_none(pair.cka),
            }
        )
    return rows


def _universality_rows(run_id: int, inputs: list[SetInput], result: CorrelationResult, threshold: float) -> list[dict]:
    shapes = {s.key: s.d_mlp for s in inputs}
    rows = []
    for key, sc in score_universality(result).items():
        d = shapes[key]
        z, z_pooled, n_draws, stability = sc.z, sc.z_pooled(d), sc.n_draws, sc.stability(threshold)
        for i in range(len(sc.excess_corr)):
            rows.append(
                {
                    "run_id": run_id,
                    "set_id": key,
                    "layer": i // d,
                    "neuron": i % d,
                    "mean_max_corr": finite_or_none(sc.mean_max_corr[i]),
                    "min_max_corr": finite_or_none(sc.min_max_corr[i]),
                    "mean_baseline": finite_or_none(sc.mean_baseline[i]),
                    "baseline_sd": finite_or_none(sc.baseline_sd[i]),
                    "excess_corr": finite_or_none(sc.excess_corr[i]),
                    "z": finite_or_none(z[i]),
                    "z_pooled": finite_or_none(z_pooled[i]),
                    "n_draws": int(n_draws[i]) if n_draws[i] else None,
                    "stability": finite_or_none(stability[i]),
                    "excess_draws": format_draws(sc.excess_draws[:, i]),
                    "is_dead": bool(sc.is_dead[i]),
                }
            )
    return rows


def _store_results(
    store: Store, run_id: int, inputs: list[SetInput], result: CorrelationResult, kind: str, threshold: float
) -> int:
    """Bulk-insert neuron_match rows, and universality scores for cross-model runs (universality is only defined
    across models), or, for a similarity run, only its layer-pair rows; returns the number of dead neurons."""
    with store.session() as s:
        if kind == "similarity":
            insert_rows(s, LayerSimilarity, _layer_rows(run_id, result))
        else:
            insert_rows(s, NeuronMatch, _match_rows(run_id, inputs, result))
        if kind == "cross_model":
            insert_rows(s, Universality, _universality_rows(run_id, inputs, result, threshold))
    return int(sum(dead.sum() for dead in result.dead.values()))
