"""The store never loses, swaps or mislabels data: bad input is one line with nothing written, names map to
files injectively, checkpoints keep their identity, dead runs are seen as dead, and a store can be moved."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from sqlalchemy import func, select, text

from actdb.store.config import StoreConfig, file_name_of
from actdb.store.database import tables
from actdb.store.database.connection import Store, make_engine
from actdb.store.database.schema import CorrelationRun, NeuronMatch, PersistenceRun, Universality
from tests.conftest import cli_call


@pytest.fixture(scope="module")
def sources(tmp_path_factory, tokenizer_dir):
    """`src/a/step-{0,1}` and `src/b/step-{0,1}`: four different tiny GPT-2s laid out like training checkpoints."""
    from actdb.store.ingest.zoo import save_tiny_model

    root = tmp_path_factory.mktemp("src")
    for k, (model, step) in enumerate([("a", 0), ("a", 1), ("b", 0), ("b", 1)]):
        save_tiny_model("gpt2", root / model / f"step-{step}", tokenizer_dir, seed=20 + k)
    return root


def _populate(home: Path, db: str, sources: Path, tokenizer_dir: Path, text_dir: Path) -> None:
    for args in (
        ("init",),
        ("dataset", "add", "d", text_dir, "--tokenizer", tokenizer_dir, "--seq-len", 64, "--tokens", 2500),
        ("ingest", "a", "--steps", "0,1", "--dataset", "d", "--source", sources / "a" / "step-{step}", "--quiet"),
        ("ingest", "b", "--steps", "0,1", "--dataset", "d", "--source", sources / "b" / "step-{step}", "--quiet"),
        ("correlate", "--dataset", "d", "--step", 1, "--models", "a,b", "--threshold", 0.05, "--quiet"),
    ):
        r = cli_call(home, db, *args)
        assert r.exit_code == 0, (args, r.stderr)


@pytest.fixture(params=["sqlite", "postgresql"])
def populated(request, tmp_path, sources, tokenizer_dir, text_dir):
    home = tmp_path / "store"
    db = f"sqlite:///{home}/actdb.sqlite" if request.param == "sqlite" else request.getfixturevalue("pg_url")
    _populate(home, db, sources, tokenizer_dir, text_dir)
    return home, db


def _snapshot(home: Path, db: str) -> tuple[dict, dict]:
    """Row counts of every table, and every file under the store folder (SQLite's own journal files aside)."""
    engine = make_engine(db)
    with engine.connect() as conn:
        rows = {
            t: conn.execute(select(func.count()).select_from(tables.metadata.tables[t])).scalar()
            for t in tables.metadata.tables
        }
        rows["alembic_version"] = conn.execute(text("SELECT version_num FROM alembic_version")).scalar()
    engine.dispose()
    files = {
        str(p.relative_to(home)): (p.stat().st_size, p.stat().st_mtime_ns)
        for p in home.rglob("*")
        if p.is_file() and not p.name.startswith("actdb.sqlite")
    }
    return rows, files


def test_bad_input_is_one_line_and_writes_nothing(populated, tmp_path, sources, tokenizer_dir, text_dir):
    from actdb.store.ingest.zoo import save_tiny_model

    home, db = populated
    big = str(2**63)
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "random.bin").write_bytes(os.urandom(4096))
    (tmp_path / "neurons.bin").write_bytes(b"\xff\xfe\x00\x01" * 64)
    (tmp_path / "latin1.txt").write_bytes("café".encode("latin-1"))
    short_ctx = save_tiny_model("gpt2", tmp_path / "short-ctx", tokenizer_dir, seed=3, n_ctx=32)
    cases = [
        (("neuron", f"a@{big}", "0.1"), "out of range"),
        (("universal", "--step", big), "out of range"),
        (("ingest", "a", "--step", big, "--dataset", "d"), "out of range"),
        (("correlate", "--step", big, "--models", "a,b"), "out of range"),
        (("correlate", "--step", 1, "--models", "a,b", "--seed", -1, "--force"), "--seed"),
        (("correlate", "--step", 1, "--models", "a,b", "--seed", big), "--seed"),
        (("correlate", "--step", 1, "--models", "a,b", "--threshold", "nan"), "threshold"),
        (("correlate", "--step", 1, "--models", "a,b", "--threshold", "inf"), "threshold"),
        (("correlate", "--step", 1, "--models", "a,b", "--threshold", -5), "threshold"),
        (("correlate", "--step", 1, "--models", "a,b", "--memory-budget", 0, "--force"), "must be positive"),
        (("correlate", "--step", 1, "--models", "a,b", "--memory-budget", "1KB", "--force"), "budget"),
        (("correlate", "--step", 1, "--models", "a,b", "--device", "cpu", "--precision", "tf32", "--force"), "CUDA"),
        (("ablate", "a@1", "--neurons", f"@{tmp_path / 'neurons.bin'}"), "not UTF-8"),
        (("ablate", "a@1", "--neurons", "1.x"), "malformed neuron"),
        (("ablate", "a@1", "--neurons", "9.1"), "out of range"),
        (("ingest", "a", "--steps", ",", "--dataset", "d"), "no steps"),
        (("ingest", "a", "--step", "+1", "--dataset", "d"), "malformed step"),
        (("ingest", "a", "--step", "\u0661", "--dataset", "d"), "malformed step"),
        (("export", "a@1", "--layer", 0, "--tokens", "9:3", "--out", tmp_path / "x.npy"), "START must be below"),
        (("ingest", "a", "--steps", "3,4", "--dataset", "d", "--source", sources / "a" / "step-0"), "same weights"),
        (("ablations", "--model", "nobody"), "unknown model"),
        (("ingest", "a", "--steps", "1,1", "--dataset", "d"), "listed twice"),
        (("ingest", "c", "--step", 0, "--dataset", "d", "--source", short_ctx), "reads at most 32"),
        (("ingest", "c", "--step", 0, "--dataset", "d", "--source", sources / "a" / "{stp}"), "only {step}"),
        (("ingest", "c", "--step", 0, "--dataset", "d", "--source", sources / "a" / "step-{step"), "malformed"),
        (("ingest", "c", "--step", 0, "--dataset", "d", "--source", sources, "--revision", "v{x}"), "only {step}"),
        (("ingest", "a", "--step", 2, "--dataset", "d", "--source", sources / "b" / "step-0"), "registered from"),
        (("ingest", "a", "--step", 2, "--dataset", "d", "--source", sources / "a" / "step-1"), "registered from"),
        (("ingest", "..", "--step", 0, "--dataset", "d", "--source", sources / "a" / "step-0"), "invalid model name"),
        (("ingest", "x/y", "--step", 0, "--dataset", "d", "--source", sources / "a" / "step-0"), "invalid model name"),
        (("ingest", "x,y", "--step", 0, "--dataset", "d", "--source", sources / "a" / "step-0"), "invalid model name"),
        (("ingest", "A", "--step", 0, "--dataset", "d", "--source", sources / "a" / "step-0"), "only in case"),
        (("dataset", "add", "", tmp_path / "latin1.txt", "--tokenizer", tokenizer_dir), "invalid dataset name"),
        (("dataset", "add", "e", tmp_path / "empty.txt", "--tokenizer", tokenizer_dir), "no text"),
        (("dataset", "add", "e", tmp_path / "random.bin", "--tokenizer", tokenizer_dir), "not"),
        (("dataset", "add", "e", sys.executable, "--tokenizer", tokenizer_dir), "binary file"),
        (("dataset", "add", "e", tmp_path / "latin1.txt", "--tokenizer", tokenizer_dir), "not UTF-8"),
        (
            (
                "dataset",
                "add",
                "e",
                text_dir / "doc00.txt",
                "--tokenizer",
                tokenizer_dir,
                "--seq-len",
                1_000_000,
            ),
            "too few for --seq-len",
        ),
        (("dataset", "add", "e", tmp_path, "--tokenizer", tokenizer_dir, "--seq-len", 100_000_000), "--seq-len"),
        (("dataset", "add", "d", tmp_path / "latin1.txt", "--tokenizer", tokenizer_dir), "already exists"),
        (("dataset", "add", "e", tmp_path / "nonexist.txt", "--tokenizer", tokenizer_dir), "no such file or folder"),
        (("dataset", "add", "e", "nonexist.jsonl", "--tokenizer", tokenizer_dir), "no such file or folder"),
        (("dataset", "add", "e", f"{tmp_path}-typo/docs", "--tokenizer", tokenizer_dir), "no such file or folder"),
        (("dataset", "add", "e", "someone/corpus", "--tokenizer", tokenizer_dir), "not a file or folder"),  # hub name
    ]
    before = _snapshot(home, db)
    for args, expected in cases:
        r = (
            cli_call(home, db, *args, "--quiet")
            if args[0] in ("ingest", "correlate", "ablate")
            else cli_call(home, db, *args)
        )
        assert r.exit_code in (1, 2), (args, r.stdout, r.stderr)
        assert expected in r.stderr, (args, r.stderr)
        assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr, (args, r.stderr)
        assert _snapshot(home, db) == before, args


