"""`actdb robustness run`: apply one intervention to every seed at each common step and measure how alike the
seeds respond (Avery et al.'s interventional robustness, for next-token distributions), against matched random
controls; stored as one `robustness_run` with a result row per step and a row per control.

Everything the run needs is resolved and checked before a row is written: the seeds share one output space (same
vocabulary size and tokenizer), every step is ingested for every seed, an edits file's pairs have equal lengths,
and an ablation rule selects at least one neuron in every seed. Contexts stream in batches; only per-context
numbers are kept. Controls and generated edits are drawn from `seed`, so a rerun is identical.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from sqlalchemy import insert, select
from tqdm.auto import tqdm

from actdb.compute.ablation.loss import PositionMask, set_edits
from actdb.compute.robustness.edits import (
    GENERATORS,
    Edit,
    FrequencyBins,
    control_edit,
    generate_edit,
    identifier_tokens,
    read_edit_pairs,
)
from actdb.compute.robustness.forward import Timing, Variant, VariantTally, score_batch
from actdb.compute.robustness.math import PermutationTest, bootstrap_ci, icc_agreement, sign_agreement
from actdb.compute.robustness.neuron_sets import SeedSet, matched_frequency_controls, rule_sets
from actdb.store.database import tables
from actdb.store.database.connection import Store
from actdb.store.database.lifecycle import release, request_key, running, start_or_wait
from actdb.store.database.registry import complete_set, get_dataset, get_model, only_dataset
from actdb.store.device import resolve_device
from actdb.store.errors import ActdbError
from actdb.store.files.token import TokenDataset
from actdb.store.ingest.model_loading import load_config, load_model
from actdb.store.ingest.token_datasets import load_tokenizer, tokenizer_fingerprint
from actdb.store.refs import Neuron, SetRef, check_threshold

METHODS = ("mean", "zero")
BOOTSTRAP_DRAWS = 1000


@dataclass(kw_only=True)
class RobustnessRequest:
    """Seeds `models` at `steps` (default: every step all of them have ingested on `dataset`), one intervention:
    `ablate` (a rule), `generate` (replace or swap) or `edits` (a JSONL file of text pairs)."""

    models: list[str]
    steps: list[int] | None = None
    dataset: str | None = None
    eval_dataset: str | None = None  # where the contexts come from (default: `dataset`)
    ablate: str | None = None
    generate: str | None = None
    edits: str | None = None
    method: str = "mean"
    contexts: int = 32
    controls: int = 19
    seed: int = 0
    topk: int | None = None
    threshold: float | None = None
    batch_size: int = 8
    device: str = "auto"
    force: bool = False
    progress: bool = True


@dataclass
class _Seed:
    model: str
    location: str
    revision: str | None
    seed_set: SeedSet


@dataclass
class _Plan:
    kind: str
    spec: str
    dataset_id: int
    eval_dataset_id: int | None
    steps: list[int]
    seeds: dict[int, list[_Seed]]  # step -> the seeds' checkpoints there
    d_mlp: int
    tokens: np.ndarray | None = None  # the contexts, for ablations
    mask: np.ndarray | None = None
    edits: list[Edit] = field(default_factory=list)
    control_edits: list[list[Edit]] = field(default_factory=list)  # per edit, its controls
    neuron_sets: dict[int, list[list[Neuron]]] = field(default_factory=dict)  # step -> per seed
    neuron_controls: dict[int, list[list[list[Neuron]]]] = field(default_factory=dict)  # step -> per seed -> K


@dataclass
class StepResult:
    """One step's numbers, as stored in `robustness_result`."""

    step: int
    values: dict
    control_ir_norm: np.ndarray
    control_kl: np.ndarray


