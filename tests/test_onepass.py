"""One read pass per step on a real two-process Dask cluster: a run whose memory budget packs its accumulators
into five passes reads each stored byte once (the reader's byte counter, exact), its results are the
single-process engine's bit for bit (one BLAS thread), a SIGKILLed worker's shares are recomputed by Dask, a
corrupted chunk is still caught, and the CLI stores and lists the read amplification."""

from __future__ import annotations

import json
import os
import shutil
import signal

import h5py
import numpy as np
import pytest
from sqlalchemy import select
from threadpoolctl import threadpool_limits

from actdb.compute.cluster import ClusterSpec, open_client
from actdb.compute.correlation.cluster import correlate_on_cluster, correlate_one_pass
from actdb.compute.correlation.engine import (
    CorrelationOptions,
    SetInput,
    correlate_sets,
    pass_overhead,
    plan_passes,
    task_bytes,
)
from actdb.compute.correlation.onepass import chunk_count, shares_per_round
from actdb.store.database.connection import Store
from actdb.store.database.schema import CorrelationRun
from actdb.store.device import resolve_device
from actdb.store.errors import ActdbError
from actdb.store.files.activation import layer_key
from tests.test_cluster import latent_sets

N_SEQ, SEQ_LEN, D, L = 40, 32, 12, 3
CPU = resolve_device("cpu").array
FILE_BYTES = L * N_SEQ * SEQ_LEN * D * 2  # float16 values of one set's file


@pytest.fixture(scope="module")
def client():
    with open_client(ClusterSpec(workers=2)) as c:
        yield c


@pytest.fixture(scope="module")
def sets(tmp_path_factory):
    return latent_sets(tmp_path_factory.mktemp("onepass"), seed=11)


def _single(inputs, tokens, mask, options):
    with threadpool_limits(1):  # the workers' one BLAS thread: float32 GEMMs round per thread layout
        return correlate_sets(inputs, tokens, mask, options, CPU)


def _assert_identical(got, ref):
    assert got.n_tokens == ref.n_tokens
    for key, m in ref.matches.items():
        o = got.matches[key]
        for name in ("max_corr", "baseline", "best", "topk_val", "topk_idx", "self_corr"):
            np.testing.assert_array_equal(getattr(o, name), getattr(m, name), err_msg=f"{key} {name}")
    for key, dead in ref.dead.items():
        np.testing.assert_array_equal(got.dead[key], dead)


def _passes_read(inputs, passes) -> int:
    """Bytes a multi-pass run reads: every file in the first pass (the moments), then the files of each later
    pass's pairs, each whole."""
    files = len(inputs) + sum(len({t.a for t in p} | {t.b for t in p}) for p in passes[1:])
    return files * FILE_BYTES


@pytest.mark.parametrize("control", ["none", "token"])
def test_one_pass_reads_each_byte_once_and_equals_the_single_process_run(client, sets, control):
    inputs, tokens, mask = sets
    budget = 370_000 if control == "none" else 396_000  # five passes of (pair x layer block) tasks today
    options = CorrelationOptions(
        control=control, topk=3, baseline_draws=4, chunk_tokens=160, memory_budget=budget, layer_similarity=True
    )
    passes = plan_passes(inputs, 30, options, budget)
    assert len(passes) >= 4
    ref = _single(inputs, tokens, mask, options)
    assert ref.n_passes == len(passes)
    assert ref.bytes_held == 3 * FILE_BYTES and ref.bytes_read == _passes_read(inputs, passes)  # the counter, exact
    multi = correlate_on_cluster(client, inputs, tokens, mask, options, shards=3)
    assert multi.bytes_read == ref.bytes_read and multi.read_amplification > 3

    got = correlate_one_pass(client, inputs, tokens, mask, options)
    assert got.n_passes == 1
    assert got.bytes_held == 3 * FILE_BYTES and got.bytes_read == got.bytes_held and got.read_amplification == 1.0
    _assert_identical(got, ref)
    assert set(got.layers) == set(ref.layers)
    for key, pair in ref.layers.items():
        other = got.layers[key]
        assert (other.mean_max_corr, other.cka, other.matched_corr) == (pair.mean_max_corr, pair.cka, pair.matched_corr)
        assert other.baseline == pair.baseline


def test_killed_worker_is_recovered_by_dask(client, sets):
    inputs, tokens, mask = sets
    options = CorrelationOptions(topk=2, baseline_draws=3, chunk_tokens=64, memory_budget=370_000)
    ref = _single(inputs, tokens, mask, options)
    before = client.run(os.getpid)
    killed = []

    def kill_once(_rows: int) -> None:  # once the first chunk is in every share: half the shares die with it
        if not killed:
            pid = next(iter(before.values()))
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)

    got = correlate_one_pass(client, inputs, tokens, mask, options, progress=kill_once)
    assert killed and killed[0] not in client.run(os.getpid).values()  # the nanny started a new process
    _assert_identical(got, ref)
    assert got.bytes_read >= got.bytes_held  # the lost shares' chunks may have been read again


