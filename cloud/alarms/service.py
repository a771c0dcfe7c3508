"""Operator alarms with a life: opened when a condition starts, kept up to date while it lasts (``last_ms``, the
detail), resolved by the system when it ends or by an operator, acknowledged on the way. One alarm at a time per
rule and subject: ``open_key`` (``<rule>:<subject>``) is unique while the alarm is not resolved and NULL after.

Where they come from:

* :meth:`Alarms.check`, in the cloud's background loop: machines not heard from for ``offline_after_ms``, and what
  each machine's latest heartbeat says (:func:`cloud.alarms.rules.heartbeat_conditions`);
* :func:`on_machine_event`, in the transaction that stores a machine's event: ghost-flow drips, lost sessions and
  implausible reports open one; a lockout's words and the refused reports are added to the open one;
* :func:`open_service_case`, through :func:`cloud.db.raise_alarm`: the service's own (payments, reconciliation,
  SMS), resolved by an operator.

Race safety (two clouds, two loops, a request and the loop): an alarm is opened with INSERT ... ON CONFLICT
(open_key) DO NOTHING, and if another transaction opened it first, that one is brought up to date under its row
lock instead; every change of state is a conditional update (``WHERE state IN (...)``) whose row count decides."""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Connection, and_, func, or_, select, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert

import contract as p
from cloud import db as t
from cloud.alarms.rules import (
    GHOST_MIN_ML,
    GHOST_QUIET_MS,
    HEARTBEAT_RULES,
    RULES,
    SEVERITIES,
    Thresholds,
    heartbeat_conditions,
    lockout_rule,
)
from cloud.db import Database, audit, first_row
from cloud.errors import Conflict, NotFound

log = logging.getLogger("tapshare.cloud")

ACTIVE = ("open", "acknowledged")
STATES = ("open", "acknowledged", "resolved")
MACHINE_STATE_RULES = ("offline", *HEARTBEAT_RULES)
TOUCH_MS = 60_000         # while a condition lasts, its last_ms moves on at most this often (not a write a heartbeat)
SUBJECT_FIELDS = ("refund_id", "order_id", "bill_date", "rollout_id")   # what tells one problem from another
DEAD_LETTERS_KEPT = 5
a = t.operator_alarms.c


@dataclass(frozen=True)
class AlarmSettings:
    offline_after_ms: int
    thresholds: Thresholds


# ---------------------------------------------------------------- opening, in the caller's transaction

def open_case(conn: Connection, rule: str, subject: str, machine_id: str | None, detail: dict[str, Any], at_ms: int,
              *, severity: str | None = None, count: bool = True) -> tuple[int, bool]:
    """Open the alarm of ``rule`` for ``subject``, or, while one is not resolved, bring that one up to date: the
    detail merged in, ``last_ms``, the higher severity and, when each call is an occurrence (``count``), how many
    there were. Returns the alarm's id and whether it was opened now."""
    rule = str(rule)
    key = f"{rule}:{subject}"[:160]
    severity = severity or RULES[rule].severity
    insert = pg_insert if conn.dialect.name == "postgresql" else sqlite_insert
    for _ in range(3):
        row = first_row(conn, _locked(conn, a.open_key == key))
        if row is not None:
            _refresh(conn, row, detail, at_ms, severity, count)
            return row["alarm_id"], False
        new = conn.execute(insert(t.operator_alarms).values(
            rule=rule, machine_id=machine_id, open_key=key, severity=severity, state="open",
            detail={**detail, "occurrences": 1} if count else detail, opened_ms=at_ms, last_ms=at_ms,
            notify_attempts=0).on_conflict_do_nothing(index_elements=["open_key"]).returning(a.alarm_id)).scalar()
        if new is not None:
            log.warning("alarm %d opened: %s %s", new, rule, subject)
            return new, True
        # another transaction opened it first (PostgreSQL waited for its commit): update that one
    raise RuntimeError(f"alarm {key} was opened and resolved three times meanwhile")


def _locked(conn: Connection, where) -> Any:
    """The alarm rows matching ``where``, locked until the transaction ends (SQLite's writers are serial anyway)."""
    q = select(t.operator_alarms).where(where)
    return q.with_for_update() if conn.dialect.name == "postgresql" else q


def _refresh(conn: Connection, row: dict[str, Any], detail: dict[str, Any], at_ms: int, severity: str,
             count: bool) -> None:
    new = {**row["detail"], **detail}
    if count:
        new["occurrences"] = int(row["detail"].get("occurrences", 1)) + 1
    values: dict[str, Any] = {}
    if new != row["detail"]:
        values["detail"] = new
    if at_ms > row["last_ms"]:
        values["last_ms"] = at_ms
    if SEVERITIES[severity] > SEVERITIES.get(row["severity"], 0):
        values["severity"] = severity
    if values:
        conn.execute(update(t.operator_alarms).where(a.alarm_id == row["alarm_id"]).values(**values))


