"""CSV downloads for the console's searches: UTF-8 with a byte-order mark (so Excel opens Chinese right), a header
row, every row of the search streamed (a large export never sits whole in memory), and cells that a spreadsheet
would run as a formula (=, +, -, @ first) made text, so a user's name cannot become a formula on an operator's
computer (OWASP "CSV injection")."""

from __future__ import annotations

import csv
import io
from collections.abc import Iterable, Iterator
from datetime import UTC, datetime
from typing import Any

from fastapi.responses import StreamingResponse

FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def cell(value: Any) -> Any:
    if isinstance(value, str) and value.startswith(FORMULA_START):
        return "'" + value
    return "" if value is None else value


def iso_utc(ms: int | None) -> str:
    """A time in a CSV cell: ISO 8601 in UTC to the second (``2026-12-06T03:21:58Z``), empty for none."""
    return datetime.fromtimestamp(ms / 1000, UTC).isoformat(timespec="seconds").replace("+00:00", "Z") if ms else ""


def csv_response(filename: str, header: list[str], rows: Iterable[Iterable[Any]]) -> StreamingResponse:
    def lines() -> Iterator[bytes]:
        buf = io.StringIO()
        writer = csv.writer(buf)
        buf.write("\ufeff")
        writer.writerow(header)
        for n, row in enumerate(rows, 1):
            writer.writerow([cell(v) for v in row])
            if n % 500 == 0:
                yield buf.getvalue().encode()
                buf.seek(0)
                buf.truncate()
        yield buf.getvalue().encode()
    return StreamingResponse(lines(), media_type="text/csv; charset=utf-8",
                             headers={"Content-Disposition": f'attachment; filename="{filename}"',
                                      "Cache-Control": "no-store"})
