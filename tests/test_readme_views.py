"""The README's table of analyst views names every view once and, where a row lists columns, every column the
view has: tests/test_query.py checks `store/database/views.py` against the databases, this checks the document a
newcomer reads against `views.py`."""

from __future__ import annotations

import re
from pathlib import Path

from actdb.store.database.views import VIEWS

README = Path(__file__).resolve().parents[1] / "README.md"
ROW = re.compile(r"^\| `(v_\w+)` \| [^|]+ \| (.+) \|$", re.M)


def _rows() -> list[tuple[str, str]]:
    return ROW.findall(README.read_text())


def test_every_view_is_described_once():
    names = [name for name, _ in _rows()]
    assert sorted(names) == sorted(t.name for t in VIEWS.sorted_tables)


def test_listed_columns_are_the_views_columns():
    described = dict(_rows())
    for table in VIEWS.sorted_tables:
        text = described[table.name]
        if text.startswith(("the same columns", "the columns of")):
            continue  # described as another view's columns
        listed = set(re.findall(r"\b[a-z][a-z_0-9]*\b", re.sub(r"\([^)]*\)", "", text)))
        missing = [c.name for c in table.columns if c.name not in listed]
        assert not missing, f"README's row for {table.name} lacks {missing}"


AGGREGATE = re.compile(r"\b(?:AVG|SUM|COUNT)\([^)]*\)[^`;\"]*?\bFROM (v_\w+)([^`;\"]*)", re.I)


def test_example_aggregates_read_one_run_per_set_and_one_control():
    """An average over a per-run view pools every run that scored a set (and both controls): it moves when a
    run is added. The README's own examples read the canonical views and fix or group by the control."""
    per_run = {t.name for t in VIEWS.sorted_tables if {"run_id", "control"} <= {c.name for c in t.columns}}
    found = AGGREGATE.findall(README.read_text())
    assert found
    for view, rest in found:
        if view in per_run:
            assert view.startswith("v_canonical_"), f"README aggregates over {view}, which pools runs"
            assert "control" in rest, f"README aggregates over {view} across both controls: {rest.strip()!r}"
