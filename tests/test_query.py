"""Query CLI, analyst views on SQLite and PostgreSQL, read-only SQL, export, report and the Python API."""

from __future__ import annotations

import io
import json
import shutil

import numpy as np
import pytest
from sqlalchemy import text

import actdb
from actdb.store.database.connection import make_engine
from actdb.store.files.activation import ActivationReader
from actdb.store.files.token import TokenDataset
from tests.conftest import cli_call, fresh_pg_database

VIEWS = [
    "v_universal_neurons",
    "v_universal_by_layer",
    "v_neuron_matches",
    "v_persistence",
    "v_ablation_summary",
    "v_neuron_history",
    "v_similarity",
    "v_neuron_explanations",
    "v_neuron_families",
    "v_trajectories",
    "v_trajectory_points",
    "v_robustness_by_step",
    "v_robustness_controls",
]


def _populate(home, db, tokenizer_dir, text_dir, a_src, b_src):
    steps = [
        ("init",),
        ("dataset", "add", "d", text_dir, "--tokenizer", tokenizer_dir, "--seq-len", 64, "--tokens", 2500),
        # steps 0 and 1 share their weights on purpose (persistence of an unchanged model is 1): --force says so
        ("ingest", "a", "--steps", "0,1", "--dataset", "d", "--source", a_src, "--quiet", "--identical-weights"),
        ("ingest", "b", "--steps", "0,1", "--dataset", "d", "--source", b_src, "--quiet", "--identical-weights"),
        ("correlate", "--dataset", "d", "--step", 0, "--models", "a,b", "--threshold", 0.05, "--quiet"),
        ("correlate", "--dataset", "d", "--step", 1, "--models", "a,b", "--threshold", 0.05, "--quiet"),
        (
            "correlate",
            "--dataset",
            "d",
            "--step",
            1,
            "--models",
            "a,b",
            "--threshold",
            0.05,
            "--control",
            "token",
            "--quiet",
        ),
        ("persistence", "--model", "a", "--quiet"),
        ("similarity", "--models", "a,b", "--steps", "0,1", "--baseline-draws", 1, "--quiet"),
        # one dataset: measured on the sequences that selected the neurons, which the default refuses
        (
            "ablate",
            "a@1",
            "--neurons",
            "universal:1",
            "--controls",
            2,
            "--each",
            "--tokens",
            600,
            "--in-sample",
            "--quiet",
        ),
        ("predictions", "a@0", "a@1", "b@0", "b@1", "--dataset", "d", "--quiet"),
        ("trajectories", "--models", "a,b", "--steps", "0,1"),
        ("robustness", "run", "--models", "a,b", "--steps", 1, "--ablate", "1.3,1.7", "--contexts", 2, "--controls", 2),
    ]
    for args in steps:
        r = cli_call(home, db, *args)
        assert r.exit_code == 0, (args, r.stderr)


@pytest.fixture(scope="module")
def sources(tmp_path_factory, tokenizer_dir, tiny_models):
    from actdb.store.ingest.zoo import save_tiny_model

    root = tmp_path_factory.mktemp("srcs")
    a = root / "a"
    shutil.copytree(tiny_models["gpt2"], a)
    return a, save_tiny_model("gpt2", root / "b", tokenizer_dir, seed=5)


@pytest.fixture(scope="module")
def lite(tmp_path_factory, tokenizer_dir, text_dir, sources):
    home = tmp_path_factory.mktemp("lite")
    db = f"sqlite:///{home}/actdb.sqlite"
    _populate(home, db, tokenizer_dir, text_dir, *sources)
    return home, db


@pytest.fixture(scope="module")
def pg(tmp_path_factory, tokenizer_dir, text_dir, sources):
    with fresh_pg_database("actdb_q") as db:
        home = tmp_path_factory.mktemp("pg")
        _populate(home, db, tokenizer_dir, text_dir, *sources)
        yield home, db


def _norm(value):
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, float | int):
        return round(float(value), 9)
    return value


def _view_rows(db, view):
    engine = make_engine(db)
    with engine.connect() as conn:
        result = conn.execute(text(f"SELECT * FROM {view}"))
        keep = [i for i, k in enumerate(result.keys()) if k != "created_at"]
        keys = [list(result.keys())[i] for i in keep]
        rows = [tuple(None if r[i] is None else _norm(r[i]) for i in keep) for r in result]
    engine.dispose()
    return keys, sorted(rows, key=repr)


