"""`actdb demo`: the whole universal-neurons study on a local zoo of tiny GPT-2 seeds, end to end.

zoo (train or reuse) -> dataset -> ingest every seed x step (with examples and explanations) -> correlate each step
(rotation baseline, and the token control), the last again on a local Dask cluster -> persistence -> families of
universal neurons -> ablation of universal neurons against matched random controls -> similarity of every
(seed, step) pair, by representation and by function -> concepts -> interventional robustness across seeds ->
summary tables -> HTML report. Every stage is idempotent,
so an interrupted demo continues where it stopped.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from sqlalchemy import select

from actdb.compute.ablation.run import AblationRequest, run_ablation
from actdb.compute.correlation.engine import CorrelationOptions
from actdb.compute.correlation.run import (
    CorrelationRequest,
    complete_run,
    correlate,
    correlation_key,
    engine_inputs,
)
from actdb.compute.explain.run import ingest_and_explain
from actdb.compute.persistence.run import PersistenceRequest, compute_persistence
from actdb.compute.similarity.function import FunctionRequest, function_similarity
from actdb.compute.similarity.predictions import PredictionRequest, compute_predictions
from actdb.compute.trajectories.run import TrajectoryRequest, compute_trajectories
from actdb.query import queries
from actdb.query.explanations import families, neuron_explanation
from actdb.query.output import render
from actdb.query.report import build_report
from actdb.query.serve.launch import browse_command
from actdb.query.trajectory_tables import kind_comparison, long_rows, run_summary, wide_table
from actdb.store.database.connection import Rows, Store
from actdb.store.database.registry import resolve_sets
from actdb.store.database.schema import Dataset, NeuronMatch
from actdb.store.errors import ActdbError
from actdb.store.hook_names import HOOK_NAME
from actdb.store.ingest.dataset_registry import add_dataset
from actdb.store.ingest.pipeline import IngestRequest
from actdb.store.ingest.zoo import checkpoint_dir, stdlib_files, train_zoo, zoo_config, zoo_provenance
from actdb.store.refs import SetRef

DATASET = "stdlib-heldout"
EVAL_DATASET = "stdlib-packages"  # the ablation's held-out sequences: files the zoo and DATASET never saw
STAGES = 12
CONCEPTS = "python-constructs"
ROBUSTNESS_CONTEXTS = 8  # held-out sequences per robustness run: the stage stays a few seconds per step


@dataclass(kw_only=True)
class DemoRequest:
    """The demo's zoo and study. The default threshold is 0.2, not the paper's 0.5: a tiny model's MLP reads a
    128-dimensional residual stream, so its rotation baseline is ~0.4 (GPT-2 small: ~0.17) and excess
    correlations are smaller. The summary also reports the share above 0.5, so the difference stays visible."""

    seeds: int = 4
    checkpoints: tuple[int, ...] = (0, 50, 200, 800)
    tokens: int = 24576
    controls: int = 19
    threshold: float = 0.2
    zoo: Path | None = None
    report_dir: Path | None = None
    progress: bool = True


def run_demo(store: Store, req: DemoRequest, echo: Callable[[str], None] = print) -> Path:
    """Run every stage; returns the report's path. Prints what the data shows, nothing it did not measure."""
    started = time.perf_counter()
    zoo = Path(req.zoo or store.config.home / "zoo")
    steps = sorted(req.checkpoints)
    config = zoo_config(req.seeds, max(steps), steps)
    stage = _stages(echo)
    stage(f"zoo: {req.seeds} tiny GPT-2 seeds trained on Python standard-library source ({zoo})")
    tok_dir = train_zoo(zoo, config, progress=req.progress)
    echo(f"  {zoo_provenance(zoo, config)}")
    stage("dataset: held-out standard-library files (BOS/EOS, padding and the newline token do not count)")
    with store.session() as s:
        have = s.scalar(select(Dataset).where(Dataset.name == DATASET))
    if have is None:
        held_out = [str(p) for p in stdlib_files()[config["train_files"] :]]
        ds = add_dataset(
            store,
            name=DATASET,
            exclude_tokens="gurnee",
            sources=held_out,
            tokenizer=str(tok_dir),
            seq_len=config["seq_len"],
            n_tokens=req.tokens,
            seed=0,
        )
        echo(f"  {ds.n_sequences} sequences x {ds.seq_len} tokens ({ds.n_counted} counted)")
        # the zoo trains on, and DATASET reads, top-level modules only: subpackages' files are other documents
        packages = sorted(
            str(p)
            for p in stdlib_files()[0].parent.glob("*/*.py")
            if "test" not in p.parent.name and not p.parent.name.endswith("-packages")
        )
        add_dataset(
            store,
            name=EVAL_DATASET,
            exclude_tokens="gurnee",
            sources=packages,
            tokenizer=str(tok_dir),
            seq_len=config["seq_len"],
            n_tokens=8192,
            seed=0,
            log=lambda _m: None,
        )
    indent = lambda m: echo("  " + m)  # noqa: E731
    stage(f"ingest: {req.seeds} seeds x {len(steps)} steps")
    models = [f"seed{k}" for k in range(req.seeds)]
    for k, model in enumerate(models):
        source = str(checkpoint_dir(zoo, k, 0).parent / "step-{step}")
        for step in steps:
            # the last step is explained while it is ingested (examples streamed); earlier ones stay to
            # `actdb examples`, which the report names on their neurons' pages
            request = IngestRequest(
                model=model,
                step=step,
                dataset=DATASET,
                source=source,
                batch_size=16,
                top_k=32 if step == steps[-1] else 0,
                progress=False,
            )
            ingest_and_explain(store, request, log=lambda m: indent(m) if "explained" not in m else None)
    stage("correlate: every step, rotation baseline and token control")
    for step in steps:
        for control in ("none", "token"):
            request = CorrelationRequest(
                sets=[SetRef(m, step) for m in models],
                dataset=DATASET,
                control=control,
                threshold=req.threshold,
                progress=req.progress,
            )
            correlate(store, request, log=indent)
    stage(f"cluster: step {steps[-1]} again on a local Dask cluster of 2 worker processes, against the stored run")
    _cluster(store, models, steps[-1], indent)
    stage("persistence: consecutive steps of every seed")
    for model in models:
        compute_persistence(
            store,
            PersistenceRequest(model=model, dataset=DATASET, steps=steps, threshold=req.threshold, progress=False),
            log=lambda _m: None,
        )
    stage(f"explain: what the universal neurons of seed0@{steps[-1]} do (examples, tokens, vocabulary, families)")
    _explain(store, "seed0", steps[-1], req.threshold, echo)
    stage(f"ablation: universal neurons of seed0@{steps[-1]} against {req.controls} matched random sets")
    _ablate(store, f"seed0@{steps[-1]}", req, indent)
    compared = sorted({steps[0], steps[-2], steps[-1]})  # untrained, late and last: the contrasts the summary shows
    stage(
        f"similarity: all {len(models) * len(compared)} sets of steps {compared} in one pass, their predictions, "
        "and every checkpoint against every other (trajectories)"
    )
    _similarity(store, models, compared, req, indent)
    stage(f"concepts: expert neurons for Python constructs (held-out source), {len(models)} seeds x {len(steps)} steps")
    _concepts(store, models, steps, config["train_files"], indent)
    stage(
        f"robustness: do the {len(models)} seeds respond alike? universal neurons vs {req.controls} matched random "
        f"sets, and a same-frequency token replacement, at steps {steps}"
    )
    robustness_seconds = _robustness(store, models, steps, req, indent)
    stage("report")
    concepts = _concept_tables(store)  # the report's section and the printed summary show the same tables
    report_dir = req.report_dir or store.config.home / "report"
    report = build_report(store, report_dir, threshold=req.threshold, concept_tables=concepts)
    _summary(store, req.threshold, echo)
    _similarity_summary(store, models, compared, echo)
    _concept_summary(concepts[CONCEPTS], echo)
    _robustness_summary(store, robustness_seconds, echo)
    echo(f"\nreport: {report}\n(demo took {time.perf_counter() - started:.0f}s)")
    echo(f"browse it: {browse_command(store.config)}")
    return report


