"""`actdb check`: is every file the database calls complete really there, of the recorded shape, and intact?

Token files are read whole and compared with their recorded sha256; activation files are opened (completion
marker, header against SQL, the shapes of an int8 file's scales and offsets) and, unless `quick`, read through
once so that HDF5 verifies every chunk's Fletcher-32 checksum (int8: of the codes, scales and offsets, which
must also be finite with scales >= 0). Prediction files are read whole the same way (their checksums), and
their length compared with SQL. A dataset's tokenizer recorded as a local folder must still be there. Prediction
and explanation files must name the checkpoint, dataset (and hook) SQL records for them; those written before they
carried that identity cannot be checked, which the log says.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from sqlalchemy import select
from tqdm.auto import tqdm

from actdb.store.database.connection import Rows, Store
from actdb.store.database.schema import ActivationSet, Checkpoint, Dataset, Model, PredictionSet, SetExplanation
from actdb.store.errors import ActdbError
from actdb.store.files.activation import ActivationHeader, ActivationReader
from actdb.store.files.explanation import check_explanation_file
from actdb.store.files.identity import SidecarIdentity, carries_identity
from actdb.store.files.prediction import read_predictions
from actdb.store.files.token import TokenDataset
from actdb.store.set_files import expected_header, set_identity, sidecar_identity

READ_ROWS = 16384


@dataclass
class _Expected:
    what: str
    path: str
    header: ActivationHeader


def check_store(store: Store, quick: bool = False, progress: bool = True, log: Callable[[str], None] = print) -> Rows:
    """One row per problem found (kind, name, path, problem); no rows when everything is intact."""
    problems: list[dict] = []
    with store.session() as s:
        datasets = [
            (d.name, d.path, d.fingerprint, d.tokenizer) for d in s.scalars(select(Dataset).order_by(Dataset.name))
        ]
        sets = [
            _Expected(f"{m.name}@{c.step} on {d.name}", a.path, expected_header(s, a))
            for a, c, m, d in s.execute(
                select(ActivationSet, Checkpoint, Model, Dataset)
                .join(Checkpoint, Checkpoint.id == ActivationSet.checkpoint_id)
                .join(Model, Model.id == Checkpoint.model_id)
                .join(Dataset, Dataset.id == ActivationSet.dataset_id)
                .where(ActivationSet.status == "complete")
                .order_by(Model.name, Checkpoint.step, Dataset.name)
            )
        ]
        predictions = {
            p.path: (
                f"{p.name}@{p.step} on {p.dataset}",
                p.n_tokens,
                sidecar_identity(s, p.checkpoint_id, p.dataset_id),
            )
            for p in s.execute(
                select(
                    PredictionSet.path,
                    PredictionSet.n_tokens,
                    PredictionSet.checkpoint_id,
                    PredictionSet.dataset_id,
                    Model.name,
                    Checkpoint.step,
                    Dataset.name.label("dataset"),
                )
                .join(Checkpoint, Checkpoint.id == PredictionSet.checkpoint_id)
                .join(Model, Model.id == Checkpoint.model_id)
                .join(Dataset, Dataset.id == PredictionSet.dataset_id)
                .where(PredictionSet.status == "complete")
                .order_by(PredictionSet.id)
            )
        }
        explanations = [
            (f"{m.name}@{c.step} on {d.name}", x.path, m.n_layers, m.d_mlp, set_identity(s, x.set_id))
            for x, c, m, d in s.execute(
                select(SetExplanation, Checkpoint, Model, Dataset)
                .join(ActivationSet, ActivationSet.id == SetExplanation.set_id)
                .join(Checkpoint, Checkpoint.id == ActivationSet.checkpoint_id)
                .join(Model, Model.id == Checkpoint.model_id)
                .join(Dataset, Dataset.id == ActivationSet.dataset_id)
                .order_by(Model.name, Checkpoint.step, Dataset.name)
            )
        ]
    for name, path, sha, tokenizer in datasets:
        problem = _check_tokens(store, path, sha)
        if problem:
            problems.append({"kind": "dataset", "name": name, "path": path, "problem": problem})
        try:
            store.config.tokenizer_location(tokenizer, name)
        except ActdbError as exc:  # a local tokenizer folder that is gone: examples and texts cannot be decoded
            problems.append({"kind": "dataset tokenizer", "name": name, "path": tokenizer, "problem": str(exc)})
    for expected in sets:
        problem = _check_activations(store, expected, quick, progress)
        if problem:
            problems.append(
                {"kind": "activation set", "name": expected.what, "path": expected.path, "problem": problem}
            )
    unchecked = {"prediction": 0, "explanation": 0}  # intact files written before sidecars carried an identity
    for path, (name, n_tokens, identity) in predictions.items():
        problem = _check_predictions(store, path, n_tokens, identity)
        if problem:
            problems.append({"kind": "predictions", "name": name, "path": path, "problem": problem})
        else:
            unchecked["prediction"] += not carries_identity(store.config.file(path))
    for name, path, n_layers, d_mlp, identity in explanations:
        found = check_explanation_file(store.config.file(path), n_layers, d_mlp, identity, quick=quick)
        problems += [{"kind": "explanations", "name": name, "path": path, "problem": p} for p in found]
        if not found:
            unchecked["explanation"] += not carries_identity(store.config.file(path))
    log(
        f"checked {len(datasets)} token files, {len(sets)} activation sets, {len(predictions)} prediction files and "
        f"{len(explanations)} explanation files" + (" (quick)" if quick else "")
    )
    if any(unchecked.values()):
        log(_unchecked_line(unchecked))
    return Rows(["kind", "name", "path", "problem"], problems)


def _unchecked_line(unchecked: dict[str, int]) -> str:
    """The log line on sidecars whose identity cannot be checked (not a problem: an earlier actdb wrote them)."""
    counts = " and ".join(f"{n} {kind} file{'s' * (n != 1)}" for kind, n in unchecked.items() if n)
    return (
        f"cannot check which checkpoint {counts} belong to: an earlier actdb wrote them without that identity "
        "(`actdb predictions MODEL@STEP --force` and `actdb examples MODEL@STEP --force` rewrite them with it)"
    )


def _check_tokens(store: Store, path: str, sha: str) -> str | None:
    try:
        tokens = TokenDataset.load(store.config.file(path))
    except ActdbError as exc:
        return str(exc)
    return None if tokens.fingerprint == sha else "token ids or exclusions differ from the fingerprint recorded in SQL"


def _check_activations(store: Store, e: _Expected, quick: bool, progress: bool) -> str | None:
    file = store.config.file(e.path)
    if not file.exists():
        return "file missing"
    n_tokens = e.header.n_tokens
    try:
        with ActivationReader(file, expected=e.header) as reader:  # header, layer shapes and dtypes against SQL
            if not quick:
                bar = tqdm(total=n_tokens, unit="tok", unit_scale=True, disable=not progress, desc=f"check {e.what}")
                for start in range(0, n_tokens, READ_ROWS):
                    reader.read_rows(start, min(start + READ_ROWS, n_tokens))
                    bar.update(min(READ_ROWS, n_tokens - start))
                bar.close()
                return _check_quantisation(reader)
    except ActdbError as exc:
        return str(exc)
    return None


def _check_quantisation(reader: ActivationReader) -> str | None:
    """An int8 file's scales and offsets must be finite, and its scales non-negative."""
    if reader.quantisation is None:
        return None
    scales, offsets, _rows = reader.quantisation
    for scale, offset in zip(scales, offsets, strict=True):
        try:
            s, o = scale[:], offset[:]
        except OSError as exc:
            return f"activation file {reader.path} is corrupt (checksum or read error): {exc}"
        if not (np.isfinite(s).all() and np.isfinite(o).all() and (s >= 0).all()):
            return f"{scale.name.lstrip('/')} or its offsets hold non-finite or negative values"
    return None


def _check_predictions(store: Store, path: str, n_tokens: int | None, expected: SidecarIdentity) -> str | None:
    file = store.config.file(path)
    if not file.exists():
        return "file missing"
    try:
        result = read_predictions(file, expected)  # reads every chunk, so HDF5 verifies its checksum
    except ActdbError as exc:
        return str(exc)
    if len(result.top1) != n_tokens or len(result.loss) != n_tokens:
        return f"{len(result.top1)} positions, SQL says {n_tokens}"
    return None