def test_views_return_the_same_rows_on_sqlite_and_postgresql(lite, pg):
    for view in VIEWS:
        keys_l, rows_l = _view_rows(lite[1], view)
        keys_p, rows_p = _view_rows(pg[1], view)
        assert keys_l == keys_p, view
        assert rows_l, f"{view} is empty: the fixture must exercise it"
        assert len(rows_l) == len(rows_p), view
        for a, b in zip(rows_l, rows_p, strict=True):
            for x, y in zip(a, b, strict=True):
                if isinstance(x, float) or isinstance(y, float):
                    assert float(x) == pytest.approx(float(y), abs=1e-6), view
                else:
                    assert x == y, view


def test_view_tables_in_code_match_the_views_in_the_database(lite, pg):
    from actdb.store.database.views import VIEWS as CODE_VIEWS

    for url in (lite[1], pg[1]):
        engine = make_engine(url)
        with engine.connect() as conn:
            for table in CODE_VIEWS.tables.values():
                result = conn.execute(text(f"SELECT * FROM {table.name} WHERE 1 = 0"))
                assert list(result.keys()) == [c.name for c in table.columns], (url.split(":")[0], table.name)
        engine.dispose()


def test_universal_listing_formats(lite):
    home, db = lite
    r = cli_call(home, db, "universal", "--model", "a", "--step", 1, "--format", "json")
    rows = json.loads(r.stdout)
    assert r.exit_code == 0 and rows and all(x["excess_corr"] > 0.05 for x in rows)
    assert {"model", "step", "layer", "neuron", "excess_corr", "mean_max_corr", "mean_baseline", "act_kurtosis"} <= set(
        rows[0]
    )
    assert rows == sorted(rows, key=lambda x: -x["excess_corr"])
    one = json.loads(
        cli_call(
            home, db, "universal", "--model", "a", "--step", 1, "--layer", 1, "--limit", 2, "--format", "json"
        ).stdout
    )
    assert len(one) <= 2 and all(x["layer"] == 1 for x in one)
    strict = json.loads(cli_call(home, db, "universal", "--model", "a", "--threshold", 0.3, "--format", "json").stdout)
    assert all(x["excess_corr"] > 0.3 for x in strict)
    by_layer = json.loads(cli_call(home, db, "universal", "--by-layer", "--format", "json").stdout)
    assert {(x["model"], x["step"]) for x in by_layer} == {("a", 0), ("a", 1), ("b", 0), ("b", 1)}
    assert all(
        x["n_neurons"] == 128 and x["pct_universal"] == pytest.approx(100 * x["n_universal"] / 128) for x in by_layer
    )
    csv = cli_call(home, db, "universal", "--control", "token", "--format", "csv")
    assert csv.exit_code == 0 and csv.stdout.startswith("model,step,dataset,hook,layer,neuron")
    table = cli_call(home, db, "universal", "--by-layer")
    assert "pct_universal" in table.stdout.splitlines()[0]


def test_neuron_story(lite):
    home, db = lite
    r = cli_call(home, db, "neuron", "a@1", "1.3", "--format", "json")
    assert r.exit_code == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["statistics"][0]["count"] > 0
    assert {m["other_model"] for m in doc["matches"]} >= {"b"}
    assert {h["step"] for h in doc["history"]} == {0, 1}
    assert doc["self_correlation"][0]["self_corr"] == pytest.approx(1.0, abs=1e-5)
    assert "emergence_step" in doc["history"][0]
    text_out = cli_call(home, db, "neuron", "a@1", "1.3")
    assert "matches of a@1 1.3" in text_out.stdout


def test_listings(lite):
    home, db = lite
    runs = json.loads(cli_call(home, db, "runs", "--format", "json").stdout)
    assert {r["kind"] for r in runs} == {"cross_model", "within_model", "similarity"}
    assert all(r["status"] == "complete" for r in runs)
    abl = json.loads(cli_call(home, db, "ablations", "--format", "json").stdout)
    assert abl[0]["n_controls"] == 2 and abl[0]["model"] == "a"
    pers = json.loads(cli_call(home, db, "persistence", "--format", "json").stdout)
    assert len(pers) == 2


