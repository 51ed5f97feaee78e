"""`actdb correlate`: resolve activation sets, reuse or record a correlation run, and store its results."""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from sqlalchemy import select, update
from tqdm.auto import tqdm

from actdb.compute.backend import get_backend
from actdb.compute.correlation import CorrelationOptions, CorrelationResult, SetInput, correlate_sets
from actdb.compute.universality import score_universality
from actdb.store.database import Store, finite_or_none, insert_rows
from actdb.store.errors import ActdbError
from actdb.store.registry import get_checkpoint, get_dataset
from actdb.store.schema import (
    ActivationSet,
    Checkpoint,
    CorrelationRun,
    Dataset,
    Model,
    NeuronMatch,
    NeuronStat,
    RunMember,
    Universality,
    utcnow,
)
from actdb.store.token_file import TokenDataset


@dataclass(frozen=True)
class SetRef:
    """A `model@step` reference, optionally pinned to a dataset."""

    model: str
    step: int
    dataset: str | None = None

    @classmethod
    def parse(cls, text: str) -> SetRef:
        body, _, dataset = text.partition("/")
        model, sep, step = body.rpartition("@")
        if not sep or not model or not step.lstrip("-").isdigit():
            raise ActdbError(f"malformed set {text!r}; write MODEL@STEP (optionally MODEL@STEP/DATASET)")
        return cls(model, int(step), dataset or None)


@dataclass
class RunOutcome:
    run_id: int
    reused: bool
    seconds: float
    n_tokens: int
    n_passes: int
    n_dead: int
    backend: str


def resolve_sets(store: Store, refs: list[SetRef], dataset: str | None, hook: str = "mlp.post") -> list[ActivationSet]:
    """Complete activation sets for the references, all on one dataset, or a one-line error."""
    if len(refs) < 2:
        raise ActdbError("correlation needs at least two activation sets (models x steps)")
    if len(set(refs)) != len(refs):
        raise ActdbError("the same activation set is listed twice")
    found = []
    with store.session() as s:
        if dataset:
            get_dataset(s, dataset)
        for ref in refs:
            ckpt = get_checkpoint(s, ref.model, ref.step)
            q = (
                select(ActivationSet, Dataset)
                .join(Dataset)
                .where(ActivationSet.checkpoint_id == ckpt.id, ActivationSet.hook == hook)
            )
            want = ref.dataset or dataset
            if want:
                q = q.where(Dataset.name == want)
            rows = s.execute(q).all()
            if not rows:
                on = f" on dataset {want!r}" if want else ""
                raise ActdbError(
                    f"{ref.model}@{ref.step} has no activation set{on}; run `actdb ingest "
                    f"{ref.model} --step {ref.step} --dataset {want or 'DATASET'}` first"
                )
            if len(rows) > 1:
                names = ", ".join(d.name for _a, d in rows)
                raise ActdbError(f"{ref.model}@{ref.step} has sets on several datasets ({names}); pass --dataset")
            aset, ds = rows[0]
            if aset.status != "complete":
                raise ActdbError(
                    f"activation set of {ref.model}@{ref.step} on {ds.name} is {aset.status}, not "
                    "complete; finish it with `actdb ingest` first"
                )
            found.append((aset, ds.name))
    datasets = sorted({name for _a, name in found})
    if len(datasets) > 1:
        raise ActdbError(f"the sets are on different datasets ({', '.join(datasets)}); correlate sets of one dataset")
    return [a for a, _ in found]


def request_key(set_ids: list[int], options: CorrelationOptions, threshold: float) -> str:
    payload = json.dumps(
        {
            "sets": sorted(set_ids),
            "control": options.control,
            "seed": options.baseline_seed,
            "topk": options.topk,
            "threshold": threshold,
        },
        sort_keys=True,
    )
    return hashlib.sha256(payload.encode()).hexdigest()


