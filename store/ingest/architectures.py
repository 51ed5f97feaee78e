"""Architecture adapters: where each model family's MLP output projection sits, and hooks on its input.

The recorded activation ("mlp.post", TransformerLens `blocks.L.mlp.hook_post`) is the input of the MLP's
output projection: `act(W_in x)` for GPT-2 and GPT-NeoX, `act(gate(x)) * up(x)` for Llama-style gated MLPs.
Hooking that input is exact by construction and lets ablation replace neurons at the same place.

The adapter is chosen from the config alone (`adapter_for_config`), so an unsupported, mixture-of-experts or
encoder-only model is refused before any weights load.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
from torch import nn

from actdb.store.errors import ActdbError
from actdb.store.hook_names import HOOK_NAME, HOOKS


def _always(_config: object) -> bool:
    return True


def _no_objection(_config: object) -> str | None:
    return None


@dataclass(frozen=True)
class Adapter:
    """How to find the layers' MLP output projections and the MLP width in one architecture."""

    name: str
    layers: Callable[[nn.Module], list[nn.Module]]
    out_proj: Callable[[nn.Module], nn.Module]
    d_mlp: Callable[[object], int]
    recorded: str = ""
    """What the recorded activation is, in the module names of this family (one line, for the README)."""
    adds_to_residual: Callable[[object], bool] = _always
    """Whether the output projection's result is added unchanged to the residual stream (no norm after it), so
    that ablating a neuron changes the layer's output by exactly `out_proj(new) - out_proj(old)`; prefix-shared
    single-neuron ablation (`LossEvaluator.single_neuron_losses`) is exact only then."""
    flat_tokens: bool = False
    """The output projection sees `(batch * seq, d_mlp)` (OPT); the recorder restores `(batch, seq, d_mlp)`."""
    objection: Callable[[object], str | None] = _no_objection
    """A reason this family's particular config cannot be recorded exactly, or None."""
    in_proj: Callable[[nn.Module], nn.Module] | None = None
    """The MLP's input (or, gated, its gate) projection, whose output is the pre-activation (`mlp.pre`)."""
    fused_gate: bool = False
    """`in_proj` computes (gate, up) in one product (phi3): the pre-activation is the first half."""


def _gated(name: str, gelu_tanh: bool = False) -> Adapter:
    """A Llama-style gated MLP `down_proj(act(gate_proj x) * up_proj x)` under `model.layers[i].mlp`."""
    return Adapter(
        name,
        lambda m: list(m.model.layers),
        lambda layer: layer.mlp.down_proj,
        lambda c: c.intermediate_size,
        "act(gate_proj x) * up_proj x" + (" (act: GELU-tanh)" if gelu_tanh else ""),
        in_proj=lambda layer: layer.mlp.gate_proj,
    )


def _bloom_objection(config: object) -> str | None:
    if getattr(config, "pretraining_tp", 1) > 1 and getattr(config, "slow_but_exact", False):
        return (
            "bloom with slow_but_exact=True and pretraining_tp > 1 applies dense_4h_to_h by weight slices, "
            "bypassing the module whose input actdb records"
        )
    return None


