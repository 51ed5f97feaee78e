"""Rendering rows as an aligned table, CSV or JSON, the three formats every listing command offers."""

from __future__ import annotations

import csv
import decimal
import io
import json
import math
from collections.abc import Callable, Iterable, Sequence
from itertools import islice
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from actdb.store.database.connection import Rows

FORMATS = ("table", "csv", "json")


def cell(value: Any) -> str:
    """One value as the tables show it: blank for NULL, yes/no, floats to 4 significant digits."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.4g}" if abs(value) < 1e5 else f"{value:.3e}"
    return str(value)


def _json_value(value: Any) -> Any:
    """A JSON-native form of what a database returns: NUMERIC as int or float, bytes as hex, times as ISO text,
    anything else unknown as its text."""
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, decimal.Decimal):
        return _json_value(int(value) if value == value.to_integral_value() else float(value))
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value).hex()
    if hasattr(value, "isoformat"):
        return value.isoformat()
    if isinstance(value, (list, tuple)):
        return [_json_value(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _json_value(v) for k, v in value.items()}
    return str(value)


def json_records(rows: Rows) -> list[dict[str, Any]]:
    """Rows as JSON-ready objects keyed by column name (non-finite floats become null, NUMERIC a number, bytes
    hex, datetimes ISO text)."""
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
    cells = [[cell(r[c]) for c in columns] for r in rows]
    widths = [max([len(c)] + [len(r[i]) for r in cells]) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True)).rstrip()]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(v.rjust(w) for v, w in zip(r, widths, strict=True)).rstrip() for r in cells]
    if not rows:
        lines.append("(no rows)")
    return "\n".join(lines)


WIDTH_SAMPLE = 1000  # rows a streamed table measures its column widths on (later rows may run wider)


def render_stream(columns: Sequence[str], rows: Iterable[Sequence[Any]], fmt: str, write: Callable[[str], Any]) -> None:
    """Rows written as they arrive, in the formats of `render`, so output of any length takes constant memory:
    CSV and JSON row by row, a table aligned on its first WIDTH_SAMPLE rows."""
    rows = iter(rows)
    if fmt == "json":
        write("[")
        sep = "\n"
        for r in rows:
            write(sep + "  " + json.dumps({c: _json_value(v) for c, v in zip(columns, r, strict=True)}))
            sep = ",\n"
        write("\n]\n" if sep != "\n" else "]\n")
        return
    if fmt == "csv":
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        writer.writerow(columns)
        for r in rows:
            writer.writerow(["" if v is None else v for v in r])
            if buf.tell() > 1 << 16:
                write(buf.getvalue())
                buf.seek(0)
                buf.truncate()
        write(buf.getvalue())
        return
    head = [[cell(v) for v in r] for r in islice(rows, WIDTH_SAMPLE)]
    widths = [max([len(c)] + [len(r[i]) for r in head]) for i, c in enumerate(columns)]
    write("  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True)).rstrip() + "\n")
    write("  ".join("-" * w for w in widths) + "\n")
    for r in head:
        write("  ".join(v.rjust(w) for v, w in zip(r, widths, strict=True)).rstrip() + "\n")
    for r in rows:
        write("  ".join(cell(v).rjust(w) for v, w in zip(r, widths, strict=True)).rstrip() + "\n")
    if not head:
        write("(no rows)\n")
