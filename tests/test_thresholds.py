"""One meaning of "universal": `universal`, `persistence`, `ablate --neurons universal`, `report` and the views
agree at any threshold, and another threshold never recomputes a correlation run."""

from __future__ import annotations

import csv
import json
import shutil

import pytest


@pytest.fixture(scope="module")
def store(tmp_path_factory, tokenizer_dir, text_dir, tiny_models):
    from actdb.store.ingest.zoo import save_tiny_model
    from tests.conftest import cli_runner

    home = tmp_path_factory.mktemp("thresholds")
    db = f"sqlite:///{home}/actdb.sqlite"
    a = home / "src-a"
    shutil.copytree(tiny_models["gpt2"], a)
    b = save_tiny_model("gpt2", home / "src-b", tokenizer_dir, seed=7)
    c = save_tiny_model("gpt2", home / "src-c", tokenizer_dir, seed=8)

    run = cli_runner(home, db)

    run("init")
    run("dataset", "add", "d", text_dir, "--tokenizer", tokenizer_dir, "--seq-len", 64, "--tokens", 2500)
    run("ingest", "a", "--steps", "0,1", "--dataset", "d", "--source", a, "--quiet", "--identical-weights")
    run("ingest", "b", "--step", 0, "--dataset", "d", "--source", b, "--quiet")
    run("ingest", "b", "--step", 1, "--dataset", "d", "--source", c, "--quiet", "--replace-source")
    for step in (0, 1):
        run("correlate", "--dataset", "d", "--step", step, "--models", "a,b", "--threshold", 0.05, "--quiet")
    return run


def _by_layer(run, threshold=None):
    args = ["universal", "--by-layer", "--format", "json"] + (["--threshold", threshold] if threshold else [])
    return {(r["model"], r["step"], r["layer"]): r for r in json.loads(run(*args).stdout)}


def test_every_reader_agrees_at_two_thresholds(store, tmp_path):
    run = store
    recorded = _by_layer(run)
    assert all(r["threshold"] == 0.05 for r in recorded.values())
    excess = sorted(r["excess_corr"] for r in json.loads(run("universal", "--format", "json").stdout))
    second = round(excess[len(excess) // 2], 4)  # a threshold that keeps about half of them
    for threshold in (0.05, second):
        counts = _by_layer(run, threshold)
        listed = json.loads(run("universal", "--threshold", threshold, "--format", "json").stdout)
        for key, row in counts.items():
            assert row["n_universal"] == sum((r["model"], r["step"], r["layer"]) == key for r in listed)
        pers = json.loads(run("persistence", "--model", "a", "--threshold", threshold, "--format", "json").stdout)
        assert pers and all(p["threshold"] == threshold for p in pers)
        for p in pers:
            assert p["n_universal_from"] == counts[("a", 0, p["layer"])]["n_universal"]
            assert p["n_universal_to"] == counts[("a", 1, p["layer"])]["n_universal"]
        out = run(
            "ablate",
            "a@1",
            "--neurons",
            "universal",
            "--threshold",
            threshold,
            "--tokens",
            128,
            "--in-sample",
            "--quiet",
        )
        n_univ = sum(counts[("a", 1, layer)]["n_universal"] for layer in (0, 1))
        assert f"ablating {n_univ} neurons" in out.stdout
        report = tmp_path / f"report-{threshold}"
        run("report", "--out", report, "--threshold", threshold)
        with (report / "universal_by_layer_none.csv").open() as fh:
            table = {(r["model"], int(r["step"]), int(r["layer"])): int(r["n_universal"]) for r in csv.DictReader(fh)}
        assert table == {k: r["n_universal"] for k, r in counts.items()}
    strict = _by_layer(run, second)
    assert sum(r["n_universal"] for r in strict.values()) < sum(r["n_universal"] for r in _by_layer(run, 0.05).values())
    view = json.loads(
        run("sql", "SELECT model, step, layer, n_universal FROM v_universal_by_layer", "--format", "json").stdout
    )
    assert {(r["model"], r["step"], r["layer"]): r["n_universal"] for r in view} == {
        k: r["n_universal"] for k, r in recorded.items()
    }
    ablations = json.loads(run("ablations", "--format", "json").stdout)
    assert sorted(a["threshold"] for a in ablations) == sorted([0.05, second])


def test_another_threshold_reuses_the_run(store):
    run = store
    runs_before = json.loads(run("runs", "--format", "json").stdout)
    again = run("correlate", "--dataset", "d", "--step", 1, "--models", "a,b", "--threshold", 0.3, "--quiet")
    assert "already holds" in again.stdout and "display threshold is now 0.3" in again.stdout
    assert len(json.loads(run("runs", "--format", "json").stdout)) == len(runs_before)
    assert {r["threshold"] for r in _by_layer(run).values() if r["step"] == 1} == {0.3}
    run("correlate", "--dataset", "d", "--step", 1, "--models", "a,b", "--threshold", 0.05, "--quiet")


@pytest.mark.parametrize("bad", ["nan", "inf", "-5", "1.5", "x"])
def test_thresholds_must_be_numbers_in_unit_interval(store, bad):
    for args in (("universal", "--threshold", bad), ("correlate", "--sets", "a@0,b@0", "--threshold", bad)):
        r = store(*args, ok=False)
        assert r.exit_code == 2 and "threshold" in r.stderr and len(r.stderr.strip().splitlines()) == 1
