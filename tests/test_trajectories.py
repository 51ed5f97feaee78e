"""Trajectories: the pairwise measures against plain NumPy references on random losses, the weight cosines against
the dense computation, MDS against a known configuration, and `actdb trajectories` end to end on tiny models
(stored rows, the view, the API, the report, bad input)."""

from __future__ import annotations

import json
from itertools import combinations

import numpy as np
import pytest
import torch

from actdb.compute.trajectories import math as tm
from actdb.store.errors import ActdbError
from tests.conftest import cli_runner


def _random_losses(rng, k=5, n=3000, shared=True):
    losses = rng.gamma(2.0, 1.5, (k, n)).astype(np.float32)
    losses[:, ::7] = np.round(losses[:, ::7], 1)  # exact ties on some targets
    mask = rng.random(n) < 0.1
    losses[:, mask] = np.nan
    if not shared:
        losses[rng.random((k, n)) < 0.05] = np.nan
    top1 = rng.integers(0, 6, (k, n)).astype(np.int32)
    return losses, top1


def _reference(la, lb, ta, tb, eps):
    """The issue's definitions, written out per pair."""
    c = np.isfinite(la) & np.isfinite(lb)
    a, b = la[c].astype(np.float64), lb[c].astype(np.float64)
    win = np.mean((a < b - eps) + 0.5 * (np.abs(a - b) <= eps))
    dis = np.mean(ta[c] != tb[c])
    mixture = -np.log((np.exp(-a) + np.exp(-b)) / 2)
    gain = np.mean((a + b) / 2) - np.mean(mixture)
    return win, dis, gain, int(c.sum())


@pytest.mark.parametrize("shared", [True, False])
@pytest.mark.parametrize("eps", [0.0, 0.05])
def test_pair_matrices_equal_numpy_references(shared, eps):
    rng = np.random.default_rng(3)
    losses, top1 = _random_losses(rng, shared=shared)
    m = tm.pair_matrices(losses, top1, eps=eps, chunk_elements=997)  # many uneven blocks
    k = len(losses)
    for a in range(k):
        for b in range(k):
            win, dis, gain, n = _reference(losses[a], losses[b], top1[a], top1[b], eps)
            assert m.count[a, b] == n
            assert m.win_rate[a, b] == pytest.approx(win, abs=1e-12)
            assert m.disagreement[a, b] == pytest.approx(dis, abs=1e-12)
            assert m.ensemble_gain[a, b] == pytest.approx(gain, rel=1e-9, abs=1e-12)
    assert np.array_equal(m.win_rate + m.win_rate.T, np.ones((k, k)))  # exactly, not approximately
    assert np.array_equal(np.diag(m.win_rate), np.full(k, 0.5))
    assert not np.diag(m.disagreement).any() and not np.diag(m.ensemble_gain).any()
    assert (m.ensemble_gain[~np.eye(k, dtype=bool)] > 0).all()  # a mixture never loses: log cosh(d/2) >= 0


def test_checkpoint_against_a_copy_of_itself():
    rng = np.random.default_rng(4)
    losses, top1 = _random_losses(rng, k=1)
    m = tm.pair_matrices(np.vstack([losses, losses]), np.vstack([top1, top1]))
    assert m.win_rate[0, 1] == 0.5 and m.disagreement[0, 1] == 0.0 and m.ensemble_gain[0, 1] == 0.0


def test_bradley_terry_satisfies_its_likelihood_equations():
    rng = np.random.default_rng(5)
    true = np.array([-1.0, -0.3, 0.0, 0.4, 1.2])
    k = len(true)
    games = np.full((k, k), 4000.0)
    np.fill_diagonal(games, 0)
    p = 1 / (1 + np.exp(-(true[:, None] - true[None, :])))
    wins = np.triu(rng.binomial(4000, p), 1).astype(float)
    wins = wins + np.triu(games - wins, 1).T
    s = tm.bradley_terry(wins, games, prior_games=0.0)
    expected = (games / (1 + np.exp(-(s[:, None] - s[None, :])))).sum(axis=1)
    assert expected == pytest.approx(wins.sum(axis=1), rel=1e-8)  # score equations of the maximum likelihood
    assert s == pytest.approx(true - true.mean(), abs=0.08)


