"""Persistence knows the hook: `mlp.pre` and `mlp.post` persistence of one model are computed, stored and read
apart (neither replaces the other), and a neuron's history joins the emergence step of its own hook."""

from __future__ import annotations

import json
import shutil

import pytest
from sqlalchemy import text

from actdb.query.api import ActdbStore
from actdb.store.config import StoreConfig
from actdb.store.database.connection import Store
from tests.conftest import cli_call, cli_runner

LOW = ("--threshold", 0.02, "--quiet")


@pytest.fixture(scope="module")
def two_hooks_two_steps(tmp_path_factory, tokenizer_dir, text_dir, tiny_models):
    """Models a and b at steps 0 and 1 (a: the same weights at both steps), both hooks, correlated per hook."""
    from actdb.store.ingest.zoo import save_tiny_model

    root = tmp_path_factory.mktemp("persist-hooks")
    a_src = root / "a"
    shutil.copytree(tiny_models["gpt2"], a_src)
    b_src = save_tiny_model("gpt2", root / "b", tokenizer_dir, seed=5)
    home = root / "home"
    db = f"sqlite:///{home}/actdb.sqlite"
    run = cli_runner(home, db)
    run("init")
    run("dataset", "add", "d", text_dir, "--tokenizer", tokenizer_dir, "--seq-len", 32, "--tokens", 800)
    for hook in ("mlp.post", "mlp.pre"):
        for name, src in (("a", a_src), ("b", b_src)):
            run(
                "ingest",
                name,
                "--steps",
                "0,1",
                "--dataset",
                "d",
                "--source",
                src,
                "--hook",
                hook,
                "--quiet",
                "--identical-weights",
            )
        for step in (0, 1):
            run(
                "correlate",
                "--dataset",
                "d",
                "--step",
                step,
                "--models",
                "a,b",
                "--hook",
                hook,
                "--baseline-draws",
                2,
                *LOW,
            )
    return home, db


def test_persistence_per_hook_is_stored_apart_and_read_by_its_hook(two_hooks_two_steps):

    home, db = two_hooks_two_steps
    asked = cli_call(home, db, "persistence", "--model", "a", "--quiet")
    assert asked.exit_code != 0 and "choose one with --hook" in asked.stderr
    rows = {}
    for hook in ("mlp.post", "mlp.pre"):
        r = cli_call(home, db, "persistence", "--model", "a", "--hook", hook, "--format", "json", "--quiet")
        assert r.exit_code == 0, r.stderr
        rows[hook] = json.loads(r.stdout)
        assert {row["hook"] for row in rows[hook]} == {hook} and len(rows[hook]) == 2  # one row per layer
    # the second hook's run did not replace the first's rows
    listing = json.loads(cli_call(home, db, "persistence", "--format", "json").stdout)
    assert sorted((r["hook"], r["layer"]) for r in listing) == sorted(
        (h, layer) for h in ("mlp.post", "mlp.pre") for layer in (0, 1)
    )
    assert [r["n_universal_from"] for r in rows["mlp.post"]] != [r["n_universal_from"] for r in rows["mlp.pre"]]
    db_api = ActdbStore.open(home, db)
    assert set(db_api.persistence(hook="mlp.pre")["hook"]) == {"mlp.pre"}

    # each history row carries the emergence step computed from its own hook's labels: the same weights at both
    # steps, so a neuron universal at step 1 emerged at step 0, and one that is not has no emergence step
    store = Store.open(StoreConfig.resolve(home, db))
    history = store.query(
        text(
            "SELECT hook, layer, neuron, is_universal, emergence_step FROM v_neuron_history "
            "WHERE model = 'a' AND step = 1 AND control = 'none'"
        )
    )
    store.close()
    by_hook = {}
    for r in history:
        by_hook.setdefault(r["hook"], {})[(r["layer"], r["neuron"])] = r
    assert set(by_hook) == {"mlp.post", "mlp.pre"}
    for hook, neurons in by_hook.items():
        for r in neurons.values():
            assert (r["emergence_step"] == 0) == bool(r["is_universal"]), (hook, r)
    differ = [
        k for k in by_hook["mlp.pre"] if by_hook["mlp.pre"][k]["is_universal"] != by_hook["mlp.post"][k]["is_universal"]
    ]
    assert differ, "the hooks label different neurons universal, so a hook-blind join would show here"


def test_persistence_of_a_hook_without_sets_is_one_line(two_hooks_two_steps, tmp_path):

    home, db = two_hooks_two_steps
    r = cli_call(home, db, "persistence", "--model", "a", "--hook", "mlp.pre", "--steps", "0,7", "--quiet")
    assert r.exit_code != 0 and "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1
