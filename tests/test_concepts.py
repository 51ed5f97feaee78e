"""`actdb concept`: a planted concept neuron in tiny GPT-2 models is found in every seed and dropped by
--mask-concept-token; storage, views on SQLite and PostgreSQL, reruns, bad input and killed runs."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from sqlalchemy import text

from tests.conftest import cli_runner

PLANTED_TOKEN = " if"  # one token of the tiny tokenizer


def plant(src: Path, out: Path, layer: int, neuron: int) -> Path:
    """Copy a tiny GPT-2 and wire `layer.neuron` to fire on PLANTED_TOKEN only: residual dimension 0 carries
    1 for that token and 0 otherwise (no attention or MLP writes it), and the neuron reads dimension 0."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(src)
    tok = AutoTokenizer.from_pretrained(src)
    (token_id,) = tok(PLANTED_TOKEN, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        model.transformer.wte.weight[:, 0] = 0.0
        model.transformer.wte.weight[token_id, 0] = 1.0
        model.transformer.wpe.weight[:, 0] = 0.0
        for block in model.transformer.h:
            block.attn.c_proj.weight[:, 0] = 0.0
            block.attn.c_proj.bias[0] = 0.0
            block.mlp.c_proj.weight[:, 0] = 0.0
            block.mlp.c_proj.bias[0] = 0.0
        fc = model.transformer.h[layer].mlp.c_fc
        fc.weight[:, neuron] = 0.0
        fc.weight[0, neuron] = 5.0
        fc.bias[neuron] = -2.0
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def concepts_file(path: Path) -> Path:
    lines = [
        {"concept": "control", "positive": [f"while x{i}: x{i} -= 1" for i in range(12)]},
        {
            "concept": "if",
            "parents": ["control"],
            "positive": [f"a{i} = b if c else d{i}" for i in range(12)],
            "negative": [f"a{i} = b or c else d{i}" for i in range(12)],
        },
        {"concept": "loop", "parents": ["control"], "positive": [f"for k in range({i}): pass" for i in range(12)]},
        {"concept": "number", "positive": [f"n = {i * 7919}" for i in range(12)]},
        {"concept": "text", "positive": [f"s = 'word{i}'" for i in range(12)]},
    ]
    path.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    return path


@pytest.fixture(scope="module")
def concept_store(tmp_path_factory, tiny_models, tokenizer_dir, text_dir):
    root = tmp_path_factory.mktemp("concepts")
    a = plant(tiny_models["gpt2"], root / "a", 0, 5)
    b = plant(tiny_models["gpt2"], root / "b", 1, 17)
    home, db = root / "store", f"sqlite:///{root / 'store.sqlite'}"
    run = cli_runner(home, db)
    run("init")
    run("dataset", "add", "d", text_dir, "--tokenizer", tokenizer_dir, "--seq-len", 64, "--tokens", 1500)
    run("ingest", "a", "--steps", "0", "--dataset", "d", "--source", a, "--quiet")
    run("ingest", "b", "--steps", "0", "--dataset", "d", "--source", b, "--quiet")
    run("correlate", "--dataset", "d", "--step", 0, "--models", "a,b", "--quiet")
    run("concept", "add", "code", concepts_file(root / "code.jsonl"))
    base = ("concept", "run", "code", "--sets", "a@0,b@0", "--k", 5, "--permutations", 5)
    run(*base, "--mantel-permutations", 99, "--device", "cpu")
    run(*base, "--mantel-permutations", 99, "--device", "cpu", "--mask-concept-token")
    return root, home, db, run


def _rows(db: str, sql: str) -> list:
    from actdb.store.database.connection import make_engine

    engine = make_engine(db)
    with engine.connect() as conn:
        rows = [tuple(r) for r in conn.execute(text(sql))]
    engine.dispose()
    return rows


def test_the_planted_neuron_is_the_top_expert_in_every_seed_and_masking_drops_it(concept_store):
    from actdb.store.files.concept import read_concept_arrays

    _root, home, db, _run = concept_store
    runs = _rows(
        db,
        "SELECT m.name, r.mask_concept_token, r.path FROM concept_run r JOIN activation_set s ON "
        "s.id = r.set_id JOIN checkpoint c ON c.id = s.checkpoint_id JOIN model m ON m.id = c.model_id",
    )
    planted = {"a": 0 * 128 + 5, "b": 1 * 128 + 17}
    for model, masked, path in runs:
        arrays = read_concept_arrays(home / path)
        ap = arrays.ap[arrays.concepts.index("if")]
        if not masked:  # the planted neuron is a top expert (ties at AP 1 are allowed) in every seed
            assert ap[planted[model]] > 0.99 and ap[planted[model]] == ap.max()
        else:  # dropping the word's tokens leaves it at chance: it was a token detector
            assert ap[planted[model]] < 0.8
    top_masked = _rows(
        db,
        "SELECT model, layer, neuron FROM v_concept_experts WHERE concept = 'if' AND mask_concept_token = TRUE",
    )
    assert ("a", 0, 5) not in top_masked and ("b", 1, 17) not in top_masked
    scores = _rows(
        db,
        "SELECT best_ap, excess_ap, p_best, n_permutations, n_positive, n_negative FROM v_concept_scores "
        "WHERE concept = 'if' AND mask_concept_token = FALSE",
    )
    assert len(scores) == 2
    for best, excess, p, n_perm, n_pos, n_neg in scores:
        assert best > 0.99 and excess > 0 and n_perm == 5 and p == pytest.approx(1 / 6) and n_pos == n_neg == 12
    align = _rows(db, "SELECT reference, n_pairs, n_permutations FROM v_concept_alignment")
    assert {r[0] for r in align} == {"taxonomy"} and all(r[1] == 10 and r[2] == 99 for r in align)


def test_show_and_experts_commands(concept_store):
    _root, _home, _db, run = concept_store
    out = run("concept", "show", "code", "--format", "json").stdout
    (row,) = json.loads(out)
    assert row["step"] == 0 and row["models"] == 2 and row["concepts"] == 5
    assert row["twin_jaccard"] is not None and row["seed_seed_rsa"] is not None
    assert row["taxonomy_rsa"] is not None and row["jaccard_with_last"] == 1.0
    assert row["twin_tuning"] is not None and row["random_tuning"] is not None and "expert_universal_or" in row
    assert row["containment"] is not None and row["cophenetic_r"] is not None
    (by_layer,) = json.loads(
        run("concept", "show", "code", "--similarity", "jaccard", "--layer", 1, "--format", "json").stdout
    )
    assert by_layer["mean_best_ap"] == row["mean_best_ap"] and by_layer["seed_seed_rsa"] is not None
    r = run("concept", "show", "code", "--layer", 9, ok=False)
    assert "layer 9 does not exist (2 layers)" in r.stderr
    experts = json.loads(run("concept", "experts", "code", "if", "--model", "a", "--format", "json").stdout)
    assert len(experts) == 5 * 2  # the masked run's too
    assert experts[0]["ap"] > 0.99 and experts[0]["twins"].startswith("b:") and not experts[0]["masked"]


def test_show_reads_the_mantel_tests_concept_run_stored(concept_store):
    """`concept show` prints the Mantel p that `concept run --mantel-permutations` stored (the view's), and the
    count behind it; it tests afresh only where no stored test fits, with `concept run`'s default count."""
    from actdb.compute.concepts import MANTEL_PERMUTATIONS
    from actdb.compute.concepts.run import ConceptRequest

    _root, _home, db, run = concept_store
    stored = _rows(
        db,
        "SELECT p, n_permutations FROM v_concept_alignment WHERE reference = 'taxonomy' AND run_id IN (SELECT "
        "MAX(run_id) FROM v_concept_alignment WHERE mask_concept_token = FALSE AND pool = 'max' GROUP BY model)",
    )
    assert len(stored) == 2 and {n for _p, n in stored} == {99}
    (row,) = json.loads(run("concept", "show", "code", "--format", "json").stdout)
    assert row["taxonomy_p_max"] == pytest.approx(max(p for p, _n in stored)) and row["taxonomy_permutations"] == 99
    (jaccard,) = json.loads(run("concept", "show", "code", "--similarity", "jaccard", "--format", "json").stdout)
    assert jaccard["taxonomy_permutations"] == MANTEL_PERMUTATIONS == ConceptRequest.mantel_permutations
    assert jaccard["taxonomy_p_max"] >= 1 / (1 + MANTEL_PERMUTATIONS)
    (again,) = json.loads(run("concept", "show", "code", "--mantel-permutations", 9, "--format", "json").stdout)
    assert again["taxonomy_permutations"] == 9 and again["taxonomy_p_max"] >= 0.1
    assert again["taxonomy_rsa"] == pytest.approx(row["taxonomy_rsa"])  # the same test, fewer permutations


def test_a_rerun_is_reused_and_a_forced_rerun_is_identical(concept_store):
    from actdb.store.files.concept import read_concept_arrays

    _root, home, db, run = concept_store
    before = _rows(db, "SELECT id, path FROM concept_run WHERE status = 'complete' ORDER BY id")
    out = run("concept", "run", "code", "--sets", "a@0", "--k", 5, "--permutations", 5, "--mantel-permutations", 99)
    assert "already scored" in out.stdout
    first = read_concept_arrays(home / before[0][1])
    run(
        "concept",
        "run",
        "code",
        "--sets",
        "a@0",
        "--k",
        5,
        "--permutations",
        5,
        "--mantel-permutations",
        99,
        "--force",
        "--device",
        "cpu",
    )
    again = read_concept_arrays(home / before[0][1])
    np.testing.assert_array_equal(first.ap, again.ap)
    np.testing.assert_array_equal(first.null_best, again.null_best)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("concept", "run", "nope", "--sets", "a@0"), "unknown concept set 'nope'"),
        (("concept", "run", "code", "--sets", "zz@0"), "zz"),
        (("concept", "run", "code"), "--sets"),
        (("concept", "experts", "code", "dog"), "concept 'dog' is not in concept set"),
        (("concept", "show", "nope"), "unknown concept set"),
    ],
)
def test_bad_input_is_one_line_and_writes_nothing(concept_store, args, message):
    _root, _home, db, run = concept_store
    before = _rows(db, "SELECT COUNT(*) FROM concept_run")
    r = run(*args, ok=False)
    assert r.exit_code != 0 and message in r.stderr and r.stderr.count("\n") == 1
    assert _rows(db, "SELECT COUNT(*) FROM concept_run") == before