def test_nontransitive_triples_match_the_tournament_formula():
    rng = np.random.default_rng(6)
    k = 9
    w = np.where(rng.random((k, k)) < 0.5, 0.3, 0.7)
    w = np.triu(w, 1) + np.triu(1 - w, 1).T + np.eye(k) * 0.5
    out_degree = (w > 0.5).sum(axis=1)
    cyclic = k * (k - 1) * (k - 2) // 6 - sum(d * (d - 1) // 2 for d in out_degree)  # Kendall & Babington Smith
    assert tm.nontransitive_triples(w) == cyclic
    transitive = 1 / (1 + np.exp(-(np.arange(k)[:, None] - np.arange(k)[None, :])))
    assert tm.nontransitive_triples(transitive) == 0


def test_disagreement_references():
    acc = np.array([0.3, 0.5, 0.6])
    ref = tm.disagreement_references(acc, 0.6)
    assert ref["nested"] == pytest.approx([0.75, 0.25, 0.0])
    assert ref["independent"] == pytest.approx([(0.7 + 0.4 - 0.28) / 0.4, (0.5 + 0.4 - 0.2) / 0.4, (0.8 - 0.16) / 0.4])
    assert ref["disjoint"] == pytest.approx([1 / 0.4, 0.9 / 0.4, 0.8 / 0.4])
    assert (ref["nested"] <= ref["independent"]).all() and (ref["independent"] <= ref["disjoint"]).all()


def test_streamed_weight_grams_equal_dense():
    rng = np.random.default_rng(7)
    theta = rng.normal(size=(5, 1000))
    blocks = [theta[:, i : i + 37] for i in range(0, 1000, 37)]
    gram, (delta,) = tm.weight_grams(iter(blocks), 5, [[1, 3, 4]])
    assert gram == pytest.approx(theta @ theta.T, rel=1e-12)
    cos = tm.cosines(gram)
    dense = theta @ theta.T / np.outer(np.linalg.norm(theta, axis=1), np.linalg.norm(theta, axis=1))
    assert cos == pytest.approx(dense, rel=1e-12)
    assert np.diag(cos) == pytest.approx(np.ones(5), abs=1e-15)
    d = theta[[3, 4]] - theta[1]
    assert delta == pytest.approx(d @ d.T, rel=1e-12)


def test_mds_recovers_a_known_configuration():
    rng = np.random.default_rng(8)
    points = rng.normal(size=(12, 2))
    dist = np.linalg.norm(points[:, None] - points[None], axis=-1)
    fitted, stress = tm.metric_mds(dist)
    assert stress < 1e-6
    assert np.linalg.norm(fitted[:, None] - fitted[None], axis=-1) == pytest.approx(dist, abs=1e-5)
    noisy = dist + np.triu(rng.random(dist.shape) * 0.2, 1)
    noisy = noisy + np.triu(noisy, 1).T - np.tril(noisy)
    _, noisy_stress = tm.metric_mds(noisy)
    assert 0 < noisy_stress <= tm.stress(noisy, tm.classical_mds(noisy)) + 1e-12  # SMACOF improves on Torgerson
    a, b = tm.tsne(dist, seed=1), tm.tsne(dist, seed=1)
    assert np.array_equal(a, b) and np.isfinite(a).all()


@pytest.fixture(scope="module")
def zoo(tmp_path_factory, tokenizer_dir, text_dir):
    """Two tiny GPT-2 seeds at two steps, and a model of another vocabulary, each with stored predictions; a second
    dataset that nothing is ingested on (as the demo's held-out set for ablations), so the dataset is never the
    store's only one."""
    from actdb.store.ingest.zoo import save_tiny_model, tiny_config

    home = tmp_path_factory.mktemp("trajectories")
    db = f"sqlite:///{home}/actdb.sqlite"
    run = cli_runner(home, db)
    run("init")
    run("dataset", "add", "d", text_dir, "--tokenizer", tokenizer_dir, "--seq-len", 64, "--tokens", 1024)
    run("dataset", "add", "held", text_dir, "--tokenizer", tokenizer_dir, "--seq-len", 64, "--tokens", 256, "--seed", 1)
    for k, model in enumerate("ab"):
        for step in (0, 1):
            save_tiny_model("gpt2", home / f"src-{model}" / f"step-{step}", tokenizer_dir, seed=80 + 2 * k + step)
        src = home / f"src-{model}" / "step-{step}"
        run("ingest", model, "--steps", "0,1", "--dataset", "d", "--source", src, "--predictions", "--quiet")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)  # the same tokenizer, an embedding padded to 320 ids: another vocabulary for top-1 ids
    AutoModelForCausalLM.from_config(tiny_config("gpt2", 320)).save_pretrained(home / "src-wide")
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(home / "src-wide")
    run("ingest", "wide", "--step", 0, "--dataset", "d", "--source", home / "src-wide", "--predictions", "--quiet")
    save_tiny_model("gpt2", home / "src-nopred", tokenizer_dir, seed=99)
    run("ingest", "nopred", "--step", 0, "--dataset", "d", "--source", home / "src-nopred", "--quiet")
    return home, db, run


