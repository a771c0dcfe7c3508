"""Sessions as the console sees them (rental records, s7): a search over every session that stays fast with
millions of rows, its CSV, and one session's whole record: the bill, the flow series as volume and flow rate
over time, temperatures, valve times, the machine's events about it and every fen that moved for it.

Every query walks an index newest first (``sessions_by_time``, ``sessions_by_machine``, ``sessions_by_user_time``)
and stops after a page; filters no index covers (state, end reason, amount) are applied to at most
:data:`SCAN_ROWS` sessions per page, so a rare match far back costs a few more pages, never a table scan.
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Iterator
from typing import Any

from sqlalchemy import Select, and_, func, or_, select

import contract as p
from cloud import db as t
from cloud.accounts.identity import mask_phone
from cloud.db import Database, first_row
from cloud.errors import Invalid, NotFound
from cloud.sessions.bills import DEFAULT_TIMEZONE, local_time

SCAN_ROWS = 10_000          # sessions looked at per page when filters no index covers are set
COUNT_CAP = 10_000          # a total is counted up to this many, then shown as "more than"
OPEN_STATES = ("starting", "active")
STATES = ("starting", "active", "ended", "voided", "lost")
CURSOR_RE = re.compile(r"^(\d{1,19})\.([\w-]{1,64})$")
PHONE_RE = re.compile(r"^1[3-9]\d{9}$")
EVENT_WINDOW_MS = 15 * 60_000   # the machine's events about a session: from a minute before to this after its end
CSV_HEADER = ["session_id", "started_local", "machine_id", "location", "user_id", "phone", "state", "end_reason",
              "volume_ml", "fee_yuan", "price_fen_per_l", "credit_limit_fen", "ended_local", "void_reason"]


class NoSuchUser(Exception):
    """A search by a phone number nobody has: nothing matches."""


class Search:
    """What the operator searches by; ``user`` is a user id or a phone number (matched exactly)."""

    def __init__(self, machine_id: str = "", user: str = "", from_ms: int = 0, to_ms: int = 2**62, state: str = "",
                 end_reason: str = "", min_fen: int | None = None, max_fen: int | None = None) -> None:
        if from_ms >= to_ms:
            raise Invalid("bad_period", "the period ends before it begins")
        if min_fen is not None and max_fen is not None and min_fen > max_fen:
            raise Invalid("bad_amount_range", "the smallest amount is larger than the largest")
        self.machine_id, self.user, self.from_ms, self.to_ms = machine_id, user.strip(), from_ms, to_ms
        self.state, self.end_reason, self.min_fen, self.max_fen = state, end_reason, min_fen, max_fen

    def indexed(self, user_id: str | None) -> list[Any]:
        """Conditions an index answers: the period, the machine, the user."""
        s = t.sessions.c
        where = [s.created_ms >= self.from_ms, s.created_ms < self.to_ms]
        if self.machine_id:
            where.append(s.machine_id == self.machine_id)
        if user_id is not None:
            where.append(s.user_id == user_id)
        return where

    def filters(self, s) -> list[Any]:
        """Conditions checked row by row, on the columns ``s`` (the table's, or a subquery's)."""
        where = []
        if self.state == "open":
            where.append(s.state.in_(OPEN_STATES))
        elif self.state:
            where.append(s.state == self.state)
        if self.end_reason:
            where.append(s.end_reason == self.end_reason)
        if self.min_fen is not None:
            where.append(s.fee_fen >= self.min_fen)
        if self.max_fen is not None:
            where.append(s.fee_fen <= self.max_fen)
        return where


def parse_cursor(before: str) -> tuple[int, str] | None:
    if not before:
        return None
    m = CURSOR_RE.match(before)
    if not m:
        raise Invalid("bad_cursor", "before: a cursor given by a previous page (<created_ms>.<session_id>)")
    return int(m.group(1)), m.group(2)


def cursor(row: dict[str, Any]) -> str:
    return f"{row['created_ms']}.{row['session_id']}"


def newest_first(q: Select) -> Select:
    s = t.sessions.c
    return q.order_by(s.created_ms.desc(), s.session_id.desc())


LIST_COLUMNS = ("session_id", "machine_id", "user_id", "state", "created_ms", "ended_ms", "end_reason", "void_reason",
                "fee_fen", "volume_ml", "price_fen_per_l", "credit_limit_fen")


class Records:
    def __init__(self, db: Database) -> None:
        self.db = db

    # ---------------------------------------------------------------- search

    @staticmethod
    def _user_id(conn, user: str) -> str | None:
        """The user a search names: a phone number (exactly, 11 digits) or a user id; None: no user given.
        :class:`NoSuchUser` for a phone number nobody has."""
        if not user:
            return None
        if PHONE_RE.match(user):
            found = conn.execute(select(t.users.c.user_id).where(t.users.c.phone == user)).scalar()
            if found is None:
                raise NoSuchUser
            return found
        return user

    def search(self, f: Search, before: str, limit: int) -> dict[str, Any]:
        """A page of sessions, newest first, and the cursor of the next (``next_before``), which is also given when
        the page stopped after :data:`SCAN_ROWS` sessions without filling up (``scanned_to_ms``: searched back
        to then). ``count`` is the number of matches when counting is cheap (no row filters; first page only),
        ``count_capped`` when there are more than :data:`COUNT_CAP`."""
        s = t.sessions.c
        after = parse_cursor(before)
        cols = [s[c] for c in LIST_COLUMNS]
        empty = {"sessions": [], "next_before": None, "scanned_to_ms": None, "count": 0, "count_capped": False}
        with self.db.read() as conn:
            try:
                user_id = self._user_id(conn, f.user)
            except NoSuchUser:
                return empty
            where = f.indexed(user_id)
            if after is not None:
                where += [s.created_ms <= after[0], or_(s.created_ms < after[0], s.session_id < after[1])]
            row_filters = f.filters(s)
            window = newest_first(select(*cols).where(and_(*where)))
            if row_filters:
                window = window.limit(SCAN_ROWS).subquery()
                w = window.c
                q = select(window).where(and_(*f.filters(w))).order_by(w.created_ms.desc(), w.session_id.desc())
            else:
                q = window
            rows = [dict(r) for r in conn.execute(q.limit(limit + 1)).mappings().all()]
            more, scanned_to = len(rows) > limit, None
            rows = rows[:limit]
            next_before = cursor(rows[-1]) if more else None
            if not more and row_filters:        # the window ran out before the page filled: older ones may match
                last = first_row(conn, newest_first(select(s.created_ms, s.session_id).where(and_(*where)))
                                 .offset(SCAN_ROWS - 1).limit(1))
                if last is not None:
                    next_before, scanned_to = cursor(last), last["created_ms"]
            count = capped = None
            if after is None and not row_filters:
                n = conn.execute(select(func.count()).select_from(
                    select(s.session_id).where(and_(*f.indexed(user_id))).limit(COUNT_CAP + 1).subquery())).scalar()
                count, capped = min(n, COUNT_CAP), n > COUNT_CAP
            self._decorate(conn, rows)
        return {"sessions": rows, "next_before": next_before, "scanned_to_ms": scanned_to, "count": count,
                "count_capped": capped}

    @staticmethod
    def _decorate(conn, rows: list[dict[str, Any]]) -> None:
        """Each row's place and the person's masked phone: two queries for the page."""
        if not rows:
            return
        m, u = t.machines.c, t.users.c
        places = dict(conn.execute(select(m.machine_id, m.location)
                                   .where(m.machine_id.in_({r["machine_id"] for r in rows}))).all())
        people = {r[0]: (r[1], r[2]) for r in conn.execute(select(u.user_id, u.phone, u.deleted_ms)
                                                          .where(u.user_id.in_({r["user_id"] for r in rows})))}
        for r in rows:
            phone, deleted = people.get(r["user_id"], ("", None))
            r["location"] = places.get(r["machine_id"], "")
            r["phone_masked"] = "" if deleted else mask_phone(phone)
            r["stuck"] = r["state"] in OPEN_STATES

    def export(self, f: Search) -> Iterator[list[Any]]:
        """Every session of the search as CSV rows (newest first), read from the database as they are written
        (a server-side cursor on PostgreSQL: a million rows never sit in memory)."""
        s, m, u = t.sessions.c, t.machines.c, t.users.c
        with self.db.read(streaming=True) as conn:
            try:
                user_id = self._user_id(conn, f.user)
            except NoSuchUser:
                return
            q = newest_first(select(*[s[c] for c in LIST_COLUMNS], m.location, m.timezone, u.phone, u.deleted_ms)
                             .join(t.machines, m.machine_id == s.machine_id)
                             .join(t.users, u.user_id == s.user_id)
                             .where(and_(*f.indexed(user_id), *f.filters(s))))
            for r in conn.execution_options(yield_per=500).execute(q).mappings():
                tz = r["timezone"] or DEFAULT_TIMEZONE
                yield [r["session_id"], local_ms(r["created_ms"], tz), r["machine_id"], r["location"], r["user_id"],
                       "" if r["deleted_ms"] else mask_phone(r["phone"]), r["state"], r["end_reason"] or "",
                       r["volume_ml"], "" if r["fee_fen"] is None else f"{r['fee_fen'] / 100:.2f}",
                       r["price_fen_per_l"], r["credit_limit_fen"], local_ms(r["ended_ms"], tz), r["void_reason"]]

    # ---------------------------------------------------------------- one record

    def record(self, session_id: str, now_ms: int) -> dict[str, Any]:
        with self.db.read() as conn:
            s = first_row(conn, select(t.sessions).where(t.sessions.c.session_id == session_id))
            if s is None:
                raise NotFound("unknown_session", "no such session")
            machine = first_row(conn, select(t.machines.c.machine_id, t.machines.c.location, t.machines.c.site,
                                             t.machines.c.timezone).where(t.machines.c.machine_id == s["machine_id"]))
            person = first_row(conn, select(t.users.c.phone, t.users.c.deleted_ms)
                               .where(t.users.c.user_id == s["user_id"]))
            bill = first_row(conn, select(t.bills).where(t.bills.c.session_id == session_id))
            rental = first_row(conn, select(t.rental_records).where(t.rental_records.c.session_id == session_id))
            money = self._money(conn, s)
            events = self._events(conn, s, now_ms)
        tz = (machine or {}).get("timezone") or DEFAULT_TIMEZONE
        if bill is not None:
            bill.update(started_local=local_time(bill["started_at"], tz), ended_local=local_time(bill["ended_at"], tz))
        record = (rental or {}).get("record")
        started_ms = _iso_ms(rental["started_at"]) if rental else None
        session = {k: v for k, v in s.items() if k != "presence_hash"}
        return {
            "session": session, "machine": machine,
            "user": {"user_id": s["user_id"], "phone_masked": mask_phone(person["phone"]) if person and
                     not person["deleted_ms"] else "", "deleted": bool(person and person["deleted_ms"])},
            "bill": bill, "record": record, "flow": flow_chart(record, started_ms, s),
            "temperatures": temperatures(record), "valve": valve_times(record, started_ms), "events": events,
            "money": money, "stuck": s["state"] in OPEN_STATES}

    @staticmethod
    def _money(conn, s: dict[str, Any]) -> dict[str, Any]:
        """Every balance entry of the session (the person's entries, by their index), and the refunds sent on
        through the providers (named by the operator's audited refund at the same moment)."""
        e = t.balance_entries.c
        entries = [dict(r) for r in conn.execute(select(e.entry_id, e.kind, e.amount_fen, e.note, e.created_ms).where(
            and_(e.user_id == s["user_id"], e.session_id == s["session_id"])).order_by(e.entry_id)).mappings().all()]

        def total(kind: str) -> int:
            return sum(x["amount_fen"] for x in entries if x["kind"] == kind)
        charged, refunded = -total("charge"), total("refund")
        refund_times = {x["created_ms"] for x in entries if x["kind"] == "refund"}
        ids: list[str] = []
        if refund_times:
            a = t.audit_log.c
            for detail in conn.execute(select(a.detail).where(and_(
                    a.at_ms.in_(refund_times), a.action == "refund", a.target == s["session_id"]))).scalars():
                ids += (detail or {}).get("provider_refunds", [])
        r = t.provider_refunds.c
        provider = [dict(x) for x in conn.execute(
            select(r.refund_id, r.provider, r.amount_fen, r.state, r.reason, r.requested_by, r.created_ms, r.done_ms,
                   r.last_error).where(and_(r.user_id == s["user_id"], r.refund_id.in_(ids)))
            .order_by(r.created_ms, r.refund_id)).mappings().all()] if ids else []
        return {"held_fen": -total("hold"), "released_fen": total("release"), "charged_fen": charged,
                "refunded_fen": refunded, "refundable_fen": max(0, charged - refunded) if s["state"] == "ended" else 0,
                "to_original_fen": -total("withdrawal"), "entries": entries, "provider_refunds": provider}

    @staticmethod
    def _events(conn, s: dict[str, Any], now_ms: int) -> list[dict[str, Any]]:
        """The machine's events that name this session (start failures, lost, cancels ignored, ...)."""
        ev = t.machine_events.c
        end = (s["ended_ms"] or now_ms) + EVENT_WINDOW_MS
        rows = conn.execute(select(ev.kind, ev.payload, ev.occurred_ms, ev.received_ms, ev.alarm).where(and_(
            ev.machine_id == s["machine_id"], ev.received_ms >= s["created_ms"] - 60_000, ev.received_ms <= end))
            .order_by(ev.received_ms, ev.id).limit(500)).mappings().all()
        out = []
        for r in rows:
            detail = (r["payload"] or {}).get("detail") or {}
            if isinstance(detail, dict) and detail.get("session_id") == s["session_id"]:
                out.append({"kind": r["kind"], "at_ms": r["occurred_ms"], "alarm": r["alarm"], "detail": detail})
        return out


# ---------------------------------------------------------------- the record's series (pure)

def flow_chart(record: dict[str, Any] | None, started_ms: int | None, s: dict[str, Any]) -> dict[str, Any]:
    """Volume (ml) and flow rate (ml/min) over time, x in epoch ms. From the rental record's flow series (the
    machine samples about once a second, from the valve opening, when nothing had been poured: a series whose
    first sample is later gets that point); without one, from the last progress message the machine sent while
    pouring (the volume from the valve opening, nothing poured, to that message; the flow rate only as that
    message measured it); otherwise nothing. ``source``
    says which, so the page can say how much it shows."""
    out: dict[str, Any] = {"source": "none", "samples": 0, "t_ms": [], "volume_ml": [], "flow_ml_per_min": [],
                           "temp_c": []}
    series = (record or {}).get("flow_series") or []
    if record and started_ms is not None and series:
        cols = record.get("flow_series_columns") or list(p.FLOW_SERIES_COLUMNS)
        try:
            it, ib = cols.index("t_ms"), cols.index("billed_pulses")
        except ValueError:
            return out
        itemp = cols.index("temp_c") if "temp_c" in cols else None
        mppl = record.get("milli_pulses_per_litre") or 0
        prev = None
        first = series[0] if isinstance(series[0], list) and len(series[0]) > ib else None
        if first is not None and isinstance(first[it], int) and first[it] > 0:
            origin: list[Any] = [None] * len(first)       # the valve opening: nothing poured, nothing flowing
            origin[it] = origin[ib] = 0
            series = [origin, *series]
        for row in series:
            try:
                at, pulses = int(row[it]), int(row[ib])
            except (IndexError, TypeError, ValueError):
                continue
            vol = p.volume_ml(pulses, mppl) if mppl else 0
            if prev is None:
                rate = 0 if vol == 0 and at == 0 else None
            else:
                dt_ms = at - prev[0]
                rate = (vol - prev[1]) * 60_000 // dt_ms if dt_ms > 0 else None
            out["t_ms"].append(started_ms + at)
            out["volume_ml"].append(vol)
            out["flow_ml_per_min"].append(rate)
            temp = row[itemp] if itemp is not None and itemp < len(row) else None
            out["temp_c"].append(temp if isinstance(temp, (int, float)) else None)
            prev = (at, vol)
        out.update(source="record", samples=len((record or {}).get("flow_series") or []))
        return out
    prog = s.get("progress") or {}
    if prog.get("elapsed_ms") is not None and s.get("acked_ms"):
        start = s["acked_ms"]
        out.update(source="progress", samples=1, t_ms=[start, start + int(prog["elapsed_ms"])],
                   volume_ml=[0, int(prog.get("volume_ml") or 0)],
                   flow_ml_per_min=[None, int(prog.get("flow_ml_per_min") or 0)], temp_c=[None, None])
    return out


def temperatures(record: dict[str, Any] | None) -> dict[str, Any]:
    if not record:
        return {"start_c": None, "end_c": None, "min_c": None, "max_c": None}
    cols = record.get("flow_series_columns") or list(p.FLOW_SERIES_COLUMNS)
    i = cols.index("temp_c") if "temp_c" in cols else None
    seen = [r[i] for r in record.get("flow_series") or [] if i is not None and i < len(r)
            and isinstance(r[i], (int, float))]
    seen += [x for x in (record.get("temp_start_c"), record.get("temp_end_c")) if isinstance(x, (int, float))]
    return {"start_c": record.get("temp_start_c"), "end_c": record.get("temp_end_c"),
            "min_c": min(seen) if seen else None, "max_c": max(seen) if seen else None}


def valve_times(record: dict[str, Any] | None, started_ms: int | None) -> list[dict[str, Any]]:
    """The valve's openings and closings (with why it closed) in epoch ms."""
    out = []
    for v in (record or {}).get("valve_events") or []:
        if started_ms is None or not isinstance(v, list) or len(v) < 2 or not isinstance(v[0], int):
            continue
        out.append({"at_ms": started_ms + v[0], "action": str(v[1]), "reason": str(v[2]) if len(v) > 2 else ""})
    return out


def _iso_ms(text: str) -> int | None:
    try:
        when = dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
    except (ValueError, AttributeError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.UTC)
    return int(when.timestamp() * 1000)


def local_ms(ms: int | None, tz: str) -> str:
    if ms is None:
        return ""
    return local_time(dt.datetime.fromtimestamp(ms / 1000, dt.UTC).isoformat(), tz)
