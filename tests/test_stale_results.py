"""A redo that replaces a checkpoint's weights or a set's stored values takes every result computed from the old
ones with it (status `stale`, in the same transaction): nothing reuses or serves them, and the next request
recomputes them. And a complete set whose explanation is missing is explained by the next `ingest`, while
`actdb neuron` says it is not explained instead of printing empty tables."""

from __future__ import annotations

import json
import shutil

import pytest
from sqlalchemy import text

from actdb.store.database.connection import make_engine
from tests.conftest import cli_runner

QUIET = ("--quiet",)
CORRELATE = ("correlate", "--dataset", "d", "--step", 0, "--models", "a,b", "--baseline-draws", 2, "--quiet")


@pytest.fixture(scope="module")
def sources(tmp_path_factory, tokenizer_dir, tiny_models):
    """Three tiny GPT-2s with different weights: a, b, and c (the weights that replace b's)."""
    from actdb.store.ingest.zoo import save_tiny_model

    root = tmp_path_factory.mktemp("stale-srcs")
    a = root / "a"
    shutil.copytree(tiny_models["gpt2"], a)
    b = save_tiny_model("gpt2", root / "b", tokenizer_dir, seed=5)
    c = save_tiny_model("gpt2", root / "c", tokenizer_dir, seed=9)
    return {"a": a, "b": b, "c": c}


def _sql(db: str, statement: str) -> list[tuple]:
    engine = make_engine(db)
    try:
        with engine.connect() as conn:
            return [tuple(r) for r in conn.execute(text(statement))]
    finally:
        engine.dispose()


def _store(tmp_path, db, tokenizer_dir, text_dir, sources, *datasets: str):
    home = tmp_path / "store"
    run = cli_runner(home, db)
    run("init")
    for name in datasets:
        run("dataset", "add", name, text_dir, "--tokenizer", tokenizer_dir, "--seq-len", 32, "--tokens", 800)
    for model in ("a", "b"):
        run("ingest", model, "--step", 0, "--dataset", datasets[0], "--source", sources[model], "--top-k", 4, *QUIET)
    return home, run


def _universal_run(run, model: str) -> set[int]:
    by_layer = run("universal", "--model", model, "--step", 0, "--hook", "mlp.post", "--by-layer", "--format", "json")
    rows = json.loads(by_layer.stdout)
    return {r["run_id"] for r in rows}


def test_replaced_weights_make_every_dependent_stale_and_correlate_recomputes(
    db_url, tmp_path, tokenizer_dir, text_dir, sources
):
    home, run = _store(tmp_path, db_url, tokenizer_dir, text_dir, sources, "d")
    for model in ("a", "b"):
        run("ingest", model, "--step", 0, "--dataset", "d", "--hook", "mlp.pre", "--top-k", 4, *QUIET)
    run(*CORRELATE)
    run(*CORRELATE[:-1], "--hook", "mlp.pre", "--quiet")
    run("predictions", "a@0", "b@0", *QUIET)
    assert _universal_run(run, "b") == {1}
    before = run("similarity", "--function", "--sets", "a@0,b@0", "--format", "json").stdout

    redo = run("ingest", "b", "--step", 0, "--dataset", "d", "--source", sources["c"], "--replace-source", "--force")
    said = [line for line in redo.stdout.splitlines() if "were replaced" in line]
    assert len(said) == 1, redo.stdout
    assert said[0].startswith("the weights of b@0 were replaced (sha256 ")
    for part in ("correlation runs 1, 2", "predictions on d", "activation sets on d (mlp.pre)", "explanations of"):
        assert part in said[0], said[0]

    status = dict(_sql(db_url, "SELECT id, status FROM correlation_run"))
    assert status == {1: "stale", 2: "stale"}
    sets = dict(
        _sql(
            db_url,
            "SELECT hook, status FROM activation_set s JOIN checkpoint c ON c.id = s.checkpoint_id "
            "JOIN model m ON m.id = c.model_id WHERE m.name = 'b'",
        )
    )
    assert sets == {"mlp.post": "complete", "mlp.pre": "stale"}
    assert _sql(
        db_url,
        "SELECT status FROM prediction_set p JOIN checkpoint c ON c.id = p.checkpoint_id "
        "JOIN model m ON m.id = c.model_id WHERE m.name = 'b'",
    ) == [("stale",)]
    for view in ("v_universality", "v_universal_by_layer", "v_canonical_runs", "v_neuron_matches"):
        assert _sql(db_url, f"SELECT COUNT(*) FROM {view}") == [(0,)], view
    # the redone set was explained again by the same ingest, from the new weights
    assert _sql(
        db_url,
        "SELECT COUNT(*) FROM set_explanation x JOIN activation_set s ON s.id = x.set_id WHERE s.hook = 'mlp.post'",
    ) == [(2,)]

    missing = run("universal", "--model", "b", "--step", 0, "--by-layer", ok=False)
    assert missing.exit_code == 1 and "correlation run is missing" in missing.stderr
    stale = run("similarity", "--function", "--sets", "a@0,b@0", ok=False)
    assert stale.exit_code == 1 and "b@0 predictions on d are stale (the weights of b@0" in stale.stderr

    again = run(*CORRELATE)
    assert "already holds" not in again.stdout
    assert _universal_run(run, "b") == {3} and _universal_run(run, "a") == {3}
    run("predictions", "b@0", *QUIET)
    after = run("similarity", "--function", "--sets", "a@0,b@0", "--format", "json").stdout
    assert after != before  # b's losses are the new weights'
    redone_pre = run("ingest", "b", "--step", 0, "--dataset", "d", "--hook", "mlp.pre", "--top-k", 4, "--quiet")
    assert "already complete" not in redone_pre.stdout
    assert ("mlp.pre", "complete") in _sql(db_url, "SELECT hook, status FROM activation_set")
    assert run("check").exit_code == 0


