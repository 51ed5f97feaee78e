"""Vocabulary statistics from the weights: the moments and extreme tokens of each MLP neuron's direct logit effect
equal scipy on `W_U^T diag(g) P w_out` written out from the raw weights (tied and untied heads, blocks smaller than
the MLP), the fold matches what the model's own final norm and LM head do, and the prediction/suppression rule."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import stats as sps
from transformers import AutoModelForCausalLM

from actdb.compute.explain.vocabulary import (
    PREDICTION,
    SUPPRESSION,
    VOCAB_KURTOSIS_MIN,
    VOCAB_RULE,
    vocab_labels,
    vocabulary_statistics,
)
from actdb.store.errors import ActdbError
from actdb.store.ingest.architectures import (
    adapter_for,
    final_norm,
    mlp_output_weights,
    supported_architectures,
    unembedding,
)
from actdb.store.ingest.model_loading import load_model
from actdb.store.ingest.zoo import tiny_config

VOCAB = 301
D_MLP = 96  # d_model is 32, so a transposed output matrix cannot pass unnoticed
BLOCK = 40  # smaller than d_mlp and not a divisor: full blocks and a ragged last one
K = 10
ARCHS = [name for name, _ in supported_architectures()]


def tiny(arch: str, seed: int = 0, **overrides: object) -> torch.nn.Module:
    """A random tiny model whose norms have random gains and biases, so a missed fold shows."""
    torch.manual_seed(seed)
    config = tiny_config(arch, VOCAB, d_mlp=128 if arch == "bloom" else D_MLP)
    for key, value in overrides.items():
        setattr(config, key, value)
    model = AutoModelForCausalLM.from_config(config).eval()
    gen = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        for module in model.modules():
            if "Norm" not in type(module).__name__:
                continue
            weight, bias = getattr(module, "weight", None), getattr(module, "bias", None)
            if isinstance(weight, torch.Tensor):
                # Gemma's RMSNorm multiplies by 1 + weight: centre its weights on 0 so 1 + w and w differ a lot
                low = -0.5 if type(module).__name__.startswith("Gemma") else 0.5
                weight.copy_(torch.rand(weight.shape, generator=gen) + low)
            if isinstance(bias, torch.Tensor):
                bias.copy_(0.1 * torch.randn(bias.shape, generator=gen))
    return model


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().to(torch.float64).numpy()


# arch: (final norm, LM head, layer l's output projection as (d_mlp, d_model), final norm is a LayerNorm)
RAW = {
    "gpt2": (
        lambda m: m.transformer.ln_f,
        lambda m: m.lm_head,
        lambda m, i: m.transformer.h[i].mlp.c_proj.weight,  # Conv1D: (in = d_mlp, out = d_model)
        True,
    ),
    "gpt_neox": (
        lambda m: m.gpt_neox.final_layer_norm,
        lambda m: m.lm_head,  # (called embed_out before transformers 5)
        lambda m, i: m.gpt_neox.layers[i].mlp.dense_4h_to_h.weight.T,  # nn.Linear: (out, in)
        True,
    ),
    "llama": (
        lambda m: m.model.norm,
        lambda m: m.lm_head,
        lambda m, i: m.model.layers[i].mlp.down_proj.weight.T,
        False,
    ),
}


def reference(model: torch.nn.Module, arch: str, layer: int, cosine: bool = False) -> np.ndarray:
    """(d_mlp, vocab): the final norm's gain folded into W_U, w_out centred over d_model under a LayerNorm; with
    `cosine`, TransformerLens's processed weights (W_U also centred over d_model and over the vocabulary)."""
    norm_of, head_of, out_of, layer_norm = RAW[arch]
    U = _np(head_of(model).weight).T  # (d_model, vocab)
    g = _np(norm_of(model).weight)
    W = _np(out_of(model, layer))  # (d_mlp, d_model)
    U = g[:, None] * U
    if layer_norm:
        W = W - W.mean(axis=1, keepdims=True)
    if not cosine:
        return W @ U
    if layer_norm:
        U = U - U.mean(axis=0, keepdims=True)
    U = U - U.mean(axis=1, keepdims=True)
    return (W @ U) / (np.linalg.norm(W, axis=1)[:, None] * np.linalg.norm(U, axis=0)[None, :])


