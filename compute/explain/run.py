"""What a set's neurons do: max-activating examples, the share of variance the current token and the position
explain, and vocabulary statistics of their output weights, written to the set's explanation file and summarised
per neuron in SQL (`neuron_explanation`). Families of universal neurons follow from these by one printed rule.

The examples are streamed during ingest (`store.ingest.top_activations`); `explain_sets` builds everything for sets
ingested before, from the stored activations and the checkpoint's weights.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from sqlalchemy import delete, select
from tqdm.auto import tqdm

from actdb.compute.explain.tokens import DEFAULT_MIN_COUNT, TokenExplanations, explain_tokens
from actdb.compute.explain.vocabulary import VOCAB_KURTOSIS_MIN, VOCAB_SKEW_MIN, VocabularyStats, vocabulary_statistics
from actdb.store.database.connection import Store, finite_or_none, insert_rows
from actdb.store.database.labels import POSITION_MIN_R2, TOKEN_MIN_R2
from actdb.store.database.registry import resolve_sets
from actdb.store.database.schema import ActivationSet, Checkpoint, Dataset, NeuronExplanation, SetExplanation
from actdb.store.device import resolve_device
from actdb.store.errors import ActdbError
from actdb.store.files.activation import ActivationReader
from actdb.store.files.explanation import explanation_path, pack_strings, write_explanations
from actdb.store.files.token import TokenDataset
from actdb.store.hook_names import HOOK_NAME
from actdb.store.ingest.model_loading import load_model
from actdb.store.ingest.pipeline import IngestRequest, IngestResult, ingest
from actdb.store.ingest.token_datasets import load_tokenizer
from actdb.store.ingest.top_activations import top_activations_from_file
from actdb.store.refs import SetRef, examples_command
from actdb.store.set_files import expected_header, set_identity
from actdb.store.token_text import stored_text, token_bytes

TOP_TOKENS = 10  # tokens by mean activation kept per neuron
MAX_TOP_K = 1000


@dataclass(kw_only=True)
class ExplainRequest:
    """What `actdb examples` asks for: sets to explain and how."""

    sets: list[SetRef]
    dataset: str | None = None
    hook: str = HOOK_NAME
    top_k: int = 32
    min_count: int = DEFAULT_MIN_COUNT
    vocabulary: bool = True
    memory_budget: int | None = None
    device: str = "auto"
    force: bool = False
    progress: bool = True

    def check(self) -> None:
        if not 1 <= self.top_k <= MAX_TOP_K:
            raise ActdbError(f"--top-k must be in 1..{MAX_TOP_K}")
        if self.min_count < 1:
            raise ActdbError("--min-count must be at least 1")


def explain_sets(store: Store, req: ExplainRequest, log: Callable[[str], None] = print) -> list[int]:
    """Build the explanation of every requested set that has none (all with `force`); returns their set ids."""
    req.check()
    sets = resolve_sets(store, req.sets, req.dataset, req.hook)
    if req.vocabulary:
        resolve_device(req.device).torch  # noqa: B018 - a bad device is refused before anything is written
    done = []
    for aset, ref in zip(sets, req.sets, strict=True):
        if not req.force and explained(store, aset.id):
            log(f"{ref}: already explained; --force rebuilds it")
            continue
        explain_set(
            store,
            aset,
            top_k=req.top_k,
            min_count=req.min_count,
            vocabulary=req.vocabulary,
            memory_budget=req.memory_budget,
            device=req.device,
            progress=req.progress,
            log=log,
            what=str(ref),
        )
        done.append(aset.id)
    return done


def explained(store: Store, set_id: int) -> bool:
    """Whether the set has an explanation row and its file is still there."""
    with store.session() as s:
        row = s.get(SetExplanation, set_id)
        return row is not None and store.config.file(row.path).exists()


def ingest_and_explain(store: Store, req: IngestRequest, log: Callable[[str], None] = print) -> IngestResult:
    """Ingest (streaming the top-K examples), then explain the new set with the model already in memory. A set
    that was already complete but has no explanation (an ingest stopped between the two) is explained from its
    file, unless `--top-k 0` asks for none."""
    result = ingest(store, req, log)
    missing = result.status == "already complete" and req.top_k > 0 and not explained(store, result.set_id)
    if not missing and (result.examples is None or result.model is None):
        return result
    with store.session() as s:
        aset = s.get(ActivationSet, result.set_id)
    what = f"{req.model}@{req.step}"
    if missing:
        log(f"{what}: complete but not explained; explaining it now")
    try:
        explain_set(
            store,
            aset,
            top_k=req.top_k,
            examples=result.examples,
            model=result.model,
            device=req.device,
            progress=req.progress,
            log=log,
            what=what,
        )
    except (ActdbError, OSError) as exc:  # the activations are complete and stay so; explaining can be redone
        retry = examples_command(what, req.dataset, req.hook)
        log(f"{what}: ingested, but explaining it failed ({exc}); `{retry}` retries")
    result.model = None
    return result


def explain_set(
    store: Store,
    aset: ActivationSet,
    *,
    top_k: int = 32,
    min_count: int = DEFAULT_MIN_COUNT,
    examples: tuple[np.ndarray, np.ndarray] | None = None,
    model: object | None = None,
    vocabulary: bool = True,
    memory_budget: int | None = None,
    device: str = "auto",
    progress: bool = True,
    log: Callable[[str], None] = print,
    what: str = "",
) -> Path:
    """Examples (streamed or rebuilt from the file), token/position fractions and vocabulary statistics of one
    complete set: the explanation file next to its activations, and one SQL row per neuron."""
    path = store.config.file(aset.path)
    with store.session() as s:
        ds = s.get(Dataset, aset.dataset_id)
        ckpt = s.get(Checkpoint, aset.checkpoint_id)
        dataset_path, source, revision = ds.path, ckpt.source, ckpt.revision
        dataset_tokenizer = store.config.tokenizer_location(ds.tokenizer, ds.name)
        expected = expected_header(s, aset)
        identity = set_identity(s, aset.id)
    tokens = TokenDataset.load(store.config.file(dataset_path))
    with ActivationReader(path, expected=expected) as reader:
        n_layers, d_mlp = reader.header.n_layers, reader.header.d_mlp
        bar = tqdm(total=0, unit="tok", unit_scale=True, disable=not progress, desc=f"explain {what}")

        def advance(rows: int) -> None:
            if bar.n + rows > bar.total:
                bar.total += tokens.tokens.size
            bar.update(rows)

        try:
            if examples is None:
                examples = top_activations_from_file(reader, tokens.mask.reshape(-1), top_k, progress=advance)
            explained_tokens = explain_tokens(
                reader,
                tokens.tokens,
                tokens.mask,
                top=TOP_TOKENS,
                min_count=min_count,
                progress=advance,
                **({"memory_budget": memory_budget} if memory_budget else {}),
            )
        finally:
            bar.close()
    vocab = None
    if vocabulary:
        if model is None:
            location = store.config.model_location(source, what or f"set {aset.id}")
            model = load_model(location, revision, resolve_device(device).torch)
        vocab = vocabulary_statistics(model)
        if vocab.mean.shape != (n_layers, d_mlp):
            raise ActdbError(f"the weights of {what} have {vocab.mean.shape} MLP neurons, the set {(n_layers, d_mlp)}")
    values, positions = examples
    n_vocab = max(int(tokens.tokens.max()) + 1, vocab.vocab_size if vocab is not None else 0)
    groups = {
        "examples": {"values": values, "positions": positions},
        "tokens": explained_tokens.arrays(),
        "strings": pack_strings(token_texts(dataset_tokenizer, n_vocab)),
    }
    if vocab is not None:
        groups["vocabulary"] = vocabulary_arrays(vocab)
    target = explanation_path(path)
    write_explanations(
        target,
        groups,
        {"k": values.shape[2], "min_count": min_count, "n_counted": explained_tokens.n_counted},
        keep_existing=False,
        identity=identity,
    )
    _record(store, aset, target, values, explained_tokens, vocab, tokens)
    n_tok = int(np.isfinite(explained_tokens.token_r2).sum())
    log(f"{what}: explained {n_layers} x {d_mlp} neurons ({n_tok} with variance) -> {target.name}")
    return target


@functools.lru_cache(maxsize=4)
def token_texts(tokenizer_source: str, n: int) -> list[str]:
    """Each token id's bytes (`actdb.store.token_text`: characters split across tokens join again), stored with
    the explanations so readers show contexts without loading a tokenizer (ids past the tokenizer's vocabulary
    read as `<id>`). Kept per tokenizer: every set of a dataset stores the same texts, and decoding 50k ids is not
    free."""
    tokenizer = load_tokenizer(tokenizer_source)
    known = min(n, len(tokenizer))
    texts = [stored_text(raw) for raw in token_bytes(tokenizer, range(known))]  # bytes kept: see token_text
    return texts + [f"<{i}>" for i in range(known, n)]


def vocabulary_arrays(vocab: VocabularyStats) -> dict[str, np.ndarray]:
    """The datasets of the explanation file's `vocabulary` group."""
    return {
        "mean": vocab.mean,
        "var": vocab.var,
        "skew": vocab.skew,
        "kurtosis": vocab.kurtosis,
        "top_ids": vocab.top_ids,
        "top_values": vocab.top_values,
        "bottom_ids": vocab.bottom_ids,
        "bottom_values": vocab.bottom_values,
    }


