"""Rows of an activation layer read as the raw bytes of its HDF5 chunks, checked and converted in NumPy.

HDF5's own read runs the Fletcher-32 filter a byte at a time and NumPy converts float16 in software (0.16 GB/s
here); the correlation engine needs `stored - shift` as float32. This reads each chunk's stored bytes with
`read_direct_chunk` into a reused buffer, verifies its checksum with `fletcher32` (BLAS reductions), and writes
`value - shift` straight into the caller's (possibly strided) float32 rows, several chunks per NumPy call.

float16 becomes float32 through torch's copy (the CPU's F16C conversion; NumPy's own cast runs in software) or,
without torch, by its bits: the int16 word sign-extended to int32 and shifted left 13 puts the sign in bits 31..28
and the exponent and mantissa in 27..13; masking bits 30..28 leaves a float32 whose exponent is 112 too small, and
multiplying by 2^112 is exact for zeros, subnormals and normal numbers alike. Infinities and NaNs (exponent 31)
would come out as finite values of magnitude 2^16 and above, larger than any finite float16, so a block that
holds one is converted by NumPy instead. Either way the conversion is exact. int8 codes are dequantised with their
block's scale and offset as `dequantise` does, then shifted: the same float32 operations in the same order as
reading through HDF5 and converting afterwards, so both give bit-identical values.
"""

from __future__ import annotations

import h5py
import numpy as np

from actdb.store.files.fletcher32 import fletcher32_rows, scratch_for, scratch_size, stored_checksums

