"""Rows of an activation layer read as the raw bytes of its HDF5 chunks, checked and converted in one pass.

HDF5's own read runs the Fletcher-32 filter a byte at a time and NumPy converts float16 in software (0.16 GB/s
here); the correlation engine needs `stored - shift` as float32. This reads each chunk's stored bytes itself and
writes `value - shift` straight into the caller's (possibly strided) float32 rows, the checksum verified as HDF5
would. Two routes, chosen once in `FUSED`:

- the C extension `_fused_chunks` (built by setup.py where a compiler is found): the chunks come straight from
  the file mapped read-only (their byte offsets found once per dataset by HDF5's chunk index; `read_direct_chunk`
  for files open to write), and one pass per chunk, slab by slab while each is in L1, sums the checksum and
  converts (float16 by F16C), writing whole cache lines of the destination with streaming stores; a row of chunks
  per call, without the GIL;
- without it (or with ACTDB_READER=numpy): `read_direct_chunk` into a buffer, `fletcher32` (BLAS reductions) per
  few chunks, then NumPy/torch conversions several chunks per call, as below.

Both give the same bits. On the NumPy route float16 becomes float32 through torch's copy (the CPU's F16C conversion;
NumPy's own cast runs in software) or, without torch, by its bits: the int16 word sign-extended to int32 and shifted
left 13 puts the sign in bits 31..28 and the exponent and mantissa in 27..13; masking bits 30..28 leaves a float32
whose exponent is 112 too small, and multiplying by 2^112 is exact for zeros, subnormals and normal numbers alike.
Infinities and NaNs (exponent 31) would come out as finite values of magnitude 2^16 and above, larger than any
finite float16, so a block that holds one is converted by NumPy instead. Either way the conversion is exact. int8
codes are dequantised with their block's scale and offset as `dequantise` does, then shifted: the same float32
operations in the same order as reading through HDF5 and converting afterwards, so both give bit-identical values.
"""

from __future__ import annotations

import mmap
import os
from collections.abc import Iterator
from types import ModuleType

import h5py
import numpy as np

from actdb.store.files.fletcher32 import fletcher32_rows, scratch_for, scratch_size, stored_checksums

CHECKSUM_BYTES = 4
GROUP_CHUNKS = 4  # chunks whose checksums one set of BLAS calls verifies, right after they are read
PIECE_VALUES = 131072  # values converted per piece: rows across the whole layer, a float32 buffer in cache
F16_SCALE = np.float32(2.0**112)
F16_MASK = np.int32(-0x70000001)  # 0x8FFFFFFF: the sign bit and bits 27..0
F16_LIMIT = np.float32(65536.0)  # beyond the largest finite float16 (65504): an infinity or NaN came through


def _fused_pass() -> ModuleType | None:
    """The C pass, or None where it was not built or ACTDB_READER=numpy asks for the NumPy route (tests run both)."""
    if os.environ.get("ACTDB_READER", "") == "numpy":
        return None
    try:
        from actdb.store.files import _fused_chunks
    except ImportError:
        return None
    return _fused_chunks


FUSED = _fused_pass()  # the one place the route is chosen; a reader made after changing it uses the new one


LINE = 64  # bytes of a cache line


