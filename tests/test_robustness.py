"""`actdb robustness` on a real store: three tiny GPT-2 seeds at two steps, correlated, then ablated or edited.

Checks: the stored numbers agree with `actdb ablate` on the same set, a rerun with the same seed is identical,
generated and file edits run, `show` and the views read back, every refused input writes nothing, and a killed
run leaves nothing running."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from sqlalchemy import text

from tests.conftest import cli_runner

SEEDS = ("a", "b", "c")


@pytest.fixture(scope="module")
def zoo_store(tmp_path_factory, tokenizer_dir, text_dir):
    """Seeds a, b, c (steps 0 and 1, identical weights at both), ingested on dataset `d` and correlated."""
    from actdb.store.ingest.zoo import save_tiny_model

    root = tmp_path_factory.mktemp("robust")
    home, db = root / "store", f"sqlite:///{root / 'actdb.sqlite'}"
    run = cli_runner(home, db)
    run("init")
    run("dataset", "add", "d", text_dir, "--tokenizer", tokenizer_dir, "--seq-len", 48, "--tokens", 2400)
    for k, name in enumerate(SEEDS):
        src = save_tiny_model("gpt2", root / name, tokenizer_dir, seed=10 + k)
        run("ingest", name, "--steps", "0,1", "--dataset", "d", "--source", src, "--quiet", "--identical-weights")
    for step in (0, 1):
        run("correlate", "--dataset", "d", "--step", step, "--models", "a,b,c", "--threshold", 0.05, "--quiet")
    return root, home, db, run


def _sql(db: str, query: str) -> list:
    from sqlalchemy import create_engine

    engine = create_engine(db)
    with engine.connect() as conn:
        rows = conn.execute(text(query)).all()
    engine.dispose()
    return rows


def test_listed_neurons_agree_with_actdb_ablate(zoo_store):
    _root, _home, db, run = zoo_store
    r = run("robustness", "run", "--models", "a,b,c", "--steps", 1, "--ablate", "1.3,1.40,0.7", "--contexts", 6,
            "--controls", 0)  # fmt: skip
    assert "IR_norm" in r.stdout
    (per_seed,) = _sql(db, "SELECT per_seed FROM v_robustness_by_step WHERE n_controls = 0")[0]
    seeds = json.loads(per_seed)
    for seed in seeds:
        out = run("ablate", f"{seed['model']}@1", "--neurons", "1.3,1.40,0.7", "--method", "mean", "--controls", 0,
                  "--tokens", 6 * 48, "--quiet", "--force")  # fmt: skip
        base, ablated = _sql(db, "SELECT base_loss, ablated_loss FROM ablation ORDER BY id DESC LIMIT 1")[0]
        assert seed["clean_loss"] == pytest.approx(base, rel=1e-5)
        assert seed["intervened_loss"] == pytest.approx(ablated, rel=1e-5)
        assert "sequences 0:6" in out.stdout


def test_universal_ablation_with_controls_is_stored_and_rerun_identically(zoo_store):
    _root, _home, db, run = zoo_store
    args = ("robustness", "run", "--models", "a,b,c", "--ablate", "universal", "--contexts", 4, "--controls", 5,
            "--threshold", 0.05)  # fmt: skip
    first = run(*args)
    assert first.stdout.count("step ") == 2 and "controls (5)" in first.stdout and "floor 0.167" in first.stdout
    assert "note: with 5 controls" in first.stdout
    again = run(*args)
    assert "already measured" in again.stdout
    run(*args, "--force")
    rows = _sql(
        db,
        "SELECT run_id, step, ir_norm, ir_norm_ci_low, ir_norm_ci_high, control_mean, p_value, kl_mean, icc, "
        "fleiss_kappa, n_neurons FROM v_robustness_by_step WHERE spec = 'universal' ORDER BY run_id, step",
    )
    assert len(rows) == 4
    one, two = rows[:2], rows[2:]
    assert [r[1:] for r in one] == [r[1:] for r in two]  # the same seed gives the same numbers
    for r in one:
        assert r.ir_norm_ci_low <= r.ir_norm <= r.ir_norm_ci_high and 1 / 6 <= r.p_value <= 1
        sizes = json.loads(r.n_neurons)
        assert len(set(sizes)) == 1 and sizes[0] > 0  # equal set sizes across seeds
    controls = _sql(db, f"SELECT COUNT(*) FROM v_robustness_controls WHERE run_id = {one[0].run_id}")[0][0]
    assert controls == 2 * 5
    show = run("robustness", "show", "--run", one[0].run_id, "--format", "json")
    shown = json.loads(show.stdout)
    assert [x["step"] for x in shown] == [0, 1] and shown[0]["ir_norm"] == pytest.approx(one[0].ir_norm)
    assert "control" in run("robustness", "show", "--run", one[0].run_id, "--controls").stdout


def test_twins_rule_maps_one_seeds_universal_neurons_into_the_others(zoo_store):
    _root, _home, db, run = zoo_store
    run("robustness", "run", "--models", "a,b,c", "--steps", 1, "--ablate", "twins:a", "--contexts", 2,
        "--controls", 0, "--threshold", 0.05)  # fmt: skip
    (sizes,) = _sql(db, "SELECT n_neurons FROM v_robustness_by_step WHERE spec = 'twins:a'")[0]
    universal = _sql(
        db,
        "SELECT COUNT(*) FROM v_universality WHERE model = 'a' AND step = 1 AND control = 'none' "
        "AND excess_corr > 0.05",
    )[0][0]
    a, b, c = json.loads(sizes)
    assert a == universal and 1 <= b <= a and 1 <= c <= a  # twins shared by two neurons are kept once


def test_show_names_the_contexts_dataset_and_each_seeds_set_size(zoo_store, text_dir, tokenizer_dir):
    """`dataset` selected the neurons, `eval_dataset` gave the contexts: both in the views, the latter and the
    ablated set sizes in `robustness show`'s table (IR_norm of sets of different sizes is not one effect)."""
    _root, _home, db, run = zoo_store
    run("dataset", "add", "held", text_dir, "--tokenizer", tokenizer_dir, "--seq-len", 48, "--tokens", 480)
    run("robustness", "run", "--models", "a,b", "--steps", 1, "--ablate", "1.3,0.7", "--contexts", 2, "--controls",
        1, "--dataset", "d", "--eval-dataset", "held")  # fmt: skip
    (run_id, dataset, eval_dataset, sizes) = _sql(
        db,
        "SELECT run_id, dataset, eval_dataset, n_neurons FROM v_robustness_by_step WHERE spec = '1.3,0.7' "
        "AND eval_dataset = 'held'",
    )[0]
    assert (dataset, json.loads(sizes)) == ("d", [2, 2])
    controls = _sql(db, f"SELECT DISTINCT dataset, eval_dataset FROM v_robustness_controls WHERE run_id = {run_id}")
    assert controls == [("d", "held")]
    (shown,) = json.loads(run("robustness", "show", "--run", run_id, "--format", "json").stdout)
    assert shown["eval_dataset"] == "held" and json.loads(shown["n_neurons"]) == [2, 2]
    table = run("robustness", "show", "--run", run_id).stdout.splitlines()
    assert table[0].split()[:7] == ["run_id", "intervention", "spec", "eval_dataset", "step", "n_contexts", "n_neurons"]
    assert "held" in table[2] and "[2, 2]" in table[2]
    run("robustness", "run", "--models", "a,b", "--steps", 1, "--ablate", "1.3,0.7", "--contexts", 2, "--controls",
        1)  # fmt: skip
    in_sample = _sql(db, "SELECT eval_dataset FROM v_robustness_by_step WHERE spec = '1.3,0.7' AND run_id != "
                         f"{run_id}")  # fmt: skip
    assert in_sample == [("d",)]  # the default: the contexts come from the selecting dataset


