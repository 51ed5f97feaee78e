"""Correlation engine against float64 NumPy references, invariances, baseline, token control, and the CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest
from sqlalchemy import select

from actdb.compute.correlation.baseline import random_rotation, rotation
from actdb.compute.correlation.engine import CorrelationOptions, SetInput, correlate_sets, plan_passes
from actdb.store.database.connection import Store
from actdb.store.database.schema import CorrelationRun, NeuronMatch, Universality
from actdb.store.device import resolve_device
from actdb.store.files.activation import ActivationHeader, ActivationReader, ActivationWriter
from actdb.store.files.token import TokenDataset

N_SEQ, SEQ_LEN, D, L = 48, 32, 16, 2
CPU = resolve_device("cpu").array


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    """Three sets sharing latent features (plus noise, a dead neuron, a permuted copy) on random tokens."""
    rng = np.random.default_rng(0)
    tmp = tmp_path_factory.mktemp("synthetic")
    tokens = rng.integers(0, 40, (N_SEQ, SEQ_LEN)).astype(np.int32)
    mask = np.ones_like(tokens, dtype=bool)
    mask[:, 0] = False
    mask[-1, -5:] = False
    t = tokens.size
    latent = rng.standard_normal((t, 10))
    token_effect = rng.standard_normal((40, 10))[tokens.reshape(-1)]
    data = []
    for _ in range(3):
        w = rng.standard_normal((10, L * D))
        x = (latent + token_effect) @ w * 0.4 + rng.standard_normal((t, L * D)) + 2.0
        data.append(x.astype(np.float16))
    data[1][:, 5] = 0.5  # a dead (constant) neuron
    perm = rng.permutation(L * D)
    data.append(data[2][:, perm])
    sets = []
    for k, x in enumerate(data):
        path = tmp / f"set{k}.h5"
        w = ActivationWriter(path, ActivationHeader(f"m{k}", 0, "fp", "mlp.post", L, D, t, "float16"))
        w.write_rows(0, [x[:, i * D : (i + 1) * D] for i in range(L)])
        w.finish()
        counted = x[mask.reshape(-1)].astype(np.float64)
        sets.append(SetInput(100 + k, str(path), L, D, counted.mean(axis=0), rotation_key=100 + k))
    return {
        "sets": sets,
        "tokens": tokens,
        "mask": mask,
        "perm": perm,
        "counted": [x[mask.reshape(-1)].astype(np.float64) for x in data],
        "ids": tokens.reshape(-1)[mask.reshape(-1)],
    }


def _ref_corr(a, b):
    with np.errstate(invalid="ignore", divide="ignore"):
        r = np.corrcoef(a.T, b.T)[: a.shape[1], a.shape[1] :]
    return np.where(np.isnan(r), -np.inf, r)


def _residualize(x, ids):
    out = x.copy()
    for v in np.unique(ids):
        out[ids == v] -= x[ids == v].mean(axis=0)
    return out


def test_matches_float64_corrcoef(synthetic):
    s = synthetic
    res = correlate_sets(s["sets"][:3], s["tokens"], s["mask"], CorrelationOptions(chunk_tokens=100), CPU)
    assert res.n_tokens == s["mask"].sum()
    for a in range(3):
        for b in range(3):
            if a == b:
                continue
            ref = _ref_corr(s["counted"][a], s["counted"][b])
            m = res.matches[(100 + a, 100 + b)]
            live = ~res.dead[100 + a]
            np.testing.assert_allclose(m.max_corr[live], ref.max(axis=1)[live], atol=1e-4)
            assert (m.best[live] == ref.argmax(axis=1)[live]).all()
    assert res.dead[101][5] and res.dead[101].sum() == 1
    m = res.matches[(101, 100)]
    assert np.isnan(m.max_corr[5]) and m.best[5] == -1
    assert (res.matches[(100, 101)].best != 5).all()


def test_chunk_and_block_invariance(synthetic):
    s = synthetic
    base = correlate_sets(s["sets"][:3], s["tokens"], s["mask"], CorrelationOptions(chunk_tokens=64, topk=3), CPU)
    budget = 2_000_000
    while len(plan_passes(s["sets"][:3], 40, CorrelationOptions(chunk_tokens=500), budget)) < 3:
        budget -= 1000  # the smallest budgets that still fit one layer block force one task per pass
    many = correlate_sets(
        s["sets"][:3], s["tokens"], s["mask"], CorrelationOptions(chunk_tokens=500, topk=3, memory_budget=budget), CPU
    )
    assert base.n_passes == 1 and many.n_passes > 2
    for key, m in base.matches.items():
        o = many.matches[key]
        np.testing.assert_allclose(o.max_corr, m.max_corr, atol=1e-6, equal_nan=True)
        np.testing.assert_allclose(o.baseline, m.baseline, atol=1e-6, equal_nan=True)
        np.testing.assert_allclose(o.topk_val, m.topk_val, atol=1e-6)
        assert (o.best == m.best).all()
        np.testing.assert_allclose(m.topk_val[:, 0], np.where(np.isnan(m.max_corr), -np.inf, m.max_corr), atol=1e-12)


def test_permuting_other_set_permutes_argmax(synthetic):
    s = synthetic
    sets = [s["sets"][0], s["sets"][2], s["sets"][3]]
    res = correlate_sets(sets, s["tokens"], s["mask"], CorrelationOptions(), CPU)
    to_plain, to_perm = res.matches[(100, 102)], res.matches[(100, 103)]
    # float32 chunk products: some BLAS kernels (AVX2 here, unlike AVX-512) round permuted columns differently
    np.testing.assert_allclose(to_perm.max_corr, to_plain.max_corr, atol=1e-6)
    assert (s["perm"][to_perm.best] == to_plain.best).all()
    self_match = res.matches[(102, 103)]
    np.testing.assert_allclose(self_match.max_corr, 1.0, atol=1e-5)  # identical data: every neuron finds itself
    assert (s["perm"][self_match.best] == np.arange(L * D)).all()


def _rotated(x, key, draw, seed=7):
    return np.concatenate([x[:, i * D : (i + 1) * D] @ rotation(D, seed, key, i, draw) for i in range(L)], axis=1)


def test_baseline_draws_equal_direct_rotated_passes(synthetic):
    """Each of K draws equals a direct second pass over rotated float64 data; so do their mean and sd, the
    universality scores' excess per draw, and the stability computed from those passes."""
    from actdb.compute.correlation.universality import score_universality

    s, draws = synthetic, 5
    opts = CorrelationOptions(baseline_seed=7, baseline_draws=draws)
    res = correlate_sets(s["sets"][:3], s["tokens"], s["mask"], opts, CPU)
    a, b, c = s["counted"][:3]
    live_b = ~res.dead[101]
    forward = np.stack([_ref_corr(a, _rotated(b, 101, k)).max(axis=1) for k in range(draws)])
    backward = np.stack([_ref_corr(b, _rotated(a, 100, k)).max(axis=1) for k in range(draws)])
    np.testing.assert_allclose(res.matches[(100, 101)].baseline, forward, atol=1e-4)
    np.testing.assert_allclose(res.matches[(101, 100)].baseline[:, live_b], backward[:, live_b], atol=1e-4)
    np.testing.assert_allclose(res.matches[(100, 101)].baseline_mean, forward.mean(axis=0), atol=1e-4)
    np.testing.assert_allclose(res.matches[(100, 101)].baseline_sd, forward.std(axis=0, ddof=1), atol=1e-4)
    assert (forward.std(axis=0) > 1e-3).all()  # the draws really differ
    single = correlate_sets(
        s["sets"][:2], s["tokens"], s["mask"], CorrelationOptions(baseline_seed=7, baseline_draws=1), CPU
    )
    np.testing.assert_allclose(single.matches[(100, 101)].baseline[0], forward[0], atol=1e-4)  # draw 0 = K = 1
    # universality of set a against b and c, per draw, from direct passes
    max_corr = np.stack([_ref_corr(a, b).max(axis=1), _ref_corr(a, c).max(axis=1)])
    per_draw = np.stack([forward, np.stack([_ref_corr(a, _rotated(c, 102, k)).max(axis=1) for k in range(draws)])])
    excess_draws = max_corr.mean(axis=0)[None, :] - per_draw.mean(axis=0)
    scores = score_universality(res)[100]
    np.testing.assert_allclose(scores.excess_draws, excess_draws, atol=1e-4)
    np.testing.assert_allclose(scores.baseline_sd, per_draw.mean(axis=0).std(axis=0, ddof=1), atol=1e-4)
    threshold = float(np.median(excess_draws))
    safe = np.abs(excess_draws - threshold).min(axis=0) > 1e-3  # no draw within rounding of the threshold
    np.testing.assert_array_equal(scores.stability(threshold)[safe], (excess_draws > threshold).mean(axis=0)[safe])
    assert 0 < scores.stability(threshold)[safe].mean() < 1
    for q in (rotation(D, 7, 101, 0, 3), random_rotation(D, 7, 101, 0)):
        np.testing.assert_allclose(q.T @ q, np.eye(D), atol=1e-12)
    assert not np.allclose(rotation(D, 7, 101, 0, 3), rotation(D, 7, 101, 1, 3))  # layers differ within a draw