def run_robustness(
    store: Store, req: RobustnessRequest, log: Callable[[str], None] = print
) -> tuple[int, list[StepResult] | None]:
    """Measure and record; returns the run id and each step's result (None when an identical run is reused)."""
    plan = plan_robustness(store, req)
    device = resolve_device(req.device).torch
    values = _row_values(req, plan)
    while True:
        done = None if req.force else _complete(store, values["request_key"])
        if done is not None:
            log(f"robustness run {done} already measured this request (complete); --force measures again")
            return done, None
        run_id = start_or_wait(store, tables.robustness_run, values, log)
        if run_id is None:
            continue
        if not req.force and _complete(store, values["request_key"]) is not None:
            release(store, tables.robustness_run, run_id)
            continue
        break
    results = []
    with running(store, tables.robustness_run, run_id) as handle:
        passes = 0
        bar = tqdm(plan.steps, disable=not req.progress, desc="robustness", unit="step", dynamic_ncols=True)
        for step in bar:
            result, n_passes = measure_step(plan, step, req, device)
            passes += n_passes
            _store_step(store, run_id, result)
            handle.beat()
            results.append(result)
            log(_step_line(run_id, result, req.controls))
        handle.complete(forward_passes=passes)
    if 0 < req.controls < 19:
        log(f"note: with {req.controls} controls the smallest reachable p-value is 1/{req.controls + 1}")
    return run_id, results


def measure_step(
    plan: _Plan, step: int, req: RobustnessRequest, device: torch.device, timing: Timing | None = None
) -> tuple[StepResult, int]:
    """Every seed at `step`, clean and under the intervention and its controls, over every context."""
    seeds = plan.seeds[step]
    models = [load_model(s.location, s.revision, device) for s in seeds]
    n, k = len(seeds), req.controls
    tallies = [VariantTally(n) for _ in range(1 + k)]
    passes = 0
    for ids, variants in _batches(plan, step, req, device):
        score_batch(models, ids, variants, tallies, req.topk, timing)
        passes += n * (1 + len(variants))
    return _summarise(plan, step, tallies, req), passes


def _batches(plan: _Plan, step: int, req: RobustnessRequest, device: torch.device):
    """(clean ids, variants) per batch: the same contexts for every seed, each seed with its own edits."""
    n = len(plan.seeds[step])
    if plan.kind == "ablate":
        where = PositionMask()
        sets, controls = plan.neuron_sets[step], plan.neuron_controls[step]
        means = [s.seed_set.means for s in plan.seeds[step]]
        main = [set_edits(sets[j], req.method, means[j], where) for j in range(n)]
        others = [
            [set_edits(controls[j][c], req.method, means[j], where) for j in range(n)] for c in range(req.controls)
        ]
        for b0 in range(0, len(plan.tokens), req.batch_size):
            ids = torch.from_numpy(plan.tokens[b0 : b0 + req.batch_size].astype(np.int64)).to(device)
            mask = torch.from_numpy(plan.mask[b0 : b0 + req.batch_size]).to(device)
            where.current = mask  # replace at counted positions only, as `actdb ablate` does by default
            ev = mask[:, 1:]
            yield ids, [Variant(ids, ev, edits) for edits in [main, *others]]
        return
    by_length: dict[int, list[int]] = {}
    for i, e in enumerate(plan.edits):
        by_length.setdefault(len(e.clean), []).append(i)
    none = [None] * n
    for length in sorted(by_length):
        members = by_length[length]
        for b0 in range(0, len(members), req.batch_size):
            chunk = members[b0 : b0 + req.batch_size]

            def stacked(edits: list[Edit]) -> Variant:
                ids = torch.from_numpy(np.stack([e.edited for e in edits])).to(device)
                ev = torch.from_numpy(np.stack([e.evaluated() for e in edits])).to(device)
                return Variant(ids, ev, none)

            clean = torch.from_numpy(np.stack([plan.edits[i].clean for i in chunk])).to(device)
            variants = [stacked([plan.edits[i] for i in chunk])]
            variants += [stacked([plan.control_edits[i][c] for i in chunk]) for c in range(req.controls)]
            yield clean, variants


