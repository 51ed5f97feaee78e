"""The file of a checkpoint's predictions on a token dataset: per position its top-1 next token (`top1`, int32)
and its cross-entropy on the true next token (`loss`, float32, NaN where the target does not count), with
Fletcher-32 checksums, written under `.partial` and renamed when complete. Its attributes name the checkpoint and
dataset it was computed from (`actdb.store.files.identity`), which readers compare with SQL."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

from actdb.store.config import file_name_of
from actdb.store.errors import ActdbError
from actdb.store.files.identity import SidecarIdentity, verify_identity, write_identity

COMPLETE_ATTR = "actdb_complete"


@dataclass
class Predictions:
    top1: np.ndarray  # (n_tokens,) int32: the most likely next token at each position
    loss: np.ndarray  # (n_tokens,) float32: CE on the true next token; NaN where that target does not count


def predictions_path(model: str, step: int, dataset: str) -> str:
    """Path, relative to the store folder, of one checkpoint's predictions on a dataset."""
    return f"activations/{file_name_of(model)}/step-{step}/{file_name_of(dataset)}.predictions.h5"


def write_predictions(path: Path, result: Predictions, identity: SidecarIdentity) -> None:
    """Under a temporary name, renamed when complete (like the activation files), with the identity of the
    checkpoint and dataset they were computed from."""
    tmp = path.with_name(path.name + ".partial")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with h5py.File(tmp, "w") as f:
            f.create_dataset("top1", data=result.top1, fletcher32=True, chunks=True)
            f.create_dataset("loss", data=result.loss, fletcher32=True, chunks=True)
            write_identity(f.attrs, identity)
            f.attrs[COMPLETE_ATTR] = True
        os.replace(tmp, path)
    except OSError as exc:
        raise ActdbError(f"cannot write {path}: {exc.strerror or exc}") from None


def _open(path: Path, expected: SidecarIdentity | None) -> h5py.File:
    """Open a complete predictions file for reading, or raise a one-line ActdbError saying what is wrong; with
    `expected` (what SQL says it is: checkpoint and dataset) another checkpoint's or dataset's file is refused (one
    written before predictions carried an identity is opened unchecked)."""
    try:
        f = h5py.File(path, "r")
    except OSError as exc:
        raise ActdbError(f"predictions file {path} is missing or corrupt: {exc}") from None
    try:
        if not f.attrs.get(COMPLETE_ATTR, False):
            raise ActdbError(f"predictions file {path} is unfinished")
        if expected is not None:
            rewrite = f"actdb predictions {expected.model}@{expected.step} --force"
            verify_identity("predictions file", path, f.attrs, expected, rewrite)
    except ActdbError:
        f.close()
        raise
    except OSError as exc:  # a damaged attribute (HDF5 keeps string attributes in a heap of their own)
        f.close()
        raise ActdbError(f"predictions file {path} is missing or corrupt: {exc}") from None
    return f


def verify_predictions(path: Path, expected: SidecarIdentity) -> None:
    """Refuse, before any work, a predictions file that is unfinished or not the one SQL records (reads no data)."""
    _open(path, expected).close()


def read_predictions(path: Path, expected: SidecarIdentity | None = None) -> Predictions:
    """A complete predictions file, read through its checksums (`expected`: as `_open`)."""
    with _open(path, expected) as f:
        try:
            return Predictions(f["top1"][:], f["loss"][:])
        except (OSError, KeyError) as exc:
            raise ActdbError(f"predictions file {path} is missing or corrupt: {exc}") from None
