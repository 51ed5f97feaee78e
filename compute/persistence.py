"""Persistence of universal neurons across a model's checkpoints: per layer overlap of the universal sets at
consecutive analysed steps, each neuron's self-correlation between them, and its emergence step."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from sqlalchemy import delete, insert, select

from actdb.compute.correlation import CorrelationOptions
from actdb.compute.correlation_run import SetRef, resolve_sets, run_correlation
from actdb.store.database import Store, insert_rows
from actdb.store.errors import ActdbError
from actdb.store.registry import get_dataset, get_model
from actdb.store.schema import (
    ActivationSet,
    Checkpoint,
    CorrelationRun,
    NeuronEmergence,
    NeuronMatch,
    Persistence,
    RunMember,
    Universality,
)


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
    mean_self_corr: float | None


def layer_overlap(u_from: set[int], u_to: set[int]) -> tuple[int, float | None, float | None]:
    """(|U1 ∩ U2|, |U1 ∩ U2| / |U1|, Jaccard); ratios are None when undefined (empty sets)."""
    kept = len(u_from & u_to)
    union = len(u_from | u_to)
    return kept, (kept / len(u_from) if u_from else None), (kept / union if union else None)


def emergence_steps(universal_by_step: list[np.ndarray], steps: list[int]) -> np.ndarray:
    """First analysed step from which each neuron is universal at every later analysed step; -1 if none."""
    flags = np.stack(universal_by_step)  # (n_steps, n_neurons)
    out = np.full(flags.shape[1], -1, dtype=np.int64)
    stays = np.ones(flags.shape[1], dtype=bool)
    for k in range(len(steps) - 1, -1, -1):
        stays &= flags[k]
        out[stays] = steps[k]
    return out


def latest_universality_run(store: Store, set_id: int, control: str) -> int | None:
    """The newest complete cross-model run with this control that classified this set (its universal labels)."""
    with store.session() as s:
        return s.scalar(
            select(CorrelationRun.id)
            .join(RunMember, RunMember.run_id == CorrelationRun.id)
            .where(
                RunMember.set_id == set_id,
                CorrelationRun.status == "complete",
                CorrelationRun.kind == "cross_model",
                CorrelationRun.control == control,
                CorrelationRun.id.in_(select(Universality.run_id).where(Universality.set_id == set_id)),
            )
            .order_by(CorrelationRun.id.desc())
            .limit(1)
        )


def compute_persistence(
    store: Store,
    model: str,
    dataset: str,
    steps: list[int] | None = None,
    control: str = "none",
    device: str = "auto",
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> list[LayerPersistence]:
    """Compute and store persistence rows for consecutive analysed steps of `model` on `dataset`."""
    with store.session() as s:
        m = get_model(s, model)
        ds = get_dataset(s, dataset)
        available = list(
            s.scalars(
                select(Checkpoint.step)
                .join(ActivationSet, ActivationSet.checkpoint_id == Checkpoint.id)
                .where(
                    Checkpoint.model_id == m.id, ActivationSet.dataset_id == ds.id, ActivationSet.status == "complete"
                )
                .order_by(Checkpoint.step)
            )
        )
        model_id, dataset_id, d_mlp, n_layers = m.id, ds.id, m.d_mlp, m.n_layers
    steps = sorted(steps) if steps else available
    if len(steps) < 2:
        raise ActdbError(
            f"persistence needs at least two analysed steps of {model} on {dataset}; found "
            f"{', '.join(map(str, steps)) or 'none'}"
        )
    sets = resolve_sets(store, [SetRef(model, st) for st in steps], dataset)
    runs, flags = [], []
    for st, aset in zip(steps, sets, strict=True):
        run_id = latest_universality_run(store, aset.id, control)
        if run_id is None:
            flag = " --control token" if control == "token" else ""
            raise ActdbError(
                f"no universality for {model}@{st} ({control} control); run `actdb correlate --dataset "
                f"{dataset} --step {st} --models {model},OTHER_MODELS{flag}` first"
            )
        runs.append(run_id)
        with store.session() as s:
            rows = s.execute(
                select(Universality.layer, Universality.neuron, Universality.is_universal).where(
                    Universality.run_id == run_id, Universality.set_id == aset.id
                )
            ).all()
        f = np.zeros(n_layers * d_mlp, dtype=bool)
        for layer, neuron, is_u in rows:
            f[layer * d_mlp + neuron] = is_u
        flags.append(f)
    results, rows = [], []
    for k in range(len(steps) - 1):
        outcome = run_correlation(
            store,
            [sets[k], sets[k + 1]],
            CorrelationOptions(control=control),
            device=device,
            progress=progress,
            log=log,
        )
        with store.session() as s:
            self_corr = np.full(n_layers * d_mlp, np.nan)
            for layer, neuron, sc in s.execute(
                select(NeuronMatch.layer, NeuronMatch.neuron, NeuronMatch.self_corr).where(
                    NeuronMatch.run_id == outcome.run_id, NeuronMatch.set_id == sets[k].id
                )
            ):
                self_corr[layer * d_mlp + neuron] = np.nan if sc is None else sc
        for layer in range(n_layers):
            sl = slice(layer * d_mlp, (layer + 1) * d_mlp)
            u1 = set(np.flatnonzero(flags[k][sl]).tolist())
            u2 = set(np.flatnonzero(flags[k + 1][sl]).tolist())
            kept, p, jac = layer_overlap(u1, u2)
            sc = self_corr[sl]
            mean_sc = float(np.nanmean(sc)) if np.isfinite(sc).any() else None
            lp = LayerPersistence(steps[k], steps[k + 1], layer, len(u1), len(u2), kept, p, jac, mean_sc)
            results.append(lp)
            rows.append(
                {
                    **vars(lp),
                    "model_id": model_id,
                    "dataset_id": dataset_id,
                    "control": control,
                    "from_run_id": runs[k],
                    "to_run_id": runs[k + 1],
                    "self_run_id": outcome.run_id,
                }
            )
    emergence = emergence_steps(flags, steps)
    steps_text = ",".join(map(str, steps))
    with store.session() as s:
        s.execute(
            delete(Persistence).where(
                Persistence.model_id == model_id,
                Persistence.dataset_id == dataset_id,
                Persistence.control == control,
                Persistence.from_step.in_(steps[:-1]),
            )
        )
        s.execute(insert(Persistence), rows)
        s.execute(
            delete(NeuronEmergence).where(
                NeuronEmergence.model_id == model_id,
                NeuronEmergence.dataset_id == dataset_id,
                NeuronEmergence.control == control,
            )
        )
        insert_rows(
            s,
            NeuronEmergence,
            [
                {
                    "model_id": model_id,
                    "dataset_id": dataset_id,
                    "control": control,
                    "layer": i // d_mlp,
                    "neuron": i % d_mlp,
                    "emergence_step": int(e) if e >= 0 else None,
                    "steps": steps_text,
                }
                for i, e in enumerate(emergence)
            ],
        )
    return results