CHECKSUM_BYTES = 4
GROUP_CHUNKS = 4  # chunks checked and converted per NumPy call: fewer calls, a working set still in cache
F16_SCALE = np.float32(2.0**112)
F16_MASK = np.int32(-0x70000001)  # 0x8FFFFFFF: the sign bit and bits 27..0
F16_LIMIT = np.float32(65536.0)  # beyond the largest finite float16 (65504): an infinity or NaN came through


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
        self._raw = np.empty(0, dtype=np.uint8)
        self._checksum = np.empty(0, dtype=np.float32)
        self._bits = np.empty(0, dtype=np.int32)

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
        chunk_rows, chunk_cols = ds.chunks
        chunk_bytes = chunk_rows * chunk_cols * ds.dtype.itemsize
        stride = chunk_bytes + CHECKSUM_BYTES
        if out.dtype != np.float32 or width != ds.shape[1]:
            raise ValueError(f"rows of {ds.name} are read into float32 rows of {ds.shape[1]} columns")
        if self._raw.size < GROUP_CHUNKS * stride:
            self._raw = np.empty(GROUP_CHUNKS * stride, dtype=np.uint8)
        if self._checksum.size < scratch_size(chunk_bytes, GROUP_CHUNKS):
            self._checksum = scratch_for(chunk_bytes, GROUP_CHUNKS)
        if self._bits.size < GROUP_CHUNKS * chunk_rows * chunk_cols:
            self._bits = np.empty(GROUP_CHUNKS * chunk_rows * chunk_cols, dtype=np.int32)
        stop = start + n_rows
        for row0 in range(start - start % chunk_rows, stop, chunk_rows):
            lo, hi = max(start, row0) - row0, min(stop, row0 + chunk_rows) - row0
            rows = out[row0 + lo - start : row0 + hi - start]
            for col0 in range(0, width, GROUP_CHUNKS * chunk_cols):
                cols = range(col0, min(width, col0 + GROUP_CHUNKS * chunk_cols), chunk_cols)
                self._read_checked(ds, row0, cols, stride, chunk_bytes)
                codes = np.ndarray(
                    (len(cols), chunk_rows, chunk_cols),
                    dtype=ds.dtype,
                    buffer=self._raw,
                    strides=(stride, chunk_cols * ds.dtype.itemsize, ds.dtype.itemsize),
                )[:, lo:hi]
                block = None
                if quantisation is not None:
                    scales, offsets, first = quantisation
                    block = (scales[row0 // chunk_rows - first], offsets[row0 // chunk_rows - first])
                self._convert(codes, rows, cols, chunk_cols, shift, block)

    def _read_checked(self, ds: h5py.Dataset, row0: int, cols: range, stride: int, chunk_bytes: int) -> None:
        """The stored bytes of the chunks at (row0, c) for c in `cols` into `_raw`, one per `stride`, each
        verified against its Fletcher-32 checksum."""
        for k, c in enumerate(cols):
            mask, got = ds.id.read_direct_chunk((row0, c), out=self._raw[k * stride : (k + 1) * stride])
            if mask != 0 or len(got) != stride:
                raise ChunkError(
                    f"chunk at row {row0}, column {c} of {ds.name} is not stored with its checksum "
                    f"({len(got)} bytes, filter mask {mask})"
                )
        chunks = self._raw[: len(cols) * stride].reshape(len(cols), stride)
        computed = fletcher32_rows(chunks[:, :chunk_bytes], self._checksum)
        little, big = stored_checksums(chunks[:, chunk_bytes:])
        bad = np.flatnonzero((computed != little) & (computed != big))
        if bad.size:
            raise ChunkError(
                f"Fletcher-32 checksum mismatch in chunk at row {row0}, column {cols[bad[0]]} of {ds.name}"
            )

    def _convert(
        self,
        codes: np.ndarray,
        rows: np.ndarray,
        cols: range,
        chunk_cols: int,
        shift: np.ndarray,
        block: tuple[np.ndarray, np.ndarray] | None,
    ) -> None:
        """A group of chunks' values `(n_chunks, rows, chunk_cols)` into their columns of `rows`; the last chunk of
        a layer whose width is not a multiple of the chunk's is written on its own."""
        width = rows.shape[1]
        whole = sum(1 for c in cols if c + chunk_cols <= width)
        parts = [(0, whole, chunk_cols)] if whole else []
        if whole < len(cols):
            parts.append((whole, whole + 1, width - cols[-1]))
        for k0, k1, per in parts:
            c0, k = cols[k0], k1 - k0
            # row by row, the group's chunks side by side: (row, chunk, column within the chunk), so that each
            # row of `rows` is written in one run rather than one short piece per chunk
            src = codes[k0:k1, :, :per].transpose(1, 0, 2)
            dest = rows[:, c0 : c0 + k * per]
            sh = shift[c0 : c0 + k * per]
            if block is None:
                self._from_float16(src, dest, sh)
            else:
                scale, offset = (v[c0 : c0 + k * per] for v in block)
                f = self._bits[: src.size].view(np.float32).reshape(src.shape)
                np.copyto(f, src)  # exact, and faster than mixing int8 and float32 in one operation
                flat = f.reshape(dest.shape)
                np.multiply(flat, scale, out=flat)  # `dequantise`'s order: codes x scale, + offset
                np.add(flat, offset, out=flat)
                np.subtract(flat, sh, out=dest)

    def _from_float16(self, src: np.ndarray, dest: np.ndarray, sh: np.ndarray) -> None:
        """float16 `(rows, chunks, columns)` minus the shift into `dest`, through a float32 buffer in cache."""
        f = self._bits[: src.size].view(np.float32).reshape(src.shape)
        cast = _torch_cast()
        if cast is not None:
            cast(src, f)
        else:
            y = f.view(np.int32)
            np.copyto(y, src.view(np.int16))
            np.left_shift(y, 13, out=y)
            np.bitwise_and(y, F16_MASK, out=y)
            np.multiply(f, F16_SCALE, out=f)
            if f.max() >= F16_LIMIT or f.min() <= -F16_LIMIT:
                np.copyto(f, src)  # an infinity or NaN: NumPy's own conversion
        np.subtract(f.reshape(dest.shape), sh, out=dest)


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