def test_query_errors(lite, tmp_path):
    home, db = lite
    runs = json.loads(cli_call(home, db, "sql", "SELECT id, kind FROM correlation_run", "--format", "json").stdout)
    by_kind = {r["kind"]: r["id"] for r in runs}
    step0 = min(r["id"] for r in runs if r["kind"] == "cross_model")
    cases = [
        ("unknown checkpoint", ("neuron", "zz@1", "0.1")),
        ("malformed neuron", ("neuron", "a@1", "7")),
        ("malformed checkpoint", ("neuron", "a1", "0.1")),
        ("does not exist", ("neuron", "a@1", "9.1")),
        ("no universality results for a@7", ("universal", "--model", "a", "--step", 7)),
        ("unknown model 'nobody'", ("universal", "--model", "nobody")),
        ("unknown model 'nobody'", ("persistence", "--model", "nobody")),
        ("there is no run 999", ("universal", "--run", 999)),
        ("is a similarity run", ("universal", "--run", by_kind["similarity"])),
        ("is a within-model run", ("ablate", "a@1", "--run", by_kind["within_model"], "--neurons", "universal")),
        ("is a cross-model correlation run", ("similarity", "--run", step0)),
        (f"run {step0} did not score a@1", ("universal", "--run", step0, "--model", "a", "--step", 1)),
        (f"run {step0} did not score a@1", ("ablate", "a@1", "--run", step0, "--neurons", "universal")),
    ]
    for expected, args in cases:
        r = cli_call(home, db, *args)
        assert r.exit_code in (1, 2) and expected in r.stderr and len(r.stderr.strip().splitlines()) == 1, (expected, r)
    empty = tmp_path / "empty"
    cli_call(empty, f"sqlite:///{empty}/actdb.sqlite", "init")
    r = cli_call(empty, f"sqlite:///{empty}/actdb.sqlite", "universal")
    assert r.exit_code == 1 and "actdb correlate" in r.stderr


@pytest.mark.parametrize("which", ["lite", "pg"])
def test_sql_is_read_only(which, request):
    home, db = request.getfixturevalue(which)
    r = cli_call(
        home,
        db,
        "sql",
        "SELECT model, COUNT(*) AS n FROM v_universal_neurons GROUP BY model ORDER BY model",
        "--format",
        "json",
    )
    assert r.exit_code == 0 and [x["model"] for x in json.loads(r.stdout)] == ["a", "b"]
    for stmt in ("DELETE FROM model", "INSERT INTO model (name) VALUES ('x')", "DROP TABLE neuron_stat"):
        bad = cli_call(home, db, "sql", stmt)
        assert bad.exit_code == 1 and "read-only" in bad.stderr and len(bad.stderr.strip().splitlines()) == 1
    count = cli_call(home, db, "sql", "SELECT COUNT(*) AS n FROM model", "--format", "json")
    assert json.loads(count.stdout)[0]["n"] == 2
    schema = cli_call(home, db, "sql", "--schema", "--format", "csv")
    assert "view,v_universal_by_layer,pct_universal" in schema.stdout


def _export_provenance(path) -> dict[str, str]:
    """An export's provenance as a reader finds it: Parquet key-value metadata, or the CSV's `# key: value` lines."""
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        return {k.decode(): v.decode() for k, v in pq.read_schema(path).metadata.items() if k != b"pandas"}
    lines = [line for line in path.read_text().splitlines() if line.startswith("# ")]
    return dict(line[2:].split(": ", 1) for line in lines)