def open_service_case(conn: Connection, source: str, kind: str, detail: dict[str, Any], now_ms: int) -> None:
    """The service's own problem (``source``: payments, reconciliation, sms, rollout) as an operator alarm: one per
    problem (the refund, order, bill day or rollout it is about, else the provider), its repeats counted while it
    is open."""
    subject = [kind, str(detail.get("provider", ""))]
    subject += [str(detail[f]) for f in SUBJECT_FIELDS if detail.get(f)][:1]
    open_case(conn, source, ":".join(subject), None, {"kind": kind, **detail}, now_ms)


def on_machine_event(conn: Connection, machine_id: str, kind: str, detail: dict[str, Any], occurred_ms: int,
                     received_ms: int) -> None:
    """A machine's event, in the transaction that stores it (a report is stored once: copies never get here)."""
    K = p.EventKind
    if kind == K.GHOST_FLOW:
        # a drip below the lockout's threshold shows only here; one older than the quiet spell is history
        if detail.get("volume_ml", 0) >= GHOST_MIN_ML and occurred_ms > received_ms - GHOST_QUIET_MS:
            open_case(conn, "ghost_flow", machine_id, machine_id, {"ghost_ml": detail["volume_ml"]}, received_ms,
                      severity="warning")
    elif kind in (K.SESSION_LOST, K.IMPLAUSIBLE_REPORT):
        open_case(conn, kind, machine_id, machine_id, dict(detail), received_ms)
    elif kind == K.LOCKOUT and (rule := lockout_rule(str(detail.get("reason", "")))):
        _annotate(conn, rule, machine_id, lambda d: {**d, "words": {**d.get("words", {}),
                                                                    detail["reason"]: detail.get("detail", "")}})
    elif kind == K.REPORT_DEAD_LETTERED:
        _annotate(conn, "dead_letter", machine_id,
                  lambda d: {**d, "reports": [*d.get("reports", []), dict(detail)][-DEAD_LETTERS_KEPT:]})


def _annotate(conn: Connection, rule: str, machine_id: str, change: Callable[[dict], dict]) -> None:
    """Add words to the open alarm, if there is one (the heartbeat, not the event, says when it starts and ends)."""
    row = first_row(conn, _locked(conn, a.open_key == f"{rule}:{machine_id}"))
    if row is not None:
        conn.execute(update(t.operator_alarms).where(a.alarm_id == row["alarm_id"])
                     .values(detail=change(row["detail"])))


