"""What researchers bring: the pre-activation hook, explicit revisions per step, the forward dtype, and checks
decided from the config before any weights load."""

from __future__ import annotations

import json
import shutil

import h5py
import numpy as np
import pytest

from tests.conftest import cli_call


@pytest.fixture
def home(tmp_path, tokenizer_dir, text_dir):
    home, db = tmp_path / "store", f"sqlite:///{tmp_path / 'store' / 'actdb.sqlite'}"
    assert cli_call(home, db, "init").exit_code == 0
    r = cli_call(
        home, db, "dataset", "add", "d", text_dir, "--tokenizer", tokenizer_dir, "--seq-len", 64, "--tokens", 1500
    )
    assert r.exit_code == 0, r.stderr
    return home, db


def test_pre_activation_sets_live_beside_post_ones(home, tiny_models):
    home, db = home
    src = tiny_models["gpt2"]
    for hook in ("mlp.post", "blocks.{L}.mlp.hook_pre"):
        r = cli_call(home, db, "ingest", "g", "--step", 0, "--dataset", "d", "--source", src, "--hook", hook, "--quiet")
        assert r.exit_code == 0, r.stderr
    post = home / "activations" / "g" / "step-0" / "d.mlp.post.h5"
    pre = home / "activations" / "g" / "step-0" / "d.mlp.pre.h5"
    with h5py.File(post) as fp, h5py.File(pre) as fq:
        assert (
            fq.attrs["hook"] == "mlp.pre" and fq["layer_001"].attrs["transformer_lens_name"] == "blocks.1.mlp.hook_pre"
        )
        assert fp["layer_000"].attrs["transformer_lens_name"] == "blocks.0.mlp.hook_post"
        x_pre = fq["layer_000"][:512].astype(np.float32)
        x_post = fp["layer_000"][:512].astype(np.float32)
    gelu_new = 0.5 * x_pre * (1 + np.tanh(np.sqrt(2 / np.pi) * (x_pre + 0.044715 * x_pre**3)))
    np.testing.assert_allclose(x_post, gelu_new, atol=2e-3)  # post = act(pre), up to float16 rounding
    status = json.loads(cli_call(home, db, "status", "--format", "json").stdout)
    assert sorted(r["path"] for r in status) == [
        "activations/g/step-0/d.mlp.post.h5",
        "activations/g/step-0/d.mlp.pre.h5",
    ]
    bad = cli_call(home, db, "ingest", "g", "--step", 0, "--dataset", "d", "--hook", "resid.post", "--quiet")
    assert bad.exit_code == 2 and "unknown hook" in bad.stderr


def test_explicit_revisions_pair_with_steps(home, tiny_models, tmp_path):
    """A local folder per revision name stands in for a hub repository with named revisions: the source
    template uses `{step}` for the folder, and --revisions must pair one name with each step."""
    home, db = home
    r = cli_call(
        home,
        db,
        "ingest",
        "g",
        "--steps",
        "0,1",
        "--revisions",
        "a",
        "--dataset",
        "d",
        "--source",
        tiny_models["gpt2"],
        "--quiet",
    )
    assert r.exit_code == 2 and "one per step" in r.stderr
    r = cli_call(
        home,
        db,
        "ingest",
        "g",
        "--steps",
        "0,1",
        "--revisions",
        "a,b",
        "--revision",
        "x{step}",
        "--dataset",
        "d",
        "--source",
        tiny_models["gpt2"],
        "--quiet",
    )
    assert r.exit_code == 2 and "not both" in r.stderr


def test_forward_dtype_and_remote_code_flags(home, tiny_models):
    home, db = home
    r = cli_call(
        home,
        db,
        "ingest",
        "b",
        "--step",
        0,
        "--dataset",
        "d",
        "--source",
        tiny_models["llama"],
        "--torch-dtype",
        "bfloat16",
        "--trust-remote-code",
        "--quiet",
    )
    assert r.exit_code == 0, r.stderr
    r = cli_call(home, db, "ingest", "f", "--step", 0, "--dataset", "d", "--source", tiny_models["llama"], "--quiet")
    assert r.exit_code == 0, r.stderr
    with (
        h5py.File(home / "activations" / "b" / "step-0" / "d.mlp.post.h5") as fb,
        h5py.File(home / "activations" / "f" / "step-0" / "d.mlp.post.h5") as ff,
    ):
        bf16, fp32 = fb["layer_001"][:].astype(np.float32), ff["layer_001"][:].astype(np.float32)
    assert not np.array_equal(bf16, fp32)  # the forward pass really ran in bfloat16
    np.testing.assert_allclose(bf16, fp32, atol=0.05 * float(np.abs(fp32).max()))


def test_context_is_checked_from_the_config_before_weights(home, tiny_models, tmp_path):
    home, db = home
    folder = tmp_path / "short"
    shutil.copytree(tiny_models["gpt2"], folder)
    config = json.loads((folder / "config.json").read_text())
    config["n_positions"] = 32
    (folder / "config.json").write_text(json.dumps(config))
    for weights in folder.glob("*.safetensors"):
        weights.unlink()  # were the weights needed before the check, the error would be a load failure
    r = cli_call(home, db, "ingest", "s", "--step", 0, "--dataset", "d", "--source", folder, "--quiet")
    assert r.exit_code == 1 and "reads at most 32" in r.stderr, r.stderr


def test_source_mistakes_are_refused_before_anything_is_written(home, tiny_models, tmp_path):
    home, db = home
    src = tiny_models["gpt2"]
    before = sorted(p.name for p in home.rglob("*"))
    r = cli_call(home, db, "ingest", "g", "--steps", "0,1", "--dataset", "d", "--source", src, "--quiet")
    assert r.exit_code == 1 and "would all load the same weights" in r.stderr, r.stderr
    r = cli_call(home, db, "ingest", "g", "--step", 0, "--dataset", "d", "--source", tmp_path / "nowhere", "--quiet")
    assert r.exit_code == 1 and "does not exist" in r.stderr, r.stderr
    assert sorted(p.name for p in home.rglob("*")) == before
    assert cli_call(home, db, "ingest", "g", "--step", 0, "--dataset", "d", "--source", src, "--quiet").exit_code == 0
    other = tmp_path / "other"
    shutil.copytree(src, other)
    r = cli_call(home, db, "ingest", "g", "--step", 0, "--dataset", "d", "--source", other, "--quiet")
    assert r.exit_code == 1 and "was registered from" in r.stderr  # even though g@0 is complete
    assert "--replace-source" in r.stderr
    r = cli_call(home, db, "ingest", "g", "--step", 0, "--dataset", "d", "--source", other, "--quiet", "--force")
    assert r.exit_code == 1 and "--replace-source" in r.stderr  # --force only recomputes; it accepts no source
    r = cli_call(home, db, "ingest", "g", "--steps", "0,1", "--dataset", "d", "--source", src, "--force", "--quiet")
    assert r.exit_code == 1 and "--identical-weights" in r.stderr, r.stderr
    models = json.loads(cli_call(home, db, "sql", "SELECT count(*) AS n FROM ablation", "--format", "json").stdout)
    r = cli_call(home, db, "ablate", "g@0", "--neurons", "0.1", "--controls", 1, "--device", "cuda", "--quiet")
    assert r.exit_code != 0 and "Traceback" not in r.stderr
    after = json.loads(cli_call(home, db, "sql", "SELECT count(*) AS n FROM ablation", "--format", "json").stdout)
    assert after == models == [{"n": 0}]