def assert_matches(st, model: torch.nn.Module, arch: str, cosine: bool = False) -> None:
    n_layers = len(adapter_for(model).layers(model))
    assert st.shape == (n_layers, D_MLP) and st.top_ids.shape == (n_layers, D_MLP, K)
    assert st.top_ids.dtype == np.int64 and st.top_values.dtype == np.float64
    for layer in range(n_layers):
        V = reference(model, arch, layer, cosine)
        np.testing.assert_allclose(st.mean[layer], V.mean(axis=1), rtol=1e-6, atol=1e-15)
        np.testing.assert_allclose(st.var[layer], V.var(axis=1), rtol=1e-6)
        np.testing.assert_allclose(st.skew[layer], sps.skew(V, axis=1), rtol=1e-6)
        np.testing.assert_allclose(st.kurtosis[layer], sps.kurtosis(V, axis=1), rtol=1e-6)
        top = np.argsort(-V, axis=1, kind="stable")[:, :K]
        bottom = np.argsort(V, axis=1, kind="stable")[:, :K]
        np.testing.assert_array_equal(st.top_ids[layer], top)
        np.testing.assert_array_equal(st.bottom_ids[layer], bottom)
        np.testing.assert_allclose(st.top_values[layer], np.take_along_axis(V, top, axis=1), rtol=1e-10)
        np.testing.assert_allclose(st.bottom_values[layer], np.take_along_axis(V, bottom, axis=1), rtol=1e-10)


CASES = [
    ("gpt2", {}),
    ("gpt_neox", {}),
    ("llama", {"tie_word_embeddings": False}),
    ("llama", {"tie_word_embeddings": True}),
]


@pytest.mark.parametrize(("arch", "overrides"), CASES, ids=["gpt2", "gpt_neox", "llama-untied", "llama-tied"])
def test_moments_and_extremes_equal_scipy_on_raw_weights(arch, overrides):
    model = tiny(arch, **overrides)
    st = vocabulary_statistics(model, top_k=K, block=BLOCK)
    assert st.vocab_size == VOCAB and st.centered == RAW[arch][3] and not st.cosine
    assert_matches(st, model, arch)
    assert np.all(st.var > 0) and np.all(np.isfinite(st.kurtosis))


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_cosine_equals_transformerlens_processed_weights(arch):
    model = tiny(arch, seed=3)
    st = vocabulary_statistics(model, top_k=K, block=BLOCK, cosine=True)
    assert st.cosine
    assert_matches(st, model, arch, cosine=True)
    assert np.all(np.abs(st.top_values) <= 1 + 1e-12)


def test_tied_and_untied_heads():
    tied, untied = tiny("llama", tie_word_embeddings=True), tiny("llama", tie_word_embeddings=False)
    gpt2 = tiny("gpt2")
    ptr = lambda t: t.untyped_storage().data_ptr()  # noqa: E731
    assert ptr(unembedding(tied).weight) == ptr(tied.model.embed_tokens.weight)
    assert ptr(unembedding(untied).weight) != ptr(untied.model.embed_tokens.weight)
    assert ptr(unembedding(gpt2).weight) == ptr(gpt2.transformer.wte.weight)  # GPT-2 ties by default
    assert unembedding(tied).weight.shape == (32, VOCAB)
    head = unembedding(untied)
    assert not head.norm_centers and torch.equal(head.norm_scale, untied.model.norm.weight)
    assert unembedding(gpt2).norm_centers


def test_blocks_do_not_change_the_result():
    model = tiny("gpt_neox", seed=1)
    runs = [vocabulary_statistics(model, top_k=K, block=b) for b in (1, BLOCK, D_MLP, 10_000)]
    for st in runs[1:]:
        for name in ("mean", "var", "skew", "kurtosis", "top_values", "bottom_values"):
            np.testing.assert_allclose(getattr(st, name), getattr(runs[0], name), rtol=1e-12, atol=1e-18)
        np.testing.assert_array_equal(st.top_ids, runs[0].top_ids)
        np.testing.assert_array_equal(st.bottom_ids, runs[0].bottom_ids)


def test_loaded_by_path_equals_in_memory(tmp_path):
    model = tiny("llama", seed=2, tie_word_embeddings=False)
    model.save_pretrained(tmp_path / "m")
    loaded = load_model(str(tmp_path / "m"), None, torch.device("cpu"))
    a, b = vocabulary_statistics(model, block=BLOCK), vocabulary_statistics(loaded, block=BLOCK)
    np.testing.assert_array_equal(a.kurtosis, b.kurtosis)
    np.testing.assert_array_equal(a.top_ids, b.top_ids)