def _stages(echo: Callable[[str], None]) -> Callable[[str], None]:
    counter = [0]
    started = time.perf_counter()

    def stage(text: str) -> None:
        counter[0] += 1
        echo(f"[{counter[0]}/{STAGES} +{time.perf_counter() - started:.0f}s] {text}")

    return stage


def _cluster(store: Store, models: list[str], step: int, echo: Callable[[str], None]) -> None:
    """The step's correlation (default options) computed again by Dask tasks, compared with the stored run."""
    from actdb.compute.cluster import ClusterSpec, open_client
    from actdb.compute.correlation.cluster import correlate_one_pass

    sets = resolve_sets(store, [SetRef(m, step) for m in models], DATASET)
    options = CorrelationOptions()
    run = complete_run(store, correlation_key([a.id for a in sets], options))
    inputs, tokens = engine_inputs(store, sets)
    started = time.perf_counter()
    with open_client(ClusterSpec(workers=2)) as client:
        result = correlate_one_pass(client, inputs, tokens.tokens, tokens.mask, options)
    seconds = time.perf_counter() - started
    d = {s.key: s.d_mlp for s in inputs}
    m = NeuronMatch.__table__.c
    with store.session() as s:
        rows = s.execute(select(m.set_id, m.other_set_id, m.layer, m.neuron, m.max_corr).where(m.run_id == run.id))
        stored = [
            (r.max_corr, result.matches[(r.set_id, r.other_set_id)].max_corr[r.layer * d[r.set_id] + r.neuron])
            for r in rows
            if r.max_corr is not None
        ]
    diff = max(abs(a - b) for a, b in stored)
    echo(
        f"{len(stored):,} neurons' best matches in {seconds:.1f}s (with the cluster's start-up); max |delta max-corr| "
        f"against run {run.id}: {diff:.1e} (its float32 chunk products ran on two BLAS threads, the workers' on one)"
    )