def test_generated_and_file_edits(zoo_store, tmp_path):
    root, _home, db, run = zoo_store
    r = run("robustness", "run", "--models", "a,b", "--steps", 0, "--generate", "replace", "--contexts", 5,
            "--controls", 3, "--top-k", 20)  # fmt: skip
    assert "over 5 contexts" in r.stdout
    edits = tmp_path / "edits.jsonl"
    edits.write_text(
        json.dumps({"context": "def add(a, b):\n    return a + b", "edited": "def add(a, b):\n    return b + a"})
        + "\n"
        + json.dumps({"context": "print(x, y)", "edited": "print(y, x)"})
        + "\n"
    )
    r = run("robustness", "run", "--models", "a,b,c", "--steps", "0,1", "--edits", edits, "--controls", 2)
    assert "over 2 contexts" in r.stdout
    kinds = {row[0] for row in _sql(db, "SELECT intervention FROM v_robustness_by_step")}
    assert {"generate", "edits"} <= kinds
    assert _sql(db, "SELECT DISTINCT eval_dataset FROM v_robustness_by_step WHERE intervention = 'edits'") == [
        (None,)
    ]  # the file's contexts, not a dataset's


def test_refused_inputs_write_nothing(zoo_store, tmp_path, tokenizer_dir):
    root, _home, db, run = zoo_store
    from actdb.store.ingest.zoo import save_tiny_model

    before = _sql(db, "SELECT COUNT(*) FROM robustness_run")[0][0]

    def refused(*args: object) -> str:
        r = run("robustness", "run", *args, ok=False)
        assert r.exit_code == 1 and "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1
        return r.stderr

    assert "no step 5" in refused("--models", "a,b", "--steps", "0,5", "--ablate", "universal")
    assert "selects no neuron in a@1" in refused("--models", "a,b", "--steps", 1, "--ablate", "family:nothing")
    assert "one intervention" in refused("--models", "a,b", "--steps", 1)
    assert "no concept run has scored a@1" in refused("--models", "a,b", "--steps", 1, "--ablate", "experts:loop")
    assert "not one of the seeds" in refused("--models", "a,b", "--steps", 1, "--ablate", "twins:c")
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"context": "x = 1", "edited": "x = 1 + 2 + 3"}) + "\n")
    assert "equal lengths" in refused("--models", "a,b", "--steps", 0, "--edits", bad)
    # a seed with a larger vocabulary (the same tokenizer, so it ingests) has another output space
    wide = save_tiny_model("gpt2", root / "wide", tokenizer_dir, seed=3)
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(wide)
    model.resize_token_embeddings(model.config.vocab_size + 8)
    model.save_pretrained(wide)
    run("ingest", "wide", "--steps", 0, "--dataset", "d", "--source", wide, "--quiet")
    assert "different vocabulary sizes" in refused("--models", "a,wide", "--steps", 0, "--generate", "replace")
    assert _sql(db, "SELECT COUNT(*) FROM robustness_run")[0][0] == before


