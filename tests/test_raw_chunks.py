"""The raw-chunk reader: HDF5's Fletcher-32 recomputed (in NumPy, and in the C pass), values bit for bit those of
HDF5's own read by both routes, and corruption still caught (by the reader and by a correlation that uses it)."""

from __future__ import annotations

import os
from pathlib import Path

import h5py
import numpy as np
import pytest

from actdb.compute.correlation.engine import CorrelationOptions, SetInput, correlate_sets
from actdb.store.device import NUMPY
from actdb.store.errors import ActdbError
from actdb.store.files import raw_chunks
from actdb.store.files.activation import ActivationHeader, ActivationReader, ActivationWriter, layer_key
from actdb.store.files.fletcher32 import fletcher32, fletcher32_rows
from actdb.store.files.raw_chunks import reads_raw


def hdf5_fletcher32(data: bytes) -> int:
    """HDF5's H5_checksum_fletcher32 transcribed line by line (big-endian words, folds every 360 words)."""
    s1 = s2 = 0
    i, left = 0, len(data) // 2
    while left:
        t = min(left, 360)
        left -= t
        for _ in range(t):
            s1 += (data[i] << 8) | data[i + 1]
            i += 2
            s2 += s1
        s1 = (s1 & 0xFFFF) + (s1 >> 16)
        s2 = (s2 & 0xFFFF) + (s2 >> 16)
    if len(data) % 2:
        s1 += data[i] << 8
        s2 += s1
        s1 = (s1 & 0xFFFF) + (s1 >> 16)
        s2 = (s2 & 0xFFFF) + (s2 >> 16)
    s1 = (s1 & 0xFFFF) + (s1 >> 16)
    s2 = (s2 & 0xFFFF) + (s2 >> 16)
    return (s2 << 16) | s1


@pytest.mark.parametrize("n", [0, 1, 2, 3, 719, 720, 721, 4097, 65536 * 2 + 5])
@pytest.mark.parametrize("pattern", ["random", "ones", "zeros", "alternating"])
def test_fletcher32_is_hdf5s(n, pattern):
    rng = np.random.default_rng(n)
    data = {
        "random": rng.integers(0, 256, n, dtype=np.uint8),
        "ones": np.full(n, 0xFF, np.uint8),  # every word 0xffff: the sums' residues are multiples of 65535
        "zeros": np.zeros(n, np.uint8),
        "alternating": np.resize(np.array([0xFF, 0x00, 0x01], np.uint8), n),
    }[pattern]
    assert fletcher32(data) == hdf5_fletcher32(data.tobytes())


def test_fletcher32_rows_of_strided_pieces():
    rng = np.random.default_rng(0)
    block = rng.integers(0, 256, (5, 1030), dtype=np.uint8)
    got = fletcher32_rows(block[:, :1025])  # rows 1030 bytes apart, 1025 bytes each
    assert got.tolist() == [hdf5_fletcher32(row[:1025].tobytes()) for row in block]