def _summarise(plan: _Plan, step: int, tallies: list[VariantTally], req: RobustnessRequest) -> StepResult:
    main, controls = tallies[0], tallies[1:]
    ir_norm_ctx = main.ir_norm
    ir_norm = float(ir_norm_ctx.mean()) if len(ir_norm_ctx) else float("nan")
    low, high = bootstrap_ci(ir_norm_ctx, BOOTSTRAP_DRAWS, req.seed)
    control_ir = np.array([float(t.ir_norm.mean()) for t in controls])
    test = PermutationTest.of(control_ir, ir_norm)
    kl_seed = np.array([t.per_context("kl").mean(0) for t in tallies])  # (1 + K, seeds)
    targets = max(main.n_targets, 1)
    loss_seed = (main.ce_intervened - main.ce_clean) / targets
    flips_seed = main.per_context("flip_rate").mean(0)
    seeds = plan.seeds[step]
    per_seed = [
        {
            "model": s.model,
            "clean_loss": float(main.ce_clean[j] / targets),
            "intervened_loss": float(main.ce_intervened[j] / targets),
            "kl": float(kl_seed[0, j]),
            "flip_rate": float(flips_seed[j]),
        }
        for j, s in enumerate(seeds)
    ]
    values = {
        "step": step,
        "n_contexts": len(ir_norm_ctx),
        "n_targets": main.n_targets,
        "n_neurons": json.dumps([len(x) for x in plan.neuron_sets[step]]) if plan.kind == "ablate" else None,
        "ir_clean": _num(main.per_context("ir_clean").mean()),
        "ir_intervened": _num(main.per_context("ir_intervened").mean()),
        "ir_norm": _num(ir_norm),
        "ir_norm_ci_low": _num(low),
        "ir_norm_ci_high": _num(high),
        "n_controls": len(controls),
        "control_mean": test.mean if test else None,
        "control_sd": test.sd if test else None,
        "excess": _num(test.excess) if test else None,
        "p_value": test.p_value if test else None,
        "p_floor": test.p_floor if test else None,
        "kl_mean": _num(kl_seed[0].mean()),
        "kl_sd": _num(kl_seed[0].std(ddof=1)),
        "loss_change_mean": _num(loss_seed.mean()),
        "loss_change_sd": _num(loss_seed.std(ddof=1)),
        "flip_rate_mean": _num(flips_seed.mean()),
        "flip_rate_sd": _num(flips_seed.std(ddof=1)),
        "sign_agreement": _num(sign_agreement(main.per_context("loss_change"))),
        "fleiss_kappa": _num(main.fleiss_kappa),
        "icc": _num(icc_agreement(kl_seed)) if len(controls) else None,
        "per_seed": json.dumps(per_seed),
    }
    return StepResult(step, values, control_ir, kl_seed[1:].mean(1))


def _num(x: float) -> float | None:
    """A float for SQL: NaN (an undefined statistic) is stored as NULL."""
    x = float(x)
    return None if np.isnan(x) else x


def _step_line(run_id: int, r: StepResult, n_controls: int) -> str:
    v = r.values

    def f(x: float | None, spec: str = "+.4f") -> str:
        return "n/a" if x is None else format(x, spec)

    line = (
        f"robustness {run_id} step {r.step}: IR {f(v['ir_clean'], '.4f')} -> {f(v['ir_intervened'], '.4f')}, "
        f"IR_norm {f(v['ir_norm'])} [{f(v['ir_norm_ci_low'])}, {f(v['ir_norm_ci_high'])}] over {v['n_contexts']} "
        f"contexts; KL {f(v['kl_mean'], '.4f')} ± {f(v['kl_sd'], '.4f')} bits (between-seed sd), flips "
        f"{f(v['flip_rate_mean'], '.3f')}, kappa {f(v['fleiss_kappa'], '.3f')}"
    )
    if n_controls:
        line += (
            f"; controls ({n_controls}) {f(v['control_mean'])}, excess {f(v['excess'])}, p = {v['p_value']:.3f} "
            f"(floor {v['p_floor']:.3f}), ICC {f(v['icc'], '.3f')}"
        )
    return line


def _store_step(store: Store, run_id: int, r: StepResult) -> None:
    with store.transaction() as s:
        s.execute(insert(tables.robustness_result).values(run_id=run_id, **r.values))
        if len(r.control_ir_norm):
            s.execute(
                insert(tables.robustness_control),
                [
                    {"run_id": run_id, "step": r.step, "control": c, "ir_norm": _num(ir), "kl_mean": _num(kl)}
                    for c, (ir, kl) in enumerate(zip(r.control_ir_norm, r.control_kl, strict=True))
                ],
            )