def test_init_on_a_newer_schema_and_secret_urls(populated, tmp_path):
    home, db = populated
    engine = make_engine(db)
    with engine.begin() as conn:
        conn.execute(text("UPDATE alembic_version SET version_num = '9999'"))
    engine.dispose()
    for args in (("init",), ("status",)):
        r = cli_call(home, db, *args)
        assert r.exit_code == 1 and "newer" in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    r = cli_call(tmp_path, "postgresql://analyst:hunter2@127.0.0.1:1/db", "status")
    assert r.exit_code == 1 and "hunter2" not in r.stderr and "cannot reach" in r.stderr
    r = cli_call(tmp_path, "nosuchdialect://user:hunter2@host/db", "status")
    assert r.exit_code == 1 and "hunter2" not in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_names_map_to_files_injectively():
    names = ["s a", "s_a", "s%20a", "s.a", ".hidden", "..x", "é", "e\u0301", "A", "a"]
    files = [file_name_of(n) for n in names]
    assert len(set(files)) == len(files)
    assert all("/" not in f and not f.startswith(".") for f in files)


def test_similar_names_keep_their_own_files(tmp_path, sources, tokenizer_dir, text_dir):
    home, db = tmp_path / "store", f"sqlite:///{tmp_path / 'store' / 'actdb.sqlite'}"
    assert cli_call(home, db, "init").exit_code == 0
    for name in ("d a", "d_a"):
        r = cli_call(
            home,
            db,
            "dataset",
            "add",
            name,
            text_dir,
            "--tokenizer",
            tokenizer_dir,
            "--tokens",
            600,
            "--seq-len",
            64 if name == "d a" else 32,
        )
        assert r.exit_code == 0, r.stderr
    for name, model in (("s a", "a"), ("s_a", "b")):
        r = cli_call(
            home, db, "ingest", name, "--step", 0, "--dataset", "d a", "--source", sources / model / "step-0", "--quiet"
        )
        assert r.exit_code == 0, r.stderr
    r = cli_call(home, db, "check", "--quiet")
    assert r.exit_code == 0, r.stdout + r.stderr
    r = cli_call(home, db, "correlate", "--dataset", "d a", "--sets", "s a@0,s_a@0", "--quiet")
    assert r.exit_code == 0, r.stderr
    top = json.loads(cli_call(home, db, "universal", "--format", "json", "--threshold", 0).stdout)
    assert top and max(r["mean_max_corr"] for r in top) < 0.99  # two different models, not one file twice


