"""Names of recording points, made in one place (like TransformerLens's `get_act_name`)."""

from __future__ import annotations

import re

from actdb.store.errors import ActdbError

HOOK_NAME = "mlp.post"  # the input of each layer's MLP output projection: the nonlinearity's output
HOOKS = ("mlp.post", "mlp.pre")  # mlp.pre: the input (or gate) projection's output, before the nonlinearity
_TL = re.compile(r"^(?:blocks\.(\d+|\{L\})\.)?mlp\.hook_(post|pre)$")


def transformer_lens_name(layer: int, hook: str = HOOK_NAME) -> str:
    """The TransformerLens name of a recording point, e.g. `blocks.3.mlp.hook_post`."""
    block, _, point = hook.partition(".")
    return f"blocks.{layer}.{block}.hook_{point}"


def split_hook(text: str) -> tuple[str, int | None]:
    """`mlp.post` / `mlp.pre`, also spelled the TransformerLens way (`blocks.{L}.mlp.hook_post`, `mlp.hook_pre`,
    `blocks.3.mlp.hook_post`), and the layer the name picks (None when it names every layer)."""
    if text in HOOKS:
        return text, None
    found = _TL.match(text.strip())
    if found:
        layer = found.group(1)
        return f"mlp.{found.group(2)}", int(layer) if layer and layer.isdigit() else None
    raise ActdbError(f"unknown hook {text!r}; use mlp.post or mlp.pre (or blocks.L.mlp.hook_post / hook_pre)")


def hook_spelling(text: str) -> str:
    """`text` as typed, once it is a known hook name (a layer in it is checked by whoever knows the model)."""
    split_hook(text)
    return text.strip()


def parse_hook(text: str) -> str:
    """The hook a name means, where a hook covers every layer: a name that picks one layer is refused rather
    than read as all of them."""
    hook, layer = split_hook(text)
    if layer is not None:
        raise ActdbError(
            f"hook {text!r} names layer {layer} only, but a hook here covers every layer: write {hook} "
            f"(or blocks.{{L}}.mlp.hook_{hook.split('.')[1]})"
        )
    return hook


def hook_of_model(text: str, model: str, n_layers: int) -> str:
    """The hook to record for `model` (of `n_layers` layers): a layer in the name must exist, and even then is
    refused, since a set records a hook at every layer (read one layer with --layer)."""
    hook, layer = split_hook(text)
    if layer is None:
        return hook
    if layer >= n_layers:
        raise ActdbError(
            f"--hook {text}: layer {layer} does not exist: {model} has {n_layers} layers (0..{n_layers - 1})"
        )
    raise ActdbError(
        f"--hook {text} names layer {layer} only, but ingest records a hook at every layer: use --hook {hook} "
        f"and read layer {layer} with --layer {layer}"
    )
