"""HDF5 file of a token dataset: `tokens (n_sequences, seq_len)` int32 and `mask` of the positions that count."""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np

from actdb.store.errors import ActdbError

COMPLETE_ATTR = "actdb_complete"


def token_sha256(tokens: np.ndarray) -> str:
    """Fingerprint of the token ids (little-endian int32, row-major), independent of how they are stored."""
    return hashlib.sha256(np.ascontiguousarray(tokens, dtype="<i4").tobytes()).hexdigest()


def dataset_fingerprint(sha256: str, excluded: list[int]) -> str:
    """What a dataset is for every model run on it: its token ids and the token ids that never count (equal to
    the ids' sha256 when nothing beyond BOS/EOS/padding is excluded, as for datasets made before exclusions)."""
    if not excluded:
        return sha256
    return hashlib.sha256(json.dumps({"tokens": sha256, "excluded": sorted(excluded)}).encode()).hexdigest()


@dataclass
class TokenDataset:
    """Token ids and the mask of counted positions (False for padding and BOS/EOS)."""

    tokens: np.ndarray
    mask: np.ndarray
    tokenizer_fingerprint: str
    excluded: list[int] = field(default_factory=list)  # token ids masked like BOS/EOS/padding

    @property
    def n_sequences(self) -> int:
        return int(self.tokens.shape[0])

    @property
    def seq_len(self) -> int:
        return int(self.tokens.shape[1])

    @property
    def sha256(self) -> str:
        return token_sha256(self.tokens)

    @property
    def fingerprint(self) -> str:
        return dataset_fingerprint(self.sha256, self.excluded)

    def save(self, path: Path) -> None:
        """Write under a temporary name and rename, so a visible file is always whole."""
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".partial")
        with h5py.File(tmp, "w") as f:
            f.create_dataset("tokens", data=self.tokens.astype(np.int32), fletcher32=True, chunks=True)
            f.create_dataset("mask", data=self.mask.astype(bool), fletcher32=True, chunks=True)
            f.attrs["tokenizer_fingerprint"] = self.tokenizer_fingerprint
            f.attrs["token_sha256"] = self.sha256
            f.attrs["excluded_token_ids"] = json.dumps(sorted(self.excluded))
            f.attrs[COMPLETE_ATTR] = True
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str | os.PathLike) -> TokenDataset:
        path = Path(path)
        try:
            with h5py.File(path, "r") as f:
                if not f.attrs.get(COMPLETE_ATTR, False):
                    raise ActdbError(f"token file {path} is unfinished")
                excluded = json.loads(str(f.attrs.get("excluded_token_ids", "[]")))
                ds = cls(f["tokens"][:], f["mask"][:], str(f.attrs["tokenizer_fingerprint"]), excluded)
                expected = str(f.attrs["token_sha256"])
        except (OSError, KeyError) as exc:
            raise ActdbError(f"token file {path} is missing or corrupt: {exc}") from None
        if ds.sha256 != expected:
            raise ActdbError(f"token file {path} does not match its recorded sha256")
        return ds