ADAPTERS: dict[str, Adapter] = {
    "gpt2": Adapter(
        "gpt2",
        lambda m: list(m.transformer.h),
        lambda layer: layer.mlp.c_proj,
        lambda c: c.n_inner or 4 * c.n_embd,
        "act(c_fc x)",
        in_proj=lambda layer: layer.mlp.c_fc,
    ),
    "gpt_neox": Adapter(
        "gpt_neox",
        lambda m: list(m.gpt_neox.layers),
        lambda layer: layer.mlp.dense_4h_to_h,
        lambda c: c.intermediate_size,
        "act(dense_h_to_4h x)",
        in_proj=lambda layer: layer.mlp.dense_h_to_4h,
    ),
    "gpt_neo": Adapter(
        "gpt_neo",
        lambda m: list(m.transformer.h),
        lambda layer: layer.mlp.c_proj,
        lambda c: c.intermediate_size or 4 * c.hidden_size,
        "act(c_fc x)",
        in_proj=lambda layer: layer.mlp.c_fc,
    ),
    "gptj": Adapter(
        "gptj",
        lambda m: list(m.transformer.h),
        lambda layer: layer.mlp.fc_out,
        lambda c: c.n_inner or 4 * c.n_embd,
        "act(fc_in x) (attention and MLP in parallel)",
        in_proj=lambda layer: layer.mlp.fc_in,
    ),
    "bloom": Adapter(
        "bloom",
        lambda m: list(m.transformer.h),
        lambda layer: layer.mlp.dense_4h_to_h,
        lambda c: 4 * c.hidden_size,
        "gelu_tanh(dense_h_to_4h x)",
        objection=_bloom_objection,
        in_proj=lambda layer: layer.mlp.dense_h_to_4h,
    ),
    "falcon": Adapter(
        "falcon",
        lambda m: list(m.transformer.h),
        lambda layer: layer.mlp.dense_4h_to_h,
        lambda c: c.ffn_hidden_size or 4 * c.hidden_size,
        "act(dense_h_to_4h x) (attention and MLP in parallel unless parallel_attn=False)",
        in_proj=lambda layer: layer.mlp.dense_h_to_4h,
    ),
    "opt": Adapter(
        "opt",
        lambda m: list(m.model.decoder.layers),
        lambda layer: layer.fc2,
        lambda c: c.ffn_dim,
        "act(fc1 x) (fc1/fc2 on the decoder layer, no mlp submodule)",
        # OPT-350m (do_layer_norm_before=False) normalises after adding the MLP output to the residual
        adds_to_residual=lambda c: bool(getattr(c, "do_layer_norm_before", True)),
        flat_tokens=True,
        in_proj=lambda layer: layer.fc1,
    ),
    "phi": Adapter(
        "phi",
        lambda m: list(m.model.layers),
        lambda layer: layer.mlp.fc2,
        lambda c: c.intermediate_size,
        "act(fc1 x) (attention and MLP in parallel)",
        in_proj=lambda layer: layer.mlp.fc1,
    ),
    "phi3": Adapter(
        "phi3",
        lambda m: list(m.model.layers),
        lambda layer: layer.mlp.down_proj,
        lambda c: c.intermediate_size,
        "act(gate) * up, where (gate, up) = gate_up_proj x",
        in_proj=lambda layer: layer.mlp.gate_up_proj,
        fused_gate=True,
    ),
}
for _name in ("llama", "mistral", "qwen2", "qwen3", "olmo", "olmo2", "stablelm", "gemma", "gemma2", "gemma3_text"):
    ADAPTERS[_name] = _gated(_name, _name.startswith("gemma"))
for _name in ("olmo2", "gemma2", "gemma3_text"):
    # post_feedforward_layernorm normalises the MLP output before it joins the residual stream
    ADAPTERS[_name] = replace(ADAPTERS[_name], adds_to_residual=lambda _c: False)

# a reason per model type that is known but deliberately not supported
REFUSED_TYPES = {
    "gemma3": (
        "gemma3 with a vision tower loads as Gemma3ForConditionalGeneration, whose config keeps the text sizes "
        "under text_config; the text-only form gemma3_text (Gemma3ForCausalLM) is supported"
    ),
}
MOE_TYPES = frozenset(
    {"mixtral", "olmoe", "qwen2_moe", "qwen3_moe", "deepseek_v2", "deepseek_v3", "dbrx", "jamba", "granitemoe"}
)
EXPERT_COUNT_KEYS = ("num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts")
ENCODER_TYPES = frozenset(
    {
        "albert",
        "bert",
        "big_bird",
        "camembert",
        "convbert",
        "data2vec-text",
        "deberta",
        "deberta-v2",
        "distilbert",
        "electra",
        "ernie",
        "esm",
        "flaubert",
        "funnel",
        "ibert",
        "longformer",
        "megatron-bert",
        "mobilebert",
        "modernbert",
        "mpnet",
        "nomic_bert",
        "rembert",
        "roberta",
        "roberta-prelayernorm",
        "roformer",
        "squeezebert",
        "xlm",
        "xlm-roberta",
        "xlm-roberta-xl",
    }
)


def _expert_count(config: object) -> int:
    counts = [getattr(config, key, None) for key in EXPERT_COUNT_KEYS]
    return max([int(n) for n in counts if isinstance(n, int) and not isinstance(n, bool)] or [0])