def _write(path: Path, dtype: str, n_tokens: int, d: int, layers: int = 2, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    rows = [(rng.standard_normal((n_tokens, d)) * 3).astype(np.float32) for _ in range(layers)]
    rows[0][:5, :3] = [[0, -0.0, 1e-7], [-3e-6, 65000, -65000], [6e-8, -6e-8, 2.0**-14], [1, 2, 3], [4, 5, 6]]
    w = ActivationWriter(path, ActivationHeader("m", 0, "fp", "mlp_post", layers, d, n_tokens, dtype))
    w.write_rows(0, [r.astype(np.float16) if dtype == "float16" else r for r in rows])
    w.finish()
    return rows


def test_stored_checksums_are_the_ones_hdf5_wrote(tmp_path):
    for dtype in ("float16", "int8"):
        path = tmp_path / f"{dtype}.h5"
        _write(path, dtype, 2500, 200)
        with h5py.File(path, "r") as f:
            ds = f[layer_key(1)]
            assert reads_raw(ds)
            for i in range(ds.id.get_num_chunks()):
                corner = ds.id.get_chunk_info(i).chunk_offset
                _, raw = ds.id.read_direct_chunk(corner)
                assert fletcher32(np.frombuffer(raw[:-4], np.uint8)) == int.from_bytes(raw[-4:], "little")


try:  # the C pass itself, tested even where ACTDB_READER=numpy keeps the rest of the suite on the NumPy route
    from actdb.store.files import _fused_chunks as FUSED
except ImportError:
    FUSED = None
needs_c = pytest.mark.skipif(FUSED is None, reason="the C extension _fused_chunks is not built")


@pytest.fixture
def scalar_c():
    """The C pass without its vector instructions (AVX2, F16C), as on a CPU without them."""
    FUSED.set_instructions(False, False)
    yield FUSED
    FUSED.set_instructions(True, True)


@pytest.fixture(params=["c", "c-scalar", "c-hdf5", "numpy-torch", "numpy-bits"])
def route(request, monkeypatch) -> str:
    """The reader's routes: the C pass (reading the chunks itself, with and without AVX2/F16C, or given them by
    HDF5's read_direct_chunk), or NumPy with float16 converted by torch's F16C copy or by the bit route used where
    torch is missing."""
    if request.param.startswith("c"):
        if FUSED is None:
            pytest.skip("the C extension _fused_chunks is not built")
        monkeypatch.setattr(raw_chunks, "FUSED", FUSED)
        if request.param == "c-scalar":
            request.getfixturevalue("scalar_c")
        if request.param == "c-hdf5":
            monkeypatch.setattr(raw_chunks.RawChunkRows, "_chunk_offsets", lambda *_: None)
    else:
        monkeypatch.setattr(raw_chunks, "FUSED", None)
        if request.param == "numpy-bits":
            monkeypatch.setattr(raw_chunks, "_TORCH", [None])
    return request.param


@needs_c
@pytest.mark.parametrize("vector", [True, False])
@pytest.mark.parametrize("n", [0, 1, 2, 3, 31, 32, 33, 719, 720, 721, 16383, 16384, 16385, 65536 * 2 + 5])
@pytest.mark.parametrize("pattern", ["random", "ones", "zeros", "alternating"])
def test_the_c_pass_checksum_is_hdf5s(n, pattern, vector, scalar_c):
    rng = np.random.default_rng(n)
    data = {
        "random": rng.integers(0, 256, n, dtype=np.uint8),
        "ones": np.full(n, 0xFF, np.uint8),
        "zeros": np.zeros(n, np.uint8),
        "alternating": np.resize(np.array([0xFF, 0x00, 0x01], np.uint8), n),
    }[pattern]
    scalar_c.set_instructions(vector, vector)
    assert scalar_c.fletcher32(data) == hdf5_fletcher32(data.tobytes())


def test_chunks_are_mapped_only_from_files_open_to_read(tmp_path):
    path = tmp_path / "a.h5"
    _write(path, "float16", 2500, 200)
    rows = raw_chunks.RawChunkRows()
    with h5py.File(path, "r") as f:
        offsets = rows._chunk_offsets(f[layer_key(0)], 1024 * 128 * 2 + 4)
        assert offsets.shape == (3, 2)
        _, raw = f[layer_key(0)].id.read_direct_chunk((1024, 128))
        with open(path, "rb") as fh:
            fh.seek(int(offsets[1, 1]))
            assert fh.read(len(raw)) == raw
    with h5py.File(path, "r+") as f:
        assert raw_chunks.RawChunkRows()._chunk_offsets(f[layer_key(0)], 1024 * 128 * 2 + 4) is None


def test_actdb_reader_numpy_selects_the_numpy_route(monkeypatch):
    monkeypatch.setenv("ACTDB_READER", "numpy")
    assert raw_chunks._fused_pass() is None


@pytest.mark.parametrize("dtype", ["float16", "int8"])
@pytest.mark.parametrize(("start", "n"), [(0, 2500), (1000, 1100), (2047, 300), (2499, 1), (100, 0)])
def test_shifted_rows_equal_hdf5s_read_minus_the_shift(tmp_path, dtype, start, n, route):
    d = 200  # two column chunks, the second only partly used; 2500 tokens: the last row chunk partly used
    path = tmp_path / "a.h5"
    _write(path, dtype, 2500, d)
    shift = np.random.default_rng(1).standard_normal(d).astype(np.float32)
    with ActivationReader(path) as r:
        for layer in (0, 1):
            expected = r.read_rows(start, start + n, [layer])[0].astype(np.float32) - shift
            wide = np.full((n, 3 * d), 7.0, np.float32)  # the layer's columns of a wider chunk, as the engine reads
            r.read_shifted_into(layer, start, wide[:, d : 2 * d], shift)
            np.testing.assert_array_equal(wide[:, d : 2 * d], expected)
            assert (wide[:, :d] == 7).all() and (wide[:, 2 * d :] == 7).all()


@pytest.mark.parametrize("dtype", ["float16", "int8"])
@pytest.mark.parametrize("d", [5, 141, 300])
@pytest.mark.parametrize("skew", [0, 1, 3, 16])
def test_rows_at_any_alignment_and_width(tmp_path, dtype, d, skew, route):
    """Layers narrower than a vector (5), a last chunk of 13 columns (141), destinations starting anywhere in a
    cache line (`skew` floats past one): the C pass's partial lines and tails."""
    path = tmp_path / "a.h5"
    _write(path, dtype, 1100, d, layers=1)
    shift = np.random.default_rng(3).standard_normal(d).astype(np.float32)
    buf = raw_chunks.float32_rows(1100, d + 40)
    buf[:] = 7
    with ActivationReader(path) as r:
        expected = r.read_rows(0, 1100, [0])[0].astype(np.float32) - shift
        r.read_shifted_into(0, 0, buf[:, skew : skew + d], shift)
    np.testing.assert_array_equal(buf[:, skew : skew + d], expected)
    assert (buf[:, :skew] == 7).all() and (buf[:, skew + d :] == 7).all()


def test_infinities_and_nans_convert_as_numpy_does(tmp_path, route):
    path = tmp_path / "a.h5"
    x = np.random.default_rng(0).standard_normal((1024, 128)).astype(np.float16)
    x[3, :4] = [np.inf, -np.inf, np.nan, 65504]
    w = ActivationWriter(path, ActivationHeader("m", 0, "fp", "mlp_post", 1, 128, 1024, "float16"))
    w.write_rows(0, [x])
    w.finish()
    out = np.empty((1024, 128), np.float32)
    with ActivationReader(path) as r:
        r.read_shifted_into(0, 0, out, np.zeros(128, np.float32))
    np.testing.assert_array_equal(out, x.astype(np.float32))


def test_a_dataset_with_other_filters_is_read_through_hdf5(tmp_path):
    path = tmp_path / "a.h5"
    _write(path, "float16", 1024, 64, layers=1)
    x = np.random.default_rng(2).standard_normal((1024, 64)).astype(np.float16)
    with h5py.File(path, "r+") as f:
        del f[layer_key(0)]
        f.create_dataset(layer_key(0), data=x, chunks=(1024, 64), compression="gzip", fletcher32=True)
        assert not reads_raw(f[layer_key(0)])
    out = np.empty((1024, 64), np.float32)
    shift = np.full(64, 0.25, np.float32)
    with ActivationReader(path) as r:
        r.read_shifted_into(0, 0, out, shift)
    np.testing.assert_array_equal(out, x.astype(np.float32) - shift)


def _flip_a_byte_of_chunk(path: Path, layer: int, corner: tuple[int, int], at: int) -> None:
    """Change one stored byte `at` bytes into a chunk (negative: from its end, into the checksum)."""
    with h5py.File(path, "r") as f:
        ds = f[layer_key(layer)]
        info = next(
            ds.id.get_chunk_info(i)
            for i in range(ds.id.get_num_chunks())
            if ds.id.get_chunk_info(i).chunk_offset == corner
        )
        where = info.byte_offset + (at if at >= 0 else info.size + at)
    with open(path, "r+b") as fh:
        fh.seek(where)
        byte = fh.read(1)[0]
        fh.seek(where)
        fh.write(bytes([byte ^ 0x10]))


@pytest.mark.parametrize("dtype", ["float16", "int8"])
@pytest.mark.parametrize("at", [1000, -2])  # a value's byte, or a byte of the stored checksum
def test_a_corrupted_chunk_is_caught(tmp_path, dtype, at, route):
    path = tmp_path / "a.h5"
    _write(path, dtype, 2048, 256)
    _flip_a_byte_of_chunk(path, 1, (1024, 128), at)
    out = np.empty((2048, 256), np.float32)
    shift = np.zeros(256, np.float32)
    with ActivationReader(path) as r:
        r.read_shifted_into(1, 0, out[:1024], shift)  # the chunks before it are intact
        with pytest.raises(ActdbError, match=r"corrupt \(checksum.*row 1024, column 128"):
            r.read_shifted_into(1, 0, out, shift)
        with pytest.raises(ActdbError, match="corrupt"):  # HDF5's own filter agrees
            r.read_rows(1024, 2048, [1])


@pytest.mark.parametrize("route", ["c", "numpy-torch"], indirect=True)
def test_a_correlation_over_a_corrupted_chunk_fails_with_one_line(tmp_path, route):
    paths = [tmp_path / "a.h5", tmp_path / "b.h5"]
    for seed, path in enumerate(paths):
        _write(path, "float16", 2048, 128, seed=seed)
    _flip_a_byte_of_chunk(paths[1], 0, (1024, 0), 4000)
    inputs = [SetInput(k, str(p), 2, 128, np.zeros(256, np.float32), rotation_key=k) for k, p in enumerate(paths)]
    tokens = np.arange(2048, dtype=np.int64).reshape(16, 128) % 50
    with pytest.raises(ActdbError, match=f"activation file {paths[1]} is corrupt"):
        correlate_sets(inputs, tokens, np.ones_like(tokens, bool), CorrelationOptions(baseline_draws=1), NUMPY)


def test_a_reader_keeps_reading_the_file_it_opened_when_the_path_is_replaced_or_moved(tmp_path, route):
    """The C pass maps the file HDF5 has open, not the path: `ingest --force` renames a new file into place,
    and an open reader must not read it at the old file's chunk offsets (same shape: the checksums would pass)."""
    path = tmp_path / "a.h5"
    _write(path, "float16", 2048, 256)
    out = np.empty((2048, 256), np.float32)
    shift = np.zeros(256, np.float32)
    with ActivationReader(path) as r:
        r.read_shifted_into(1, 0, out, shift)
        before = out.copy()
        newer = tmp_path / "b.h5"
        _write(newer, "float16", 2048, 256, seed=5)
        os.replace(newer, path)
        r.read_shifted_into(1, 0, out, shift)
        np.testing.assert_array_equal(out, before)
        os.rename(path, tmp_path / "moved.h5")
        r.read_shifted_into(1, 0, out, shift)
        np.testing.assert_array_equal(out, before)


def test_a_chunk_larger_than_its_layout_is_a_corrupt_file(tmp_path, route):
    path = tmp_path / "a.h5"
    _write(path, "float16", 2048, 256)
    with h5py.File(path, "r+") as f:
        ds = f[layer_key(1)]
        _, raw = ds.id.read_direct_chunk((1024, 128))
        ds.id.write_direct_chunk((1024, 128), raw + b"\x41" * 1000, 0)
    with ActivationReader(path) as r, pytest.raises(ActdbError, match=r"corrupt.*row 1024, column 128"):
        r.read_shifted_into(1, 0, np.empty((2048, 256), np.float32), np.zeros(256, np.float32))


def test_int8_blocks_that_are_not_the_chunks_rows_are_read_through_hdf5(tmp_path, route):
    """The raw route takes a chunk row's scales by its index; a file whose scale blocks are not its chunk rows
    (not one actdb writes) is read through HDF5, which gives the values its blocks say."""
    path = tmp_path / "a.h5"
    _write(path, "int8", 2048, 256)
    with h5py.File(path, "r+") as f:
        f.attrs["block_rows"] = 1500
    with ActivationReader(path) as r:
        ref = np.empty((2048, 256), np.float32)
        r.read_rows_into(1, 0, ref)
        out = np.empty((2048, 256), np.float32)
        r.read_shifted_into(1, 0, out, np.zeros(256, np.float32))
    np.testing.assert_array_equal(out, ref)
