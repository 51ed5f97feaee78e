"""Every explorer table as a file: CSV (the CLI's CSV rendering) or Parquet (through pandas and pyarrow, the
API's frames), named after the page it came from."""

from __future__ import annotations

import io

from starlette.responses import Response

from actdb.query.output import render
from actdb.store.database.connection import Rows
from actdb.store.errors import ActdbError

FORMATS = ("csv", "parquet")


def download(rows: Rows, name: str, fmt: str) -> Response:
    """`rows` as an attachment `name.csv` or `name.parquet`."""
    if fmt == "csv":
        body = render(rows, "csv").encode()
        media = "text/csv; charset=utf-8"
    elif fmt == "parquet":
        try:
            import pyarrow  # noqa: F401  (pandas writes Parquet through it)
        except ImportError:
            raise ActdbError("Parquet needs pyarrow: pip install 'actdb[tables]'") from None
        from actdb.query.api import frame

        buffer = io.BytesIO()
        frame(rows).to_parquet(buffer, index=False)
        body = buffer.getvalue()
        media = "application/vnd.apache.parquet"
    else:
        raise ActdbError(f"unknown format {fmt!r}; use {' or '.join(FORMATS)}")
    return Response(body, media_type=media, headers={"Content-Disposition": f'attachment; filename="{name}.{fmt}"'})
