"""Ablation: mean cross-entropy on a dataset's counted positions with chosen MLP neurons replaced by zero or by
their mean, against the clean run and against random neuron sets matched per layer in size.

By default activations are replaced only at counted positions (`positions="counted"`): BOS, EOS, padding and
excluded tokens keep their own values, as they did when the neuron's mean was measured over counted positions
only; `positions="all"` replaces them everywhere (the behaviour before this was an option).

`--each` ablates neurons one at a time without a full pass each: the clean computation below a neuron's layer
is shared (`LossEvaluator.single_neuron_losses`), and on a GPU several variants are stacked per call.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

from actdb.compute.ablation.hooks import LayerOutputs, MLPEditor, hidden_of, resume_after_layer
from actdb.store.errors import ActdbError
from actdb.store.ingest.architectures import MLPRecorder, adapter_for, mlp_adds_to_residual, mlp_shape
from actdb.store.refs import Neuron

POSITIONS = ("counted", "all")


class PositionMask:
    """Where the edits of the current batch apply: the `(batch, seq)` counted-position mask, or None for every
    position. The evaluator sets it before each forward pass; the edit hooks read it."""

    def __init__(self) -> None:
        self.current: torch.Tensor | None = None


@dataclass
class LossEvaluator:
    """Runs a model over the first sequences of a token dataset and averages next-token CE on counted targets."""

    model: torch.nn.Module
    tokens: np.ndarray
    mask: np.ndarray
    batch_size: int = 8
    device: torch.device = torch.device("cpu")
    positions: str = "counted"
    forward_passes: int = 0

    def __post_init__(self) -> None:
        if self.positions not in POSITIONS:
            raise ActdbError(f"unknown positions {self.positions!r}; use counted or all")
        self.n_layers, self.d_mlp = mlp_shape(self.model)
        self.where = PositionMask()

    def _batch(self, s0: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Token ids and counted targets of the batch starting at sequence `s0`; points `where` at its mask."""
        ids = torch.from_numpy(self.tokens[s0 : s0 + self.batch_size].astype(np.int64)).to(self.device)
        mask = torch.from_numpy(self.mask[s0 : s0 + self.batch_size]).to(self.device)
        self.where.current = mask if self.positions == "counted" else None
        return ids, mask[:, 1:]

    @property
    def n_targets(self) -> int:
        return int(self.mask[:, 1:].sum())

    def loss(self, edits: dict[int, Callable[[torch.Tensor], torch.Tensor]] | None = None) -> float:
        """Mean next-token CE over counted targets (a target counts when its own position is counted)."""
        total, count = 0.0, 0
        with MLPEditor(self.model, edits or {}), torch.inference_mode():
            for s0 in range(0, self.tokens.shape[0], self.batch_size):
                ids, tmask = self._batch(s0)
                logits = self.model(input_ids=ids, use_cache=False).logits
                self.forward_passes += 1
                total += float((_token_ce(logits, ids, 1) * tmask).sum())
                count += int(tmask.sum())
        if count == 0:
            raise ActdbError("the evaluated tokens contain no counted targets; raise --tokens")
        return total / count

    def single_neuron_losses(
        self, neurons: list[Neuron], method: str, means: dict[Neuron, float], variants_per_pass: int
    ) -> np.ndarray:
        """Mean CE with each neuron ablated on its own, sharing the clean computation below its layer.

        One clean pass per batch records every layer's MLP activation and output. Ablating neuron n of layer L
        changes that layer's output by `W_out[n] * (value - post_n)` (the residual stream is additive), so each
        variant resumes from layer L's cached output plus that delta and runs only the layers above it and the
        unembedding; `variants_per_pass` variants are stacked in one such call. Architectures whose MLP output
        is normalised again before it joins the residual stream (gemma2, gemma3, olmo2) break that additivity,
        and are measured with one full hooked pass per neuron instead.
        """
        if not mlp_adds_to_residual(self.model):
            return np.array([self.loss(set_edits([n], method, means, self.where)) for n in neurons])
        adapter = adapter_for(self.model)
        groups = []
        for layer in sorted({lay for lay, _ in neurons}):
            members = [k for k, (lay, _) in enumerate(neurons) if lay == layer]
            groups += [(layer, members[i : i + variants_per_pass]) for i in range(0, len(members), variants_per_pass)]
        total = np.zeros(len(neurons))
        count = 0
        with torch.inference_mode():
            for s0 in range(0, self.tokens.shape[0], self.batch_size):
                ids, tmask = self._batch(s0)
                b = ids.shape[0]
                with MLPRecorder(self.model) as post, LayerOutputs(self.model) as outs:
                    self.model.base_model(input_ids=ids, use_cache=False)
                self.forward_passes += 1
                for layer, members in groups:
                    p = post.outputs[layer]
                    x = torch.zeros((len(members), *p.shape), dtype=p.dtype, device=p.device)
                    at = None if self.where.current is None else self.where.current.to(p.dtype)
                    for g, k in enumerate(members):
                        n = neurons[k][1]
                        value = 0.0 if method == "zero" else means[neurons[k]]
                        x[g, :, :, n] = value - p[:, :, n] if at is None else (value - p[:, :, n]) * at
                    proj = adapter.out_proj(adapter.layers(self.model)[layer])
                    # proj is affine (W x + b): proj(x) - proj(0) = W x is the change of the layer's output,
                    # without counting its bias a second time
                    delta = proj(x.view(-1, *p.shape[1:])) - proj(torch.zeros_like(p[:1, :1]))
                    template = outs.outputs[layer]
                    hidden = hidden_of(template).repeat(len(members), 1, 1) + delta
                    with resume_after_layer(self.model, layer, hidden, template):
                        logits = self.model(input_ids=ids.repeat(len(members), 1), use_cache=False).logits
                    self.forward_passes += 1
                    ce = _token_ce(logits, ids, len(members)).view(len(members), b, -1)
                    total[members] += (ce * tmask).sum(dim=(1, 2)).double().cpu().numpy()
                count += int(tmask.sum())
        if count == 0:
            raise ActdbError("the evaluated tokens contain no counted targets; raise --tokens")
        return total / count


