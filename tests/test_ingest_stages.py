"""An ingest that fails names the stage that failed: loading the weights, the forward pass, the statistics, or
writing the file; the set is recorded as failed and nothing is marked complete."""

import shutil

import pytest
from sqlalchemy import select

from actdb.store.database.connection import Store
from actdb.store.database.schema import ActivationSet


@pytest.fixture
def tiny_dataset(run_cli, tokenizer_dir, text_dir):
    assert run_cli("init").exit_code == 0
    r = run_cli("dataset", "add", "tiny", text_dir, "--tokenizer", tokenizer_dir, "--seq-len", 64, "--tokens", 3000)
    assert r.exit_code == 0, r.stderr
    return "tiny"


def _statuses(store_config) -> list[str]:
    store = Store.open(store_config)
    with store.session() as s:
        rows = s.scalars(select(ActivationSet.status)).all()
    store.close()
    return list(rows)


def _ingest(run_cli, source):
    return run_cli("ingest", "g", "--step", 0, "--dataset", "tiny", "--source", source, "--quiet")


def _one_line(r) -> str:
    assert r.exit_code == 1 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    return r.stderr


def test_forward_pass_failure_is_named(run_cli, tiny_dataset, tiny_models, store_config, monkeypatch):
    from transformers.models.gpt2 import modeling_gpt2

    def broken(self, hidden_states):
        raise RuntimeError("mat1 and mat2 shapes cannot be multiplied (64x32 and 31x128)")

    monkeypatch.setattr(modeling_gpt2.GPT2MLP, "forward", broken)
    err = _one_line(_ingest(run_cli, tiny_models["gpt2"]))
    assert "forward pass (sequences 0.." in err and "mat1 and mat2" in err and "writing" not in err, err
    assert _statuses(store_config) == ["failed"]


def test_statistics_failure_is_named(run_cli, tiny_dataset, tiny_models, store_config, monkeypatch):
    from actdb.store.ingest import neuron_stats

    def broken(self, x):
        raise ValueError("operands could not be broadcast together")

    monkeypatch.setattr(neuron_stats.StreamingMoments, "update", broken)
    err = _one_line(_ingest(run_cli, tiny_models["gpt2"]))
    assert "statistics (moments and top activations) failed: operands" in err and "writing" not in err, err
    assert _statuses(store_config) == ["failed"]


def test_write_failure_is_named_with_its_file(run_cli, tiny_dataset, tiny_models, store_config, monkeypatch):
    from actdb.store.files import activation

    def broken(self, *args, **kwargs):
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(activation.ActivationWriter, "write_rows", broken)
    err = _one_line(_ingest(run_cli, tiny_models["gpt2"]))
    assert "writing " in err and ".h5 failed: Input/output error" in err and "forward" not in err, err
    assert _statuses(store_config) == ["failed"]


def test_weights_that_do_not_load_are_named(run_cli, tiny_dataset, tiny_models, store_config, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_models["gpt2"], broken)
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])  # a download cut off halfway
    err = _one_line(_ingest(run_cli, str(broken)))
    assert "loading the weights of" in err and "failed: Error while deserializing header" in err, err
    assert _statuses(store_config) == []  # nothing registered before the weights load
