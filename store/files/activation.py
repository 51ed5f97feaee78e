"""HDF5 file of one activation set: one `(n_tokens, d_mlp)` dataset per layer, written under a temporary name.

The writer preallocates every layer, fills token rows in order and records `tokens_done` after each flush, so
a killed ingest resumes from the last flushed row. `finish()` stamps the completion marker and renames the
`.partial` file to its final name; the reader refuses files without the marker.

Values are stored as float16, or as int8 codes (`dtype` "int8"): each block of `block_rows` tokens (the chunk
height, 1024) of each neuron is quantised affinely with its own float32 scale and offset, kept in the datasets
`layer_XXX_scale` / `layer_XXX_offset` of shape `(n_blocks, d_mlp)`; value = offset + scale * code, codes in
-128..127, so every value is within scale / 2 of what was written and a constant block is exact. The writer
buffers rows up to a block boundary (`tokens_done` only counts whole blocks, and the last, shorter one); the
reader dequantises, so every read method returns float32 for int8 files (`value_dtype`).
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

from actdb.store.errors import ActdbError
from actdb.store.files.identity import mismatch_phrase
from actdb.store.files.raw_chunks import RawChunkRows, reads_raw
from actdb.store.hook_names import transformer_lens_name
from actdb.store.refs import STORED_DTYPES

FORMAT_VERSION = 2  # the newest layout this actdb reads: 1 float16 (unchanged), 2 int8 with scales and offsets
CHUNK_TOKENS = 1024
CHUNK_NEURONS = 128
WRITE_CACHE_BYTES = 64 * 2**20
COMPLETE_ATTR = "actdb_complete"


_UNCLOSABLE: list[ActivationWriter] = []


def unclosable_files() -> bool:
    """Whether an activation file could not be closed (a full disk); see `ActivationWriter.close`."""
    return bool(_UNCLOSABLE)


def layer_key(layer: int) -> str:
    return f"layer_{layer:03d}"


def scale_key(layer: int) -> str:
    return f"layer_{layer:03d}_scale"


def offset_key(layer: int) -> str:
    return f"layer_{layer:03d}_offset"


INT8_LEVELS = 255  # codes -128..127: lo maps to -128, hi to 127


def quantise(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-column affine int8 codes of one block `(rows, n)`: (codes int8, scale float32 (n,), offset float32 (n,)).

    scale = (max - min) / 255 and offset = min + 128 * scale, so min and max map to the end codes -128 and 127 and
    every value lies within scale / 2 (plus float32 rounding) of `dequantise`'s value; a constant column gets
    scale 0 and offset = its value, exactly. Non-finite values cannot be coded and raise `ActdbError`.
    """
    lo = x.min(axis=0).astype(np.float64)
    hi = x.max(axis=0).astype(np.float64)
    if not (np.isfinite(lo).all() and np.isfinite(hi).all()):
        raise ActdbError("activations contain NaN or infinite values, which int8 cannot store; use --dtype float16")
    scale = ((hi - lo) / INT8_LEVELS).astype(np.float32)
    offset = (lo + 128.0 * scale.astype(np.float64)).astype(np.float32)
    t = np.subtract(x, offset, dtype=np.float32)
    np.divide(t, np.where(scale > 0, scale, np.float32(1)), out=t)
    np.rint(t, out=t)
    np.clip(t, -128, 127, out=t)
    return t.astype(np.int8), scale, offset


def dequantise(codes: np.ndarray, scale: np.ndarray, offset: np.ndarray, out: np.ndarray) -> np.ndarray:
    """offset + scale * codes into the float32 `out` (the one formula writer and reader share, so the values
    the ingest's statistics saw are bit for bit those a reader returns)."""
    np.multiply(codes, scale, out=out)
    np.add(out, offset, out=out)
    return out


def partial_path(path: Path) -> Path:
    return path.with_name(path.name + ".partial")


def chunk_shape(n_tokens: int, d_mlp: int) -> tuple[int, int]:
    """Chunks of 1024 tokens x 128 neurons (256 KiB in float16): row blocks stream whole, one neuron reads 1/N."""
    return (max(1, min(CHUNK_TOKENS, n_tokens)), max(1, min(CHUNK_NEURONS, d_mlp)))