def _similarity(store: Store, models: list[str], steps: list[int], req: DemoRequest, echo: Callable) -> None:
    """One correlation pass over every (seed, step) set for the layer similarities (one baseline draw keeps the
    demo inside its time), and each checkpoint's predictions for the function side."""
    refs = [SetRef(m, st) for m in models for st in steps]
    request = CorrelationRequest(sets=refs, dataset=DATASET, similarity=True, baseline_draws=1, progress=req.progress)
    correlate(store, request, log=echo)
    for ref in refs:
        compute_predictions(
            store, PredictionRequest(target=str(ref), dataset=DATASET, progress=False), log=lambda _m: None
        )
    compute_trajectories(store, TrajectoryRequest(sets=refs, dataset=DATASET), log=echo)


def _concepts(store: Store, models: list[str], steps: list[int], train_files: int, echo: Callable) -> None:
    """Write the Python-constructs concepts file from the held-out files, store it, score every seed x step."""
    from actdb.compute.concepts.python_concepts import write_python_concepts
    from actdb.compute.concepts.run import ConceptRequest, add_concept_set, run_concepts

    path = write_python_concepts(stdlib_files()[train_files:], store.config.home / f"{CONCEPTS}.jsonl")
    _id, concepts, _created = add_concept_set(store, CONCEPTS, path)
    echo(f"{len(concepts.concepts)} concepts ({', '.join(concepts.names)}), {path}")
    request = ConceptRequest(name=CONCEPTS, models=",".join(models), steps=",".join(map(str, steps)), dataset=DATASET)
    run_concepts(store, request, log=lambda _m: None)


