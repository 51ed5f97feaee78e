"""The rotation cache: cached rotations are bit for bit the computed ones, keyed so that no other seed, width,
model, layer or draw is ever reused, corrupt files are detected and rewritten, and a run computes each QR once."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
from sqlalchemy import select

from actdb.compute.correlation import baseline
from actdb.compute.correlation.engine import CorrelationOptions, SetInput, base_rotations, correlate_sets
from actdb.compute.correlation.rotation_cache import base_key, draw_key, read_cached, rotation
from actdb.store.database.connection import Store
from actdb.store.database.schema import CorrelationRun, Model, NeuronMatch
from actdb.store.device import NUMPY
from actdb.store.files.activation import ActivationHeader, ActivationWriter


def test_a_cached_rotation_is_the_computed_one_bit_for_bit(tmp_path):
    for key in (base_key(48, 3, 7, 1), draw_key(48, 3, 2)):
        fresh = key.compute()
        first = rotation(str(tmp_path), key)  # computed and written
        assert (tmp_path / key.file_name).exists()
        again = rotation(str(tmp_path), key)  # read back
        assert fresh.dtype == again.dtype == np.float32
        assert fresh.tobytes() == first.tobytes() == again.tobytes()
    fresh = [baseline.random_rotation(48, 3, 7, layer).astype(np.float32) for layer in range(2)]
    s = SetInput(0, "", 2, 48, np.zeros(96), rotation_key=7)
    for cached in (base_rotations(s, 3, str(tmp_path)), base_rotations(s, 3, str(tmp_path))):
        assert all(a.tobytes() == b.tobytes() for a, b in zip(fresh, cached, strict=True))


@pytest.mark.parametrize(
    "other",
    [
        base_key(48, 4, 7, 1),  # another seed
        base_key(32, 3, 7, 1),  # another width
        base_key(48, 3, 8, 1),  # another model
        base_key(48, 3, 7, 0),  # another layer
        draw_key(48, 3, 1),  # a draw rotation
    ],
)
def test_a_file_of_another_rotation_is_never_used(tmp_path, other):
    key = base_key(48, 3, 7, 1)
    rotation(str(tmp_path), other)
    shutil.copy(tmp_path / other.file_name, tmp_path / key.file_name)  # the wrong file under this key's name
    data, wrong = read_cached(tmp_path / key.file_name, key)
    assert data is None and "another rotation" in wrong
    assert rotation(str(tmp_path), key).tobytes() == key.compute().tobytes()
    assert read_cached(tmp_path / key.file_name, key)[1] is None  # rewritten with the right one


@pytest.mark.parametrize("damage", ["flip", "truncate", "header"])
def test_a_corrupt_cache_file_is_detected_and_rewritten(tmp_path, damage, caplog):
    key = draw_key(40, 0, 3)
    path = tmp_path / key.file_name
    rotation(str(tmp_path), key)
    raw = bytearray(path.read_bytes())
    if damage == "flip":
        raw[-100] ^= 0x01  # one bit of one value
    elif damage == "truncate":
        raw = raw[:-4]
    else:
        raw[:10] = b"NOTAROT!!\n"
    path.write_bytes(bytes(raw))
    data, wrong = read_cached(path, key)
    assert data is None
    assert wrong == {"flip": "its bytes fail their SHA-256", "truncate": "its size is wrong"}.get(
        damage, "not a rotation file"
    )
    assert rotation(str(tmp_path), key).tobytes() == key.compute().tobytes()
    assert "is not used and is rewritten" in caplog.text
    assert read_cached(path, key)[0].tobytes() == key.compute().tobytes()


def _sets(tmp_path, n_tokens=2048, d=40, layers=2) -> list[SetInput]:
    rng = np.random.default_rng(0)
    base = rng.standard_normal((n_tokens, d)).astype(np.float32)
    inputs = []
    for k in range(3):
        path = tmp_path / f"s{k}.h5"
        w = ActivationWriter(path, ActivationHeader("m", 0, "fp", "mlp_post", layers, d, n_tokens, "float16"))
        w.write_rows(0, [(base + rng.standard_normal(base.shape)).astype(np.float16) for _ in range(layers)])
        w.finish()
        inputs.append(SetInput(k, str(path), layers, d, np.zeros(layers * d, np.float32), rotation_key=10 + k))
    return inputs


def test_a_multi_pass_run_computes_each_rotation_once_and_equals_an_uncached_run(tmp_path, monkeypatch):
    inputs = _sets(tmp_path)
    tokens = (np.arange(2048).reshape(16, 128) % 37).astype(np.int64)
    mask = np.ones_like(tokens, bool)
    qrs = []
    real_haar = baseline._haar

    def counted(rng, d):
        qrs.append(d)
        return real_haar(rng, d)

    monkeypatch.setattr(baseline, "_haar", counted)
    base = CorrelationOptions(baseline_draws=3, chunk_tokens=256, memory_budget=1_520_000)
    plain = correlate_sets(inputs, tokens, mask, base, NUMPY)
    assert plain.n_passes >= 3
    qrs.clear()
    folder = tmp_path / "rotations"
    options = CorrelationOptions(
        baseline_draws=3, chunk_tokens=256, memory_budget=1_520_000, rotation_cache=str(folder)
    )
    first = correlate_sets(inputs, tokens, mask, options, NUMPY)
    assert sorted(qrs) == [40] * (3 * 2 + 2)  # every (model, layer) once, and draws 1 and 2 of the one width once
    assert len(list(folder.iterdir())) == 3 * 2 + 2
    qrs.clear()
    second = correlate_sets(inputs, tokens, mask, options, NUMPY)
    assert qrs == []  # every rotation came from the cache
    for result in (first, second):
        for pair, r in plain.matches.items():
            np.testing.assert_array_equal(result.matches[pair].max_corr, r.max_corr)
            np.testing.assert_array_equal(result.matches[pair].baseline, r.baseline)


def _matches(store_config) -> list[tuple]:
    """The latest correlation run's neuron matches: (set, other, layer, neuron, max corr, baseline mean, sd)."""
    store = Store.open(store_config)
    with store.session() as s:
        run = s.scalar(select(CorrelationRun).order_by(CorrelationRun.id.desc()))
        rows = s.scalars(select(NeuronMatch).where(NeuronMatch.run_id == run.id)).all()
        found = sorted(
            (m.set_id, m.other_set_id, m.layer, m.neuron, m.max_corr, m.baseline_max_corr, m.baseline_sd) for m in rows
        )
    store.close()
    return found


