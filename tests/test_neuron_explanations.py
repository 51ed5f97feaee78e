"""What a neuron does, through the store: examples streamed during ingest and rebuilt from the file, token and
position fractions, vocabulary statistics, decoded contexts in `actdb neuron`, and families by their rule."""

from __future__ import annotations

import json
import re
import shutil

import h5py
import numpy as np
import pytest
from sqlalchemy import select, update

from actdb.compute.explain.vocabulary import vocabulary_statistics
from actdb.store.config import StoreConfig
from actdb.store.database.connection import Store
from actdb.store.database.schema import NeuronExplanation, SetExplanation
from actdb.store.errors import ActdbError
from actdb.store.files.activation import ActivationReader
from actdb.store.files.explanation import explanation_path, read_explanation_group, unpack_strings
from actdb.store.files.token import TokenDataset
from actdb.store.ingest.model_loading import load_model
from actdb.store.ingest.token_datasets import load_tokenizer
from actdb.store.token_text import readable, stored_text, token_bytes
from tests.conftest import cli_runner


@pytest.fixture(scope="module")
def explained(tmp_path_factory, tokenizer_dir, text_dir, tiny_models):
    from actdb.store.ingest.zoo import save_tiny_model

    root = tmp_path_factory.mktemp("explained")
    a = root / "a"
    shutil.copytree(tiny_models["gpt2"], a)
    b = save_tiny_model("gpt2", root / "b", tokenizer_dir, seed=7)
    home, db = root / "store", f"sqlite:///{root}/store/actdb.sqlite"
    run = cli_runner(home, db)
    run("init")
    run("dataset", "add", "d", text_dir, "--tokenizer", tokenizer_dir, "--seq-len", 64, "--tokens", 3000)
    run("ingest", "a", "--step", 0, "--dataset", "d", "--source", a, "--quiet", "--top-k", 8)
    run("ingest", "b", "--step", 0, "--dataset", "d", "--source", b, "--quiet", "--top-k", 0)
    run("correlate", "--dataset", "d", "--step", 0, "--models", "a,b", "--baseline-draws", 2, "--quiet")
    return home, db, run, {"a": a, "b": b}


def _store(home, db) -> Store:
    return Store.open(StoreConfig.resolve(home, db))


def _exported(home, db, model):
    store = _store(home, db)
    path = next(p for p in home.glob(f"activations/{model}/**/*.h5") if not p.name.endswith(".explain.h5"))
    tokens = TokenDataset.load(next(home.glob("datasets/*")))
    with ActivationReader(path) as r:
        data = np.stack(r.read_rows(0, r.header.n_tokens)).astype(np.float64)  # (layers, tokens, d)
    store.close()
    return path, data, tokens


def test_streamed_examples_equal_an_argsort_of_the_stored_activations(explained):
    home, db, _run, _src = explained
    path, data, tokens = _exported(home, db, "a")
    mask = tokens.mask.reshape(-1)
    ex = read_explanation_group(explanation_path(path), "examples")
    assert ex["values"].shape == (data.shape[0], data.shape[2], 8)
    counted = np.flatnonzero(mask)
    for layer in range(data.shape[0]):
        x = data[layer][counted]  # (counted, d)
        order = np.argsort(-x, axis=0, kind="stable")[:8]
        expected = np.take_along_axis(x, order, axis=0).T  # (d, 8)
        np.testing.assert_array_equal(ex["values"][layer].astype(np.float64), expected)
        # each reported position is counted and holds the reported value (ties may swap equal values)
        got = ex["positions"][layer]
        assert mask[got].all()
        np.testing.assert_array_equal(data[layer][got, np.arange(data.shape[2])[:, None]], expected)


