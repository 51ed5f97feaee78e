"""HDF5's Fletcher-32 checksum of a chunk, computed with a few vectorised NumPy reductions instead of a byte loop.

HDF5 (`H5_checksum_fletcher32`) reads the data as big-endian 16-bit words w_0..w_{n-1} (an odd last byte is the
high byte of a word whose low byte is 0) and keeps sum1 = sum of the words and sum2 = sum of the running sum1,
both folded `(s & 0xffff) + (s >> 16)` every 360 words and twice at the end; the checksum is
`(sum2 << 16) | sum1`. Folding keeps a value's residue mod 65535 (2^16 = 1 mod 65535), so

    sum1 = S1 mod 65535,  sum2 = S2 mod 65535,  S1 = sum_i w_i,  S2 = sum_i (n - i) w_i,

except that a positive sum whose residue is 0 reads 0xffff (a fold of a positive number is never 0), and both are
0 only for all-zero data. The words are summed as they lie in memory (little-endian on every machine actdb runs
on): a word with its bytes swapped is 256 times the other mod 65535 (256^2 = 65536 = 1), so each sum is 256 times
the sum of the little-endian words. The chunk, as a matrix of rows of K words, needs its column sums and its row
sums: sum_i i w_i = K * sum_r r * rowsum_r + sum_j j * colsum_j, both BLAS matrix-vector products in float32.
"""

from __future__ import annotations

import numpy as np

MODULUS = 65535
SIDE = 256  # the words are summed as float32 matrices of SIDE x SIDE: every row or column sum is at most
# 256 x 65535 < 2^24, so BLAS adds only integers float32 holds exactly, in whatever order it adds them
BLOCK = SIDE * SIDE
_ONES = np.ones(SIDE, dtype=np.float32)


MAX_BYTES = 2**24  # int64 holds 256 x n x sum of words up to here


def _residue(total: np.ndarray) -> np.ndarray:
    """What HDF5's folding leaves of positive sums: the residue mod 65535, 0xffff for a multiple of it."""
    return (total - 1) % MODULUS + 1


def scratch_size(n_bytes: int, n_chunks: int = 1) -> int:
    """float32 elements `fletcher32_rows` works in for `n_chunks` pieces of `n_bytes` bytes."""
    return n_chunks * max(1, -(-((n_bytes + 1) // 2) // BLOCK)) * BLOCK


def scratch_for(n_bytes: int, n_chunks: int = 1) -> np.ndarray:
    """A float32 buffer `fletcher32` / `fletcher32_rows` can reuse for `n_chunks` pieces of `n_bytes` bytes."""
    return np.empty(scratch_size(n_bytes, n_chunks), dtype=np.float32)


def fletcher32_rows(data: np.ndarray, scratch: np.ndarray | None = None) -> np.ndarray:
    """HDF5's Fletcher-32 of each row of the uint8 matrix `data` (rows may lie apart in memory, each row's bytes
    contiguous), as uint32: all rows with the same few BLAS calls. `scratch`: a buffer from `scratch_for`."""
    k, n_bytes = data.shape
    if n_bytes > MAX_BYTES:
        raise ValueError(f"checksums of pieces over {MAX_BYTES} bytes would overflow int64 ({n_bytes} given)")
    n = (n_bytes + 1) // 2  # words, the odd last byte making one of its own
    blocks = scratch_size(n_bytes) // BLOCK
    if scratch is None or scratch.size < k * blocks * BLOCK:
        scratch = scratch_for(n_bytes, k)
    x = scratch[: k * blocks * BLOCK].reshape(k, blocks * BLOCK)
    full = n_bytes // 2
    np.copyto(x[:, :full], data[:, : 2 * full].view(np.uint16))  # little-endian words (see the module's note)
    if n_bytes % 2:
        x[:, full] = data[:, -1]  # big-endian word (last << 8); as a little-endian word it reads `last`
    x[:, n:] = 0  # zero words add nothing to either sum
    # row r of a piece holds its words r*SIDE .. r*SIDE + SIDE - 1
    rows = (x.reshape(k * blocks * SIDE, SIDE) @ _ONES).reshape(k, blocks * SIDE).astype(np.int64)
    cols = np.matmul(_ONES, x.reshape(k * blocks, SIDE, SIDE)).reshape(k, blocks, SIDE).astype(np.int64)
    plain = rows.sum(axis=1)  # sum of the words
    weighted = SIDE * (rows @ np.arange(blocks * SIDE, dtype=np.int64)) + cols.sum(axis=1) @ np.arange(SIDE)
    sum1 = _residue(256 * plain)
    sum2 = _residue(256 * (n * plain - weighted))  # sum_i (n - i) w_i
    return np.where(plain == 0, 0, (sum2 << 16) | sum1).astype(np.uint32)  # all-zero data: HDF5's sums stay 0


def fletcher32(data: np.ndarray, scratch: np.ndarray | None = None) -> int:
    """HDF5's Fletcher-32 of the bytes of `data` (a contiguous array of any dtype)."""
    raw = np.ascontiguousarray(data).reshape(1, -1).view(np.uint8)
    return int(fletcher32_rows(raw, scratch)[0])


def stored_checksums(trailers: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The checksums in chunks' 4 trailing bytes `(k, 4)` uint8: as HDF5 writes them (little-endian) and in the
    byte order HDF5 1.6.4 and earlier wrote, which HDF5 also accepts."""
    little = trailers.astype(np.uint32) @ np.array([1, 1 << 8, 1 << 16, 1 << 24], dtype=np.uint32)
    big = trailers.astype(np.uint32) @ np.array([1 << 24, 1 << 16, 1 << 8, 1], dtype=np.uint32)
    return little, big
