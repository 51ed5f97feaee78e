"""A small Python API for notebooks: open a store, list what it holds, read activations, run the CLI's queries.

>>> from query.api import ActdbStore
>>> db = ActdbStore.open("actdb-store")
>>> db.universal(model="seed1", step=1500)[:3]
>>> x = db.read_layer("seed1@1500", layer=1, neurons="5,17", tokens="0:1000")
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from actdb.query import queries
from actdb.query.listings import persistence_rows, single_dataset, status_rows
from actdb.query.sql_console import run_readonly
from actdb.store.activation_file import ActivationReader
from actdb.store.config import StoreConfig
from actdb.store.database import Store
from actdb.store.errors import ActdbError
from actdb.store.registry import find_set
from actdb.store.token_file import TokenDataset


def _dicts(columns: list[str], rows: list[tuple]) -> list[dict[str, Any]]:
    return [dict(zip(columns, r, strict=True)) for r in rows]


def _parse_range(text: str | None, n: int) -> slice:
    if text is None:
        return slice(0, n)
    start, sep, stop = text.partition(":")
    try:
        lo = int(start) if start else 0
        hi = int(stop) if stop else n
    except ValueError:
        raise ActdbError(f"malformed token range {text!r}; write START:END") from None
    if not sep or not (0 <= lo < hi <= n):
        raise ActdbError(f"token range {text!r} is outside 0:{n}")
    return slice(lo, hi)


class ActdbStore:
    """Read access to a store for scripts and notebooks; every method returns plain Python/NumPy values."""

    def __init__(self, store: Store) -> None:
        self.store = store

    @classmethod
    def open(cls, home: str | os.PathLike | None = None, database_url: str | None = None) -> ActdbStore:
        return cls(Store.open(StoreConfig.resolve(home, database_url)))

    def activation_sets(self) -> list[dict[str, Any]]:
        return _dicts(*status_rows(self.store))

    def models(self) -> list[str]:
        return sorted({r["model"] for r in self.activation_sets()})

    def read_layer(
        self,
        target: str,
        layer: int,
        neurons: str | list[int] | None = None,
        tokens: str | None = None,
        dataset: str | None = None,
        counted_only: bool = False,
    ) -> np.ndarray:
        """Activations `(tokens, neurons)` of one layer of MODEL@STEP, as stored (float16)."""
        model, step = queries.parse_target(target)
        dataset = dataset or single_dataset(self.store)
        with self.store.session() as s:
            aset = find_set(s, model, step, dataset, "mlp.post")
            if aset is None or aset.status != "complete":
                raise ActdbError(f"{target} has no complete activation set on {dataset}")
            ds_path = aset.dataset.path
        with ActivationReader(aset.path) as reader:
            h = reader.header
            if not 0 <= layer < h.n_layers:
                raise ActdbError(f"layer {layer} does not exist ({h.n_layers} layers)")
            if isinstance(neurons, str):
                try:
                    neurons = [int(x) for x in neurons.split(",") if x.strip()]
                except ValueError:
                    raise ActdbError(f"malformed neuron list {neurons!r}; write e.g. 5,17") from None
            cols = sorted(set(neurons)) if neurons else list(range(h.d_mlp))
            if cols[0] < 0 or cols[-1] >= h.d_mlp:
                raise ActdbError(f"neuron indices must be in 0..{h.d_mlp - 1}")
            rows = _parse_range(tokens, h.n_tokens)
            arr = reader.read_neurons(layer, cols if neurons else slice(None), rows.start, rows.stop)
        if counted_only:
            arr = arr[TokenDataset.load(ds_path).mask.reshape(-1)[rows]]
        return arr

    @staticmethod
    def write_array(arr: np.ndarray, path: str | os.PathLike) -> None:
        path = Path(path)
        try:
            if path.suffix == ".npy":
                np.save(path, arr)
            elif path.suffix == ".csv":
                np.savetxt(path, arr.astype(np.float32), delimiter=",", fmt="%.6g")
            else:
                raise ActdbError(f"unsupported output {path.name!r}; use .npy or .csv")
        except OSError as exc:
            raise ActdbError(f"cannot write {path}: {exc.strerror or exc}") from None

    def universal(self, **filters: Any) -> list[dict[str, Any]]:
        return _dicts(*queries.universal_neurons(self.store, **filters))

    def universal_by_layer(self, **filters: Any) -> list[dict[str, Any]]:
        return _dicts(*queries.universal_by_layer(self.store, **filters))

    def neuron(self, target: str, neuron: str) -> dict[str, list[dict[str, Any]]]:
        model, step = queries.parse_target(target)
        layer, index = queries.parse_neuron(neuron)
        return {k: _dicts(*v) for k, v in queries.neuron_story(self.store, model, step, layer, index).items()}

    def persistence(self, model: str | None = None, control: str | None = None) -> list[dict[str, Any]]:
        return _dicts(*persistence_rows(self.store, model, control))

    def ablations(self, model: str | None = None) -> list[dict[str, Any]]:
        return _dicts(*queries.ablations_listing(self.store, model))

    def runs(self) -> list[dict[str, Any]]:
        return _dicts(*queries.runs_listing(self.store))

    def sql(self, query: str) -> list[dict[str, Any]]:
        return _dicts(*run_readonly(self.store.config, query))