def _token_ce(logits: torch.Tensor, ids: torch.Tensor, n_variants: int) -> torch.Tensor:
    """Per-position next-token cross-entropy `(n_variants * batch, seq - 1)` for logits of stacked variants."""
    targets = ids[:, 1:].repeat(n_variants, 1)
    flat = logits[:, :-1].float().reshape(-1, logits.shape[-1])
    return torch.nn.functional.cross_entropy(flat, targets.reshape(-1), reduction="none").view(targets.shape)


def set_edits(
    neurons: list[Neuron], method: str, means: dict[Neuron, float], where: PositionMask | None = None
) -> dict[int, Callable]:
    """Hooks replacing the given neurons (all in every variant) by 0 or their mean, at the positions `where`
    marks for the current batch (every position without it)."""
    by_layer: dict[int, list[int]] = {}
    for layer, n in neurons:
        by_layer.setdefault(layer, []).append(n)
    edits = {}
    for layer, idx in by_layer.items():
        values = torch.tensor([0.0 if method == "zero" else means[(layer, n)] for n in idx])
        index = torch.tensor(idx)

        def edit(x: torch.Tensor, index=index, values=values) -> torch.Tensor:
            x = x.clone()
            new = values.to(x.dtype).to(x.device).expand(*x.shape[:-1], len(index))
            at = None if where is None else where.current
            if at is not None:
                at = at.reshape(x.shape[:-1])  # (batch, seq), or flattened to tokens where the MLP sees them so (OPT)
            x[..., index] = new if at is None else torch.where(at[..., None], new, x[..., index])
            return x

        edits[layer] = edit
    return edits


def _by_layer(neurons: list[Neuron]) -> dict[int, set[int]]:
    per_layer: dict[int, set[int]] = {}
    for layer, n in neurons:
        per_layer.setdefault(layer, set()).add(n)
    return per_layer


def check_control_count(neurons: list[Neuron], d_mlp: int, k: int) -> None:
    """A one-line error when fewer than `k` distinct matched random sets exist (a set draws, per layer, as many
    neurons as were selected there from those that were not). Known from the selection alone, so `actdb ablate`
    checks it before any forward pass or row."""
    per_layer = _by_layer(neurons)
    possible = math.prod(math.comb(d_mlp - len(s), len(s)) for s in per_layer.values())
    if k <= possible:
        return
    crowded = [(layer, len(s)) for layer, s in sorted(per_layer.items()) if 2 * len(s) > d_mlp]
    why = (
        f": layer {crowded[0][0]} has {crowded[0][1]} of its {d_mlp} neurons selected, more than the "
        f"{d_mlp - crowded[0][1]} left to draw a matched set from"
        if crowded
        else ""
    )
    raise ActdbError(f"--controls {k} is more than the {possible} distinct matched random sets that exist{why}")


def matched_controls(neurons: list[Neuron], d_mlp: int, k: int, seed: int) -> list[list[Neuron]]:
    """K random neuron sets with the same count per layer, drawn from the neurons not selected."""
    check_control_count(neurons, d_mlp, k)
    per_layer = _by_layer(neurons)
    rng = np.random.default_rng(seed)
    out, seen = [], set()
    while len(out) < k:
        draw = []
        for layer, chosen in sorted(per_layer.items()):
            pool = np.setdiff1d(np.arange(d_mlp), np.fromiter(chosen, dtype=np.int64))
            draw += [(layer, int(n)) for n in sorted(rng.choice(pool, size=len(chosen), replace=False))]
        key = tuple(draw)
        if key not in seen:
            seen.add(key)
            out.append(draw)
    return out