def _validate(req: RobustnessRequest) -> None:
    chosen = [x for x in (req.ablate, req.generate, req.edits) if x is not None]
    if len(chosen) != 1:
        raise ActdbError("name one intervention: --ablate RULE, --generate KIND or --edits FILE")
    if len(req.models) < 2 or len(set(req.models)) != len(req.models):
        raise ActdbError("--models needs at least two different seeds")
    if req.generate is not None and req.generate not in GENERATORS:
        raise ActdbError(f"unknown generator {req.generate!r}; use {' or '.join(GENERATORS)}")
    if req.method not in METHODS:
        raise ActdbError(f"unknown method {req.method!r}; use mean or zero")
    if req.contexts < 1 or req.batch_size < 1 or req.controls < 0 or (req.topk is not None and req.topk < 1):
        raise ActdbError("--contexts, --batch-size and --top-k must be >= 1, --controls >= 0")
    check_threshold(req.threshold)


def plan_robustness(store: Store, req: RobustnessRequest) -> _Plan:
    """Resolve and check every input (one-line errors); nothing is written."""
    _validate(req)
    dataset_name = req.dataset or only_dataset(store, req.models[0])
    with store.transaction() as conn:
        ds = get_dataset(conn, dataset_name)
        eval_ds = get_dataset(conn, req.eval_dataset) if req.eval_dataset else ds
        widths = {get_model(conn, m).d_mlp for m in req.models}
        steps = req.steps if req.steps is not None else _common_steps(conn, req.models, ds.id)
        if not steps:
            raise ActdbError(f"the seeds {', '.join(req.models)} have no step ingested on {ds.name} in common")
        seeds = {step: [_seed(store, conn, m, step, ds.name) for m in req.models] for step in steps}
    if eval_ds.tokenizer_fingerprint != ds.tokenizer_fingerprint:
        raise ActdbError(f"dataset {eval_ds.name!r} was tokenized with another tokenizer than {ds.name!r}")
    tokenizer = _one_output_space(req.models, seeds)
    kind = "ablate" if req.ablate else "generate" if req.generate else "edits"
    plan = _Plan(kind, "", ds.id, None if kind == "edits" else eval_ds.id, steps, seeds, max(widths))
    tokens = TokenDataset.load(store.config.file(eval_ds.path))
    plan.tokens, plan.mask = tokens.tokens[: req.contexts], tokens.mask[: req.contexts]
    never = set(tokens.excluded) | (set(tokenizer.all_special_ids) if tokenizer else set())
    if kind != "ablate":
        # replacements keep a token's frequency class, as counted over the contexts' dataset
        bins = FrequencyBins(tokens.tokens, tokens.mask, ds.vocab_size, never)
    if kind == "edits":
        if tokenizer is None:
            raise ActdbError("--edits needs the seeds' tokenizer, and their checkpoints ship none")
        plan.edits = read_edit_pairs(req.edits, tokenizer)[: req.contexts]
        digest = hashlib.sha256(Path(req.edits).read_bytes()).hexdigest()[:16]
        plan.spec = f"{Path(req.edits).name} sha256:{digest}"
        plan.control_edits = _controls(plan.edits, bins, req)
    if kind == "ablate":
        plan.spec = req.ablate
        for step in steps:
            sets = rule_sets(store, req.ablate, [s.seed_set for s in seeds[step]], req.threshold)
            plan.neuron_sets[step] = sets
            plan.neuron_controls[step] = [
                matched_frequency_controls(
                    sets[j], s.seed_set.frac_active, plan.d_mlp, req.controls, _rng(req.seed, step, j)
                )
                for j, s in enumerate(seeds[step])
            ]
    elif kind == "generate":
        plan.spec = req.generate
        texts = _token_texts(tokenizer, ds.vocab_size)
        identifiers = identifier_tokens(texts)
        for i in range(len(plan.tokens)):
            edit = generate_edit(
                req.generate,
                plan.tokens[i].astype(np.int64),
                plan.mask[i],
                bins,
                identifiers,
                _rng(req.seed, i),
            )
            if edit is not None:
                plan.edits.append(edit)
        if not plan.edits:
            raise ActdbError(f"--generate {req.generate} finds nothing to edit in the first {req.contexts} contexts")
        plan.control_edits = _controls(plan.edits, bins, req)
    return plan


def _rng(*key: int) -> np.random.Generator:
    """A generator seeded by the request's seed and where it is used, so draws do not depend on batching."""
    return np.random.default_rng(list(key))


def _controls(edits: list[Edit], bins: FrequencyBins, req: RobustnessRequest) -> list[list[Edit]]:
    out = []
    for i, e in enumerate(edits):
        rng = _rng(req.seed, i, 1)
        out.append([control_edit(e, bins, rng) for _ in range(req.controls)])
    return out


