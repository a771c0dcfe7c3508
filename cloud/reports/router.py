"""The reports API (role viewer): revenue, litres and sessions of a period of days, per day, machine or site, as
JSON for the console's page or as CSV for a spreadsheet. What counts on which day: :mod:`cloud.reports.service`."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import APIRouter, Query

from cloud.csvout import csv_response
from cloud.deps import Svc, Viewer
from cloud.errors import ERRORS
from cloud.reports.schemas import ReportOut
from cloud.reports.service import parse_period

router = APIRouter(prefix="/api/v1/operator", tags=["reports"], responses=ERRORS)
Day = Annotated[str, Query(max_length=40, description="a day, YYYY-MM-DD (China time)")]
TOTAL = "合计 / Total"
NO_SITE = "未分组 / No site"


@router.get("/reports", response_model=ReportOut, response_model_exclude_none=True,
            responses={200: {"content": {"text/csv": {}}}})
def report(op: Viewer, svc: Svc, to: Day, from_: Annotated[str, Query(alias="from", max_length=40,
                                                                       description="the first day, YYYY-MM-DD")],
           by: Literal["day", "machine", "site"] = "day", format: Literal["json", "csv"] = "json") -> Any:
    """Settled sessions started from ``from`` to ``to`` (both included, at most 366 days), per day, machine or
    site, with refunds and net revenue and the totals; ``format=csv`` downloads the rows and a totals row."""
    first, last = parse_period(from_, to)
    r = svc.reports.report(first, last, by)
    if format == "json":
        return r
    head = {"day": ["day"], "machine": ["machine_id", "location", "site"], "site": ["site", "machines"]}[by]
    figures = ["sessions", "litres", "revenue_yuan", "refunded_sessions", "refunds_yuan", "net_yuan"]

    def line(row: dict[str, Any]) -> list[Any]:
        return [row["sessions"], _decimal(row["volume_ml"], 3), _decimal(row["revenue_fen"], 2),
                row["refunded_sessions"], _decimal(row["refunded_fen"], 2), _decimal(row["net_fen"], 2)]

    def key(row: dict[str, Any]) -> list[Any]:
        if by == "day":
            return [row["day"]]
        if by == "machine":
            return [row["machine_id"], row["location"], row["site"] or NO_SITE]
        return [row["site"] or NO_SITE, row["machines"]]

    rows = [key(row) + line(row) for row in r["rows"]]
    rows.append([TOTAL] + [""] * (len(head) - 1) + line(r["totals"]))
    return csv_response(f"tapshare-report-{by}-{r['from_day']}-{r['to_day']}.csv", head + figures, rows)


def _decimal(units: int, places: int) -> str:
    """An exact decimal of integer minor units (fen as yuan, ml as litres): no float ever touches money."""
    sign = "-" if units < 0 else ""
    whole, frac = divmod(abs(units), 10**places)
    return f"{sign}{whole}.{frac:0{places}d}"
