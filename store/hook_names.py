"""Names of recording points, made in one place (like TransformerLens's `get_act_name`)."""

from __future__ import annotations

HOOK_NAME = "mlp.post"  # the input of each layer's MLP output projection: the nonlinearity's output


def transformer_lens_name(layer: int, hook: str = HOOK_NAME) -> str:
    """The TransformerLens name of a recording point, e.g. `blocks.3.mlp.hook_post`."""
    block, _, point = hook.partition(".")
    return f"blocks.{layer}.{block}.hook_{point}"