def test_reference_with_missing_concepts_and_model_without_weights(concept_store, tmp_path):
    root, _home, db, run = concept_store
    human = tmp_path / "human.csv"
    human.write_text("concept_a,concept_b,similarity\nif,loop,0.8\nif,number,0.1\n")
    before = _rows(db, "SELECT COUNT(*) FROM concept_run")
    r = run("concept", "run", "code", "--sets", "a@0", "--human", human, ok=False)
    assert "does not cover these concepts of the set: control, text" in r.stderr
    weights = list((root / "b").glob("*.safetensors"))
    moved = [shutil.move(w, tmp_path / w.name) for w in weights]
    try:
        r = run("concept", "run", "code", "--sets", "b@0", "--force", ok=False)
        assert "holds no model weights" in r.stderr
    finally:
        for w in moved:
            shutil.move(w, root / "b" / Path(w).name)
    assert _rows(db, "SELECT COUNT(*) FROM concept_run") == before
    bad = tmp_path / "bad.jsonl"
    bad.write_text(
        json.dumps({"concept": "a", "positive": ["x"], "parents": ["b"]})
        + "\n"
        + json.dumps({"concept": "b", "positive": ["y"], "parents": ["a"]})
        + "\n"
    )
    r = run("concept", "add", "bad", bad, ok=False)
    assert "cycle" in r.stderr and not _rows(db, "SELECT id FROM concept_set WHERE name = 'bad'")


