"""`actdb trajectories`: every (seed, step) checkpoint against every other from stored predictions (win rate,
Bradley-Terry strength, non-transitive triples, top-1 disagreement, ensemble gain) and from the weights (cosines,
within a seed of θ − θ₀), plus a 2-D map of a chosen distance; stored as one `trajectory_run` with long-format
rows. Every input is checked before anything is written."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from itertools import combinations

import numpy as np
from sqlalchemy import func, insert, select

from actdb.compute.trajectories import math as tm
from actdb.compute.trajectories.weights import WeightFiles, checkpoint_folder, parameter_blocks
from actdb.store.database.connection import Store
from actdb.store.database.lifecycle import request_key, running, start_or_wait
from actdb.store.database.registry import checkpoints_dataset, get_checkpoint, get_dataset
from actdb.store.database.schema import (
    CorrelationRun,
    PredictionSet,
    TrajectoryPoint,
    TrajectoryRun,
    TrajectoryValue,
)
from actdb.store.database.views import v_similarity
from actdb.store.errors import ActdbError
from actdb.store.files.identity import SidecarIdentity
from actdb.store.files.prediction import read_predictions, verify_predictions
from actdb.store.files.token import TokenDataset
from actdb.store.ingest.model_loading import load_config
from actdb.store.refs import SetRef
from actdb.store.set_files import sidecar_identity

DISTANCES = ("disagreement", "jsd", "cka")  # 1 − top-1 agreement, mean Jensen-Shannon divergence, 1 − linear CKA
EMBEDDINGS = ("mds", "tsne")
DEFAULT_EXACT_TOKENS = 4096


@dataclass(kw_only=True)
class TrajectoryRequest:
    sets: list[SetRef]
    dataset: str | None = None
    eps: float = 0.0  # loss margin under which a target is a tie
    distance: str = "disagreement"
    embedding: str = "mds"
    seed: int = 0  # t-SNE's seed
    weights: bool = True
    exact_tokens: int | None = None  # with distance `jsd`: tokens the two models run side by side on
    reference: SetRef | None = None  # Fort's reference for the disagreement plane (default: the most accurate)
    device: str = "auto"
    force: bool = False


@dataclass
class _Inputs:
    dataset_id: int
    dataset: str
    tokens_path: str
    checkpoint_ids: list[int]
    prediction_paths: list[str]
    prediction_identities: list[SidecarIdentity]  # what each predictions file must say it is
    sources: dict[SetRef, tuple[str, str | None]]


def compute_trajectories(store: Store, req: TrajectoryRequest, log: Callable[[str], None] = print) -> int:
    """Check the request, compute every measure and store them as one run; returns the run's id (an identical
    complete run is reused unless `force`)."""
    inputs = _check(store, req)
    exact = (req.exact_tokens or DEFAULT_EXACT_TOKENS) if req.distance == "jsd" else None
    key = request_key(
        kind="trajectories",
        checkpoints=inputs.checkpoint_ids,
        dataset=inputs.dataset_id,
        eps=req.eps,
        distance=req.distance,
        embedding=req.embedding,
        seed=req.seed if req.embedding == "tsne" else None,
        weights=req.weights,
        exact_tokens=exact,
        reference=str(req.reference) if req.reference else None,
    )
    done = store.scalar(
        select(func.max(TrajectoryRun.id)).where(TrajectoryRun.request_key == key, TrajectoryRun.status == "complete")
    )
    if done is not None and not req.force:
        log(f"trajectory run {done} already holds this request (use --force to recompute)")
        return done
    values = {
        "request_key": key,
        "dataset_id": inputs.dataset_id,
        "sets": ",".join(str(r) for r in req.sets),
        "eps": req.eps,
        "distance": req.distance,
        "embedding": req.embedding,
        "seed": req.seed,
        "exact_tokens": exact,
        "weights": req.weights,
    }
    while (run_id := start_or_wait(store, TrajectoryRun, values, log)) is None:
        done = store.scalar(
            select(func.max(TrajectoryRun.id)).where(
                TrajectoryRun.request_key == key, TrajectoryRun.status == "complete"
            )
        )
        if done is not None:
            return done
    with running(store, TrajectoryRun, run_id) as handle:
        result = _compute(store, req, inputs, exact, log)
        _write(store, run_id, inputs, result)
        handle.complete(
            n_checkpoints=len(req.sets),
            n_targets=int(result["pairs"].count.min()),
            n_triples=len(req.sets) * (len(req.sets) - 1) * (len(req.sets) - 2) // 6,
            n_nontransitive=result["nontransitive"],
            map_stress=result["stress"],
            reference_checkpoint_id=inputs.checkpoint_ids[result["reference"]],
        )
    log(
        f"trajectory run {run_id}: {len(req.sets)} checkpoints, {len(req.sets) ** 2} ordered pairs on at least "
        f"{int(result['pairs'].count.min()):,} targets each"
    )
    return run_id


def _check(store: Store, req: TrajectoryRequest) -> _Inputs:
    """One-line errors for every bad input, before any row is written."""
    if req.distance not in DISTANCES:
        raise ActdbError(f"unknown distance {req.distance!r}; use {', '.join(DISTANCES)}")
    if req.embedding not in EMBEDDINGS:
        raise ActdbError(f"unknown embedding {req.embedding!r}; use {', '.join(EMBEDDINGS)}")
    if len(set(req.sets)) != len(req.sets):
        raise ActdbError("a checkpoint is listed twice; list each once")
    if len(req.sets) < 2:
        raise ActdbError(f"trajectories compare checkpoints with each other; got only {len(req.sets)}")
    if req.embedding == "tsne" and len(req.sets) < 3:
        raise ActdbError("a t-SNE map needs at least three checkpoints; use --map mds")
    if req.reference is not None and req.reference not in req.sets:
        raise ActdbError(f"the reference {req.reference} is not one of the checkpoints compared")
    if req.eps < 0 or not np.isfinite(req.eps):
        raise ActdbError("--eps must be a finite number >= 0")
    dataset = req.dataset or checkpoints_dataset(store, req.sets)
    ids, paths, identities, missing, sources = [], [], [], [], {}
    with store.session() as s:
        ds = get_dataset(s, dataset)
        for ref in req.sets:
            ckpt = get_checkpoint(s, ref.model, ref.step)
            ids.append(ckpt.id)
            sources[ref] = (store.config.model_location(ckpt.source, str(ref)), ckpt.revision)
            path = s.scalar(
                select(PredictionSet.path).where(
                    PredictionSet.checkpoint_id == ckpt.id,
                    PredictionSet.dataset_id == ds.id,
                    PredictionSet.status == "complete",
                )
            )
            if path is None or not store.config.file(path).exists():
                missing.append(str(ref))
            paths.append(path)
            identities.append(sidecar_identity(s, ckpt.id, ds.id))
        inputs = _Inputs(ds.id, ds.name, ds.path, ids, paths, identities, sources)
    if missing:
        raise ActdbError(
            f"no stored predictions on {dataset} for {', '.join(missing)}; make them with "
            f"`actdb predictions {' '.join(missing)} --dataset {dataset}`"
        )
    for path, identity in zip(paths, identities, strict=True):
        verify_predictions(store.config.file(path), identity)  # another checkpoint's file: refused before any row
    vocab = {ref: getattr(load_config(*sources[ref]), "vocab_size", None) for ref in req.sets}
    if len(set(vocab.values())) > 1:
        sizes = ", ".join(f"{ref} {n}" for ref, n in vocab.items())
        raise ActdbError(f"the checkpoints have different vocabularies ({sizes}); their top-1 ids do not compare")
    if req.distance == "cka":
        _cka_distance(store, req.sets, dataset)  # fails now when no run covers them
    return inputs


def _compute(
    store: Store, req: TrajectoryRequest, inputs: _Inputs, exact: int | None, log: Callable[[str], None]
) -> dict:
    k = len(req.sets)
    preds = [
        read_predictions(store.config.file(p), identity)
        for p, identity in zip(inputs.prediction_paths, inputs.prediction_identities, strict=True)
    ]
    sizes = {p.loss.size for p in preds}
    if len(sizes) != 1:
        raise ActdbError("the prediction files cover different numbers of positions; recompute them with --force")
    losses = np.stack([p.loss for p in preds])
    top1 = np.stack([p.top1 for p in preds])
    del preds
    tokens = TokenDataset.load(store.config.file(inputs.tokens_path))
    targets = np.full(tokens.tokens.shape, -1, np.int64)
    targets[:, :-1] = tokens.tokens[:, 1:]  # position p predicts the token at p + 1
    targets = targets.reshape(-1)
    counted = np.isfinite(losses)
    n_targets = counted.sum(axis=1)
    accuracy = ((top1 == targets) & counted).sum(axis=1) / np.maximum(n_targets, 1)
    mean_loss = np.nanmean(losses, axis=1)
    pairs = tm.pair_matrices(losses, top1, eps=req.eps)
    del losses, top1
    win = pairs.win_rate
    strength = tm.bradley_terry(pairs.wins2 / 2.0, pairs.count)
    reference = req.sets.index(req.reference) if req.reference else int(np.argmax(accuracy))
    matrices = {
        "win_rate": win,
        "disagreement": pairs.disagreement,
        "ensemble_gain": pairs.ensemble_gain,
    }
    if req.weights:
        cos, delta_cos = _weight_cosines(req.sets, inputs.sources)
        matrices["weight_cosine"] = cos
        matrices["weight_delta_cosine"] = delta_cos
    dist = _distance(store, req, inputs, pairs, exact, log)
    matrices["distance"] = dist
    if req.embedding == "mds":
        points, stress = tm.metric_mds(dist)
    else:
        points, stress = tm.tsne(dist, seed=req.seed), None
    return {
        "matrices": matrices,
        "pairs": pairs,
        "nontransitive": tm.nontransitive_triples(win),
        "strength": strength,
        "accuracy": accuracy,
        "mean_loss": mean_loss,
        "n_targets": n_targets,
        "points": points,
        "stress": stress,
        "reference": reference,
        "k": k,
    }


def _weight_cosines(sets: list[SetRef], sources: dict) -> tuple[np.ndarray, np.ndarray]:
    """Cosine of flattened parameters for every pair, and within each seed cos(θᵢ − θ₀, θⱼ − θ₀) with θ₀ its
    earliest compared step (NaN across seeds, where independent initialisations make it ≈ 0 by construction, and
    on θ₀ itself)."""
    files = [WeightFiles(checkpoint_folder(*sources[ref]), str(ref)) for ref in sets]
    try:
        groups = []
        for model in dict.fromkeys(r.model for r in sets):
            rows = sorted((i for i, r in enumerate(sets) if r.model == model), key=lambda i: sets[i].step)
            if len(rows) >= 2:
                groups.append(rows)
        gram, deltas = tm.weight_grams(parameter_blocks(files), len(sets), groups)
    finally:
        for f in files:
            f.close()
    delta_cos = np.full((len(sets), len(sets)), np.nan)
    for rows, dg in zip(groups, deltas, strict=True):
        inner = tm.cosines(dg)
        for a, i in enumerate(rows[1:]):
            for b, j in enumerate(rows[1:]):
                delta_cos[i, j] = inner[a, b]
    return tm.cosines(gram), delta_cos


def _distance(
    store: Store, req: TrajectoryRequest, inputs: _Inputs, pairs: tm.PairMatrices, exact: int | None, log: Callable
) -> np.ndarray:
    if req.distance == "disagreement":
        dist = pairs.disagreement.copy()
    elif req.distance == "cka":
        dist = _cka_distance(store, req.sets, inputs.dataset)
    else:
        from actdb.compute.similarity.function import FunctionRequest, exact_divergences

        fr = FunctionRequest(sets=req.sets, dataset=inputs.dataset, exact_tokens=exact, device=req.device)
        tokens = TokenDataset.load(store.config.file(inputs.tokens_path))
        js = exact_divergences(fr, tokens, inputs.sources, log)
        dist = np.array([[js[(a.model, a.step, b.model, b.step)] for b in req.sets] for a in req.sets])
    dist = (dist + dist.T) / 2  # symmetric by definition; averaging removes rounding differences
    np.fill_diagonal(dist, 0.0)
    return np.clip(dist, 0.0, None)


def _cka_distance(store: Store, sets: list[SetRef], dataset: str) -> np.ndarray:
    """1 − linear CKA averaged over same-index layers, from the newest complete similarity run holding every
    pair of these checkpoints."""
    sim = v_similarity
    runs = store.query(
        select(CorrelationRun.id)
        .where(CorrelationRun.kind == "similarity", CorrelationRun.status == "complete")
        .order_by(CorrelationRun.id.desc())
    )
    for run in runs:
        rows = store.query(
            select(sim.c.model, sim.c.step, sim.c.other_model, sim.c.other_step, func.avg(sim.c.cka).label("cka"))
            .where(sim.c.run_id == run["id"], sim.c.layer == sim.c.other_layer, sim.c.dataset == dataset)
            .group_by(sim.c.model, sim.c.step, sim.c.other_model, sim.c.other_step)
        )
        got = {(r["model"], r["step"], r["other_model"], r["other_step"]): r["cka"] for r in rows}
        if all((a.model, a.step, b.model, b.step) in got for a in sets for b in sets):
            return np.array([[1.0 - got[(a.model, a.step, b.model, b.step)] for b in sets] for a in sets])
    listed = ",".join(str(r) for r in sets)
    raise ActdbError(
        f"no similarity run on {dataset} holds every pair of these checkpoints; run "
        f"`actdb similarity --sets {listed} --dataset {dataset}` first, or use --distance disagreement"
    )


def _write(store: Store, run_id: int, inputs: _Inputs, result: dict) -> None:
    ids = inputs.checkpoint_ids
    count = result["pairs"].count
    rows = []
    for metric, matrix in result["matrices"].items():
        weights = metric.startswith("weight")
        for i, j in ((i, j) for i in range(len(ids)) for j in range(len(ids))):
            value = float(matrix[i, j])
            if np.isnan(value):
                continue  # undefined pairs (θ − θ₀ across seeds or at θ₀) are left out, not stored as numbers
            rows.append(
                {
                    "run_id": run_id,
                    "checkpoint_id": ids[i],
                    "other_checkpoint_id": ids[j],
                    "metric": metric,
                    "value": value,
                    "n_targets": None if weights else int(count[i, j]),
                }
            )
    points = [
        {
            "run_id": run_id,
            "checkpoint_id": ids[i],
            "n_targets": int(result["n_targets"][i]),
            "top1_accuracy": float(result["accuracy"][i]),
            "mean_loss": float(result["mean_loss"][i]),
            "bt_strength": float(result["strength"][i]),
            "map_x": float(result["points"][i, 0]),
            "map_y": float(result["points"][i, 1]),
        }
        for i in range(len(ids))
    ]
    with store.session() as s:
        s.execute(insert(TrajectoryValue), rows)
        s.execute(insert(TrajectoryPoint), points)


def pair_kinds(refs: list[SetRef]) -> dict[str, list[tuple[int, int]]]:
    """Unordered index pairs by Fort's comparison: snapshots of one run ("same seed, other step") against
    independently trained runs at one step ("other seed, same step")."""
    kinds: dict[str, list[tuple[int, int]]] = {"same seed, other step": [], "other seed, same step": []}
    for i, j in combinations(range(len(refs)), 2):
        a, b = refs[i], refs[j]
        if a.model == b.model:
            kinds["same seed, other step"].append((i, j))
        elif a.step == b.step:
            kinds["other seed, same step"].append((i, j))
    return kinds
