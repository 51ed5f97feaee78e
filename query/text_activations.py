"""A neuron's activation on any text: load the checkpoints on demand through ingest's own model loading and MLP
hooks (the same code that filled the store, so a value here equals the stored value for the same tokens) and read
the asked neurons on each token. Serves the explorer's "try a text" box, `actdb activations` and the API.

Bounded: at most `MAX_TEXT_CHARS` characters and `MAX_TOKENS` tokens per text, at most `MAX_CHECKPOINTS`
checkpoints per request, and at most `MAX_LOADED` models held in memory (least recently used dropped first)."""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

from sqlalchemy import select

from actdb.store.database import tables
from actdb.store.database.connection import Rows, Store
from actdb.store.database.registry import get_checkpoint, get_model, resolve_hook
from actdb.store.errors import ActdbError
from actdb.store.hook_names import HOOK_NAME
from actdb.store.token_text import quoted, token_bytes

MAX_TEXT_CHARS = 2000
MAX_TOKENS = 512
MAX_CHECKPOINTS = 12
MAX_LOADED = 4


@dataclass(frozen=True)
class Probe:
    """One neuron to read: MODEL@STEP, layer, neuron."""

    model: str
    step: int
    layer: int
    neuron: int

    @property
    def label(self) -> str:
        return f"{self.model}@{self.step} {self.layer}.{self.neuron}"


class LoadedModels:
    """Models kept loaded between requests, at most `limit` at once (least recently used dropped first); one
    lock, so two requests never load the same checkpoint twice or run a model concurrently."""

    def __init__(self, limit: int = MAX_LOADED, device: str = "auto") -> None:
        self.limit = limit
        self.device = device
        self.lock = threading.Lock()
        self._models: OrderedDict[tuple[str, str | None], Any] = OrderedDict()
        self._tokenizers: dict[str, Any] = {}

    def model(self, location: str, revision: str | None):
        from actdb.store.device import resolve_device
        from actdb.store.ingest.model_loading import load_model

        key = (location, revision)
        if key in self._models:
            self._models.move_to_end(key)
            return self._models[key]
        while len(self._models) >= self.limit:
            self._models.popitem(last=False)
        model = load_model(location, revision, resolve_device(self.device).torch)
        self._models[key] = model
        return model

    def tokenizer(self, source: str):
        from actdb.store.ingest.token_datasets import load_tokenizer

        if source not in self._tokenizers:
            self._tokenizers[source] = load_tokenizer(source)
        return self._tokenizers[source]


def _checkpoint_source(store: Store, model: str, step: int, hook: str) -> tuple[str, str | None, Any]:
    """(location, revision, dataset row) of MODEL@STEP: where its weights load from, and the dataset of its
    complete set at `hook` (whose tokenizer the text is cut with)."""
    with store.transaction() as conn:
        ckpt = get_checkpoint(conn, model, step)
        dataset = conn.execute(
            select(tables.dataset.c.name, tables.dataset.c.tokenizer, tables.dataset.c.tokenizer_fingerprint)
            .join(tables.activation_set, tables.activation_set.c.dataset_id == tables.dataset.c.id)
            .where(
                tables.activation_set.c.checkpoint_id == ckpt.id,
                tables.activation_set.c.status == "complete",
                tables.activation_set.c.hook == hook,
            )
            .order_by(tables.dataset.c.name)
            .limit(1)
        ).first()
    if dataset is None:
        raise ActdbError(f"{model}@{step} has no complete activation set at {hook}; ingest it first")
    location = store.config.model_location(ckpt.source, f"{model}@{step}")
    return location, ckpt.revision, dataset


def text_activations(
    store: Store, probes: list[Probe], text: str, loaded: LoadedModels, hook: str | None = None
) -> Rows:
    """Per token of `text` (cut with the first probe's dataset tokenizer, a BOS token first where the tokenizer
    has one, as ingest does; the BOS row is not shown): position, token (quoted, so spaces show) and one column
    per probe."""
    if not text or not text.strip():
        raise ActdbError("give a text to run")
    if len(text) > MAX_TEXT_CHARS:
        raise ActdbError(f"the text has {len(text)} characters; at most {MAX_TEXT_CHARS} are run")
    if not probes:
        raise ActdbError("no neurons asked for")
    checkpoints = list(dict.fromkeys((p.model, p.step) for p in probes))
    if len(checkpoints) > MAX_CHECKPOINTS:
        raise ActdbError(f"{len(checkpoints)} checkpoints asked for; at most {MAX_CHECKPOINTS} per text")
    hook = resolve_hook(store, hook, probes[0].model, probes[0].step) or HOOK_NAME
    with store.transaction() as conn:
        for p in probes:
            m = get_model(conn, p.model)
            if not (0 <= p.layer < m.n_layers and 0 <= p.neuron < m.d_mlp):
                raise ActdbError(
                    f"neuron {p.layer}.{p.neuron} does not exist ({p.model} has {m.n_layers} layers x "
                    f"{m.d_mlp} neurons)"
                )
    sources = {c: _checkpoint_source(store, *c, hook) for c in checkpoints}
    first = sources[checkpoints[0]][2]
    for (model, step), (_loc, _rev, ds) in sources.items():
        if ds.tokenizer_fingerprint != first.tokenizer_fingerprint:
            raise ActdbError(
                f"{model}@{step} was ingested with another tokenizer than {checkpoints[0][0]}; "
                "compare models of one tokenizer"
            )
    import torch

    from actdb.store.ingest.architectures import MLPRecorder

    tokenizer_location = store.config.tokenizer_location(first.tokenizer, first.name)
    columns: dict[str, list[float]] = {}
    with loaded.lock:
        tokenizer = loaded.tokenizer(tokenizer_location)
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
        if len(ids) > MAX_TOKENS:
            raise ActdbError(f"the text is {len(ids)} tokens; at most {MAX_TOKENS} are run")
        for model_step in checkpoints:
            location, revision, _ds = sources[model_step]
            model = loaded.model(location, revision)
            device = next(model.parameters()).device
            batch = torch.tensor([bos + ids], device=device)
            with MLPRecorder(model, hook) as recorder, torch.no_grad():
                model(batch)
                for p in probes:
                    if (p.model, p.step) == model_step:
                        values = recorder.outputs[p.layer][0, len(bos) :, p.neuron].float().cpu().tolist()
                        columns[p.label] = values
    tokens = [quoted(raw) for raw in token_bytes(tokenizer, ids)]  # as `neuron` and `families` show tokens
    labels = list(dict.fromkeys(p.label for p in probes))
    rows = [
        {"position": k, "token": tok} | {label: columns[label][k] for label in labels} for k, tok in enumerate(tokens)
    ]
    return Rows(["position", "token", *labels], rows, {"position": int, "token": str} | dict.fromkeys(labels, float))