def default_variants_per_pass(device: torch.device) -> int:
    """How many single-neuron variants are stacked per call: 16 on a GPU, where a batch of 8 leaves the device
    idle; 1 on a CPU, where stacking only makes the memory-bound ops (logits, cross-entropy) slower
    (benchmarks/RESULTS.md)."""
    return 16 if device.type == "cuda" else 1


P_SIGNIFICANT = 0.05
MIN_CONTROLS_FOR_SIGNIFICANCE = 19  # (1 + 0) / (1 + 19) = 0.05 is the smallest p-value 19 controls can give


@dataclass(frozen=True)
class ControlStats:
    """How the ablated set's delta compares with K matched random controls."""

    n: int
    mean: float
    sd: float | None  # None with one control
    min: float
    max: float
    ci_low: float | None  # 95% t-interval of the controls' mean (K - 1 degrees of freedom)
    ci_high: float | None
    p_value: float  # permutation p: (1 + #controls with delta >= observed) / (1 + K), one-sided
    p_floor: float  # the smallest p-value K controls can reach: 1 / (1 + K)

    @classmethod
    def of(cls, deltas: np.ndarray, observed: float) -> ControlStats:
        from scipy import stats

        k = len(deltas)
        mean = float(deltas.mean())
        sd = float(deltas.std(ddof=1)) if k > 1 else None
        low = high = None
        if sd is not None:
            half = float(stats.t.ppf(0.975, k - 1)) * sd / math.sqrt(k)
            low, high = mean - half, mean + half
        p = (1 + int((deltas >= observed).sum())) / (k + 1)
        return cls(k, mean, sd, float(deltas.min()), float(deltas.max()), low, high, p, 1 / (k + 1))

    def floor_note(self) -> str | None:
        """One line when K controls cannot show significance at 0.05."""
        if self.n >= MIN_CONTROLS_FOR_SIGNIFICANCE:
            return None
        return (
            f"note: with {self.n} controls the smallest reachable p-value is 1/{self.n + 1} = {self.p_floor:.3f}; "
            f"p < {P_SIGNIFICANT} needs at least {MIN_CONTROLS_FOR_SIGNIFICANCE} (--controls)"
        )


@dataclass
class AblationOutcome:
    base_loss: float
    ablated_loss: float
    delta: float
    control_deltas: np.ndarray
    each: list[tuple[Neuron, float]]
    forward_passes: int

    @property
    def controls(self) -> ControlStats | None:
        return ControlStats.of(self.control_deltas, self.delta) if len(self.control_deltas) else None


def ablate(
    evaluator: LossEvaluator,
    neurons: list[Neuron],
    method: str,
    means: dict[Neuron, float],
    n_controls: int = 0,
    seed: int = 0,
    each: bool = False,
    variants_per_pass: int | None = None,
    progress: bool = True,
) -> AblationOutcome:
    """Clean loss, loss with all `neurons` replaced, K matched controls, and optionally each neuron alone."""
    for layer, n in neurons:
        if not (0 <= layer < evaluator.n_layers and 0 <= n < evaluator.d_mlp):
            raise ActdbError(
                f"neuron {layer}.{n} is out of range ({evaluator.n_layers} layers x {evaluator.d_mlp} neurons)"
            )
    controls = matched_controls(neurons, evaluator.d_mlp, n_controls, seed) if n_controls and neurons else []
    if variants_per_pass is None:
        variants_per_pass = default_variants_per_pass(evaluator.device)
    total = 2 + len(controls) + (math.ceil(len(neurons) / variants_per_pass) if each else 0)
    bar = tqdm(total=total, disable=not progress, desc="ablate", unit="eval", dynamic_ncols=True)
    base = evaluator.loss()
    bar.update()
    ablated = evaluator.loss(set_edits(neurons, method, means, evaluator.where)) if neurons else base
    bar.update()
    deltas = []
    for control in controls:
        deltas.append(evaluator.loss(set_edits(control, method, means, evaluator.where)) - base)
        bar.update()
    singles: list[tuple[Neuron, float]] = []
    if each:
        losses = evaluator.single_neuron_losses(neurons, method, means, variants_per_pass)
        singles = list(zip(neurons, losses.tolist(), strict=True))
        bar.update(total - bar.n)
    bar.close()
    return AblationOutcome(base, ablated, ablated - base, np.array(deltas), singles, evaluator.forward_passes)
