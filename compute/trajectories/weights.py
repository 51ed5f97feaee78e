"""Reading several checkpoints' parameters side by side, one block of one parameter at a time: the weight-space
measures need dot products of whole parameter vectors, and no checkpoint is ever held whole in memory."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from actdb.store.errors import ActdbError
from actdb.store.ingest.hub import hub_options, is_local

BLOCK_ELEMENTS = 1 << 22  # values of one parameter read at a time, all checkpoints together


def checkpoint_folder(source: str, revision: str | None) -> Path:
    """The folder holding a checkpoint's weight files: the local folder itself, or the hub snapshot of that
    revision (weights and config only; from the cache when the hub is not reachable)."""
    if is_local(source):
        return Path(source).expanduser()
    from huggingface_hub import snapshot_download

    options, note = hub_options(source)
    try:
        return Path(
            snapshot_download(
                source,
                revision=revision,
                allow_patterns=["*.safetensors", "*.bin", "*.json"],
                local_files_only=bool(options.get("local_files_only")),
            )
        )
    except Exception as exc:  # the hub client raises many kinds; the user needs one line
        raise ActdbError(f"cannot fetch the weights of {source!r} at {revision!r}{note}: {exc}") from None


class WeightFiles:
    """One checkpoint's parameters by name, opened lazily: safetensors files (memory-mapped slices) or, for older
    checkpoints, `pytorch_model*.bin` loaded with `mmap=True`."""

    def __init__(self, folder: Path, what: str) -> None:
        self.what = what
        self._stack = contextlib.ExitStack()
        self._tensors: dict[str, object] = {}
        files = sorted(folder.glob("*.safetensors"))
        if files:
            from safetensors import safe_open

            for path in files:
                handle = self._stack.enter_context(safe_open(str(path), framework="pt"))
                stored = handle.keys()  # a safetensors handle, not a dict: it lists its tensors' names
                self._tensors.update((name, (handle, name)) for name in stored)
        else:
            import torch

            bins = sorted(folder.glob("pytorch_model*.bin"))
            if not bins:
                raise ActdbError(f"no weight files (*.safetensors, pytorch_model*.bin) for {what} in {folder}")
            for path in bins:
                try:
                    state = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
                except Exception as exc:
                    raise ActdbError(f"cannot read the weights of {what} ({path.name}): {exc}") from None
                self._tensors.update(state)

    def names(self) -> dict[str, tuple[int, ...]]:
        return {name: tuple(self._shape(name)) for name in self._tensors}

    def _shape(self, name: str) -> tuple[int, ...]:
        entry = self._tensors[name]
        if isinstance(entry, tuple):
            handle, key = entry
            return tuple(handle.get_slice(key).get_shape())
        return tuple(entry.shape)

    def rows(self, name: str, start: int, stop: int) -> np.ndarray:
        """Rows `start:stop` of a parameter's first axis (the whole scalar for 0-d), flattened to float64."""
        entry = self._tensors[name]
        if isinstance(entry, tuple):
            handle, key = entry
            sliced = handle.get_slice(key)
            tensor = sliced[start:stop] if len(sliced.get_shape()) else handle.get_tensor(key)
        else:
            tensor = entry[start:stop] if entry.dim() else entry
        return tensor.detach().to("cpu").double().reshape(-1).numpy()

    def close(self) -> None:
        self._stack.close()


def parameter_blocks(files: list[WeightFiles], block_elements: int = BLOCK_ELEMENTS) -> Iterator[np.ndarray]:
    """(K, m) blocks of K checkpoints' parameters, name by name and row block by row block; every checkpoint must
    name the same parameters with the same shapes."""
    shapes = [f.names() for f in files]
    for f, s in zip(files[1:], shapes[1:], strict=True):
        if s != shapes[0]:
            differ = sorted(set(s.items()) ^ set(shapes[0].items()))[:1]
            raise ActdbError(
                f"{files[0].what} and {f.what} have different parameters ({differ[0][0]}): weight cosines need "
                "checkpoints of one architecture"
            )
    for name, shape in sorted(shapes[0].items()):
        n_rows = shape[0] if shape else 1
        row_size = int(np.prod(shape[1:])) if len(shape) > 1 else 1
        step = max(1, block_elements // (len(files) * max(row_size, 1)))
        for r0 in range(0, n_rows, step):
            yield np.stack([f.rows(name, r0, min(n_rows, r0 + step)) for f in files])