def test_token_control_matches_residualized_reference(synthetic):
    s = synthetic
    res = correlate_sets(
        s["sets"][:3], s["tokens"], s["mask"], CorrelationOptions(control="token", chunk_tokens=90), CPU
    )
    ra = _residualize(s["counted"][0], s["ids"])
    rb = _residualize(s["counted"][2], s["ids"])
    ref = _ref_corr(ra, rb)
    np.testing.assert_allclose(res.matches[(100, 102)].max_corr, ref.max(axis=1), atol=1e-4)
    plain = correlate_sets(s["sets"][:3], s["tokens"], s["mask"], CorrelationOptions(), CPU)
    assert np.nanmean(res.matches[(100, 102)].max_corr) < np.nanmean(plain.matches[(100, 102)].max_corr) - 0.05


@pytest.fixture
def ingested(run_cli, tokenizer_dir, text_dir, tiny_models, tmp_path):
    """A store with three random tiny GPT-2 seeds and an exact copy of seed 0, all at step 0."""
    from actdb.store.ingest.zoo import save_tiny_model

    assert run_cli("init").exit_code == 0
    assert (
        run_cli(
            "dataset", "add", "d", text_dir, "--tokenizer", tokenizer_dir, "--seq-len", 64, "--tokens", 4000
        ).exit_code
        == 0
    )
    sources = {"s0": tiny_models["gpt2"], "s0copy": tiny_models["gpt2"]}
    for seed in (1, 2):
        sources[f"s{seed}"] = save_tiny_model("gpt2", tmp_path / f"gpt2-{seed}", tokenizer_dir, seed=10 + seed)
    for name, src in sources.items():
        r = run_cli("ingest", name, "--step", 0, "--dataset", "d", "--source", src, "--quiet")
        if name == "s0copy":  # one model under two names is refused unless said on purpose
            assert r.exit_code == 1 and "exactly the weights of s0@0" in r.stderr, r.stderr
            r = run_cli(
                "ingest", name, "--step", 0, "--dataset", "d", "--source", src, "--quiet", "--identical-weights"
            )
        assert r.exit_code == 0, r.stderr
    return run_cli