def _is_causal_lm_type(model_type: str) -> bool:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES


def adapter_for_config(config: object) -> Adapter:
    """The adapter for a transformers config, decided before any weights load; a one-line ActdbError naming the
    reason (mixture of experts, encoder-only, or simply not supported) and the supported architectures."""
    model_type = getattr(config, "model_type", None) or "?"

    def refuse(reason: str) -> ActdbError:
        return ActdbError(
            f"unsupported architecture {model_type!r}: {reason}; supported: {', '.join(sorted(ADAPTERS))}"
        )

    experts = _expert_count(config)
    if experts > 1 or model_type in MOE_TYPES:
        count = f" with {experts} experts" if experts > 1 else ""
        raise refuse(
            f"a mixture-of-experts model{count}, and an MoE layer has no single MLP whose neurons mean the same "
            "thing for every token"
        )
    adapter = ADAPTERS.get(model_type)
    if adapter is not None:
        reason = adapter.objection(config)
        if reason:
            raise refuse(reason)
        return adapter
    if model_type in REFUSED_TYPES:
        raise refuse(REFUSED_TYPES[model_type])
    if getattr(config, "is_encoder_decoder", False):
        raise refuse("an encoder-decoder model; actdb records decoder-only causal language models")
    if model_type in ENCODER_TYPES:
        raise refuse("an encoder-only model, not a causal language model; actdb records decoder-only causal LMs")
    if not _is_causal_lm_type(model_type):
        raise refuse("not a causal language model (transformers has no AutoModelForCausalLM class for it)")
    raise refuse("no adapter for this model family")


def adapter_for(model: nn.Module) -> Adapter:
    """The adapter of a loaded model (see `adapter_for_config`)."""
    return adapter_for_config(model.config)


def supported_architectures() -> list[tuple[str, str]]:
    """(model_type, what is recorded) for every supported architecture, sorted by model type."""
    return [(name, ADAPTERS[name].recorded) for name in sorted(ADAPTERS)]


def mlp_shape(model: nn.Module) -> tuple[int, int]:
    """(n_layers, d_mlp) of a loaded model."""
    adapter = adapter_for(model)
    return len(adapter.layers(model)), int(adapter.d_mlp(model.config))


def mlp_adds_to_residual(model: nn.Module) -> bool:
    """Whether each MLP's output projection result is added unchanged to the residual stream (see `Adapter`)."""
    return bool(adapter_for(model).adds_to_residual(model.config))


class HookSet:
    """Registered hook handles, removed together (also as a context manager)."""

    handles: list

    def remove(self) -> None:
        for h in self.handles:
            h.remove()

    def __enter__(self):
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()


