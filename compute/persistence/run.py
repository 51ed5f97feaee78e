"""Persistence of universal neurons across a model's checkpoints: per layer overlap of the universal sets at
consecutive analysed steps, each neuron's self-correlation between them, and its emergence step."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from sqlalchemy import delete, insert, select

from actdb.compute.correlation.engine import CorrelationOptions
from actdb.compute.correlation.run import run_correlation
from actdb.compute.persistence.math import emergence_steps, finite_mean, layer_overlap
from actdb.store.database.connection import Store, insert_rows
from actdb.store.database.labels import latest_universality_run, universal_neurons_of
from actdb.store.database.lifecycle import request_key, running, start_or_wait
from actdb.store.database.registry import get_dataset, get_model, resolve_sets
from actdb.store.database.schema import (
    ActivationSet,
    Checkpoint,
    NeuronEmergence,
    NeuronMatch,
    Persistence,
    PersistenceRun,
)
from actdb.store.errors import ActdbError
from actdb.store.hook_names import HOOK_NAME
from actdb.store.refs import CONTROLS, SetRef, check_threshold


@dataclass(kw_only=True)
class PersistenceRequest:
    """Persistence of `model`'s `hook` sets on `dataset` over `steps` (default: every step ingested at that hook).
    Labels use `threshold`, or the recorded display threshold of the runs involved when they agree."""

    model: str
    dataset: str
    hook: str = HOOK_NAME
    steps: list[int] | None = None
    control: str = "none"
    threshold: float | None = None
    device: str = "auto"
    progress: bool = True


@dataclass
class LayerPersistence:
    from_step: int
    to_step: int
    layer: int
    n_universal_from: int
    n_universal_to: int
    n_kept: int
    p_persist: float | None
    jaccard: float | None
    mean_self_corr: float | None  # mean self-correlation over every neuron of the layer
    mean_self_corr_universal: float | None  # over the neurons universal at from_step only


@dataclass
class PersistenceOutcome:
    """The rows computed, and the threshold that labelled them (the requested one or the runs')."""

    threshold: float
    layers: list[LayerPersistence]


@dataclass
class _Model:
    id: int
    dataset_id: int
    n_layers: int
    d_mlp: int


def compute_persistence(
    store: Store, req: PersistenceRequest, log: Callable[[str], None] = print
) -> PersistenceOutcome:
    """Compute and store persistence rows for consecutive analysed steps of `req.model` on `req.dataset`."""
    if req.control not in CONTROLS:
        raise ActdbError(f"unknown control {req.control!r}; use none or token")
    check_threshold(req.threshold)
    model, steps = _analysed_steps(store, req)
    sets = resolve_sets(store, [SetRef(req.model, st) for st in steps], req.dataset, req.hook)
    runs = [_universality_run(store, req, st, a.id) for st, a in zip(steps, sets, strict=True)]
    threshold = _threshold(req, steps, runs)
    values = {
        "request_key": request_key(
            kind="persistence",
            model=model.id,
            dataset=model.dataset_id,
            hook=req.hook,
            control=req.control,
            threshold=threshold,
            steps=steps,
            runs=[r for r, _t in runs],
        ),
        "model_id": model.id,
        "dataset_id": model.dataset_id,
        "hook": req.hook,
        "control": req.control,
        "threshold": threshold,
        "steps": ",".join(map(str, steps)),
    }
    while (run_id := start_or_wait(store, PersistenceRun, values, log)) is None:
        pass  # an identical request finished meanwhile; recomputing it reuses its correlation runs and is cheap
    with running(store, PersistenceRun, run_id) as handle:
        flags = [_flags(store, run, a.id, threshold, model) for (run, _t), a in zip(runs, sets, strict=True)]
        results, rows = [], []
        for k in range(len(steps) - 1):
            self_run, self_corr = _self_correlation(store, sets[k], sets[k + 1], req, model, log)
            for lp in _layer_rows(steps[k], steps[k + 1], flags[k], flags[k + 1], self_corr, model):
                results.append(lp)
                rows.append(
                    {
                        **vars(lp),
                        "model_id": model.id,
                        "dataset_id": model.dataset_id,
                        "hook": req.hook,
                        "control": req.control,
                        "threshold": threshold,
                        "from_run_id": runs[k][0],
                        "to_run_id": runs[k + 1][0],
                        "self_run_id": self_run,
                    }
                )
        _store(store, model, req.hook, req.control, threshold, steps, rows, emergence_steps(flags, steps))
        handle.complete()
    return PersistenceOutcome(threshold, results)


def _analysed_steps(store: Store, req: PersistenceRequest) -> tuple[_Model, list[int]]:
    with store.session() as s:
        m = get_model(s, req.model)
        ds = get_dataset(s, req.dataset)
        available = list(
            s.scalars(
                select(Checkpoint.step)
                .join(ActivationSet, ActivationSet.checkpoint_id == Checkpoint.id)
                .where(
                    Checkpoint.model_id == m.id,
                    ActivationSet.dataset_id == ds.id,
                    ActivationSet.hook == req.hook,
                    ActivationSet.status == "complete",
                )
                .order_by(Checkpoint.step)
            )
        )
        model = _Model(m.id, ds.id, m.n_layers, m.d_mlp)
    steps = sorted(req.steps) if req.steps else available
    if len(steps) < 2:
        raise ActdbError(
            f"persistence needs at least two analysed steps of {req.model} on {req.dataset} (hook {req.hook}); found "
            f"{', '.join(map(str, steps)) or 'none'}"
        )
    return model, steps


def _universality_run(store: Store, req: PersistenceRequest, step: int, set_id: int) -> tuple[int, float]:
    found = latest_universality_run(store, set_id, req.control)
    if found is None:
        flag = (" --control token" if req.control == "token" else "") + (
            f" --hook {req.hook}" if req.hook != HOOK_NAME else ""
        )
        raise ActdbError(
            f"no universality for {req.model}@{step} ({req.control} control); run `actdb correlate --dataset "
            f"{req.dataset} --step {step} --models {req.model},OTHER_MODELS{flag}` first"
        )
    return found


def _threshold(req: PersistenceRequest, steps: list[int], runs: list[tuple[int, float]]) -> float:
    """The requested threshold, or the runs' recorded one when they all agree."""
    if req.threshold is not None:
        return req.threshold
    recorded = sorted({t for _r, t in runs})
    if len(recorded) > 1:
        detail = ", ".join(f"{st}: {t}" for st, (_r, t) in zip(steps, runs, strict=True))
        raise ActdbError(
            f"the runs of these steps were recorded with different thresholds ({detail}); pass --threshold"
        )
    return recorded[0]


def _flags(store: Store, run_id: int, set_id: int, threshold: float, model: _Model) -> np.ndarray:
    flags = np.zeros(model.n_layers * model.d_mlp, dtype=bool)
    for layer, neuron in universal_neurons_of(store, run_id, set_id, threshold):
        flags[layer * model.d_mlp + neuron] = True
    return flags


def _self_correlation(
    store: Store,
    a: ActivationSet,
    b: ActivationSet,
    req: PersistenceRequest,
    model: _Model,
    log: Callable[[str], None],
) -> tuple[int, np.ndarray]:
    """Each neuron's correlation with itself between two checkpoints (a within-model correlation run)."""
    outcome = run_correlation(
        store,
        [a, b],
        CorrelationOptions(control=req.control, baseline_draws=1),
        device=req.device,
        progress=req.progress,
        log=log,
    )
    self_corr = np.full(model.n_layers * model.d_mlp, np.nan)
    with store.session() as s:
        for layer, neuron, sc in s.execute(
            select(NeuronMatch.layer, NeuronMatch.neuron, NeuronMatch.self_corr).where(
                NeuronMatch.run_id == outcome.run_id, NeuronMatch.set_id == a.id
            )
        ):
            self_corr[layer * model.d_mlp + neuron] = np.nan if sc is None else sc
    return outcome.run_id, self_corr


def _layer_rows(
    from_step: int, to_step: int, u1: np.ndarray, u2: np.ndarray, self_corr: np.ndarray, model: _Model
) -> list[LayerPersistence]:
    out = []
    d = model.d_mlp
    for layer in range(model.n_layers):
        sl = slice(layer * d, (layer + 1) * d)
        a, b = set(np.flatnonzero(u1[sl]).tolist()), set(np.flatnonzero(u2[sl]).tolist())
        kept, p, jac = layer_overlap(a, b)
        out.append(
            LayerPersistence(
                from_step,
                to_step,
                layer,
                len(a),
                len(b),
                kept,
                p,
                jac,
                finite_mean(self_corr[sl]),
                finite_mean(self_corr[sl][u1[sl]]),
            )
        )
    return out


def _store(
    store: Store,
    model: _Model,
    hook: str,
    control: str,
    threshold: float,
    steps: list[int],
    rows: list[dict],
    emergence: np.ndarray,
) -> None:
    """Replace this (model, dataset, hook, control, threshold)'s rows for these steps, and its emergence steps."""
    key = {
        "model_id": model.id,
        "dataset_id": model.dataset_id,
        "hook": hook,
        "control": control,
        "threshold": threshold,
    }
    steps_text = ",".join(map(str, steps))
    with store.session() as s:
        s.execute(
            delete(Persistence).where(
                *(getattr(Persistence, k) == v for k, v in key.items()), Persistence.from_step.in_(steps[:-1])
            )
        )
        s.execute(insert(Persistence), rows)
        s.execute(delete(NeuronEmergence).where(*(getattr(NeuronEmergence, k) == v for k, v in key.items())))
        insert_rows(
            s,
            NeuronEmergence,
            [
                {
                    **key,
                    "layer": i // model.d_mlp,
                    "neuron": i % model.d_mlp,
                    "emergence_step": int(e) if e >= 0 else None,
                    "steps": steps_text,
                }
                for i, e in enumerate(emergence)
            ],
        )