def test_trajectories_end_to_end(zoo):
    from actdb.query.api import ActdbStore
    from actdb.store.files.prediction import read_predictions

    home, db, run = zoo
    out = run("trajectories", "--models", "a,b", "--steps", "0,1")
    assert "Win rate" in out.stdout and "non-transitive triples: " in out.stdout and "same seed" in out.stdout
    rows = json.loads(run("trajectories", "--format", "json").stdout)
    values = {(r["model"], r["step"], r["other_model"], r["other_step"], r["metric"]): r["value"] for r in rows}
    refs = [("a", 0), ("a", 1), ("b", 0), ("b", 1)]
    preds = {r: read_predictions(home / "activations" / r[0] / f"step-{r[1]}" / "d.predictions.h5") for r in refs}
    for x, y in combinations(refs, 2):
        win, dis, gain, _n = _reference(preds[x].loss, preds[y].loss, preds[x].top1, preds[y].top1, 0.0)
        assert values[(*x, *y, "win_rate")] == pytest.approx(win)
        assert values[(*x, *y, "win_rate")] + values[(*y, *x, "win_rate")] == 1.0
        assert values[(*x, *y, "disagreement")] == pytest.approx(dis)
        assert values[(*x, *y, "ensemble_gain")] == pytest.approx(gain, rel=1e-6)
        assert values[(*x, *y, "distance")] == pytest.approx(dis)
    for x in refs:
        assert values[(*x, *x, "win_rate")] == 0.5 and values[(*x, *x, "weight_cosine")] == pytest.approx(1.0)
    # the weights against a dense computation on the loaded models
    from transformers import AutoModelForCausalLM

    flat = {
        r: torch.cat([p.detach().double().reshape(-1) for _, p in sorted(_state(AutoModelForCausalLM, home, r))])
        for r in refs
    }
    cos = torch.nn.functional.cosine_similarity(flat[("a", 0)], flat[("b", 1)], dim=0).item()
    assert values[("a", 0, "b", 1, "weight_cosine")] == pytest.approx(cos, rel=1e-9)
    assert ("a", 1, "a", 1, "weight_delta_cosine") in values  # within a seed, θ0 = step 0
    assert not any(k[4] == "weight_delta_cosine" and k[0] != k[2] for k in values)  # never across seeds
    db_api = ActdbStore.open(home=home, database_url=db)
    try:
        frame = db_api.trajectories()
        assert list(frame.columns)[:6] == ["model", "step", "other_model", "other_step", "metric", "value"]
        assert len(frame) == len(rows)
        assert set(db_api.trajectories(metric="win_rate")["metric"]) == {"win_rate"}
        with pytest.raises(ActdbError, match=r"has no metric 'winrate' \(it has: disagreement, distance, .*win_rate\)"):
            db_api.trajectories(metric="winrate")
        points = db_api.trajectory_points()
        assert set(points["model"]) == {"a", "b"} and points["bt_strength"].sum() == pytest.approx(0.0, abs=1e-9)
    finally:
        db_api.close()
    view = json.loads(run("sql", "SELECT COUNT(*) AS n FROM v_trajectories", "--format", "json").stdout)
    assert view[0]["n"] == len(rows)
    again = run("trajectories", "--models", "a,b", "--steps", "0,1")
    assert "already holds" in again.stderr
    run("report", "--out", home / "report")
    page = (home / "report" / "index.html").read_text()
    assert "Trajectories" in page and (home / "report" / "trajectories_win_rate.png").exists()


def _state(auto, home, ref):
    model = auto.from_pretrained(home / f"src-{ref[0]}" / f"step-{ref[1]}")
    seen, out = set(), []
    for name, p in model.state_dict().items():  # tied weights once, as the safetensors file stores them
        if p.data_ptr() in seen:
            continue
        seen.add(p.data_ptr())
        out.append((name, p))
    return out