def test_a_failed_run_leaves_no_sidecar_and_no_running_row(concept_store, monkeypatch):
    from actdb.compute.concepts import run as concept_run
    from actdb.store.config import StoreConfig
    from actdb.store.database.connection import Store

    root, home, db, _run = concept_store

    def killed(*_a, **_k):
        raise KeyboardInterrupt

    monkeypatch.setattr(concept_run, "score_all", killed)
    store = Store.open(StoreConfig.resolve(home, db))
    request = concept_run.ConceptRequest(name="code", sets="a@0", k=3, permutations=2, mantel_permutations=9)
    with pytest.raises(KeyboardInterrupt):
        concept_run.run_concepts(store, request, log=lambda _m: None)
    store.close()
    (status, path, n_scores) = _rows(
        db,
        "SELECT r.status, r.path, (SELECT COUNT(*) FROM concept_score s WHERE s.run_id = r.id) "
        "FROM concept_run r WHERE r.k = 3",
    )[0]
    assert status == "failed" and n_scores == 0
    assert not (home / path).exists() and not (home / (path + ".partial")).exists()


def test_views_agree_on_sqlite_and_postgresql(concept_store, pg_url, text_dir, tokenizer_dir):
    """The same concept run on PostgreSQL gives the same view rows (columns and values)."""
    root, home, db, _run = concept_store
    pg_home = root / "pg"
    run = cli_runner(pg_home, pg_url)
    run("init")
    run("dataset", "add", "d", text_dir, "--tokenizer", tokenizer_dir, "--seq-len", 64, "--tokens", 1500)
    run("ingest", "a", "--steps", "0", "--dataset", "d", "--source", root / "a", "--quiet")
    run("concept", "add", "code", root / "code.jsonl")
    run(
        "concept",
        "run",
        "code",
        "--sets",
        "a@0",
        "--k",
        5,
        "--permutations",
        5,
        "--mantel-permutations",
        99,
        "--device",
        "cpu",
    )
    newest = "(SELECT MAX(run_id) FROM v_concept_scores WHERE model = 'a' AND mask_concept_token = FALSE)"
    for view, order in (
        ("v_concept_experts", "concept, rank"),
        ("v_concept_scores", "concept"),
        ("v_concept_alignment", "reference"),
    ):
        where = f"run_id = {newest}"
        cols = "concept_set, model, step, hook, pool" if view == "v_concept_alignment" else "concept, model, step"
        lite = _rows(db, f"SELECT {cols} FROM {view} WHERE {where} ORDER BY {order}")
        pg = _rows(pg_url, f"SELECT {cols} FROM {view} WHERE {where} ORDER BY {order}")
        assert lite == pg and lite, view
    ap_lite = _rows(db, f"SELECT ap FROM v_concept_experts WHERE run_id = {newest} ORDER BY concept, rank")
    ap_pg = _rows(pg_url, f"SELECT ap FROM v_concept_experts WHERE run_id = {newest} ORDER BY concept, rank")
    np.testing.assert_allclose(np.array(ap_lite, float), np.array(ap_pg, float), atol=1e-6)


