"""Prediction and explanation files name the checkpoint, dataset (and hook) they were computed from, and every
reader and `actdb check` compare that with SQL, as they compare activation files' headers: another checkpoint's,
step's or hook's sidecar at a path is refused in one line naming the mismatch, and nothing is written. Files
written before sidecars carried an identity are read as before; `check` says it cannot check them."""

from __future__ import annotations

import contextlib
import json
import shutil
from pathlib import Path

import h5py
import pytest

import actdb
from actdb.store.errors import ActdbError
from actdb.store.files.identity import IDENTITY_FIELDS
from tests.conftest import cli_call, fresh_pg_database
from tests.test_integrity import _snapshot


@pytest.fixture(scope="module")
def sources(tmp_path_factory, tokenizer_dir):
    """Tiny GPT-2s a@0, a@1 and b@1."""
    from actdb.store.ingest.zoo import save_tiny_model

    root = tmp_path_factory.mktemp("sidecar-src")
    for k, (model, step) in enumerate([("a", 0), ("a", 1), ("b", 1)]):
        save_tiny_model("gpt2", root / model / f"step-{step}", tokenizer_dir, seed=70 + k)
    return root


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def explained_store(request, tmp_path_factory, sources, tokenizer_dir, text_dir):
    """a@0, a@1 (at mlp.post and mlp.pre) and b@1 on d, each explained and with its predictions (shared by the
    module's tests: each puts a@1's own files back)."""
    home = tmp_path_factory.mktemp("sidecars") / "store"
    with contextlib.ExitStack() as stack:
        db = f"sqlite:///{home}/actdb.sqlite"
        if request.param == "postgresql":
            db = stack.enter_context(fresh_pg_database())
        for args in (
            ("init",),
            ("dataset", "add", "d", text_dir, "--tokenizer", tokenizer_dir, "--seq-len", 64, "--tokens", 1000),
            ("ingest", "a", "--steps", "0,1", "--dataset", "d", "--source", sources / "a" / "step-{step}", "--quiet"),
            ("ingest", "b", "--step", 1, "--dataset", "d", "--source", sources / "b" / "step-{step}", "--quiet"),
            ("ingest", "a", "--step", 1, "--dataset", "d", "--hook", "mlp.pre", "--quiet"),
            ("predictions", "a@0", "a@1", "b@1", "--dataset", "d", "--quiet"),
        ):
            r = cli_call(home, db, *args)
            assert r.exit_code == 0, (args, r.stderr)
        yield home, db


PREDICTIONS = "activations/a/step-1/d.predictions.h5"
EXPLANATIONS = "activations/a/step-1/d.mlp.post.explain.h5"
MISPLACED_PREDICTIONS = {
    "another model": ("activations/b/step-1/d.predictions.h5", "model 'b' (SQL: 'a')"),
    "another step": ("activations/a/step-0/d.predictions.h5", "step 0 (SQL: 1)"),
}
MISPLACED_EXPLANATIONS = {
    "another model": ("activations/b/step-1/d.mlp.post.explain.h5", "model 'b' (SQL: 'a')"),
    "another step": ("activations/a/step-0/d.mlp.post.explain.h5", "step 0 (SQL: 1)"),
    "another hook": ("activations/a/step-1/d.mlp.pre.explain.h5", "hook 'mlp.pre' (SQL: 'mlp.post')"),
}


@contextlib.contextmanager
def replaced(home: Path, target: str):
    """Within the block the file at `target` may be swapped or edited; its own bytes are put back afterwards."""
    original = (home / target).read_bytes()
    try:
        yield home / target
    finally:
        (home / target).write_bytes(original)


def _refused(home: Path, db: str, args: tuple, mismatch: str, what: str) -> None:
    r = cli_call(home, db, *args)
    assert r.exit_code == 1, (args, r.stdout, r.stderr)
    assert f"{what} " in r.stderr and "is not the one SQL records" in r.stderr and mismatch in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr, (args, r.stderr)


