"""Response models of the reports API."""

from __future__ import annotations

from pydantic import BaseModel


class Figures(BaseModel):
    sessions: int                 # settled sessions started in the period
    volume_ml: int                # billed water
    revenue_fen: int              # charged by their settlements
    refunded_sessions: int        # of those, how many were refunded (in part or whole)
    refunded_fen: int
    net_fen: int                  # revenue less refunds


class ReportRowOut(Figures):
    key: str                      # the day (YYYY-MM-DD), the machine's id or the site ("" for machines without one)
    day: str | None = None
    start_ms: int | None = None   # the day's first millisecond (China time)
    machine_id: str | None = None
    location: str | None = None
    site: str | None = None
    machines: int | None = None   # a site's machines


class ReportOut(BaseModel):
    from_day: str
    to_day: str
    by: str
    timezone: str                 # the days are this zone's (China time, UTC+8)
    from_ms: int
    to_ms: int                    # the period is [from_ms, to_ms)
    days: list[ReportRowOut]      # every day of the period, for the chart, whatever the grouping
    rows: list[ReportRowOut]      # the grouping asked for
    totals: Figures