def _rows(store_config, model, cls):
    store = Store.open(store_config)
    with store.session() as s:
        run = s.scalar(select(CorrelationRun).order_by(CorrelationRun.id.desc()))
        rows = s.scalars(select(cls).where(cls.run_id == run.id)).all()
    store.close()
    return run, rows


def test_cli_correlate_on_real_activations(ingested, store_config):
    r = ingested("correlate", "--dataset", "d", "--step", 0, "--models", "s0,s1,s0copy", "--topk", 2, "--quiet")
    assert r.exit_code == 0, r.stderr
    run, matches = _rows(store_config, "s0", NeuronMatch)
    assert run.status == "complete" and run.n_tokens > 0
    paths = {}
    store = Store.open(store_config)
    from actdb.store.database.schema import ActivationSet

    with store.session() as s:
        for a in s.scalars(select(ActivationSet)):
            paths[a.id] = str(store_config.file(a.path))
    store.close()
    mask = TokenDataset.load(store_config.home / store_config.dataset_path("d")).mask.reshape(-1)

    def load(set_id):
        with ActivationReader(paths[set_id]) as rd:
            return np.concatenate(rd.read_rows(0, rd.header.n_tokens), axis=1)[mask].astype(np.float64)

    by_pair = {}
    for m in matches:
        by_pair.setdefault((m.set_id, m.other_set_id), []).append(m)
    assert len(by_pair) == 6
    for (a, b), rows in by_pair.items():
        ref = _ref_corr(load(a), load(b))
        got = np.array([m.max_corr for m in sorted(rows, key=lambda m: (m.layer, m.neuron))])
        np.testing.assert_allclose(got, ref.max(axis=1), atol=1e-4)
        top = json.loads(rows[0].topk)
        assert len(top) == 2 and top[0][2] >= top[1][2]
    ids = {next(i for i, p in paths.items() if f"/{name}/" in p): name for name in ("s0", "s0copy")}
    copies = [m for m in matches if {m.set_id, m.other_set_id} == set(ids) and m.max_corr is not None]
    assert len(copies) > 400 and all(m.max_corr > 1 - 1e-5 for m in copies)
    _run, univ = _rows(store_config, "s0", Universality)
    assert len(univ) == 3 * 2 * 128
    r2 = ingested("correlate", "--dataset", "d", "--step", 0, "--models", "s0,s1,s0copy", "--topk", 2, "--quiet")
    assert r2.exit_code == 0 and "already holds" in r2.stdout
    r3 = ingested(
        "correlate", "--dataset", "d", "--step", 0, "--models", "s0,s1,s0copy", "--topk", 2, "--quiet", "--force"
    )
    assert r3.exit_code == 0 and "already holds" not in r3.stdout


