"""Reports: revenue, litres and sessions per day, per machine and per site, for a period of whole days.

What counts, exactly:

* A **session** counts once it is settled (``state = 'ended'``), on the **day it started** (``created_ms``, the
  moment the person started it from the phone), in China time (UTC+8, no daylight saving: the time of the
  payment providers' bills and of reconciliation). So a pour over midnight counts on the day it began, and a
  report a machine sends late (after an outage) fills in the day the water was poured, not the day it arrived.
* **Revenue** is what the settlement charged (``sessions.fee_fen``, which is the bill's ``amount_fen`` and the
  ``charge`` balance entry); **litres** are the billed volume (``sessions.volume_ml``). Free sessions (below the
  minimum dispense) count as sessions with 0 fen.
* **Refunds** are the operators' refunds of a pour: ``refund`` balance entries with the session's id. Whether it
  went to the balance or on to the original payment, the refund entry is written once (the payment's share is
  a ``withdrawal`` entry and a ``provider_refunds`` row carrying the same money onward), so only the refund
  entries are summed. A refund counts against its session's day, machine and site, so **net revenue** is what
  the sessions of the period finally earned; a refund given today for last month's pour changes last month.
* A machine counts at its **current site** (``machines.site``; an empty site is "no site").

The figures are aggregate queries over the period on the sessions' time index (``sessions_by_time``): the
sessions and their refunds by day, and per machine or site the same by machine. The refunds query wants an index
of the refund entries by session, and a covering index of settled sessions by time makes the sessions' aggregates
index-only scans (see ``bench/bench_console.py``, which measures both, and the README).
"""

from __future__ import annotations

import re
from datetime import date, datetime, timedelta
from typing import Any

from sqlalchemy import BigInteger, Connection, Select, and_, cast, distinct, func, literal_column, select

from cloud import db as t
from cloud.db import Database
from cloud.errors import Invalid
from cloud.wallet.payments import CHINA

DAY_MS = 86_400_000
CHINA_OFFSET_MS = 8 * 3_600_000
MAX_DAYS = 366                  # a year, a leap year's included
GROUPINGS = ("day", "machine", "site")
_ISO_DAY = re.compile(r"^\d{4}-\d{2}-\d{2}$")
FIGURES = ("sessions", "volume_ml", "revenue_fen", "refunded_sessions", "refunded_fen", "net_fen")


def parse_period(first: str, last: str) -> tuple[date, date]:
    """The period's first and last day (both included), or a clear 422."""
    days = []
    for name, text in (("from", first), ("to", last)):
        try:
            if not _ISO_DAY.match(text):
                raise ValueError
            days.append(date.fromisoformat(text))
        except ValueError:
            raise Invalid("bad_date", f"{name}: expected a day as YYYY-MM-DD, got {text[:40]!r}") from None
    a, b = days
    if a > b:
        raise Invalid("bad_period", f"from ({a}) is after to ({b})")
    if (b - a).days + 1 > MAX_DAYS:
        raise Invalid("period_too_long", f"a report covers at most {MAX_DAYS} days; {a} to {b} is "
                      f"{(b - a).days + 1} days: ask for a shorter period", max_days=MAX_DAYS)
    return a, b


def day_start_ms(d: date) -> int:
    return int(datetime(d.year, d.month, d.day, tzinfo=CHINA).timestamp() * 1000)


def _zero() -> dict[str, int]:
    return dict.fromkeys(FIGURES, 0)


