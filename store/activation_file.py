"""HDF5 file of one activation set: one `(n_tokens, d_mlp)` dataset per layer, written under a temporary name.

The writer preallocates every layer, fills token rows in order and records `tokens_done` after each flush, so
a killed ingest resumes from the last flushed row. `finish()` stamps the completion marker and renames the
`.partial` file to its final name; the reader refuses files without the marker.
"""

from __future__ import annotations

import contextlib
import os
import re
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

from actdb.store.errors import ActdbError
from actdb.store.hook_names import transformer_lens_name

FORMAT_VERSION = 1
CHUNK_TOKENS = 1024
CHUNK_NEURONS = 128
WRITE_CACHE_BYTES = 64 * 2**20
COMPLETE_ATTR = "actdb_complete"


_UNCLOSABLE: list[ActivationWriter] = []


def unclosable_files() -> bool:
    """Whether an activation file could not be closed (a full disk); see `ActivationWriter.close`."""
    return bool(_UNCLOSABLE)


def layer_key(layer: int) -> str:
    return f"layer_{layer:03d}"


def partial_path(path: Path) -> Path:
    return path.with_name(path.name + ".partial")


def chunk_shape(n_tokens: int, d_mlp: int) -> tuple[int, int]:
    """Chunks of 1024 tokens x 128 neurons (256 KiB in float16): row blocks stream whole, one neuron reads 1/N."""
    return (max(1, min(CHUNK_TOKENS, n_tokens)), max(1, min(CHUNK_NEURONS, d_mlp)))


@dataclass(frozen=True)
class ActivationHeader:
    """What an activation file says about itself."""

    model: str
    step: int
    dataset_fingerprint: str
    hook: str
    n_layers: int
    d_mlp: int
    n_tokens: int
    dtype: str


class ActivationWriter:
    """Writes token rows of every layer into `<path>.partial`, resuming one that already exists."""

    def __init__(self, path: Path, header: ActivationHeader) -> None:
        self.path = Path(path)
        self.header = header
        self.tmp = partial_path(self.path)
        try:
            self.tmp.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ActdbError(f"cannot create folder {self.tmp.parent}: {exc.strerror or exc}") from None
        self.file = self._open_or_create()
        self.layers = [self.file[layer_key(i)] for i in range(header.n_layers)]

    def _open_or_create(self) -> h5py.File:
        if self.tmp.exists():
            _restore_length(self.tmp)
            try:
                f = h5py.File(self.tmp, "r+", rdcc_nbytes=WRITE_CACHE_BYTES)
                if _read_header(f) == self.header:
                    return f
                f.close()
            except (OSError, KeyError, ValueError):
                pass
            self.tmp.unlink()
        try:
            f = h5py.File(self.tmp, "w", rdcc_nbytes=WRITE_CACHE_BYTES)
        except OSError as exc:
            raise ActdbError(f"cannot create activation file {self.tmp}: {exc}") from None
        h = self.header
        for key, value in vars(h).items():
            f.attrs[key] = value
        f.attrs["format_version"] = FORMAT_VERSION
        f.attrs["tokens_done"] = 0
        for layer in range(h.n_layers):
            ds = f.create_dataset(
                layer_key(layer),
                shape=(h.n_tokens, h.d_mlp),
                dtype=h.dtype,
                chunks=chunk_shape(h.n_tokens, h.d_mlp),
                fletcher32=True,
            )
            ds.attrs["transformer_lens_name"] = transformer_lens_name(layer, h.hook)  # reads like a TL cache
        f.flush()
        return f

    @property
    def tokens_done(self) -> int:
        return int(self.file.attrs["tokens_done"])

    def write_rows(self, start: int, rows: list[np.ndarray]) -> None:
        """Write rows `[start, start + len)` of every layer; rows must continue where the file left off."""
        if start != self.tokens_done:
            raise ValueError(f"rows must be written in order: file holds {self.tokens_done}, got start {start}")
        stop = start + rows[0].shape[0]
        for ds, block in zip(self.layers, rows, strict=True):
            ds[start:stop] = block
        self.file.attrs["tokens_done"] = stop

    def flush(self) -> None:
        self.file.flush()

    def finish(self) -> int:
        """Mark complete, close and rename to the final path; returns the file's size in bytes."""
        if self.tokens_done != self.header.n_tokens:
            raise ValueError(f"file holds {self.tokens_done} of {self.header.n_tokens} tokens")
        self.file.attrs[COMPLETE_ATTR] = True
        self.file.close()
        os.replace(self.tmp, self.path)
        return self.path.stat().st_size

    def close(self) -> None:
        """Flush and close, after a failure too. When the disk is full HDF5 cannot write its cached chunks, the
        close fails, and the file's objects would fail again (and can crash the interpreter) when they are
        garbage-collected; such a writer is kept referenced and `unclosable_files()` tells the CLI to end the
        process without running those finalizers (the `.partial` file keeps every flushed row)."""
        if not self.file.id.valid:
            return
        with contextlib.suppress(OSError, RuntimeError):  # h5py raises either for a failed write
            self.file.flush()
        try:
            self.file.close()
        except (OSError, RuntimeError):
            _UNCLOSABLE.append(self)