def test_python_api(concept_store):
    import actdb

    _root, home, db, _run = concept_store
    store = actdb.open(home=home, db=db)
    try:
        scores = store.concepts("code", model="b")
        assert set(scores["concept"]) == {"control", "if", "loop", "number", "text"}
        assert {"best_ap", "excess_ap", "n_permutations", "n_above_tau"} <= set(scores.columns)
        experts = store.concept_experts("code", concept="if", model="a")
        assert len(experts) == 5 * len(set(experts["run_id"])) and experts["rank"].min() == 1
        summary = store.concept_summary("code")
        assert list(summary["step"]) == [0] and summary["models"].iloc[0] == 2
    finally:
        store.close()


def test_python_api_refuses_unknown_names_as_the_cli_does(concept_store):
    import actdb
    from actdb.store.errors import ActdbError

    _root, home, db, run = concept_store
    cli = run("concept", "experts", "code", "nope", ok=False)
    store = actdb.open(home=home, db=db)
    try:
        for call, needle in (
            (lambda: store.concepts("nope"), "unknown concept set 'nope' (known: code)"),
            (lambda: store.concept_experts("nope", concept="if"), "unknown concept set 'nope'"),
            (lambda: store.concept_experts("code", concept="nope"), cli.stderr.strip().removeprefix("actdb: error: ")),
            (lambda: store.concepts("code", model="nope"), "unknown model 'nope'"),
            (lambda: store.concept_experts("code", concept="if", step=9), "no checkpoint at step 9"),
        ):
            with pytest.raises(ActdbError, match=re.escape(needle)):
                call()
    finally:
        store.close()


