"""The zoo trains bit-identically whatever torch's thread count: each training runs in its own process with a
different `torch.set_num_threads` before `train_zoo`, and the weights' digests are compared."""

import os
import subprocess
import sys

import pytest
import torch

from actdb.store.ingest.zoo import reproducible_training

TRAIN_ONE_SEED = """
import sys, tempfile
from pathlib import Path
import torch
torch.set_num_threads(int(sys.argv[1]))
from actdb.store.ingest.zoo import checkpoint_dir, train_zoo, weight_digest, zoo_config
root = Path(tempfile.mkdtemp())
threads = None if sys.argv[2] == "default" else int(sys.argv[2])
config = zoo_config(1, 12, [12], vocab_size=300, d_model=64, d_mlp=256, seq_len=64, batch_size=8, train_files=12,
                    train_threads=threads)
train_zoo(root, config, progress=False)
print(weight_digest(checkpoint_dir(root, 0, 12)), torch.get_num_threads())
"""


def _digest(process_threads: int, train_threads: str) -> str:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", TRANSFORMERS_VERBOSITY="error")
    out = subprocess.run(
        [sys.executable, "-c", TRAIN_ONE_SEED, str(process_threads), train_threads],
        env=env,
        capture_output=True,
        text=True,
        check=True,
        timeout=300,
    ).stdout.split()
    assert out[1] == str(process_threads)  # the caller's thread count is restored after training
    return out[0]


@pytest.mark.slow  # three subprocesses, each trains a tokenizer and a model
def test_zoo_weights_do_not_depend_on_thread_count():
    one_thread = _digest(1, "1")
    assert _digest(2, "1") == one_thread
    # the control: the same training on torch's own 2 threads (version 1's zoo) rounds differently, so this
    # configuration is large enough for the thread count to matter
    assert _digest(2, "default") != one_thread


def test_reproducible_training_restores_the_callers_settings():
    before = torch.get_num_threads()
    with reproducible_training(1):
        assert torch.get_num_threads() == 1 and torch.are_deterministic_algorithms_enabled()
    assert torch.get_num_threads() == before and not torch.are_deterministic_algorithms_enabled()


def test_a_zoo_of_the_previous_version_is_named_not_reused(tmp_path):
    import json

    from actdb.store.errors import ActdbError
    from actdb.store.ingest.zoo import train_zoo, zoo_config

    old = zoo_config(1, 10, [10]) | {"version": 1}
    del old["train_threads"]
    (tmp_path / "zoo.json").write_text(json.dumps(old))
    with pytest.raises(ActdbError, match="trained by zoo version 1"):
        train_zoo(tmp_path, zoo_config(1, 10, [10]), progress=False)


def test_seeds_trained_side_by_side_equal_seeds_trained_in_turn(tmp_path):
    """Two seeds in two processes at once give the weights of the same two seeds trained one after the other, at
    every checkpoint, and the same tokenizer."""
    from actdb.store.ingest.zoo import checkpoint_dir, train_zoo, weight_digest, zoo_config, zoo_provenance

    config = zoo_config(2, 6, [0, 3, 6], vocab_size=300, d_model=32, d_mlp=64, seq_len=32, batch_size=4, train_files=6)
    digests, tokenizers, provenance = {}, {}, {}
    for processes in (1, 2):
        root = tmp_path / f"zoo-{processes}"
        train_zoo(root, config, progress=False, processes=processes)
        digests[processes] = [weight_digest(checkpoint_dir(root, seed, step)) for seed in (0, 1) for step in (0, 3, 6)]
        tokenizers[processes] = (root / "tokenizer" / "tokenizer.json").read_bytes()
        provenance[processes] = zoo_provenance(root, config)
    assert digests[1] == digests[2] and len(set(digests[1])) == 6
    assert tokenizers[1] == tokenizers[2]
    # the line the demo prints: the same digest, and the torch build and CPU kernel level that trained the zoo
    assert provenance[1] == provenance[2]
    assert f"torch {torch.__version__}, CPU kernels {torch.backends.cpu.get_cpu_capability()}" in provenance[1]


def test_host_cores_follows_the_affinity_mask():
    """A process pinned to one core (taskset, a container) counts one core, so the zoo trains its seeds in turn."""
    code = "import os; os.sched_setaffinity(0, {min(os.sched_getaffinity(0))}); "
    code += "from actdb.store.device import host_cores; print(host_cores())"
    if not hasattr(os, "sched_setaffinity"):
        pytest.skip("no affinity call on this platform")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60)
    assert out.stdout.strip() == "1"