def _one_check_problem(home: Path, db: str, kind: str, mismatch: str, *flags: str) -> None:
    r = cli_call(home, db, "check", "--quiet", "--format", "json", *flags)
    (problem,) = json.loads(r.stdout)
    assert r.exit_code == 1 and problem["kind"] == kind and problem["name"] == "a@1 on d", problem
    assert mismatch in problem["problem"], problem


@pytest.mark.parametrize("case", list(MISPLACED_PREDICTIONS))
def test_another_checkpoints_predictions_are_refused(case, explained_store):
    home, db = explained_store
    neighbour, mismatch = MISPLACED_PREDICTIONS[case]
    with replaced(home, PREDICTIONS) as target:
        shutil.copyfile(home / neighbour, target)
        before = _snapshot(home, db)
        for args in (
            ("similarity", "--function", "--sets", "a@1,b@1", "--dataset", "d"),
            ("trajectories", "--sets", "a@1,b@1", "--dataset", "d"),
        ):
            _refused(home, db, args, mismatch, "predictions file")
            assert _snapshot(home, db) == before, args
        _one_check_problem(home, db, "predictions", mismatch)
    assert cli_call(home, db, "similarity", "--function", "--sets", "a@1,b@1", "--dataset", "d").exit_code == 0


@pytest.mark.parametrize("case", list(MISPLACED_EXPLANATIONS))
def test_another_sets_explanations_are_refused(case, explained_store):
    home, db = explained_store
    neighbour, mismatch = MISPLACED_EXPLANATIONS[case]
    with replaced(home, EXPLANATIONS) as target:
        shutil.copyfile(home / neighbour, target)
        before = _snapshot(home, db)
        _refused(
            home, db, ("neuron", "a@1", "0.3", "--hook", "mlp.post", "--examples", 2), mismatch, "explanation file"
        )
        assert _snapshot(home, db) == before
        api = actdb.open(home, db)
        with pytest.raises(ActdbError, match="is not the one SQL records") as refused:
            api.neuron("a@1", "0.3", hook="mlp.post")
        api.close()
        assert mismatch in str(refused.value)
        _one_check_problem(home, db, "explanations", mismatch)
        _one_check_problem(home, db, "explanations", mismatch, "--quick")
    assert cli_call(home, db, "neuron", "a@1", "0.3", "--hook", "mlp.post").exit_code == 0


def test_an_intact_store_checks_every_identity(explained_store):
    home, db = explained_store
    r = cli_call(home, db, "check", "--quiet")
    assert r.exit_code == 0 and "cannot check" not in r.stderr, r.stderr
    with h5py.File(home / PREDICTIONS, "r") as f:
        assert f.attrs["model"] == "a" and f.attrs["step"] == 1 and len(f.attrs["weights_sha256"]) == 64
        assert "hook" not in f.attrs  # predictions belong to a checkpoint, not to a hook
    with h5py.File(home / EXPLANATIONS, "r") as f:
        assert f.attrs["model"] == "a" and f.attrs["step"] == 1 and f.attrs["hook"] == "mlp.post"


def test_files_written_before_identities_read_as_before(explained_store):
    """A sidecar with no identity attributes (as an earlier actdb wrote it) is read unchecked; `check` passes and
    says it cannot check which checkpoint it belongs to."""
    home, db = explained_store
    with replaced(home, PREDICTIONS), replaced(home, EXPLANATIONS):
        for path in (PREDICTIONS, EXPLANATIONS):
            with h5py.File(home / path, "r+") as f:
                for field, _label in IDENTITY_FIELDS:
                    f.attrs.pop(field, None)
        assert cli_call(home, db, "similarity", "--function", "--sets", "a@1,b@1", "--dataset", "d").exit_code == 0
        assert cli_call(home, db, "neuron", "a@1", "0.3", "--hook", "mlp.post").exit_code == 0
        for flags in ((), ("--quick",)):
            r = cli_call(home, db, "check", "--quiet", *flags)
            assert r.exit_code == 0, r.stderr
            assert "cannot check which checkpoint 1 prediction file and 1 explanation file belong to" in r.stderr
