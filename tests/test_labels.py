"""Labels that survive a second look: baseline draws in the CLI and views, token exclusions, and ablation
statistics checked against scipy."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import scipy.stats

from actdb.compute.ablation.loss import ControlStats
from actdb.store.files.token import TokenDataset
from tests.conftest import cli_runner


def test_control_stats_against_scipy():
    deltas = np.array([0.004, 0.007, 0.0052, 0.0061, 0.0049, 0.0071, 0.0058, 0.0066])
    stats = ControlStats.of(deltas, observed=0.0065)
    k = len(deltas)
    low, high = scipy.stats.t.interval(0.95, k - 1, loc=deltas.mean(), scale=scipy.stats.sem(deltas))
    assert stats.ci_low == pytest.approx(low, rel=1e-12) and stats.ci_high == pytest.approx(high, rel=1e-12)
    assert stats.sd == pytest.approx(deltas.std(ddof=1)) and (stats.min, stats.max) == (deltas.min(), deltas.max())
    assert stats.p_value == pytest.approx((1 + 3) / (1 + k))  # 0.0066, 0.007 and 0.0071 reach the observed
    assert stats.p_floor == pytest.approx(1 / 9)
    assert "at least 19" in stats.floor_note()
    assert ControlStats.of(deltas, observed=1.0).p_value == pytest.approx(1 / 9)
    many = ControlStats.of(np.linspace(0, 0.01, 19), observed=1.0)
    assert many.p_value == pytest.approx(0.05) and many.floor_note() is None
    one = ControlStats.of(np.array([0.01]), observed=0.0)
    assert one.sd is None and one.ci_low is None and one.p_value == 1.0


@pytest.fixture(scope="module")
def store(tmp_path_factory, tokenizer_dir, text_dir, tiny_models):
    from actdb.store.ingest.zoo import save_tiny_model

    home = tmp_path_factory.mktemp("labels")
    db = f"sqlite:///{home}/actdb.sqlite"

    run = cli_runner(home, db)

    run("init")
    for name, exclude in (("plain", None), ("nonl", "gurnee")):
        extra = ("--exclude-tokens", exclude) if exclude else ()
        run("dataset", "add", name, text_dir, "--tokenizer", tokenizer_dir, "--seq-len", 64, "--tokens", 2500, *extra)
    for k, model in enumerate("abc"):
        src = save_tiny_model("gpt2", home / f"src-{model}", tokenizer_dir, seed=40 + k)
        for ds in ("plain", "nonl"):
            run("ingest", model, "--step", 0, "--dataset", ds, "--source", src, "--quiet")
    run("correlate", "--dataset", "plain", "--step", 0, "--models", "a,b,c", "--threshold", 0.05, "--quiet")
    return home, db, run


def test_exclusions_mask_exactly_those_tokens(store, tokenizer_dir):
    from transformers import AutoTokenizer

    home, _db, run = store
    newline = AutoTokenizer.from_pretrained(tokenizer_dir)("\n", add_special_tokens=False)["input_ids"]
    assert len(newline) == 1
    plain = TokenDataset.load(home / "datasets" / "plain.tokens.h5")
    nonl = TokenDataset.load(home / "datasets" / "nonl.tokens.h5")
    np.testing.assert_array_equal(plain.tokens, nonl.tokens)
    np.testing.assert_array_equal(nonl.mask, plain.mask & (plain.tokens != newline[0]))
    assert (plain.mask & (plain.tokens == newline[0])).sum() > 10
    shown = {r["field"]: r["value"] for r in json.loads(run("dataset", "show", "nonl", "--format", "json").stdout)}
    assert json.loads(shown["excluded_tokens"]) == [[newline[0], "Ċ"]]
    assert shown["fingerprint"] != shown["token_sha256"]
    plain_fp = {r["field"]: r["value"] for r in json.loads(run("dataset", "show", "plain", "--format", "json").stdout)}
    assert plain_fp["fingerprint"] == plain_fp["token_sha256"]
    assert run("check", "--quiet").exit_code == 0
    for bad, why in (("abcdefgh", "not one"), ("99999", "outside the vocabulary")):
        r = run(
            "dataset", "add", "x", home / "datasets", "--tokenizer", tokenizer_dir, "--exclude-tokens", bad, ok=False
        )
        assert r.exit_code == 1 and why in r.stderr, r.stderr


def test_statistics_follow_the_mask(store):
    """Neuron statistics of the set on the exclusion dataset are those of the plain set's rows where the new
    mask holds (the same model, the same tokens)."""
    from actdb.store.files.activation import ActivationReader

    home, _db, run = store
    plain = TokenDataset.load(home / "datasets" / "plain.tokens.h5")
    nonl = TokenDataset.load(home / "datasets" / "nonl.tokens.h5")
    with ActivationReader(home / "activations" / "a" / "step-0" / "plain.mlp.post.h5") as reader:
        x = reader.read_rows(0, reader.header.n_tokens, [1])[0][nonl.mask.reshape(-1)].astype(np.float64)
    story = json.loads(run("neuron", "a@0", "1.7", "--format", "json").stdout)
    stats = {s["dataset"]: s for s in story["statistics"]}
    assert stats["nonl"]["count"] == nonl.mask.sum() < stats["plain"]["count"] == plain.mask.sum()
    assert stats["nonl"]["mean"] == pytest.approx(x[:, 7].mean(), rel=1e-6)
    assert stats["nonl"]["kurtosis"] == pytest.approx(scipy.stats.kurtosis(x[:, 7]), rel=1e-5)


def test_universal_shows_stability_and_filters(store):
    home, db, run = store
    rows = json.loads(run("universal", "--format", "json").stdout)
    assert rows and {"stability", "z", "baseline_sd", "n_draws"} <= set(rows[0])
    assert all(r["n_draws"] == 8 and 0 < r["stability"] <= 1 and r["baseline_sd"] > 0 for r in rows)
    for r in rows:
        assert r["z"] == pytest.approx(r["excess_corr"] / r["baseline_sd"], rel=1e-9)
    stable = json.loads(run("universal", "--min-stability", 1, "--format", "json").stdout)
    assert {(r["model"], r["layer"], r["neuron"]) for r in stable} == {
        (r["model"], r["layer"], r["neuron"]) for r in rows if r["stability"] == 1
    }
    strict = sorted(r["excess_corr"] for r in rows)[len(rows) // 2]
    at = json.loads(run("universal", "--threshold", strict, "--format", "json").stdout)
    assert all(r["excess_corr"] > strict for r in at)
    assert any(r["stability"] < 1 for r in at)  # near the threshold some draws disagree
    view = json.loads(
        run("sql", "SELECT model, layer, neuron, stability, z FROM v_universal_neurons", "--format", "json").stdout
    )
    assert {(r["model"], r["layer"], r["neuron"]): r["stability"] for r in view} == {
        (r["model"], r["layer"], r["neuron"]): r["stability"] for r in rows
    }
    again = run("correlate", "--dataset", "plain", "--step", 0, "--models", "a,b,c", "--threshold", strict, "--quiet")
    assert "display threshold is now" in again.stdout
    restamped = json.loads(run("universal", "--format", "json").stdout)
    assert {(r["model"], r["layer"], r["neuron"]): r["stability"] for r in restamped} == {
        (r["model"], r["layer"], r["neuron"]): r["stability"] for r in at
    }
    run("correlate", "--dataset", "plain", "--step", 0, "--models", "a,b,c", "--threshold", 0.05, "--quiet")
    top = rows[0]
    story = json.loads(run("neuron", f"{top['model']}@0", f"{top['layer']}.{top['neuron']}", "--format", "json").stdout)
    assert story["universality"][0]["stability"] == top["stability"]
    assert story["matches"][0]["baseline_sd"] > 0
    mixed = run("universal", "--by-layer", "--min-stability", 0.9, ok=False)
    assert mixed.exit_code == 2 and "--by-layer counts every neuron" in mixed.stderr


def test_ablation_reports_its_floor(store):
    home, db, run = store
    r = run("ablate", "a@0", "--dataset", "plain", "--neurons", "0.1,1.2", "--controls", 5, "--tokens", 256, "--quiet")
    assert "floor 0.167" in r.stdout and "smallest reachable p-value is 1/6" in r.stdout
    row = json.loads(run("ablations", "--format", "json").stdout)[-1]
    assert row["p_floor"] == pytest.approx(1 / 6) and row["control_min"] <= row["control_mean"] <= row["control_max"]
    deltas = json.loads(run("sql", "SELECT control_deltas FROM ablation", "--format", "json").stdout)[-1]
    values = np.array(json.loads(deltas["control_deltas"]))
    low, high = scipy.stats.t.interval(0.95, 4, loc=values.mean(), scale=scipy.stats.sem(values))
    assert row["control_ci_low"] == pytest.approx(low, abs=1e-7) and row["control_ci_high"] == pytest.approx(
        high, abs=1e-7
    )


def test_listings_read_each_set_from_its_widest_run(store):
    """A narrower run made later does not split a listing: every model is still read from the three-model run."""
    home, db, run = store
    wide = {r["run_id"] for r in json.loads(run("universal", "--format", "json").stdout)}
    assert len(wide) == 1
    run("correlate", "--dataset", "plain", "--step", 0, "--models", "a,b", "--threshold", 0.05, "--quiet")
    after = json.loads(run("universal", "--format", "json").stdout)
    assert {r["run_id"] for r in after} == wide and {r["model"] for r in after} == {"a", "b", "c"}
    runs = json.loads(run("sql", "SELECT max(id) AS id FROM correlation_run", "--format", "json").stdout)
    narrow = json.loads(run("universal", "--run", runs[0]["id"], "--format", "json").stdout)
    assert narrow and {r["model"] for r in narrow} <= {"a", "b"} and {r["run_id"] for r in narrow} != wide


def test_adaptive_draws_are_recorded_per_neuron_and_shown(store):
    """An adaptive run stores how many draws each neuron rests on, the draws themselves, and says so in its log;
    `actdb universal` shows the count."""
    from sqlalchemy import create_engine, text

    home, db, run = store
    out = run(
        "correlate",
        "--dataset",
        "plain",
        "--step",
        0,
        "--models",
        "a,b,c",
        "--threshold",
        0.05,
        "--seed",
        9,
        "--adaptive-draws",
        24,
        "--quiet",
    )
    assert "baseline draws per neuron 8-24" in out.stdout and "drew more than 8" in out.stdout, out.stdout
    assert re.search(r"adaptive phase [0-9.]+s, [0-9.]+ of the engine.s [0-9.]+ CPU-s", out.stdout), out.stdout
    engine = create_engine(db)
    with engine.connect() as c:
        run_id = c.execute(text("SELECT max(id) FROM correlation_run")).scalar_one()
        rows = c.execute(
            text("SELECT n_draws, excess_draws, excess_corr FROM universality WHERE run_id = :r AND NOT is_dead"),
            {"r": run_id},
        ).all()
    engine.dispose()
    counts = [n for n, _draws, _excess in rows]
    assert set(counts) <= {8, 16, 24} and 8 in counts and max(counts) > 8
    for n, draws, excess in rows:
        values = [float(v) for v in draws.split(",")]
        assert len(values) == n and excess == pytest.approx(np.mean(values), abs=1e-8)
    shown = json.loads(run("universal", "--run", run_id, "--threshold", 0.05, "--format", "json").stdout)
    assert shown and {r["n_draws"] for r in shown} <= {8, 16, 24} and {r["n_draws"] for r in shown} & {16, 24}
