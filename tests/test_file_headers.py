"""Every reader checks the file at a set's path against the set's SQL rows before using its data: another
model's, step's, dataset's, width's or hook's file there is refused in one line naming the mismatch, by every
reading command (CLI and API) on SQLite and PostgreSQL, and nothing is written."""

from __future__ import annotations

import contextlib
import json
import shutil
from pathlib import Path

import pytest

import actdb
from actdb.store.errors import ActdbError
from tests.conftest import cli_call, fresh_pg_database
from tests.test_integrity import _snapshot


@pytest.fixture(scope="module")
def sources(tmp_path_factory, tokenizer_dir):
    """Tiny GPT-2s: a@0, a@1, b@1 of width 128 and w@1 of width 64."""
    from actdb.store.ingest.zoo import save_tiny_model

    root = tmp_path_factory.mktemp("header-src")
    for k, (model, step, width) in enumerate([("a", 0, 128), ("a", 1, 128), ("b", 1, 128), ("w", 1, 64)]):
        save_tiny_model("gpt2", root / model / f"step-{step}", tokenizer_dir, seed=60 + k, d_mlp=width)
    return root


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def store_with_neighbours(request, tmp_path_factory, sources, tokenizer_dir, text_dir):
    """A store whose a@1 on d has neighbours of every kind a misplaced file could come from (shared by the tests
    of a module: each puts a@1's own file back)."""
    home = tmp_path_factory.mktemp("headers") / "store"
    with contextlib.ExitStack() as stack:
        db = f"sqlite:///{home}/actdb.sqlite"
        if request.param == "postgresql":
            db = stack.enter_context(fresh_pg_database())
        _populate(home, db, sources, tokenizer_dir, text_dir)
        yield home, db


def _populate(home: Path, db: str, src: Path, tokenizer_dir: Path, text_dir: Path) -> None:
    for args in (
        ("init",),
        ("dataset", "add", "d", text_dir, "--tokenizer", tokenizer_dir, "--seq-len", 64, "--tokens", 1000),
        ("dataset", "add", "d2", text_dir / "doc03.txt", "--tokenizer", tokenizer_dir, "--seq-len", 64),
        ("ingest", "a", "--steps", "0,1", "--dataset", "d", "--source", src / "a" / "step-{step}", "--top-k", 0),
        ("ingest", "b", "--step", 1, "--dataset", "d", "--source", src / "b" / "step-{step}", "--top-k", 0),
        ("ingest", "w", "--step", 1, "--dataset", "d", "--source", src / "w" / "step-{step}", "--top-k", 0),
        ("ingest", "a", "--step", 1, "--dataset", "d", "--hook", "mlp.pre", "--top-k", 0),
        ("ingest", "a", "--step", 1, "--dataset", "d2", "--top-k", 0),
    ):
        r = cli_call(home, db, *args, *(("--quiet",) if args[0] == "ingest" else ()))
        assert r.exit_code == 0, (args, r.stderr)


TARGET = "activations/a/step-1/d.mlp.post.h5"
MISPLACED = {
    "swapped model": ("activations/b/step-1/d.mlp.post.h5", "model 'b' (SQL: 'a')"),
    "another step": ("activations/a/step-0/d.mlp.post.h5", "step 0 (SQL: 1)"),
    "another dataset": ("activations/a/step-1/d2.mlp.post.h5", "dataset fingerprint"),
    "another width": ("activations/w/step-1/d.mlp.post.h5", "width 64 (SQL: 128)"),
    "another hook": ("activations/a/step-1/d.mlp.pre.h5", "hook 'mlp.pre' (SQL: 'mlp.post')"),
}


@pytest.fixture
def misplaced(store_with_neighbours):
    """`put(neighbour)` copies another set's file to a@1's path; a@1's own file is put back afterwards."""
    home, _db = store_with_neighbours
    target = home / TARGET
    original = target.read_bytes()
    yield lambda neighbour: shutil.copyfile(home / neighbour, target)
    target.write_bytes(original)


@pytest.mark.parametrize("case", list(MISPLACED))
def test_every_reader_refuses_a_file_that_is_not_its_set(case, store_with_neighbours, misplaced, tmp_path):
    home, db = store_with_neighbours
    neighbour, mismatch = MISPLACED[case]
    out = tmp_path / "out.npy"
    misplaced(neighbour)
    before = _snapshot(home, db)
    for args in (
        ("correlate", "--dataset", "d", "--step", 1, "--models", "a,b", "--force", "--quiet"),
        ("similarity", "--sets", "a@1,b@1", "--dataset", "d", "--force", "--quiet"),
        ("export", "a@1", "--layer", 0, "--dataset", "d", "--hook", "mlp.post", "--out", out),
        ("examples", "a@1", "--dataset", "d", "--hook", "mlp.post", "--force", "--no-vocabulary", "--quiet"),
    ):
        r = cli_call(home, db, *args)
        assert r.exit_code == 1, (args, r.stdout, r.stderr)
        assert "is not the set SQL records" in r.stderr and mismatch in r.stderr, (args, r.stderr)
        assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr, (args, r.stderr)
        assert _snapshot(home, db) == before, args
    assert not out.exists()
    api = actdb.open(home, db)
    with pytest.raises(ActdbError, match="is not the set SQL records") as refused:
        api.activations("a@1", 0, dataset="d", hook="mlp.post")
    api.close()
    assert mismatch in str(refused.value)
    r = cli_call(home, db, "check", "--quick", "--format", "json")
    (problem,) = json.loads(r.stdout)
    assert r.exit_code == 1 and problem["name"] == "a@1 on d" and mismatch in problem["problem"], problem


def test_the_sets_own_files_pass(store_with_neighbours, tmp_path):
    home, db = store_with_neighbours
    for args in (
        ("correlate", "--dataset", "d", "--step", 1, "--models", "a,b", "--quiet"),
        ("export", "a@1", "--layer", 0, "--dataset", "d", "--hook", "mlp.post", "--out", tmp_path / "out.npy"),
        ("check", "--quick"),
    ):
        assert cli_call(home, db, *args).exit_code == 0, args


def test_a_damaged_layer_shape_is_refused(store_with_neighbours):
    """A file whose header is right but whose layer datasets are not what the header says (edited in place)."""
    import h5py

    home, db = store_with_neighbours
    target = home / TARGET
    original = target.read_bytes()
    try:
        with h5py.File(target, "r+") as f:
            data = f["layer_000"][:, :64]
            del f["layer_001"]
            f.create_dataset("layer_001", data=data)
        api = actdb.open(home, db)
        with pytest.raises(ActdbError, match=r"damaged: layer_001 is not \d+ x 128 float16"):
            api.activations("a@1", 0, dataset="d", hook="mlp.post")
        api.close()
    finally:
        target.write_bytes(original)
