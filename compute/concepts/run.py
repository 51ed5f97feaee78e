"""`actdb concept add` and `actdb concept run`: store a concept set; score every neuron of each chosen checkpoint
as an expert of each concept and record the outcome (AP sidecar beside the set's activations, top-k experts,
per-concept summaries and taxonomy alignment in SQL), each set under the run lifecycle.

Everything that can be checked is checked before anything is written: the concept set, the sets, each model's
files, config and tokenizer, sentence lengths against the context, the human reference.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from sqlalchemy import insert, select
from torch import nn

from actdb.compute.concepts import MANTEL_PERMUTATIONS
from actdb.compute.concepts import math as cm
from actdb.compute.concepts.concept_file import (
    ConceptSet,
    Reference,
    Sentences,
    load_concept_set,
    read_concepts,
    read_reference,
    sentences_of,
)
from actdb.store.database.connection import Store, finite_or_none
from actdb.store.database.lifecycle import release, request_key, running, start_or_wait
from actdb.store.database.registry import complete_set, get_checkpoint
from actdb.store.database.schema import (
    ConceptAlignment,
    ConceptExpert,
    ConceptRun,
    ConceptScore,
)
from actdb.store.database.schema import ConceptSet as ConceptSetRow
from actdb.store.device import resolve_device
from actdb.store.errors import ActdbError
from actdb.store.files.concept import ConceptArrays, concept_sidecar_path, write_concept_arrays
from actdb.store.hook_names import HOOK_NAME, parse_hook
from actdb.store.ingest.architectures import MLPRecorder, mlp_shape
from actdb.store.ingest.model_loading import context_length, load_config, load_model
from actdb.store.ingest.token_datasets import load_tokenizer
from actdb.store.refs import SetRef, check_name, parse_list, parse_set_refs, parse_steps

POOLS = ("max", "mean")
WEIGHT_FILES = ("*.safetensors", "*.bin", "*.safetensors.index.json", "*.bin.index.json")


def add_concept_set(store: Store, name: str, path: str | Path) -> tuple[int, ConceptSet, bool]:
    """Store a concepts file under `name`; returns (id, concepts, created). The same name with the same content is
    kept (created False); with other content it is a one-line error."""
    check_name(name, "concept set name")
    concepts = read_concepts(path)
    with store.session() as s:
        row = s.scalar(select(ConceptSetRow).where(ConceptSetRow.name == name))
        if row is not None:
            if row.fingerprint != concepts.fingerprint():
                raise ActdbError(f"concept set {name!r} exists with other content; choose another name")
            return row.id, concepts, False
        row = ConceptSetRow(
            name=name, fingerprint=concepts.fingerprint(), n_concepts=len(concepts.concepts), body=concepts.to_json()
        )
        s.add(row)
        s.flush()
        return row.id, concepts, True


@dataclass(kw_only=True)
class ConceptRequest:
    """Score concept set `name` on the complete sets named by `sets` (MODEL@STEP,...) or `models` x `steps`."""

    name: str
    sets: str | None = None
    models: str | None = None
    steps: str | None = None
    dataset: str | None = None
    hook: str = HOOK_NAME
    pool: str = "max"
    mask_concept_token: bool = False
    k: int = 100
    tau: float = 0.9
    permutations: int = 20
    mantel_permutations: int = MANTEL_PERMUTATIONS
    seed: int = 0
    human: str | None = None
    batch_size: int = 16
    device: str = "auto"
    force: bool = False


@dataclass
class _Target:
    ref: SetRef
    set_id: int
    activation_path: str
    location: str
    revision: str | None
    tokenizer: object


def run_concepts(store: Store, req: ConceptRequest, log: Callable[[str], None] = print) -> list[int]:
    """Score every chosen set (reusing complete identical runs unless `force`); returns the concept run ids."""
    _validate(req)
    hook = parse_hook(req.hook)
    set_row_id, concepts = load_concept_set(store, req.name)
    sentences = sentences_of(concepts, req.seed)
    reference = read_reference(req.human, concepts.names) if req.human else None
    if reference is not None and reference.n_ignored:
        log(f"{req.human}: {reference.n_ignored} rows name concepts outside {req.name}; left out")
    targets = [_target(store, ref, req.dataset, hook) for ref in _refs(req)]
    for t in targets:
        _check_lengths(t, sentences)
    device = resolve_device(req.device).torch
    run_ids = []
    for t in targets:
        run_ids.append(_run_one(store, req, hook, set_row_id, concepts, sentences, reference, t, device, log))
    return run_ids


def _validate(req: ConceptRequest) -> None:
    if req.pool not in POOLS:
        raise ActdbError(f"unknown pool {req.pool!r}; use max or mean")
    if req.k < 1 or req.permutations < 0 or req.mantel_permutations < 0 or req.batch_size < 1:
        raise ActdbError("--k and --batch-size must be >= 1, --permutations and --mantel-permutations >= 0")
    if not 0.0 <= req.tau <= 1.0:
        raise ActdbError(f"--tau {req.tau} is not an AP (0..1)")
    if (req.sets is None) == (req.models is None):
        raise ActdbError("name the checkpoints with --sets MODEL@STEP,... or with --models A,B --steps S1,S2")
    if req.models is not None and req.steps is None:
        raise ActdbError("--models needs --steps")


def _refs(req: ConceptRequest) -> list[SetRef]:
    if req.sets is not None:
        return parse_set_refs(req.sets)
    return [SetRef(m, s) for m in parse_list(req.models, "models") for s in parse_steps(req.steps)]


def _target(store: Store, ref: SetRef, dataset: str | None, hook: str) -> _Target:
    """A complete set's model, checked loadable (files, config, tokenizer) before anything is written."""
    with store.session() as s:
        aset = complete_set(s, ref, dataset, hook)
        ckpt = get_checkpoint(s, ref.model, ref.step)
        source, revision, path, set_id = ckpt.source, ckpt.revision, aset.path, aset.id
    location = store.config.model_location(source, str(ref))
    folder = Path(location)
    if folder.is_dir() and not any(any(folder.glob(p)) for p in WEIGHT_FILES):
        raise ActdbError(f"the weights of {ref} are gone: {location} holds no model weights")
    load_config(location, revision)  # an unsupported or unreadable model fails here
    tokenizer = load_tokenizer(location, revision)
    return _Target(ref, set_id, path, location, revision, tokenizer)


