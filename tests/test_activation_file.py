"""HDF5 activation and token files: round trips, resume, and refusal of unfinished or damaged files."""

import numpy as np
import pytest

from actdb.store.errors import ActdbError
from actdb.store.files.activation import ActivationHeader, ActivationReader, ActivationWriter, partial_path
from actdb.store.files.token import TokenDataset


def header(n_tokens=3000, d=96, layers=2):
    return ActivationHeader(
        model="m",
        step=10,
        dataset_fingerprint="abc",
        hook="mlp.post",
        n_layers=layers,
        d_mlp=d,
        n_tokens=n_tokens,
        dtype="float16",
    )


def test_round_trip_and_resume(tmp_path):
    rng = np.random.default_rng(0)
    data = [rng.standard_normal((3000, 96)).astype(np.float16) for _ in range(2)]
    path = tmp_path / "a.h5"
    w = ActivationWriter(path, header())
    w.write_rows(0, [d[:1000] for d in data])
    w.flush()
    w.close()
    assert not path.exists() and partial_path(path).exists()
    with pytest.raises(ActdbError, match="unfinished"):
        ActivationReader(path)
    w = ActivationWriter(path, header())
    assert w.tokens_done == 1000
    with pytest.raises(ValueError, match="in order"):
        w.write_rows(0, [d[:10] for d in data])
    w.write_rows(1000, [d[1000:] for d in data])
    size = w.finish()
    assert size == path.stat().st_size and not partial_path(path).exists()
    with ActivationReader(path) as r:
        assert r.header == header()
        np.testing.assert_array_equal(r.read_rows(0, 3000)[1], data[1])
        np.testing.assert_array_equal(r.read_neurons(0, [5, 7]), data[0][:, [5, 7]])
        ds = r.layers[0]
        assert ds.fletcher32 and ds.chunks[0] <= 1024 and ds.chunks[1] <= 128


def test_writer_discards_partial_file_with_other_header(tmp_path):
    path = tmp_path / "a.h5"
    w = ActivationWriter(path, header())
    w.write_rows(0, [np.ones((10, 96), np.float16)] * 2)
    w.close()
    w = ActivationWriter(path, header(n_tokens=2000))
    assert w.tokens_done == 0
    w.close()


def test_truncated_or_corrupt_file_is_refused(tmp_path):
    path = tmp_path / "a.h5"
    w = ActivationWriter(path, header(n_tokens=2048))
    w.write_rows(0, [np.ones((2048, 96), np.float16)] * 2)
    w.finish()
    raw = path.read_bytes()
    truncated = tmp_path / "t.h5"
    truncated.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(ActdbError, match="unreadable or truncated|corrupt"):
        r = ActivationReader(truncated)
        r.read_rows(0, 2048)
    with pytest.raises(ActdbError, match="does not exist"):
        ActivationReader(tmp_path / "missing.h5")


def test_flipped_bytes_fail_the_checksum(tmp_path):
    path = tmp_path / "a.h5"
    w = ActivationWriter(path, header(n_tokens=1024, layers=1, d=128))
    w.write_rows(0, [np.full((1024, 128), 0.5, np.float16)])
    w.finish()
    raw = bytearray(path.read_bytes())
    pattern = np.full(64, 0.5, np.float16).tobytes()
    at = raw.find(pattern)
    assert at > 0
    raw[at : at + 8] = b"\x00\x11\x22\x33\x44\x55\x66\x77"
    path.write_bytes(bytes(raw))
    with ActivationReader(path) as r, pytest.raises(ActdbError, match="corrupt"):
        r.read_rows(0, 1024)


def test_token_file_round_trip(tmp_path):
    tokens = np.arange(40, dtype=np.int32).reshape(4, 10)
    mask = tokens % 3 != 0
    ds = TokenDataset(tokens, mask, "fp")
    ds.save(tmp_path / "t.h5")
    back = TokenDataset.load(tmp_path / "t.h5")
    np.testing.assert_array_equal(back.tokens, tokens)
    np.testing.assert_array_equal(back.mask, mask)
    assert back.sha256 == ds.sha256 and back.tokenizer_fingerprint == "fp"
