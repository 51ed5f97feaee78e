"""How alike models are by what they predict: for every pair of checkpoints, the share of counted positions
where their top-1 next tokens agree and the Pearson correlation of their per-token losses (from stored
predictions), and optionally the mean Jensen-Shannon divergence of their full next-token distributions
(`exact`: the two models run side by side)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from itertools import combinations

import numpy as np
import torch
from sqlalchemy import select

from actdb.store.database.connection import Rows, Store
from actdb.store.database.registry import checkpoints_dataset, get_checkpoint, get_dataset
from actdb.store.database.schema import PredictionSet
from actdb.store.device import resolve_device
from actdb.store.errors import ActdbError
from actdb.store.files.prediction import read_predictions
from actdb.store.files.token import TokenDataset
from actdb.store.ingest.model_loading import load_model
from actdb.store.refs import SetRef
from actdb.store.set_files import sidecar_identity

COLUMNS = ["model", "step", "other_model", "other_step", "top1_agreement", "loss_corr", "mean_loss", "other_mean_loss"]


@dataclass(kw_only=True)
class FunctionRequest:
    sets: list[SetRef]
    dataset: str | None = None
    exact_tokens: int | None = None  # with a value: also the JS divergence on the first this-many tokens
    batch_size: int = 8
    device: str = "auto"


def function_similarity(store: Store, req: FunctionRequest, log: Callable[[str], None] = print) -> Rows:
    """Every pair of the request's checkpoints (each with itself too), one row per ordered pair."""
    if len(req.sets) < 2:
        raise ActdbError("function similarity needs at least two checkpoints")
    dataset = req.dataset or checkpoints_dataset(store, req.sets)
    preds, sources = {}, {}
    with store.session() as s:
        ds = get_dataset(s, dataset)
        tokens_path = ds.path
        for ref in req.sets:
            ckpt = get_checkpoint(s, ref.model, ref.step)
            path = s.scalar(
                select(PredictionSet.path).where(
                    PredictionSet.checkpoint_id == ckpt.id,
                    PredictionSet.dataset_id == ds.id,
                    PredictionSet.status == "complete",
                )
            )
            if path is None:
                stale = s.scalar(
                    select(PredictionSet.error).where(
                        PredictionSet.checkpoint_id == ckpt.id,
                        PredictionSet.dataset_id == ds.id,
                        PredictionSet.status == "stale",
                    )
                )
                state = f"predictions on {dataset} are stale ({stale})" if stale else f"has no predictions on {dataset}"
                raise ActdbError(f"{ref} {state}; run `actdb predictions {ref} --dataset {dataset}` first")
            preds[ref] = read_predictions(store.config.file(path), sidecar_identity(s, ckpt.id, ds.id))
            if req.exact_tokens:
                sources[ref] = (store.config.model_location(ckpt.source, str(ref)), ckpt.revision)
    rows = []
    for a in req.sets:
        for b in req.sets:
            rows.append(_pair_row(a, b, preds[a], preds[b]))
    result = Rows(COLUMNS, rows)
    if req.exact_tokens:
        tokens = TokenDataset.load(store.config.file(tokens_path))
        js = exact_divergences(req, tokens, sources, log)
        result = Rows(
            [*COLUMNS, "js_divergence"],
            [dict(r, js_divergence=js.get((r["model"], r["step"], r["other_model"], r["other_step"]))) for r in rows],
        )
    return result


def _pair_row(a: SetRef, b: SetRef, pa, pb) -> dict:
    counted = np.isfinite(pa.loss) & np.isfinite(pb.loss)
    agreement = float((pa.top1[counted] == pb.top1[counted]).mean()) if counted.any() else None
    la, lb = pa.loss[counted].astype(np.float64), pb.loss[counted].astype(np.float64)
    corr = float(np.corrcoef(la, lb)[0, 1]) if counted.sum() > 1 and la.std() > 0 and lb.std() > 0 else None
    return {
        "model": a.model,
        "step": a.step,
        "other_model": b.model,
        "other_step": b.step,
        "top1_agreement": agreement,
        "loss_corr": corr,
        "mean_loss": float(np.nanmean(pa.loss)),
        "other_mean_loss": float(np.nanmean(pb.loss)),
    }


def js_divergence(logits_a: torch.Tensor, logits_b: torch.Tensor) -> torch.Tensor:
    """Jensen-Shannon divergence (nats, at most ln 2) between the next-token distributions, per position."""
    lp, lq = torch.log_softmax(logits_a.double(), dim=-1), torch.log_softmax(logits_b.double(), dim=-1)
    p, q = lp.exp(), lq.exp()
    lm = torch.log(0.5 * (p + q))
    return 0.5 * (p * (lp - lm)).sum(-1) + 0.5 * (q * (lq - lm)).sum(-1)


def exact_divergences(
    req: FunctionRequest, tokens: TokenDataset, sources: dict, log: Callable[[str], None]
) -> dict[tuple, float]:
    """Mean JS divergence over counted positions of the first `exact_tokens` tokens, for every pair (symmetric),
    two models in memory at a time."""
    device = resolve_device(req.device).torch
    n_seq = max(1, min(tokens.n_sequences, -(-req.exact_tokens // tokens.seq_len)))
    ids_all = tokens.tokens[:n_seq]
    counted = tokens.mask[:n_seq, 1:]
    out: dict[tuple, float] = {}
    for a in req.sets:
        out[(a.model, a.step, a.model, a.step)] = 0.0
    for a, b in combinations(req.sets, 2):
        models = [load_model(*sources[r], device) for r in (a, b)]
        total, count = 0.0, 0
        with torch.inference_mode():
            for s0 in range(0, n_seq, req.batch_size):
                ids = torch.from_numpy(ids_all[s0 : s0 + req.batch_size].astype(np.int64)).to(device)
                la, lb = (m(input_ids=ids, use_cache=False).logits[:, :-1] for m in models)
                js = js_divergence(la, lb).cpu().numpy()
                keep = counted[s0 : s0 + len(ids)]
                total += float(js[keep].sum())
                count += int(keep.sum())
        del models
        value = total / count if count else float("nan")
        out[(a.model, a.step, b.model, b.step)] = out[(b.model, b.step, a.model, a.step)] = value
        log(f"{a} vs {b}: mean JS divergence {value:.5f} nats on {count} positions")
    return out