def _record(
    store: Store,
    aset: ActivationSet,
    target: Path,
    values: np.ndarray,
    tok: TokenExplanations,
    vocab: VocabularyStats | None,
    tokens: TokenDataset,
) -> None:
    n_layers, d_mlp = tok.token_r2.shape
    labels = vocab.labels() if vocab is not None else None
    counted = tokens.tokens[tokens.mask]
    rows = []
    for layer in range(n_layers):
        for n in range(d_mlp):
            top = int(tok.top_ids[layer, n, 0]) if tok.top_ids.shape[2] else -1
            rows.append(
                {
                    "set_id": aset.id,
                    "layer": layer,
                    "neuron": n,
                    "max_activation": finite_or_none(values[layer, n, 0]) if values.shape[2] else None,
                    "token_r2": finite_or_none(tok.token_r2[layer, n]),
                    "position_r2": finite_or_none(tok.position_r2[layer, n]),
                    "top_token": top if top >= 0 else None,
                    "top_token_mean": finite_or_none(tok.top_means[layer, n, 0]) if top >= 0 else None,
                    "top_token_count": int(tok.top_counts[layer, n, 0]) if top >= 0 else None,
                    "vocab_mean": finite_or_none(vocab.mean[layer, n]) if vocab is not None else None,
                    "vocab_var": finite_or_none(vocab.var[layer, n]) if vocab is not None else None,
                    "vocab_skew": finite_or_none(vocab.skew[layer, n]) if vocab is not None else None,
                    "vocab_kurtosis": finite_or_none(vocab.kurtosis[layer, n]) if vocab is not None else None,
                    "vocab_label": (labels[layer, n] or None) if labels is not None else None,
                }
            )
    with store.session() as s:
        s.execute(delete(NeuronExplanation).where(NeuronExplanation.set_id == aset.id))
        s.execute(delete(SetExplanation).where(SetExplanation.set_id == aset.id))
        s.add(
            SetExplanation(
                set_id=aset.id,
                path=str(Path(aset.path).with_name(target.name)),
                top_k=int(values.shape[2]),
                min_count=tok.min_count,
                n_tokens=tok.n_counted,
                n_token_ids=len(np.unique(counted)),
                n_positions=tokens.seq_len,
                token_min_r2=TOKEN_MIN_R2,
                position_min_r2=POSITION_MIN_R2,
                vocab_kurtosis_min=VOCAB_KURTOSIS_MIN if vocab is not None else None,
                vocab_skew_min=VOCAB_SKEW_MIN if vocab is not None else None,
            )
        )
        s.flush()
        insert_rows(s, NeuronExplanation, rows)


def set_explanation(store: Store, set_id: int) -> SetExplanation | None:
    """The set's explanation row, or None."""
    with store.session() as s:
        return s.scalar(select(SetExplanation).where(SetExplanation.set_id == set_id))