def test_trajectories_refuse_bad_input_and_write_nothing(zoo):
    home, db, run = zoo

    def count() -> int:
        return json.loads(run("sql", "SELECT COUNT(*) AS n FROM trajectory_run", "--format", "json").stdout)[0]["n"]

    before = count()
    missing = run("trajectories", "--sets", "a@1,nopred@0,b@1", ok=False)
    assert missing.exit_code == 1 and "`actdb predictions nopred@0 --dataset d`" in missing.stderr
    assert len(missing.stderr.strip().splitlines()) == 1
    vocab = run("trajectories", "--sets", "a@1,wide@0", ok=False)
    assert vocab.exit_code == 1 and "different vocabularies" in vocab.stderr
    one = run("trajectories", "--sets", "a@1", ok=False)
    assert one.exit_code == 1 and "only 1" in one.stderr
    cka = run("trajectories", "--sets", "a@0,b@1", "--distance", "cka", ok=False)  # no run holds a@0
    assert cka.exit_code == 1 and "actdb similarity" in cka.stderr
    assert count() == before


def test_jsd_distance_and_seeded_tsne_map(zoo):
    from actdb.query.api import ActdbStore

    home, db, run = zoo
    args = ["--sets", "a@1,b@0,b@1", "--distance", "jsd", "--exact", 128, "--map", "tsne", "--seed", 3]
    rows = json.loads(run("trajectories", *args, "--no-weights", "--format", "json").stdout)
    dist = {
        (r["model"], r["step"], r["other_model"], r["other_step"]): r["value"]
        for r in rows
        if r["metric"] == "distance"
    }
    assert not any(r["metric"].startswith("weight") for r in rows)
    js = json.loads(run("similarity", "--function", "--sets", "a@1,b@0,b@1", "--exact", 128, "--format", "json").stdout)
    for r in js:
        assert dist[(r["model"], r["step"], r["other_model"], r["other_step"])] == pytest.approx(r["js_divergence"])
    api = ActdbStore.open(home=home, database_url=db)
    try:
        first = api.trajectory_points()[["map_x", "map_y"]].to_numpy()
    finally:
        api.close()
    run("trajectories", *args, "--no-weights", "--force")
    api = ActdbStore.open(home=home, database_url=db)
    try:
        again = api.trajectory_points()[["map_x", "map_y"]].to_numpy()
    finally:
        api.close()
    assert np.isfinite(first).all() and np.array_equal(first, again)  # the seed fixes the map


def test_cka_distance_comes_from_the_similarity_run(zoo):
    home, db, run = zoo
    run("similarity", "--sets", "a@1,b@0,b@1", "--baseline-draws", 1, "--quiet")
    cka = {
        (r["model"], r["step"], r["other_model"], r["other_step"]): r["cka"]
        for r in json.loads(run("similarity", "--format", "json").stdout)
    }
    rows = json.loads(
        run("trajectories", "--sets", "a@1,b@0,b@1", "--distance", "cka", "--no-weights", "--format", "json").stdout
    )
    dist = [r for r in rows if r["metric"] == "distance"]
    assert len(dist) == 9
    for r in dist:
        key = (r["model"], r["step"], r["other_model"], r["other_step"])
        expected = 0.0 if key[:2] == key[2:] else 1 - (cka[key] + cka[key[2:] + key[:2]]) / 2
        assert r["value"] == pytest.approx(expected, abs=1e-12)


def test_the_dataset_is_the_one_holding_the_checkpoints_predictions(zoo, tokenizer_dir):
    """Without --dataset, trajectories and function similarity use the dataset the checkpoints' predictions are
    on (the store has two); predictions on two datasets ask for --dataset."""
    from actdb.store.ingest.zoo import save_tiny_model

    home, db, run = zoo
    assert "Win rate" in run("trajectories", "--sets", "a@0,b@1", "--no-weights").stdout
    assert len(json.loads(run("similarity", "--function", "--sets", "a@0,b@1", "--format", "json").stdout)) == 4
    save_tiny_model("gpt2", home / "src-held", tokenizer_dir, seed=98)
    run("ingest", "held", "--step", 0, "--dataset", "held", "--source", home / "src-held", "--predictions", "--quiet")
    for args in (("trajectories", "--sets", "a@0,held@0"), ("similarity", "--function", "--sets", "a@0,held@0")):
        r = run(*args, ok=False)
        assert r.exit_code == 1 and r.stderr.strip().splitlines() == [
            "actdb: error: the checkpoints have predictions on 2 datasets (d, held); pass --dataset"
        ]
        r = run(*args, "--dataset", "held", ok=False)
        assert r.exit_code == 1 and "`actdb predictions a@0 --dataset held`" in r.stderr