def test_a_redo_of_the_same_values_keeps_results_and_another_dtype_stales_the_sets_runs(
    tmp_path, tokenizer_dir, text_dir, sources
):
    db = f"sqlite:///{tmp_path / 'store' / 'actdb.sqlite'}"
    _home, run = _store(tmp_path, db, tokenizer_dir, text_dir, sources, "d")
    run(*CORRELATE)
    run("predictions", "b@0", *QUIET)

    same = run("ingest", "b", "--step", 0, "--dataset", "d", "--force", "--top-k", 4, "--quiet")
    assert "replaced" not in same.stdout and "stale" not in same.stdout, same.stdout
    assert "run 1 already holds these results" in run(*CORRELATE).stdout

    int8 = run("ingest", "b", "--step", 0, "--dataset", "d", "--force", "--dtype", "int8", "--top-k", 4, "--quiet")
    assert "the stored values of b@0 on d (mlp.post) were replaced; stale now: correlation runs 1;" in int8.stdout
    assert "predictions" not in int8.stdout  # the weights are the same: so are the predictions
    assert _sql(db, "SELECT status FROM prediction_set") == [("complete",)]
    assert _sql(db, "SELECT id, status FROM correlation_run") == [(1, "stale")]
    assert "already holds" not in run(*CORRELATE).stdout


def test_new_weights_for_another_dataset_stale_the_checkpoints_complete_sets(
    tmp_path, tokenizer_dir, text_dir, sources
):
    db = f"sqlite:///{tmp_path / 'store' / 'actdb.sqlite'}"
    _home, run = _store(tmp_path, db, tokenizer_dir, text_dir, sources, "d", "e")
    run(*CORRELATE)
    other = run("ingest", "b", "--step", 0, "--dataset", "e", "--source", sources["c"], "--replace-source", "--quiet")
    assert "the weights of b@0 were replaced" in other.stdout and "activation sets on d (mlp.post)" in other.stdout
    assert _sql(db, "SELECT id, status FROM correlation_run") == [(1, "stale")]
    refused = run("universal", "--model", "b", "--step", 0, ok=False)
    assert refused.exit_code == 1 and "correlation run is missing" in refused.stderr
    back = run("ingest", "b", "--step", 0, "--dataset", "d", "--top-k", 4, "--quiet")
    assert "already complete" not in back.stdout and "replaced" not in back.stdout
    assert "already holds" not in run(*CORRELATE).stdout


def test_ingest_finishes_a_missing_explanation_and_neuron_says_when_a_set_is_not_explained(
    tmp_path, tokenizer_dir, text_dir, sources
):
    db = f"sqlite:///{tmp_path / 'store' / 'actdb.sqlite'}"
    _home, run = _store(tmp_path, db, tokenizer_dir, text_dir, sources, "d")
    # what a kill between the set's completion and its explanation leaves: a complete set, no explanation
    engine = make_engine(db)
    with engine.begin() as conn:
        conn.execute(text("DELETE FROM neuron_explanation"))
        conn.execute(text("DELETE FROM set_explanation"))
    engine.dispose()
    line = "a@0 on d (mlp.post) is not explained; `actdb examples a@0` explains it"
    table = run("neuron", "a@0", "1.3").stdout
    assert table.splitlines()[0] == line, table
    for section in ("explanation of", "examples of", "top tokens of", "vocabulary of"):
        assert section not in table
    assert "statistics of a@0 1.3" in table

    finished = run("ingest", "a", "--step", 0, "--dataset", "d", "--quiet").stdout
    assert "already complete" in finished and "a@0: complete but not explained; explaining it now" in finished
    assert "a@0: explained 2 x 128 neurons" in finished
    shown = run("neuron", "a@0", "1.3").stdout
    assert "not explained" not in shown and "explanation of a@0 1.3" in shown and "examples of a@0 1.3" in shown
    assert "explaining" not in run("ingest", "a", "--step", 0, "--dataset", "d", "--quiet").stdout

    # --top-k 0 asks for no explanation: ingest leaves it missing, and neuron says so
    kept = run("ingest", "b", "--step", 0, "--dataset", "d", "--top-k", 0, "--quiet").stdout
    assert "explain" not in kept
    assert run("neuron", "b@0", "0.1").stdout.splitlines()[0].startswith("b@0 on d (mlp.post) is not explained")
