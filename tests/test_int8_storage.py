"""int8 activation storage: per-block affine codes, transparent dequantisation, resume, check, and its error on
correlations against a float16 ingest of the same checkpoints."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import scipy.special
import scipy.stats
from sqlalchemy import select

from actdb.store.config import StoreConfig
from actdb.store.database.connection import Store
from actdb.store.database.schema import ActivationSet, CorrelationRun, NeuronMatch, NeuronStat
from actdb.store.files.activation import (
    ActivationHeader,
    ActivationReader,
    ActivationWriter,
    dequantise,
    offset_key,
    quantise,
    scale_key,
)
from actdb.store.files.token import TokenDataset
from actdb.store.ingest.top_activations import top_activations_from_file
from tests.conftest import cli_call


def _bound(x: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """Half a quantisation step, plus the float32 rounding of offset + scale * code."""
    return scale / 2 + 4 * np.finfo(np.float32).eps * np.abs(x).max(axis=0)


@pytest.mark.parametrize("kind", ["normal", "heavy", "gelu16", "shifted"])
def test_round_trip_is_within_half_a_step(kind):
    rng = np.random.default_rng(3)
    x = {
        "normal": rng.standard_normal((1024, 200)),
        "heavy": rng.standard_t(2, (1024, 200)) * 10,
        "gelu16": scipy.special.erf(rng.standard_normal((1024, 200))).astype(np.float16),
        "shifted": 1000 + rng.standard_normal((1024, 200)) * 1e-2,
    }[kind]
    if x.dtype == np.float64:
        x = x.astype(np.float32)
    codes, scale, offset = quantise(x)
    assert codes.dtype == np.int8 and scale.dtype == offset.dtype == np.float32
    assert codes.min() == -128 and codes.max() == 127  # both ends of every column's range are used
    back = dequantise(codes, scale, offset, np.empty(x.shape, np.float32))
    err = np.abs(back.astype(np.float64) - x)
    assert (err <= _bound(x, scale)).all(), (err / scale).max()
    # the extremes land on the end codes, within float32 rounding
    np.testing.assert_allclose(back.max(axis=0), x.max(axis=0), rtol=1e-6, atol=1e-6 * np.abs(x).max())


def test_constant_blocks_are_exact_and_nan_is_refused(tmp_path):
    rng = np.random.default_rng(4)
    n, d = 2049, 64  # two whole blocks and a one-row block
    x = rng.standard_normal((n, d)).astype(np.float16)
    x[:1024, 3] = np.float16(-0.1699)  # a constant block of one neuron
    x[:, 7] = 0  # a dead neuron
    x[1024:2048, :] = np.float16(2.5)  # a constant block of every neuron
    path = tmp_path / "c.h5"
    w = ActivationWriter(path, ActivationHeader("m", 0, "fp", "mlp.post", 1, d, n, "int8"))
    w.write_rows(0, [x])
    w.finish()
    with ActivationReader(path) as r:
        (y,) = r.read_rows(0, n)
        scale = r.quantisation[0][0][:]
    assert (y[:1024, 3] == x[:1024, 3]).all() and (y[1024:2048] == 2.5).all() and (y[x[:, 7] == 0, 7] == 0).all()
    assert (y[2048] == x[2048]).all()  # a one-row block is constant in every neuron
    assert (scale[1] == 0).all() and (scale[2] == 0).all()
    x[5, 5] = np.nan
    from actdb.store.errors import ActdbError

    with pytest.raises(ActdbError, match="NaN or infinite"):
        quantise(x[:1024])


def _write(path: Path, x: list[np.ndarray], dtype: str, splits: list[int]) -> None:
    n, d = x[0].shape
    w = ActivationWriter(path, ActivationHeader("m", 0, "fp", "mlp.post", len(x), d, n, dtype))
    for a, b in zip([0, *splits], [*splits, n], strict=True):
        w.write_rows(a, [layer[a:b] for layer in x])
    w.finish()


def _contents(path: Path) -> dict:
    with h5py.File(path, "r") as f:
        return {"attrs": dict(f.attrs), **{k: f[k][:] for k in f}}


def _assert_same_file(a: Path, b: Path) -> None:
    ca, cb = _contents(a), _contents(b)
    assert ca.keys() == cb.keys()
    assert ca.pop("attrs") == cb.pop("attrs")
    for k in ca:
        np.testing.assert_array_equal(ca[k], cb[k], err_msg=k)


def test_writer_resume_and_reader_dtypes(tmp_path):
    rng = np.random.default_rng(5)
    n, d = 3500, 96
    x = [rng.gamma(0.5, size=(n, d)).astype(np.float16) - np.float16(0.2) for _ in range(2)]
    _write(tmp_path / "whole.h5", x, "int8", [])
    _write(tmp_path / "pieces.h5", x, "int8", [1, 700, 2100, 2101, 3400])
    _assert_same_file(tmp_path / "whole.h5", tmp_path / "pieces.h5")  # buffering does not depend on the splits

    # a writer closed mid-block (a killed ingest keeps whole blocks only) resumes to the same file
    header = ActivationHeader("m", 0, "fp", "mlp.post", 2, d, n, "int8")
    path = tmp_path / "resumed.h5"
    w = ActivationWriter(path, header)
    w.write_rows(0, [layer[:2500] for layer in x])
    assert (w.tokens_done, w.position) == (2048, 2500)
    w.flush()
    w.close()
    w = ActivationWriter(path, header)
    assert w.tokens_done == 2048
    start = w.rewind(2048, align=600)
    assert start == 2048  # int8 resumes at a block boundary whatever the batch size
    stored = []
    w.write_rows(start, [layer[start:] for layer in x], on_stored=lambda s, v: stored.append((s, v[1].copy())))
    assert [s for s, _ in stored] == [2048, 3072]
    w.finish()
    _assert_same_file(tmp_path / "whole.h5", path)

    _write(tmp_path / "half.h5", x, "float16", [1000])
    with ActivationReader(path) as q, ActivationReader(tmp_path / "half.h5") as h:
        assert q.value_dtype == np.float32 and h.value_dtype == np.float16
        assert q.header.dtype == "int8" and q.file.attrs["format_version"] == 2
        assert h.file.attrs["format_version"] == 1 and h.quantisation is None
        rows = q.read_rows(0, n)
        assert all(r.dtype == np.float32 for r in rows) and h.read_rows(0, 10)[0].dtype == np.float16
        np.testing.assert_array_equal(np.concatenate([v for _, v in stored]), rows[1][2048:])  # what a fold saw
        out = np.empty((1500, d), q.value_dtype)
        q.read_rows_into(1, 1000, out)
        np.testing.assert_array_equal(out, rows[1][1000:2500])
        np.testing.assert_array_equal(q.read_neurons(0, [2, 50, 95], 1000, 3100), rows[0][1000:3100, [2, 50, 95]])
        np.testing.assert_array_equal(q.read_neurons(1, slice(10, 20)), rows[1][:, 10:20])
        scales, _offsets, block = q.quantisation
        assert block == 1024 and scales[0].shape == (4, d)
        steps = np.repeat(scales[0][:], 1024, axis=0)[:n]
        assert (np.abs(rows[0] - x[0].astype(np.float32)) <= steps / 2 + 1e-6).all()
        with pytest.raises(ValueError, match="float32"):
            q.read_rows_into(0, 0, np.empty((10, d), np.float16))


@pytest.fixture
def dataset(run_cli, tokenizer_dir, text_dir):
    assert run_cli("init").exit_code == 0
    r = run_cli("dataset", "add", "d", text_dir, "--tokenizer", tokenizer_dir, "--seq-len", 48, "--tokens", 3000)
    assert r.exit_code == 0, r.stderr
    return "d"


def test_int8_ingest_statistics_and_examples_describe_the_stored_values(dataset, tiny_models, store_config):
    from actdb.store.ingest.pipeline import IngestRequest, ingest

    store = Store.open(store_config)
    req = IngestRequest(
        model="g", step=0, dataset=dataset, source=str(tiny_models["gpt2"]), dtype="int8", progress=False, top_k=8
    )
    result = ingest(store, req, log=lambda _line: None)
    with store.session() as s:
        aset = s.get(ActivationSet, result.set_id)
        assert aset.dtype == "int8"
        stats = {(n.layer, n.neuron): n for n in s.scalars(select(NeuronStat).where(NeuronStat.set_id == aset.id))}
    store.close()
    mask = TokenDataset.load(store_config.file(store_config.dataset_path("d"))).mask.reshape(-1)
    with ActivationReader(result.path) as reader:
        assert reader.value_dtype == np.float32
        values, positions = top_activations_from_file(reader, mask, k=8)
        for layer in range(2):
            x = reader.read_rows(0, reader.header.n_tokens, [layer])[0][mask].astype(np.float64)
            for j in range(0, 128, 5):
                st, col = stats[(layer, j)], x[:, j]
                np.testing.assert_allclose(st.mean, col.mean(), rtol=1e-6, atol=1e-6 * col.std())
                np.testing.assert_allclose(st.std, col.std(), rtol=1e-6)
                np.testing.assert_allclose(st.skew, scipy.stats.skew(col), rtol=1e-6, atol=1e-6)
                np.testing.assert_allclose(st.kurtosis, scipy.stats.kurtosis(col), rtol=1e-6, atol=1e-6)
                assert st.min == col.min() and st.max == col.max()  # the stored values, exactly
                assert st.frac_active == pytest.approx((col > 0).mean())
        # the streamed top-K is the stored values' top-K (int8 codes tie often: positions may differ at ties)
        np.testing.assert_array_equal(result.examples[0], values)
        for layer in range(2):
            x = reader.read_rows(0, reader.header.n_tokens, [layer])[0]
            at = np.take_along_axis(x.T, result.examples[1][layer], axis=1)
            np.testing.assert_array_equal(at, values[layer])
    assert (result.examples[1] == positions).mean() > 0.9


def _matches(home: Path, db: str) -> dict:
    """{(model, layer, neuron): (max_corr, baseline)} of the latest correlation run."""
    store = Store.open(StoreConfig.resolve(home, db))
    with store.session() as s:
        run = s.scalar(select(CorrelationRun).order_by(CorrelationRun.id.desc()))
        models = {a.id: a.path.split("/")[1] for a in s.scalars(select(ActivationSet))}
        out = {
            (models[m.set_id], m.layer, m.neuron): (m.max_corr, m.baseline_max_corr)
            for m in s.scalars(select(NeuronMatch).where(NeuronMatch.run_id == run.id))
            if m.max_corr is not None
        }
    store.close()
    return out


def test_cli_int8_ingest_correlates_like_float16_and_check_finds_a_corrupt_scale(
    tmp_path, tokenizer_dir, text_dir, tiny_models
):
    from actdb.store.ingest.zoo import save_tiny_model

    other = save_tiny_model("gpt2", tmp_path / "other", tokenizer_dir, seed=31)
    found = {}
    for dtype in ("float16", "int8"):
        home = tmp_path / dtype
        db = f"sqlite:///{home}/actdb.sqlite"
        for args in (
            ("init",),
            ("dataset", "add", "d", text_dir, "--tokenizer", tokenizer_dir, "--seq-len", 64, "--tokens", 3000),
            (
                "ingest",
                "a",
                "--step",
                0,
                "--dataset",
                "d",
                "--source",
                tiny_models["gpt2"],
                "--dtype",
                dtype,
                "--quiet",
            ),
            ("ingest", "b", "--step", 0, "--dataset", "d", "--source", other, "--dtype", dtype, "--quiet"),
            ("correlate", "--sets", "a@0,b@0", "--baseline-draws", 2, "--quiet"),
        ):
            r = cli_call(home, db, *args)
            assert r.exit_code == 0, (args, r.stderr)
        found[dtype] = _matches(home, db)
    assert found["int8"].keys() == found["float16"].keys() and len(found["int8"]) > 400
    delta = np.array([np.subtract(found["int8"][k], found["float16"][k]) for k in found["int8"]])
    assert np.abs(delta).max() < 2e-3, np.abs(delta).max(axis=0)  # measured: 5.5e-4 on these tiny models

    home, db = tmp_path / "int8", f"sqlite:///{tmp_path / 'int8'}/actdb.sqlite"
    path = home / "activations" / "a" / "step-0" / "d.mlp.post.h5"
    with h5py.File(path, "r") as f:
        where = f[scale_key(1)].id.get_chunk_info(0).byte_offset
        assert f[offset_key(1)].shape == f[scale_key(1)].shape == (3, 128)
    data = bytearray(path.read_bytes())
    data[where + 5] ^= 0xFF
    path.write_bytes(bytes(data))
    r = cli_call(home, db, "check", "--quiet", "--format", "json")
    assert r.exit_code == 1, r.stdout
    (problem,) = json.loads(r.stdout)
    assert problem["name"] == "a@0 on d" and "corrupt" in problem["problem"]
    assert cli_call(home, db, "check", "--quick", "--quiet").exit_code == 0


def test_killed_int8_ingest_resumes_to_identical_file(
    run_cli, tiny_models, store_config, tmp_path, tokenizer_dir, text_dir
):
    """Sequences of 48 tokens never end on a 1024-token block boundary: the resumed run starts its forward passes
    inside a block the file already holds and writes only what follows it."""
    src = tiny_models["gpt2"]
    big = ("dataset", "add", "big", text_dir, "--tokenizer", tokenizer_dir, "--seq-len", 48, "--tokens", 8000)
    ingest = ("ingest", "g", "--step", 0, "--dataset", "big", "--batch-size", 2, "--dtype", "int8", "--quiet")
    assert run_cli("init").exit_code == 0 and run_cli(*big).exit_code == 0
    env = dict(os.environ, ACTDB_INGEST_FLUSH_SECONDS="0.02")
    cmd = [sys.executable, "-m", "actdb.query.cli", "--home", str(store_config.home), "--db"]
    cmd += [store_config.database_url, *map(str, ingest), "--source", str(src)]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    store = Store.open(store_config)
    killed_at = None
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and proc.poll() is None:
        with store.session() as s:
            row = s.scalar(select(ActivationSet))
        if row is not None and 0 < row.tokens_done < row.n_tokens:
            proc.send_signal(signal.SIGKILL)
            killed_at = row.tokens_done
            break
        time.sleep(0.01)
    proc.wait()
    store.close()
    assert killed_at is not None, "ingest finished before it could be killed; make the dataset larger"
    assert killed_at % 1024 == 0
    r = run_cli(*ingest)
    assert r.exit_code == 0 and "resumed from token" in r.stdout, r.stdout + r.stderr
    fresh_home = tmp_path / "fresh"
    fresh_db = f"sqlite:///{fresh_home}/actdb.sqlite"
    assert run_cli("init", home=fresh_home, db=fresh_db).exit_code == 0
    assert run_cli(*big, home=fresh_home, db=fresh_db).exit_code == 0
    assert run_cli(*ingest, "--source", src, home=fresh_home, db=fresh_db).exit_code == 0
    rel = Path("activations") / "g" / "step-0" / "big.mlp.post.h5"
    _assert_same_file(store_config.home / rel, fresh_home / rel)
    stats = []
    for home, db in ((store_config.home, store_config.database_url), (fresh_home, fresh_db)):
        st = Store.open(StoreConfig.resolve(home, db))
        with st.session() as s:
            order = (NeuronStat.layer, NeuronStat.neuron)
            stats.append([(n.mean, n.std, n.skew, n.kurtosis) for n in s.scalars(select(NeuronStat).order_by(*order))])
        st.close()
    np.testing.assert_array_equal(np.array(stats[0]), np.array(stats[1]))  # rebuilt block by block, bit for bit
