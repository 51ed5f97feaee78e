"""`actdb ablate`: resolve a checkpoint, a neuron selector and a dataset, run the ablation, store the result."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

from sqlalchemy import insert, select

from actdb.compute.ablation import AblationOutcome, LossEvaluator, Neuron, ablate
from actdb.compute.correlation_run import SetRef
from actdb.compute.persistence import latest_universality_run
from actdb.store.database import Store
from actdb.store.errors import ActdbError
from actdb.store.model_loading import load_model, resolve_device
from actdb.store.registry import find_set, get_checkpoint, get_dataset
from actdb.store.schema import Ablation, AblationNeuron, ActivationSet, Dataset, NeuronStat, Universality
from actdb.store.token_file import TokenDataset


def parse_neuron_list(text: str) -> list[Neuron]:
    """`3.1234,11.3030`: L.N items separated by commas, spaces or newlines; `#` starts a comment."""
    out = []
    for line in text.splitlines():
        for item in line.split("#", 1)[0].replace(",", " ").split():
            layer, dot, neuron = item.partition(".")
            if not dot or not layer.isdigit() or not neuron.isdigit():
                raise ActdbError(f"malformed neuron {item!r}; write LAYER.NEURON, e.g. 3.1234")
            out.append((int(layer), int(neuron)))
    return sorted(set(out))


def resolve_selector(
    store: Store, selector: str, set_id: int, control: str, run_id: int | None
) -> tuple[list[Neuron], int | None]:
    """`universal[:LAYER]`, an explicit `L.N,...` list, or `@FILE` holding such a list."""
    if selector.startswith("universal"):
        _, _, layer = selector.partition(":")
        run = run_id or latest_universality_run(store, set_id, control)
        if run is None:
            raise ActdbError("no correlation run has classified this checkpoint; run `actdb correlate` first")
        with store.session() as s:
            q = select(Universality.layer, Universality.neuron).where(
                Universality.run_id == run, Universality.set_id == set_id, Universality.is_universal.is_(True)
            )
            if layer:
                if not layer.isdigit():
                    raise ActdbError(f"malformed selector {selector!r}; write universal or universal:LAYER")
                q = q.where(Universality.layer == int(layer))
            neurons = [(int(a), int(b)) for a, b in s.execute(q)]
        return sorted(neurons), run
    if selector.startswith("@"):
        path = Path(selector[1:])
        try:
            return parse_neuron_list(path.read_text()), None
        except OSError as exc:
            raise ActdbError(f"cannot read neuron file {path}: {exc.strerror or exc}") from None
    return parse_neuron_list(selector), None


def run_ablation(
    store: Store,
    target: str,
    selector: str,
    method: str = "zero",
    dataset: str | None = None,
    n_tokens: int | None = None,
    n_controls: int = 0,
    seed: int = 0,
    each: bool = False,
    control: str = "none",
    run_id: int | None = None,
    batch_size: int = 8,
    device: str = "auto",
    variants_per_pass: int | None = None,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> tuple[int, AblationOutcome]:
    """Ablate neurons of MODEL@STEP on a dataset and record the outcome in the `ablation` table."""
    if method not in ("zero", "mean"):
        raise ActdbError(f"unknown method {method!r}; use zero or mean")
    ref = SetRef.parse(target)
    with store.session() as s:
        ckpt = get_checkpoint(s, ref.model, ref.step)
        if dataset is None:
            names = list(
                s.scalars(
                    select(Dataset.name)
                    .join(ActivationSet)
                    .where(ActivationSet.checkpoint_id == ckpt.id, ActivationSet.status == "complete")
                )
            )
            if len(names) != 1:
                raise ActdbError(f"{target} has complete sets on {len(names)} datasets; pass --dataset")
            dataset = names[0]
        ds = get_dataset(s, dataset)
        aset = find_set(s, ref.model, ref.step, dataset, "mlp.post")
        if aset is None or aset.status != "complete":
            raise ActdbError(f"{target} has no complete activation set on {dataset}; run `actdb ingest` first")
        means = {
            (layer, n): mean
            for layer, n, mean in s.execute(
                select(NeuronStat.layer, NeuronStat.neuron, NeuronStat.mean).where(NeuronStat.set_id == aset.id)
            )
        }
        source, revision, ckpt_id, ds_id, ds_path = ckpt.source, ckpt.revision, ckpt.id, ds.id, ds.path
    neurons, used_run = resolve_selector(store, selector, aset.id, control, run_id)
    if not neurons:
        raise ActdbError(f"selector {selector!r} resolves to no neurons")
    tokens = TokenDataset.load(ds_path)
    n_seq = tokens.n_sequences if n_tokens is None else max(1, min(tokens.n_sequences, -(-n_tokens // tokens.seq_len)))
    torch_device = resolve_device(device)
    if not Path(source).exists() and source.startswith(("/", ".", "~")):
        raise ActdbError(f"the files of {target} are gone: {source} does not exist")
    model = load_model(source, revision, torch_device)
    evaluator = LossEvaluator(model, tokens.tokens[:n_seq], tokens.mask[:n_seq], batch_size, torch_device)
    started = time.perf_counter()
    outcome = ablate(evaluator, neurons, method, means, n_controls, seed, each, variants_per_pass, progress=progress)
    seconds = time.perf_counter() - started
    c_mean, c_std, c_lo, c_hi, p = outcome.control_stats
    with store.session() as s:
        row = Ablation(
            checkpoint_id=ckpt_id,
            dataset_id=ds_id,
            run_id=used_run,
            method=method,
            selector=selector,
            neurons=json.dumps([f"{a}.{b}" for a, b in neurons]),
            n_neurons=len(neurons),
            tokens=evaluator.n_targets,
            seed=seed,
            base_loss=outcome.base_loss,
            ablated_loss=outcome.ablated_loss,
            delta=outcome.delta,
            n_controls=len(outcome.control_deltas),
            control_mean=c_mean,
            control_std=c_std,
            control_ci_low=c_lo,
            control_ci_high=c_hi,
            p_value=p,
            each=each,
            seconds=seconds,
            forward_passes=outcome.forward_passes,
        )
        s.add(row)
        s.flush()
        if outcome.each:
            s.execute(
                insert(AblationNeuron),
                [
                    {
                        "ablation_id": row.id,
                        "layer": lay,
                        "neuron": n,
                        "ablated_loss": loss,
                        "delta": loss - outcome.base_loss,
                    }
                    for (lay, n), loss in outcome.each
                ],
            )
        ablation_id = row.id
    ctrl = ""
    if c_mean is not None:
        ctrl = f"; controls ({len(outcome.control_deltas)}): mean delta {c_mean:+.5f} ± {c_std:.5f}, p = {p:.3f}"
    log(
        f"ablation {ablation_id}: {target} {method}-ablating {len(neurons)} neurons on {evaluator.n_targets} "
        f"tokens: loss {outcome.base_loss:.5f} -> {outcome.ablated_loss:.5f} (delta {outcome.delta:+.5f}){ctrl}"
    )
    return ablation_id, outcome
