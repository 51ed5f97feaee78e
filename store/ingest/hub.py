"""Reaching the Hugging Face hub: when it does not answer, models and tokenizers load from the local cache only,
so an unreachable hub costs one 5-second probe and a one-line error instead of minutes of retries."""

from __future__ import annotations

import os
import socket
from functools import lru_cache
from pathlib import Path
from urllib.parse import urlparse

PROBE_SECONDS = 5.0


def is_local(source: str) -> bool:
    return Path(source).expanduser().exists()


def written_as_path(source: str) -> bool:
    """Whether a source can only mean a local file or folder, never a hub id (`name` or `owner/name`): absolute,
    `~`, `./` or `../`, or more than one `/`."""
    return Path(source).is_absolute() or source.startswith(("~", "./", "../")) or source.count("/") > 1


@lru_cache(maxsize=1)
def hub_unreachable() -> str | None:
    """Why the hub cannot be reached (None when it answers, or when offline mode is on and transformers already
    reads only the cache)."""
    if os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE"):
        return None
    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    host, port = url.hostname or "huggingface.co", url.port or (80 if url.scheme == "http" else 443)
    try:
        socket.create_connection((host, port), timeout=PROBE_SECONDS).close()
    except OSError as exc:
        return f"{host}: {exc.strerror or exc}"
    return None


def hub_options(source: str) -> tuple[dict, str]:
    """Keyword arguments for `from_pretrained`, and a note for error messages when only the cache is read."""
    if is_local(source):
        return {}, ""
    reason = hub_unreachable()
    if reason is None:
        return {}, ""
    return {"local_files_only": True}, f" (the hub is unreachable, {reason}, and it is not in the local cache)"
