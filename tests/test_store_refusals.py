"""A store that cannot be talked into lying: a failed forced re-ingest leaves the complete set complete, hook
names that pick a layer are honoured by refusal, names too long for the file system are refused before any
file, a database serves one store folder, and a layer filter names a layer that exists (SQLite and
PostgreSQL)."""

from __future__ import annotations

import contextlib
import shutil
from pathlib import Path

import numpy as np
import pytest
from sqlalchemy import select

import actdb
from actdb.store.config import StoreConfig
from actdb.store.database.connection import Store
from actdb.store.database.schema import ActivationSet, IngestAttempt, NeuronStat
from tests.conftest import cli_call, fresh_pg_database
from tests.test_integrity import _snapshot


@pytest.fixture(scope="module")
def sources(tmp_path_factory, tokenizer_dir):
    """Two tiny 2-layer GPT-2s, a and b."""
    from actdb.store.ingest.zoo import save_tiny_model

    root = tmp_path_factory.mktemp("refusal-src")
    for k, model in enumerate("ab"):
        save_tiny_model("gpt2", root / model, tokenizer_dir, seed=80 + k)
    return root


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def store(request, tmp_path_factory, sources, tokenizer_dir, text_dir):
    """a@0 and b@0 on dataset d, correlated (shared by the module's tests; each leaves it as it found it)."""
    home = tmp_path_factory.mktemp("refusals") / "store"
    with contextlib.ExitStack() as stack:
        db = f"sqlite:///{home}/actdb.sqlite"
        if request.param == "postgresql":
            db = stack.enter_context(fresh_pg_database())
        for args in (
            ("init",),
            ("dataset", "add", "d", text_dir, "--tokenizer", tokenizer_dir, "--seq-len", 64, "--tokens", 1000),
            ("ingest", "a", "--step", 0, "--dataset", "d", "--source", sources / "a", "--top-k", 0, "--quiet"),
            ("ingest", "b", "--step", 0, "--dataset", "d", "--source", sources / "b", "--top-k", 0, "--quiet"),
            ("correlate", "--dataset", "d", "--step", 0, "--models", "a,b", "--threshold", 0.05, "--quiet"),
        ):
            r = cli_call(home, db, *args)
            assert r.exit_code == 0, (args, r.stderr)
        yield home, db


def _refused(home: Path, db: str, *args: object) -> str:
    """Run a command that must be refused in one line with nothing written; returns its message."""
    before = _snapshot(home, db)
    r = cli_call(home, db, *args)
    assert r.exit_code in (1, 2), (args, r.stdout, r.stderr)  # 2: a usage error (an option's value)
    assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr, (args, r.stderr)
    assert _snapshot(home, db) == before, args
    return r.stderr


def _set_state(home: Path, db: str) -> tuple:
    store = Store.open(StoreConfig.resolve(home, db), read_only=True)
    try:
        with store.session() as s:
            aset = s.scalar(select(ActivationSet).order_by(ActivationSet.id).limit(1))
            stats = s.execute(
                select(NeuronStat.mean)
                .where(NeuronStat.set_id == aset.id)
                .order_by(NeuronStat.layer, NeuronStat.neuron)
            ).all()
            attempts = [(a.status, a.error) for a in s.scalars(select(IngestAttempt).order_by(IngestAttempt.id))]
        return (aset.status, aset.dtype, aset.bytes, aset.path, [m for (m,) in stats]), attempts
    finally:
        store.close()


