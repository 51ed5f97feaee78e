"""Streaming per-neuron top-K activations with their flat token positions (the "max activating examples").

`TopKTracker` keeps, per layer, a `(d_mlp, k)` table of the largest values seen so far and merges each chunk
into it without holding more than the chunk. Once a layer has seen `k` rows, a chunk row can only enter a
neuron's top-K if it beats that neuron's current K-th largest value, and after the first few chunks almost no
row does; so a chunk costs one integer comparison over its bits (float16/float32 bit patterns, read as
integers, sort like the numbers; see `_sortable`) plus work proportional to the few rows that pass. Columns
where many rows pass (the first chunk, a shift in the data) take the dense path: each column's own top-K by
`argpartition`, merged K + K.

`top_activations_from_file` builds the same tables from a stored activation file, for sets ingested before
the tracker ran inside ingest.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from actdb.store.errors import ActdbError
from actdb.store.files.activation import ActivationReader

DENSE_COLUMNS = 128  # the dense path transposes and partitions this many columns at a time (cache-sized blocks)
MANY_CANDIDATES = 16  # above rows * d_mlp / this many passing values, count them per column instead of listing them
SEED_STRIDE = 4  # a layer's first big chunk: top-K of every 4th row first, then the rows that beat it (see update)


class TopKTracker:
    """Running top-`k` values and flat token positions of every neuron of `n_layers` layers of `d_mlp` neurons."""

    def __init__(self, n_layers: int, d_mlp: int, k: int = 32) -> None:
        if k < 1:
            raise ValueError("k must be at least 1")
        self.n_layers, self.d_mlp, self.k = n_layers, d_mlp, k
        # unordered within a neuron until `result()`; -inf / -1 mark slots no row has filled yet
        self.values = np.full((n_layers, d_mlp, k), -np.inf, dtype=np.float32)
        self.positions = np.full((n_layers, d_mlp, k), -1, dtype=np.int64)
        self.seen = np.zeros(n_layers, dtype=np.int64)
        # a column with more passing rows than this goes dense: the sparse merge buffer is (columns, k + this)
        self.heavy = 4 * k
        self._mask = np.empty(0, dtype=bool)  # reused per chunk: fresh 12 MB masks cost page faults
        self._keys = np.empty(0, dtype=np.int16)

    def update(self, layer: int, values: np.ndarray, positions: np.ndarray) -> None:
        """Merge one chunk `(rows, d_mlp)` of counted rows of `layer` whose flat token positions are `positions`.

        NaN counts as -inf (never above a number): a model that produces NaN has nothing to show there.
        """
        values = np.asarray(values)
        if values.dtype not in (np.float16, np.float32):
            values = values.astype(np.float32)
        values = np.ascontiguousarray(values)
        positions = np.asarray(positions, dtype=np.int64)
        rows = values.shape[0]
        if values.ndim != 2 or values.shape[1] != self.d_mlp or positions.shape != (rows,):
            raise ValueError(
                f"expected values (rows, {self.d_mlp}) and positions (rows,), got {values.shape} and {positions.shape}"
            )
        if rows == 0:
            return
        if self.seen[layer] < self.k:  # not every slot is filled: every row is a candidate
            if rows <= self.heavy:
                cand = values.T.astype(np.float32)
                cand[np.isnan(cand)] = -np.inf
                self._merge(layer, slice(None), cand, np.broadcast_to(positions, cand.shape))
            elif rows >= SEED_STRIDE * self.heavy:
                # seed the table with every 4th row's top-K (a quarter of the dense work), then only the other
                # rows that beat it are merged: about 4K per column, where the dense path partitions all rows
                seed = slice(None, None, SEED_STRIDE)
                self._dense(layer, np.arange(self.d_mlp), values[seed], positions[seed])
                self._filtered(layer, values, positions, exclude=seed, limit=4 * SEED_STRIDE * self.k)
            else:
                self._dense(layer, np.arange(self.d_mlp), values, positions)
            self.seen[layer] += rows
            return
        self._filtered(layer, values, positions)
        self.seen[layer] += rows

    def _filtered(
        self,
        layer: int,
        values: np.ndarray,
        positions: np.ndarray,
        exclude: slice | None = None,
        limit: int | None = None,
    ) -> None:
        """Merge the chunk's values that beat their neuron's current K-th largest (rows in `exclude` are already
        merged); a column with more than `limit` (default `self.heavy`) passing values takes the dense path."""
        limit = self.heavy if limit is None else limit
        mask = self._passing(layer, values)
        if exclude is not None:
            mask[exclude] = False
        total = int(np.count_nonzero(mask))
        if total:
            if total > mask.size // MANY_CANDIDATES:
                heavy = np.flatnonzero(np.count_nonzero(mask, axis=0) > limit)
                mask[:, heavy] = False
                flat = np.flatnonzero(mask)
            else:
                flat = np.flatnonzero(mask)
                counts = np.bincount(flat % self.d_mlp, minlength=self.d_mlp)
                heavy = np.flatnonzero(counts > limit)
                if len(heavy):
                    flat = flat[~np.isin(flat % self.d_mlp, heavy)]
            if len(heavy):
                self._dense(layer, heavy, values, positions, exclude)
            self._sparse(layer, flat, values, positions)

    def _passing(self, layer: int, values: np.ndarray) -> np.ndarray:
        """Boolean `(rows, d_mlp)`: which values are above their neuron's current K-th largest (which they must
        be to enter its top-K; a value equal to it may be left out, a tie)."""
        kth = self.values[layer].min(axis=1)  # float32; never NaN (NaN is stored as -inf)
        # the largest value of the chunk's dtype <= kth: `x > kth` is then exactly `x > t` for every x of that dtype
        t = kth.astype(values.dtype)
        above = t.astype(np.float32) > kth
        t[above] = np.nextafter(t[above], values.dtype.type(-np.inf))
        itype = np.int16 if values.dtype == np.float16 else np.int32
        bits, t_bits = values.view(itype), t.view(itype)
        n = values.size
        if self._mask.size < n:
            self._mask = np.empty(n, dtype=bool)
        mask = self._mask[:n].reshape(values.shape)
        if (t_bits >= 0).all():
            # thresholds >= +0: a non-negative float's bits as a signed integer order like the float, and every
            # negative float (sign bit set) is a negative integer, below them, so the raw bits compare correctly
            np.greater(bits, t_bits, out=mask)
        else:
            if self._keys.dtype != itype or self._keys.size < n:
                self._keys = np.empty(n, dtype=itype)
            keys = self._keys[:n].reshape(values.shape)
            _sortable(bits, out=keys)
            np.greater(keys, _sortable(t_bits), out=mask)
        return mask

    def _dense(
        self, layer: int, cols: np.ndarray, values: np.ndarray, positions: np.ndarray, exclude: slice | None = None
    ) -> None:
        """Each of `cols`' own top-K over all rows of the chunk (more than `heavy` of them) except those in
        `exclude` (already merged), merged K + K."""
        rows, k = values.shape[0], self.k
        for start in range(0, len(cols), DENSE_COLUMNS):
            block = cols[start : start + DENSE_COLUMNS]
            run = block[-1] - block[0] + 1 == len(block)  # a run of columns: a slice is far faster than fancy indexing
            picked = values[:, block[0] : block[-1] + 1] if run else values[:, block]
            sub = np.ascontiguousarray(picked.T, dtype=np.float32)  # (columns, rows)
            nan = np.isnan(sub)
            if nan.any():
                sub[nan] = -np.inf
            if exclude is not None:
                sub[:, exclude] = -np.inf
            idx = np.argpartition(sub, rows - k, axis=1)[:, rows - k :]  # rows > self.heavy > k here
            self._merge(layer, block, np.take_along_axis(sub, idx, axis=1), positions[idx])

    def _sparse(self, layer: int, flat: np.ndarray, values: np.ndarray, positions: np.ndarray) -> None:
        """Merge the listed values (flat indices into the chunk) into their columns' tables."""
        d = self.d_mlp
        vals = values.reshape(-1)[flat].astype(np.float32)
        keep = ~np.isnan(vals)
        if not keep.all():
            flat, vals = flat[keep], vals[keep]
        if len(flat) == 0:
            return
        rows, cols = np.divmod(flat, d)
        order = np.argsort(cols, kind="stable")
        rows, cols, vals = rows[order], cols[order], vals[order]
        counts = np.bincount(cols, minlength=d)
        touched = np.flatnonzero(counts)
        # lay the candidates out as (touched columns, widest count), padded with -inf / -1
        slot_of = np.zeros(d, dtype=np.int64)
        slot_of[touched] = np.arange(len(touched))
        starts = np.cumsum(counts) - counts
        rank = np.arange(len(cols)) - starts[cols]
        width = int(counts.max())
        cand_v = np.full((len(touched), width), -np.inf, dtype=np.float32)
        cand_p = np.full((len(touched), width), -1, dtype=np.int64)
        cand_v[slot_of[cols], rank] = vals
        cand_p[slot_of[cols], rank] = positions[rows]
        self._merge(layer, touched, cand_v, cand_p)

    def _merge(self, layer: int, cols: np.ndarray | slice, cand_v: np.ndarray, cand_p: np.ndarray) -> None:
        """Keep the `k` largest of each column's current top-K and its candidates (argpartition over K + m)."""
        k = self.k
        v = np.concatenate([self.values[layer, cols], cand_v], axis=1)
        p = np.concatenate([self.positions[layer, cols], cand_p], axis=1)
        width = v.shape[1]
        if width > k:
            idx = np.argpartition(v, width - k, axis=1)[:, width - k :]
            v, p = np.take_along_axis(v, idx, axis=1), np.take_along_axis(p, idx, axis=1)
        self.values[layer, cols] = v
        self.positions[layer, cols] = p

    def result(self) -> tuple[np.ndarray, np.ndarray]:
        """Values `(n_layers, d_mlp, k)` float32 sorted descending (equal values by position) and their positions
        int64; -inf / -1 fill the slots of neurons that saw fewer than k rows."""
        order = np.lexsort((self.positions, -self.values))  # sorts along the last axis; -(-inf) = inf goes last
        return np.take_along_axis(self.values, order, axis=-1), np.take_along_axis(self.positions, order, axis=-1)