@pytest.mark.parametrize("arch", ARCHS)
def test_output_rows_are_what_each_neuron_writes(arch):
    """Row i of layer l is out_proj(e_i) - out_proj(0), whichever way the family stores the matrix."""
    model = tiny(arch)
    adapter = adapter_for(model)
    layer = adapter.layers(model)[-1]
    proj = adapter.out_proj(layer)
    rows = mlp_output_weights(model)[-1]
    d_mlp = rows.shape[0]
    with torch.no_grad():
        eye = torch.eye(d_mlp)
        written = proj(eye) - proj(torch.zeros(1, d_mlp))
    torch.testing.assert_close(rows, written, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("arch", ARCHS)
def test_fold_matches_the_models_own_norm_and_head(arch):
    """Through the model's modules, head(norm(t w)) - head(norm(0)) is a positive multiple of the folded
    W_U^T diag(g) P w for every supported family (LayerNorm centring, RMSNorm, Gemma's 1 + weight, LM-head bias)."""
    model = tiny(arch, seed=5)
    norm, head = final_norm(model), model.get_output_embeddings()
    assert norm is not None
    full = vocabulary_statistics(model, top_k=VOCAB, block=BLOCK)  # every token's value, in order
    rows = mlp_output_weights(model)[-1][:6]
    with torch.no_grad():
        x = 30.0 * rows
        probe = _np(head(norm(x)) - head(norm(torch.zeros_like(x))))
    v = np.zeros_like(probe)
    np.put_along_axis(v, full.top_ids[-1, :6], full.top_values[-1, :6], axis=1)
    unit = lambda a: a / np.linalg.norm(a, axis=1, keepdims=True)  # noqa: E731
    np.testing.assert_allclose(unit(probe), unit(v), atol=2e-5)


def test_no_output_embedding_is_a_one_line_error():
    model = tiny("gpt2")
    model.get_output_embeddings = lambda: None
    with pytest.raises(ActdbError, match="no output embedding") as info:
        vocabulary_statistics(model)
    assert "\n" not in str(info.value)


def test_arguments_and_degenerate_neurons():
    model = tiny("gpt2")
    with torch.no_grad():
        model.transformer.h[0].mlp.c_proj.weight[3].zero_()
    st = vocabulary_statistics(model, top_k=VOCAB + 5, block=BLOCK)
    assert st.top_ids.shape == (2, D_MLP, VOCAB)  # k is capped at the vocabulary
    assert st.var[0, 3] == 0 and np.isnan(st.skew[0, 3]) and np.isnan(st.kurtosis[0, 3])
    assert st.labels()[0, 3] == ""
    assert vocabulary_statistics(model, top_k=0).top_ids.shape == (2, D_MLP, 0)
    for bad in ({"top_k": -1}, {"block": 0}):
        with pytest.raises(ActdbError):
            vocabulary_statistics(model, **bad)


def test_label_rule_on_hand_made_moments():
    skew = np.array([[2.0, -2.0, 2.0, -2.0, 0.0, np.nan], [0.5, -0.5, 3.0, -3.0, 1.0, -1.0]])
    kurt = np.array([[10.0, 10.0, 5.0, 5.0, 10.0, 10.0], [8.0, 8.0, np.nan, VOCAB_KURTOSIS_MIN, 7.5, 7.5]])
    assert VOCAB_KURTOSIS_MIN == 7.0  # Pearson kurtosis 10 in the authors' code
    labels = vocab_labels(skew, kurt)
    assert labels.shape == skew.shape
    assert labels.tolist() == [
        [PREDICTION, SUPPRESSION, "", "", "", ""],
        [PREDICTION, SUPPRESSION, "", "", PREDICTION, SUPPRESSION],  # the kurtosis cut-off is strict
    ]
    strict = vocab_labels(skew, kurt, kurtosis_min=7.0, skew_min=0.75)
    assert strict[1].tolist() == ["", "", "", "", PREDICTION, SUPPRESSION]
    assert vocab_labels(2.0, 12.0) == PREDICTION  # scalars broadcast
    with pytest.raises(ActdbError):
        vocab_labels(skew, kurt, skew_min=-1.0)
    assert "\n" not in VOCAB_RULE and PREDICTION in VOCAB_RULE and SUPPRESSION in VOCAB_RULE