def test_a_failed_forced_ingest_leaves_the_complete_set_complete(store, tmp_path):
    home, db = store
    (before, attempts) = _set_state(home, db)
    assert before[0] == "complete" and attempts == []
    path = home / before[3]
    content = path.read_bytes()
    blocker = path.with_name(path.name + ".partial")
    blocker.mkdir()  # the new file cannot even be created
    try:
        r = cli_call(home, db, "ingest", "a", "--step", 0, "--dataset", "d", "--force", "--top-k", 0, "--quiet")
    finally:
        blocker.rmdir()
    assert r.exit_code == 1 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "the complete set is kept as it was" in r.stderr, r.stderr
    after, attempts = _set_state(home, db)
    assert after == before and path.read_bytes() == content
    assert len(attempts) == 1 and attempts[0][0] == "failed" and attempts[0][1], attempts
    # every later command still reads the set
    assert cli_call(home, db, "export", "a@0", "--layer", 0, "--out", tmp_path / "x.npy").exit_code == 0
    # a redo that completes replaces the set (here as int8: dtype, file and statistics change together)
    redo = ("ingest", "a", "--step", 0, "--dataset", "d", "--force", "--top-k", 0, "--quiet")
    r = cli_call(home, db, *redo, "--dtype", "int8")
    assert r.exit_code == 0 and "re-ingested" in r.stdout, r.stderr
    assert "the stored values of a@0 on d (mlp.post) were replaced; stale now: correlation runs 1" in r.stdout
    again = ("correlate", "--dataset", "d", "--step", 0, "--models", "a,b", "--threshold", 0.05, "--quiet")
    assert cli_call(home, db, *again).exit_code == 0  # the module's store keeps a complete run
    redone, attempts = _set_state(home, db)
    assert redone[:2] == ("complete", "int8") and [a[0] for a in attempts] == ["failed", "complete"]
    assert np.allclose(redone[4], before[4], atol=0.02) and redone[4] != before[4]
    api = actdb.open(home, db)
    assert api.activations("a@0", 0).values.dtype == np.float32  # int8 reads back dequantised
    api.close()


def test_hook_names_that_pick_a_layer(store, sources):
    home, db = store
    ingest = ("ingest", "a", "--step", 0, "--dataset", "d", "--quiet", "--hook")
    assert "layer 9 does not exist: a has 2 layers (0..1)" in _refused(home, db, *ingest, "blocks.9.mlp.hook_post")
    assert "names layer 1 only" in _refused(home, db, *ingest, "blocks.1.mlp.hook_pre")
    new_model = ("ingest", "c", "--step", 0, "--dataset", "d", "--source", sources / "b", "--hook")
    assert "layer 2 does not exist: c has 2 layers" in _refused(home, db, *new_model, "blocks.2.mlp.hook_post")
    correlate = ("correlate", "--dataset", "d", "--step", 0, "--models", "a,b", "--quiet", "--hook")
    assert "names layer 0 only" in _refused(home, db, *correlate, "blocks.0.mlp.hook_post")
    r = cli_call(home, db, *ingest, "blocks.{L}.mlp.hook_post")  # every layer: the set that exists
    assert r.exit_code == 0 and "already complete" in r.stdout, r.stderr


def test_names_too_long_for_the_file_system(store, tokenizer_dir, text_dir, sources):
    home, db = store
    long_model = ("ingest", "%" * 90, "--step", 0, "--dataset", "d", "--source", sources / "a")
    message = _refused(home, db, *long_model)
    assert "file name would be 270 bytes, and may be at most 200" in message, message
    message = _refused(home, db, "dataset", "add", "é" * 40, text_dir, "--tokenizer", tokenizer_dir)
    assert "file name would be 240 bytes, and may be at most 200" in message, message


def test_a_layer_filter_names_a_layer_that_exists(store):
    home, db = store
    message = _refused(home, db, "universal", "--layer", 7)
    assert "layer 7 does not exist: the deepest model (a) has 2 layers (0..1)" in message, message
    assert "layer 2 does not exist: b has 2 layers" in _refused(home, db, "universal", "--layer", 2, "--model", "b")
    assert "layer 7 does not exist" in _refused(home, db, "universal", "--by-layer", "--layer", 7)
    assert cli_call(home, db, "universal", "--layer", 1, "--format", "json").exit_code == 0


def test_one_database_serves_one_store_folder(store, tmp_path):
    home, db = store
    second = tmp_path / "second-store"
    before = _snapshot(home, db)
    r = cli_call(second, db, "init")
    assert r.exit_code == 1 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert f"already holds the store of folder {home}" in r.stderr and f"--home {home}" in r.stderr, r.stderr
    assert not second.exists() and _snapshot(home, db) == before
    r = cli_call(second, db, "status")  # opening the database from another folder is refused too
    assert r.exit_code == 1 and "already holds the store of folder" in r.stderr, r.stderr
    other_db = f"sqlite:///{tmp_path / 'other.sqlite'}"
    r = cli_call(home, other_db, "init")  # and this folder, with its files, on a second database
    assert r.exit_code == 1 and f"store folder {home} belongs to another database" in r.stderr, r.stderr
    assert _snapshot(home, db) == before
    moved = tmp_path / "moved"
    shutil.copytree(home, moved)  # a copy of the folder (with its id) is the same store
    assert cli_call(moved, db, "init").exit_code == 0 and cli_call(moved, db, "status").exit_code == 0