def test_export_and_api(lite, tmp_path):
    import pandas as pd

    home, db = lite
    out = tmp_path / "x.npy"
    r = cli_call(home, db, "export", "a@1", "--layer", 1, "--neurons", "17,5", "--tokens", "10:110", "--out", out)
    assert r.exit_code == 0, r.stderr
    arr = np.load(out)
    with ActivationReader(home / "activations" / "a" / "step-1" / "d.mlp.post.h5") as reader:
        stored = reader.read_rows(0, reader.header.n_tokens, [1])[0]
    np.testing.assert_array_equal(arr, stored[10:110][:, [17, 5]])  # the order asked, not sorted
    assert json.loads((tmp_path / "x.npy.json").read_text())["tokens"] == "10:110"  # the .npy's sidecar
    ds = TokenDataset.load(home / "datasets" / "d.tokens.h5")
    stored_fingerprint = ds.fingerprint
    for suffix in ("csv", "parquet"):
        path = tmp_path / f"x.{suffix}"
        r = cli_call(home, db, "export", "a@1", "--layer", 1, "--neurons", "17,5", "--tokens", "60:70", "--out", path)
        assert r.exit_code == 0, r.stderr
        table = pd.read_csv(path, comment="#") if suffix == "csv" else pd.read_parquet(path)
        assert list(table.columns) == ["token_index", "sequence", "position", "token_id", "counted", "1.17", "1.5"]
        provenance = _export_provenance(path)
        assert provenance["model"] == "a" and provenance["step"] == "1" and provenance["hook"] == "mlp.post"
        assert provenance["dataset"] == "d" and provenance["dataset_fingerprint"] == stored_fingerprint
        assert provenance["layer"] == "1" and provenance["neurons"] == "17,5" and provenance["tokens"] == "60:70"
        assert provenance["actdb_version"] == actdb.__version__
        np.testing.assert_array_equal(table["token_id"], ds.tokens.reshape(-1)[60:70])
        np.testing.assert_array_equal(table["position"], np.arange(60, 70) % ds.seq_len)
        np.testing.assert_allclose(table[["1.17", "1.5"]].to_numpy(), stored[60:70][:, [17, 5]], rtol=1e-5)
    for args, why in (
        (("--neurons", "5,5"), "listed twice"),
        (("--tokens", "5:1"), "START must be below"),
        (("--tokens", "0:99999"), "outside"),
    ):
        bad = cli_call(home, db, "export", "a@1", "--layer", 0, *args, "--out", tmp_path / "y.csv")
        assert bad.exit_code == 1 and why in bad.stderr and len(bad.stderr.strip().splitlines()) == 1
    from actdb.query.api import ActdbStore

    api = ActdbStore.open(home, db)
    models = api.models()
    assert list(models["model"]) == ["a", "b"] and list(models["checkpoints"]) == [2, 2]  # steps 0 and 1
    assert models["layers"].dtype == "int64" and list(models["last_step"]) == [1, 1]
    cli_rows = json.loads(cli_call(home, db, "universal", "--model", "a", "--step", 1, "--format", "json").stdout)
    listed = api.universal(model="a", step=1)
    assert isinstance(listed, pd.DataFrame) and list(listed.columns)[:6] == [
        "model",
        "step",
        "dataset",
        "hook",
        "layer",
        "neuron",
    ]
    assert list(zip(listed["layer"], listed["neuron"], strict=True)) == [(r["layer"], r["neuron"]) for r in cli_rows]
    assert len(api.neuron("a@1", "0.2")["statistics"]) == 1
    acts = api.activations("a@1", 0, neurons=[9, 2], counted_only=True)
    assert acts.values.shape == (int(ds.mask.sum()), 2) and acts.counted.all()
    np.testing.assert_array_equal(acts.token_id, ds.tokens.reshape(-1)[ds.mask.reshape(-1)])
    assert api.sql("SELECT COUNT(*) AS n FROM dataset").to_dict("records") == [{"n": 1}]
    story = cli_call(home, db, "neuron", "a@1", "0.2", "--format", "csv")
    table = pd.read_csv(io.StringIO(story.stdout))
    assert table.columns[0] == "section" and {"statistics", "matches", "universality"} <= set(table["section"])


def test_report(lite, tmp_path):
    home, db = lite
    r = cli_call(home, db, "report", "--out", tmp_path / "rep")
    assert r.exit_code == 0, r.stderr
    page = (tmp_path / "rep" / "index.html").read_text()
    for png in (
        "universal_by_layer_none.png",
        "universal_by_layer_token.png",
        "excess_hist_none.png",
        "persistence.png",
        "ablations.png",
        "similarity.png",
        "similarity_contrast.png",
    ):
        assert (tmp_path / "rep" / png).stat().st_size > 1000 and png in page


HEAVY = ("torch", "transformers", "cupy", "alembic", "scipy", "pandas", "matplotlib", "dask", "sqlalchemy.orm")
FILES = ("numpy", "h5py")  # only for commands that read a file (a neuron's explanation, its set's token texts)


@pytest.mark.parametrize(
    ("args", "reads_files"),
    [
        (("--version",), False),
        (("--help",), False),
        (("universal", "--limit", "1"), False),
        (("runs",), False),
        (("status",), False),
        (("sql", "SELECT 1"), False),
        (("neuron", "a@1", "0.1"), True),
        (("families", "a@1"), True),
        (("families", "a@1", "--format", "json"), True),
        (("robustness", "show"), False),
    ],
)
def test_query_commands_import_no_heavy_machinery(lite, args, reads_files):
    """Query commands answer without importing torch, transformers, CuPy, Alembic, SciPy, pandas or the ORM,
    and without NumPy or h5py unless they read a file."""
    import subprocess
    import sys

    home, db = lite
    banned = HEAVY if reads_files else HEAVY + FILES
    code = (
        "import sys; from actdb.query.cli import _run; "
        f"rc = _run({['--home', str(home), '--db', db, *args]!r}); "
        f"print('RC', rc, sorted(m for m in {banned!r} if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120).stdout
    assert out.strip().splitlines()[-1] == "RC 0 []", out[-500:]