def test_examples_rebuilt_from_the_file_equal_the_streamed_ones_and_fractions_equal_a_groupby(explained):
    home, db, run, _src = explained
    path, data, tokens = _exported(home, db, "a")
    streamed = read_explanation_group(explanation_path(path), "examples")
    r = run("examples", "a@0", "--quiet")
    assert "already explained" in r.stdout
    run("examples", "a@0", "--top-k", 8, "--force", "--quiet")
    rebuilt = read_explanation_group(explanation_path(path), "examples")
    np.testing.assert_array_equal(rebuilt["values"], streamed["values"])
    mask = tokens.mask.reshape(-1)
    counted = np.flatnonzero(mask)
    ids = tokens.tokens.reshape(-1)[counted]
    pos = counted % tokens.seq_len
    store = _store(home, db)
    with store.session() as s:
        rows = {(e.layer, e.neuron): e for e in s.scalars(select(NeuronExplanation))}
    store.close()
    for layer in range(data.shape[0]):
        x = data[layer][counted]
        total = ((x - x.mean(axis=0)) ** 2).sum(axis=0)
        for groups, column in ((ids, "token_r2"), (pos, "position_r2")):
            _u, inv, counts = np.unique(groups, return_inverse=True, return_counts=True)
            sums = np.zeros((len(counts), x.shape[1]))
            np.add.at(sums, inv, x)
            between = (sums**2 / counts[:, None]).sum(axis=0) - x.sum(axis=0) ** 2 / len(x)
            for n in range(0, x.shape[1], 17):
                got = getattr(rows[(layer, n)], column)
                if total[n] > 0:
                    assert got == pytest.approx(between[n] / total[n], abs=1e-9)


def test_set_without_streamed_examples_is_explained_on_demand_with_vocabulary_from_its_weights(explained):
    home, db, run, src = explained
    store = _store(home, db)
    with store.session() as s:
        assert s.scalar(select(SetExplanation).where(SetExplanation.set_id == 2)) is None  # b ingested --top-k 0
    run("examples", "b@0", "--quiet")
    stats = vocabulary_statistics(load_model(str(src["b"]), None, "cpu"))
    with store.session() as s:
        rows = s.scalars(select(NeuronExplanation).where(NeuronExplanation.set_id == 2)).all()
    store.close()
    assert len(rows) == stats.mean.size
    for e in rows[::23]:
        assert e.vocab_kurtosis == pytest.approx(stats.kurtosis[e.layer, e.neuron], rel=1e-9)
        assert e.vocab_skew == pytest.approx(stats.skew[e.layer, e.neuron], rel=1e-9)
        assert (e.vocab_label or "") == stats.labels()[e.layer, e.neuron]


def test_neuron_shows_decoded_contexts_with_the_maximum_marked(explained, tokenizer_dir):
    home, db, run, _src = explained
    path, data, tokens = _exported(home, db, "a")
    doc = json.loads(run("neuron", "a@0", "1.5", "--examples", 3, "--format", "json").stdout)
    examples = doc["examples"]
    assert len(examples) == 3
    ex = read_explanation_group(explanation_path(path), "examples")
    tokenizer = load_tokenizer(str(tokenizer_dir))
    for rank, e in enumerate(examples):
        flat = e["sequence"] * tokens.seq_len + e["position"]
        assert flat == ex["positions"][1, 5, rank]
        assert e["activation"] == pytest.approx(float(data[1, flat, 5]))
        assert e["token"] == readable(token_bytes(tokenizer, [int(tokens.tokens[e["sequence"], e["position"]])])[0])
        assert "«" + e["token"] + "»" in e["context"]
    assert doc["explanation"][0]["token_r2"] is not None
    assert len(doc["top_tokens"]) > 0 and len(doc["vocabulary"]) == 10
    table = run("neuron", "a@0", "1.5").stdout
    assert "examples of a@0 1.5" in table and "«" in table
    strings = unpack_strings(read_explanation_group(explanation_path(path), "strings"))
    assert strings[:50] == [stored_text(raw) for raw in token_bytes(tokenizer, range(50))]


