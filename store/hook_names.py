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


def parse_hook(text: str) -> str:
    """`mlp.post` / `mlp.pre`, also spelled the TransformerLens way (`blocks.{L}.mlp.hook_post`,
    `mlp.hook_pre`)."""
    if text in HOOKS:
        return text
    found = _TL.match(text.strip())
    if found:
        return f"mlp.{found.group(2)}"
    raise ActdbError(f"unknown hook {text!r}; use mlp.post or mlp.pre (or blocks.L.mlp.hook_post / hook_pre)")
