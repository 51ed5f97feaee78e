"""Hooks used only by ablation: rewrite chosen neurons of the MLP post-activation, keep each decoder layer's
output, and resume a forward pass after a given layer from a cached hidden state."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch
from torch import nn

from actdb.store.ingest.architectures import HookSet, adapter_for


class MLPEditor(HookSet):
    """Forward pre-hooks that rewrite chosen neurons of each layer's MLP post-activation (ablation).

    `edits[layer]` is a callable taking the `(batch, seq, d_mlp)` activation and returning the edited one.
    """

    def __init__(self, model: nn.Module, edits: dict[int, Callable[[torch.Tensor], torch.Tensor]]) -> None:
        adapter = adapter_for(model)
        layers = adapter.layers(model)
        self.handles = []
        for index, edit in edits.items():
            self.handles.append(
                adapter.out_proj(layers[index]).register_forward_pre_hook(
                    lambda _m, args, edit=edit: (edit(args[0]),) + tuple(args[1:])
                )
            )


class LayerOutputs(HookSet):
    """Forward hooks keeping each decoder layer's output (whatever object the layer returns) from the last pass."""

    def __init__(self, model: nn.Module) -> None:
        layers = adapter_for(model).layers(model)
        self.outputs: list[object] = [None] * len(layers)
        self.handles = [
            layer.register_forward_hook(lambda _m, _a, out, i=i: self.outputs.__setitem__(i, out))
            for i, layer in enumerate(layers)
        ]


def hidden_of(layer_output: object) -> torch.Tensor:
    """The hidden-state tensor inside a decoder layer's output (a tensor, or a tuple starting with it)."""
    return layer_output[0] if isinstance(layer_output, tuple) else layer_output


@contextlib.contextmanager
def resume_after_layer(model: nn.Module, layer: int, hidden: torch.Tensor, template: object) -> Iterator[None]:
    """Within the block, a forward pass skips layers 0..`layer`: earlier layers pass their input through and
    `layer` returns `hidden` (shaped like `template`, a captured output of that layer), so only the layers
    after it, the final norm and the unembedding run. Used to share the clean prefix across ablations."""
    layers = adapter_for(model).layers(model)

    def shaped(h: torch.Tensor) -> object:
        return (h, *template[1:]) if isinstance(template, tuple) else h

    def passthrough(*args: object, **kwargs: object) -> object:
        return shaped(args[0] if args else kwargs["hidden_states"])

    for i in range(layer):
        layers[i].forward = passthrough
    layers[layer].forward = lambda *_a, **_k: shaped(hidden)
    try:
        yield
    finally:
        for i in range(layer + 1):
            del layers[i].forward
