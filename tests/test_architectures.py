"""Architecture adapters: every supported family records its exact MLP post-activation, is decided from the config
before any weights load, and keeps prefix-shared ablation exact; MoE and encoder models are refused in one line."""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import pytest
import torch
from transformers import AutoConfig

from actdb.compute.ablation.loss import LossEvaluator, set_edits
from actdb.store.errors import ActdbError
from actdb.store.ingest.architectures import (
    MLPRecorder,
    adapter_for,
    adapter_for_config,
    mlp_adds_to_residual,
    mlp_shape,
    supported_architectures,
)
from actdb.store.ingest.model_loading import load_model
from actdb.store.ingest.zoo import save_tiny_model

ARCHS = [name for name, _ in supported_architectures()]
NEW_FAMILIES = [
    "bloom",
    "falcon",
    "gemma",
    "gemma2",
    "gemma3_text",
    "gpt_neo",
    "gptj",
    "opt",
    "phi",
    "phi3",
    "stablelm",
]
POST_NORM = {"gemma2", "gemma3_text", "olmo2"}  # post_feedforward_layernorm on the MLP output


def d_mlp_of(arch: str) -> int:
    """96, not 4 * d_model (128), so an adapter falling back to 4 * hidden is caught; bloom is fixed at 4 * d."""
    return 128 if arch == "bloom" else 96


def _gelu(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * x * (1 + torch.erf(x / math.sqrt(2)))


def _gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))


ACTS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "gelu": _gelu,
    "gelu_new": _gelu_tanh,
    "gelu_pytorch_tanh": _gelu_tanh,
    "silu": lambda x: x * torch.sigmoid(x),
    "relu": lambda x: x.clamp(min=0),
}

# arch: (the MLP's owner on the decoder layer ("" = the layer itself), its input linears, the activation's name)
PLAIN = {
    "gpt2": ("mlp", "c_fc", lambda c: c.activation_function),
    "gpt_neox": ("mlp", "dense_h_to_4h", lambda c: c.hidden_act),
    "gpt_neo": ("mlp", "c_fc", lambda c: c.activation_function),
    "gptj": ("mlp", "fc_in", lambda c: c.activation_function),
    "bloom": ("mlp", "dense_h_to_4h", lambda c: "gelu_new"),  # BloomGelu is the tanh approximation
    "falcon": ("mlp", "dense_h_to_4h", lambda c: c.activation),
    "opt": ("", "fc1", lambda c: c.activation_function),
    "phi": ("mlp", "fc1", lambda c: c.hidden_act),
}