def test_checkpoint_identity(tmp_path, sources, tokenizer_dir, text_dir):
    home, db = tmp_path / "store", f"sqlite:///{tmp_path / 'store' / 'actdb.sqlite'}"
    assert cli_call(home, db, "init").exit_code == 0
    assert (
        cli_call(
            home, db, "dataset", "add", "d", text_dir, "--tokenizer", tokenizer_dir, "--tokens", 600, "--seq-len", 64
        ).exit_code
        == 0
    )
    fixed = sources / "a" / "step-0"
    r = cli_call(home, db, "ingest", "m", "--steps", "0,1", "--dataset", "d", "--source", fixed, "--quiet")
    assert r.exit_code == 1 and "would all load the same weights" in r.stderr  # refused before loading anything
    assert json.loads(cli_call(home, db, "status", "--format", "json").stdout) == []
    for step in (0, 1):  # one step at a time the rule cannot be seen up front; the weights give it away
        r = cli_call(home, db, "ingest", "m", "--step", step, "--dataset", "d", "--source", fixed, "--quiet")
    assert r.exit_code == 1 and "exactly the weights of m@0" in r.stderr and "{step}" in r.stderr
    r = cli_call(
        home, db, "ingest", "m", "--step", 1, "--dataset", "d", "--source", sources / "b" / "step-0", "--quiet"
    )
    assert r.exit_code == 1 and "registered from" in r.stderr
    rows = json.loads(cli_call(home, db, "status", "--format", "json").stdout)
    assert [(x["model"], x["step"], x["status"]) for x in rows] == [("m", 0, "complete")]
    store = Store.open(StoreConfig.resolve(home, db))
    with store.session() as s:
        (ckpt,) = s.execute(text("SELECT source, weights_sha256 FROM checkpoint")).all()
    store.close()
    assert ckpt.source == str(fixed) and len(ckpt.weights_sha256) == 64


