"""`frame`: integer columns stay integers (nullable Int64 where a value is missing), empty frames keep typed
columns; `models()` is a DataFrame on an empty store too."""

import pandas as pd

from actdb.query.api import ActdbStore, frame
from actdb.store.database.connection import Rows


def test_frame_keeps_integers_as_integers():
    rows = Rows(
        ["name", "step", "bytes", "score", "flag"],
        [
            {"name": "a", "step": 0, "bytes": None, "score": 0.5, "flag": True},
            {"name": "b", "step": 800, "bytes": 2**40, "score": None, "flag": False},
        ],
    )
    df = frame(rows)
    assert df["step"].dtype == "int64" and df["bytes"].dtype == "Int64" and df["bytes"][1] == 2**40
    assert df["score"].dtype == "float64" and pd.isna(df["score"][1]) and df["flag"].dtype == "bool"
    assert df["name"].dtype == pd.Series(["a"]).dtype and list(df.columns) == rows.columns


def test_empty_frames_take_the_declared_types():
    df = frame(Rows(["model", "layer", "excess"], [], {"model": str, "layer": int, "excess": float}))
    assert len(df) == 0 and list(df.dtypes) == [pd.Series(["a"]).dtype, "int64", "float64"]


def test_models_is_a_typed_frame_on_an_empty_store(store):
    models = ActdbStore(store).models()
    assert isinstance(models, pd.DataFrame) and len(models) == 0
    assert models["layers"].dtype == "int64" and models["checkpoints"].dtype == "int64"
    assert models["model"].dtype == pd.Series(["a"]).dtype


def test_filters_that_name_nothing_the_store_has_are_errors_not_empty_frames(store):
    """An unknown control, model, intervention or robustness run is an ActdbError naming what is allowed: an empty
    frame would read as "nothing persists" or "no robustness"; known filters on an empty store give empty frames."""
    import pytest

    from actdb.store.errors import ActdbError

    db = ActdbStore(store)
    with pytest.raises(ActdbError, match="unknown control 'tokens' \\(one of: none, token\\)"):
        db.persistence(control="tokens")
    with pytest.raises(ActdbError, match="seed9"):
        db.persistence(model="seed9")
    with pytest.raises(ActdbError, match="unknown intervention 'ablation' \\(one of: ablate, generate, edits\\)"):
        db.robustness(intervention="ablation")
    with pytest.raises(ActdbError, match="no robustness run 7"):
        db.robustness(run=7)
    with pytest.raises(ActdbError, match="no robustness run 7"):
        db.robustness(run=7, controls=True)
    assert len(db.persistence(control="token")) == 0 and len(db.robustness(intervention="edits")) == 0