def float32_rows(n_rows: int, width: int) -> np.ndarray:
    """An uninitialised float32 (n_rows, width) array whose first value starts a cache line: the C pass streams
    whole lines into the rows it writes, and a row that starts mid-line costs two partial lines (2.5x slower,
    measured); NumPy's large arrays start 16 bytes into a page."""
    buf = np.empty(n_rows * width + LINE // 4, dtype=np.float32)
    k = (-buf.ctypes.data % LINE) // 4
    return buf[k : k + n_rows * width].reshape(n_rows, width)


class ChunkError(OSError):
    """A chunk whose stored bytes fail their checksum or are not what the dataset's layout says."""


def reads_raw(ds: h5py.Dataset) -> bool:
    """Whether a dataset's chunks can be read raw: 2-D chunks of float16 or int8 with Fletcher-32 the only filter."""
    if ds.chunks is None or len(ds.shape) != 2 or ds.dtype not in (np.float16, np.int8):
        return False
    plist = ds.id.get_create_plist()
    return plist.get_nfilters() == 1 and plist.get_filter(0)[0] == h5py.h5z.FILTER_FLETCHER32


class RawChunkRows:
    """`stored - shift` of rows of 2-D chunked datasets, through raw chunks; buffers shared by every layer."""

    def __init__(self) -> None:
        self._fused = FUSED
        self._offsets: dict[str, np.ndarray | None] = {}  # by dataset: its chunks' byte offsets (`_chunk_offsets`)
        self._raw = np.empty(0, dtype=np.uint8)
        self._checksum = np.empty(0, dtype=np.float32)
        self._piece = np.empty(PIECE_VALUES, dtype=np.float32)

    def read_shifted(
        self,
        ds: h5py.Dataset,
        start: int,
        out: np.ndarray,
        shift: np.ndarray,
        quantisation: tuple[np.ndarray, np.ndarray, int] | None = None,
    ) -> None:
        """Rows `[start, start + len(out))` of `ds` minus `shift` (per column) into the float32 `out`. int8 codes
        need `quantisation` = (scales, offsets, first): the scale and offset rows of the blocks the rows touch
        (the blocks are the chunks' rows), from block `first` on."""
        n_rows, width = out.shape
        if out.dtype != np.float32 or width != ds.shape[1]:
            raise ValueError(f"rows of {ds.name} are read into float32 rows of {ds.shape[1]} columns")
        chunk_rows, chunk_cols = ds.chunks
        size = ds.dtype.itemsize
        chunk_bytes = chunk_rows * chunk_cols * size
        stride = chunk_bytes + CHECKSUM_BYTES
        cols = range(0, width, chunk_cols)
        if self._fused is not None and _fits_the_c_pass(out, shift, quantisation):
            self._read_fused(ds, start, out, shift, quantisation, stride)
            return
        if self._raw.size < len(cols) * stride:
            self._raw = np.empty(len(cols) * stride, dtype=np.uint8)
        if self._checksum.size < scratch_size(chunk_bytes, GROUP_CHUNKS):
            self._checksum = scratch_for(chunk_bytes, GROUP_CHUNKS)
        # a row of chunks as (chunk, row, column within the chunk), the chunks `stride` bytes apart in `_raw`
        values = np.ndarray(
            (len(cols), chunk_rows, chunk_cols),
            dtype=ds.dtype,
            buffer=self._raw,
            strides=(stride, chunk_cols * size, size),
        )
        stop = start + n_rows
        for row0 in range(start - start % chunk_rows, stop, chunk_rows):
            lo, hi = max(start, row0) - row0, min(stop, row0 + chunk_rows) - row0
            for g in range(0, len(cols), GROUP_CHUNKS):
                self._read_checked(ds, row0, cols[g : g + GROUP_CHUNKS], g, stride, chunk_bytes)
            block = None
            if quantisation is not None:
                scales, offsets, first = quantisation
                block = (scales[row0 // chunk_rows - first], offsets[row0 // chunk_rows - first])
            rows = out[row0 + lo - start : row0 + hi - start]
            self._convert(values[:, lo:hi], rows, chunk_cols, shift, block)

    def _read_fused(
        self,
        ds: h5py.Dataset,
        start: int,
        out: np.ndarray,
        shift: np.ndarray,
        quantisation: tuple[np.ndarray, np.ndarray, int] | None,
        stride: int,
    ) -> None:
        """`read_shifted` by the C pass, straight into `out`: a row of chunks per call from the file's pages
        mapped into memory (no copy, no GIL) where the file allows it (`_chunk_offsets`), else each chunk read by
        `read_direct_chunk` into one buffer, then checked and converted while it is in the cache."""
        chunk_rows, chunk_cols = ds.chunks
        offsets = self._chunk_offsets(ds, stride)
        if offsets is not None:
            # mapped for this call only: the pages it touched leave the process's resident set when it ends (a
            # mapping kept open would count every page read so far, which Dask's memory monitor would see)
            # the file HDF5 has open (its descriptor), not its name: a file replaced on disk since (`ingest --force`
            # renames a new one into place) must not be read at the old one's chunk offsets. A file truncated by
            # another program while a call has it mapped still ends the process (SIGBUS): HDF5's file lock keeps
            # HDF5 writers out, not `cp` over the file or runs with HDF5_USE_FILE_LOCKING=FALSE
            with mmap.mmap(ds.file.id.get_vfd_handle(), 0, access=mmap.ACCESS_READ) as file:
                for row0, lo, rows, block in _row_blocks(start, out, chunk_rows, quantisation):
                    bad = self._fused.mapped_check_convert(
                        file, offsets[row0 // chunk_rows], stride, chunk_cols, lo, rows, shift, *block
                    )
                    if bad >= 0:
                        raise ChunkError(
                            f"Fletcher-32 checksum mismatch in chunk at row {row0}, column {bad * chunk_cols} "
                            f"of {ds.name}"
                        )
            return
        if self._raw.size < stride:
            self._raw = np.empty(stride, dtype=np.uint8)
        raw = self._raw[:stride]
        for row0, lo, rows, block in _row_blocks(start, out, chunk_rows, quantisation):
            for c0 in range(0, out.shape[1], chunk_cols):
                c1 = min(out.shape[1], c0 + chunk_cols)
                mask, got = _direct_chunk(ds, (row0, c0), raw)
                if mask != 0 or len(got) != stride:
                    raise ChunkError(
                        f"chunk at row {row0}, column {c0} of {ds.name} is not stored with its checksum "
                        f"({len(got)} bytes, filter mask {mask})"
                    )
                part = tuple(b[c0:c1] for b in block)
                if not self._fused.check_convert(raw, chunk_cols, lo, rows[:, c0:c1], shift[c0:c1], *part):
                    raise ChunkError(f"Fletcher-32 checksum mismatch in chunk at row {row0}, column {c0} of {ds.name}")

    def _chunk_offsets(self, ds: h5py.Dataset, stride: int) -> np.ndarray | None:
        """The byte offset in the file of every chunk of `ds`, (row of chunks, column of chunks), found once per
        dataset; None where the C pass must go through HDF5 instead: a file open for writing (HDF5 may hold
        chunks not yet written out), not a plain POSIX file (the sec2 driver), with a user block, or with a chunk
        that is missing, not stored as `stride` bytes with its checksum (HDF5's read names the problem) or past
        the file's end."""
        if ds.name in self._offsets:
            return self._offsets[ds.name]
        f = ds.file
        offsets = None
        if f.mode == "r" and f.driver == "sec2" and f.userblock_size == 0:
            chunk_rows, chunk_cols = ds.chunks
            grid = (-(-ds.shape[0] // chunk_rows), -(-ds.shape[1] // chunk_cols))
            offsets = np.full(grid, -1, dtype=np.int64)
            odd = []

            def note(info: h5py.h5d.StoreInfo) -> None:
                r, c = info.chunk_offset
                offsets[r // chunk_rows, c // chunk_cols] = info.byte_offset
                if info.size != stride or info.filter_mask != 0:
                    odd.append(info.chunk_offset)

            try:
                ds.id.chunk_iter(note)
            except (RuntimeError, ValueError) as exc:  # HDF5 could not walk a damaged chunk index
                raise ChunkError(f"the chunk index of {ds.name} cannot be read: {exc}") from exc
            if odd or (offsets < 0).any() or offsets.max() + stride > os.fstat(f.id.get_vfd_handle()).st_size:
                offsets = None
        self._offsets[ds.name] = offsets
        return offsets

    def _read_checked(
        self, ds: h5py.Dataset, row0: int, cols: range, first: int, stride: int, chunk_bytes: int
    ) -> None:
        """The stored bytes of the chunks at (row0, c) for c in `cols` into `_raw` from slot `first` on, one per
        `stride`, each verified against its Fletcher-32 checksum."""
        for k, c in enumerate(cols, start=first):
            mask, got = _direct_chunk(ds, (row0, c), self._raw[k * stride : (k + 1) * stride])
            if mask != 0 or len(got) != stride:
                raise ChunkError(
                    f"chunk at row {row0}, column {c} of {ds.name} is not stored with its checksum "
                    f"({len(got)} bytes, filter mask {mask})"
                )
        chunks = self._raw[first * stride : (first + len(cols)) * stride].reshape(len(cols), stride)
        computed = fletcher32_rows(chunks[:, :chunk_bytes], self._checksum)
        little, big = stored_checksums(chunks[:, chunk_bytes:])
        bad = np.flatnonzero((computed != little) & (computed != big))
        if bad.size:
            raise ChunkError(
                f"Fletcher-32 checksum mismatch in chunk at row {row0}, column {cols[bad[0]]} of {ds.name}"
            )

    def _convert(
        self,
        values: np.ndarray,
        rows: np.ndarray,
        chunk_cols: int,
        shift: np.ndarray,
        block: tuple[np.ndarray, np.ndarray] | None,
    ) -> None:
        """A row of chunks' values `(n_chunks, rows, chunk_cols)` into `rows`, a few whole rows of the layer at a
        time (one long run per row of `rows`, which writes at about twice the rate of a chunk's short pieces);
        the last chunk of a layer whose width is not a multiple of the chunk's is converted on its own."""
        width = rows.shape[1]
        whole = width // chunk_cols
        parts = [(0, whole, chunk_cols)] if whole else []
        if width % chunk_cols:
            parts.append((whole, whole + 1, width % chunk_cols))
        for k0, k1, per in parts:
            c0, n_cols = k0 * chunk_cols, (k1 - k0) * per
            src = values[k0:k1, :, :per].transpose(1, 0, 2)  # (row, chunk, column within the chunk)
            dest, sh = rows[:, c0 : c0 + n_cols], shift[c0 : c0 + n_cols]
            step = max(1, PIECE_VALUES // n_cols)
            for r in range(0, src.shape[0], step):
                part = src[r : r + step]
                f = self._piece[: part.size].reshape(part.shape)
                flat = f.reshape(part.shape[0], n_cols)
                if block is None:
                    _float16_into(part, f)
                else:
                    np.copyto(f, part)  # exact, and faster than mixing int8 and float32 in one operation
                    np.multiply(flat, block[0][c0 : c0 + n_cols], out=flat)  # `dequantise`'s order, then the shift
                    np.add(flat, block[1][c0 : c0 + n_cols], out=flat)
                np.subtract(flat, sh, out=dest[r : r + step])


def _direct_chunk(ds: h5py.Dataset, offset: tuple[int, int], out: np.ndarray) -> tuple[int, memoryview]:
    """A chunk's stored bytes into `out` (its filter mask, the bytes); a chunk HDF5 cannot hand over as stored
    (larger than its layout says, or a damaged index) is a corrupt file, not h5py's ValueError or RuntimeError."""
    try:
        return ds.id.read_direct_chunk(offset, out=out)
    except (RuntimeError, ValueError) as exc:
        raise ChunkError(f"chunk at row {offset[0]}, column {offset[1]} of {ds.name} cannot be read: {exc}") from exc


def _row_blocks(
    start: int, out: np.ndarray, chunk_rows: int, quantisation: tuple[np.ndarray, np.ndarray, int] | None
) -> Iterator[tuple[int, int, np.ndarray, tuple[np.ndarray, ...]]]:
    """For each row of chunks that rows `[start, start + len(out))` touch: its first row, the first of its rows
    wanted, their rows of `out`, and (int8) the block's scale and offset rows."""
    stop = start + len(out)
    for row0 in range(start - start % chunk_rows, stop, chunk_rows):
        lo, hi = max(start, row0) - row0, min(stop, row0 + chunk_rows) - row0
        block = ()
        if quantisation is not None:
            scales, offsets, first = quantisation
            block = (scales[row0 // chunk_rows - first], offsets[row0 // chunk_rows - first])
        yield row0, lo, out[row0 + lo - start : row0 + hi - start], block


def _fits_the_c_pass(
    out: np.ndarray, shift: np.ndarray, quantisation: tuple[np.ndarray, np.ndarray, int] | None
) -> bool:
    """Whether the C pass takes these arguments as they are: float32 inputs (the NumPy route would compute with
    wider ones in their precision), a contiguous `shift` and rows with contiguous columns."""
    arrays = [shift] if quantisation is None else [shift, quantisation[0], quantisation[1]]
    return out.strides[1] == 4 and all(a.dtype == np.float32 and a.flags.c_contiguous for a in arrays)


def _float16_into(src: np.ndarray, f: np.ndarray) -> None:
    """float16 `src` as float32 into `f` (same shape, contiguous): torch's copy, or the bit route without torch."""
    cast = _torch_cast()
    if cast is not None:
        cast(src, f)
        return
    y = f.view(np.int32)
    np.copyto(y, src.view(np.int16))
    np.left_shift(y, 13, out=y)
    np.bitwise_and(y, F16_MASK, out=y)
    np.multiply(f, F16_SCALE, out=f)
    if f.max() >= F16_LIMIT or f.min() <= -F16_LIMIT:
        np.copyto(f, src)  # an infinity or NaN: NumPy's own conversion


TORCH_SERIAL = 32768  # elements per torch call: at most torch's grain size, so no call wakes its thread pool
_TORCH: list = []


def _torch_cast():
    """A float16 -> float32 copy by torch (the CPU's F16C instructions, about twice the bit route's rate here),
    in pieces small enough that torch runs each on the calling thread (BLAS keeps the other cores); None when
    torch cannot be imported. Imported on first use: readers that never convert float16 do not pay for it."""
    if not _TORCH:
        try:
            import torch
        except ImportError:
            _TORCH.append(None)
        else:

            def cast(src: np.ndarray, out: np.ndarray) -> None:
                to, frm = torch.from_numpy(out), torch.from_numpy(src)
                step = max(1, TORCH_SERIAL // (src.size // src.shape[0]))
                for r in range(0, src.shape[0], step):
                    to[r : r + step].copy_(frm[r : r + step])

            _TORCH.append(cast)
    return _TORCH[0]
