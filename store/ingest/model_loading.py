"""Loading a checkpoint through transformers, exactly as a hub id at a revision or a local folder loads."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import torch
from safetensors import SafetensorError
from torch import nn

from actdb.store.errors import ActdbError, first_line
from actdb.store.ingest.architectures import adapter_for_config
from actdb.store.ingest.hub import hub_options, written_as_path

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


TORCH_DTYPES = ("float32", "bfloat16", "float16")


def load_config(source: str, revision: str | None, trust_remote_code: bool = False):
    """The model's transformers config, with its architecture checked (`adapter_for_config`): an unsupported,
    mixture-of-experts or encoder-only model is refused here, before any weights are read."""
    from transformers import AutoConfig

    check_local_folder(source)
    options, note = hub_options(source)
    try:
        config = AutoConfig.from_pretrained(source, revision=revision, trust_remote_code=trust_remote_code, **options)
    except (OSError, ValueError, KeyError) as exc:
        raise _load_error(exc, source, revision, note) from None
    adapter_for_config(config)
    return config


def load_model(
    source: str,
    revision: str | None,
    device: torch.device,
    *,
    config: object | None = None,
    trust_remote_code: bool = False,
    torch_dtype: str = "float32",
) -> nn.Module:
    """`AutoModelForCausalLM.from_pretrained(source, revision=...)` in eval mode, failing with one line. The
    config is read (and checked) first unless given; `torch_dtype` is the forward pass's precision."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    if torch_dtype not in TORCH_DTYPES:
        raise ActdbError(f"unknown --torch-dtype {torch_dtype!r}; use {', '.join(TORCH_DTYPES)}")
    hf_logging.disable_progress_bar()
    check_local_folder(source)
    config = config or load_config(source, revision, trust_remote_code)
    options, note = hub_options(source)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            source,
            revision=revision,
            config=config,
            dtype=getattr(torch, torch_dtype),
            trust_remote_code=trust_remote_code,
            **options,
        )
    except (OSError, ValueError, KeyError) as exc:
        raise _load_error(exc, source, revision, note) from None
    except (RuntimeError, SafetensorError) as exc:  # a truncated weights file, shapes that do not match, ...
        where = f" at revision {revision!r}" if revision else ""
        raise ActdbError(f"loading the weights of {source!r}{where} failed: {first_line(exc)}") from None
    try:
        return model.to(device).eval()
    except RuntimeError as exc:  # out of device memory, or the device is busy
        raise ActdbError(f"moving the weights of {source!r} to {device} failed: {first_line(exc)}") from None


def check_local_folder(source: str) -> None:
    """Refuse a source that can only be a local folder (`written_as_path`) when that folder does not exist: a
    registered model's `{step}` folder of a step that was never saved, say. transformers would take it for a
    malformed hub id and say so."""
    if written_as_path(source) and not Path(source).expanduser().exists():
        raise ActdbError(f"model folder {source} does not exist")


def _load_error(exc: BaseException, source: str, revision: str | None, note: str) -> ActdbError:
    message = first_line(exc)
    where = f" at revision {revision!r}" if revision else ""
    if re.search(r"revision|not a valid git identifier", message, re.I) and revision:
        return ActdbError(f"revision {revision!r} not found for model {source!r}: {message}")
    return ActdbError(f"cannot load model {source!r}{where}{note}: {message}")


def context_length(config: object) -> int | None:
    """The longest sequence a model's position embeddings allow, when its config says."""
    for attr in ("n_positions", "max_position_embeddings", "n_ctx", "seq_length"):
        value = getattr(config, attr, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def weights_fingerprint(model: nn.Module) -> str:
    """sha256 over every parameter and buffer (names, shapes, dtypes and bytes): equal fingerprints mean the same
    weights, which tells two training steps apart even when their sources look alike."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().to("cpu").contiguous()
        digest.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()