def test_token_text_is_readable_and_one_line_everywhere(explained):
    """Newline tokens show as ⏎ and bytes that are no character as <0xNN>: no raw newline, tab or '�' in the
    neuron's examples, top tokens or vocabulary, in JSON or in the table."""
    home, db, run, _src = explained
    seen = ""
    for neuron in range(0, 128, 9):
        doc = json.loads(run("neuron", "a@0", f"1.{neuron}", "--examples", 8, "--format", "json").stdout)
        texts = [
            str(row[key])
            for part in ("examples", "top_tokens", "vocabulary")
            for row in doc[part]
            for key in ("token", "context", "top_token", "bottom_token")
            if key in row
        ]
        assert not [t for t in texts if "\n" in t or "\t" in t or "\ufffd" in t], texts
        seen += "".join(texts)
        table = run("neuron", "a@0", f"1.{neuron}").stdout
        assert "\ufffd" not in table and all(line.count("|") != 1 for line in table.splitlines())
    assert "⏎" in seen  # standard-library source: newlines are among the contexts


def test_families_follow_their_printed_rule_on_a_hand_made_case(explained):
    home, db, run, _src = explained
    store = _store(home, db)
    e = NeuronExplanation
    universal = json.loads(run("families", "a@0", "--threshold", 0, "--format", "json").stdout)["neurons"]
    keys = [(r["layer"], r["neuron"]) for r in universal[:5]]
    assert len(keys) == 5
    cases = [  # (token_r2, position_r2, vocab_label) -> expected family
        ((0.9, 0.8, "prediction"), "token"),
        ((0.1, 0.6, "prediction"), "position"),
        ((0.1, 0.2, "prediction"), "prediction"),
        ((0.1, 0.2, "suppression"), "suppression"),
        ((0.49, 0.49, None), "unexplained"),
    ]
    hand = dict(zip(keys, cases, strict=True))
    with store.session() as s:
        for (layer, n), ((tr, pr, label), _fam) in hand.items():
            s.execute(
                update(e)
                .where(e.set_id == 1, e.layer == layer, e.neuron == n)
                .values(token_r2=tr, position_r2=pr, vocab_label=label)
            )
    store.close()
    doc = json.loads(run("families", "a@0", "--threshold", 0, "--format", "json").stdout)
    assert doc["rules"] == [
        "d: token if token_r2 >= 0.5; position if position_r2 >= 0.5; prediction if vocab excess kurtosis > 7 and "
        "skew > 0; suppression if that kurtosis and skew < 0; else unexplained"
    ]
    got = {(r["layer"], r["neuron"]): r["family"] for r in doc["neurons"]}
    assert {key: got[key] for key in hand} == {key: family for key, (_values, family) in hand.items()}
    for r in doc["neurons"]:  # every row follows the rule from its own values
        expect = (
            "token"
            if (r["token_r2"] or 0) >= 0.5
            else "position"
            if (r["position_r2"] or 0) >= 0.5
            else r["family"]
            if r["family"] in ("prediction", "suppression")
            else "unexplained"
        )
        assert r["family"] == expect
    layers = {row["layer"]: row for row in doc["by_layer"]}
    assert sum(v["universal"] for v in layers.values()) == len(doc["neurons"])
    table = run("families", "a@0", "--threshold", 0).stdout
    assert table.startswith("rule (d: token if") and "per layer" in table


def test_explanations_refuse_bad_input_in_one_line(explained):
    home, db, run, _src = explained
    for args, needle in (
        (("examples", "nosuch@0"), "unknown model"),
        (("examples", "a@0", "--top-k", 0), "0"),
        (("families", "a@0", "--threshold", 2), "threshold"),
        (("neuron", "a@0", "9.0"), "does not exist"),
    ):
        r = run(*args, ok=False)
        assert r.exit_code != 0 and needle in r.stderr and "Traceback" not in r.stderr, (args, r.stderr)
        assert len(r.stderr.strip().splitlines()) == 1


