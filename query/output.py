"""Rendering rows as an aligned table, CSV or JSON, the three formats every listing command offers."""

from __future__ import annotations

import csv
import io
import json
import math
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from actdb.store.database import Rows

FORMATS = ("table", "csv", "json")


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.4g}" if abs(value) < 1e5 else f"{value:.3e}"
    return str(value)


def _json_value(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if hasattr(value, "isoformat"):
        return value.isoformat()
    return value


def json_records(rows: Rows) -> list[dict[str, Any]]:
    """Rows as JSON-ready objects keyed by column name (non-finite floats become null, datetimes ISO text)."""
    return [{c: _json_value(r[c]) for c in rows.columns} for r in rows]


def render(rows: Rows, fmt: str = "table") -> str:
    """Rows as an aligned table, CSV with a header, or JSON (a list of objects keyed by column name)."""
    columns = rows.columns
    if fmt == "json":
        return json.dumps(json_records(rows), indent=2)
    if fmt == "csv":
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        writer.writerow(columns)
        writer.writerows([[("" if r[c] is None else r[c]) for c in columns] for r in rows])
        return buf.getvalue().rstrip("\n")
    cells = [[_cell(r[c]) for c in columns] for r in rows]
    widths = [max([len(c)] + [len(r[i]) for r in cells]) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True)).rstrip()]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(v.rjust(w) for v, w in zip(r, widths, strict=True)).rstrip() for r in cells]
    if not rows:
        lines.append("(no rows)")
    return "\n".join(lines)
