"""`actdb ablate`: resolve a checkpoint, a neuron selector and a dataset, run the ablation under the run
lifecycle, and record the outcome. An identical request reuses its complete ablation unless `force`.

Neurons chosen as `universal` were selected by a correlation run over every sequence of its dataset, so a loss
measured on those sequences is biased towards them (selection bias). By default the loss is measured on held-out
sequences: those of `eval_dataset` (a dataset of other documents) that are not identical to any sequence of the
selecting dataset; measuring on the selecting sequences is the named option `in_sample`. Which split was used,
its sequences and the ablated positions are stated in the output and stored on the ablation row.

The hook (`mlp.post` or `mlp.pre`, asked for like every read when a checkpoint has sets at both) picks the set
whose labels choose `universal` neurons, and is stored on the row. The edit itself always replaces the MLP
post-activations (the input of the output projection), by zero or by the mean of the checkpoint's `mlp.post` set."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from sqlalchemy import Row, insert, select
from sqlalchemy.orm import Session

from actdb.compute.ablation.loss import POSITIONS, AblationOutcome, LossEvaluator, ablate, check_control_count
from actdb.store.database.connection import Store
from actdb.store.database.labels import latest_universality_run, require_run, universal_neurons_of
from actdb.store.database.lifecycle import release, request_key, running, start_or_wait
from actdb.store.database.registry import complete_set, get_checkpoint, get_dataset, get_model, resolve_hook
from actdb.store.database.schema import Ablation, AblationNeuron, CorrelationRun, Dataset, NeuronStat
from actdb.store.device import resolve_device
from actdb.store.errors import ActdbError
from actdb.store.files.token import TokenDataset
from actdb.store.hook_names import HOOK_NAME, parse_hook
from actdb.store.ingest.model_loading import load_model
from actdb.store.refs import (
    CONTROLS,
    Neuron,
    SetRef,
    check_threshold,
    parse_int,
    parse_neuron_list,
    parse_set_ref,
    parse_token_range,
    read_neuron_file,
)


@dataclass(kw_only=True)
class AblationRequest:
    """Ablate `selector` neurons of `target` (MODEL@STEP): `universal[:LAYER]`, `L.N,...` or `@FILE`."""

    target: str
    selector: str
    method: str = "zero"
    dataset: str | None = None
    hook: str | None = None  # whose sets' labels choose `universal` neurons (default: the checkpoint's only hook)
    eval_dataset: str | None = None  # measure the loss here (default: `dataset`)
    eval_sequences: str | None = None  # START:END sequences of the evaluation dataset (default: all)
    in_sample: bool = False  # measure on the sequences that selected the neurons (selection-biased)
    positions: str = "counted"  # replace activations at counted positions only, or at "all"
    tokens: int | None = None
    controls: int = 0
    seed: int = 0
    each: bool = False
    control: str = "none"
    threshold: float | None = None
    run_id: int | None = None
    batch_size: int = 8
    device: str = "auto"
    variants_per_pass: int | None = None
    force: bool = False
    progress: bool = True


@dataclass
class _Target:
    n_layers: int
    d_mlp: int
    checkpoint_id: int
    dataset_id: int
    set_id: int  # the set at `hook` whose labels choose `universal` neurons
    hook: str
    source: str
    revision: str | None
    dataset_path: str
    tokenizer_fingerprint: str
    means: dict[Neuron, float]


@dataclass
class _Selection:
    neurons: list[Neuron]
    run_id: int | None
    threshold: float | None
    dataset_id: int | None = None  # the dataset whose correlation run chose the neurons


@dataclass
class EvaluationSplit:
    """The sequences the loss is measured on and why: `held_out`, `in_sample` or `listed`."""

    kind: str
    dataset_id: int
    dataset_name: str
    sequences: np.ndarray  # indices into the evaluation dataset
    n_dropped: int  # sequences of the requested range identical to a selecting sequence
    selection_dataset: str | None

    @property
    def ranges(self) -> str:
        """The sequence indices as comma-separated START:END ranges."""
        return _ranges(self.sequences)

    def describe(self, positions: str) -> str:
        where = (
            "activations replaced at counted positions only (BOS/EOS, padding and excluded tokens keep theirs)"
            if positions == "counted"
            else "activations replaced at every position, counted or not (--ablate-positions all)"
        )
        seqs = f"{self.dataset_name} sequences {self.ranges} ({len(self.sequences)})"
        if self.kind == "held_out":
            dropped = f", {self.n_dropped} identical to one of them left out" if self.n_dropped else ""
            return (
                f"measured on held-out sequences: {seqs}, none of them among the sequences of "
                f"{self.selection_dataset} that selected the neurons{dropped}; {where}"
            )
        if self.kind == "in_sample":
            return (
                f"measured IN SAMPLE (--in-sample): {seqs}, the sequences that selected the neurons, so the loss "
                f"is biased towards them; {where}"
            )
        return f"measured on {seqs} (the neurons were listed, not selected from stored data); {where}"


def run_ablation(
    store: Store, req: AblationRequest, log: Callable[[str], None] = print
) -> tuple[int, AblationOutcome | None]:
    """Ablate and record in the `ablation` table; returns its id and the outcome (None when reused)."""
    _validate(req)
    target = _resolve_target(store, req)
    selection = _select(store, req, target.set_id)
    for layer, n in selection.neurons:
        if not (layer < target.n_layers and n < target.d_mlp):
            raise ActdbError(f"neuron {layer}.{n} is out of range ({target.n_layers} layers x {target.d_mlp} neurons)")
    check_control_count(selection.neurons, target.d_mlp, req.controls)  # known now: before any pass or row
    split, tokens = _evaluation_split(store, req, target, selection)
    values = _row_values(req, target, selection, split)
    device = resolve_device(req.device).torch  # a bad device or missing files write no row
    location = store.config.model_location(target.source, req.target)
    while True:
        done = None if req.force else _complete(store, values["request_key"])
        if done is not None:
            log(f"ablation {done} already measured these neurons (complete); --force measures again")
            return done, None
        ablation_id = start_or_wait(store, Ablation, values, log)
        if ablation_id is None:
            continue
        if not req.force and _complete(store, values["request_key"]) is not None:
            release(store, Ablation, ablation_id)  # it completed between our look and our claim
            continue
        break
    with running(store, Ablation, ablation_id) as handle:
        model = load_model(location, target.revision, device)
        evaluator = LossEvaluator(
            model,
            tokens.tokens[split.sequences],
            tokens.mask[split.sequences],
            req.batch_size,
            device,
            positions=req.positions,
        )
        outcome = ablate(
            evaluator,
            selection.neurons,
            req.method,
            target.means,
            n_controls=req.controls,
            seed=req.seed,
            each=req.each,
            variants_per_pass=req.variants_per_pass,
            progress=req.progress,
        )
        _store_each(store, ablation_id, outcome)
        handle.complete(
            tokens=evaluator.n_targets,
            base_loss=outcome.base_loss,
            ablated_loss=outcome.ablated_loss,
            delta=outcome.delta,
            n_controls=len(outcome.control_deltas),
            forward_passes=outcome.forward_passes,
            **_control_columns(outcome),
        )
    log(f"ablation {ablation_id}: {split.describe(req.positions)}")
    chosen_at = (
        "" if target.hook == HOOK_NAME else f" (chosen at {target.hook}; their {HOOK_NAME} activations replaced)"
    )
    log(
        f"ablation {ablation_id}: {req.target} {req.method}-ablating {len(selection.neurons)} neurons{chosen_at} on "
        f"{evaluator.n_targets} tokens: loss {outcome.base_loss:.5f} -> {outcome.ablated_loss:.5f} "
        f"(delta {outcome.delta:+.5f}){_control_summary(outcome)}"
    )
    if outcome.controls is not None and outcome.controls.floor_note():
        log(outcome.controls.floor_note())
    return ablation_id, outcome


def _control_columns(outcome: AblationOutcome) -> dict:
    c = outcome.controls
    if c is None:
        return {}
    return {
        "control_mean": c.mean,
        "control_std": c.sd,
        "control_min": c.min,
        "control_max": c.max,
        "control_ci_low": c.ci_low,
        "control_ci_high": c.ci_high,
        "control_deltas": json.dumps([round(float(x), 8) for x in outcome.control_deltas]),
        "p_value": c.p_value,
    }


def _control_summary(outcome: AblationOutcome) -> str:
    c = outcome.controls
    if c is None:
        return ""
    spread = f" ± {c.sd:.5f} (sd)" if c.sd is not None else ""
    return (
        f"; controls ({c.n}): mean delta {c.mean:+.5f}{spread}, range {c.min:+.5f}..{c.max:+.5f}, "
        f"p = {c.p_value:.3f} (floor {c.p_floor:.3f})"
    )


def _validate(req: AblationRequest) -> None:
    if req.method not in ("zero", "mean"):
        raise ActdbError(f"unknown method {req.method!r}; use zero or mean")
    if req.control not in CONTROLS:
        raise ActdbError(f"unknown control {req.control!r}; use none or token")
    if req.positions not in POSITIONS:
        raise ActdbError(f"unknown positions {req.positions!r}; use counted or all")
    check_threshold(req.threshold)
    if req.controls < 0 or req.batch_size < 1 or (req.tokens is not None and req.tokens < 1):
        raise ActdbError("--controls must be >= 0, --batch-size and --tokens >= 1")
    parse_int(str(req.seed), "--seed", 0, 2**32 - 1)


def _resolve_target(store: Store, req: AblationRequest) -> _Target:
    """The checkpoint, its set at the hook asked for (or its only hook; both present: a one-line error asking for
    --hook) and the neuron means a mean ablation puts in."""
    ref = parse_set_ref(req.target)
    asked = parse_hook(req.hook) if req.hook else None
    with store.session() as s:
        ckpt = get_checkpoint(s, ref.model, ref.step)
    on = ref.dataset or req.dataset
    hook = resolve_hook(store, asked, ref.model, ref.step, on, run=req.run_id) or HOOK_NAME
    with store.session() as s:
        aset = complete_set(s, ref, req.dataset, hook)  # several datasets: an error asking for --dataset
        means = _means(s, ref, aset, hook) if req.method == "mean" else {}
        ds = s.get(Dataset, aset.dataset_id)
        model = get_model(s, ref.model)
        return _Target(
            model.n_layers,
            model.d_mlp,
            ckpt.id,
            aset.dataset_id,
            aset.id,
            hook,
            ckpt.source,
            ckpt.revision,
            ds.path,
            ds.tokenizer_fingerprint,
            means,
        )


def _means(s: Session, ref: SetRef, labels: Row, hook: str) -> dict[Neuron, float]:
    """Each neuron's mean over counted positions in the checkpoint's mlp.post set on the labels' dataset: the
    values a mean ablation puts in place of the post-activations (the labels' own set when it is that set)."""
    if hook == HOOK_NAME:
        edited = labels
    else:
        try:
            edited = complete_set(s, ref, labels.dataset_name, HOOK_NAME)
        except ActdbError as exc:
            raise ActdbError(
                f"--method mean replaces {HOOK_NAME} activations by their mean, which needs the {HOOK_NAME} set: "
                f"{exc}; or use --method zero"
            ) from None
    return {
        (layer, n): mean
        for layer, n, mean in s.execute(
            select(NeuronStat.layer, NeuronStat.neuron, NeuronStat.mean).where(NeuronStat.set_id == edited.id)
        )
    }


def _select(store: Store, req: AblationRequest, set_id: int) -> _Selection:
    """`universal[:LAYER]` (labels at the threshold), an explicit `L.N,...` list, or `@FILE` holding one."""
    selector = req.selector
    if selector.startswith("universal"):
        _, sep, layer = selector.partition(":")
        if selector != "universal" and (not sep or not layer.isdigit()):
            raise ActdbError(f"malformed selector {selector!r}; write universal or universal:LAYER")
        run_id, threshold = _labelling_run(store, req, set_id)
        neurons = universal_neurons_of(store, run_id, set_id, threshold)
        if layer:
            neurons = [n for n in neurons if n[0] == int(layer)]
        selection = _Selection(
            neurons,
            run_id,
            threshold,
            store.scalar(select(CorrelationRun.dataset_id).where(CorrelationRun.id == run_id)),
        )
    elif selector.startswith("@"):
        selection = _Selection(read_neuron_file(selector[1:]), None, None)
    else:
        selection = _Selection(parse_neuron_list(selector), None, None)
    if not selection.neurons:
        at = f" at threshold {selection.threshold}" if selection.threshold is not None else ""
        raise ActdbError(f"selector {selector!r} resolves to no neurons{at}")
    return selection


def _labelling_run(store: Store, req: AblationRequest, set_id: int) -> tuple[int, float]:
    if req.run_id is not None:
        recorded = require_run(store, req.run_id, "cross_model", set_id, req.target)
        found = (req.run_id, recorded)
    else:
        found = latest_universality_run(store, set_id, req.control)
        if found is None:
            raise ActdbError("no correlation run has scored this checkpoint; run `actdb correlate` first")
    run_id, recorded = found
    return run_id, recorded if req.threshold is None else req.threshold


def _evaluation_split(
    store: Store, req: AblationRequest, target: _Target, selection: _Selection
) -> tuple[EvaluationSplit, TokenDataset]:
    """The sequences to measure on: the requested range of the evaluation dataset, less (unless in sample) every
    sequence identical to one of the selecting dataset's; `--tokens` then keeps the first of them."""
    with store.session() as s:
        ds = get_dataset(s, req.eval_dataset) if req.eval_dataset else s.get(Dataset, target.dataset_id)
        if ds.tokenizer_fingerprint != target.tokenizer_fingerprint:
            raise ActdbError(
                f"dataset {ds.name!r} was tokenized with another tokenizer than the one {req.target} was ingested "
                "with; evaluate on a dataset of the same tokenizer"
            )
        chosen_on = s.get(Dataset, selection.dataset_id) if selection.dataset_id is not None else None
        eval_id, eval_name, eval_path = ds.id, ds.name, ds.path
        chosen_name = chosen_on.name if chosen_on is not None else None
        chosen_path = chosen_on.path if chosen_on is not None else None
    tokens = TokenDataset.load(store.config.file(eval_path))
    rows = np.arange(tokens.n_sequences)[parse_token_range(req.eval_sequences, tokens.n_sequences)]
    if chosen_path is None:
        kind, dropped = "listed", 0
    elif req.in_sample:
        kind, dropped = "in_sample", 0
    else:
        kind = "held_out"
        seen = TokenDataset.load(store.config.file(chosen_path)) if chosen_path != eval_path else tokens
        selecting = {_row_hash(r) for r in seen.tokens}
        fresh = np.array([_row_hash(tokens.tokens[i]) not in selecting for i in rows], dtype=bool)
        dropped = int((~fresh).sum())
        rows = rows[fresh]
        if len(rows) == 0:
            raise ActdbError(
                f"the universal neurons were selected on every sequence of {chosen_name}, so none of the requested "
                f"sequences of {eval_name} is held out; measure on another dataset (--eval-dataset, same "
                "tokenizer, other documents) or pass --in-sample for the selection-biased measurement"
            )
    if req.tokens is not None:
        rows = rows[: max(1, -(-req.tokens // tokens.seq_len))]
    split = EvaluationSplit(kind, eval_id, eval_name, rows, dropped, chosen_name)
    return split, tokens


def _row_hash(row: np.ndarray) -> bytes:
    return hashlib.sha256(np.ascontiguousarray(row, dtype=np.int32).tobytes()).digest()


def _ranges(indices: np.ndarray) -> str:
    """Sorted indices as `a:b` ranges (end exclusive), comma-separated."""
    out, start = [], None
    for k, i in enumerate(indices.tolist()):
        if start is None:
            start = prev = i
        elif i != prev + 1:
            out.append(f"{start}:{prev + 1}")
            start = i
        prev = i
        if k == len(indices) - 1:
            out.append(f"{start}:{prev + 1}")
    return ",".join(out)


def _row_values(req: AblationRequest, target: _Target, selection: _Selection, split: EvaluationSplit) -> dict:
    neurons = [f"{a}.{b}" for a, b in selection.neurons]
    key = request_key(
        kind="ablate",
        checkpoint=target.checkpoint_id,
        hook=target.hook,
        dataset=split.dataset_id,
        split=split.kind,
        sequences=split.ranges,
        positions=req.positions,
        method=req.method,
        neurons=neurons,
        controls=req.controls,
        seed=req.seed,
        each=req.each,
    )
    return {
        "request_key": key,
        "checkpoint_id": target.checkpoint_id,
        "dataset_id": split.dataset_id,
        "selection_dataset_id": selection.dataset_id,
        "hook": target.hook,
        "eval_split": split.kind,
        "eval_sequences": split.ranges,
        "n_eval_sequences": len(split.sequences),
        "positions": req.positions,
        "run_id": selection.run_id,
        "method": req.method,
        "selector": req.selector,
        "threshold": selection.threshold,
        "neurons": json.dumps(neurons),
        "n_neurons": len(neurons),
        "tokens": 0,
        "seed": req.seed,
        "n_controls": req.controls,
        "each": req.each,
    }


def _complete(store: Store, key: str) -> int | None:
    return store.scalar(
        select(Ablation.id)
        .where(Ablation.request_key == key, Ablation.status == "complete")
        .order_by(Ablation.id.desc())
        .limit(1)
    )


def _store_each(store: Store, ablation_id: int, outcome: AblationOutcome) -> None:
    if not outcome.each:
        return
    with store.session() as s:
        s.execute(
            insert(AblationNeuron),
            [
                {
                    "ablation_id": ablation_id,
                    "layer": lay,
                    "neuron": n,
                    "ablated_loss": loss,
                    "delta": loss - outcome.base_loss,
                }
                for (lay, n), loss in outcome.each
            ],
        )