def test_identical_sets_have_max_corr_one(ingested, store_config):
    assert ingested("correlate", "--sets", "s0@0,s0copy@0", "--quiet").exit_code == 0
    _run, matches = _rows(store_config, "s0", NeuronMatch)
    live = [m for m in matches if m.max_corr is not None]
    assert len(live) >= 250
    assert all(abs(m.max_corr - 1.0) < 1e-5 and (m.best_layer, m.best_neuron) == (m.layer, m.neuron) for m in live)


def test_correlate_bad_input(ingested, store_config, tokenizer_dir, text_dir, tiny_models):
    assert (
        ingested(
            "dataset", "add", "e", text_dir, "--tokenizer", tokenizer_dir, "--seq-len", 32, "--tokens", 1000
        ).exit_code
        == 0
    )
    assert ingested("ingest", "s1", "--step", 0, "--dataset", "e", "--quiet").exit_code == 0
    cases = {
        "different datasets": ("--sets", "s0@0/d,s1@0/e"),
        "at least two": ("--dataset", "d", "--step", 0, "--models", "s0"),
        "unknown model": ("--dataset", "d", "--step", 0, "--models", "s0,nope"),
        "has no step 9": ("--dataset", "d", "--step", 9, "--models", "s0,s1"),
        "malformed checkpoint": ("--sets", "s0,s1"),
        "either --models": ("--dataset", "d"),
        "no activation set on dataset": ("--dataset", "e", "--step", 0, "--models", "s0,s1"),
        "CuPy cannot use a CUDA device": ("--sets", "s0@0/d,s1@0/d", "--device", "cuda"),
    }
    for expected, args in cases.items():
        r = ingested("correlate", *args, "--quiet")
        assert r.exit_code != 0 and expected in r.stderr, (expected, r.stderr)
        assert len(r.stderr.strip().splitlines()) == 1


def test_incomplete_or_missing_set_fails_clearly(ingested, store_config):
    store = Store.open(store_config)
    from actdb.store.database.schema import ActivationSet

    with store.session() as s:
        sets = {name: a for a in s.scalars(select(ActivationSet)) for name in ("s1", "s2") if f"/{name}/" in a.path}
        s.get(ActivationSet, sets["s1"].id).status = "running"
    r = ingested("correlate", "--sets", "s0@0,s1@0", "--quiet")
    assert r.exit_code == 1 and "not complete" in r.stderr
    import os

    moved = store_config.file(sets["s2"].path)
    os.rename(moved, str(moved) + ".moved")
    r = ingested("correlate", "--sets", "s0@0,s2@0", "--quiet")
    assert r.exit_code == 1 and "does not exist" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    with store.session() as s:  # refused before a run was recorded
        assert s.scalar(select(CorrelationRun).where(CorrelationRun.status != "complete")) is None
    store.close()


def _cka(x, y):
    x, y = x - x.mean(axis=0), y - y.mean(axis=0)
    return np.linalg.norm(x.T @ y) ** 2 / (np.linalg.norm(x.T @ x) * np.linalg.norm(y.T @ y))


