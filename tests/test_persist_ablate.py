"""Persistence across checkpoints and ablation against an unhooked forward pass and weight surgery."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from actdb.compute.ablation.loss import LossEvaluator, ablate, matched_controls, set_edits
from actdb.compute.persistence.math import emergence_steps, layer_overlap
from actdb.compute.persistence.run import _layer_rows, _Model
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


def test_self_correlation_is_averaged_over_the_layer_and_over_its_universal_neurons():
    universal_from = np.array([1, 0, 1, 0, 0, 1], dtype=bool)
    universal_to = np.array([1, 0, 0, 0, 0, 0], dtype=bool)
    self_corr = np.array([0.9, 0.1, 0.7, np.nan, 0.3, np.nan])  # NaN: a dead neuron has none
    (row,) = _layer_rows(0, 10, universal_from, universal_to, self_corr, _Model(1, 1, 1, 6))
    assert row.mean_self_corr == pytest.approx((0.9 + 0.1 + 0.7 + 0.3) / 4)
    assert row.mean_self_corr_universal == pytest.approx((0.9 + 0.7) / 2)
    (none,) = _layer_rows(0, 10, np.zeros(6, dtype=bool), universal_to, self_corr, _Model(1, 1, 1, 6))
    assert none.mean_self_corr_universal is None and none.n_universal_from == 0


def test_persistence_of_unchanged_model_is_one(two_models, run_cli, store_config):
    r = run_cli("persistence", "--model", "a", "--format", "json", "--quiet")
    assert r.exit_code == 0, r.stderr
    rows = json.loads(r.stdout)
    assert len(rows) == 2 and {row["layer"] for row in rows} == {0, 1}
    for row in rows:
        assert row["n_universal_from"] > 0
        assert row["p_persist"] == 1.0 and row["jaccard"] == 1.0
        assert row["mean_self_corr"] == pytest.approx(1.0, abs=1e-5)
        assert row["mean_self_corr_universal"] == pytest.approx(1.0, abs=1e-5)
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
            assert loss == pytest.approx(ev.loss(set_edits([n], method, means, ev.where)), abs=1e-5), (arch, n, method)
    assert ev.loss() == pytest.approx(_reference_loss(model, ev.tokens, ev.mask), abs=1e-6)


def test_controls_are_matched_per_layer_and_seeded():
    sel = [(0, 1), (0, 2), (1, 3)]
    a = matched_controls(sel, 16, 5, seed=1)
    assert a == matched_controls(sel, 16, 5, seed=1) and len({tuple(c) for c in a}) == 5
    for c in a:
        assert sorted(layer for layer, _ in c) == [0, 0, 1] and not set(c) & set(sel)


def test_cli_ablate_universal_with_controls_and_each(two_models, run_cli, store_config, tokenizer_dir, tmp_path):
    _other_documents_dataset(run_cli, tokenizer_dir, tmp_path)
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
        "--eval-dataset",
        "other",
        "--quiet",
    )
    assert r.exit_code == 0, r.stderr
    assert "controls (4)" in r.stdout and "p = " in r.stdout
    assert "measured on held-out sequences: other sequences 0:" in r.stdout and "counted positions only" in r.stdout
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
    assert (ab.eval_split, ab.positions, ab.selection_dataset_id) == ("held_out", "counted", 1)
    assert ab.dataset_id != ab.selection_dataset_id and ab.n_eval_sequences >= 1


def _other_documents_dataset(run_cli, tokenizer_dir, tmp_path):
    """Dataset `other`: standard-library files that the fixtures' dataset `d` does not contain."""
    from actdb.store.ingest.zoo import stdlib_texts

    folder = tmp_path / "other-texts"
    folder.mkdir()
    for i, text in enumerate(stdlib_texts(max_files=6, offset=80)):
        (folder / f"doc{i}.txt").write_text(text)
    r = run_cli("dataset", "add", "other", folder, "--tokenizer", tokenizer_dir, "--seq-len", 64, "--tokens", 1500)
    assert r.exit_code == 0, r.stderr


def test_ablation_is_held_out_by_default_and_in_sample_only_when_named(two_models, run_cli, tokenizer_dir, tmp_path):
    same = run_cli("ablate", "a@1", "--neurons", "universal", "--controls", 0, "--tokens", 300, "--quiet")
    assert same.exit_code == 1 and "--in-sample" in same.stderr and "--eval-dataset" in same.stderr
    assert len(same.stderr.strip().splitlines()) == 1
    old = run_cli(
        "ablate",
        "a@1",
        "--neurons",
        "universal",
        "--controls",
        0,
        "--tokens",
        300,
        "--in-sample",
        "--ablate-positions",
        "all",
        "--quiet",
    )
    assert old.exit_code == 0, old.stderr
    assert "IN SAMPLE" in old.stdout and "every position" in old.stdout
    _other_documents_dataset(run_cli, tokenizer_dir, tmp_path)
    held = run_cli(
        "ablate",
        "a@1",
        "--neurons",
        "universal",
        "--controls",
        0,
        "--eval-dataset",
        "other",
        "--eval-sequences",
        "2:6",
        "--quiet",
    )
    assert held.exit_code == 0, held.stderr
    assert "held-out sequences: other sequences 2:6 (4)" in held.stdout
    rows = json.loads(run_cli("ablations", "--format", "json").stdout)
    assert [(r["eval_split"], r["positions"], r["n_eval_sequences"]) for r in rows] == [
        ("in_sample", "all", 5),
        ("held_out", "counted", 4),
    ]


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


