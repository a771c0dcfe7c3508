"""Bills as a person sees them: in the machine's time zone, with its place and any refund."""

from __future__ import annotations

import datetime as dt
from typing import Any
from zoneinfo import ZoneInfo

from sqlalchemy import Connection, func, select

from cloud import db as t
from cloud.db import first_row
from cloud.errors import NotFound

DEFAULT_TIMEZONE = "Asia/Shanghai"


def local_time(iso_utc: str, tz: str) -> str:
    try:
        when = dt.datetime.fromisoformat(iso_utc.replace("Z", "+00:00"))
    except ValueError:
        return iso_utc
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.UTC)
    return when.astimezone(ZoneInfo(tz)).strftime("%Y-%m-%d %H:%M:%S")


def bill_views(conn: Connection, bills: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Bills as the phone shows them: in the machine's time zone, with any refund. Two queries for the
    whole list, not two per bill."""
    if not bills:
        return []
    m, e = t.machines.c, t.balance_entries.c
    places = {r[0]: (r[1] or DEFAULT_TIMEZONE, r[2]) for r in conn.execute(
        select(m.machine_id, m.timezone, m.location).where(m.machine_id.in_({b["machine_id"] for b in bills})))}
    refunds = dict(conn.execute(select(e.session_id, func.sum(e.amount_fen)).where(
        e.session_id.in_([b["session_id"] for b in bills]), e.kind == "refund").group_by(e.session_id)).all())
    out = []
    for bill in bills:
        tz, location = places.get(bill["machine_id"], (DEFAULT_TIMEZONE, ""))
        out.append({**bill, "timezone": tz, "location": location, "started_local": local_time(bill["started_at"], tz),
                    "ended_local": local_time(bill["ended_at"], tz),
                    "refunded_fen": int(refunds.get(bill["session_id"]) or 0)})
    return out


def user_bills(conn: Connection, user_id: str, limit: int) -> list[dict[str, Any]]:
    """A person's newest bills."""
    rows = conn.execute(select(t.bills).where(t.bills.c.user_id == user_id)
                        .order_by(t.bills.c.created_ms.desc()).limit(limit)).mappings().all()
    return bill_views(conn, [dict(b) for b in rows])


def user_bill(conn: Connection, user_id: str, session_id: str) -> dict[str, Any]:
    """One of a person's bills (someone else's is as unknown as a missing one)."""
    row = first_row(conn, select(t.bills).where(t.bills.c.session_id == session_id))
    if row is None or row["user_id"] != user_id:
        raise NotFound("unknown_bill", "no such bill")
    return bill_views(conn, [row])[0]