def _robustness(store: Store, models: list[str], steps: list[int], req: DemoRequest, echo: Callable) -> float:
    """Two robustness runs over every step: mean-ablating each seed's universal neurons (steps where every seed
    has some) on held-out sequences, and a same-frequency-bin token replacement; returns the stage's seconds."""
    from actdb.compute.robustness.run import RobustnessRequest, plan_robustness, run_robustness

    started = time.perf_counter()
    common = {"models": models, "dataset": DATASET, "eval_dataset": EVAL_DATASET, "controls": req.controls}
    common |= {"contexts": ROBUSTNESS_CONTEXTS, "progress": False}
    usable = []
    for step in steps:
        try:
            plan_robustness(
                store, RobustnessRequest(**common, steps=[step], ablate="universal", threshold=req.threshold)
            )
            usable.append(step)
        except ActdbError as exc:  # no universal neuron in some seed at this step: a finding, stated
            echo(f"step {step}: {exc}")
    if usable:
        request = RobustnessRequest(**common, steps=usable, ablate="universal", threshold=req.threshold)
        run_robustness(store, request, log=lambda _m: None)
    run_robustness(store, RobustnessRequest(**common, steps=steps, generate="replace"), log=lambda _m: None)
    return time.perf_counter() - started


def _robustness_summary(store: Store, seconds: float, echo: Callable[[str], None]) -> None:
    from actdb.query.robustness_tables import robustness_by_step

    rows = robustness_by_step(store)
    columns = ["intervention", "spec", "step", "n_contexts", "n_neurons", "ir_clean", "ir_norm", "ir_norm_ci_low"]
    columns += ["ir_norm_ci_high", "control_mean", "excess", "p_value", "p_floor", "kl_mean", "kl_sd", "fleiss_kappa"]
    echo(
        f"\n== Interventional robustness across seeds (IR_norm = IR(x') - IR(x); 95% bootstrap CI over contexts; "
        f"p: two-sided rank p against the controls, floor 1/(controls+1); n_neurons: each seed's ablated set, "
        f"equal across seeds, not across steps; stage took {seconds:.0f}s) =="
    )
    echo(render(Rows(columns, [{c: r[c] for c in columns} for r in rows])))


def _concept_tables(store: Store) -> dict[str, tuple[Rows, Rows]]:
    """The concept table and emergence rows of the demo's concept set, computed once (its permutation tests and
    random twin draws are most of the report stage's work)."""
    from actdb.compute.concepts.analysis import concept_table

    return {CONCEPTS: concept_table(store, CONCEPTS)}


def _concept_summary(tables: tuple[Rows, Rows], echo: Callable[[str], None]) -> None:
    table, emergence = tables
    echo(
        "\n== Concept experts (Python constructs; top-100 by AP, 20 label permutations; RSA: Spearman of upper "
        "triangles, Mantel p as concept run stored it; twin overlap: experts mapped through correlate twins vs "
        "k random neurons' twins) =="
    )
    echo(render(table))
    echo(render(emergence))


def _similarity_summary(store: Store, models: list[str], steps: list[int], echo: Callable[[str], None]) -> None:
    """Snapshots of one run against independently trained runs, per metric: means over the pairs of each kind."""
    sim = {
        (r["model"], r["step"], r["other_model"], r["other_step"]): dict(r) for r in queries.similarity_listing(store)
    }
    refs = [SetRef(m, st) for m in models for st in steps]
    for r in function_similarity(store, FunctionRequest(sets=refs, dataset=DATASET), log=lambda _m: None):
        sim[(r["model"], r["step"], r["other_model"], r["other_step"])].update(r)
    first, late, last = steps[0], steps[-2], steps[-1]
    kinds = [
        (f"same seed, {late} vs {last}", lambda m, st, om, ost: m == om and {st, ost} == {late, last}),
        (f"other seed, both at {last}", lambda m, st, om, ost: m != om and st == ost == last),
        (f"other seed, both at {late}", lambda m, st, om, ost: m != om and st == ost == late),
        (f"other seed, both at {first} (untrained)", lambda m, st, om, ost: m != om and st == ost == first),
    ]
    metrics = ["excess_corr", "matched_corr", "cka", "top1_agreement", "loss_corr"]
    rows = []
    for name, match in kinds:
        chosen = [v for k, v in sim.items() if match(*k)]
        row = {"pairs": name, "n": len(chosen)}
        for metric in metrics:
            values = [v[metric] for v in chosen if v.get(metric) is not None]
            row[metric] = round(float(np.mean(values)), 3) if values else None
        row["mean_loss"] = _losses_by_step(chosen)
        rows.append(row)
    echo(
        "\n== Similarity: snapshots of one run vs independently trained runs (means over ordered pairs; mean_loss: "
        "each compared set's mean next-token loss on counted targets, by step, from the stored predictions) =="
    )
    echo(render(Rows(["pairs", "n", *metrics, "mean_loss"], rows)))

    trajectory = long_rows(store)
    summary = run_summary(store)
    echo(f"\n== Trajectories: win rate W[row, column] on >= {summary['n_targets']:,} targets per pair (0.5: a draw) ==")
    echo(render(wide_table(trajectory, "win_rate")))
    echo(f"non-transitive triples: {summary['n_nontransitive']} of {summary['n_triples']}")
    echo(f"\n== Trajectories: ensemble gain (nats) of two-checkpoint mixtures at steps {late} and {last} ==")
    echo(render(kind_comparison(trajectory, metrics=("ensemble_gain", "disagreement"), steps={late, last})))