def test_a_killed_run_leaves_nothing_running(zoo_store):
    _root, home, db, run = zoo_store
    env = dict(os.environ, ACTDB_HOME=str(home), ACTDB_DATABASE_URL=db)
    args = ["robustness", "run", "--models", "a,b,c", "--ablate", "1.3,1.9", "--contexts", 8, "--controls", 40,
            "--seed", 7, "--batch-size", 2]  # fmt: skip
    proc = subprocess.Popen([sys.executable, "-m", "actdb.query.cli", *map(str, args)], env=env, start_new_session=True)
    try:
        deadline = time.time() + 120
        while time.time() < deadline:
            if _sql(db, "SELECT COUNT(*) FROM robustness_result r JOIN robustness_run x ON x.id = r.run_id "
                        "WHERE x.status = 'running'")[0][0]:  # fmt: skip
                break
            assert proc.poll() is None, "the run finished before it could be killed"
            time.sleep(0.2)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
    run("robustness", "show")  # any command reaps
    r = run("robustness", "run", *args[2:], "--steps", 1, "--controls", 2)
    assert "IR_norm" in r.stdout
    status = dict(_sql(db, "SELECT status, COUNT(*) FROM robustness_run GROUP BY status"))
    assert "running" not in status and status.get("abandoned") == 1
    orphan = _sql(
        db,
        "SELECT COUNT(*) FROM robustness_result r JOIN robustness_run x ON x.id = r.run_id "
        "WHERE x.status != 'complete'",
    )
    assert orphan[0][0] == 0


def test_robustness_reads_through_the_api(zoo_store):
    _root, home, db, run = zoo_store
    import actdb

    run("robustness", "run", "--models", "a,b", "--steps", 1, "--generate", "swap", "--contexts", 4, "--controls", 2)
    s = actdb.open(home, db)
    try:
        frame = s.robustness()
        controls = s.robustness(controls=True)
    finally:
        s.close()
    assert {"step", "ir_norm", "control_mean", "excess", "p_value"} <= set(frame.columns) and len(frame) >= 1
    assert len(controls) >= 2
    from actdb.query.report import build_report
    from actdb.store.config import StoreConfig
    from actdb.store.database.connection import Store

    store = Store.open(StoreConfig.resolve(home, db))
    try:
        page = build_report(store, _root / "report")
    finally:
        store.close()
    assert "IR_norm vs step" in page.read_text() and (page.parent / "robustness.png").stat().st_size > 0


def test_robustness_on_postgresql(pg_url, tmp_path, tokenizer_dir, text_dir, tiny_models):
    """The same run on PostgreSQL: rows, views and the show command read back."""
    run = cli_runner(tmp_path / "store", pg_url)
    run("init")
    run("dataset", "add", "d", text_dir, "--tokenizer", tokenizer_dir, "--seq-len", 48, "--tokens", 960)
    from actdb.store.ingest.zoo import save_tiny_model

    other = save_tiny_model("gpt2", tmp_path / "b", tokenizer_dir, seed=21)
    for name, src in (("a", tiny_models["gpt2"]), ("b", other)):
        run("ingest", name, "--steps", 0, "--dataset", "d", "--source", src, "--quiet")
    r = run("robustness", "run", "--models", "a,b", "--ablate", "0.1,1.2", "--contexts", 3, "--controls", 2)
    assert "step 0" in r.stdout
    shown = json.loads(run("robustness", "show", "--format", "json").stdout)
    assert len(shown) == 1 and shown[0]["n_controls"] == 2 and shown[0]["p_floor"] == pytest.approx(1 / 3)
    assert _sql(pg_url, "SELECT COUNT(*) FROM v_robustness_controls")[0][0] == 2
