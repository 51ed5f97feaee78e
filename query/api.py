"""The Python API for scripts and notebooks: `actdb.open(...)` returns an `ActdbStore`.

>>> import actdb
>>> db = actdb.open(home="actdb-demo")
>>> db.universal(model="seed1", step=800).head()        # a pandas DataFrame
>>> acts = db.activations("seed1@800", layer=1, neurons=[17, 5], tokens="0:1000")
>>> db.examples("seed1@800", "1.17").head()               # its max-activating contexts
"""

from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from sqlalchemy import select

from actdb import __version__
from actdb.query import queries
from actdb.query.explanations import explained_neurons, families, neuron_explanation
from actdb.query.listings import status_rows
from actdb.query.sql_console import DEFAULT_MAX_BYTES, DEFAULT_MAX_ROWS, DEFAULT_TIMEOUT, ReadonlyQuery
from actdb.store.config import StoreConfig
from actdb.store.database import tables
from actdb.store.database.connection import Rows, Store
from actdb.store.database.registry import complete_set, get_checkpoint, resolve_hook
from actdb.store.database.views import v_concept_experts, v_concept_scores
from actdb.store.errors import ActdbError
from actdb.store.files.token import TokenDataset
from actdb.store.hook_names import HOOK_NAME, parse_hook
from actdb.store.refs import parse_index_list, parse_neuron, parse_set_ref, parse_token_range
from actdb.store.set_files import open_set

if TYPE_CHECKING:
    import pandas as pd


def frame(rows: Rows) -> pd.DataFrame:
    """Rows as a pandas DataFrame with the rows' columns, in order, each typed by what it holds: integers as
    int64 (nullable `Int64` where a value is missing, never float64), floats as float64, booleans as bool
    (`boolean` with missing values), text as pandas' text dtype. A column with no values takes the type its query
    declares, so an empty frame still has typed columns."""
    import pandas as pd

    data = {}
    for column in rows.columns:
        values = rows.column(column)
        data[column] = pd.Series(values, dtype=_pandas_dtype(values, rows.types.get(column)), name=column)
    return pd.DataFrame(data, columns=rows.columns)


def _pandas_dtype(values: list, declared: type | None) -> str | None:
    """The dtype for one column's values (None: let pandas infer, e.g. text and timestamps)."""
    present = [v for v in values if v is not None and not (isinstance(v, float) and np.isnan(v))]
    missing = len(present) < len(values)
    if present:
        if all(isinstance(v, (bool, np.bool_)) for v in present):
            kind = bool
        elif all(isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_)) for v in present):
            kind = int
        elif all(isinstance(v, (int, float, np.integer, np.floating, Decimal)) for v in present):
            kind = float
        elif all(isinstance(v, str) for v in present):
            kind = str
        else:
            return None
    else:
        kind = declared
    if kind is bool:
        return "boolean" if missing else "bool"
    if kind is int:
        return "Int64" if missing else "int64"
    if kind in (float, Decimal):
        return "float64"
    return "str" if kind is str else None  # pandas' text dtype (object before pandas 3)


