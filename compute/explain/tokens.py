"""How much of each neuron's activation the current token id and the position in the sequence explain.

For each neuron and a grouping g of the counted positions (by token id, or by position), the fraction of
variance explained is eta squared, SS_between / SS_total with SS_between = sum_g n_g (mean_g - mean)^2 and
SS_total = sum (x - mean)^2. Each neuron's top tokens are the token ids with the highest mean activation
among those seen at least `min_count` times.

One streaming pass over the stored file per block of neurons accumulates, in float64, per-token-id and
per-position sums, the total sum and the sum of squares. Token sums need (distinct token ids that occur x
block neurons) float64 (GPT-2 small: 50,257 ids x 36,864 neurons would be 15 GB), so the neurons are split
into blocks that fit a byte budget, and only the token ids that occur get a row.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import scipy.sparse

from actdb.store.errors import ActdbError
from actdb.store.files.activation import CHUNK_NEURONS, ActivationReader

DEFAULT_BUDGET = 2 * 2**30
# A token seen once or twice has a "mean" that is one or two noisy activations, and the largest of tens of
# thousands of such means is mostly noise (the winner's curse): rare tokens would crowd every top list. Five
# occurrences cap one outlier's weight in a mean at 1/5 while keeping tokens rare in a corpus of ~1M tokens.
DEFAULT_MIN_COUNT = 5
FINISH_COLUMNS = 256  # neurons finished at a time: their (token ids x neurons) temporaries stay small


@dataclass
class TokenExplanations:
    """Per neuron `(n_layers, d_mlp)`: variance fractions explained by token id and by position, and top tokens.

    The fractions are NaN for a neuron with zero variance. Note that eta squared grows with the number of groups
    (a token seen once explains its own position exactly), so compare token fractions on the same dataset.
    """

    token_r2: np.ndarray  # (n_layers, d_mlp) float64
    position_r2: np.ndarray  # (n_layers, d_mlp) float64
    top_ids: np.ndarray  # (n_layers, d_mlp, top) int64, highest mean first; -1 where fewer tokens qualify
    top_means: np.ndarray  # (n_layers, d_mlp, top) float64 mean activation of each top token; NaN padding
    top_counts: np.ndarray  # (n_layers, d_mlp, top) int64 counted occurrences of each top token; 0 padding
    n_counted: int  # counted positions the statistics are over
    min_count: int
    n_passes: int = 1

    def arrays(self) -> dict[str, np.ndarray]:
        """The datasets of the sidecar file's `tokens` group."""
        return {
            "token_r2": self.token_r2,
            "position_r2": self.position_r2,
            "top_ids": self.top_ids,
            "top_means": self.top_means,
            "top_counts": self.top_counts,
        }

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray], n_counted: int, min_count: int) -> TokenExplanations:
        """Rebuild from a `tokens` group read back from the sidecar file."""
        return cls(
            arrays["token_r2"],
            arrays["position_r2"],
            arrays["top_ids"],
            arrays["top_means"],
            arrays["top_counts"],
            n_counted,
            min_count,
        )


def block_neurons(n_ids: int, seq_len: int, chunk_rows: int, memory_budget: int) -> int:
    """The most neurons one pass can take within `memory_budget` bytes (at least one, or an error)."""
    # per neuron: float64 sums per token id and per position, sum / sum of squares / shift, and the chunk as read
    # (float64, float16 from the file) with the product of its token one-hot (at most a float64 row per row)
    per = 8 * n_ids + 8 * seq_len + 24 + 18 * chunk_rows
    finish = 16 * n_ids  # per neuron being finished: (ids x neurons) float64 means and argpartition's int64 indices
    many = (memory_budget - FINISH_COLUMNS * finish) // per
    if many >= FINISH_COLUMNS:
        # whole storage chunks of neurons when possible: a block boundary inside one would read it twice
        return int(many - many % CHUNK_NEURONS) if many >= CHUNK_NEURONS else int(many)
    few = memory_budget // (per + finish)
    if few < 1:
        raise ActdbError(
            f"token explanations need at least {(per + finish) / 2**20:.1f} MiB for one neuron ({n_ids} distinct "
            f"token ids) but the budget is {memory_budget / 2**20:.1f} MiB; raise the memory budget"
        )
    return int(few)