def test_rounds_and_chunks():
    assert chunk_count(n_seq=41, seq_len=32, chunk_tokens=96) == 14
    assert shares_per_round(5, 100, [None, None]) == 5  # no memory limit: every share at once
    assert shares_per_round(5, 100, [1000, 1000]) == 10  # half of each worker's memory: five shares each
    assert shares_per_round(5, 1000, [1000, 1000]) == 2  # at least one each
    assert shares_per_round(5, 10**9, [1000]) == 1


def test_one_pass_in_rounds_when_the_workers_cannot_hold_every_share(client, sets, monkeypatch):
    inputs, tokens, mask = sets
    options = CorrelationOptions(chunk_tokens=160, memory_budget=370_000, baseline_draws=4)
    monkeypatch.setattr("actdb.compute.correlation.cluster.shares_per_round", lambda *_args: 2)
    ref = _single(inputs, tokens, mask, options)
    got = correlate_one_pass(client, inputs, tokens, mask, options)
    shares = plan_passes(inputs, 30, options, 370_000)
    rounds = [[t for p in shares[i : i + 2] for t in p] for i in range(0, len(shares), 2)]
    assert len(shares) == 5 and got.n_passes == len(rounds) == 3  # five shares, two at a time
    _assert_identical(got, ref)
    assert got.bytes_read == _passes_read(inputs, rounds)  # each round reads the files of its shares once


def test_a_corrupted_chunk_is_caught(client, sets, tmp_path):  # the last test on this cluster: a failed run
    inputs, tokens, mask = sets
    path = tmp_path / "bad.h5"
    shutil.copy(inputs[2].path, path)
    with h5py.File(path, "r") as f:
        ds = f[layer_key(1)]
        info = ds.id.get_chunk_info(ds.id.get_num_chunks() - 1)
    with open(path, "r+b") as f:
        f.seek(info.byte_offset + info.size // 2)
        f.write(b"\x00\x11\x22\x33\x44\x55\x66\x77")
    bad = SetInput(12, str(path), L, D, inputs[2].shift, rotation_key=12)
    options = CorrelationOptions(chunk_tokens=160, memory_budget=370_000)
    with pytest.raises(ActdbError, match=r"bad.h5 is corrupt \(checksum or read error\)"):
        correlate_one_pass(client, [inputs[0], inputs[1], bad], tokens, mask, options)


def test_cli_correlate_on_workers_stores_and_lists_the_read_amplification(
    run_cli, store_config, tiny_models, tokenizer_dir, text_dir
):
    for args in (
        ("init",),
        ("dataset", "add", "d", text_dir, "--tokenizer", tokenizer_dir, "--seq-len", 64, "--tokens", 2000),
        ("ingest", "a", "--step", 0, "--dataset", "d", "--source", tiny_models["gpt2"], "--quiet"),
        ("ingest", "b", "--step", 0, "--dataset", "d", "--source", tiny_models["gpt_neox"], "--quiet"),
    ):
        r = run_cli(*args)
        assert r.exit_code == 0, (args, r.stderr)
    a = SetInput(0, "a", 2, 128, np.zeros(256))
    task = task_bytes(a, a)
    budget = pass_overhead([a, a], 300, CorrelationOptions(chunk_tokens=256), task) + task + task // 2
    assert len(plan_passes([a, a], 300, CorrelationOptions(chunk_tokens=256), budget)) == 2  # two passes today
    args = ("correlate", "--sets", "a@0,b@0", "--chunk-tokens", 256, "--memory-budget", budget, "--quiet")
    r = run_cli(*args, "--workers", 2)
    assert r.exit_code == 0, r.stderr
    assert "1 pass(es)" in r.stdout and "(read amplification 1.00)" in r.stdout, r.stdout
    r = run_cli(*args, "--force")  # the single-process engine: two passes, each reading both files
    assert r.exit_code == 0 and "2 pass(es)" in r.stdout and "(read amplification 2.00)" in r.stdout, r.stdout
    store = Store.open(store_config)
    with store.session() as s:
        runs = s.scalars(select(CorrelationRun).order_by(CorrelationRun.id)).all()
        assert [r.bytes_read / r.bytes_held for r in runs] == [1.0, 2.0]
        # two float16 files of 2 layers x 128 neurons x 2048 positions (2000 tokens asked: 32 sequences of 64)
        assert runs[0].bytes_held == 2 * 2 * 128 * 2048 * 2
    store.close()
    r = run_cli("runs", "--format", "json")
    assert r.exit_code == 0, r.stderr
    assert [run["read_amplification"] for run in json.loads(r.stdout)] == [1.0, 2.0]
