"""Ingestion: datasets, hooks on three architectures, statistics against scipy, resume, locking, errors."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import scipy.stats
import torch
from sqlalchemy import select

from actdb.store.database.connection import Store
from actdb.store.database.schema import ActivationSet, NeuronStat
from actdb.store.files.activation import ActivationReader
from actdb.store.files.token import TokenDataset
from actdb.store.ingest.architectures import MLPRecorder, adapter_for
from actdb.store.ingest.model_loading import load_model


@pytest.fixture
def tiny_dataset(run_cli, tokenizer_dir, text_dir):
    assert run_cli("init").exit_code == 0
    r = run_cli("dataset", "add", "tiny", text_dir, "--tokenizer", tokenizer_dir, "--seq-len", 64, "--tokens", 3000)
    assert r.exit_code == 0, r.stderr
    return "tiny"


def _set_row(store_config, model, step=0):
    store = Store.open(store_config)
    with store.session() as s:
        rows = s.scalars(select(ActivationSet)).all()
    store.close()
    return [r for r in rows if f"/{model}/step-{step}/" in r.path][0]


def test_dataset_packing_and_mask(run_cli, tiny_dataset, store_config, tokenizer_dir, tmp_path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    ds = TokenDataset.load(store_config.home / store_config.dataset_path("tiny"))
    assert ds.tokens.shape == (47, 64)  # ceil(3000 / 64) sequences
    assert (ds.tokens[:, 0] == tok.bos_token_id).all()
    special = ds.tokens == tok.eos_token_id
    assert not ds.mask[special].any() and ds.mask[~special].all()
    jsonl = tmp_path / "docs.jsonl"
    jsonl.write_text("\n".join(json.dumps({"body": f"def f{i}(x):\n    return x * {i}\n"}) for i in range(50)))
    r = run_cli("dataset", "add", "js", jsonl, "--tokenizer", tokenizer_dir, "--seq-len", 32, "--field", "body")
    assert r.exit_code == 0, r.stderr
    r2 = run_cli("dataset", "add", "js2", jsonl, "--tokenizer", tokenizer_dir, "--seq-len", 32, "--field", "body")
    shown = [json.loads(run_cli("dataset", "show", n, "--format", "json").stdout) for n in ("js", "js2")]
    sha = [{d["field"]: d["value"] for d in s}["token_sha256"] for s in shown]
    assert r2.exit_code == 0 and sha[0] == sha[1]
    js = TokenDataset.load(store_config.home / store_config.dataset_path("js"))
    assert not js.mask[-1, -1]  # the last sequence is padded and its padding not counted
    bad = run_cli("dataset", "add", "js3", jsonl, "--tokenizer", tokenizer_dir, "--field", "text")
    assert bad.exit_code == 1 and "no field 'text'" in bad.stderr
    dup = run_cli("dataset", "add", "js", jsonl, "--tokenizer", tokenizer_dir, "--field", "body")
    assert dup.exit_code == 1 and "already exists" in dup.stderr


@pytest.mark.parametrize("arch", ["gpt2", "gpt_neox", "llama"])
def test_hook_records_mlp_post_activation(tiny_models, arch):
    model = load_model(str(tiny_models[arch]), None, torch.device("cpu"))
    adapter = adapter_for(model)
    mlp_inputs = {}
    handles = [
        adapter.layers(model)[i].mlp.register_forward_pre_hook(lambda _m, a, i=i: mlp_inputs.__setitem__(i, a[0]))
        for i in range(2)
    ]
    ids = torch.randint(0, model.config.vocab_size, (2, 16))
    with MLPRecorder(model) as rec, torch.inference_mode():
        model(ids)
    for h in handles:
        h.remove()
    for i in range(2):
        mlp = adapter.layers(model)[i].mlp
        x = mlp_inputs[i]
        with torch.inference_mode():
            if arch == "gpt2":
                expected = mlp.act(mlp.c_fc(x))
            elif arch == "gpt_neox":
                expected = mlp.act(mlp.dense_h_to_4h(x))
            else:
                expected = mlp.act_fn(mlp.gate_proj(x)) * mlp.up_proj(x)
        assert rec.outputs[i].shape[-1] == 128
        torch.testing.assert_close(rec.outputs[i], expected, rtol=0, atol=0)


@pytest.mark.parametrize("arch", ["gpt2", "gpt_neox", "llama"])
def test_ingest_stats_match_scipy(run_cli, tiny_dataset, tiny_models, store_config, arch):
    r = run_cli("ingest", arch, "--step", 0, "--dataset", "tiny", "--source", tiny_models[arch], "--quiet")
    assert r.exit_code == 0, r.stderr
    aset = _set_row(store_config, arch)
    assert aset.status == "complete" and aset.bytes > 0
    mask = TokenDataset.load(store_config.home / store_config.dataset_path("tiny")).mask.reshape(-1)
    store = Store.open(store_config)
    with store.session() as s:
        stats = {(n.layer, n.neuron): n for n in s.scalars(select(NeuronStat).where(NeuronStat.set_id == aset.id))}
    store.close()
    assert len(stats) == 2 * 128
    with ActivationReader(store_config.file(aset.path)) as reader:
        for layer in range(2):
            x = reader.read_rows(0, reader.header.n_tokens, [layer])[0][mask].astype(np.float64)
            for j in range(0, 128, 7):
                st = stats[(layer, j)]
                col = x[:, j]
                assert st.count == col.size
                np.testing.assert_allclose(st.mean, col.mean(), rtol=1e-6, atol=1e-12)
                np.testing.assert_allclose(st.std, col.std(), rtol=1e-6)
                # float32 deviations (summed in float64): skew and kurtosis within 1e-6 of scipy's float64
                np.testing.assert_allclose(st.skew, scipy.stats.skew(col), rtol=1e-6, atol=1e-6)
                np.testing.assert_allclose(st.kurtosis, scipy.stats.kurtosis(col), rtol=1e-6, atol=1e-6)
                assert st.min == col.min() and st.max == col.max()
                assert st.frac_active == pytest.approx((col > 0).mean())


def test_statistics_on_the_forward_device_equal_the_host_path():
    """The torch path a GPU runs (exercised here on CPU tensors) merges to the same moments as the NumPy path."""
    import torch

    from actdb.store.ingest.neuron_stats import StreamingMoments, device_sums

    rng = np.random.default_rng(2)
    x = (rng.gamma(0.5, size=(3000, 9)) - 0.2 + np.arange(9) * 3).astype(np.float16)
    host, device = StreamingMoments(9), StreamingMoments(9)
    for chunk in np.array_split(x, [700, 701, 2000]):
        host.update(chunk)
        device.add_sums(device_sums(torch.from_numpy(chunk)))
    a, b = host.result(), device.result()
    for field in ("mean", "std", "skew", "kurtosis", "frac_active", "min", "max"):
        np.testing.assert_allclose(getattr(b, field), getattr(a, field), rtol=1e-9, atol=1e-12)
    xd = x.astype(np.float64)
    np.testing.assert_allclose(b.kurtosis, scipy.stats.kurtosis(xd), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(b.skew, scipy.stats.skew(xd), rtol=1e-6, atol=1e-6)


def test_streaming_moments_are_batch_invariant():
    from actdb.store.ingest.neuron_stats import StreamingMoments

    rng = np.random.default_rng(1)
    x = rng.gamma(2.0, size=(5000, 7)) + 3.0
    x[:, 3] = 1.5  # a constant neuron
    a, b = StreamingMoments(7), StreamingMoments(7)
    a.update(x)
    for chunk in np.array_split(x, [1, 100, 101, 2500, 4999]):
        b.update(chunk)
    ra, rb = a.result(), b.result()
    np.testing.assert_allclose(rb.kurtosis[[0, 1, 2, 4]], scipy.stats.kurtosis(x[:, [0, 1, 2, 4]]), rtol=1e-9)
    np.testing.assert_allclose(rb.skew[[0, 1, 2, 4]], ra.skew[[0, 1, 2, 4]], rtol=1e-9)
    assert np.isnan(rb.skew[3]) and rb.std[3] == 0


def test_reingest_is_noop_and_force_redoes(run_cli, tiny_dataset, tiny_models, store_config):
    src = tiny_models["gpt2"]
    assert run_cli("ingest", "g", "--step", 0, "--dataset", "tiny", "--source", src, "--quiet").exit_code == 0
    first = _set_row(store_config, "g").finished_at
    r = run_cli("ingest", "g", "--step", 0, "--dataset", "tiny", "--quiet")
    assert r.exit_code == 0 and "already complete" in r.stdout
    assert _set_row(store_config, "g").finished_at == first
    r = run_cli("ingest", "g", "--step", 0, "--dataset", "tiny", "--quiet", "--force")
    assert r.exit_code == 0 and "ingested" in r.stdout
    assert _set_row(store_config, "g").finished_at > first


def _cli(store_config, *args, env=None):
    return [
        sys.executable,
        "-m",
        "actdb.query.cli",
        "--home",
        str(store_config.home),
        "--db",
        store_config.database_url,
        *map(str, args),
    ]


def test_killed_ingest_resumes_to_identical_file(
    run_cli, tiny_dataset, tiny_models, store_config, tmp_path, tokenizer_dir, text_dir
):
    src = tiny_models["gpt2"]
    big = ("dataset", "add", "big", text_dir, "--tokenizer", tokenizer_dir, "--seq-len", 64, "--tokens", 16000)
    assert run_cli(*big).exit_code == 0
    env = dict(os.environ, ACTDB_INGEST_FLUSH_SECONDS="0.02")
    cmd = _cli(
        store_config, "ingest", "g", "--step", 0, "--dataset", "big", "--source", src, "--batch-size", 1, "--quiet"
    )
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    store = Store.open(store_config)
    killed_at = None
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and proc.poll() is None:
        with store.session() as s:
            row = s.scalar(select(ActivationSet))
        if row is not None and 0 < row.tokens_done < row.n_tokens:
            proc.send_signal(signal.SIGKILL)
            killed_at = row.tokens_done
            break
        time.sleep(0.01)
    proc.wait()
    assert killed_at is not None, "ingest finished before it could be killed; make the dataset larger"
    with store.session() as s:
        assert s.scalar(select(ActivationSet)).status == "running"
    store.close()
    r = run_cli("ingest", "g", "--step", 0, "--dataset", "big", "--batch-size", 1, "--quiet")
    assert r.exit_code == 0 and "resumed from token" in r.stdout, r.stdout + r.stderr
    resumed = _set_row(store_config, "g")
    assert resumed.status == "complete"
    other_home = tmp_path / "fresh"
    assert run_cli("init", home=other_home, db=f"sqlite:///{other_home}/actdb.sqlite").exit_code == 0
    fresh_db = f"sqlite:///{other_home}/actdb.sqlite"
    assert (
        run_cli(
            "dataset",
            "add",
            "big",
            text_dir,
            "--tokenizer",
            tokenizer_dir,
            "--seq-len",
            64,
            "--tokens",
            16000,
            home=other_home,
            db=fresh_db,
        ).exit_code
        == 0
    )
    assert (
        run_cli(
            "ingest",
            "g",
            "--step",
            0,
            "--dataset",
            "big",
            "--source",
            src,
            "--batch-size",
            1,
            "--quiet",
            home=other_home,
            db=fresh_db,
        ).exit_code
        == 0
    )
    fresh_path = other_home / "activations" / "g" / "step-0" / "big.mlp.post.h5"
    with ActivationReader(store_config.file(resumed.path)) as a, ActivationReader(fresh_path) as b:
        assert dict(a.file.attrs) == dict(b.file.attrs)
        for la, lb in zip(a.layers, b.layers, strict=True):
            np.testing.assert_array_equal(la[:], lb[:])
    stats = []
    for home, db in ((store_config.home, store_config.database_url), (other_home, fresh_db)):
        from actdb.store.config import StoreConfig

        st = Store.open(StoreConfig.resolve(home, db))
        with st.session() as s:
            stats.append(
                np.array(
                    [
                        [n.mean, n.std, n.skew, n.kurtosis]
                        for n in s.scalars(select(NeuronStat).order_by(NeuronStat.layer, NeuronStat.neuron))
                    ]
                )
            )
        st.close()
    np.testing.assert_allclose(stats[0], stats[1], rtol=1e-9)


def test_concurrent_ingests_do_the_work_once(db_url, tmp_path, tokenizer_dir, text_dir, tiny_models, run_cli):
    home = tmp_path / "conc"
    assert run_cli("init", home=home, db=db_url).exit_code == 0
    assert (
        run_cli(
            "dataset",
            "add",
            "d",
            text_dir,
            "--tokenizer",
            tokenizer_dir,
            "--seq-len",
            64,
            "--tokens",
            8000,
            home=home,
            db=db_url,
        ).exit_code
        == 0
    )
    cmd = [
        sys.executable,
        "-m",
        "actdb.query.cli",
        "--home",
        str(home),
        "--db",
        db_url,
        "ingest",
        "g",
        "--step",
        "0",
        "--dataset",
        "d",
        "--source",
        str(tiny_models["gpt2"]),
        "--batch-size",
        "1",
        "--quiet",
    ]
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=120) for p in procs]
    did_work = [o for o, _ in outs if ": ingested" in o]
    assert len(did_work) == 1, outs
    other = [(p.returncode, o + e) for p, (o, e) in zip(procs, outs, strict=True) if ": ingested" not in o][0]
    assert "is being worked on by process" in other[1] or "already complete" in other[1], other
    assert "Traceback" not in other[1] and len(other[1].strip().splitlines()) == 1


def test_ingest_errors_are_one_line(run_cli, tiny_dataset, tiny_models, tmp_path, tokenizer_dir, text_dir):
    from actdb.store.ingest.zoo import save_tiny_model, stdlib_texts, train_tokenizer

    other_tok = train_tokenizer(stdlib_texts(max_files=5, offset=100), 280, tmp_path / "tok2")
    mismatched = save_tiny_model("gpt2", tmp_path / "mismatch", other_tok)
    wide = save_tiny_model("gpt2", tmp_path / "wide", tokenizer_dir, d_mlp=64)
    from transformers import AutoTokenizer, BertConfig, BertForMaskedLM

    BertForMaskedLM(
        BertConfig(vocab_size=400, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)
    ).save_pretrained(tmp_path / "bert")
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(tmp_path / "bert")
    assert (
        run_cli("ingest", "g", "--step", 0, "--dataset", "tiny", "--source", tiny_models["gpt2"], "--quiet").exit_code
        == 0
    )
    steps = tmp_path / "steps"
    save_tiny_model("gpt2", steps / "step-0", tokenizer_dir, seed=5)
    registered = run_cli("ingest", "s", "--step", 0, "--dataset", "tiny", "--source", steps / "step-{step}", "--quiet")
    assert registered.exit_code == 0, registered.stderr
    cases = {
        "nope does not exist": ("ingest", "x", "--step", 0, "--dataset", "tiny", "--source", tmp_path / "nope"),
        f"model folder {steps / 'step-7'} does not exist": ("ingest", "s", "--step", 7, "--dataset", "tiny"),
        "not registered yet": ("ingest", "y", "--step", 0, "--dataset", "tiny"),
        "no dataset named": ("ingest", "g", "--step", 0, "--dataset", "missing"),
        "tokenizer mismatch": ("ingest", "z", "--step", 0, "--dataset", "tiny", "--source", mismatched),
        "unsupported architecture": ("ingest", "b", "--step", 0, "--dataset", "tiny", "--source", tmp_path / "bert"),
        "registered with 2 x 128": (
            "ingest",
            "g",
            "--step",
            5,
            "--dataset",
            "tiny",
            "--source",
            wide,
            "--replace-source",
        ),
        "a different source is another model": ("ingest", "g", "--step", 5, "--dataset", "tiny", "--source", wide),
        "exactly one of": ("ingest", "g", "--dataset", "tiny"),
        "no CUDA device": ("ingest", "g", "--step", 0, "--dataset", "tiny", "--device", "cuda", "--force"),
    }
    for expected, args in cases.items():
        r = run_cli(*args, "--quiet")
        assert r.exit_code != 0, expected
        assert expected in r.stderr and len(r.stderr.strip().splitlines()) == 1, (expected, r.stderr)
    hub = run_cli("ingest", "h", "--step", 100, "--dataset", "tiny", "--source", "nobody-here/no-such-model", "--quiet")
    assert hub.exit_code == 1 and "cannot load model" in hub.stderr and "checkpoint" not in hub.stderr


def test_unwritable_store_marks_nothing_complete(run_cli, tiny_dataset, tiny_models, store_config):
    if os.geteuid() == 0:
        target = store_config.home / "activations"
        target.write_text("a file where the activations folder should be")
    else:
        pytest.skip("needs root to create the obstruction deterministically")
    r = run_cli("ingest", "g", "--step", 0, "--dataset", "tiny", "--source", tiny_models["gpt2"], "--quiet")
    assert r.exit_code == 1 and "cannot create folder" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert _set_row(store_config, "g").status == "failed"


def _file_size_limit(limit: int):
    def apply() -> None:
        import resource

        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes past the limit fail (EFBIG) instead of killing
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return apply


def test_write_failure_mid_ingest_is_one_line_and_resumable(
    run_cli, tiny_dataset, tiny_models, store_config, tokenizer_dir, text_dir
):
    """A disk that fills up mid-ingest (here: a file-size limit, the same failed write as ENOSPC) ends in one
    line, no segfault, the set failed, the .partial kept; the next ingest resumes and the file checks out."""
    assert (
        run_cli(
            "dataset", "add", "big", text_dir, "--tokenizer", tokenizer_dir, "--seq-len", 64, "--tokens", 16000
        ).exit_code
        == 0
    )
    cmd = _cli(
        store_config,
        "ingest",
        "g",
        "--step",
        0,
        "--dataset",
        "big",
        "--source",
        tiny_models["gpt2"],
        "--batch-size",
        4,
        "--quiet",
    )
    env = dict(os.environ, ACTDB_INGEST_FLUSH_SECONDS="0")
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, preexec_fn=_file_size_limit(3 * 2**20))
    assert out.returncode == 1, out
    assert "beyond what this file system" in out.stderr and len(out.stderr.strip().splitlines()) == 1, out.stderr
    row = _set_row(store_config, "g")
    assert row.status == "failed" and 0 < row.tokens_done < row.n_tokens
    assert store_config.file(row.path + ".partial").exists()
    assert not list(store_config.home.glob(".actdb-reserve-*"))
    r = run_cli("ingest", "g", "--step", 0, "--dataset", "big", "--batch-size", 4, "--quiet")
    assert r.exit_code == 0 and "resumed from token" in r.stdout, r.stdout + r.stderr
    assert run_cli("check", "--quiet").exit_code == 0


@pytest.mark.skipif(
    os.geteuid() != 0 or not Path("/proc/filesystems").read_text().count("tmpfs"),
    reason="needs root to mount a small tmpfs",
)
def test_ingest_that_cannot_fit_is_refused_before_writing(tmp_path, tokenizer_dir, text_dir, tiny_models):
    from tests.conftest import cli_call

    mount = tmp_path / "small"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)]).returncode != 0:
        pytest.skip("mount is not permitted here")
    try:
        home, db = mount / "store", f"sqlite:///{mount}/store/actdb.sqlite"
        assert cli_call(home, db, "init").exit_code == 0
        assert (
            cli_call(
                home,
                db,
                "dataset",
                "add",
                "d",
                text_dir,
                "--tokenizer",
                tokenizer_dir,
                "--seq-len",
                64,
                "--tokens",
                4000,
            ).exit_code
            == 0
        )
        r = cli_call(home, db, "ingest", "g", "--step", 0, "--dataset", "d", "--source", tiny_models["gpt2"], "--quiet")
        assert r.exit_code == 1 and "free space" in r.stderr and len(r.stderr.strip().splitlines()) == 1
        assert not (home / "activations").exists()
        assert "(no rows)" in cli_call(home, db, "status").stdout
    finally:
        subprocess.run(["umount", "-l", str(mount)])  # lazily: the test process may still hold the file
