"""The fleet as the console shows it: one row per machine from its settings, its last heartbeat and its open alarms
(filtered, sorted and paged here, since online-ness comes from the command hub and presence, and heartbeats are JSON),
one machine's charts, event log, commands and sessions, and a price change for many machines at once."""

from __future__ import annotations

import bisect
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any
from zoneinfo import ZoneInfo

from sqlalchemy import and_, func, select, update

import contract as p
from cloud import db as t
from cloud.alarms.rules import RULES
from cloud.db import Database, audit
from cloud.devices.service import Commands
from cloud.errors import NotFound
from cloud.fleet.samples import SAMPLE_EVERY_MS, Samples
from cloud.operators.service import Operators

# The heartbeat's key for the price the machine's screen shows (contract.messages.HeartbeatMsg): machines with
# older software leave it out. Named once here so the fleet follows the contract if the name changes.
DISPLAYED_PRICE_KEY = "price_fen_per_l"
CONSUMABLES_KEY = "consumables"          # [{kind: filter | uv_lamp, used_permille, due, ...}], also optional
HOUR_MS = 3_600_000
RANGES_H = {"24h": 24, "7d": 7 * 24}
LONGEST_SESSION_MS = 86_400_000           # sessions are looked up by start time (indexed) a day before the range
SORT_KEYS = ("machine_id", "site", "location", "online", "state", "lockouts", "open_alarms", "price_fen_per_l",
             "displayed_price_fen_per_l", "software_version", "outbox_depth", "dead_letters", "temp_c", "tds_ppm",
             "filter_used_permille", "uv_used_permille", "last_seen_ms")


def consumable(heartbeat: dict[str, Any], kind: str) -> dict[str, Any] | None:
    """The heartbeat's word on one consumable (``filter``, ``uv_lamp``), or None when it says nothing usable."""
    items = heartbeat.get(CONSUMABLES_KEY)
    for item in items if isinstance(items, list) else []:
        if isinstance(item, dict) and item.get("kind") == kind and isinstance(item.get("used_permille"), int):
            return item
    return None


def fleet_row(view: dict[str, Any], open_alarms: int) -> dict[str, Any]:
    """A machine as the fleet list shows it (``view``: :meth:`Operators.machine_view`). Anything the heartbeat
    does not say (never heard from, older software) is None."""
    hb = view["heartbeat"] if isinstance(view.get("heartbeat"), dict) else {}
    shown = hb.get(DISPLAYED_PRICE_KEY)
    shown = shown if isinstance(shown, int) and not isinstance(shown, bool) else None
    filt, uv = consumable(hb, "filter"), consumable(hb, "uv_lamp")
    lockouts = [str(x) for x in hb.get("lockouts") or []]
    return {
        "machine_id": view["machine_id"], "site": view.get("site") or "", "location": view["location"],
        "online": view["online"], "enrolled": view["enrolled"], "last_seen_ms": view["last_seen_ms"],
        "state": hb.get("state"), "lockouts": lockouts, "open_alarms": open_alarms,
        "price_fen_per_l": view["price_fen_per_l"], "displayed_price_fen_per_l": shown,
        "price_mismatch": shown is not None and shown != view["price_fen_per_l"],
        "software_version": hb.get("software_version") or None, "outbox_depth": hb.get("outbox_depth"),
        "dead_letters": hb.get("dead_letters"), "temp_c": hb.get("temp_c"), "tds_ppm": hb.get("tds_ppm"),
        "filter_used_permille": filt["used_permille"] if filt else None, "filter_due": bool(filt and filt.get("due")),
        "uv_used_permille": uv["used_permille"] if uv else None, "uv_due": bool(uv and uv.get("due")),
    }


def matches(row: dict[str, Any], f: dict[str, Any]) -> bool:
    q = (f.get("q") or "").strip().lower()
    if q and not any(q in (row[k] or "").lower() for k in ("machine_id", "location", "site")):
        return False
    if f.get("online") and row["online"] != (f["online"] == "online"):
        return False
    if f.get("state") and row["state"] != f["state"]:
        return False
    if f.get("site") and row["site"] != f["site"]:
        return False
    return not ((f.get("has_alarms") and not row["open_alarms"]) or (f.get("has_lockouts") and not row["lockouts"])
                or (f.get("price_mismatch") and not row["price_mismatch"]))


