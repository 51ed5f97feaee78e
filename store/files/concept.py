"""The AP sidecar of a concept run: per concept and neuron (flat index layer * d_mlp + neuron) its AP and AUROC,
and per concept the permutation null's best and k-th best AP; written under `.partial` and renamed when complete,
beside the activation set's file."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

from actdb.store.config import file_name_of
from actdb.store.errors import ActdbError

COMPLETE_ATTR = "actdb_complete"


@dataclass
class ConceptArrays:
    concepts: list[str]
    n_layers: int
    d_mlp: int
    ap: np.ndarray  # (n_concepts, n_layers * d_mlp) float32
    auroc: np.ndarray  # (n_concepts, n_layers * d_mlp) float32
    null_best: np.ndarray  # (n_concepts, n_permutations)
    null_kth: np.ndarray  # (n_concepts, n_permutations)


def concept_sidecar_path(activation_path: str, concept_set: str, request_key: str) -> str:
    """Beside the set's activation file: `<activations>.concepts-<set name>-<request key prefix>.h5`."""
    stem = activation_path.removesuffix(".h5")
    return f"{stem}.concepts-{file_name_of(concept_set)}-{request_key[:16]}.h5"


def write_concept_arrays(path: Path, arrays: ConceptArrays) -> None:
    """Write under a temporary name and rename: a killed run leaves no half-written sidecar under `path`."""
    tmp = path.with_name(path.name + ".partial")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with h5py.File(tmp, "w") as f:
            for name in ("ap", "auroc", "null_best", "null_kth"):
                f.create_dataset(name, data=getattr(arrays, name), fletcher32=True, chunks=True)
            f.attrs["concepts"] = json.dumps(arrays.concepts)
            f.attrs["n_layers"] = arrays.n_layers
            f.attrs["d_mlp"] = arrays.d_mlp
            f.attrs[COMPLETE_ATTR] = True
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise ActdbError(f"cannot write {path}: {exc.strerror or exc}") from None


def read_concept_arrays(path: Path) -> ConceptArrays:
    try:
        with h5py.File(path, "r") as f:
            if not f.attrs.get(COMPLETE_ATTR, False):
                raise ActdbError(f"concept sidecar {path} is unfinished")
            return ConceptArrays(
                json.loads(f.attrs["concepts"]),
                int(f.attrs["n_layers"]),
                int(f.attrs["d_mlp"]),
                f["ap"][:],
                f["auroc"][:],
                f["null_best"][:],
                f["null_kth"][:],
            )
    except (OSError, KeyError) as exc:
        raise ActdbError(f"concept sidecar {path} is missing or corrupt: {exc}") from None
