"""What a checkpoint predicts on a token dataset, kept for comparing models by function: per position its top-1
next token and its cross-entropy on the true next token (NaN where the target does not count), in
`activations/<model>/step-<N>/<dataset>.predictions.h5`. `actdb predictions MODEL@STEP` computes them (also for
sets ingested before this existed); `actdb similarity --function` compares them pairwise.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from sqlalchemy import select
from tqdm.auto import tqdm

from actdb.store.database.connection import Store
from actdb.store.database.lifecycle import request_key, running, start_or_wait
from actdb.store.database.registry import complete_set, get_checkpoint
from actdb.store.database.schema import Dataset, PredictionSet
from actdb.store.device import resolve_device
from actdb.store.files.prediction import Predictions, predictions_path, write_predictions
from actdb.store.files.token import TokenDataset
from actdb.store.ingest.model_loading import load_model
from actdb.store.refs import parse_set_ref
from actdb.store.set_files import sidecar_identity


@dataclass(kw_only=True)
class PredictionRequest:
    target: str  # MODEL@STEP
    dataset: str | None = None
    batch_size: int = 8
    device: str = "auto"
    force: bool = False
    progress: bool = True


def compute_predictions(store: Store, req: PredictionRequest, log: Callable[[str], None] = print) -> int:
    """Run the checkpoint over the dataset once and store its predictions; a complete result is reused."""
    ref = parse_set_ref(req.target)
    with store.session() as s:
        ckpt = get_checkpoint(s, ref.model, ref.step)
        aset = complete_set(s, ref, req.dataset)
        ds = s.get(Dataset, aset.dataset_id)
        source, revision, ckpt_id, ds_id, ds_name, ds_path = (
            ckpt.source,
            ckpt.revision,
            ckpt.id,
            ds.id,
            ds.name,
            ds.path,
        )
        identity = sidecar_identity(s, ckpt_id, ds_id)
    rel = predictions_path(ref.model, ref.step, ds_name)
    key = request_key(kind="predictions", checkpoint=ckpt_id, dataset=ds_id)
    done = store.scalar(
        select(PredictionSet.id).where(PredictionSet.request_key == key, PredictionSet.status == "complete")
    )
    if done is not None and not req.force and store.config.file(rel).exists():
        log(f"{req.target} on {ds_name}: predictions already complete ({rel})")
        return done
    values = {"request_key": key, "checkpoint_id": ckpt_id, "dataset_id": ds_id, "path": rel}
    device = resolve_device(req.device).torch  # a bad device or missing files write no row
    location = store.config.model_location(source, req.target)
    while (row_id := start_or_wait(store, PredictionSet, values, log)) is None:
        pass
    with running(store, PredictionSet, row_id) as handle:
        tokens = TokenDataset.load(store.config.file(ds_path))
        model = load_model(location, revision, device)
        result = predict(model, tokens, req.batch_size, device, req.progress)
        write_predictions(store.config.file(rel), result, identity)
        mean_loss = float(np.nanmean(result.loss))
        handle.complete(n_tokens=int(result.top1.size), mean_loss=mean_loss)
    log(f"{req.target} on {ds_name}: predictions of {result.top1.size} positions, mean loss {mean_loss:.5f} -> {rel}")
    return row_id


def predict(
    model: torch.nn.Module, tokens: TokenDataset, batch_size: int, device: torch.device, progress: bool = False
) -> Predictions:
    """Top-1 next token and per-position CE on counted targets, batch by batch."""
    n_seq, seq_len = tokens.tokens.shape
    top1 = np.zeros((n_seq, seq_len), dtype=np.int32)
    loss = np.full((n_seq, seq_len), np.nan, dtype=np.float32)
    bar = tqdm(total=n_seq * seq_len, unit="tok", unit_scale=True, disable=not progress, desc="predictions")
    with torch.inference_mode():
        for s0 in range(0, n_seq, batch_size):
            ids = torch.from_numpy(tokens.tokens[s0 : s0 + batch_size].astype(np.int64)).to(device)
            logits = model(input_ids=ids, use_cache=False).logits.float()
            top1[s0 : s0 + len(ids)] = logits.argmax(dim=-1).cpu().numpy()
            ce = torch.nn.functional.cross_entropy(
                logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="none"
            ).view(len(ids), seq_len - 1)
            counted = tokens.mask[s0 : s0 + len(ids), 1:]  # a target counts when its own position counts
            block = ce.cpu().numpy()
            loss[s0 : s0 + len(ids), :-1] = np.where(counted, block, np.nan)
            bar.update(ids.numel())
    bar.close()
    return Predictions(top1.reshape(-1), loss.reshape(-1))
