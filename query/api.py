"""The Python API for scripts and notebooks: `actdb.open(...)` returns an `ActdbStore`.

>>> import actdb
>>> db = actdb.open(home="actdb-demo")
>>> db.universal(model="seed1", step=800)[:3]          # list of dicts keyed by column name
>>> x = db.read_layer("seed1@800", layer=1, neurons="5,17", tokens="0:1000")
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from actdb.query import queries
from actdb.query.listings import status_rows
from actdb.query.sql_console import run_readonly
from actdb.store.activation_file import ActivationReader
from actdb.store.config import StoreConfig
from actdb.store.database import Rows, Store
from actdb.store.errors import ActdbError
from actdb.store.refs import parse_index_list, parse_neuron, parse_set_ref, parse_token_range
from actdb.store.registry import complete_set
from actdb.store.token_file import TokenDataset


class ActdbStore:
    """Read access to a store; every method returns plain Python values (lists of dicts) or NumPy arrays."""

    def __init__(self, store: Store) -> None:
        self.store = store

    @classmethod
    def open(cls, home: str | os.PathLike | None = None, database_url: str | None = None) -> ActdbStore:
        """Open a store read-only (SQLite `mode=ro`, PostgreSQL read-only transactions)."""
        return cls(Store.open(StoreConfig.resolve(home, database_url), read_only=True))

    def close(self) -> None:
        self.store.close()

    def activation_sets(self) -> list[dict[str, Any]]:
        return status_rows(self.store).dicts()

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
        with self.store.session() as s:
            aset = complete_set(s, parse_set_ref(target), dataset)
            ds_path = aset.dataset.path
        with ActivationReader(self.store.config.file(aset.path)) as reader:
            h = reader.header
            if not 0 <= layer < h.n_layers:
                raise ActdbError(f"layer {layer} does not exist ({h.n_layers} layers)")
            if isinstance(neurons, str):
                neurons = parse_index_list(neurons)
            cols = sorted(set(neurons)) if neurons else list(range(h.d_mlp))
            if cols[0] < 0 or cols[-1] >= h.d_mlp:
                raise ActdbError(f"neuron indices must be in 0..{h.d_mlp - 1}")
            rows = parse_token_range(tokens, h.n_tokens)
            arr = reader.read_neurons(layer, cols if neurons else slice(None), rows.start, rows.stop)
        if counted_only:
            arr = arr[TokenDataset.load(self.store.config.file(ds_path)).mask.reshape(-1)[rows]]
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
        """Universal neurons; filters as `actdb universal` (model, step, layer, run, threshold, control, sort,
        limit)."""
        return queries.universal_neurons(self.store, **filters).dicts()

    def universal_by_layer(self, **filters: Any) -> list[dict[str, Any]]:
        return queries.universal_by_layer(self.store, **filters).dicts()

    def neuron(self, target: str, neuron: str) -> dict[str, list[dict[str, Any]]]:
        ref = parse_set_ref(target)
        layer, index = parse_neuron(neuron)
        story = queries.neuron_story(self.store, ref.model, ref.step, layer, index)
        return {k: rows.dicts() for k, rows in story.items()}

    def persistence(
        self, model: str | None = None, control: str | None = None, threshold: float | None = None
    ) -> list[dict[str, Any]]:
        return queries.persistence_listing(self.store, model, control, threshold).dicts()

    def ablations(self, model: str | None = None) -> list[dict[str, Any]]:
        return queries.ablations_listing(self.store, model).dicts()

    def runs(self) -> list[dict[str, Any]]:
        return queries.runs_listing(self.store).dicts()

    def sql(self, query: str, timeout: float = 30.0) -> list[dict[str, Any]]:
        """One read-only SQL statement (see `actdb sql`)."""
        columns, rows = run_readonly(self.store.config, query, timeout=timeout)
        return Rows.from_tuples(columns, rows).dicts()