def _spawn(home: Path, db: str, *args: object) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "actdb.query.cli", "--home", str(home), "--db", db, *map(str, args)]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _kill_when_running(proc: subprocess.Popen, store: Store, table: type) -> int:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        with store.session() as s:
            row = s.scalar(select(table).where(table.status == "running"))
        if row is not None:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            return row.id
        time.sleep(0.005)
    raise AssertionError(f"never saw a running {table.__tablename__}: {proc.communicate()}")


@pytest.mark.parametrize("what", ["correlate", "persistence"])
def test_sigkilled_runs_are_abandoned_and_rerun_cleanly(populated, what):
    home, db = populated
    store = Store.open(StoreConfig.resolve(home, db))
    slow = ("--chunk-tokens", 64, "--memory-budget", "6MB")  # many passes of small chunks: time to kill it
    if what == "correlate":
        proc = _spawn(home, db, "correlate", "--dataset", "d", "--step", 0, "--models", "a,b", *slow, "--quiet")
        run_id = _kill_when_running(proc, store, CorrelationRun)
    else:
        assert (
            cli_call(
                home, db, "correlate", "--dataset", "d", "--step", 0, "--models", "a,b", "--quiet", "--threshold", 0.05
            ).exit_code
            == 0
        )
        proc = _spawn(home, db, "persistence", "--model", "a", "--quiet")
        pers_id = _kill_when_running(proc, store, PersistenceRun)
    store.close()
    listing = cli_call(home, db, "runs", "--format", "json")  # any later command reaps the dead run
    assert listing.exit_code == 0
    store = Store.open(StoreConfig.resolve(home, db))
    with store.session() as s:
        assert s.scalar(select(func.count()).where(CorrelationRun.status == "running")) == 0
        assert s.scalar(select(func.count()).where(PersistenceRun.status == "running")) == 0
        if what == "correlate":
            assert s.get(CorrelationRun, run_id).status == "abandoned"
            for table in (NeuronMatch, Universality):
                assert s.scalar(select(func.count()).select_from(table).where(table.run_id == run_id)) == 0
        else:
            assert s.get(PersistenceRun, pers_id).status == "abandoned"
    store.close()
    again = cli_call(
        home,
        db,
        what,
        *(
            ("--dataset", "d", "--step", 0, "--models", "a,b", "--quiet")
            if what == "correlate"
            else ("--model", "a", "--quiet")
        ),
    )
    assert again.exit_code == 0, again.stderr
    runs = json.loads(cli_call(home, db, "runs", "--format", "json").stdout)
    assert all(r["status"] in ("complete", "abandoned") for r in runs)