def explain_tokens(
    reader: ActivationReader,
    tokens: np.ndarray,
    mask: np.ndarray,
    top: int = 10,
    min_count: int = DEFAULT_MIN_COUNT,
    memory_budget: int = DEFAULT_BUDGET,
    chunk_rows: int = 4096,
    progress: Callable[[int], None] | None = None,
) -> TokenExplanations:
    """Token and position variance fractions and top tokens of every neuron of a stored activation file.

    `tokens` and `mask` are `(n_seq, seq_len)`; only positions where `mask` is true count. `progress` is called
    with the rows read after each chunk; every block of neurons reads the rows again.
    """
    h = reader.header
    tokens, mask = np.asarray(tokens), np.asarray(mask, dtype=bool)
    if tokens.ndim != 2 or mask.shape != tokens.shape or tokens.size != h.n_tokens:
        raise ActdbError(
            f"tokens {tokens.shape} and mask {mask.shape} do not match activation file {reader.path} "
            f"({h.n_tokens} positions)"
        )
    if top < 1 or min_count < 1:
        raise ActdbError("top and min_count must be at least 1")
    seq_len = tokens.shape[1]
    flat_tokens, flat_mask = tokens.reshape(-1).astype(np.int64), mask.reshape(-1)
    counted = flat_tokens[flat_mask]
    if counted.size and counted.min() < 0:
        raise ActdbError("token ids must not be negative")
    used_ids = np.unique(counted)
    # dense index of the token ids that occur: per-token sums need (distinct ids x neurons), not (vocabulary x ..)
    index = np.full(int(flat_tokens.max(initial=0)) + 1, -1, dtype=np.int64)
    index[used_ids] = np.arange(len(used_ids))
    token_counts = np.bincount(index[counted], minlength=len(used_ids)).astype(np.float64)
    position_counts = mask.sum(axis=0).astype(np.float64)
    n_neurons = h.n_layers * h.d_mlp
    seqs = max(1, chunk_rows // seq_len)
    width = block_neurons(len(used_ids), seq_len, seqs * seq_len, memory_budget)
    out = _Outputs(n_neurons, top)
    stats = _Grouping(used_ids, index, token_counts, position_counts, int(flat_mask.sum()), min_count)
    n_passes = 0
    for n0 in range(0, n_neurons, width):
        n1 = min(n_neurons, n0 + width)
        sums = _accumulate(reader, flat_tokens, flat_mask, stats, n0, n1, seq_len, seqs, progress)
        for c0 in range(0, n1 - n0, FINISH_COLUMNS):
            c1 = min(n1 - n0, c0 + FINISH_COLUMNS)
            _finish(sums, stats, c0, c1, out, n0, top)
        n_passes += 1
    shape = (h.n_layers, h.d_mlp)
    return TokenExplanations(
        out.token_r2.reshape(shape),
        out.position_r2.reshape(shape),
        out.top_ids.reshape(*shape, top),
        out.top_means.reshape(*shape, top),
        out.top_counts.reshape(*shape, top),
        stats.n,
        min_count,
        n_passes,
    )


@dataclass
class _Grouping:
    used_ids: np.ndarray  # the token ids that occur at counted positions, ascending
    index: np.ndarray  # token id -> row among used_ids (-1 for ids that do not occur)
    token_counts: np.ndarray  # float64 (n_ids,)
    position_counts: np.ndarray  # float64 (seq_len,)
    n: int
    min_count: int


class _Outputs:
    def __init__(self, n_neurons: int, top: int) -> None:
        self.token_r2 = np.full(n_neurons, np.nan)
        self.position_r2 = np.full(n_neurons, np.nan)
        self.top_ids = np.full((n_neurons, top), -1, dtype=np.int64)
        self.top_means = np.full((n_neurons, top), np.nan)
        self.top_counts = np.zeros((n_neurons, top), dtype=np.int64)


@dataclass
class _Sums:
    """Float64 sums of one block's shifted activations y = x - shift."""

    shift: np.ndarray  # (B,) the first chunk's mean: sums of squares of y carry no cancellation
    total: np.ndarray  # (B,) sum of y
    squares: np.ndarray  # (B,) sum of y^2
    tokens: np.ndarray  # (n_ids, B) sum of y per token id
    positions: np.ndarray  # (seq_len, B) sum of y per position


def _segments(n0: int, n1: int, d_mlp: int) -> list[tuple[int, int, int, int]]:
    """(layer, first neuron, end neuron, offset in the block) for flat neurons [n0, n1) = layer * d_mlp + neuron."""
    out = []
    for layer in range(n0 // d_mlp, (n1 - 1) // d_mlp + 1):
        a, b = max(n0, layer * d_mlp) - layer * d_mlp, min(n1, (layer + 1) * d_mlp) - layer * d_mlp
        out.append((layer, a, b, layer * d_mlp + a - n0))
    return out


def _accumulate(
    reader: ActivationReader,
    flat_tokens: np.ndarray,
    flat_mask: np.ndarray,
    g: _Grouping,
    n0: int,
    n1: int,
    seq_len: int,
    seqs: int,
    progress: Callable[[int], None] | None,
) -> _Sums:
    """One pass over the file for flat neurons [n0, n1): chunks of whole sequences, counted rows only."""
    width, n_rows = n1 - n0, flat_tokens.size
    sums = _Sums(
        np.zeros(width),
        np.zeros(width),
        np.zeros(width),
        np.zeros((len(g.used_ids), width)),
        np.zeros((seq_len, width)),
    )
    segments = _segments(n0, n1, reader.header.d_mlp)
    buffer = np.empty((seqs * seq_len, width))
    shifted = False
    for r0 in range(0, n_rows, seqs * seq_len):
        r1 = min(n_rows, r0 + seqs * seq_len)
        m = flat_mask[r0:r1]
        if m.any():
            x = buffer[: r1 - r0]
            for layer, a, b, off in segments:
                x[:, off : off + b - a] = reader.read_neurons(layer, slice(a, b), r0, r1)
            if not shifted:
                sums.shift = x[m].mean(axis=0)
                shifted = True
            x -= sums.shift
            x[~m] = 0.0  # uncounted rows add nothing to any sum below
            sums.total += x.sum(axis=0)
            sums.squares += np.einsum("ij,ij->j", x, x)
            sums.positions += x.reshape(-1, seq_len, width).sum(axis=0)
            # per-token sums as a sparse one-hot (chunk's token ids x rows) product: each row is added once, in
            # float64 (13x faster than sorting the rows and numpy's reduceat along axis 0)
            rows = np.flatnonzero(m)
            ids, inverse = np.unique(g.index[flat_tokens[r0:r1][rows]], return_inverse=True)
            onehot = scipy.sparse.csr_matrix((np.ones(len(rows)), (inverse, rows)), shape=(len(ids), r1 - r0))
            sums.tokens[ids] += onehot @ x
        if progress:
            progress(r1 - r0)
    return sums


def _finish(sums: _Sums, g: _Grouping, c0: int, c1: int, out: _Outputs, n0: int, top: int) -> None:
    """Fractions and top tokens of the block's columns [c0, c1), written to flat neurons n0 + c0 ..."""
    cols, dest = slice(c0, c1), slice(n0 + c0, n0 + c1)
    if g.n == 0:
        return
    mean = sums.total[cols] / g.n  # mean of y (small: y was shifted by a mean)
    # SS_total = sum y^2 - n mean_y^2: both terms are of the size of the variance, so no catastrophic cancellation
    ss_total = sums.squares[cols] - g.n * mean * mean
    constant = ss_total <= 0
    with np.errstate(divide="ignore", invalid="ignore"):
        for counts, group_sums, r2 in (
            (g.token_counts, sums.tokens, out.token_r2),
            (g.position_counts, sums.positions, out.position_r2),
        ):
            seen = counts > 0  # positions that are never counted form no group
            dev = group_sums[seen, cols] / counts[seen, None] - mean  # mean_g - mean (shift cancels)
            dev *= dev
            between = counts[seen] @ dev
            r2[dest] = np.where(constant, np.nan, between / np.where(constant, 1.0, ss_total))
    eligible = np.flatnonzero(g.token_counts >= g.min_count)
    t = min(top, len(eligible))
    if t == 0:
        return
    means = sums.tokens[eligible, cols] / g.token_counts[eligible, None]  # (eligible ids, columns), shifted
    pick = np.argpartition(-means, t - 1, axis=0)[:t] if t < len(eligible) else np.arange(t)[:, None]
    pick = np.broadcast_to(pick, (t, c1 - c0))
    chosen = np.take_along_axis(means, pick, axis=0)
    # highest mean first, equal means by token id (rows of `eligible` are in id order)
    order = np.lexsort((pick, -chosen), axis=0)
    pick, chosen = np.take_along_axis(pick, order, axis=0), np.take_along_axis(chosen, order, axis=0)
    out.top_ids[dest, :t] = g.used_ids[eligible[pick]].T
    out.top_means[dest, :t] = (chosen + sums.shift[cols]).T
    out.top_counts[dest, :t] = g.token_counts[eligible[pick]].T.astype(np.int64)