def run_correlation(
    store: Store,
    sets: list[ActivationSet],
    options: CorrelationOptions,
    threshold: float = 0.5,
    device: str = "auto",
    force: bool = False,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> RunOutcome:
    """Correlate `sets`, or reuse an identical complete run; the run row records failure if anything breaks."""
    key = request_key([a.id for a in sets], options, threshold)
    with store.session() as s:
        done = s.scalar(
            select(CorrelationRun)
            .where(CorrelationRun.request_key == key, CorrelationRun.status == "complete")
            .order_by(CorrelationRun.id.desc())
        )
    if done is not None and not force:
        log(f"run {done.id} already holds these results (complete); --force recomputes")
        return RunOutcome(
            done.id, True, done.seconds or 0.0, done.n_tokens or 0, done.n_passes or 0, done.n_dead or 0, done.backend
        )
    backend = get_backend(device)
    with store.session() as s:
        ds = s.get(Dataset, sets[0].dataset_id)
        models = {s.scalar(select(Checkpoint.model_id).where(Checkpoint.id == a.checkpoint_id)) for a in sets}
        kind = "cross_model" if len(models) == len(sets) else "within_model"
        run = CorrelationRun(
            request_key=key,
            dataset_id=ds.id,
            kind=kind,
            control=options.control,
            threshold=threshold,
            baseline_seed=options.baseline_seed,
            topk=options.topk,
            backend=backend.name,
            status="running",
            started_at=utcnow(),
        )
        s.add(run)
        s.flush()
        for pos, a in enumerate(sets):
            s.add(RunMember(run_id=run.id, set_id=a.id, position=pos))
        inputs = [_set_input(s, a) for a in sets]
        dataset_path = ds.path
    started = time.perf_counter()
    try:
        tokens = TokenDataset.load(dataset_path)
        total = tokens.tokens.size
        bar = tqdm(
            total=total,
            unit="tok",
            unit_scale=True,
            disable=not progress,
            desc=f"correlate run {run.id}",
            dynamic_ncols=True,
        )
        try:

            def advance(n_rows: int) -> None:
                if bar.n + n_rows > bar.total:
                    bar.total += total
                bar.update(n_rows)

            result = correlate_sets(inputs, tokens.tokens, tokens.mask, options, backend, advance)
        finally:
            bar.close()
        n_dead = _store_results(store, run.id, sets, inputs, result, threshold, kind)
        seconds = time.perf_counter() - started
        with store.session() as s:
            s.execute(
                update(CorrelationRun)
                .where(CorrelationRun.id == run.id)
                .values(
                    status="complete",
                    finished_at=utcnow(),
                    seconds=seconds,
                    n_tokens=result.n_tokens,
                    n_passes=result.n_passes,
                    n_dead=n_dead,
                )
            )
    except BaseException as exc:
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        with store.session() as s:
            s.execute(
                update(CorrelationRun)
                .where(CorrelationRun.id == run.id)
                .values(status="failed", error=message[:2000], finished_at=utcnow())
            )
        raise
    log(
        f"run {run.id}: {len(sets)} sets, {result.n_tokens} counted tokens, {result.n_passes} pass(es), "
        f"{n_dead} dead neurons, {seconds:.1f}s on {backend.name}"
    )
    return RunOutcome(run.id, False, seconds, result.n_tokens, result.n_passes, n_dead, backend.name)


def _set_input(session, aset: ActivationSet) -> SetInput:
    model = session.scalar(select(Model).join(Checkpoint).where(Checkpoint.id == aset.checkpoint_id))
    means = np.zeros(model.n_layers * model.d_mlp)
    for layer, neuron, mean in session.execute(
        select(NeuronStat.layer, NeuronStat.neuron, NeuronStat.mean).where(NeuronStat.set_id == aset.id)
    ):
        means[layer * model.d_mlp + neuron] = mean
    return SetInput(aset.id, aset.path, model.n_layers, model.d_mlp, means, rotation_key=model.id)


def _store_results(
    store: Store,
    run_id: int,
    sets: list[ActivationSet],
    inputs: list[SetInput],
    result: CorrelationResult,
    threshold: float,
    kind: str,
) -> int:
    """Bulk-insert neuron_match rows, and universality rows for cross-model runs; returns the dead neurons.

    `self_corr` (a neuron against the same-index neuron of the other set) is kept only between checkpoints of
    one model, where it means something; universality is only defined across models.
    """
    shapes = {s.key: s.d_mlp for s in inputs}
    model_of = {s.key: s.rotation_key for s in inputs}
    matches = []
    for (a, b), m in result.matches.items():
        da, db = shapes[a], shapes[b]
        same_model = m.self_corr is not None and model_of[a] == model_of[b]
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
            matches.append(
                {
                    "run_id": run_id,
                    "set_id": a,
                    "other_set_id": b,
                    "layer": i // da,
                    "neuron": i % da,
                    "max_corr": finite_or_none(m.max_corr[i]),
                    "best_layer": best // db if best >= 0 else None,
                    "best_neuron": best % db if best >= 0 else None,
                    "baseline_max_corr": finite_or_none(m.baseline_max[i]),
                    "topk": topk,
                    "self_corr": finite_or_none(m.self_corr[i]) if same_model else None,
                }
            )
    scores = score_universality(result, threshold) if kind == "cross_model" else {}
    univ = []
    for key, sc in scores.items():
        d = shapes[key]
        for i in range(len(sc.excess_corr)):
            univ.append(
                {
                    "run_id": run_id,
                    "set_id": key,
                    "layer": i // d,
                    "neuron": i % d,
                    "mean_max_corr": finite_or_none(sc.mean_max_corr[i]),
                    "min_max_corr": finite_or_none(sc.min_max_corr[i]),
                    "mean_baseline": finite_or_none(sc.mean_baseline[i]),
                    "excess_corr": finite_or_none(sc.excess_corr[i]),
                    "is_universal": bool(sc.is_universal[i]),
                    "is_dead": bool(sc.is_dead[i]),
                }
            )
    with store.session() as s:
        for table, rows in ((NeuronMatch, matches), (Universality, univ)):
            insert_rows(s, table, rows)
    return int(sum(dead.sum() for dead in result.dead.values()))
