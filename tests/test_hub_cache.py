"""Hub checkpoints offline: a local Hugging Face cache (models--org--name with blobs, snapshots and refs for
`checkpoint-N` and `stepN` revisions, as Stanford CRFM's GPT-2 seeds and Pythia name them) built from tiny
models; `actdb ingest` by hub id and step runs in a subprocess with HF_HOME / HF_HUB_CACHE pointed at it and
HF_HUB_OFFLINE=1, so transformers resolves the revision through the cache exactly as after a user's download."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from sqlalchemy import select

from actdb.store.database.connection import Store
from actdb.store.database.schema import Checkpoint, Model
from actdb.store.files.activation import ActivationReader

CRFM = "stanford-crfm/alias-gpt2-small-x21"
PYTHIA = "EleutherAI/pythia-70m"


def add_to_hub_cache(cache: Path, repo_id: str, revision: str, folder: Path) -> str:
    """Lay `folder`'s files out as huggingface_hub stores a download of `repo_id` at `revision`: content-addressed
    blobs, a snapshot folder per commit whose files link to them, and `refs/<revision>` naming the commit."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    commit = hashlib.sha1(f"{repo_id}@{revision}".encode()).hexdigest()
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True, exist_ok=True)
    (repo / "blobs").mkdir(exist_ok=True)
    for file in sorted(folder.iterdir()):
        data = file.read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        (snapshot / file.name).symlink_to(os.path.relpath(blob, snapshot))
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / revision).write_text(commit)
    return commit


@pytest.fixture(scope="module")
def hub_cache(tmp_path_factory, tokenizer_dir) -> tuple[Path, dict[tuple[str, int], Path]]:
    """A cache holding two CRFM-style checkpoints (GPT-2) and one Pythia-style step (GPT-NeoX); each revision a
    differently seeded tiny model. Returns HF_HOME and the folder each (repo, step) was built from."""
    from actdb.store.ingest.zoo import save_tiny_model

    root = tmp_path_factory.mktemp("hf")
    home, built = root / "home", {}
    for repo, arch, revision, step, seed in (
        (CRFM, "gpt2", "checkpoint-{}", 10, 1),
        (CRFM, "gpt2", "checkpoint-{}", 20, 2),
        (PYTHIA, "gpt_neox", "step{}", 1000, 3),
    ):
        folder = save_tiny_model(arch, root / "models" / f"{arch}-{step}", tokenizer_dir, seed=seed)
        add_to_hub_cache(home / "hub", repo, revision.format(step), folder)
        built[(repo, step)] = folder
    return home, built


def _actdb(store_config, hf_home: Path, *args) -> subprocess.CompletedProcess:
    env = dict(
        os.environ,
        HF_HOME=str(hf_home),
        HF_HUB_CACHE=str(hf_home / "hub"),
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_VERBOSITY="error",
        TOKENIZERS_PARALLELISM="false",
    )
    base = [sys.executable, "-m", "actdb.query.cli", "--home", str(store_config.home), "--db"]
    cmd = base + [store_config.database_url, *map(str, args)]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)


def _layer(path: Path, layer: int) -> np.ndarray:
    with ActivationReader(path) as reader:
        return reader.read_rows(0, reader.header.n_tokens, [layer])[0]


@pytest.mark.slow  # five `actdb` processes, each importing torch and transformers
def test_ingest_by_hub_id_and_revision_from_an_offline_cache(run_cli, store_config, hub_cache, tokenizer_dir, text_dir):
    hf_home, built = hub_cache
    assert run_cli("init").exit_code == 0
    made = run_cli("dataset", "add", "d", text_dir, "--tokenizer", tokenizer_dir, "--seq-len", 64, "--tokens", 1024)
    assert made.exit_code == 0, made.stderr
    for model, repo, step in (("alias", CRFM, 10), ("alias", CRFM, 20), ("p70m", PYTHIA, 1000)):
        source = ("--source", repo) if step != 20 else ()  # a registered model's next step: its recorded source
        r = _actdb(store_config, hf_home, "ingest", model, "--step", step, "--dataset", "d", *source, "--quiet")
        assert r.returncode == 0, r.stderr
    # by path, the folder the cached revision was built from: the same weights (ingest sees the fingerprint and
    # refuses a second name unless forced) and the same activations, bit for bit
    direct = ("ingest", "direct", "--step", 20, "--dataset", "d", "--source", built[(CRFM, 20)], "--quiet")
    r = run_cli(*direct)
    assert r.exit_code == 1 and "has exactly the weights of alias@20" in r.stderr, r.stderr
    r = run_cli(*direct, "--force")
    assert r.exit_code == 0, r.stderr
    home = store_config.home
    files = {m: home / "activations" / m / f"step-{s}" / "d.mlp.post.h5" for m, s in (("alias", 10), ("direct", 20))}
    via_hub = _layer(home / "activations" / "alias" / "step-20" / "d.mlp.post.h5", 1)
    np.testing.assert_array_equal(via_hub, _layer(files["direct"], 1))
    assert not np.array_equal(via_hub, _layer(files["alias"], 1))  # checkpoint-10 is another model
    store = Store.open(store_config)
    with store.session() as s:
        recorded = {
            (m.name, c.step): (c.source, c.revision, m.family)
            for c, m in s.execute(select(Checkpoint, Model).join(Model, Model.id == Checkpoint.model_id))
        }
    store.close()
    assert recorded[("alias", 10)] == (CRFM, "checkpoint-10", "gpt2-mistral")
    assert recorded[("alias", 20)] == (CRFM, "checkpoint-20", "gpt2-mistral")
    assert recorded[("p70m", 1000)] == (PYTHIA, "step1000", "pythia")
    # a step the cache does not hold: one line naming the revision, nothing registered
    missing = _actdb(store_config, hf_home, "ingest", "alias", "--step", 30, "--dataset", "d", "--quiet")
    assert missing.returncode == 1 and len(missing.stderr.strip().splitlines()) == 1, missing.stderr
    assert "checkpoint-30" in missing.stderr, missing.stderr