def test_report_has_the_concept_section(concept_store, tmp_path):
    from actdb.query.report import build_report
    from actdb.store.config import StoreConfig
    from actdb.store.database.connection import Store

    _root, home, db, _run = concept_store
    store = Store.open(StoreConfig.resolve(home, db), read_only=True)
    try:
        page = build_report(store, tmp_path / "report")
    finally:
        store.close()
    body = page.read_text()
    assert "Concept experts: code" in body
    for png in ("concepts_code_similarity.png", "concepts_code_dendrogram.png", "concepts_code_steps.png"):
        assert png in body and (tmp_path / "report" / png).stat().st_size > 1000


@pytest.mark.parametrize("pool", ["max", "mean"])
def test_pooling_never_reads_padding(pool):
    import torch

    from actdb.compute.concepts.run import _pool

    rng = np.random.default_rng(0)
    acts = rng.normal(size=(3, 5, 4)).astype(np.float32)
    keep = np.array([[1, 1, 1, 0, 0], [1, 0, 0, 0, 0], [0, 0, 0, 0, 0]], dtype=bool)
    acts[~keep] = 1e6  # padding holds huge values: a pool that read it would show them
    got = _pool(torch.tensor(acts), torch.tensor(keep), pool, in_place=True).numpy()
    for b in range(2):
        kept = acts[b][keep[b]]
        np.testing.assert_allclose(got[b], kept.max(axis=0) if pool == "max" else kept.mean(axis=0), rtol=1e-6)
    np.testing.assert_array_equal(got[2], 0.0)  # no counted position: response 0


def test_human_references_pairs_in_show_and_triplets_in_run(concept_store, tmp_path):
    from actdb.compute.concepts import MANTEL_PERMUTATIONS

    _root, _home, db, run = concept_store
    names = ["control", "if", "loop", "number", "text"]
    pairs = tmp_path / "pairs.csv"
    rows = [
        f"{a},{b},{1.0 if {a, b} <= {'control', 'if', 'loop'} else 0.1}"
        for i, a in enumerate(names)
        for b in names[i + 1 :]
    ]
    pairs.write_text("concept_a,concept_b,similarity\n" + "\n".join(rows) + "\nif,dog,0.5\n")
    (row,) = json.loads(run("concept", "show", "code", "--human", pairs, "--format", "json").stdout)
    assert row["human_rsa"] is not None and 0 < row["human_p_max"] <= 1
    triplets = tmp_path / "odd.csv"
    triplets.write_text("a,b,c,odd\nif,loop,number,number\ncontrol,if,text,text\nloop,control,number,number\n")
    run(
        "concept",
        "run",
        "code",
        "--sets",
        "a@0",
        "--k",
        5,
        "--permutations",
        2,
        "--mantel-permutations",
        50,
        "--human",
        triplets,
        "--device",
        "cpu",
    )
    (acc, n, p) = _rows(db, "SELECT triplet_accuracy, n_triplets, p FROM v_concept_alignment WHERE reference = 'odd'")[
        0
    ]
    assert n == 3 and acc in (0.0, 1 / 3, 2 / 3, 1.0) and p >= 1 / 51
    # show reads a's stored test against this reference (50 permutations) and tests b, scored without it, afresh;
    # a file of the same name with other content is another reference: both tested afresh
    (row,) = json.loads(run("concept", "show", "code", "--human", triplets, "--format", "json").stdout)
    assert row["human_permutations"] == 50 and row["human_p_max"] is not None
    edited = tmp_path / "edited" / "odd.csv"
    edited.parent.mkdir()
    edited.write_text(triplets.read_text().replace("if,loop,number,number", "if,loop,number,if"))
    (row,) = json.loads(run("concept", "show", "code", "--human", edited, "--format", "json").stdout)
    assert row["human_permutations"] == MANTEL_PERMUTATIONS and row["taxonomy_permutations"] == 50
    (row,) = json.loads(
        run("concept", "show", "code", "--human", edited, "--mantel-permutations", 60, "--format", "json").stdout
    )
    assert row["human_permutations"] == row["taxonomy_permutations"] == 60