def test_impossible_controls_are_refused_before_any_pass_or_row(two_models, run_cli, store_config):
    """How many matched random sets exist is known from the selection: asking for more is one line, before the
    model is loaded (its files are gone here: a forward pass would fail otherwise) and before any ablation row."""
    from sqlalchemy import func, select

    from actdb.store.database.connection import Store
    from actdb.store.database.schema import Ablation

    shutil.rmtree(two_models["a"])
    crowded = ",".join(f"0.{i}" for i in range(70))
    r = run_cli("ablate", "a@0", "--neurons", crowded, "--controls", 1, "--quiet")
    assert r.exit_code == 1 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "--controls 1 is more than the 0 distinct matched random sets that exist" in r.stderr
    assert "layer 0 has 70 of its 128 neurons selected, more than the 58 left" in r.stderr
    r = run_cli("ablate", "a@0", "--neurons", "1.5", "--controls", 200, "--quiet")
    assert r.exit_code == 1 and r.stderr.strip().endswith(
        "--controls 200 is more than the 127 distinct matched random sets that exist"
    )
    store = Store.open(store_config)
    with store.session() as s:
        assert s.scalar(select(func.count()).select_from(Ablation)) == 0
    store.close()


def test_a_model_recorded_only_at_mlp_pre_is_ablated_by_its_own_set(two_models, run_cli):
    """Zero-ablation needs no means: a model with only mlp.pre sets is ablated, and the row says mlp.pre. Mean
    ablation puts mlp.post means in place of mlp.post activations: without that set it is one line and no row."""
    r = run_cli(
        "ingest",
        "c",
        "--step",
        0,
        "--dataset",
        "d",
        "--source",
        two_models["a"],
        "--hook",
        "mlp.pre",
        "--identical-weights",
        "--quiet",
    )
    assert r.exit_code == 0, r.stderr
    r = run_cli("ablate", "c@0", "--neurons", "0.1,1.2", "--method", "mean", "--controls", 0, "--quiet")
    assert r.exit_code == 1 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "--method mean replaces mlp.post activations by their mean, which needs the mlp.post set" in r.stderr
    assert "--method zero" in r.stderr and json.loads(run_cli("ablations", "--format", "json").stdout) == []
    r = run_cli("ablate", "c@0", "--neurons", "0.1,1.2", "--controls", 0, "--tokens", 300, "--quiet")
    assert r.exit_code == 0, r.stderr
    (row,) = json.loads(run_cli("ablations", "--format", "json").stdout)
    assert (row["model"], row["hook"], row["method"], row["n_neurons"]) == ("c", "mlp.pre", "zero", 2)


def _reference_ablated_loss(model, tokens, mask, neurons, values, counted_only):
    """GPT-2 run block by block from its modules, no hooks: each listed neuron's MLP activation is set to its
    value (at counted positions only, or everywhere) before the output projection; mean CE on counted targets."""
    tr = model.transformer
    with torch.inference_mode():
        ids = torch.from_numpy(tokens.astype(np.int64))
        at = torch.from_numpy(mask)
        h = tr.wte(ids) + tr.wpe(torch.arange(ids.shape[1]))[None]
        for layer, block in enumerate(tr.h):
            h = h + block.attn(block.ln_1(h))[0]
            post = block.mlp.act(block.mlp.c_fc(block.ln_2(h)))
            for (lay, n), v in zip(neurons, values, strict=True):
                if lay == layer:
                    post[..., n] = torch.where(at, v, post[..., n]) if counted_only else v
            h = h + block.mlp.c_proj(post)
        logits = model.lm_head(tr.ln_f(h))[:, :-1]
        ce = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="none"
        ).view(ids.shape[0], -1)
        m = torch.from_numpy(mask[:, 1:])
        return float((ce * m).sum() / m.sum())


@pytest.mark.parametrize("positions", ["counted", "all"])
def test_ablated_positions_match_an_unhooked_block_by_block_pass(evaluator, positions):
    ev = LossEvaluator(evaluator.model, evaluator.tokens[:6], evaluator.mask[:6], batch_size=4, positions=positions)
    assert (~ev.mask).any()  # BOS/EOS/padding: positions where the two options differ
    neurons, means = [(0, 3), (1, 17), (1, 90)], {(0, 3): 0.4, (1, 17): -0.2, (1, 90): 1.5}
    ref = _reference_ablated_loss(
        ev.model, ev.tokens, ev.mask, neurons, [means[n] for n in neurons], positions == "counted"
    )
    out = ablate(ev, neurons, "mean", means, progress=False)
    assert out.ablated_loss == pytest.approx(ref, abs=1e-5)
    assert out.base_loss == pytest.approx(_reference_loss(ev.model, ev.tokens, ev.mask), abs=1e-6)
    singles = ev.single_neuron_losses(neurons, "mean", means, 2)
    for n, loss in zip(neurons, singles, strict=True):
        assert loss == pytest.approx(
            _reference_ablated_loss(ev.model, ev.tokens, ev.mask, [n], [means[n]], positions == "counted"), abs=1e-5
        )
    other = "all" if positions == "counted" else "counted"
    moved = _reference_ablated_loss(
        ev.model, ev.tokens, ev.mask, neurons, [means[n] for n in neurons], other == "counted"
    )
    assert abs(moved - ref) > 1e-6  # the option changes the measurement
