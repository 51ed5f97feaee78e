"""Persistence across checkpoints and ablation against an unhooked forward pass and weight surgery."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from actdb.compute.ablation.loss import LossEvaluator, ablate, matched_controls, set_edits
from actdb.compute.persistence.run import emergence_steps, layer_overlap
from actdb.store.files.token import TokenDataset
from actdb.store.ingest.model_loading import load_model


@pytest.fixture
def two_models(run_cli, tokenizer_dir, text_dir, tiny_models, tmp_path):
    """Models a and b, each at steps 0 and 1 with identical weights at both steps, correlated at both steps."""
    from actdb.store.ingest.zoo import save_tiny_model

    assert run_cli("init").exit_code == 0
    assert (
        run_cli(
            "dataset", "add", "d", text_dir, "--tokenizer", tokenizer_dir, "--seq-len", 64, "--tokens", 3000
        ).exit_code
        == 0
    )
    b_src = save_tiny_model("gpt2", tmp_path / "b", tokenizer_dir, seed=5)
    a_src = tmp_path / "a"
    shutil.copytree(tiny_models["gpt2"], a_src)
    for name, src in (("a", a_src), ("b", b_src)):
        assert (
            run_cli(
                "ingest", name, "--steps", "0,1", "--dataset", "d", "--source", src, "--quiet", "--identical-weights"
            ).exit_code
            == 0
        )
    for step in (0, 1):
        r = run_cli("correlate", "--dataset", "d", "--step", step, "--models", "a,b", "--threshold", 0.05, "--quiet")
        assert r.exit_code == 0, r.stderr
    return {"a": a_src, "b": b_src}


def test_emergence_and_overlap_by_hand():
    steps = [0, 10, 20, 30]
    flags = [np.array(x, dtype=bool) for x in ([1, 0, 1, 0, 1], [1, 1, 0, 0, 1], [1, 1, 1, 0, 0], [1, 1, 1, 1, 0])]
    assert emergence_steps(flags, steps).tolist() == [0, 10, 20, 30, -1]
    assert layer_overlap({1, 2, 3, 4}, {3, 4, 5}) == (2, 0.5, 0.4)
    assert layer_overlap(set(), {1}) == (0, None, 0.0)
    assert layer_overlap(set(), set()) == (0, None, None)


def test_persistence_of_unchanged_model_is_one(two_models, run_cli, store_config):
    r = run_cli("persistence", "--model", "a", "--format", "json", "--quiet")
    assert r.exit_code == 0, r.stderr
    rows = json.loads(r.stdout)
    assert len(rows) == 2 and {row["layer"] for row in rows} == {0, 1}
    for row in rows:
        assert row["n_universal_from"] > 0
        assert row["p_persist"] == 1.0 and row["jaccard"] == 1.0
        assert row["mean_self_corr"] == pytest.approx(1.0, abs=1e-5)
    listing = run_cli("persistence", "--format", "csv")
    assert listing.exit_code == 0 and len(listing.stdout.strip().splitlines()) == 3
    from sqlalchemy import func, select

    from actdb.store.database.connection import Store
    from actdb.store.database.schema import CorrelationRun, NeuronMatch, Universality

    store = Store.open(store_config)
    with store.session() as s:
        kinds = dict(s.execute(select(CorrelationRun.id, CorrelationRun.kind)).all())
        for run_id, kind in kinds.items():
            n_univ = s.scalar(select(func.count()).select_from(Universality).where(Universality.run_id == run_id))
            n_self = s.scalar(
                select(func.count())
                .select_from(NeuronMatch)
                .where(NeuronMatch.run_id == run_id, NeuronMatch.self_corr.is_not(None))
            )
            if kind == "cross_model":
                assert n_univ > 0 and n_self == 0  # a different model's neuron i is no "self"
            else:
                assert n_univ == 0 and n_self == 2 * 2 * 128  # universality is only defined across models
    store.close()


def test_persistence_without_universality_names_the_command(two_models, run_cli):
    assert (
        run_cli(
            "ingest", "a", "--step", 2, "--dataset", "d", "--source", two_models["a"], "--quiet", "--identical-weights"
        ).exit_code
        == 0
    )
    r = run_cli("persistence", "--model", "a", "--steps", "0,1,2", "--quiet")
    assert r.exit_code == 1 and "actdb correlate --dataset d --step 2 --models a," in r.stderr


@pytest.fixture
def evaluator(tiny_models, run_cli, tokenizer_dir, text_dir, store_config):
    run_cli("init")
    run_cli("dataset", "add", "d", text_dir, "--tokenizer", tokenizer_dir, "--seq-len", 64, "--tokens", 1500)
    ds = TokenDataset.load(store_config.home / store_config.dataset_path("d"))
    model = load_model(str(tiny_models["gpt2"]), None, torch.device("cpu"))
    return LossEvaluator(model, ds.tokens, ds.mask, batch_size=8)


def _reference_loss(model, tokens, mask):
    """Mean next-token CE on counted targets from a plain, unhooked forward pass."""
    with torch.inference_mode():
        ids = torch.from_numpy(tokens.astype(np.int64))
        logits = model(input_ids=ids).logits[:, :-1]
        ce = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="none"
        ).view(ids.shape[0], -1)
        m = torch.from_numpy(mask[:, 1:])
        return float((ce * m).sum() / m.sum())


def test_clean_loss_matches_unhooked_forward(evaluator):
    ref = _reference_loss(evaluator.model, evaluator.tokens, evaluator.mask)
    assert evaluator.loss() == pytest.approx(ref, abs=1e-6)
    empty = ablate(evaluator, [], "zero", {}, progress=False)
    assert empty.ablated_loss == empty.base_loss and empty.delta == 0.0


def test_zero_ablation_equals_zeroed_output_projection_row(evaluator):
    neurons = [(0, 3), (1, 17), (1, 90)]
    hooked = evaluator.loss(set_edits(neurons, "zero", {}))
    with torch.no_grad():
        saved = [evaluator.model.transformer.h[layer].mlp.c_proj.weight[n].clone() for layer, n in neurons]
        for layer, n in neurons:
            evaluator.model.transformer.h[layer].mlp.c_proj.weight[n] = 0.0
    surgery = evaluator.loss()
    with torch.no_grad():
        for (layer, n), w in zip(neurons, saved, strict=True):
            evaluator.model.transformer.h[layer].mlp.c_proj.weight[n] = w
    assert hooked == pytest.approx(surgery, abs=1e-5)
    assert abs(hooked - evaluator.loss()) > 1e-6


def test_mean_ablating_a_constant_neuron_changes_nothing(evaluator):
    mlp = evaluator.model.transformer.h[1].mlp
    with torch.no_grad():
        mlp.c_fc.weight[:, 7] = 0.0
        mlp.c_fc.bias[7] = 0.8
        constant = float(mlp.act(torch.tensor(0.8)))
    clean = evaluator.loss()
    assert evaluator.loss(set_edits([(1, 7)], "mean", {(1, 7): constant})) == pytest.approx(clean, abs=1e-6)


@pytest.mark.parametrize("arch", ["gpt2", "gpt_neox", "llama"])
@pytest.mark.parametrize("variants", [1, 3])
def test_prefix_sharing_sweep_equals_one_at_a_time(tiny_models, evaluator, arch, variants):
    model = load_model(str(tiny_models[arch]), None, torch.device("cpu"))
    ev = LossEvaluator(model, evaluator.tokens[:8], evaluator.mask[:8], batch_size=4)
    neurons = [(0, 1), (0, 2), (1, 5), (1, 100), (0, 127)]
    means = {n: 0.05 * i for i, n in enumerate(neurons)}
    for method in ("zero", "mean"):
        shared = ev.single_neuron_losses(neurons, method, means, variants)
        for n, loss in zip(neurons, shared, strict=True):
            assert loss == pytest.approx(ev.loss(set_edits([n], method, means)), abs=1e-5), (arch, n, method)
    assert ev.loss() == pytest.approx(_reference_loss(model, ev.tokens, ev.mask), abs=1e-6)


def test_controls_are_matched_per_layer_and_seeded():
    sel = [(0, 1), (0, 2), (1, 3)]
    a = matched_controls(sel, 16, 5, seed=1)
    assert a == matched_controls(sel, 16, 5, seed=1) and len({tuple(c) for c in a}) == 5
    for c in a:
        assert sorted(layer for layer, _ in c) == [0, 0, 1] and not set(c) & set(sel)


def test_cli_ablate_universal_with_controls_and_each(two_models, run_cli, store_config):
    r = run_cli(
        "ablate",
        "a@1",
        "--neurons",
        "universal:1",
        "--controls",
        4,
        "--each",
        "--variants-per-pass",
        3,
        "--tokens",
        1000,
        "--method",
        "mean",
        "--quiet",
    )
    assert r.exit_code == 0, r.stderr
    assert "controls (4)" in r.stdout and "p = " in r.stdout
    from sqlalchemy import select

    from actdb.store.database.connection import Store
    from actdb.store.database.schema import Ablation, AblationNeuron

    store = Store.open(store_config)
    with store.session() as s:
        ab = s.scalar(select(Ablation))
        singles = s.scalars(select(AblationNeuron)).all()
    store.close()
    assert ab.n_controls == 4 and 0 < ab.p_value <= 1 and ab.control_ci_low <= ab.control_mean <= ab.control_ci_high
    assert len(singles) == ab.n_neurons and all(x.layer == 1 for x in singles)


def test_cli_ablate_errors(two_models, run_cli, tmp_path):
    neuron_file = tmp_path / "neurons.txt"
    neuron_file.write_text("# chosen\n0.5\n1.9\n")
    ok = run_cli("ablate", "a@0", "--neurons", f"@{neuron_file}", "--tokens", 500, "--quiet")
    assert ok.exit_code == 0 and "2 neurons" in ok.stdout
    cases = {
        "out of range": ("a@0", "--neurons", "1.999"),
        "malformed neuron": ("a@0", "--neurons", "1-2"),
        "unknown model": ("zz@0", "--neurons", "0.1"),
        "has no step 5": ("a@5", "--neurons", "0.1"),
        "resolves to no neurons": ("a@0", "--neurons", "universal:7"),
        "distinct matched random sets": ("a@0", "--neurons", ",".join(f"0.{i}" for i in range(127)), "--controls", 500),
    }
    for expected, args in cases.items():
        r = run_cli("ablate", *args, "--tokens", 300, "--quiet")
        assert r.exit_code == 1 and expected in r.stderr, (expected, r.stderr)
        assert len(r.stderr.strip().splitlines()) == 1
    shutil.rmtree(two_models["b"])
    r = run_cli("ablate", "b@0", "--neurons", "0.1", "--quiet")
    assert r.exit_code == 1 and "gone" in r.stderr
