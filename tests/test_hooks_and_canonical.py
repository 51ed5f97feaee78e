"""Reads know the hook (mlp.post / mlp.pre sets of one checkpoint are told apart everywhere) and the canonical views
give one row per neuron per set per control, by the rule the CLI reads with, on SQLite and PostgreSQL."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from sqlalchemy import text

from actdb.query.api import ActdbStore
from actdb.store.database.connection import make_engine
from tests.conftest import cli_call, cli_runner, fresh_pg_database

LOW = ("--threshold", 0.02, "--quiet")  # a recorded threshold the tiny models' neurons pass
TWO_HOOKS = "has sets at hooks mlp.post, mlp.pre; choose one with --hook"


def _populate(home, db, tokenizer_dir, text_dir, a_src, b_src) -> None:
    run = cli_runner(home, db)
    run("init")
    run("dataset", "add", "d", text_dir, "--tokenizer", tokenizer_dir, "--seq-len", 32, "--tokens", 800)
    for hook in ("mlp.post", "mlp.pre"):
        for name, src in (("a", a_src), ("b", b_src)):
            run("ingest", name, "--step", 0, "--dataset", "d", "--source", src, "--hook", hook, "--quiet")
        run("correlate", "--dataset", "d", "--step", 0, "--models", "a,b", "--hook", hook, "--baseline-draws", 2, *LOW)
    # a second run over the same sets (another baseline seed): the per-run views now hold two rows per neuron
    run("correlate", "--dataset", "d", "--step", 0, "--models", "a,b", "--seed", 1, "--baseline-draws", 2, *LOW)


@pytest.fixture(scope="module")
def sources(tmp_path_factory, tokenizer_dir, tiny_models):
    from actdb.store.ingest.zoo import save_tiny_model

    root = tmp_path_factory.mktemp("hook-srcs")
    a = root / "a"
    shutil.copytree(tiny_models["gpt2"], a)
    return a, save_tiny_model("gpt2", root / "b", tokenizer_dir, seed=5)


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def two_hooks(request, tmp_path_factory, tokenizer_dir, text_dir, sources):
    home = tmp_path_factory.mktemp(f"hooks-{request.param}")
    if request.param == "sqlite":
        db = f"sqlite:///{home}/actdb.sqlite"
        _populate(home, db, tokenizer_dir, text_dir, *sources)
        yield home, db
        return
    with fresh_pg_database("actdb_hooks") as db:
        _populate(home, db, tokenizer_dir, text_dir, *sources)
        yield home, db


def _sql(db: str, statement: str) -> list[tuple]:
    engine = make_engine(db)
    try:
        with engine.connect() as conn:
            return [tuple(r) for r in conn.execute(text(statement))]
    finally:
        engine.dispose()


def test_read_commands_ask_for_the_hook_when_both_exist(two_hooks):
    home, db = two_hooks
    for args in (
        ("universal",),
        ("universal", "--by-layer"),
        ("universal", "--model", "a", "--step", 0),
        ("neuron", "a@0", "1.3"),
        ("families", "a@0"),
        ("export", "a@0", "--layer", 0, "--out", home / "x.npy"),
    ):
        r = cli_call(home, db, *args)
        assert r.exit_code == 1 and TWO_HOOKS in r.stderr and len(r.stderr.strip().splitlines()) == 1, (args, r)
    assert not (home / "x.npy").exists()
    r = cli_call(home, db, "universal", "--model", "a", "--step", 0, "--hook", "mlp.pre", "--model", "nobody")
    assert r.exit_code == 1 and "nobody" in r.stderr


def test_by_layer_gives_one_row_per_layer_and_shows_the_hook(two_hooks):
    home, db = two_hooks
    for hook in ("mlp.post", "mlp.pre", "blocks.{L}.mlp.hook_pre"):
        r = cli_call(
            home, db, "universal", "--by-layer", "--model", "a", "--step", 0, "--hook", hook, "--format", "json"
        )
        assert r.exit_code == 0, r.stderr
        rows = json.loads(r.stdout)
        assert [x["layer"] for x in rows] == [0, 1]  # the tiny model's two layers, once each
        assert {x["hook"] for x in rows} == {hook if hook.startswith("mlp") else "mlp.pre"}
    post = json.loads(cli_call(home, db, "universal", "--hook", "mlp.post", "--format", "json").stdout)
    pre = json.loads(cli_call(home, db, "universal", "--hook", "mlp.pre", "--format", "json").stdout)
    assert {x["hook"] for x in post} == {"mlp.post"} and {x["hook"] for x in pre} == {"mlp.pre"}


def test_neuron_story_is_one_hook(two_hooks):
    home, db = two_hooks
    for hook in ("mlp.post", "mlp.pre"):
        r = cli_call(home, db, "neuron", "a@0", "1.3", "--hook", hook, "--format", "json")
        assert r.exit_code == 0, r.stderr
        doc = json.loads(r.stdout)
        assert doc["hook"] == hook
        assert len(doc["statistics"]) == 1 and doc["statistics"][0]["hook"] == hook
        assert doc["universality"] and {u["hook"] for u in doc["universality"]} == {hook}
        assert doc["matches"] and {(m["hook"], m["other_hook"]) for m in doc["matches"]} == {(hook, hook)}
    table = cli_call(home, db, "neuron", "a@0", "1.3", "--hook", "mlp.pre").stdout
    assert "statistics of a@0 1.3 at mlp.pre" in table


def test_runs_and_views_carry_the_hook(two_hooks):
    home, db = two_hooks
    runs = json.loads(cli_call(home, db, "runs", "--format", "json").stdout)
    assert [r["hook"] for r in runs] == ["mlp.post", "mlp.pre", "mlp.post"]
    for view in ("v_universality", "v_universal_neurons", "v_universal_by_layer", "v_neuron_history"):
        hooks = {h for (h,) in _sql(db, f"SELECT DISTINCT hook FROM {view}")}
        assert hooks == {"mlp.post", "mlp.pre"}, view
    pairs = set(_sql(db, "SELECT DISTINCT hook, other_hook FROM v_neuron_matches"))
    assert pairs == {("mlp.post", "mlp.post"), ("mlp.pre", "mlp.pre")}
    per_layer = _sql(
        db, "SELECT model, hook, layer, COUNT(*) FROM v_canonical_universal_by_layer GROUP BY model, hook, layer"
    )
    assert len(per_layer) == 2 * 2 * 2 and {n for *_k, n in per_layer} == {1}


def test_export_and_api_read_the_asked_hook(two_hooks):
    home, db = two_hooks
    db_api = ActdbStore.open(home, db)
    try:
        post = db_api.activations("a@0", 1, neurons=[3, 1], hook="mlp.post")
        pre = db_api.activations("a@0", 1, neurons=[3, 1], hook="mlp.pre")
        assert post.hook == "mlp.post" and pre.hook == "mlp.pre"
        assert not np.array_equal(post.values, pre.values)  # GELU(pre) != pre
        np.testing.assert_allclose(
            post.values.astype(np.float64),
            _gelu_new(pre.values.astype(np.float64)),
            atol=5e-3,
        )
        assert set(db_api.universal(hook="mlp.pre")["hook"]) == {"mlp.pre"}
        assert set(db_api.neuron("a@0", "1.3", hook="mlp.pre")["universality"]["hook"]) == {"mlp.pre"}
        with pytest.raises(Exception, match=TWO_HOOKS):
            db_api.activations("a@0", 1)
    finally:
        db_api.close()
    out = home / "pre.npy"
    r = cli_call(home, db, "export", "a@0", "--layer", 1, "--neurons", "3,1", "--hook", "mlp.pre", "--out", out)
    assert r.exit_code == 0 and "at mlp.pre" in r.stdout, r.stderr
    np.testing.assert_array_equal(np.load(out), pre.values)


def _gelu_new(x: np.ndarray) -> np.ndarray:
    """GPT-2's tanh GELU, the tiny model's activation function."""
    return 0.5 * x * (1.0 + np.tanh(np.sqrt(2.0 / np.pi) * (x + 0.044715 * x**3)))


def test_canonical_views_give_one_row_per_neuron_per_set_and_control(two_hooks):
    home, db = two_hooks
    # the per-run view pools both post runs: two rows per post neuron
    pooled = _sql(db, "SELECT hook, COUNT(*) FROM v_universality WHERE model = 'a' GROUP BY hook ORDER BY hook")
    canonical = _sql(
        db, "SELECT hook, COUNT(*) FROM v_canonical_universality WHERE model = 'a' GROUP BY hook ORDER BY hook"
    )
    n_neurons = _sql(db, "SELECT n_layers * d_mlp FROM model WHERE name = 'a'")[0][0]
    assert pooled == [("mlp.post", 2 * n_neurons), ("mlp.pre", n_neurons)]
    assert canonical == [("mlp.post", n_neurons), ("mlp.pre", n_neurons)]
    dupes = _sql(
        db,
        "SELECT set_id, control, layer, neuron FROM v_canonical_universality "
        "GROUP BY set_id, control, layer, neuron HAVING COUNT(*) > 1",
    )
    assert dupes == []
    # the rule is the CLI's: for the post sets, the newest of two equally wide runs
    runs = json.loads(cli_call(home, db, "runs", "--format", "json").stdout)
    newest_post = max(r["run_id"] for r in runs if r["hook"] == "mlp.post")
    assert {r for (r,) in _sql(db, "SELECT DISTINCT run_id FROM v_canonical_universality WHERE hook = 'mlp.post'")} == {
        newest_post
    }
    cli = json.loads(cli_call(home, db, "universal", "--hook", "mlp.post", "--format", "json").stdout)
    view = _sql(
        db,
        "SELECT model, layer, neuron, run_id FROM v_canonical_universal_neurons WHERE hook = 'mlp.post' "
        "ORDER BY model, layer, neuron",
    )
    assert cli and sorted((x["model"], x["layer"], x["neuron"], x["run_id"]) for x in cli) == sorted(view)


def test_a_named_run_reads_its_own_hook(two_hooks):
    home, db = two_hooks
    runs = json.loads(cli_call(home, db, "runs", "--format", "json").stdout)
    pre_run = next(r["run_id"] for r in runs if r["hook"] == "mlp.pre")
    r = cli_call(home, db, "universal", "--run", pre_run, "--by-layer", "--format", "json")
    assert r.exit_code == 0, r.stderr
    assert {x["hook"] for x in json.loads(r.stdout)} == {"mlp.pre"}
    r = cli_call(home, db, "universal", "--run", pre_run, "--hook", "mlp.post")
    assert r.exit_code == 1 and f"in run {pre_run} has no complete sets at hook mlp.post" in r.stderr


def test_report_has_sections_and_pages_per_hook(two_hooks, tmp_path):
    home, db = two_hooks
    cli_runner(home, db)("report", "--out", tmp_path / "rep")
    index = (tmp_path / "rep" / "index.html").read_text()
    for hook in ("mlp.post", "mlp.pre"):
        assert f"Universal neurons by layer (none control) at {hook}" in index
        assert f"Most universal neurons (none control) at {hook}" in index
    pages = [p.name for p in (tmp_path / "rep" / "neurons").glob("*.html")]
    assert any(p.endswith("-mlp.pre.html") for p in pages) and any(not p.endswith("-mlp.pre.html") for p in pages)
    assert (tmp_path / "rep" / "universal_by_layer_none_mlp_pre.csv").exists()


def test_ablation_asks_for_the_hook_and_records_it(two_hooks):
    """Ablation reads labels like every read: with mlp.post and mlp.pre sets on one dataset it asks for --hook (one
    line, no row), then needs no --dataset; the hook chooses the universal neurons and is stored on the row, the
    view, the listing and the API's frame. A named run brings its own hook."""
    home, db = two_hooks
    count = "SELECT count(*) FROM ablation"
    assert _sql(db, count) == [(0,)]
    for neurons in ("universal", "0.1,1.2"):
        r = cli_call(home, db, "ablate", "a@0", "--neurons", neurons, "--in-sample", "--controls", 2, "--quiet")
        assert r.exit_code == 1 and TWO_HOOKS in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert _sql(db, count) == [(0,)]
    listed = cli_call(
        home, db, "ablate", "a@0", "--neurons", "0.1,1.2", "--hook", "mlp.post", "--controls", 2, "--quiet"
    )
    assert listed.exit_code == 0, listed.stderr
    pre = cli_call(
        home,
        db,
        "ablate",
        "a@0",
        "--neurons",
        "universal",
        "--hook",
        "blocks.{L}.mlp.hook_pre",
        "--in-sample",
        "--controls",
        0,
        "--quiet",
    )
    assert pre.exit_code == 0, pre.stderr
    assert "(chosen at mlp.pre; their mlp.post activations replaced)" in pre.stdout
    universal_pre = _sql(
        db,
        "SELECT layer, neuron FROM v_canonical_universal_neurons WHERE model = 'a' AND step = 0 AND hook = 'mlp.pre' "
        "AND control = 'none' ORDER BY layer, neuron",
    )
    universal_post = _sql(
        db,
        "SELECT layer, neuron FROM v_canonical_universal_neurons WHERE model = 'a' AND step = 0 "
        "AND hook = 'mlp.post' AND control = 'none' ORDER BY layer, neuron",
    )
    assert universal_pre and universal_pre != universal_post
    stored = _sql(db, "SELECT hook, neurons FROM ablation ORDER BY id")
    assert [h for h, _ in stored] == ["mlp.post", "mlp.pre"]
    assert json.loads(stored[1][1]) == [f"{layer}.{n}" for layer, n in universal_pre]
    rows = json.loads(cli_call(home, db, "ablations", "--format", "json").stdout)
    assert [(row["model"], row["dataset"], row["hook"], row["n_neurons"]) for row in rows] == [
        ("a", "d", "mlp.post", 2),
        ("a", "d", "mlp.pre", len(universal_pre)),
    ]
    assert _sql(db, "SELECT hook FROM v_ablation_summary ORDER BY ablation_id") == [("mlp.post",), ("mlp.pre",)]
    db_api = ActdbStore.open(home, db)
    try:
        assert list(db_api.ablations()["hook"]) == ["mlp.post", "mlp.pre"]
    finally:
        db_api.close()
    runs = json.loads(cli_call(home, db, "runs", "--format", "json").stdout)
    pre_run = next(r["run_id"] for r in runs if r["hook"] == "mlp.pre")
    again = cli_call(
        home, db, "ablate", "a@0", "--neurons", "universal", "--run", pre_run, "--in-sample", "--controls", 0, "--quiet"
    )
    assert again.exit_code == 0 and "already measured" in again.stdout, again.stderr
    wrong = cli_call(home, db, "ablate", "a@0", "--neurons", "universal", "--run", pre_run, "--hook", "mlp.post")
    assert wrong.exit_code == 1 and f"in run {pre_run} has no complete sets at hook mlp.post" in wrong.stderr
    assert _sql(db, count) == [(2,)]
