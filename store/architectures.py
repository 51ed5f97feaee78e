"""Architecture adapters: where each model family's MLP output projection sits, and hooks on its input.

The recorded activation ("mlp.post", TransformerLens `blocks.L.mlp.hook_post`) is the input of the MLP's
output projection: `act(W_in x)` for GPT-2 and GPT-NeoX, `act(gate(x)) * up(x)` for Llama-style gated MLPs.
Hooking that input is exact by construction and lets ablation replace neurons at the same place.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from actdb.store.errors import ActdbError


@dataclass(frozen=True)
class Adapter:
    """How to find the layers' MLP output projections and the MLP width in one architecture."""

    name: str
    layers: Callable[[nn.Module], list[nn.Module]]
    out_proj: Callable[[nn.Module], nn.Module]
    d_mlp: Callable[[object], int]


ADAPTERS: dict[str, Adapter] = {
    "gpt2": Adapter(
        "gpt2",
        lambda m: list(m.transformer.h),
        lambda layer: layer.mlp.c_proj,
        lambda c: c.n_inner or 4 * c.n_embd,
    ),
    "gpt_neox": Adapter(
        "gpt_neox",
        lambda m: list(m.gpt_neox.layers),
        lambda layer: layer.mlp.dense_4h_to_h,
        lambda c: c.intermediate_size,
    ),
}
for _llama_like in ("llama", "mistral", "qwen2", "qwen3", "olmo", "olmo2"):
    ADAPTERS[_llama_like] = Adapter(
        _llama_like,
        lambda m: list(m.model.layers),
        lambda layer: layer.mlp.down_proj,
        lambda c: c.intermediate_size,
    )


def adapter_for(model: nn.Module) -> Adapter:
    model_type = getattr(model.config, "model_type", "?")
    if model_type not in ADAPTERS:
        raise ActdbError(f"unsupported architecture {model_type!r}; supported: {', '.join(sorted(ADAPTERS))}")
    return ADAPTERS[model_type]


def mlp_shape(model: nn.Module) -> tuple[int, int]:
    """(n_layers, d_mlp) of a loaded model."""
    adapter = adapter_for(model)
    return len(adapter.layers(model)), int(adapter.d_mlp(model.config))


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
    """Forward pre-hooks that keep each layer's MLP post-activation from the latest forward pass."""

    def __init__(self, model: nn.Module) -> None:
        adapter = adapter_for(model)
        self.outputs: list[torch.Tensor | None] = [None] * len(adapter.layers(model))
        self.handles = [
            adapter.out_proj(layer).register_forward_pre_hook(self._hook(i))
            for i, layer in enumerate(adapter.layers(model))
        ]

    def _hook(self, index: int):
        def hook(_module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
            self.outputs[index] = args[0].detach()

        return hook