def encode_sentence(tokenizer, text: str) -> list[int]:
    """Token ids of one sentence as a dataset sequence starts: BOS (when the tokenizer has one), then the text."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return ([tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []) + ids


def _check_lengths(t: _Target, sentences: Sentences) -> None:
    limit = context_length(load_config(t.location, t.revision))
    if limit is None:
        return
    for text in sentences.texts:
        n = len(encode_sentence(t.tokenizer, text))
        if n > limit:
            raise ActdbError(f"a sentence is {n} tokens, longer than the context of {t.ref} ({limit}): {text[:60]!r}")


def _run_one(
    store: Store,
    req: ConceptRequest,
    hook: str,
    set_row_id: int,
    concepts: ConceptSet,
    sentences: Sentences,
    reference: Reference | None,
    t: _Target,
    device: torch.device,
    log: Callable[[str], None],
) -> int:
    key = concept_run_key(
        concepts,
        t.set_id,
        hook,
        req.pool,
        req.mask_concept_token,
        req.k,
        req.tau,
        req.permutations,
        req.mantel_permutations,
        req.seed,
        reference,
    )
    path = concept_sidecar_path(t.activation_path, req.name, key)
    values = {
        "request_key": key,
        "concept_set_id": set_row_id,
        "set_id": t.set_id,
        "hook": hook,
        "pool": req.pool,
        "mask_concept_token": req.mask_concept_token,
        "k": req.k,
        "tau": req.tau,
        "n_permutations": req.permutations,
        "seed": req.seed,
        "path": path,
    }
    while True:
        done = None if req.force else _complete(store, key)
        if done is not None:
            log(f"concept run {done} already scored {t.ref} on {req.name} (complete); --force scores again")
            return done
        run_id = start_or_wait(store, ConceptRun, values, log)
        if run_id is None:
            continue
        if not req.force and _complete(store, key) is not None:
            release(store, ConceptRun, run_id)
            continue
        break
    with running(store, ConceptRun, run_id) as handle:
        model = load_model(t.location, t.revision, device)
        n_layers, d_mlp = mlp_shape(model)
        responses = sentence_responses(
            model, t.tokenizer, sentences, concepts, hook, req.pool, req.mask_concept_token, req.batch_size, device
        )
        del model
        result = score_all(responses, sentences, concepts, req, n_layers, d_mlp, reference)
        write_concept_arrays(store.config.file(path), result.arrays)
        _store_rows(store, run_id, result)
        handle.complete(n_sentences=len(sentences.texts), n_neurons=n_layers * d_mlp, n_empty=responses.n_empty)
    tax = result.alignment.get("taxonomy")
    aligned = "" if tax is None else f"; taxonomy RSA {tax.rho:.3f} (Mantel p {tax.p:.4f}, {tax.n_permutations} perm.)"
    log(
        f"concept run {run_id}: {t.ref} on {req.name}: {len(concepts.concepts)} concepts, {len(sentences.texts)} "
        f"sentences, {n_layers * d_mlp} neurons; mean best AP {np.mean([s.best() for s in result.scores]):.3f}"
        f"{aligned}"
    )
    return run_id


def concept_run_key(
    concepts: ConceptSet,
    set_id: int,
    hook: str,
    pool: str,
    mask: bool,
    k: int,
    tau: float,
    permutations: int,
    mantel_permutations: int,
    seed: int,
    reference: Reference | None,
) -> str:
    """The request key of one set's concept run: identical requests share it, so a rerun is reused, and `concept
    show` can tell whether a run's stored alignment was tested against the human reference it is given."""
    return request_key(
        kind="concepts",
        concepts=concepts.fingerprint(),
        set=set_id,
        hook=hook,
        pool=pool,
        mask=mask,
        k=k,
        tau=tau,
        permutations=permutations,
        mantel=mantel_permutations,
        seed=seed,
        human=None if reference is None else [reference.name, _fingerprint(reference)],
    )


def _fingerprint(reference: Reference) -> str:
    """The reference's content (matrix and triplets) as used, so an edited file under the same name is new."""
    digest = hashlib.sha256(np.nan_to_num(reference.similarity, nan=-9.0).tobytes())
    if reference.triplets is not None:
        digest.update(np.ascontiguousarray(reference.triplets, dtype=np.int64).tobytes())
    return digest.hexdigest()


def _complete(store: Store, key: str) -> int | None:
    return store.scalar(
        select(ConceptRun.id)
        .where(ConceptRun.request_key == key, ConceptRun.status == "complete")
        .order_by(ConceptRun.id.desc())
        .limit(1)
    )


def concept_token_ids(tokenizer, name: str) -> set[int]:
    """Token ids of the concept word as it appears in text: alone, after a space, capitalised."""
    ids: set[int] = set()
    for form in {name, " " + name, name.capitalize(), " " + name.capitalize()}:
        ids.update(tokenizer(form, add_special_tokens=False)["input_ids"])
    return ids


@dataclass
class Responses:
    """Each sentence's response per neuron (flat `layer * d_mlp + neuron`), and per concept the rows of its own
    sentences that change when that concept's word tokens are dropped (`--mask-concept-token`): only those are
    kept, so memory grows with the sentences holding the word, not with a matrix per concept."""

    base: np.ndarray  # (n_sentences, n_neurons) float32
    masked: dict[str, dict[int, np.ndarray]]
    n_empty: int  # sentences (or concept-masked sentences) left with no counted position: response 0

    def of(self, concept: str, rows: np.ndarray) -> np.ndarray:
        x = self.base[rows]
        override = self.masked.get(concept, {})
        for r, i in enumerate(rows):
            if int(i) in override:
                x[r] = override[int(i)]
        return x


@torch.no_grad()
def sentence_responses(
    model: nn.Module,
    tokenizer,
    sentences: Sentences,
    concepts: ConceptSet,
    hook: str,
    pool: str,
    mask_concept_token: bool,
    batch_size: int,
    device: torch.device,
) -> Responses:
    """Max or mean of each neuron's hooked activation over each sentence's counted positions (BOS, EOS and
    padding never count: the max runs over real tokens only), batched by length."""
    special = {t for t in (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id) if t is not None}
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    encoded = [encode_sentence(tokenizer, text) for text in sentences.texts]
    drops: dict[str, set[int]] = {}
    members: dict[str, set[int]] = {}
    if mask_concept_token:
        for c in concepts.concepts:
            drops[c.name] = concept_token_ids(tokenizer, c.name)
            members[c.name] = set(sentences.positive[c.name].tolist()) | set(sentences.negative[c.name].tolist())
    base: np.ndarray | None = None
    masked: dict[str, dict[int, np.ndarray]] = {name: {} for name in drops}
    empty = 0
    order = np.argsort([len(e) for e in encoded], kind="stable")  # similar lengths share a batch: less padding
    with MLPRecorder(model, hook) as recorder:
        for start in range(0, len(order), batch_size):
            rows = order[start : start + batch_size]
            width = max(len(encoded[i]) for i in rows)
            ids = torch.full((len(rows), width), pad, dtype=torch.long)
            attention = torch.zeros((len(rows), width), dtype=torch.long)
            for r, i in enumerate(rows):
                ids[r, : len(encoded[i])] = torch.tensor(encoded[i])
                attention[r, : len(encoded[i])] = 1
            ids, attention = ids.to(device), attention.to(device)
            model(input_ids=ids, attention_mask=attention)
            counted = attention.bool()
            for tok in special:
                counted &= ids != tok
            keeps = {}
            for name, drop in drops.items():  # rows whose concept-masked response differs from the plain one
                keep = counted & ~torch.isin(ids, torch.tensor(sorted(drop), dtype=torch.long, device=ids.device))
                changed = [
                    r for r, i in enumerate(rows) if int(i) in members[name] and not torch.equal(keep[r], counted[r])
                ]
                if changed:
                    keeps[name] = (changed, keep[changed])
                    empty += int((keep[changed].sum(dim=1) == 0).sum())
            # pooled layer by layer into one (batch, n_neurons) buffer: no concatenated copy of the activations
            outputs = recorder.outputs
            width_n = sum(a.shape[-1] for a in outputs)
            pooled = torch.empty((len(rows), width_n), dtype=torch.float32, device=ids.device)
            extra = {
                name: torch.empty((len(ch), width_n), dtype=torch.float32, device=ids.device)
                for name, (ch, _k) in keeps.items()
            }
            offset = 0
            for a in outputs:
                d = a.shape[-1]
                for name, (changed, keep) in keeps.items():  # before `_pool` may mask `a` in place
                    extra[name][:, offset : offset + d] = _pool(a[changed].float(), keep, pool, in_place=True)
                pooled[:, offset : offset + d] = _pool(
                    a if a.dtype == torch.float32 else a.float(), counted, pool, in_place=True
                )
                offset += d
            if base is None:
                base = np.zeros((len(encoded), width_n), dtype=np.float32)
            base[rows] = pooled.cpu().numpy()
            empty += int((counted.sum(dim=1) == 0).sum())
            for name, (changed, _keep) in keeps.items():
                sub = extra[name].cpu().numpy()
                for j, r in enumerate(changed):
                    masked[name][int(rows[r])] = sub[j]
    return Responses(base, masked, empty)


def _pool(acts: torch.Tensor, keep: torch.Tensor, pool: str, in_place: bool = False) -> torch.Tensor:
    """`(batch, seq, d)` -> `(batch, d)`: max (padding and dropped positions set to -inf, never taken; in place
    when allowed: the recorded activations are not read again) or mean over kept positions; 0 when none kept."""
    any_kept = keep.any(dim=1, keepdim=True)
    if pool == "max":
        masked = (
            acts.masked_fill_(~keep[..., None], float("-inf"))
            if in_place
            else acts.masked_fill(~keep[..., None], float("-inf"))
        )
        return torch.where(any_kept, masked.amax(dim=1), torch.zeros((), dtype=acts.dtype, device=acts.device))
    total = torch.einsum("bsd,bs->bd", acts, keep.to(acts.dtype))  # one batched product, no masked copy
    return total / keep.sum(dim=1, keepdim=True).clamp(min=1)


@dataclass
class ScoredSet:
    arrays: ConceptArrays
    scores: list[cm.ConceptScores]
    concepts: list[str]
    sizes: list[tuple[int, int]]
    k: int
    tau: float
    alignment: dict[str, cm.RSA]
    triplets: tuple[float, int] | None


def score_all(
    responses: Responses,
    sentences: Sentences,
    concepts: ConceptSet,
    req: ConceptRequest,
    n_layers: int,
    d_mlp: int,
    reference: Reference | None,
) -> ScoredSet:
    """Per concept AP/AUROC and null (one concept's responses in memory at a time beside the AP arrays), then
    the concept x concept Spearman similarity and its RSA with the taxonomy (and the human reference)."""
    names = concepts.names
    n = n_layers * d_mlp
    ap = np.empty((len(names), n), dtype=np.float32)
    auroc = np.empty_like(ap)
    scores, sizes = [], []
    for c, name in enumerate(names):
        rows = np.r_[sentences.positive[name], sentences.negative[name]]
        x = responses.of(name, rows)
        s = cm.score_concept(
            x,
            len(sentences.positive[name]),
            k=req.k,
            n_permutations=req.permutations,
            rng=np.random.default_rng([req.seed, c]),
        )
        ap[c], auroc[c] = s.ap, s.auroc
        scores.append(cm.ConceptScores(ap[c], auroc[c], s.null_best, s.null_kth))  # views: no second copy
        del s, x
        sizes.append((len(sentences.positive[name]), len(sentences.negative[name])))
    similarity = cm.spearman_matrix(ap)
    rng = np.random.default_rng([req.seed, 1_000_003])
    alignment: dict[str, cm.RSA] = {}
    if len(names) >= 3:
        taxonomy = cm.taxonomy_similarity(names, concepts.parents)
        alignment["taxonomy"] = cm.rsa(similarity, taxonomy, req.mantel_permutations, rng)
    triplets = None
    if reference is not None and len(names) >= 3:
        alignment[reference.name] = cm.rsa(similarity, reference.similarity, req.mantel_permutations, rng)
        if reference.triplets is not None:
            triplets = cm.triplet_accuracy(similarity, reference.triplets)
    arrays = ConceptArrays(
        names,
        n_layers,
        d_mlp,
        ap,
        auroc,
        np.stack([s.null_best for s in scores]),
        np.stack([s.null_kth for s in scores]),
    )
    return ScoredSet(arrays, scores, names, sizes, req.k, req.tau, alignment, triplets)


def _store_rows(store: Store, run_id: int, result: ScoredSet) -> None:
    d_mlp = result.arrays.d_mlp
    score_rows, expert_rows = [], []
    for c, (name, s) in enumerate(zip(result.concepts, result.scores, strict=True)):
        top = cm.top_k(s.ap, result.k)
        has_null = s.n_permutations > 0
        score_rows.append(
            {
                "run_id": run_id,
                "concept": name,
                "n_positive": result.sizes[c][0],
                "n_negative": result.sizes[c][1],
                "best_ap": float(s.ap.max()),
                "best_auroc": float(s.auroc.max()),
                "kth_ap": float(s.ap[top[-1]]),
                "null_best_q99": s.null_q99() if has_null else None,
                "null_kth_q99": float(np.quantile(s.null_kth, 0.99)) if has_null else None,
                "excess_ap": s.excess_ap() if has_null else None,
                "p_best": s.p_best() if has_null else None,
                "n_above_tau": int(np.sum(s.ap > result.tau)),
            }
        )
        expert_rows.extend(
            {
                "run_id": run_id,
                "concept": name,
                "rank": r,
                "layer": int(i // d_mlp),
                "neuron": int(i % d_mlp),
                "ap": float(s.ap[i]),
                "auroc": float(s.auroc[i]),
            }
            for r, i in enumerate(top, 1)
        )
    align_rows = [
        {
            "run_id": run_id,
            "reference": ref,
            "rho": finite_or_none(a.rho),
            "p": finite_or_none(a.p),
            "n_permutations": a.n_permutations,
            "n_pairs": a.n_pairs,
            "triplet_accuracy": None if result.triplets is None or ref == "taxonomy" else result.triplets[0],
            "n_triplets": None if result.triplets is None or ref == "taxonomy" else result.triplets[1],
        }
        for ref, a in result.alignment.items()
    ]
    with store.session() as s:
        s.execute(insert(ConceptScore), score_rows)
        s.execute(insert(ConceptExpert), expert_rows)
        if align_rows:
            s.execute(insert(ConceptAlignment), align_rows)
