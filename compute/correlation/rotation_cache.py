"""Haar rotations of the baseline kept as files, so that a QR (about 21 s at d = 3072 on one core here) is
computed once per (seed, model, layer) and per (seed, width, draw) instead of in every pass and every run.

A cached rotation is exactly the float32 matrix the engine would compute (`baseline.random_rotation` or
`baseline.draw_rotation` cast to float32, or `baseline.extra_rotation`), stored with a header that names what it is
(kind, width, seed, model key, layer or draw, and the NumPy version, whose random streams and LAPACK could change
the bits; for an adaptive draw's, also SciPy's, whose LAPACK computes it) and the SHA-256 of its bytes. A file is
used only when its header names exactly the rotation asked for and its bytes hash to the recorded digest; anything
else (another seed or width, a truncated or altered file) is recomputed and rewritten. Files are written under a
temporary name and renamed, so concurrent workers never read half a file.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import scipy

from actdb.compute.correlation.baseline import draw_rotation, extra_rotation, random_rotation
from actdb.compute.correlation.blas_threads import map_on_cores

FOLDER = "rotations"  # under the store's home, beside the runs' activation files
MAGIC = b"ACTDBROT1\n"
FORMAT = 1

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RotationKey:
    """Which rotation: a model's draw-0 rotation of a layer (`kind` "base", `key` the model, `index` the layer),
    the rotation P_k shared by every set of a width (`kind` "draw", `index` the draw k >= 1), or an adaptive
    draw's E_j (`kind` "extra", `index` j)."""

    kind: str
    d: int
    seed: int
    key: int
    index: int

    @property
    def file_name(self) -> str:
        return f"{self.kind}-d{self.d}-s{self.seed}-k{self.key}-i{self.index}.rot"

    def header(self) -> dict:
        header = {**asdict(self), "dtype": "float32", "numpy": np.__version__, "format": FORMAT}
        return {**header, "scipy": scipy.__version__} if self.kind == "extra" else header

    def compute(self) -> np.ndarray:
        if self.kind == "base":
            return random_rotation(self.d, self.seed, self.key, self.index).astype(np.float32)
        if self.kind == "extra":
            return extra_rotation(self.d, self.seed, self.index)
        return draw_rotation(self.d, self.seed, self.index).astype(np.float32)


def base_key(d: int, seed: int, model: int, layer: int) -> RotationKey:
    return RotationKey("base", d, seed, model, layer)


def draw_key(d: int, seed: int, draw: int) -> RotationKey:
    return RotationKey("draw", d, seed, 0, draw)


def extra_key(d: int, seed: int, index: int) -> RotationKey:
    return RotationKey("extra", d, seed, 0, index)


def read_cached(path: Path, key: RotationKey) -> tuple[np.ndarray | None, str | None]:
    """The rotation stored at `path` if it is `key`'s and intact, else (None, what is wrong)."""
    try:
        with open(path, "rb") as fh:
            if fh.read(len(MAGIC)) != MAGIC:
                return None, "not a rotation file"
            header = json.loads(fh.readline())
            digest = header.pop("sha256", None)
            if header != key.header():
                return None, f"it holds another rotation ({header})"
            data = np.empty((key.d, key.d), dtype=np.float32)
            if fh.readinto(memoryview(data).cast("B")) != data.nbytes or fh.read(1):
                return None, "its size is wrong"
    except FileNotFoundError:
        return None, None
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        return None, f"unreadable: {exc}"
    if hashlib.sha256(data).hexdigest() != digest:
        return None, "its bytes fail their SHA-256"
    return data, None


def write_cached(path: Path, key: RotationKey, data: np.ndarray) -> None:
    """Store `data` as `key`'s rotation: under a temporary name, renamed into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    header = {**key.header(), "sha256": hashlib.sha256(data).hexdigest()}
    tmp = path.with_name(f"{path.name}.{os.getpid()}.{id(data)}.partial")
    with open(tmp, "wb") as fh:
        fh.write(MAGIC + json.dumps(header, sort_keys=True).encode() + b"\n")
        fh.write(np.ascontiguousarray(data, dtype=np.float32).tobytes())
    os.replace(tmp, path)


def rotation(folder: str | None, key: RotationKey) -> np.ndarray:
    """`key`'s rotation (float32): from the cache in `folder` when it holds it intact, else computed (and kept
    there, when there is a folder)."""
    if folder is None:
        return key.compute()
    path = Path(folder) / key.file_name
    data, wrong = read_cached(path, key)
    if data is not None:
        return data
    if wrong is not None:
        log.warning("rotation cache file %s is not used and is rewritten: %s", path, wrong)
    data = key.compute()
    try:
        write_cached(path, key, data)
    except OSError as exc:  # a read-only or full disk: the run goes on with the computed rotation
        log.warning("rotation cache file %s cannot be written: %s", path, exc)
    return data


def fill(folder: str | None, keys: Iterable[RotationKey]) -> int:
    """Compute the rotations of `keys` that `folder` does not hold yet, side by side on the host's cores
    (`map_on_cores`: one QR per core is the faster use of them, and what `actdb plan` counts), and keep them there;
    returns how many were computed. A file that exists but is damaged is left to `rotation`, which recomputes it
    when it is read."""
    if folder is None:
        return 0
    missing = [k for k in dict.fromkeys(keys) if not (Path(folder) / k.file_name).exists()]
    map_on_cores(lambda key: rotation(folder, key), missing)
    return len(missing)