def test_a_cli_run_keeps_its_rotations_beside_the_store_and_survives_a_corrupt_one(
    run_cli, store_config, tokenizer_dir, text_dir, tiny_models, tmp_path
):
    from actdb.store.ingest.zoo import save_tiny_model

    assert run_cli("init").exit_code == 0
    add = ("dataset", "add", "d", text_dir, "--tokenizer", tokenizer_dir, "--seq-len", 64, "--tokens", 2000)
    assert run_cli(*add).exit_code == 0
    sources = {"a": tiny_models["gpt2"], "b": save_tiny_model("gpt2", tmp_path / "b", tokenizer_dir, seed=11)}
    for name, src in sources.items():
        r = run_cli("ingest", name, "--step", 0, "--dataset", "d", "--source", src, "--quiet")
        assert r.exit_code == 0, r.stderr
    correlate = ("correlate", "--dataset", "d", "--step", 0, "--models", "a,b", "--baseline-draws", 3, "--quiet")
    assert run_cli(*correlate).exit_code == 0
    first = _matches(store_config)
    folder = store_config.home / "rotations"
    files = sorted(p.name for p in folder.iterdir())
    store = Store.open(store_config)
    with store.session() as s:
        models = s.scalars(select(Model)).all()
        shapes = {(m.id, m.n_layers, m.d_mlp) for m in models}
    store.close()
    expected = {base_key(d, 0, model, layer).file_name for model, layers, d in shapes for layer in range(layers)}
    expected |= {draw_key(d, 0, k).file_name for _, _, d in shapes for k in (1, 2)}
    assert files == sorted(expected)
    damaged = folder / sorted(expected)[0]
    raw = bytearray(damaged.read_bytes())
    raw[-1] ^= 0x40
    damaged.write_bytes(bytes(raw))
    r = run_cli(*correlate, "--force")
    assert r.exit_code == 0, r.stderr
    assert _matches(store_config) == first  # the damaged file was not used: the same rotation was recomputed
    key = next(k for k in (base_key(d, 0, m, i) for m, n, d in shapes for i in range(n)) if k.file_name == damaged.name)
    assert read_cached(damaged, key)[1] is None  # and the file is whole again


def test_a_run_computes_its_missing_rotations_side_by_side_before_its_first_pass(tmp_path, monkeypatch):
    """With a cache folder the engine's QRs run on the host's cores (here 2), one BLAS thread each, before the
    first pass; the results equal a run that computed them one by one on the main thread."""
    import threading

    from actdb.compute.correlation import blas_threads

    inputs = _sets(tmp_path)
    tokens = (np.arange(2048).reshape(16, 128) % 37).astype(np.int64)
    mask = np.ones_like(tokens, bool)
    threads = []
    real_haar = baseline._haar

    def counted(rng, d):
        threads.append(threading.get_ident())
        return real_haar(rng, d)

    monkeypatch.setattr(baseline, "_haar", counted)
    monkeypatch.setattr(blas_threads, "host_cores", lambda: 2)
    plain = correlate_sets(inputs, tokens, mask, CorrelationOptions(baseline_draws=3), NUMPY)
    assert set(threads) == {threading.get_ident()}  # without a cache: on the main thread, when needed
    threads.clear()
    options = CorrelationOptions(baseline_draws=3, rotation_cache=str(tmp_path / "rotations"))
    cached = correlate_sets(inputs, tokens, mask, options, NUMPY)
    assert len(threads) == 3 * 2 + 2 and threading.get_ident() not in threads  # all in the pool, each once
    assert cached.seconds["rotations"] > 0
    for pair, r in plain.matches.items():
        np.testing.assert_array_equal(cached.matches[pair].max_corr, r.max_corr)
        np.testing.assert_array_equal(cached.matches[pair].baseline, r.baseline)