def _losses_by_step(pairs: list[dict]) -> str | None:
    """`step: loss` for the sets compared in `pairs`, each set's mean loss averaged per step: agreement between
    two sets is read against how good each of them is."""
    by_step: dict[int, dict[str, float]] = defaultdict(dict)
    for v in pairs:
        if v.get("mean_loss") is None:
            continue
        by_step[v["step"]][v["model"]] = v["mean_loss"]
        by_step[v["other_step"]][v["other_model"]] = v["other_mean_loss"]
    if not by_step:
        return None
    return ", ".join(f"{step}: {np.mean(list(losses.values())):.2f}" for step, losses in sorted(by_step.items()))


def _explain(store: Store, model: str, step: int, threshold: float, echo: Callable[[str], None]) -> None:
    """Families of the universal neurons per layer (with their rule), then the most universal neuron's top
    contexts and tokens: what a researcher would look at next."""
    rows, counts, rules = families(store, model=model, step=step, threshold=threshold)
    for rule in rules:
        echo(f"  families by rule ({rule})")
    echo(render(counts))
    if not rows:
        return
    best = max(rows, key=lambda r: r["excess_corr"])
    layer, neuron = best["layer"], best["neuron"]
    story = neuron_explanation(store, model, step, layer, neuron, examples=3)
    echo(f"\n  {model}@{step} {layer}.{neuron} (excess corr {best['excess_corr']:.3f}, family {best['family']}):")
    echo(render(Rows(["rank", "activation", "context"], story["examples"])))
    echo(render(Rows(["rank", "token", "mean_activation", "count"], list(story["top_tokens"])[:5])))


def _ablate(store: Store, target: str, req: DemoRequest, echo: Callable[[str], None]) -> None:
    request = AblationRequest(
        target=target,
        selector="universal",
        method="mean",
        dataset=DATASET,
        eval_dataset=EVAL_DATASET,
        tokens=8192,
        controls=req.controls,
        threshold=req.threshold,
        progress=False,
    )
    try:
        run_ablation(store, request, log=echo)
    except ActdbError as exc:  # an empty universal set is a finding, not a failure
        echo(f"no ablation: {exc}")


