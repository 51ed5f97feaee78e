"""Loading a checkpoint through transformers, exactly as a hub id at a revision or a local folder loads."""

from __future__ import annotations

import re

import torch
from torch import nn

from actdb.store.errors import ActdbError

REVISION_TEMPLATES = {
    # stanford-crfm Mistral GPT-2 seeds (alias, battlestar, caprica, darkmatter, expanse)
    "stanford-crfm/": "checkpoint-{step}",
    "EleutherAI/pythia": "step{step}",
}


def default_revision_template(source: str) -> str | None:
    """The revision naming a family uses for training steps, or None for local folders and plain models."""
    for prefix, template in REVISION_TEMPLATES.items():
        if source.startswith(prefix):
            return template
    return None


def model_family(source: str, model_type: str) -> str:
    low = source.lower()
    if "pythia" in low:
        return "pythia"
    if "stanford-crfm" in low:
        return "gpt2-mistral"
    return model_type


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ActdbError("--device cuda was asked for but no CUDA device is available to torch")
    return torch.device(device)


def load_model(source: str, revision: str | None, device: torch.device) -> nn.Module:
    """`AutoModelForCausalLM.from_pretrained(source, revision=...)` in eval mode, failing with one line."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    try:
        model = AutoModelForCausalLM.from_pretrained(source, revision=revision, dtype=torch.float32)
    except (OSError, ValueError, KeyError) as exc:
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        where = f" at revision {revision!r}" if revision else ""
        if re.search(r"revision|not a valid git identifier", message, re.I) and revision:
            raise ActdbError(f"revision {revision!r} not found for model {source!r}: {message}") from None
        raise ActdbError(f"cannot load model {source!r}{where}: {message}") from None
    return model.to(device).eval()