class MLPRecorder(HookSet):
    """Hooks that keep each layer's MLP activation `(batch, seq, d_mlp)` from the latest pass: the input of the
    output projection (`mlp.post`, a forward pre-hook) or the output of the input/gate projection (`mlp.pre`, a
    forward hook; for a fused gate/up product its gate half)."""

    def __init__(self, model: nn.Module, hook: str = HOOK_NAME) -> None:
        adapter = adapter_for(model)
        if hook not in HOOKS:
            raise ActdbError(f"unknown hook {hook!r}; use {' or '.join(HOOKS)}")
        layers = adapter.layers(model)
        self.outputs: list[torch.Tensor | None] = [None] * len(layers)
        self._token_shape: list[tuple[int, ...]] = [()] * len(layers)
        self.handles = []
        for i, layer in enumerate(layers):
            if adapter.flat_tokens:
                self.handles.append(layer.register_forward_pre_hook(self._shape_hook(i), with_kwargs=True))
            if hook == "mlp.post":
                self.handles.append(adapter.out_proj(layer).register_forward_pre_hook(self._post(i)))
            else:
                self.handles.append(adapter.in_proj(layer).register_forward_hook(self._pre(i, adapter.fused_gate)))

    def _shape_hook(self, index: int):
        def hook(_module: nn.Module, args: tuple, kwargs: dict) -> None:
            hidden = args[0] if args else kwargs["hidden_states"]
            self._token_shape[index] = tuple(hidden.shape[:-1])

        return hook

    def _keep(self, index: int, x: torch.Tensor) -> None:
        shape = self._token_shape[index]
        if x.dim() == 2 and len(shape) > 1:
            x = x.view(*shape, x.shape[-1])
        self.outputs[index] = x

    def _post(self, index: int):
        def hook(_module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
            self._keep(index, args[0].detach())

        return hook

    def _pre(self, index: int, fused: bool):
        def hook(_module: nn.Module, _args: tuple, output: torch.Tensor) -> None:
            out = output.detach()
            self._keep(index, out[..., : out.shape[-1] // 2] if fused else out)

        return hook


# --- weights for vocabulary statistics (the direct path from an MLP neuron to the logits) ---

# where the final norm (the module applied to the residual stream just before the LM head) sits, by family
FINAL_NORM_PATHS = (
    "transformer.ln_f",  # gpt2, gpt_neo, gptj, bloom, falcon
    "gpt_neox.final_layer_norm",
    "model.norm",  # llama-style families, phi3, stablelm, olmo, gemma
    "model.final_layernorm",  # phi
    "model.decoder.final_layer_norm",  # opt (None when do_layer_norm_before=False)
)


@dataclass(frozen=True)
class Unembedding:
    """The LM head as a (d_model, vocab) matrix plus what the final norm does to the residual stream before it."""

    weight: torch.Tensor
    """`(d_model, vocab)`: the output embedding's weight, transposed (a view, shared with the input embedding
    when the model ties them)."""
    norm_scale: torch.Tensor | None
    """`(d_model,)`: the final norm's effective per-dimension gain (`1 + weight` for Gemma's RMSNorm), or None when
    there is no final norm or it has no gain."""
    norm_centers: bool
    """Whether the final norm subtracts the mean over d_model (LayerNorm) before scaling; RMSNorm does not."""


def mlp_output_weights(model: nn.Module) -> list[torch.Tensor]:
    """Each layer's MLP output weights as `(d_mlp, d_model)` views, row i being what neuron i writes to the residual
    stream per unit of activation (GPT-2's Conv1D stores this layout; nn.Linear stores its transpose)."""
    adapter = adapter_for(model)
    out = []
    for layer in adapter.layers(model):
        proj = adapter.out_proj(layer)
        if isinstance(proj, nn.Linear):
            out.append(proj.weight.detach().T)
        elif type(proj).__name__ == "Conv1D":
            out.append(proj.weight.detach())
        else:
            kind = type(proj).__name__
            raise ActdbError(f"cannot read MLP output weights from a {kind} module (adapter {adapter.name})")
    return out


def final_norm(model: nn.Module) -> nn.Module | None:
    """The norm applied to the residual stream before the LM head (see `FINAL_NORM_PATHS`), or None if none."""
    for path in FINAL_NORM_PATHS:
        module: object = model
        for part in path.split("."):
            module = getattr(module, part, None)
            if module is None:
                break
        if isinstance(module, nn.Module):
            return module
    return None


def unembedding(model: nn.Module) -> Unembedding:
    """The LM head `(d_model, vocab)` and the final norm's gain and centring, for folding the norm into the
    unembedding as TransformerLens does (`fold_ln`); a one-line ActdbError when there is no output embedding."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    weight = getattr(head, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        name = getattr(model.config, "model_type", type(model).__name__)
        raise ActdbError(f"{name} has no output embedding (LM head) to compose MLP output weights with")
    norm = final_norm(model)
    scale: torch.Tensor | None = None
    centers = False
    if norm is not None:
        kind = type(norm).__name__
        if isinstance(norm, nn.LayerNorm) or ("LayerNorm" in kind and "RMS" not in kind):
            centers = True
        elif "RMSNorm" not in kind:
            raise ActdbError(f"cannot tell whether the final norm {kind} centres the residual stream")
        gain = getattr(norm, "weight", None)
        if isinstance(gain, torch.Tensor):
            gain = gain.detach()
            scale = 1.0 + gain.double() if kind.startswith("Gemma") else gain  # exact 1 + w, as Gemma adds in fp32
    d_model = weight.shape[1]
    if scale is not None and scale.shape != (d_model,):
        raise ActdbError(f"final norm gain has shape {tuple(scale.shape)}, the LM head reads d_model={d_model}")
    return Unembedding(weight.detach().T, scale, centers)