def test_api_returns_examples_explanations_and_families_as_frames(explained):
    import actdb

    home, db, _run, _src = explained
    api = actdb.open(home=home, db=db)
    try:
        ex = api.examples("a@0", "1.5", n=4)
        assert list(ex["rank"]) == [1, 2, 3, 4] and (ex["activation"].diff().dropna() <= 0).all()
        parts = api.explanation("a@0", "1.5")
        assert set(parts) == {"explanation", "examples", "top_tokens", "vocabulary"}
        every = api.explanations(model="a", step=0)
        assert len(every) == 2 * 128 and {"token_r2", "vocab_kurtosis", "family"} <= set(every.columns)
        assert set(api.families("a@0", threshold=0.0)["family"]) <= {
            "token",
            "position",
            "prediction",
            "suppression",
            "unexplained",
        }
    finally:
        api.close()


def test_api_refuses_what_the_store_lacks_as_the_cli_does(explained):
    """A typo in a notebook is an ActdbError naming what exists, never an empty frame that reads as "no
    results"."""
    import actdb

    home, db, _run, _src = explained
    api = actdb.open(home=home, db=db)
    try:
        for call, needle in (
            (lambda: api.examples("a@0", "5.1"), "neuron 5.1 does not exist (a has 2 layers x 128 neurons)"),
            (lambda: api.explanation("a@0", "1.9999"), "neuron 1.9999 does not exist"),
            (lambda: api.examples("a@3", "1.5"), "unknown checkpoint a@3"),
            (lambda: api.explanations(model="nope"), "unknown model 'nope'"),
            (lambda: api.explanations(model="a", step=3), "model 'a' has no step 3"),
            (lambda: api.explanations(step=3), "no checkpoint at step 3 (steps: 0)"),
            (lambda: api.explanations(hook="mlp.pre"), "no complete sets at hook mlp.pre"),
        ):
            with pytest.raises(ActdbError, match=re.escape(needle)):
                call()
        assert len(api.explanations(model="a", step=0, hook="mlp.post")) == 2 * 128
    finally:
        api.close()


def test_report_links_each_universal_neuron_to_its_page(explained, tmp_path):
    home, db, run, _src = explained
    run("report", "--out", tmp_path / "rep", "--threshold", 0)
    index = (tmp_path / "rep" / "index.html").read_text()
    pages = sorted((tmp_path / "rep" / "neurons").glob("*.html"))
    linked = set(re.findall(r'href="neurons/([^"]+)"', index))
    assert linked and linked <= {p.name for p in pages}
    # every page is reached: from the index, or as a twin in another page's best matches
    twins = {name for p in pages for name in re.findall(r'<td><a href="([^"/]+\.html)">', p.read_text())}
    assert twins and twins <= {p.name for p in pages} and {p.name for p in pages} <= linked | twins
    assert "Neuron families of universal neurons, per layer" in index and "unexplained" in index
    page = pages[0].read_text()
    for heading in ("Max-activating contexts", "Tokens with the highest mean activation", "Vocabulary", "across steps"):
        assert heading in page
    assert "<mark>" in page


def test_check_reads_explanation_files_through_their_checksums(explained, tmp_path):
    home, db, run, _src = explained
    r = run("check", ok=False)
    assert "explanation files" in r.stderr and r.exit_code == 0, r.stdout
    path, _data, _tokens = _exported(home, db, "a")
    target = explanation_path(path)
    saved = target.read_bytes()
    try:
        with h5py.File(target, "r") as f:
            offset = f["examples/values"].id.get_offset() or f["examples/values"].id.get_chunk_info(0).byte_offset
        raw = bytearray(saved)
        raw[offset + 5] ^= 0xFF
        target.write_bytes(bytes(raw))
        r = run("check", "--format", "json", ok=False)
        problems = json.loads(r.stdout)
        assert r.exit_code == 1 and any(p["kind"] == "explanations" for p in problems)
    finally:
        target.write_bytes(saved)


def test_a_missing_explanation_file_leaves_the_sql_summary(explained, tmp_path):
    home, db, run, _src = explained
    path, _data, _tokens = _exported(home, db, "a")
    target = explanation_path(path)
    moved = tmp_path / target.name
    target.rename(moved)
    try:
        doc = json.loads(run("neuron", "a@0", "1.5", "--format", "json").stdout)
        assert doc["explanation"] and doc["examples"] == []
        rows = json.loads(run("families", "a@0", "--threshold", 0, "--format", "json").stdout)["neurons"]
        assert rows and all(r["token"].startswith("'<") for r in rows if r["token"] is not None)
        r = run("check", ok=False)
        assert r.exit_code == 1 and "explanation file" in r.stdout
    finally:
        moved.rename(target)