class Alarms:
    def __init__(self, db: Database, settings: AlarmSettings, connected: Callable[[Mapping[str, Any]], bool],
                 notifier: Any = None) -> None:
        self.db, self.settings, self._connected = db, settings, connected
        self.notifier = notifier                     # cloud.alarms.notify.Notifier, run by its own background task

    # ---------------------------------------------------------------- the rules
    def check(self, now_ms: int) -> tuple[int, int]:
        """Judge the enrolled machines against the rules; returns how many alarms were opened and resolved. Reads
        first, and only a machine that needs a change gets a transaction, in which it is judged again on fresh
        rows with its alarms locked.

        Only the machines that may need a change are read: those whose latest heartbeat showed a condition
        (``alarm_hint``, judged when it arrived, or not known), those silent for ``offline_after_ms``, and those
        with an open alarm. Any other machine was heard recently and said nothing wrong, and has no alarm to
        resolve: judging it changes nothing, and reading a whole fleet every few seconds would hold a core."""
        m = t.machines.c
        with self.db.read() as conn:
            alarmed = select(a.machine_id).where(and_(
                a.state.in_(ACTIVE), a.machine_id.is_not(None), a.rule.in_(MACHINE_STATE_RULES)))
            machines = conn.execute(select(m.machine_id, m.last_seen_ms, m.poll_until_ms, m.heartbeat).where(and_(
                m.secret_enc.is_not(None), m.last_seen_ms.is_not(None), or_(
                    m.alarm_hint.is_(None), m.alarm_hint.is_(True),
                    m.last_seen_ms < now_ms - self.settings.offline_after_ms,
                    m.machine_id.in_(alarmed))))).mappings().all()
            active: dict[str, dict[str, dict]] = defaultdict(dict)
            for r in conn.execute(select(t.operator_alarms).where(and_(
                    a.state.in_(ACTIVE), a.machine_id.is_not(None), a.rule.in_(MACHINE_STATE_RULES)))).mappings():
                active[r["machine_id"]][r["rule"]] = dict(r)
        opened = resolved = 0
        for machine in machines:
            if self._judge(dict(machine), active.get(machine["machine_id"], {}), now_ms):
                o, r = self._apply(machine["machine_id"], now_ms)
                opened, resolved = opened + o, resolved + r
        return opened, resolved

    def _judge(self, m: dict[str, Any], alarms: dict[str, dict], now_ms: int) -> list[tuple]:
        """What to do for one machine: ``("hold", rule, detail, seen_ms)`` opens or updates, ``("clear", alarm)``
        resolves."""
        out: list[tuple] = []
        seen, off = m["last_seen_ms"], alarms.get("offline")
        if seen is None:
            return out                     # enrolled, never heard from: listed by GET /alarms, not an alarm yet
        if seen < now_ms - self.settings.offline_after_ms and not self._connected(m):
            if off is None or now_ms - off["last_ms"] >= TOUCH_MS:
                out.append(("hold", "offline", {"last_seen_ms": seen, "silent_s": (now_ms - seen) // 1000}, now_ms))
            return out                     # its last heartbeat is stale: what it said is neither proved nor disproved
        if off is not None:
            out.append(("clear", off))
        for rule, cond in heartbeat_conditions(m["heartbeat"] or {}, self.settings.thresholds).items():
            cur = alarms.get(rule)
            if cond is not None:
                if cur is None or seen - cur["last_ms"] >= TOUCH_MS or {**cur["detail"], **cond} != cur["detail"]:
                    out.append(("hold", rule, cond, seen))
            elif cur is not None and seen > cur["last_ms"] and now_ms - cur["last_ms"] >= RULES[rule].quiet_ms:
                out.append(("clear", cur))        # a heartbeat newer than the last sighting no longer shows it
        return out

    def _apply(self, machine_id: str, now_ms: int) -> tuple[int, int]:
        opened = resolved = 0
        m = t.machines.c
        with self.db.tx() as conn:
            alarms = {r["rule"]: r for r in conn.execute(_locked(conn, and_(
                a.machine_id == machine_id, a.state.in_(ACTIVE), a.rule.in_(MACHINE_STATE_RULES)))
                .order_by(a.alarm_id)).mappings()}
            machine = first_row(conn, select(m.machine_id, m.last_seen_ms, m.poll_until_ms, m.heartbeat)
                                .where(m.machine_id == machine_id))
            for act in self._judge(machine, {k: dict(v) for k, v in alarms.items()}, now_ms) if machine else []:
                if act[0] == "clear":
                    resolved += self._resolve(conn, act[1]["alarm_id"], "system", _cleared_note(act[1]["rule"]),
                                              now_ms, states=ACTIVE) is not None
                    continue
                _, rule, cond, seen = act
                if rule not in alarms:
                    cond = {**cond, **_words(conn, machine_id, rule, cond)}
                opened += open_case(conn, rule, machine_id, machine_id, cond, seen, count=False)[1]
        return opened, resolved

    # ---------------------------------------------------------------- the lifecycle
    def cases(self, state: str | None, machine_id: str | None, rule: str | None, limit: int,
              before_id: int | None) -> dict[str, Any]:
        """Newest first, with how many there are in each state (the same machine and rule filter)."""
        where = ([a.machine_id == machine_id] if machine_id else []) + ([a.rule == rule] if rule else [])
        q = _with_location(select(t.operator_alarms)).where(*where)
        if state:
            q = q.where(a.state.in_(ACTIVE) if state == "active" else a.state == state)
        if before_id:
            q = q.where(a.alarm_id < before_id)
        with self.db.read() as conn:
            rows = conn.execute(q.order_by(a.alarm_id.desc()).limit(limit)).mappings().all()
            counts = dict(conn.execute(select(a.state, func.count()).where(*where).group_by(a.state)).all())
        counts = {s: counts.get(s, 0) for s in STATES}
        counts["active"] = counts["open"] + counts["acknowledged"]
        return {"alarms": [self.view(r) for r in rows], "counts": counts,
                "next_before_id": rows[-1]["alarm_id"] if len(rows) == limit else None}

    def case(self, alarm_id: int) -> dict[str, Any]:
        with self.db.read() as conn:
            row = first_row(conn, _with_location(select(t.operator_alarms)).where(a.alarm_id == alarm_id))
        if row is None:
            raise NotFound("unknown_alarm", f"no alarm {alarm_id}")
        return self.view(row)

    def acknowledge(self, operator_id: str, alarm_id: int, note: str, now_ms: int) -> dict[str, Any]:
        """Someone is on it: open -> acknowledged (audited). Once only."""
        with self.db.tx() as conn:
            done = conn.execute(update(t.operator_alarms).where(and_(a.alarm_id == alarm_id, a.state == "open"))
                                .values(state="acknowledged", acked_ms=now_ms, acked_by=operator_id, ack_note=note))
            if done.rowcount != 1:
                self._refuse(conn, alarm_id, "acknowledge")
            audit(conn, operator_id, "acknowledge_alarm", f"alarm:{alarm_id}", {"note": note}, now_ms)
        return self.case(alarm_id)

    def resolve(self, operator_id: str, alarm_id: int, note: str, now_ms: int) -> dict[str, Any]:
        """Dealt with: open or acknowledged -> resolved (audited). A condition that still holds opens a new alarm at
        the next check."""
        with self.db.tx() as conn:
            if self._resolve(conn, alarm_id, operator_id, note, now_ms, states=ACTIVE) is None:
                self._refuse(conn, alarm_id, "resolve")
            audit(conn, operator_id, "resolve_alarm", f"alarm:{alarm_id}", {"note": note}, now_ms)
        return self.case(alarm_id)

    @staticmethod
    def _resolve(conn: Connection, alarm_id: int, by: str, note: str, now_ms: int,
                 states: tuple[str, ...]) -> int | None:
        done = conn.execute(update(t.operator_alarms).where(and_(a.alarm_id == alarm_id, a.state.in_(states)))
                            .values(state="resolved", open_key=None, resolved_ms=now_ms, resolved_by=by,
                                    resolve_note=note))
        if done.rowcount != 1:
            return None
        log.info("alarm %d resolved by %s", alarm_id, by)
        return alarm_id

    @staticmethod
    def _refuse(conn: Connection, alarm_id: int, what: str) -> None:
        row = first_row(conn, select(a.state, a.acked_by, a.resolved_by).where(a.alarm_id == alarm_id))
        if row is None:
            raise NotFound("unknown_alarm", f"no alarm {alarm_id}")
        by = row["resolved_by"] if row["state"] == "resolved" else row["acked_by"]
        raise Conflict(f"already_{row['state']}", f"alarm {alarm_id} is already {row['state']} (by {by}): it cannot "
                       f"be {'acknowledged' if what == 'acknowledge' else 'resolved'} again", state=row["state"])

    def view(self, row: Any) -> dict[str, Any]:
        d = dict(row)
        rule = RULES.get(d["rule"])
        d.pop("open_key", None)
        d["title_zh"], d["title_en"] = (rule.zh, rule.en) if rule else (d["rule"], d["rule"])
        d["system_resolves"] = d["rule"] in MACHINE_STATE_RULES
        d["notifications"] = self.notifier.status(d) if self.notifier is not None else {}
        for col in ("emailed_ms", "webhooked_ms"):
            d[col] = d[col] if (d[col] or 0) > 0 else None     # negative: a claim being sent (notify.py)
        return d


def _with_location(q):
    return q.add_columns(t.machines.c.location).outerjoin(t.machines, t.machines.c.machine_id == a.machine_id)


def _cleared_note(rule: str) -> str:
    return "系统：已重新联系上 / system: heard from again" if rule == "offline" else \
        "系统：条件已消除 / system: the condition cleared"


def _words(conn: Connection, machine_id: str, rule: str, cond: dict[str, Any]) -> dict[str, Any]:
    """What the machine said when it locked itself out, or which reports the cloud refused: the newest events of
    the machine that explain a new alarm (they may also arrive after it opened: :func:`on_machine_event`)."""
    e = t.machine_events.c
    if rule == "dead_letter":
        rows = conn.execute(select(e.payload).where(and_(e.machine_id == machine_id,
                                                          e.kind == p.EventKind.REPORT_DEAD_LETTERED))
                            .order_by(e.id.desc()).limit(DEAD_LETTERS_KEPT)).scalars().all()
        return {"reports": [r.get("detail", {}) for r in reversed(rows)]} if rows else {}
    reasons = set(cond.get("lockouts", []))
    if rule in ("temperature", "tds") and cond.get("locked_out"):
        reasons.add(rule)
    if not reasons:
        return {}
    rows = conn.execute(select(e.payload).where(and_(e.machine_id == machine_id, e.kind == p.EventKind.LOCKOUT))
                        .order_by(e.id.desc()).limit(50)).scalars().all()
    words: dict[str, str] = {}
    for payload in rows:
        d = payload.get("detail", {})
        if d.get("reason") in reasons:
            words.setdefault(d["reason"], d.get("detail", ""))
    return {"words": words} if words else {}