def _sortable(bits: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """Map IEEE float bit patterns (viewed as signed integers) to integers in the same order as the floats.

    Non-negative floats keep their bits; a negative float's magnitude bits are flipped, so that a larger
    magnitude gives a smaller integer (-0.0 maps to -1, just below +0.0's 0).
    """
    shift = bits.dtype.itemsize * 8 - 1
    magnitude = np.iinfo(bits.dtype).max
    if out is None:
        out = np.empty_like(bits)
    np.right_shift(bits, shift, out=out)  # arithmetic shift: 0 for non-negative, all ones for negative
    np.bitwise_and(out, magnitude, out=out)
    np.bitwise_xor(out, bits, out=out)
    return out


def top_activations_from_file(
    reader: ActivationReader,
    mask_flat: np.ndarray,
    k: int = 32,
    chunk_rows: int = 4096,
    progress: Callable[[int], None] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """The tracker's result for a stored activation file: one pass over its rows, counted positions only.

    `mask_flat` marks the counted positions (any shape with one entry per row; flattened); `progress` is called
    with the number of rows read after each chunk.
    """
    h = reader.header
    mask = np.asarray(mask_flat, dtype=bool).reshape(-1)
    if mask.size != h.n_tokens:
        raise ActdbError(f"the mask has {mask.size} positions but activation file {reader.path} has {h.n_tokens}")
    tracker = TopKTracker(h.n_layers, h.d_mlp, k)
    for start in range(0, h.n_tokens, chunk_rows):
        stop = min(start + chunk_rows, h.n_tokens)
        m = mask[start:stop]
        if m.any():
            positions = start + np.flatnonzero(m)
            every = bool(m.all())
            for layer, block in enumerate(reader.read_rows(start, stop)):
                tracker.update(layer, block if every else block[m], positions)
        if progress:
            progress(stop - start)
    return tracker.result()
