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