class Reports:
    def __init__(self, db: Database) -> None:
        self.db = db

    def report(self, first: date, last: date, by: str) -> dict[str, Any]:
        """Every day of the period (for the chart), the rows of the grouping asked for, and the totals. Per machine
        or site, a second aggregate by machine (two aggregates of a few hundred rows each are cheaper than one by
        day and machine, which a month of a large fleet makes tens of thousands of rows)."""
        lo, hi = day_start_ms(first), day_start_ms(last + timedelta(days=1))
        with self.db.read() as conn:
            by_day = _sums(conn, DAY_KEY, lo, hi)
            if by != "day":
                per_machine = _sums(conn, t.sessions.c.machine_id, lo, hi)
                m = t.machines.c
                machines = conn.execute(select(m.machine_id, m.location, m.site).order_by(m.machine_id)).all()
        epoch = date(1970, 1, 1)
        days = []
        for n in range((last - first).days + 1):
            d = first + timedelta(days=n)
            days.append({"key": d.isoformat(), "day": d.isoformat(), "start_ms": day_start_ms(d),
                         **by_day.get((d - epoch).days, _zero())})
        rows = days
        if by != "day":
            rows = [{"key": mid, "machine_id": mid, "location": loc, "site": site, **per_machine.get(mid, _zero())}
                    for mid, loc, site in machines]
            if by == "site":
                rows = _by_site(rows)
        totals = _zero()
        for d in days:
            _add(totals, d)
        return {"from_day": first.isoformat(), "to_day": last.isoformat(), "by": by, "timezone": "Asia/Shanghai",
                "from_ms": lo, "to_ms": hi, "days": days, "rows": rows, "totals": totals}


def _sums(conn: Connection, key, lo: int, hi: int) -> dict[Any, dict[str, int]]:
    """The figures of the settled sessions started in [lo, hi), grouped by ``key`` (a column or expression of
    ``sessions``)."""
    out: dict[Any, dict[str, int]] = {}
    for k, n, fen, ml in conn.execute(sessions_query(key, lo, hi)):
        out[k] = {**_zero(), "sessions": n, "revenue_fen": fen, "volume_ml": ml}
    for k, n, fen in conn.execute(refunds_query(key, lo, hi)):
        figures = out.setdefault(k, _zero())
        figures["refunded_sessions"], figures["refunded_fen"] = n, fen
    for figures in out.values():
        figures["net_fen"] = figures["revenue_fen"] - figures["refunded_fen"]
    return out


def _add(into: dict[str, int], figures: dict[str, Any]) -> None:
    for f in FIGURES:
        into[f] += figures[f]


DAY_KEY = (t.sessions.c.created_ms + CHINA_OFFSET_MS) // DAY_MS      # days since 1970-01-01 in China time


def _in_period(lo: int, hi: int):
    s = t.sessions.c
    return and_(s.created_ms >= lo, s.created_ms < hi, s.state == "ended")


def _total(column):
    """A sum as a whole number (PostgreSQL sums a bigint as numeric), 0 for none."""
    return cast(func.coalesce(func.sum(column), 0), BigInteger)


def sessions_query(key, lo: int, hi: int) -> Select:
    """Count, revenue and litres of the settled sessions started in [lo, hi) by ``key``: one aggregate over the
    time index, grouped by its output column (so the grouping is the selected expression itself)."""
    s = t.sessions.c
    return (select(key.label("k"), func.count(), _total(s.fee_fen), _total(s.volume_ml))
            .where(_in_period(lo, hi)).group_by(literal_column("k")))


def refunds_query(key, lo: int, hi: int) -> Select:
    """The refunds of those sessions by ``key``: sessions refunded and fen (refund entries are few: with an index
    of them by session this is a short loop over the refunds; see the module's note)."""
    s, e = t.sessions.c, t.balance_entries.c
    return (select(key.label("k"), func.count(distinct(e.session_id)), _total(e.amount_fen))
            .select_from(t.balance_entries.join(t.sessions, s.session_id == e.session_id))
            .where(e.kind == "refund", _in_period(lo, hi)).group_by(literal_column("k")))


def _by_site(machine_rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Machines' figures summed by their site; named sites first (by name), then the machines with none."""
    sites: dict[str, dict[str, Any]] = {}
    for r in machine_rows:
        row = sites.setdefault(r["site"], {"key": r["site"], "site": r["site"], "machines": 0, **_zero()})
        row["machines"] += 1
        for f in FIGURES:
            row[f] += r[f]
    return sorted(sites.values(), key=lambda r: (r["site"] == "", r["site"]))