def _token_texts(tokenizer, vocab_size: int) -> list[str]:
    if tokenizer is None:
        return [""] * vocab_size
    return [tokenizer.decode([i]) for i in range(vocab_size)]


def _common_steps(conn, models: list[str], dataset_id: int) -> list[int]:
    a, c, m = tables.activation_set, tables.checkpoint, tables.model
    per_model = []
    for name in models:
        get_model(conn, name)
        rows = conn.scalars(
            select(c.c.step)
            .join(a, a.c.checkpoint_id == c.c.id)
            .join(m, m.c.id == c.c.model_id)
            .where(m.c.name == name, a.c.dataset_id == dataset_id, a.c.status == "complete")
        )
        per_model.append(set(rows))
    return sorted(set.intersection(*per_model))


def _seed(store: Store, conn, model: str, step: int, dataset: str) -> _Seed:
    """The seed's checkpoint at `step` with its complete set on `dataset` (one-line error when not ingested)."""
    aset = complete_set(conn, SetRef(model, step), dataset)
    ckpt = conn.execute(select(tables.checkpoint).where(tables.checkpoint.c.id == aset.checkpoint_id)).one()
    ns = tables.neuron_stat
    stats = conn.execute(select(ns.c.layer, ns.c.neuron, ns.c.mean, ns.c.frac_active).where(ns.c.set_id == aset.id))
    means, frac = {}, {}
    for r in stats:
        means[(r.layer, r.neuron)] = r.mean
        frac[(r.layer, r.neuron)] = r.frac_active
    location = store.config.model_location(ckpt.source, f"{model}@{step}")
    return _Seed(model, location, ckpt.revision, SeedSet(model, step, aset.id, means, frac))


def _one_output_space(models: list[str], seeds: dict[int, list[_Seed]]):
    """Refuse seeds whose vocabularies or tokenizers differ (IR compares distributions over one vocabulary);
    returns the shared tokenizer, or None when the checkpoints ship none."""
    vocab: dict[int, list[str]] = {}
    for step, step_seeds in seeds.items():
        for s in step_seeds:
            size = int(load_config(s.location, s.revision).vocab_size)
            vocab.setdefault(size, []).append(f"{s.model}@{step}")
    if len(vocab) > 1:
        listed = "; ".join(f"{size}: {', '.join(sorted(set(w)))}" for size, w in sorted(vocab.items()))
        raise ActdbError(f"the seeds have different vocabulary sizes ({listed}); IR needs one output space")
    first = next(iter(seeds.values()))
    found = {}
    for s in first:
        try:
            tok = load_tokenizer(s.location, s.revision)
        except ActdbError:
            continue
        found[s.model] = (tokenizer_fingerprint(tok), tok)
    if len({fp for fp, _ in found.values()}) > 1:
        raise ActdbError(f"the seeds ship different tokenizers ({', '.join(sorted(found))}); IR needs one output space")
    return next(iter(found.values()))[1] if found else None


def _row_values(req: RobustnessRequest, plan: _Plan) -> dict:
    kind = plan.kind
    key = request_key(
        kind="robustness",
        intervention=kind,
        spec=plan.spec,
        method=req.method if kind == "ablate" else None,
        models=req.models,
        steps=plan.steps,
        dataset=plan.dataset_id,
        eval_dataset=plan.eval_dataset_id,
        contexts=req.contexts,
        controls=req.controls,
        seed=req.seed,
        topk=req.topk,
        threshold=req.threshold,
    )
    return {
        "request_key": key,
        "intervention": kind,
        "spec": plan.spec,
        "method": req.method if kind == "ablate" else None,
        "models": json.dumps(req.models),
        "steps": json.dumps(plan.steps),
        "n_seeds": len(req.models),
        "dataset_id": plan.dataset_id,
        "eval_dataset_id": plan.eval_dataset_id,
        "n_contexts": len(plan.edits) if kind != "ablate" else len(plan.tokens),
        "n_controls": req.controls,
        "seed": req.seed,
        "topk": req.topk,
    }


def _complete(store: Store, key: str) -> int | None:
    r = tables.robustness_run
    return store.scalar(
        select(r.c.id).where(r.c.request_key == key, r.c.status == "complete").order_by(r.c.id.desc()).limit(1)
    )