def test_a_text_longer_than_the_context_is_refused(concept_store, tmp_path):
    _root, _home, db, run = concept_store
    long = tmp_path / "long.jsonl"
    lines = [{"concept": "a", "positive": ["x = 1 " * 200]}, {"concept": "b", "positive": ["y"]}]
    long.write_text("\n".join(json.dumps(x) for x in lines))
    run("concept", "add", "long", long)
    before = _rows(db, "SELECT COUNT(*) FROM concept_run")
    r = run("concept", "run", "long", "--sets", "a@0", ok=False)
    assert "longer than the context of a@0 (128)" in r.stderr
    assert _rows(db, "SELECT COUNT(*) FROM concept_run") == before


def test_a_run_whose_process_died_is_reaped_with_its_rows(concept_store):
    """A run killed mid-way (its row still `running`, owned by a dead pid) is reaped by the next command: the
    row becomes abandoned and its partial score rows go."""
    from sqlalchemy import update

    from actdb.store.config import StoreConfig
    from actdb.store.database.connection import Store
    from actdb.store.database.lifecycle import HOST, reap_abandoned
    from actdb.store.database.schema import ConceptRun, ConceptScore

    _root, home, db, _run = concept_store
    store = Store.open(StoreConfig.resolve(home, db))
    with store.session() as s:
        run_id = s.scalar(select_first_run())
        s.execute(update(ConceptRun).where(ConceptRun.id == run_id).values(status="running", host=HOST, pid=2**22 + 7))
    reap_abandoned(store)
    with store.session() as s:
        assert s.get(ConceptRun, run_id).status == "abandoned"
        assert s.query(ConceptScore).filter_by(run_id=run_id).count() == 0
    store.close()


def select_first_run():
    from sqlalchemy import func, select

    from actdb.store.database.schema import ConceptRun

    return select(func.min(ConceptRun.id)).where(ConceptRun.status == "complete", ConceptRun.mask_concept_token)


def test_view_tables_in_code_match_the_concept_views(concept_store, pg_url):
    from actdb.store.config import StoreConfig
    from actdb.store.database.connection import Store, make_engine
    from actdb.store.database.views import v_concept_alignment, v_concept_experts, v_concept_scores

    _root, _home, db, _run = concept_store
    Store.init(StoreConfig.resolve(_root / "pg-empty", pg_url)).close()
    for url in (db, pg_url):
        engine = make_engine(url)
        with engine.connect() as conn:
            for table in (v_concept_scores, v_concept_experts, v_concept_alignment):
                result = conn.execute(text(f"SELECT * FROM {table.name} WHERE 1 = 0"))
                assert list(result.keys()) == [c.name for c in table.columns], (url.split(":")[0], table.name)
        engine.dispose()
