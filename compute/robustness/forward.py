"""Forward passes of every seed on a batch of contexts, with and without an intervention, reduced at once to
per-context numbers (so memory does not grow with the number of contexts).

For each variant (the intervention and its controls) a batch yields, per context: IR(x), IR(x'), their difference
IR_norm (means over the evaluated positions), and per seed KL(p_k(x) || p_k(x')), the loss change and the top-1
flip rate; per seed the summed cross-entropies (pooled like `actdb ablate`), and the counts Fleiss' kappa of
flips needs. The clean pass of each seed is shared by every variant.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from actdb.compute.ablation.hooks import MLPEditor
from actdb.compute.robustness.math import Distributions, fleiss_kappa_from_sums, interventional_robustness, jsd_bits

Edits = dict[int, Callable[[torch.Tensor], torch.Tensor]]


@dataclass
class Variant:
    """One intervened version of a batch: the token ids each seed reads `(batch, seq)`, which next-token
    predictions count `(batch, seq - 1)`, and per seed the MLP edits (None: no internal edit)."""

    ids: torch.Tensor
    evaluated: torch.Tensor
    edits: list[Edits | None]


@dataclass
class VariantTally:
    """What one variant accumulated over every batch of one step."""

    n_seeds: int
    ir_clean: list[np.ndarray] = field(default_factory=list)  # per context
    ir_intervened: list[np.ndarray] = field(default_factory=list)
    kl: list[np.ndarray] = field(default_factory=list)  # (contexts, seeds)
    loss_change: list[np.ndarray] = field(default_factory=list)
    flip_rate: list[np.ndarray] = field(default_factory=list)
    ce_clean: np.ndarray | None = None  # per seed, summed over evaluated targets
    ce_intervened: np.ndarray | None = None
    n_targets: int = 0
    flip_sum_sq: float = 0.0
    flip_totals: np.ndarray = field(default_factory=lambda: np.zeros(2))

    def __post_init__(self) -> None:
        self.ce_clean = np.zeros(self.n_seeds)
        self.ce_intervened = np.zeros(self.n_seeds)

    def _cat(self, parts: list[np.ndarray]) -> np.ndarray:
        rows = np.concatenate(parts) if parts else np.zeros((0,))
        keep = ~np.isnan(np.concatenate(self.ir_clean)) if self.ir_clean else np.zeros(0, dtype=bool)
        return rows[keep]

    @property
    def ir_norm(self) -> np.ndarray:
        """Per context IR(x') - IR(x), contexts with no evaluated position left out."""
        return self._cat(self.ir_intervened) - self._cat(self.ir_clean)

    def per_context(self, name: str) -> np.ndarray:
        return self._cat(getattr(self, name))

    @property
    def fleiss_kappa(self) -> float:
        return fleiss_kappa_from_sums(self.n_targets, self.n_seeds, self.flip_sum_sq, self.flip_totals)


@dataclass
class Timing:
    """Seconds spent in forward passes and in the dispersion measures (the benchmark reports the share)."""

    forward: float = 0.0
    measures: float = 0.0


def log_probs(model: torch.nn.Module, ids: torch.Tensor, edits: Edits | None) -> torch.Tensor:
    """Next-token log-probabilities `(batch, seq - 1, vocab)` of one seed, with its MLP edits applied."""
    with MLPEditor(model, edits or {}), torch.inference_mode():
        logits = model(input_ids=ids, use_cache=False).logits[:, :-1]
    return torch.log_softmax(logits.float(), dim=-1)


def _per_context(values: torch.Tensor, evaluated: torch.Tensor) -> np.ndarray:
    """Mean over each context's evaluated positions of `(..., batch, seq - 1)` values (NaN with none)."""
    w = evaluated.to(values.dtype)
    total = (values * w).sum(-1)
    count = w.sum(-1)
    return (total / count).double().cpu().numpy()


def score_batch(
    models: list[torch.nn.Module],
    ids: torch.Tensor,
    variants: list[Variant],
    tallies: list[VariantTally],
    topk: int | None = None,
    timing: Timing | None = None,
) -> None:
    """Run every seed clean once and under every variant, and add the batch to each variant's tally."""
    timing = timing or Timing()
    n = len(models)
    t0 = time.perf_counter()
    clean = torch.stack([log_probs(m, ids, None) for m in models])
    timing.forward += time.perf_counter() - t0
    t0 = time.perf_counter()
    clean_d = Distributions.of(clean)
    ir_clean = interventional_robustness(clean_d.jsd() if topk is None else jsd_bits(clean, topk), n)
    ce_clean = -clean.gather(-1, ids[None, :, 1:, None].expand(n, -1, -1, 1)).squeeze(-1)
    top_clean = clean.argmax(-1)
    timing.measures += time.perf_counter() - t0
    for variant, tally in zip(variants, tallies, strict=True):
        t0 = time.perf_counter()
        lp = torch.stack([log_probs(m, variant.ids, e) for m, e in zip(models, variant.edits, strict=True)])
        timing.forward += time.perf_counter() - t0
        t0 = time.perf_counter()
        ev = variant.evaluated
        d = Distributions.of(lp)
        ir = interventional_robustness(d.jsd() if topk is None else jsd_bits(lp, topk), n)
        ce = -lp.gather(-1, variant.ids[None, :, 1:, None].expand(n, -1, -1, 1)).squeeze(-1)
        flips = lp.argmax(-1) != top_clean  # (seeds, batch, seq - 1)
        tally.ir_clean.append(_per_context(ir_clean, ev))
        tally.ir_intervened.append(_per_context(ir, ev))
        tally.kl.append(_per_context(clean_d.kl_to(d), ev).T)
        tally.loss_change.append(_per_context(ce - ce_clean, ev).T)
        tally.flip_rate.append(_per_context(flips.float(), ev).T)
        w = ev.to(torch.float64)
        tally.ce_clean += (ce_clean.double() * w).sum((1, 2)).cpu().numpy()
        tally.ce_intervened += (ce.double() * w).sum((1, 2)).cpu().numpy()
        n_flip = flips.sum(0)[ev].double()  # per evaluated position: how many seeds flip
        tally.n_targets += int(ev.sum())
        tally.flip_sum_sq += float((n_flip**2 + (n - n_flip) ** 2).sum())
        tally.flip_totals += np.array([float(n_flip.sum()), float((n - n_flip).sum())])
        timing.measures += time.perf_counter() - t0