def _linear(module: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """`module(x)` from its weights: GPT-2's Conv1D stores (in, out), nn.Linear (out, in)."""
    y = x @ module.weight if type(module).__name__ == "Conv1D" else x @ module.weight.T
    return y if module.bias is None else y + module.bias


def _mlp_parts(arch: str, layer: torch.nn.Module, config) -> tuple[list[torch.nn.Module], Callable]:
    """The MLP's input linears and the manual post-activation formula of one decoder layer."""
    if arch in PLAIN:
        owner, name, act = PLAIN[arch]
        fc = getattr(getattr(layer, owner) if owner else layer, name)
        return [fc], lambda x: ACTS[act(config)](_linear(fc, x))
    mlp = layer.mlp
    act = ACTS[getattr(config, "hidden_activation", None) or config.hidden_act]
    if arch == "phi3":
        gate_w, up_w = mlp.gate_up_proj.weight.chunk(2, dim=0)
        return [mlp.gate_up_proj], lambda x: act(x @ gate_w.T) * (x @ up_w.T)
    return [mlp.gate_proj, mlp.up_proj], lambda x: act(_linear(mlp.gate_proj, x)) * _linear(mlp.up_proj, x)


@pytest.fixture(scope="module")
def saved(tmp_path_factory, tokenizer_dir) -> Callable[[str], str]:
    """`saved(arch)`: the folder of a tiny random model of that architecture (built once per module)."""
    root = tmp_path_factory.mktemp("arch_models")
    cache: dict[str, str] = {}

    def get(arch: str) -> str:
        if arch not in cache:
            seed = ARCHS.index(arch)
            cache[arch] = str(save_tiny_model(arch, root / arch, tokenizer_dir, seed=seed, d_mlp=d_mlp_of(arch)))
        return cache[arch]

    return get


def test_every_family_is_listed_with_a_description():
    listed = dict(supported_architectures())
    for arch in NEW_FAMILIES + ["gpt2", "gpt_neox", "llama", "mistral", "qwen2", "qwen3", "olmo", "olmo2"]:
        assert listed.get(arch), arch
        assert "\n" not in listed[arch]
    assert sorted(ARCHS) == ARCHS


@pytest.mark.parametrize("arch", ARCHS)
def test_records_exact_mlp_post_activation(saved, arch):
    model = load_model(saved(arch), None, torch.device("cpu"))
    config = AutoConfig.from_pretrained(saved(arch))
    d_mlp = d_mlp_of(arch)
    assert mlp_shape(model) == (2, d_mlp)
    assert adapter_for_config(config).d_mlp(config) == d_mlp
    layers = adapter_for(model).layers(model)
    ids = torch.randint(1, model.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    inputs: dict[int, torch.Tensor] = {}
    handles = []
    for i, layer in enumerate(layers):
        linears, _ = _mlp_parts(arch, layer, config)
        handles.append(linears[0].register_forward_pre_hook(lambda _m, a, i=i: inputs.__setitem__(i, a[0])))
    with torch.no_grad():
        for i, layer in enumerate(layers):  # pre-activations of order 1, where the activation functions differ
            model(input_ids=ids, use_cache=False)
            linears, _ = _mlp_parts(arch, layer, config)
            scale = 2.0 / float(_linear(linears[0], inputs[i]).std())
            for lin in linears:
                lin.weight.mul_(scale)
    with MLPRecorder(model) as rec, torch.inference_mode():
        model(input_ids=ids, use_cache=False)
    for h in handles:
        h.remove()
    for i, layer in enumerate(layers):
        _, formula = _mlp_parts(arch, layer, config)
        with torch.inference_mode():
            expected = formula(inputs[i]).reshape(-1, d_mlp)
        got = rec.outputs[i]
        assert got.shape == (2, 16, d_mlp), (arch, got.shape)
        assert expected.abs().max() > 0.5, "the pre-activations should reach the non-linear range"
        torch.testing.assert_close(got.reshape(-1, d_mlp), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch", ARCHS)
def test_records_exact_mlp_pre_activation(saved, arch):
    """`mlp.pre` is the input (gated: the gate) projection's output before the nonlinearity, computed here
    from the weights: `W_in x + b`, or the gate half of a fused gate/up product."""
    model = load_model(saved(arch), None, torch.device("cpu"))
    config = AutoConfig.from_pretrained(saved(arch))
    d_mlp = d_mlp_of(arch)
    layers = adapter_for(model).layers(model)
    ids = torch.randint(1, model.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(1))
    inputs: dict[int, torch.Tensor] = {}
    handles = [
        _mlp_parts(arch, layer, config)[0][0].register_forward_pre_hook(lambda _m, a, i=i: inputs.__setitem__(i, a[0]))
        for i, layer in enumerate(layers)
    ]
    with MLPRecorder(model, "mlp.pre") as rec, torch.inference_mode():
        model(input_ids=ids, use_cache=False)
    for h in handles:
        h.remove()
    for i, layer in enumerate(layers):
        first = _mlp_parts(arch, layer, config)[0][0]
        with torch.inference_mode():
            expected = _linear(first, inputs[i])
        expected = expected.reshape(-1, expected.shape[-1])[:, :d_mlp]  # phi3: the gate half of gate_up_proj
        assert rec.outputs[i].shape == (2, 16, d_mlp), (arch, rec.outputs[i].shape)
        torch.testing.assert_close(rec.outputs[i].reshape(-1, d_mlp), expected, rtol=1e-5, atol=1e-5)


def _config_only(tmp_path, config) -> str:
    """A folder holding config.json and nothing else: loading any weights from it must fail."""
    folder = tmp_path / config.model_type
    config.save_pretrained(folder)
    assert [p.name for p in folder.iterdir()] == ["config.json"]
    return str(folder)


def _refused(source: str) -> str:
    with pytest.raises(ActdbError) as info:
        load_model(source, None, torch.device("cpu"))
    message = str(info.value)
    assert len(message.splitlines()) == 1 and "supported: " in message and "gpt2" in message, message
    return message


def _moe_configs():
    from transformers import MixtralConfig, OlmoeConfig, Qwen2MoeConfig

    sizes = dict(
        vocab_size=300,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=4,
        num_experts_per_tok=2,
    )
    return [
        MixtralConfig(num_local_experts=4, **sizes),
        OlmoeConfig(num_experts=4, **sizes),
        Qwen2MoeConfig(num_experts=4, moe_intermediate_size=16, shared_expert_intermediate_size=16, **sizes),
    ]


@pytest.mark.parametrize("index", range(3), ids=["mixtral", "olmoe", "qwen2_moe"])
def test_moe_refused_from_config_alone(tmp_path, index):
    config = _moe_configs()[index]
    message = _refused(_config_only(tmp_path, config))
    assert f"unsupported architecture {config.model_type!r}" in message
    assert "mixture-of-experts model with 4 experts" in message and "no single MLP" in message


def test_encoder_and_other_non_causal_models_refused_from_config_alone(tmp_path):
    from transformers import BertConfig, Gemma3Config, T5Config

    bert = BertConfig(vocab_size=300, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)
    message = _refused(_config_only(tmp_path, bert))
    assert "unsupported architecture 'bert'" in message and "encoder-only" in message
    t5 = T5Config(vocab_size=300, d_model=32, d_ff=64, num_layers=1, num_heads=2, d_kv=8)
    assert "encoder-decoder" in _refused(_config_only(tmp_path, t5))
    assert "gemma3_text" in _refused(_config_only(tmp_path, Gemma3Config()))


def test_unexact_bloom_variant_refused():
    from transformers import BloomConfig

    with pytest.raises(ActdbError, match="slow_but_exact"):
        adapter_for_config(BloomConfig(pretraining_tp=2, slow_but_exact=True))
    assert adapter_for_config(BloomConfig(pretraining_tp=2)).name == "bloom"


def test_refusal_reads_no_weights(tmp_path, monkeypatch):
    """With weights present, a refused model never reaches `from_pretrained`; a supported config-only folder
    passes the check and only then fails on the missing weights."""
    import transformers
    from transformers import AutoModelForCausalLM

    moe = _moe_configs()[0]
    AutoModelForCausalLM.from_config(moe).save_pretrained(tmp_path / "mixtral-full")

    def no_weights(*_a, **_k):
        raise AssertionError("weights were loaded for a refused architecture")

    with monkeypatch.context() as m:
        m.setattr(transformers.AutoModelForCausalLM, "from_pretrained", no_weights)
        assert "mixture-of-experts" in _refused(str(tmp_path / "mixtral-full"))
    from actdb.store.ingest.zoo import tiny_config

    supported = _config_only(tmp_path, tiny_config("gptj", 300))
    with pytest.raises(ActdbError, match="cannot load model"):
        load_model(supported, None, torch.device("cpu"))


def test_residual_additivity_flags(saved):
    for arch in ("gptj", "falcon", "opt", "phi", "gemma2", "olmo2"):
        model = load_model(saved(arch), None, torch.device("cpu"))
        assert mlp_adds_to_residual(model) == (arch not in POST_NORM), arch
    from transformers import OPTConfig

    assert adapter_for_config(OPTConfig(do_layer_norm_before=False)).adds_to_residual(OPTConfig()) is True
    assert not adapter_for_config(OPTConfig()).adds_to_residual(OPTConfig(do_layer_norm_before=False))


def _evaluator(saved, arch: str) -> LossEvaluator:
    model = load_model(saved(arch), None, torch.device("cpu"))
    rng = np.random.default_rng(0)
    tokens = rng.integers(1, model.config.vocab_size, size=(6, 24)).astype(np.int32)
    tokens[:, 0] = 0
    mask = np.ones(tokens.shape, dtype=bool)
    mask[:, 0] = False
    mask[2, 20:] = False
    return LossEvaluator(model, tokens, mask, batch_size=4)


def _sweep_matches(ev: LossEvaluator, variants: int) -> None:
    last = ev.d_mlp - 1
    neurons = [(0, 1), (0, last), (1, 5), (1, 60)]
    means = {n: 0.3 * (i + 1) for i, n in enumerate(neurons)}
    for method in ("zero", "mean"):
        shared = ev.single_neuron_losses(neurons, method, means, variants)
        for n, loss in zip(neurons, shared, strict=True):
            assert loss == pytest.approx(ev.loss(set_edits([n], method, means, ev.where)), abs=1e-5), (n, method)


@pytest.mark.parametrize("arch", ["gptj", "falcon", "phi", "opt", "bloom", "phi3"])
def test_prefix_sharing_sweep_equals_one_at_a_time(saved, arch):
    """Parallel attention/MLP blocks (gptj, falcon, phi), OPT's flattened MLP and bloom's alibi blocks resume
    from a cached layer output exactly like a hooked full pass."""
    _sweep_matches(_evaluator(saved, arch), variants=2)


@pytest.mark.parametrize("arch", sorted(POST_NORM))
def test_single_neuron_sweep_is_exact_after_a_post_mlp_norm(saved, arch):
    """A norm between the MLP and the residual stream breaks the shared-prefix shortcut, so these families are
    swept with one hooked pass per neuron; the result equals the one-at-a-time reference."""
    _sweep_matches(_evaluator(saved, arch), variants=1)


def test_readme_lists_every_supported_architecture():
    from pathlib import Path

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    for name, recorded in supported_architectures():
        assert f"| `{name}` | {recorded} |" in readme, name