def _restore_length(path: Path) -> None:
    """A write that failed for lack of space leaves the file shorter than the end HDF5 recorded, and HDF5 then
    refuses to open it. Growing it back (with zeros) lets the rows flushed before the failure be reused: they
    are read back through their checksums before the ingest continues, and a file that fails that is redone."""
    try:
        h5py.File(path, "r").close()
    except OSError as exc:
        found = re.search(r"truncated file: eof = (\d+).*stored_eof = (\d+)", str(exc))
        if found and int(found.group(2)) > int(found.group(1)):
            os.truncate(path, int(found.group(2)))


def _read_header(f: h5py.File) -> ActivationHeader:
    a = f.attrs
    return ActivationHeader(
        model=str(a["model"]),
        step=int(a["step"]),
        dataset_fingerprint=str(a["dataset_fingerprint"]),
        hook=str(a["hook"]),
        n_layers=int(a["n_layers"]),
        d_mlp=int(a["d_mlp"]),
        n_tokens=int(a["n_tokens"]),
        dtype=str(a["dtype"]),
    )


class ActivationReader:
    """Read-only access to a complete activation file: row blocks across layers, or single neurons."""

    def __init__(self, path: str | os.PathLike, cache_bytes: int = 16 * 2**20) -> None:
        self.path = Path(path)
        if not self.path.exists():
            hint = " (an ingest is unfinished)" if partial_path(self.path).exists() else ""
            raise ActdbError(f"activation file {self.path} does not exist{hint}")
        try:
            self.file = h5py.File(self.path, "r", rdcc_nbytes=cache_bytes)
        except OSError as exc:
            raise ActdbError(f"activation file {self.path} is unreadable or truncated: {exc}") from None
        try:
            self.header = _read_header(self.file)
            complete = bool(self.file.attrs.get(COMPLETE_ATTR, False))
            self.layers = [self.file[layer_key(i)] for i in range(self.header.n_layers)]
        except (KeyError, OSError) as exc:
            self.file.close()
            raise ActdbError(f"activation file {self.path} is not a valid actdb file: {exc}") from None
        if not complete:
            self.file.close()
            raise ActdbError(f"activation file {self.path} is unfinished (no completion marker)")

    def read_rows(self, start: int, stop: int, layers: list[int] | None = None) -> list[np.ndarray]:
        """Token rows `[start, stop)` of the given layers (all by default), as stored."""
        try:
            return [self.layers[i][start:stop] for i in (layers if layers is not None else range(len(self.layers)))]
        except OSError as exc:
            raise ActdbError(f"activation file {self.path} is corrupt (checksum or read error): {exc}") from None

    def read_rows_into(self, layer: int, start: int, out: np.ndarray) -> None:
        """Token rows `[start, start + len(out))` of one layer into a reused buffer of the stored dtype: no fresh
        array per read (fresh multi-MB arrays cost page faults on every chunk)."""
        try:
            self.layers[layer].read_direct(out, np.s_[start : start + out.shape[0]])
        except OSError as exc:
            raise ActdbError(f"activation file {self.path} is corrupt (checksum or read error): {exc}") from None

    def read_neurons(
        self, layer: int, neurons: list[int] | slice, start: int = 0, stop: int | None = None
    ) -> np.ndarray:
        try:
            return self.layers[layer][start:stop, neurons]
        except OSError as exc:
            raise ActdbError(f"activation file {self.path} is corrupt (checksum or read error): {exc}") from None

    def close(self) -> None:
        self.file.close()

    def __enter__(self) -> ActivationReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