def test_partial_rows_of_a_dead_run_are_removed(populated):
    home, db = populated
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(dead.stdout)
    store = Store.open(StoreConfig.resolve(home, db))
    with store.session() as s:
        done = s.scalar(select(CorrelationRun).where(CorrelationRun.status == "complete"))
        s.execute(
            text("UPDATE correlation_run SET status = 'running', host = :h, pid = :p WHERE id = :i"),
            {"h": __import__("socket").gethostname(), "p": pid, "i": done.id},
        )
    store.close()
    r = cli_call(home, db, "universal", "--format", "json")
    assert r.exit_code == 1 and "no universality results" in r.stderr
    store = Store.open(StoreConfig.resolve(home, db))
    with store.session() as s:
        assert s.get(CorrelationRun, done.id).status == "abandoned"
        assert s.scalar(select(func.count()).select_from(NeuronMatch).where(NeuronMatch.run_id == done.id)) == 0
    store.close()


def test_identical_concurrent_correlations_compute_once(populated):
    home, db = populated
    args = ("correlate", "--dataset", "d", "--step", 0, "--models", "a,b", "--chunk-tokens", 64, "--quiet")
    procs = [_spawn(home, db, *args) for _ in range(2)]
    outs = [p.communicate(timeout=180) for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    store = Store.open(StoreConfig.resolve(home, db))
    with store.session() as s:
        runs = s.scalars(select(CorrelationRun).where(CorrelationRun.status == "complete")).all()
    store.close()
    assert len(runs) == 2  # step 1 from the fixture, step 0 exactly once
    assert sum("already holds" in o for o, _e in outs) == 1


def test_store_can_be_copied_and_moved(tmp_path, sources, tokenizer_dir, text_dir):
    home = tmp_path / "original"
    _populate(home, f"sqlite:///{home}/actdb.sqlite", sources, tokenizer_dir, text_dir)
    from actdb.store.ingest.zoo import save_tiny_model

    save_tiny_model("gpt2", home / "zoo" / "c" / "step-0", tokenizer_dir, seed=30)  # a model kept inside the store
    zoo = ("ingest", "c", "--step", 0, "--dataset", "d", "--source", home / "zoo" / "c" / "step-{step}", "--quiet")
    assert cli_call(home, f"sqlite:///{home}/actdb.sqlite", *zoo).exit_code == 0
    copy = tmp_path / "copy"
    shutil.copytree(home, copy)
    moved = tmp_path / "moved"
    home.rename(moved)  # the original place is gone; neither store may depend on it
    for place in (copy, moved):
        db = f"sqlite:///{place}/actdb.sqlite"
        status = json.loads(cli_call(place, db, "status", "--format", "json").stdout)
        assert {r["status"] for r in status} == {"complete"}
        assert cli_call(place, db, "check", "--quiet").exit_code == 0
        r = cli_call(place, db, "correlate", "--dataset", "d", "--step", 0, "--models", "a,b", "--quiet")
        assert r.exit_code == 0, r.stderr
        out = place / "x.npy"
        assert cli_call(place, db, "export", "a@1", "--layer", 0, "--tokens", "0:10", "--out", out).exit_code == 0
        recorded = json.loads(
            cli_call(place, db, "sql", "SELECT source FROM model WHERE name = 'c'", "--format", "json").stdout
        )
        assert recorded == [{"source": "store:zoo/c/step-{step}"}]
        r = cli_call(place, db, "ablate", "c@0", "--neurons", "0.1", "--controls", 1, "--tokens", 64, "--quiet")
        assert r.exit_code == 0, r.stderr  # loads the model from the store's new place
        again = (*zoo[:-2], place / "zoo" / "c" / "step-{step}", "--quiet")
        assert "already complete" in cli_call(place, db, *again).stdout
    (copy / "activations" / "b" / "step-1" / "d.mlp.post.h5").unlink()
    db = f"sqlite:///{copy}/actdb.sqlite"
    status = json.loads(cli_call(copy, db, "status", "--format", "json").stdout)
    assert {(r["model"], r["step"]): r["status"] for r in status}[("b", 1)] == "missing"
    r = cli_call(copy, db, "check", "--quiet", "--format", "json")
    assert r.exit_code == 1 and [p["problem"] for p in json.loads(r.stdout)] == ["file missing"]


def test_a_tokenizer_inside_the_store_moves_with_it(tmp_path, tokenizer_dir, text_dir, monkeypatch):
    """A dataset's tokenizer kept in the store is recorded `store:<relative path>` (typed absolute or relative to
    the working folder), so texts and examples decode from the store's new place; a dataset recorded before,
    with an absolute path, loads from it while it exists and is a one-line error (and a check problem) once gone."""
    from actdb.store.ingest.zoo import save_tiny_model

    home = tmp_path / "original"
    shutil.copytree(tokenizer_dir, home / "zoo" / "tokenizer")
    save_tiny_model("gpt2", home / "zoo" / "c" / "step-0", home / "zoo" / "tokenizer", seed=31)
    run = lambda place, *args: cli_call(place, f"sqlite:///{place}/actdb.sqlite", *args)  # noqa: E731
    assert run(home, "init").exit_code == 0
    tokens = ("--seq-len", 64, "--tokens", 640)
    assert run(home, "dataset", "add", "d", text_dir, "--tokenizer", home / "zoo" / "tokenizer", *tokens).exit_code == 0
    monkeypatch.chdir(home)
    assert run(home, "dataset", "add", "typed", text_dir, "--tokenizer", "zoo/tokenizer", *tokens).exit_code == 0
    monkeypatch.chdir(tmp_path)
    r = run(home, "ingest", "c", "--step", 0, "--dataset", "d", "--source", home / "zoo" / "c" / "step-{step}")
    assert r.exit_code == 0 and "explained" in r.stdout, r.stderr
    moved = tmp_path / "moved"
    home.rename(moved)
    recorded = json.loads(run(moved, "sql", "SELECT tokenizer FROM dataset ORDER BY name", "--format", "json").stdout)
    assert recorded == [{"tokenizer": "store:zoo/tokenizer"}] * 2
    try_text = ("activations", "c@0", "--text", "for i in range(3):", "--neurons", "0.1", "--format", "json")
    r = run(moved, *try_text)
    assert r.exit_code == 0, r.stderr
    assert "".join(t["token"][1:-1] for t in json.loads(r.stdout)) == "for i in range(3):"  # each token quoted
    assert run(moved, "examples", "c@0", "--force").exit_code == 0
    assert run(moved, "check", "--quiet").exit_code == 0

    engine = make_engine(f"sqlite:///{moved}/actdb.sqlite")

    def record(tokenizer: Path) -> None:  # as a store written before tokenizers were recorded store-relative
        with engine.begin() as conn:
            conn.execute(text("UPDATE dataset SET tokenizer = :t WHERE name = 'd'"), {"t": str(tokenizer)})

    record(moved / "zoo" / "tokenizer")
    assert run(moved, *try_text).exit_code == 0 and run(moved, "examples", "c@0", "--force").exit_code == 0
    record(home / "zoo" / "tokenizer")  # the folder it was recorded in is gone
    r = run(moved, *try_text)
    assert r.exit_code == 1 and r.stderr.strip().splitlines() == [
        f"actdb: error: the files of the tokenizer of dataset d are gone: {home}/zoo/tokenizer does not exist"
    ]
    r = run(moved, "check", "--quiet", "--format", "json")
    assert r.exit_code == 1 and [(p["kind"], p["name"]) for p in json.loads(r.stdout)] == [("dataset tokenizer", "d")]
    engine.dispose()


def test_check_finds_corrupt_files(tmp_path, sources, tokenizer_dir, text_dir):
    home = tmp_path / "store"
    db = f"sqlite:///{home}/actdb.sqlite"
    _populate(home, db, sources, tokenizer_dir, text_dir)
    path = home / "activations" / "a" / "step-0" / "d.mlp.post.h5"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    r = cli_call(home, db, "check", "--quiet", "--format", "json")
    assert r.exit_code == 1
    (problem,) = json.loads(r.stdout)
    assert problem["name"] == "a@0 on d" and "corrupt" in problem["problem"]
    assert cli_call(home, db, "check", "--quick", "--quiet").exit_code == 0  # shapes and headers are still right