def sort_rows(rows: list[dict[str, Any]], key: str, descending: bool) -> list[dict[str, Any]]:
    """Sorted by ``key`` (ties by machine id), rows without a value last in either direction."""
    def value(r: dict[str, Any]) -> Any:
        v = r[key]
        return len(v) if isinstance(v, list) else v.lower() if isinstance(v, str) else v
    known = [r for r in rows if value(r) is not None]
    unknown = [r for r in rows if value(r) is None]
    known.sort(key=lambda r: r["machine_id"])
    known.sort(key=value, reverse=descending)
    return known + sorted(unknown, key=lambda r: r["machine_id"])


def hour_starts(now_ms: int, hours: int, tz: str) -> list[int]:
    """The starts (ms) of the last ``hours`` hours of the machine's local clock, the current one last. Local hours
    are an hour apart in UTC too, except across the rare half-hour DST shifts (Lord Howe), where a bucket is off."""
    offset_ms = int(ZoneInfo(tz).utcoffset(datetime.fromtimestamp(now_ms / 1000, UTC)).total_seconds() * 1000)
    current = (now_ms + offset_ms) // HOUR_MS * HOUR_MS - offset_ms
    return [current - i * HOUR_MS for i in range(hours - 1, -1, -1)]


class Fleet:
    def __init__(self, db: Database, operators: Operators, notify: Callable[[str], None]) -> None:
        self.db, self.operators, self.machines, self._notify = db, operators, operators.machines, notify

    # ---------------------------------------------------------------- the list
    def rows(self, now_ms: int) -> list[dict[str, Any]]:
        """Every machine's row, in machine id order."""
        a = t.operator_alarms.c
        with self.db.read() as conn:
            machines = conn.execute(select(t.machines).order_by(t.machines.c.machine_id)).mappings().all()
            alarms = dict(conn.execute(select(a.machine_id, func.count()).where(and_(
                a.machine_id.is_not(None), a.state != "resolved")).group_by(a.machine_id)).all())
        return [fleet_row(self.operators.machine_view(dict(m), now_ms), alarms.get(m["machine_id"], 0))
                for m in machines]

    def search(self, filters: dict[str, Any], sort: str, descending: bool, now_ms: int) -> dict[str, Any]:
        """The rows that match, sorted, with the whole fleet's figures for the header and the filters' choices."""
        rows = self.rows(now_ms)
        online = sum(r["online"] for r in rows)
        stats = {"machines": len(rows), "online": online, "offline": len(rows) - online,
                 "online_share_pct": round(100 * online / len(rows), 1) if rows else None,
                 "with_alarms": sum(1 for r in rows if r["open_alarms"]),
                 "with_lockouts": sum(1 for r in rows if r["lockouts"]),
                 "price_mismatches": sum(r["price_mismatch"] for r in rows)}
        return {"rows": sort_rows([r for r in rows if matches(r, filters)], sort, descending), "stats": stats,
                "sites": sorted({r["site"] for r in rows if r["site"]}),
                "states": sorted({r["state"] for r in rows if r["state"]})}

    def set_price(self, operator_id: str, machine_ids: list[str], price_fen_per_l: int, now_ms: int) -> list[str]:
        """One new price for several machines in one transaction (all or none: an unknown id changes nothing),
        audited per machine, each machine sent the price."""
        ids = sorted(set(machine_ids))
        mc = t.machines.c
        with self.db.tx() as conn:
            known = set(conn.execute(select(mc.machine_id).where(mc.machine_id.in_(ids))).scalars())
            unknown = [m for m in ids if m not in known]
            if unknown:
                raise NotFound("unknown_machine", f"no such machine: {', '.join(unknown[:10])}; nothing was changed",
                               unknown=unknown)
            conn.execute(update(t.machines).where(mc.machine_id.in_(ids)).values(price_fen_per_l=price_fen_per_l))
            for mid in ids:
                Commands.queue(conn, mid, p.CommandKind.PRICE, now_ms, price_fen_per_l=price_fen_per_l)
                audit(conn, operator_id, "change_machine", mid, {"price_fen_per_l": price_fen_per_l, "bulk": len(ids)},
                      now_ms)
        for mid in ids:
            self._notify(mid)
        return ids

    # ---------------------------------------------------------------- one machine
    def machine(self, machine_id: str, now_ms: int) -> dict[str, Any]:
        """A machine's settings, last heartbeat and fleet row, and its alarms not yet resolved (the rules in words)."""
        view = self.operators.machine_view(self.machines.get(machine_id), now_ms)
        a = t.operator_alarms.c
        with self.db.read() as conn:
            alarms = [dict(r) for r in conn.execute(
                select(a.alarm_id, a.rule, a.severity, a.state, a.detail, a.opened_ms, a.last_ms)
                .where(and_(a.machine_id == machine_id, a.state != "resolved")).order_by(a.opened_ms.desc()))
                .mappings()]
        for x in alarms:
            rule = RULES.get(x["rule"])
            x["title_zh"], x["title_en"] = (rule.zh, rule.en) if rule else (x["rule"], x["rule"])
        limits = {k: view[k] for k in p.LIMIT_BOUNDS}
        return {**fleet_row(view, len(alarms)), "timezone": view["timezone"], "hotline": view["hotline"],
                "created_ms": view["created_ms"], "open_session_id": view["open_session_id"],
                "heartbeat": view["heartbeat"], "limits": limits, "alarms": alarms}

    def series(self, machine_id: str, range_: str, now_ms: int) -> dict[str, Any]:
        """Temperature and TDS as sampled, and litres poured per hour of the machine's clock (sessions that ended
        in it), over the last 24 hours or 7 days."""
        m = self.machines.get(machine_id)
        starts = hour_starts(now_ms, RANGES_H[range_], m["timezone"])
        s, x = t.machine_samples.c, t.sessions.c
        with self.db.read() as conn:
            samples = conn.execute(select(s.at_ms, s.temp_c, s.tds_ppm).where(and_(
                s.machine_id == machine_id, s.at_ms >= starts[0], s.at_ms <= now_ms)).order_by(s.at_ms)).all()
            ended = conn.execute(select(x.ended_ms, x.volume_ml).where(and_(
                x.machine_id == machine_id, x.created_ms >= starts[0] - LONGEST_SESSION_MS, x.state == "ended",
                x.ended_ms >= starts[0], x.ended_ms <= now_ms))).all()
        ml = [0] * len(starts)
        for ended_ms, volume_ml in ended:
            ml[bisect.bisect_right(starts, ended_ms) - 1] += volume_ml or 0
        return {"machine_id": machine_id, "range": range_, "timezone": m["timezone"], "from_ms": starts[0],
                "to_ms": now_ms, "sample_every_ms": SAMPLE_EVERY_MS,
                "samples": {"at_ms": [r[0] for r in samples], "temp_c": [r[1] for r in samples],
                            "tds_ppm": [r[2] for r in samples]},
                "hours": {"at_ms": starts, "litres": [round(v / 1000, 2) for v in ml]}}

    def events(self, machine_id: str, offset: int, limit: int) -> dict[str, Any]:
        """The machine's event log, newest first."""
        self.machines.get(machine_id)
        e = t.machine_events.c
        with self.db.read() as conn:
            rows = [dict(r) for r in conn.execute(
                select(e.id, e.event_id, e.kind, e.payload, e.received_ms, e.occurred_ms, e.alarm)
                .where(e.machine_id == machine_id).order_by(e.received_ms.desc(), e.id.desc())
                .offset(offset).limit(limit + 1)).mappings()]
        return {"events": rows[:limit], "next_offset": offset + limit if len(rows) > limit else None}

    def commands(self, machine_id: str, limit: int) -> list[dict[str, Any]]:
        """The commands sent to the machine, newest first, with what became of them."""
        self.machines.get(machine_id)
        c = t.commands.c
        with self.db.read() as conn:
            return [dict(r) for r in conn.execute(
                select(c.command_id, c.kind, c.body, c.created_ms, c.expires_ms, c.delivered_ms, c.acked_ms, c.ack_ok,
                       c.ack_reason).where(c.machine_id == machine_id).order_by(c.created_ms.desc()).limit(limit))
                .mappings()]

    def sessions(self, machine_id: str, limit: int) -> list[dict[str, Any]]:
        """The machine's latest sessions."""
        self.machines.get(machine_id)
        x = t.sessions.c
        with self.db.read() as conn:
            return [dict(r) for r in conn.execute(
                select(x.session_id, x.user_id, x.state, x.created_ms, x.ended_ms, x.end_reason, x.volume_ml,
                       x.fee_fen, x.price_fen_per_l).where(x.machine_id == machine_id)
                .order_by(x.created_ms.desc()).limit(limit)).mappings()]

    def prune_samples(self, now_ms: int) -> int:
        with self.db.tx() as conn:
            return Samples.prune(conn, now_ms)