def test_api_frames_are_typed_and_carry_what_the_cli_shows(explained):
    import actdb

    home, db, run, src = explained
    # a set that is never explained (b may be by now: another test builds its explanations)
    run(
        "ingest",
        "bare",
        "--step",
        0,
        "--dataset",
        "d",
        "--source",
        src["b"],
        "--quiet",
        "--top-k",
        0,
        "--identical-weights",
    )
    api = actdb.open(home=home, db=db)
    try:
        models = api.models()
        assert list(models["model"]) == ["a", "b", "bare"] and models["d_mlp"].dtype == "int64"
        story = api.neuron("a@0", "1.5", examples=3)
        cli = json.loads(run("neuron", "a@0", "1.5", "--examples", 3, "--format", "json").stdout)
        assert {"explanation", "examples", "top_tokens", "vocabulary", "statistics", "matches"} <= set(story)
        assert list(story["examples"]["context"]) == [e["context"] for e in cli["examples"]]
        assert story["explanation"]["token_r2"].iloc[0] == pytest.approx(cli["explanation"][0]["token_r2"])
        assert story["examples"]["sequence"].dtype == "int64" and story["examples"]["rank"].dtype == "int64"
        every = api.explanations(model="a", step=0)
        assert every["layer"].dtype == "int64" and every["top_token"].dtype in ("int64", "Int64")
        fam = api.families("a@0", threshold=0.0).set_index(["layer", "neuron"])
        both = every.set_index(["layer", "neuron"]).loc[fam.index]
        # one meaning of top_token: the id, as in the views and families(); its text in `token`
        assert list(both["top_token"]) == list(fam["top_token"]) and list(both["token"]) == list(fam["token"])
        view = api.sql("SELECT layer, neuron, top_token FROM v_neuron_explanations WHERE model = 'a' AND step = 0")
        assert every.merge(view, on=["layer", "neuron", "top_token"]).shape[0] == len(every)
        assert "top_token_id" not in every.columns
        assert every.columns.get_loc("token") == every.columns.get_loc("top_token") + 1
        assert all(t.startswith("'") and t.endswith("'") for t in every["token"].dropna())
        bare = api.neuron("bare@0", "0.1")  # no explanations: the sections are empty but typed
        assert len(bare["examples"]) == 0 and bare["examples"]["rank"].dtype == "int64"
        assert bare["top_tokens"]["mean_activation"].dtype == "float64"
    finally:
        api.close()


def test_report_histograms_say_what_they_plot(explained, tmp_path):
    home, db, run, _src = explained
    run("report", "--out", tmp_path / "rep", "--threshold", 0.05)
    index = (tmp_path / "rep" / "index.html").read_text()
    assert "Max correlation, rotation baseline and excess correlation (none control)" in index
    assert "<h2>Excess correlation (none control)</h2>" not in index  # the old title named the wrong quantity
    assert (tmp_path / "rep" / "excess_hist_none.png").stat().st_size > 10_000


def test_similarity_heatmaps_stay_readable_at_twelve_sets(tmp_path):
    from PIL import Image

    from actdb.query.report import SIMILARITY_METRICS, similarity_heatmaps

    keys = [(f"seed{k}", s) for k in range(4) for s in (50, 200, 800)]
    values = {(a, b, c, d): {"excess_corr": 0.5, "matched_corr": 0.4, "cka": 0.9} for a, b in keys for c, d in keys}
    name = similarity_heatmaps(values, list(SIMILARITY_METRICS), 1, tmp_path)
    width, height = Image.open(tmp_path / name).size
    # cells of at least 0.4 inch at 110 dpi: 12 rows of labels need ≥ 12 * 44 px per heatmap row
    assert height >= 2 * 12 * 44 * 0.9 and width >= 2 * 12 * 44 * 0.9