def _summary(store: Store, threshold: float, echo: Callable[[str], None]) -> None:
    echo(
        f"\n== Universal neurons: % of each layer with excess corr > {threshold} (and > 0.5, the paper's "
        "threshold), mean over seeds; stability: mean share of baseline draws in which those neurons pass "
        f"{threshold} =="
    )
    pct = f"pct_univ_{threshold}"
    rows = []
    for control in ("none", "token"):
        by_layer = queries.universal_by_layer(store, control=control, threshold=threshold)
        strict = queries.universal_by_layer(store, control=control, threshold=0.5)
        paper = {(r["model"], r["step"], r["layer"]): r["pct_universal"] for r in strict}
        stability: dict[tuple[int, int], list] = defaultdict(list)
        for r in queries.universal_neurons(store, control=control, threshold=threshold):
            stability[(r["step"], r["layer"])].append(r["stability"])
        acc: dict[tuple[int, int], list] = defaultdict(list)
        for r in by_layer:
            key = (r["model"], r["step"], r["layer"])
            acc[(r["step"], r["layer"])].append(
                (r["pct_universal"], paper[key], r["mean_max_corr"], r["mean_baseline"])
            )
        for (step, layer), vals in sorted(acc.items()):
            m = np.array(vals, dtype=float).mean(axis=0)
            stable = stability.get((step, layer))
            rows.append(
                {
                    "control": control,
                    "step": step,
                    "layer": layer,
                    pct: round(m[0], 2),
                    "stability": round(float(np.mean(stable)), 2) if stable else None,
                    "pct_univ_0.5": round(m[1], 2),
                    "mean_max_corr": round(m[2], 3),
                    "mean_baseline": round(m[3], 3),
                }
            )
    columns = ["control", "step", "layer", pct, "stability", "pct_univ_0.5", "mean_max_corr", "mean_baseline"]
    echo(render(Rows(columns, rows)))
    _top_neurons(store, threshold, echo)
    echo(
        f"\n== Persistence of universal neurons (excess corr > {threshold}, summed over seeds; self-correlation "
        "from one step to the next, mean over every neuron of the layer and over the universal ones) =="
    )
    grouped: dict[tuple, list] = defaultdict(list)
    for r in queries.persistence_listing(store, threshold=threshold, hook=HOOK_NAME):
        grouped[(r["control"], r["from_step"], r["to_step"], r["layer"])].append(r)
    out = []
    for (control, from_step, to_step, layer), group in sorted(grouped.items()):
        n_from = sum(r["n_universal_from"] for r in group)
        kept = sum(r["n_kept"] for r in group)
        self_corr = [r["mean_self_corr"] for r in group if r["mean_self_corr"] is not None]
        self_corr_universal = [
            (r["mean_self_corr_universal"], r["n_universal_from"])
            for r in group
            if r["mean_self_corr_universal"] is not None
        ]
        n_weighted = sum(n for _v, n in self_corr_universal)
        out.append(
            {
                "control": control,
                "from_step": from_step,
                "to_step": to_step,
                "layer": layer,
                "n_universal_from": n_from,
                "n_kept": kept,
                "p_persist": round(kept / n_from, 3) if n_from else None,
                "self_corr_all_neurons": round(float(np.mean(self_corr)), 3) if self_corr else None,
                # weighted by each seed's universal count: the mean over the universal neurons of all seeds
                "self_corr_universal": round(sum(v * n for v, n in self_corr_universal) / n_weighted, 3)
                if n_weighted
                else None,
            }
        )
    echo(render(Rows(list(out[0]) if out else ["control"], out)))
    echo(f"\n== Ablation: universal neurons (excess corr > {threshold}) vs matched random controls ==")
    keep = "model step method n_neurons tokens base_loss delta n_controls control_mean control_std control_max p_value"
    echo(render(Rows([*keep.split(), "p_floor"], queries.ablations_listing(store))))


def _top_neurons(store: Store, threshold: float, echo: Callable[[str], None], n: int = 8) -> None:
    """The most universal neurons at the last step, with how stable their label is across baseline draws."""
    rows = queries.universal_neurons(store, threshold=threshold)
    if not rows:
        return
    last = max(r["step"] for r in rows)
    top = [r for r in rows if r["step"] == last][:n]
    echo(
        f"\n== Most universal neurons at step {last} (excess corr > {threshold}; z_pooled: excess in baseline sds "
        "pooled over the layer and shrunk; z: over the neuron's own sd from n_draws draws, heavy-tailed) =="
    )
    keep = "model layer neuron excess_corr stability z_pooled z n_draws mean_max_corr mean_baseline baseline_sd"
    echo(render(Rows(keep.split(), top)))
