"""What a sidecar file (a checkpoint's predictions, a set's explanations) says it belongs to, and its comparison
with SQL: the same check every activation file's header gets, so another checkpoint's sidecar copied to this
path is refused before any of its data is used.

The identity is stored as file attributes named like the activation header's (`model`, `step`,
`dataset_fingerprint`, `hook` where a hook applies) plus `weights_sha256` (the checkpoint's weights, when SQL
knows them). Files written before sidecars carried an identity have none of these attributes: readers read them
as before and `actdb check` says they cannot be checked.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, MutableMapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py

from actdb.store.errors import ActdbError

IDENTITY_FIELDS = (
    ("model", "model"),
    ("step", "step"),
    ("dataset_fingerprint", "dataset fingerprint"),
    ("hook", "hook"),
    ("weights_sha256", "weights sha256"),
)
SHORTENED_FIELDS = ("dataset_fingerprint", "weights_sha256")  # long hex digests: a message shows their start
MARKER = "model"  # the attribute whose presence says a file carries an identity


@dataclass(frozen=True)
class SidecarIdentity:
    """The checkpoint, dataset and (for explanations) hook a sidecar file was computed from."""

    model: str
    step: int
    dataset_fingerprint: str
    hook: str | None = None  # None for predictions: they belong to a checkpoint, not to one hook
    weights_sha256: str | None = None  # None when SQL has no fingerprint of the weights (checkpoints of old stores)


def shown_value(field: str, value: object) -> str:
    """A value as a mismatch message shows it (digests are long: their first 12 characters)."""
    text = str(value)
    return repr(text[:12] + "…") if field in SHORTENED_FIELDS and len(text) > 12 else repr(value)


def mismatch_phrase(fields: tuple[tuple[str, str], ...], found: object, expected: object) -> str | None:
    """What differs between what a file says (`found`) and what SQL says (`expected`), over `fields` (attribute,
    label), as one phrase; None if nothing. A field either side does not know (None) is not compared."""
    wrong = []
    for field, label in fields:
        have, want = getattr(found, field), getattr(expected, field)
        if have is not None and want is not None and have != want:
            wrong.append(f"{label} {shown_value(field, have)} (SQL: {shown_value(field, want)})")
    return ", ".join(wrong) or None


def identity_mismatch(found: SidecarIdentity, expected: SidecarIdentity) -> str | None:
    """What differs between a sidecar's identity and its SQL rows, as one phrase; None if nothing."""
    return mismatch_phrase(IDENTITY_FIELDS, found, expected)


def verify_identity(
    what: str, path: str | os.PathLike, attrs: Mapping[str, Any], expected: SidecarIdentity, rewrite: str
) -> None:
    """Refuse a sidecar whose attributes name another checkpoint, dataset or hook than its SQL rows (`what` names
    the kind of file, `rewrite` the command that rewrites it); a file with no identity passes unchecked."""
    try:
        found = read_identity(attrs)
    except (KeyError, ValueError, OSError) as exc:
        raise ActdbError(f"{what} {path} has damaged identity attributes ({type(exc).__name__}: {exc})") from None
    wrong = identity_mismatch(found, expected) if found is not None else None
    if wrong:
        raise ActdbError(
            f"{what} {path} is not the one SQL records: its attributes say {wrong}; `actdb check` lists such files "
            f"and `{rewrite}` rewrites it"
        )


def write_identity(attrs: MutableMapping[str, object], identity: SidecarIdentity) -> None:
    """Store the identity in a file's attributes (a field that is None is left out)."""
    for field, _label in IDENTITY_FIELDS:
        value = getattr(identity, field)
        if value is not None:
            attrs[field] = value


def read_identity(attrs: Mapping[str, Any]) -> SidecarIdentity | None:
    """The identity stored in a file's attributes; None for a file written before sidecars carried one."""
    if MARKER not in attrs:
        return None
    return SidecarIdentity(
        model=str(attrs["model"]),
        step=int(attrs["step"]),
        dataset_fingerprint=str(attrs["dataset_fingerprint"]),
        hook=str(attrs["hook"]) if "hook" in attrs else None,
        weights_sha256=str(attrs["weights_sha256"]) if "weights_sha256" in attrs else None,
    )


def carries_identity(path: str | os.PathLike) -> bool:
    """Whether a sidecar file carries an identity (files written before sidecars did cannot be checked); an
    OSError if it cannot be opened."""
    with h5py.File(Path(path), "r") as f:
        return MARKER in f.attrs
