"""Whole-set similarity: the representation side from one correlation pass, the function side from stored
predictions, both checked against direct computations on two forward passes."""

from __future__ import annotations

import json

import h5py
import numpy as np
import pytest
import scipy.spatial.distance
import torch

from actdb.store.files.token import TokenDataset
from actdb.store.ingest.model_loading import load_model
from tests.conftest import cli_runner


@pytest.fixture(scope="module")
def store(tmp_path_factory, tokenizer_dir, text_dir):
    from actdb.store.ingest.zoo import save_tiny_model

    home = tmp_path_factory.mktemp("similarity")
    db = f"sqlite:///{home}/actdb.sqlite"

    run = cli_runner(home, db)

    run("init")
    run("dataset", "add", "d", text_dir, "--tokenizer", tokenizer_dir, "--seq-len", 64, "--tokens", 1500)
    sources = {}
    for k, model in enumerate("ab"):
        src = home / f"src-{model}" / "step-{step}"
        for step in (0, 1):
            save_tiny_model("gpt2", home / f"src-{model}" / f"step-{step}", tokenizer_dir, seed=60 + 2 * k + step)
        sources[model] = src
        run("ingest", model, "--steps", "0,1", "--dataset", "d", "--source", src, "--predictions", "--quiet")
    return home, db, run


def test_similarity_of_every_pair_in_one_run(store):
    home, db, run = store
    out = run("similarity", "--models", "a,b", "--steps", "0,1", "--baseline-draws", 2, "--quiet", "--format", "json")
    rows = json.loads(out.stdout)
    pairs = {(r["model"], r["step"], r["other_model"], r["other_step"]): r for r in rows}
    assert len(pairs) == 16 and all(r["n_layers"] == 2 for r in rows)
    for key, r in pairs.items():
        if key[:2] == key[2:]:  # the diagonal is measured, not painted
            assert r["mean_max_corr"] == pytest.approx(1.0) and r["cka"] == pytest.approx(1.0)
            assert r["mean_baseline"] < 1
        else:
            assert 0 < r["cka"] < 1 and r["matched_corr"] <= r["mean_max_corr"] + 1e-9
        other = pairs[key[2:] + key[:2]]
        assert r["cka"] == pytest.approx(other["cka"]) and r["matched_corr"] == pytest.approx(other["matched_corr"])
    by_layer = json.loads(run("similarity", "--by-layer", "--format", "json").stdout)
    assert len(by_layer) == 4 * 3 * 4 + 4 * 2  # 12 ordered pairs x 4 layer pairs + 4 diagonals x 2 layers
    again = run("similarity", "--models", "a,b", "--steps", "0,1", "--baseline-draws", 2, "--quiet")
    assert "already holds" in again.stderr
    view = json.loads(run("sql", "SELECT COUNT(*) AS n FROM v_similarity", "--format", "json").stdout)
    assert view[0]["n"] == len(by_layer)
    assert "no similarity run" in run("similarity", "--control", "token", ok=False).stderr


def test_function_similarity_equals_two_forward_passes(store):
    home, db, run = store
    out = run("similarity", "--function", "--sets", "a@1,b@1", "--exact", 256, "--format", "json")
    rows = {(r["model"], r["other_model"]): r for r in json.loads(out.stdout)}
    tokens = TokenDataset.load(home / "datasets" / "d.tokens.h5")
    logits = []
    for model in "ab":
        net = load_model(str(home / f"src-{model}" / "step-1"), None, torch.device("cpu"))
        with torch.inference_mode():
            logits.append(net(input_ids=torch.from_numpy(tokens.tokens.astype(np.int64))).logits.double())
    ids = torch.from_numpy(tokens.tokens.astype(np.int64))
    counted = tokens.mask[:, 1:]
    top = [lg[:, :-1].argmax(-1).numpy()[counted] for lg in logits]
    loss = [
        torch.nn.functional.cross_entropy(
            lg[:, :-1].reshape(-1, lg.shape[-1]), ids[:, 1:].reshape(-1), reduction="none"
        )
        .view(counted.shape)
        .numpy()[counted]
        for lg in logits
    ]
    got = rows[("a", "b")]
    assert got["top1_agreement"] == pytest.approx((top[0] == top[1]).mean())
    assert got["loss_corr"] == pytest.approx(np.corrcoef(loss[0], loss[1])[0, 1], abs=1e-5)
    assert got["mean_loss"] == pytest.approx(loss[0].mean(), rel=1e-5)
    n_seq = 256 // tokens.seq_len
    p = torch.softmax(logits[0][:n_seq, :-1], -1).numpy()[counted[:n_seq]]
    q = torch.softmax(logits[1][:n_seq, :-1], -1).numpy()[counted[:n_seq]]
    js = np.mean(scipy.spatial.distance.jensenshannon(p, q, axis=1) ** 2)
    assert got["js_divergence"] == pytest.approx(js, rel=1e-6)
    assert rows[("a", "a")]["top1_agreement"] == 1.0 and rows[("a", "a")]["js_divergence"] == 0.0
    missing = run("similarity", "--function", "--sets", "a@0,b@9", ok=False)
    assert missing.exit_code == 1 and "no step 9" in missing.stderr


def test_check_reads_prediction_files(store):
    home, db, run = store
    path = home / "activations" / "b" / "step-1" / "d.predictions.h5"
    original = path.read_bytes()
    try:
        assert "4 prediction files" in run("check").stderr
        with h5py.File(path, "r") as f:
            loss = f["loss"].id
            last = loss.get_chunk_info(loss.get_num_chunks() - 1)
        data = bytearray(original)
        data[last.byte_offset + last.size // 2] ^= 0xFF  # inside the last chunk of `loss`
        path.write_bytes(bytes(data))
        r = run("check", "--quiet", "--format", "json", ok=False)
        assert r.exit_code == 1
        (problem,) = json.loads(r.stdout)
        assert problem["kind"] == "predictions" and problem["name"] == "b@1 on d", problem
        data = bytearray(original)
        heap = data.find(b"GCOL")  # the global heap that keeps the identity's string attributes
        data[heap : heap + 4] = b"XXXX"
        path.write_bytes(bytes(data))
        (problem,) = json.loads(run("check", "--quiet", "--format", "json", ok=False).stdout)
        assert "has damaged identity attributes" in problem["problem"], problem
        refused = run("similarity", "--function", "--sets", "a@1,b@1", ok=False)
        assert refused.exit_code == 1 and len(refused.stderr.strip().splitlines()) == 1, refused.stderr
        path.unlink()
        (problem,) = json.loads(run("check", "--quiet", "--format", "json", ok=False).stdout)
        assert problem["problem"] == "file missing"
    finally:
        path.write_bytes(original)
    assert run("check", "--quiet").exit_code == 0