@dataclass
class Activations:
    """One layer's activations for chosen neurons (columns, in the order asked) and token rows, with where each
    row sits in the dataset: flat token index, sequence, position, token id, and whether it counts."""

    values: np.ndarray  # (rows, neurons): float16 as stored, float32 for int8 sets (dequantised)
    neurons: list[int]
    layer: int
    hook: str
    token_index: np.ndarray
    sequence: np.ndarray
    position: np.ndarray
    token_id: np.ndarray
    counted: np.ndarray
    provenance: dict[str, str] = field(default_factory=dict)  # where the values come from: see `write`

    def to_frame(self) -> pd.DataFrame:
        """Position columns, then one float32 column per neuron named `L.N`."""
        import pandas as pd

        data = {
            "token_index": self.token_index,
            "sequence": self.sequence,
            "position": self.position,
            "token_id": self.token_id,
            "counted": self.counted,
        }
        data.update({f"{self.layer}.{n}": self.values[:, k].astype(np.float32) for k, n in enumerate(self.neurons)})
        return pd.DataFrame(data)

    def write(self, path: str | os.PathLike) -> None:
        """`.npy` (the values only), `.csv` or `.parquet` (positions and a header, one column per neuron), each
        with its provenance (model, step, revision, hook, dataset and its fingerprint, layer, rows, actdb
        version...): Parquet as key-value metadata, CSV as `# key: value` lines before the header (pandas reads
        the table with `read_csv(path, comment="#")`), `.npy` in a `FILE.npy.json` sidecar."""
        path = Path(path)
        if path.suffix not in (".npy", ".csv", ".parquet"):
            raise ActdbError(f"unsupported output {path.name!r}; use .npy, .csv or .parquet")
        try:
            if path.suffix == ".npy":
                np.save(path, self.values)
                Path(f"{path}.json").write_text(json.dumps(self.provenance, indent=2) + "\n")
            elif path.suffix == ".csv":
                with path.open("w", newline="") as fh:
                    fh.writelines(f"# {key}: {value}\n" for key, value in self.provenance.items())
                    self.to_frame().to_csv(fh, index=False, float_format="%.6g")
            else:
                self._write_parquet(path)
        except OSError as exc:
            raise ActdbError(f"cannot write {path}: {exc.strerror or exc}") from None

    def _write_parquet(self, path: Path) -> None:
        try:
            import pyarrow as pa
            import pyarrow.parquet as pq
        except ImportError:
            raise ActdbError("writing Parquet needs pyarrow: pip install 'actdb[tables]'") from None
        table = pa.Table.from_pandas(self.to_frame(), preserve_index=False)
        metadata = {**(table.schema.metadata or {}), **{k.encode(): v.encode() for k, v in self.provenance.items()}}
        pq.write_table(table.replace_schema_metadata(metadata), path)