def test_layer_similarity_equals_direct_computations(synthetic):
    """Per layer pair: mean max corr, CKA and the Hungarian-matched correlation from the moments equal direct
    float64 computations on the data, and each draw's baseline equals a direct pass on rotated data."""
    from scipy.optimize import linear_sum_assignment

    s, draws = synthetic, 3
    opts = CorrelationOptions(baseline_seed=7, baseline_draws=draws, layer_similarity=True)
    res = correlate_sets(s["sets"][:3], s["tokens"], s["mask"], opts, CPU)
    keys = [100, 101, 102]
    for i, a in enumerate(keys):
        for j, b in enumerate(keys):
            xa, xb = s["counted"][i], s["counted"][j]
            for la in range(L):
                for lb in range(L):
                    if a == b and la != lb:  # a set's layers among themselves: no cross-layer Grams are kept
                        assert (a, b, la, lb) not in res.layers
                        continue
                    xl, yl = xa[:, la * D : (la + 1) * D], xb[:, lb * D : (lb + 1) * D]
                    live_a, live_b = xl.std(axis=0) > 1e-6, yl.std(axis=0) > 1e-6
                    r = np.corrcoef(xl[:, live_a].T, yl[:, live_b].T)[: live_a.sum(), live_a.sum() :]
                    got = res.layers[(a, b, la, lb)]
                    assert got.mean_max_corr == pytest.approx(r.max(axis=1).mean(), abs=1e-5)
                    assert got.cka == pytest.approx(_cka(xl, yl), abs=1e-6)
                    if la == lb:
                        rows, cols = linear_sum_assignment(r, maximize=True)
                        assert got.matched_corr == pytest.approx(r[rows, cols].mean(), abs=1e-5)
                    else:
                        assert got.matched_corr is None
                    for k in range(draws):
                        rot = yl @ rotation(D, 7, b, lb, k)
                        ref = np.corrcoef(xl[:, live_a].T, rot.T)[: live_a.sum(), live_a.sum() :]
                        assert got.baseline[k] == pytest.approx(ref.max(axis=1).mean(), abs=1e-4), (a, b, la, lb, k)
    assert res.layers[(100, 100, 0, 0)].mean_max_corr == pytest.approx(1.0)
    assert res.layers[(100, 100, 0, 0)].cka == 1.0 and res.layers[(100, 100, 0, 0)].matched_corr == pytest.approx(1)


def test_layer_similarity_of_one_pass_equals_pairwise_runs(synthetic):
    s = synthetic
    opts = CorrelationOptions(baseline_seed=3, baseline_draws=2, layer_similarity=True)
    together = correlate_sets(s["sets"][:3], s["tokens"], s["mask"], opts, CPU).layers
    for i, j in ((0, 1), (0, 2), (1, 2)):
        alone = correlate_sets([s["sets"][i], s["sets"][j]], s["tokens"], s["mask"], opts, CPU).layers
        for key, pair in alone.items():
            other = together[key]
            assert pair.mean_max_corr == pytest.approx(other.mean_max_corr, abs=1e-9)
            assert pair.cka == pytest.approx(other.cka, abs=1e-12)
            assert pair.matched_corr == pytest.approx(other.matched_corr, abs=1e-9)
            assert pair.baseline == pytest.approx(other.baseline, abs=1e-6)


def test_haar_qr_runs_on_one_blas_thread(monkeypatch):
    """The baseline's QRs run on one BLAS thread of NumPy's OpenBLAS (spinning OpenBLAS threads made them 30x
    dearer on a busy machine), and the thread count is back afterwards; the rotation is unchanged by it."""
    from threadpoolctl import threadpool_info, threadpool_limits

    from actdb.compute.correlation import baseline

    def numpy_blas_threads() -> set[int]:
        return {pool["num_threads"] for pool in threadpool_info() if "numpy" in pool["filepath"]}

    seen = []
    real_qr = np.linalg.qr

    def qr(x):
        seen.append(numpy_blas_threads())
        return real_qr(x)

    expected = random_rotation(16, 3, 5, 1)
    monkeypatch.setattr(baseline.np.linalg, "qr", qr)
    with threadpool_limits(2, user_api="blas"):  # as on a machine of two cores or more
        got = random_rotation(16, 3, 5, 1)
        assert numpy_blas_threads() == {2}
    assert seen == [{1}]
    np.testing.assert_array_equal(got, expected)
    np.testing.assert_allclose(got @ got.T, np.eye(16), atol=1e-12)