def n_blocks(n_tokens: int, block_rows: int) -> int:
    """Quantisation blocks of an int8 file: whole blocks of `block_rows` tokens and the shorter last one."""
    return max(1, -(-n_tokens // block_rows))


SCALE_CHUNK_BLOCKS = 64


class _Values:
    """Reads values of one file's layers as float32 (int8: codes dequantised by their block's scale and offset)
    or as stored (float16); shared by the reader and the resuming writer."""

    def __init__(self, f: h5py.File, header: ActivationHeader) -> None:
        self.header = header
        self.layers = [f[layer_key(i)] for i in range(header.n_layers)]
        self.quantised = header.dtype == "int8"
        if self.quantised:
            self.block_rows = int(f.attrs["block_rows"])
            self.scales = [f[scale_key(i)] for i in range(header.n_layers)]
            self.offsets = [f[offset_key(i)] for i in range(header.n_layers)]
        self._codes = np.empty(0, dtype=np.int8)
        self._raw_chunks: RawChunkRows | None = None  # made on the first `shifted_into` of raw-readable layers
        self._reads_raw: dict[int, bool] = {}
        self._stored = np.empty(0, dtype=np.float32)

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(np.float32) if self.quantised else self.layers[0].dtype

    def _code_buffer(self, shape: tuple[int, int]) -> np.ndarray:
        n = shape[0] * shape[1]
        if self._codes.size < n:
            self._codes = np.empty(n, dtype=np.int8)
        return self._codes[:n].reshape(shape)

    def rows(self, layer: int, start: int, stop: int) -> np.ndarray:
        if not self.quantised:
            return self.layers[layer][start:stop]
        out = np.empty((max(0, stop - start), self.header.d_mlp), dtype=np.float32)
        self.rows_into(layer, start, out)
        return out

    def rows_into(self, layer: int, start: int, out: np.ndarray) -> None:
        stop = start + out.shape[0]
        if not self.quantised:
            self.layers[layer].read_direct(out, np.s_[start:stop])
            return
        if out.dtype != np.float32:
            raise ValueError(f"int8 files read into float32 buffers, not {out.dtype}")
        if stop <= start:
            return
        codes = self._code_buffer(out.shape)
        self.layers[layer].read_direct(codes, np.s_[start:stop])
        self._dequantise(layer, start, codes, out, slice(None))

    def shifted_into(self, layer: int, start: int, out: np.ndarray, shift: np.ndarray) -> None:
        """Rows `[start, start + len(out))` minus `shift` into the float32 `out`: from raw chunks (`raw_chunks`)
        when the layer's only filter is Fletcher-32, else read through HDF5 and converted (the same values)."""
        ds = self.layers[layer]
        stop = min(start + out.shape[0], self.header.n_tokens)
        if stop <= start:
            return
        if layer not in self._reads_raw:
            # int8 blocks of scales must be the chunks' rows: the raw route takes a chunk row's scales by its index
            self._reads_raw[layer] = reads_raw(ds) and (not self.quantised or ds.chunks[0] == self.block_rows)
        if self._reads_raw[layer]:
            if self._raw_chunks is None:
                self._raw_chunks = RawChunkRows()
            quantisation = None
            if self.quantised:
                b0, b1 = start // self.block_rows, (stop - 1) // self.block_rows + 1
                quantisation = (self.scales[layer][b0:b1], self.offsets[layer][b0:b1], b0)
            self._raw_chunks.read_shifted(ds, start, out[: stop - start], shift, quantisation)
            return
        n = (stop - start) * out.shape[1]
        if self._stored.size < n or self._stored.dtype != self.dtype:
            self._stored = np.empty(n, dtype=self.dtype)
        stored = self._stored[:n].reshape(stop - start, out.shape[1])
        self.rows_into(layer, start, stored)
        np.subtract(stored, shift, out=out[: stop - start])

    def neurons(self, layer: int, neurons: list[int] | slice, start: int, stop: int | None) -> np.ndarray:
        if not self.quantised:
            return self.layers[layer][start:stop, neurons]
        start, stop, _ = slice(start, stop).indices(self.header.n_tokens)
        codes = self.layers[layer][start:stop, neurons]
        out = np.empty(codes.shape, dtype=np.float32)
        if codes.shape[0]:
            self._dequantise(layer, start, codes, out, neurons)
        return out

    def _dequantise(
        self, layer: int, start: int, codes: np.ndarray, out: np.ndarray, neurons: list[int] | slice
    ) -> None:
        b = self.block_rows
        stop = start + codes.shape[0]
        b0, b1 = start // b, (stop - 1) // b + 1
        scale = self.scales[layer][b0:b1, neurons]
        offset = self.offsets[layer][b0:b1, neurons]
        for k in range(b0, b1):
            r0, r1 = max(start, k * b) - start, min(stop, (k + 1) * b) - start
            dequantise(codes[r0:r1], scale[k - b0], offset[k - b0], out[r0:r1])


@dataclass(frozen=True)
class ActivationHeader:
    """What an activation file says about itself."""

    model: str
    step: int
    dataset_fingerprint: str
    hook: str
    n_layers: int
    d_mlp: int
    n_tokens: int
    dtype: str


class ActivationWriter:
    """Writes token rows of every layer into `<path>.partial`, resuming one that already exists.

    float16 rows are written as they come. For int8 the rows are buffered up to the next block boundary
    (`block_rows` tokens) and each whole block is quantised and written with its scales and offsets, so
    `tokens_done` (what the file surely holds) advances by blocks while `position` (the next row expected)
    advances by every call."""

    def __init__(self, path: Path, header: ActivationHeader) -> None:
        if header.dtype not in STORED_DTYPES:
            raise ActdbError(f"activations cannot be stored as {header.dtype}; use {' or '.join(STORED_DTYPES)}")
        self.path = Path(path)
        self.header = header
        self.tmp = partial_path(self.path)
        try:
            self.tmp.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ActdbError(f"cannot create folder {self.tmp.parent}: {exc.strerror or exc}") from None
        self.quantised = header.dtype == "int8"
        self.block_rows = chunk_shape(header.n_tokens, header.d_mlp)[0]
        self.file = self._open_or_create()
        self.layers = [self.file[layer_key(i)] for i in range(header.n_layers)]
        self._values = _Values(self.file, header)
        self._pending: list[np.ndarray] = []  # int8: rows of the block being filled, per layer
        self._filled = 0
        self._stored: list[np.ndarray] = []  # int8: reused float32 buffers of the last block's stored values

    def _open_or_create(self) -> h5py.File:
        if self.tmp.exists():
            _restore_length(self.tmp)
            try:
                f = h5py.File(self.tmp, "r+", rdcc_nbytes=WRITE_CACHE_BYTES)
                if _read_header(f) == self.header:
                    return f
                f.close()
            except (OSError, KeyError, ValueError):
                pass
            self.tmp.unlink()
        try:
            f = h5py.File(self.tmp, "w", rdcc_nbytes=WRITE_CACHE_BYTES)
        except OSError as exc:
            raise ActdbError(f"cannot create activation file {self.tmp}: {exc}") from None
        h = self.header
        for key, value in vars(h).items():
            f.attrs[key] = value
        f.attrs["format_version"] = 2 if self.quantised else 1
        f.attrs["tokens_done"] = 0
        if self.quantised:
            f.attrs["block_rows"] = self.block_rows
        blocks = n_blocks(h.n_tokens, self.block_rows)
        for layer in range(h.n_layers):
            ds = f.create_dataset(
                layer_key(layer),
                shape=(h.n_tokens, h.d_mlp),
                dtype=h.dtype,
                chunks=chunk_shape(h.n_tokens, h.d_mlp),
                fletcher32=True,
            )
            ds.attrs["transformer_lens_name"] = transformer_lens_name(layer, h.hook)  # reads like a TL cache
            if self.quantised:
                for key in (scale_key(layer), offset_key(layer)):
                    f.create_dataset(
                        key,
                        shape=(blocks, h.d_mlp),
                        dtype=np.float32,
                        chunks=(min(blocks, SCALE_CHUNK_BLOCKS), max(1, min(CHUNK_NEURONS, h.d_mlp))),
                        fletcher32=True,
                    )
        f.flush()
        return f

    @property
    def tokens_done(self) -> int:
        """Rows the file holds (int8: whole blocks only)."""
        return int(self.file.attrs["tokens_done"])

    @property
    def position(self) -> int:
        """The row `write_rows` expects next (int8: past the rows buffered for the block being filled)."""
        return self.tokens_done + self._filled

    @property
    def fold_rows(self) -> int | None:
        """int8: the rows per `on_stored` call (one block); None for float16 (one call per `write_rows`)."""
        return self.block_rows if self.quantised else None

    def rewind(self, row: int, align: int) -> int:
        """Continue from `row` rounded down to a multiple of `align` (float16) or of the block (int8), dropping
        buffered rows; returns that row."""
        unit = self.block_rows if self.quantised else align
        row = min(row, self.tokens_done)
        row -= row % unit
        self.file.attrs["tokens_done"] = row
        self._filled = 0
        return row

    def stored_rows(self, start: int, stop: int) -> list[np.ndarray]:
        """Rows `[start, stop)` of every layer as a reader returns them (int8: dequantised float32)."""
        return [self._values.rows(layer, start, stop) for layer in range(self.header.n_layers)]

    def write_rows(
        self,
        start: int,
        rows: list[np.ndarray],
        on_stored: Callable[[int, list[np.ndarray]], None] | None = None,
    ) -> None:
        """Write rows `[start, start + len)` of every layer; rows must continue at `position`. `on_stored(row,
        values)` is called with the values as stored (and as a reader returns them) once they are written: for
        float16 with these rows, for int8 once per completed block with its dequantised values (buffers reused
        by the next call)."""
        if start != self.position:
            raise ValueError(f"rows must be written in order: file holds {self.position}, got start {start}")
        n = rows[0].shape[0]
        if start + n > self.header.n_tokens:
            raise ValueError(f"rows [{start}, {start + n}) run past the file's {self.header.n_tokens} tokens")
        if not self.quantised:
            for ds, block in zip(self.layers, rows, strict=True):
                ds[start : start + n] = block
            self.file.attrs["tokens_done"] = start + n
            if on_stored is not None:
                on_stored(start, rows)
            return
        i = 0
        while i < n:
            want = min(self.block_rows, self.header.n_tokens - self.tokens_done)
            if self._filled == 0 and n - i >= want:
                block = [r[i : i + want] for r in rows]
                i += want
            else:
                take = min(want - self._filled, n - i)
                self._buffer(rows, i, take)
                i += take
                if self._filled < want:
                    break
                block = [p[:want] for p in self._pending]
            self._write_block(block, on_stored)

    def _buffer(self, rows: list[np.ndarray], i: int, take: int) -> None:
        dtype = np.result_type(rows[0].dtype, np.float16)
        if not self._pending or not np.can_cast(dtype, self._pending[0].dtype):
            old = self._pending
            self._pending = [np.empty((self.block_rows, self.header.d_mlp), dtype=dtype) for _ in rows]
            for new, kept in zip(self._pending, old, strict=False):
                new[: self._filled] = kept[: self._filled]
        for p, r in zip(self._pending, rows, strict=True):
            p[self._filled : self._filled + take] = r[i : i + take]
        self._filled += take

    def _write_block(self, block: list[np.ndarray], on_stored: Callable[[int, list[np.ndarray]], None] | None) -> None:
        start = self.tokens_done
        k, n = start // self.block_rows, block[0].shape[0]
        if on_stored is not None and (not self._stored or self._stored[0].shape[0] < n):
            self._stored = [np.empty((self.block_rows, self.header.d_mlp), dtype=np.float32) for _ in block]
        for layer, x in enumerate(block):
            codes, scale, offset = quantise(x)
            self.layers[layer][start : start + n] = codes
            self._values.scales[layer][k] = scale
            self._values.offsets[layer][k] = offset
            if on_stored is not None:
                dequantise(codes, scale, offset, self._stored[layer][:n])
        self.file.attrs["tokens_done"] = start + n
        self._filled = 0
        if on_stored is not None:
            on_stored(start, [v[:n] for v in self._stored])

    def flush(self) -> None:
        self.file.flush()

    def finish(self) -> int:
        """Mark complete, close and rename to the final path; returns the file's size in bytes."""
        if self.tokens_done != self.header.n_tokens:
            raise ValueError(f"file holds {self.tokens_done} of {self.header.n_tokens} tokens")
        self.file.attrs[COMPLETE_ATTR] = True
        self.file.close()
        os.replace(self.tmp, self.path)
        return self.path.stat().st_size

    def close(self) -> None:
        """Flush and close, after a failure too. When the disk is full HDF5 cannot write its cached chunks, the
        close fails, and the file's objects would fail again (and can crash the interpreter) when they are
        garbage-collected; such a writer is kept referenced and `unclosable_files()` tells the CLI to end the
        process without running those finalizers (the `.partial` file keeps every flushed row)."""
        if not self.file.id.valid:
            return
        with contextlib.suppress(OSError, RuntimeError):  # h5py raises either for a failed write
            self.file.flush()
        try:
            self.file.close()
        except (OSError, RuntimeError):
            _UNCLOSABLE.append(self)


def _restore_length(path: Path) -> None:
    """A write that failed for lack of space leaves the file shorter than the end HDF5 recorded, and HDF5 then
    refuses to open it. Growing it back (with zeros) lets the rows flushed before the failure be reused: they
    are read back through their checksums before the ingest continues, and a file that fails that is redone."""
    try:
        h5py.File(path, "r").close()
    except OSError as exc:
        found = re.search(r"truncated file: eof = (\d+).*stored_eof = (\d+)", str(exc))
        if found and int(found.group(2)) > int(found.group(1)):
            os.truncate(path, int(found.group(2)))


HEADER_FIELDS = (
    ("model", "model"),
    ("step", "step"),
    ("dataset_fingerprint", "dataset fingerprint"),
    ("hook", "hook"),
    ("n_layers", "layers"),
    ("d_mlp", "width"),
    ("n_tokens", "tokens"),
    ("dtype", "dtype"),
)


def header_mismatch(found: ActivationHeader, expected: ActivationHeader) -> str | None:
    """What differs between a file's header and what SQL says the set is, as one phrase; None if nothing."""
    return mismatch_phrase(HEADER_FIELDS, found, expected)


def verify_header(path: Path, found: ActivationHeader, expected: ActivationHeader) -> None:
    """Refuse a file that is not the set SQL describes (another model's, step's, dataset's, hook's, width's or
    dtype's file at this set's path): the one check every reader makes before using a byte of its data."""
    wrong = header_mismatch(found, expected)
    if wrong:
        raise ActdbError(
            f"activation file {path} is not the set SQL records: its header says {wrong}; `actdb check` lists "
            "such files and `actdb ingest --force` rewrites one"
        )


def _read_header(f: h5py.File) -> ActivationHeader:
    a = f.attrs
    return ActivationHeader(
        model=str(a["model"]),
        step=int(a["step"]),
        dataset_fingerprint=str(a["dataset_fingerprint"]),
        hook=str(a["hook"]),
        n_layers=int(a["n_layers"]),
        d_mlp=int(a["d_mlp"]),
        n_tokens=int(a["n_tokens"]),
        dtype=str(a["dtype"]),
    )


class ActivationReader:
    """Read-only access to a complete activation file: row blocks across layers, or single neurons.

    Values come back as stored for float16 files and dequantised to float32 for int8 files (`value_dtype`).
    With `expected` (what SQL says the set is; `actdb.store.set_files.open_set` passes it) the header, and the
    shape and dtype of every layer, must agree with it before the reader is handed out."""

    def __init__(
        self, path: str | os.PathLike, cache_bytes: int = 16 * 2**20, expected: ActivationHeader | None = None
    ) -> None:
        self.path = Path(path)
        if not self.path.exists():
            hint = " (an ingest is unfinished)" if partial_path(self.path).exists() else ""
            raise ActdbError(f"activation file {self.path} does not exist{hint}")
        try:
            self.file = h5py.File(self.path, "r", rdcc_nbytes=cache_bytes)
        except OSError as exc:
            raise ActdbError(f"activation file {self.path} is unreadable or truncated: {exc}") from None
        try:
            self.header = _read_header(self.file)
            complete = bool(self.file.attrs.get(COMPLETE_ATTR, False))
            version = int(self.file.attrs.get("format_version", 1))
            if version > FORMAT_VERSION:
                self.file.close()
                raise ActdbError(
                    f"activation file {self.path} has format version {version}; this actdb reads up to "
                    f"{FORMAT_VERSION} (upgrade actdb)"
                )
            if self.header.dtype not in STORED_DTYPES:
                self.file.close()
                raise ActdbError(f"activation file {self.path} stores {self.header.dtype}, which actdb cannot read")
            self._values = _Values(self.file, self.header)
            self.layers = self._values.layers
        except (KeyError, OSError) as exc:
            self.file.close()
            raise ActdbError(f"activation file {self.path} is not a valid actdb file: {exc}") from None
        if not complete:
            self.file.close()
            raise ActdbError(f"activation file {self.path} is unfinished (no completion marker)")
        self.bytes_read = 0  # stored value bytes the read methods have returned (read amplification's numerator)
        if expected is not None:
            try:
                verify_header(self.path, self.header, expected)
            except ActdbError:
                self.file.close()
                raise
        h = self.header
        stored = "int8" if self._values.quantised else h.dtype
        bad = [ds.name for ds in self.layers if ds.shape != (h.n_tokens, h.d_mlp) or str(ds.dtype) != stored]
        if bad:
            self.file.close()
            raise ActdbError(
                f"activation file {self.path} is damaged: {bad[0].lstrip('/')} is not {h.n_tokens} x {h.d_mlp} "
                f"{stored} as its header says"
            )
        if self._values.quantised:
            h, want = self.header, (n_blocks(self.header.n_tokens, self._values.block_rows), self.header.d_mlp)
            bad = [ds.name for ds in (*self._values.scales, *self._values.offsets) if ds.shape != want]
            if bad or h.dtype != str(self.layers[0].dtype):
                self.file.close()
                what = f"{bad[0]} has the wrong shape" if bad else "its codes are not int8"
                raise ActdbError(f"activation file {self.path} is not a valid int8 actdb file: {what}")

    @property
    def value_dtype(self) -> np.dtype:
        """The dtype the read methods return (and `read_rows_into` expects): float32 for int8 files."""
        return self._values.dtype

    @property
    def quantisation(self) -> tuple[list[h5py.Dataset], list[h5py.Dataset], int] | None:
        """int8 files: (per-layer scale datasets, offset datasets, block rows); None for float16."""
        v = self._values
        return (v.scales, v.offsets, v.block_rows) if v.quantised else None

    @property
    def held_bytes(self) -> int:
        """Stored value bytes of the whole file (every layer's rows; int8: the codes)."""
        return len(self.layers) * self._count(self.header.n_tokens, self.header.d_mlp)

    def _count(self, rows: int, cols: int) -> int:
        return max(0, rows) * cols * self.layers[0].dtype.itemsize

    def read_rows(self, start: int, stop: int, layers: list[int] | None = None) -> list[np.ndarray]:
        """Token rows `[start, stop)` of the given layers (all by default), as stored (int8: dequantised)."""
        try:
            wanted = layers if layers is not None else range(len(self.layers))
            rows = [self._values.rows(i, start, min(stop, self.header.n_tokens)) for i in wanted]
        except OSError as exc:
            raise ActdbError(f"activation file {self.path} is corrupt (checksum or read error): {exc}") from None
        self.bytes_read += sum(self._count(*r.shape) for r in rows)
        return rows

    def read_rows_into(self, layer: int, start: int, out: np.ndarray) -> None:
        """Token rows `[start, start + len(out))` of one layer into a reused buffer of dtype `value_dtype`: no
        fresh array per read (fresh multi-MB arrays cost page faults on every chunk)."""
        try:
            self._values.rows_into(layer, start, out)
        except OSError as exc:
            raise ActdbError(f"activation file {self.path} is corrupt (checksum or read error): {exc}") from None
        self.bytes_read += self._count(*out.shape)

    def read_shifted_into(self, layer: int, start: int, out: np.ndarray, shift: np.ndarray) -> None:
        """Token rows `[start, start + len(out))` of one layer minus a per-neuron `shift`, as float32 into `out`
        (a reused buffer, or a layer's columns of a wider one): what the correlation engine consumes. The chunks'
        checksums are verified as HDF5 would, and the values are bit for bit those of `read_rows_into` minus
        `shift`, faster (`benchmarks/reader.py`: 6-9x the read through HDF5 and NumPy for float16 with the C pass, 1.7x
        without it, on the development machine)."""
        try:
            self._values.shifted_into(layer, start, out, shift)
        except OSError as exc:
            raise ActdbError(f"activation file {self.path} is corrupt (checksum or read error): {exc}") from None
        self.bytes_read += self._count(*out.shape)

    def read_neurons(
        self, layer: int, neurons: list[int] | slice, start: int = 0, stop: int | None = None
    ) -> np.ndarray:
        """Rows `[start, stop)` of the given neurons of one layer (a list must be increasing)."""
        try:
            values = self._values.neurons(layer, neurons, start, stop)
        except OSError as exc:
            raise ActdbError(f"activation file {self.path} is corrupt (checksum or read error): {exc}") from None
        self.bytes_read += self._count(*values.shape)
        return values

    def close(self) -> None:
        self.file.close()

    def __enter__(self) -> ActivationReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