class ActdbStore:
    """Read access to a store: listings as pandas DataFrames (columns named as in the CLI's JSON), activations
    as NumPy arrays with their token positions."""

    def __init__(self, store: Store) -> None:
        self.store = store

    @classmethod
    def open(cls, home: str | os.PathLike | None = None, database_url: str | None = None) -> ActdbStore:
        """Open a store read-only (SQLite `mode=ro`, PostgreSQL read-only transactions)."""
        return cls(Store.open(StoreConfig.resolve(home, database_url), read_only=True))

    def close(self) -> None:
        self.store.close()

    def activation_sets(self) -> pd.DataFrame:
        return frame(status_rows(self.store))

    def models(self) -> pd.DataFrame:
        """One row per model: family, seed, architecture, layers, d_mlp, source, and its checkpoints (how many,
        first and last step; missing where none is registered yet)."""
        return frame(queries.models_listing(self.store))

    def activations(
        self,
        target: str,
        layer: int,
        neurons: str | list[int] | None = None,
        tokens: str | None = None,
        dataset: str | None = None,
        counted_only: bool = False,
        hook: str | None = None,
    ) -> Activations:
        """One layer of MODEL@STEP at `hook` (default: the only hook of its sets): the neurons in the order asked
        (each once), token rows `START:END`, with the provenance an export records."""
        ref = parse_set_ref(target)
        hook = resolve_hook(self.store, parse_hook(hook) if hook else None, ref.model, ref.step, ref.dataset or dataset)
        with self.store.transaction() as conn:
            aset = complete_set(conn, ref, dataset, hook or HOOK_NAME)
            ckpt = get_checkpoint(conn, ref.model, ref.step)
        ds_path = aset.dataset_path
        provenance = {
            "model": ref.model,
            "step": str(ckpt.step),
            "source": ckpt.source,
            "revision": ckpt.revision or "",
            "weights_sha256": ckpt.weights_sha256 or "",
            "hook": aset.hook,
            "stored_dtype": aset.dtype,
            "dataset": aset.dataset_name,
            "dataset_fingerprint": aset.dataset_fingerprint,
            "activation_set_id": str(aset.id),
        }
        with open_set(self.store, aset) as reader:
            h = reader.header
            if not 0 <= layer < h.n_layers:
                raise ActdbError(f"layer {layer} does not exist ({h.n_layers} layers)")
            cols = _neuron_list(neurons, h.d_mlp)
            rows = parse_token_range(tokens, h.n_tokens)
            order = np.argsort(cols, kind="stable")  # HDF5 reads sorted columns; the caller's order is restored
            stored = reader.read_neurons(layer, sorted(cols), rows.start, rows.stop)
            values = np.empty_like(stored)
            values[:, order] = stored
        ds = TokenDataset.load(self.store.config.file(ds_path))
        index = np.arange(rows.start, rows.stop)
        keep = ds.mask.reshape(-1)[rows] if counted_only else np.ones(len(index), dtype=bool)
        provenance |= {
            "layer": str(layer),
            "neurons": ",".join(map(str, cols)),
            "tokens": f"{rows.start}:{rows.stop}",
            "counted_only": str(counted_only).lower(),
            "actdb_version": __version__,
        }
        return Activations(
            values=values[keep],
            neurons=cols,
            layer=layer,
            hook=aset.hook,
            token_index=index[keep],
            sequence=index[keep] // ds.seq_len,
            position=index[keep] % ds.seq_len,
            token_id=ds.tokens.reshape(-1)[rows][keep],
            counted=ds.mask.reshape(-1)[rows][keep],
            provenance=provenance,
        )

    def text_activations(
        self, target: str, text: str, neurons: str | list[str], hook: str | None = None, device: str = "auto"
    ) -> pd.DataFrame:
        """Per token of `text`, the activation of each neuron (`"L.N,..."` or a list of `"L.N"`) of MODEL@STEP,
        computed now by loading the checkpoint with ingest's own loader and hooks (as `actdb activations`): columns
        position, token and one per neuron, `"MODEL@STEP L.N"`."""
        from actdb.query.text_activations import LoadedModels, Probe, text_activations
        from actdb.store.refs import parse_list

        ref = parse_set_ref(target)
        cells = [
            parse_neuron(x) for x in parse_list(neurons if isinstance(neurons, str) else ",".join(neurons), "neurons")
        ]
        probes = [Probe(ref.model, ref.step, layer, n) for layer, n in cells]
        hook = parse_hook(hook) if hook else None
        return frame(text_activations(self.store, probes, text, LoadedModels(1, device), hook))

    def read_layer(self, target: str, layer: int, **options: Any) -> np.ndarray:
        """The values of `activations(...)` alone: `(tokens, neurons)` (float16; float32 for int8 sets), neurons in
        the order asked."""
        return self.activations(target, layer, **options).values

    def universal(self, **filters: Any) -> pd.DataFrame:
        """Universal neurons; filters as `actdb universal` (model, step, layer, run, threshold, control, sort,
        limit, min_stability, hook)."""
        return frame(queries.universal_neurons(self.store, **filters))

    def universal_by_layer(self, **filters: Any) -> pd.DataFrame:
        """Per layer counts of universal neurons; filters as `actdb universal --by-layer` (hook among them)."""
        return frame(queries.universal_by_layer(self.store, **filters))

    def neuron(self, target: str, neuron: str, hook: str | None = None, examples: int = 5) -> dict[str, pd.DataFrame]:
        """Everything `actdb neuron` shows at one hook (default: the only one of MODEL@STEP), one frame per
        section: `explanation`, `examples` (`examples` max-activating contexts), `top_tokens`, `vocabulary`, then
        statistics, matches, universality, history and ablations."""
        ref = parse_set_ref(target)
        layer, index = parse_neuron(neuron)
        explained = neuron_explanation(self.store, ref.model, ref.step, layer, index, examples, pieces=True, hook=hook)
        story = queries.neuron_story(self.store, ref.model, ref.step, layer, index, hook)
        return {k: frame(rows) for k, rows in {**explained, **story}.items()}

    def examples(self, target: str, neuron: str, n: int = 32, hook: str | None = None) -> pd.DataFrame:
        """The neuron's max-activating examples: activation, sequence, position, token, and the context around
        it (`context` marks the maximum with «»; `before`/`after` are the raw text on each side). A neuron the
        checkpoint does not have is an ActdbError."""
        ref = parse_set_ref(target)
        layer, index = parse_neuron(neuron)
        story = neuron_explanation(self.store, ref.model, ref.step, layer, index, n, pieces=True, hook=hook)
        return frame(story["examples"])

    def explanation(self, target: str, neuron: str, hook: str | None = None) -> dict[str, pd.DataFrame]:
        """What the neuron does: `explanation` (variance fractions with their chance levels, vocabulary moments,
        label, family), `examples`, `top_tokens` and `vocabulary` (top and bottom tokens of W_U w_out). A neuron the
        checkpoint does not have is an ActdbError."""
        ref = parse_set_ref(target)
        layer, index = parse_neuron(neuron)
        story = neuron_explanation(self.store, ref.model, ref.step, layer, index, 32, pieces=True, hook=hook)
        return {k: frame(rows) for k, rows in story.items()}

    def explanations(self, model: str | None = None, step: int | None = None, hook: str | None = None) -> pd.DataFrame:
        """Every explained neuron: the columns of `v_neuron_explanations` (token/position fractions, top token,
        vocabulary moments and label, family by its set's recorded thresholds), then `token`, the top token's
        quoted readable text. As in the views and `families()`, `top_token` is the token id. A model, step or hook
        the store lacks is an ActdbError, as in the CLI."""
        queries.check_scope(self.store, model, step)
        if hook is not None:
            hook = resolve_hook(self.store, parse_hook(hook), model, step)
        return frame(explained_neurons(self.store, model, step, hook))

    def families(
        self, target: str, threshold: float | None = None, control: str = "none", hook: str | None = None
    ) -> pd.DataFrame:
        """Universal neurons of MODEL@STEP with their family (see `actdb families`)."""
        ref = parse_set_ref(target)
        rows, _counts, _rules = families(
            self.store, model=ref.model, step=ref.step, threshold=threshold, control=control, hook=hook
        )
        return frame(rows)

    def persistence(
        self,
        model: str | None = None,
        control: str | None = None,
        threshold: float | None = None,
        hook: str | None = None,
    ) -> pd.DataFrame:
        """Stored persistence rows (see `actdb persistence`), optionally of one model, control, threshold, hook.
        An unknown model or control is an ActdbError (an empty frame would read as "nothing persists")."""
        from actdb.compute.correlation.engine import CONTROLS

        if control is not None and control not in CONTROLS:
            raise ActdbError(f"unknown control {control!r} (one of: {', '.join(CONTROLS)})")
        queries.check_scope(self.store, model)
        return frame(queries.persistence_listing(self.store, model, control, threshold, hook))

    def ablations(self, model: str | None = None) -> pd.DataFrame:
        """Complete ablations (see `actdb ablations`), optionally of one model, each with the hook of the set whose
        labels chose its neurons."""
        return frame(queries.ablations_listing(self.store, model))

    def trajectories(self, run: int | None = None, metric: str | None = None) -> pd.DataFrame:
        """Every pairwise value of a trajectory run (default: the newest), long format: model, step, other_model,
        other_step, metric (win_rate, disagreement, ensemble_gain, weight_cosine, weight_delta_cosine, distance),
        value, n_targets; `.pivot(...)` gives a matrix. A metric the run did not store is an ActdbError."""
        from actdb.query.trajectory_tables import long_rows

        return frame(long_rows(self.store, run, metric))

    def trajectory_points(self, run: int | None = None) -> pd.DataFrame:
        """Per checkpoint of a trajectory run: targets, top-1 accuracy, mean loss, Bradley-Terry strength and the
        map's coordinates."""
        from actdb.query.trajectory_tables import point_rows

        return frame(point_rows(self.store, run))

    def concepts(self, name: str | None = None, model: str | None = None, step: int | None = None) -> pd.DataFrame:
        """Per concept and complete concept run: best AP and AUROC, the permutation null (q99 of the best and the
        k-th best AP, excess, p and how many permutations), experts above tau (`v_concept_scores`). An unknown
        concept set, model or step is an ActdbError."""
        self._check_concept_filters(name, None, model, step)
        v = v_concept_scores
        return frame(
            self.store.query(_filtered(v, concept_set=name, model=model, step=step).order_by(v.c.run_id, v.c.concept))
        )

    def concept_experts(
        self, name: str, concept: str | None = None, model: str | None = None, step: int | None = None
    ) -> pd.DataFrame:
        """The top-k expert neurons per concept and complete run (`v_concept_experts`). An unknown concept set,
        concept, model or step is an ActdbError, as in `actdb concept experts`."""
        self._check_concept_filters(name, concept, model, step)
        v = v_concept_experts
        query = _filtered(v, concept_set=name, concept=concept, model=model, step=step)
        return frame(self.store.query(query.order_by(v.c.run_id, v.c.concept, v.c.rank)))

    def _check_concept_filters(
        self, name: str | None, concept: str | None, model: str | None, step: int | None
    ) -> None:
        """The filters of a concept listing must name what the store has: an unknown name would read as "no
        results"."""
        from actdb.compute.concepts.concept_file import load_concept_set

        if name is not None:
            _id, concepts = load_concept_set(self.store, name)
            if concept is not None:
                concepts.position(concept, name)
        queries.check_scope(self.store, model, step)

    def concept_summary(
        self, name: str, human: str | None = None, pool: str = "max", mask: bool = False
    ) -> pd.DataFrame:
        """The per-step table of `actdb concept show` (its Mantel p values as `concept run` stored them)."""
        from actdb.compute.concepts.analysis import concept_table

        return frame(concept_table(self.store, name, human=human, pool=pool, mask=mask)[0])

    def robustness(
        self, run: int | None = None, intervention: str | None = None, controls: bool = False
    ) -> pd.DataFrame:
        """Interventional robustness per complete run and step (`v_robustness_by_step`, every column): IR, IR_norm
        with its bootstrap CI over contexts, the controls' mean and sd, excess, p and its floor, per-seed KL, loss
        change and flips across seeds; with `controls=True`, each control's IR_norm (`v_robustness_controls`)."""
        from actdb.compute.robustness import INTERVENTIONS
        from actdb.query.robustness_tables import robustness_by_step, robustness_controls

        if intervention is not None and intervention not in INTERVENTIONS:
            raise ActdbError(f"unknown intervention {intervention!r} (one of: {', '.join(INTERVENTIONS)})")
        if run is not None:
            with self.store.transaction() as conn:
                if conn.scalar(select(tables.robustness_run.c.id).where(tables.robustness_run.c.id == run)) is None:
                    raise ActdbError(f"no robustness run {run}; db.robustness() lists them")
        if controls:
            return frame(robustness_controls(self.store, run))
        return frame(robustness_by_step(self.store, run, intervention, wide=True))

    def runs(self) -> pd.DataFrame:
        return frame(queries.runs_listing(self.store))

    def sql(
        self,
        query: str,
        timeout: float = DEFAULT_TIMEOUT,
        max_rows: int | None = DEFAULT_MAX_ROWS,
        max_bytes: int | None = DEFAULT_MAX_BYTES,
    ) -> pd.DataFrame:
        """One read-only SQL statement (see `actdb sql`) as a DataFrame of at most `max_rows` rows and `max_bytes`
        bytes of values as text; a cut result warns and says so in `frame.attrs["notice"]`. For results of any
        size iterate `sql_rows` instead."""
        with self.sql_rows(query, timeout, max_rows, max_bytes) as result:
            table = frame(Rows.from_tuples(result.columns, list(result)))
        if result.notice:
            warnings.warn(result.notice, stacklevel=2)
            table.attrs["notice"] = result.notice
        return table

    def sql_rows(
        self,
        query: str,
        timeout: float = DEFAULT_TIMEOUT,
        max_rows: int | None = None,
        max_bytes: int | None = None,
    ) -> ReadonlyQuery:
        """One read-only SQL statement streamed: `.columns`, then iterate tuples (memory does not grow with the
        result; no cap unless given). Use it in a `with` block so the connection closes if you stop early."""
        return ReadonlyQuery(self.store.config, query, timeout, max_rows, max_bytes)


def _filtered(view, **equal: Any):
    """SELECT * FROM view WHERE column = value for every value given."""
    query = select(view)
    for column, value in equal.items():
        if value is not None:
            query = query.where(view.c[column] == value)
    return query


def _neuron_list(neurons: str | list[int] | None, d_mlp: int) -> list[int]:
    if neurons is None:
        return list(range(d_mlp))
    cols = parse_index_list(neurons) if isinstance(neurons, str) else [int(n) for n in neurons]
    if not cols:
        raise ActdbError("no neurons asked for")
    if len(set(cols)) != len(cols):
        raise ActdbError("a neuron is listed twice; list each once")
    if min(cols) < 0 or max(cols) >= d_mlp:
        raise ActdbError(f"neuron indices must be in 0..{d_mlp - 1}")
    return cols
