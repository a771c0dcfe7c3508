"""Sessions (patent steps s1-s3, s6, s7): a scan of the machine's QR code (the presence check), a start that
holds the money and sends the grant, the machine's claim, and the settlement of its report into a bill, points
and a rental record; voiding unclaimed starts and reconciling lost ones.

Every method either completes in one transaction or changes nothing, and raises a :mod:`cloud.errors` domain
error (a stable code and words for people) for anything refused.
"""

from __future__ import annotations

import hashlib
import json
import logging
import uuid
from typing import Any

from pydantic import ValidationError
from sqlalchemy import Connection, and_, bindparam, func, insert, select, update
from sqlalchemy.exc import IntegrityError

import contract as p
from cloud import db as t
from cloud.alarms.service import on_machine_event
from cloud.db import Database, audit, first_row
from cloud.devices.service import COMMAND_TTL_MS, FREE_MACHINE, RECENTLY_SEEN_MS, Commands, Machines
from cloud.errors import Conflict, DomainError, Forbidden, Gone, InsufficientFunds, NotFound, Unavailable
from cloud.rewards.service import earn_points
from cloud.security import PresenceTokens, token_hash
from cloud.sessions.bills import bill_views, user_bill, user_bills
from cloud.wallet.balance import add_entry, balance

log = logging.getLogger("tapshare.cloud")
GRANT_DEADLINE_MS = p.GRANT_DEADLINE_MS   # the machine must claim a start by then (its server-corrected clock)
VOID_AFTER_MS = p.GRANT_DEADLINE_MS + p.GRANT_SKEW_MS   # an unclaimed start is voided this long after it was made
ACK_TIMEOUT_MS = VOID_AFTER_MS
LOST_GRACE_MS = 2_000              # a heartbeat must be sent this long after the claim to say "no such session"
MAX_SESSION_MS = p.LIMIT_BOUNDS["max_duration_ms"].max    # no grant lasts longer
STALE_AFTER_MS = 10 * 60_000       # a session unconfirmed this long past any possible end, machine reachable: lost
PRESENCE_TTL_MS = 5 * 60_000
ALARM_KINDS = p.ALARM_EVENT_KINDS | p.CLOUD_ALARM_KINDS

# The statements of a session's way (start, claim, settlement), built once: SQLAlchemy then finds each one's
# compiled form by a key it keeps, where a statement built per call costs as much to build as to run
_s, _m = t.sessions.c, t.machines.c
_USER_SQLITE = select(t.users).where(t.users.c.user_id == bindparam("user_id"))
_USER_LOCKED = _USER_SQLITE.with_for_update()
_MACHINE_SQLITE = select(t.machines).where(_m.machine_id == bindparam("machine_id"))
_MACHINE_LOCKED = _MACHINE_SQLITE.with_for_update()
_RUNNING = select(_s.session_id, _s.machine_id).where(
    and_(_s.user_id == bindparam("user_id"), _s.state.in_(("starting", "active"))))
_BY_PRESENCE = select(_s.session_id).where(_s.presence_hash == bindparam("presence_hash"))
_NEW_SESSION = insert(t.sessions)
_SESSION = select(t.sessions).where(_s.session_id == bindparam("session_id"))
_ENDED = update(t.sessions).where(and_(_s.session_id == bindparam("b_session_id"), _s.state == bindparam("b_state"))
                                  ).values(state="ended")
_REPORT = select(t.reports).where(and_(t.reports.c.machine_id == bindparam("machine_id"),
                                       t.reports.c.event_id == bindparam("event_id")))
_NEW_REPORT, _NEW_BILL, _NEW_RECORD = insert(t.reports), insert(t.bills), insert(t.rental_records)
_CLAIMED_BEFORE = select(t.sessions).where(and_(_s.machine_id == bindparam("machine_id"), _s.state == "active",
                                                 _s.acked_ms < bindparam("before_ms")))
_COMMAND = select(t.commands).where(t.commands.c.command_id == bindparam("command_id"))
_ACKED = update(t.commands).where(and_(t.commands.c.command_id == bindparam("b_command_id"),
                                       t.commands.c.acked_ms.is_(None))).values(
    delivered_ms=func.coalesce(t.commands.c.delivered_ms, bindparam("b_now_ms")))
_CLAIMED = update(t.sessions).where(and_(_s.session_id == bindparam("b_session_id"), _s.state == "starting")
                                    ).values(state="active")
_OCCUPY = update(t.machines).where(_m.machine_id == bindparam("b_machine_id"))   # an update's own names are b_*


class Sessions:
    def __init__(self, db: Database, machines: Machines, hub_connected, notify) -> None:
        self.db, self.machines = db, machines
        self._connected, self._notify = hub_connected, notify
        self.presence = PresenceTokens(machines.box.subkey("presence"))

    def scan(self, machine_id: str, code: str, now_ms: int) -> tuple[str, dict[str, Any]]:
        """The phone opened the QR link: check the time-based code, give a presence token (consumes nothing)."""
        secret = self.machines.secret(machine_id)
        if secret is None:
            raise NotFound("unknown_machine", f"machine {machine_id} does not exist")
        if p.qr_step(secret, machine_id, code, now_ms // 1000) is None:
            raise Gone("qr_expired", "this QR code has expired: scan the code on the machine's screen again")
        return self.presence.issue(machine_id, now_ms + PRESENCE_TTL_MS), self.machine_info(machine_id, now_ms)

    def machine_info(self, machine_id: str, now_ms: int) -> dict[str, Any]:
        m = self.machines.get(machine_id)
        hb = m["heartbeat"] or {}
        return {"machine_id": machine_id, "location": m["location"], "price_fen_per_l": m["price_fen_per_l"],
                "online": self._connected(m), "temp_c": hb.get("temp_c"), "tds_ppm": hb.get("tds_ppm"),
                "busy": m["open_session_id"] is not None, "state": hb.get("state", "unknown")}

    def start(self, user_id: str, presence_token: str, expected_price_fen_per_l: int, now_ms: int) -> dict[str, Any]:
        """s2 + s3: check the user and balance, hold the credit, queue the start command."""
        with self.db.tx() as conn:
            # the person's row first, locked on PostgreSQL: one balance cannot pay for two machines at once, and
            # a running session is then seen by every later start (the real reason comes first, even when the
            # visit has expired too)
            user = first_row(conn, _USER_SQLITE if self.db.is_sqlite else _USER_LOCKED, {"user_id": user_id})
            running = first_row(conn, _RUNNING, {"user_id": user_id})
            if running:
                raise Conflict("session_open", "you already have a session running",
                               session_id=running["session_id"], machine_id=running["machine_id"])
            machine_id = self.presence.check(presence_token, now_ms)
            if machine_id is None:
                raise Gone("scan_again", "your visit to this machine has expired: scan its QR code again")
            presence_hash = token_hash(presence_token)
            if first_row(conn, _BY_PRESENCE, {"presence_hash": presence_hash}):
                raise Conflict("scan_again", "this scan already started a session: scan the QR code again")
            if user is None or not user["registered"]:
                raise Forbidden("not_registered", "register with your real name before buying water")
            # one session per machine
            m = first_row(conn, _MACHINE_SQLITE if self.db.is_sqlite else _MACHINE_LOCKED, {"machine_id": machine_id})
            if m is None:
                raise NotFound("unknown_machine", f"machine {machine_id} does not exist")
            if m["price_fen_per_l"] != expected_price_fen_per_l:
                raise Conflict("price_changed", "the price has changed; please confirm the new price",
                               price_fen_per_l=m["price_fen_per_l"])
            if m["open_session_id"] is not None:
                raise Conflict("machine_busy", "this machine is serving someone else; please wait")
            hb_state = (m["heartbeat"] or {}).get("state")
            if hb_state in ("out_of_service", "maintenance", "updating"):   # the machine says so in its heartbeat
                words = {"out_of_service": "is out of service", "maintenance": "is being serviced",
                         "updating": "is installing a software update"}[hb_state]
                raise Conflict(f"machine_{hb_state}", f"this machine {words} right now; you were not charged",
                               lockouts=(m["heartbeat"] or {}).get("lockouts", []))
            # reachable: long-polling now, or a signed heartbeat just now (its poll is on the way; the command
            # waits for it, and an unconfirmed start is voided after ACK_TIMEOUT_MS with the hold released)
            if not self._connected(m) and (m["last_seen_ms"] or 0) < now_ms - RECENTLY_SEEN_MS:
                raise Unavailable("machine_offline", "this machine is offline right now; you were not charged")
            available, _ = balance(conn, user_id)
            if available < 0:
                raise InsufficientFunds("arrears", f"your account is in arrears ({-available} fen): please top up",
                               balance_fen=available)
            credit = min(available, m["max_credit_fen"])
            if credit < max(1, m["price_fen_per_l"] // 50):      # less than 20 ml of water
                raise InsufficientFunds("insufficient_balance", "your balance is too low: please top up",
                               balance_fen=available)
            session_id = "s-" + uuid.uuid4().hex[:20]
            deadline = now_ms + GRANT_DEADLINE_MS
            grant = p.GrantMsg(session_id=session_id, machine_id=machine_id, user_ref=user_id,
                               price_fen_per_l=m["price_fen_per_l"], credit_limit_fen=credit,
                               max_volume_ml=m["max_volume_ml"], max_duration_ms=m["max_duration_ms"],
                               max_idle_ms=m["max_idle_ms"], deadline_ms=deadline,
                               min_dispense_ml=m["min_dispense_ml"], balance_fen=available)
            command_id = Commands.queue(conn, machine_id, "start", now_ms, ttl_ms=GRANT_DEADLINE_MS, grant=grant,
                                        session_id=session_id)
            conn.execute(_NEW_SESSION, {
                "session_id": session_id, "machine_id": machine_id, "user_id": user_id, "state": "starting",
                "price_fen_per_l": m["price_fen_per_l"], "credit_limit_fen": credit, "command_id": command_id,
                "presence_hash": presence_hash, "created_ms": now_ms, "deadline_ms": deadline,
                "min_dispense_ml": m["min_dispense_ml"], "max_volume_ml": m["max_volume_ml"]})
            add_entry(conn, user_id, "hold", -credit, now_ms, session_id, "held while the machine pours")
            conn.execute(_OCCUPY, {"b_machine_id": machine_id, "open_session_id": session_id})
        self._notify(machine_id)
        return {"session_id": session_id, "state": "starting", "machine_id": machine_id,
                "price_fen_per_l": grant.price_fen_per_l, "credit_limit_fen": credit}

    def ack(self, machine_id: str, command_id: str, ack: p.AckMsg, now_ms: int) -> p.AckResult:
        """A machine's answer to a command. For a start, ``ok`` is the claim: the session becomes active only if
        it is still starting (a conditional update), and the answer tells the machine whether to pour."""
        with self.db.tx() as conn:
            cmd = first_row(conn, _COMMAND, {"command_id": command_id})
            if cmd is None or cmd["machine_id"] != machine_id:
                raise NotFound("unknown_command", "no such command for this machine")
            if cmd["acked_ms"] is None:
                conn.execute(_ACKED, {"b_command_id": command_id, "acked_ms": now_ms, "ack_ok": ack.ok,
                                      "ack_reason": (ack.detail or ack.reason)[:200], "b_now_ms": now_ms})
            if cmd["kind"] != "start":
                return p.AckResult()
            sid = cmd["body"]["session_id"]
            if ack.ok:
                if conn.execute(_CLAIMED, {"b_session_id": sid, "acked_ms": now_ms}).rowcount == 1:
                    return p.AckResult(session_state="active")    # the claim won: pour
            else:
                s = first_row(conn, select(t.sessions).where(t.sessions.c.session_id == sid))
                # refused before the claim, or after it the valve never opened: nothing was poured
                why = f"the machine refused: {ack.reason}" if ack.reason != p.START_FAILED else \
                    f"the machine could not start the session: {ack.detail}"
                if s is not None and self._void(conn, s, why[:200], now_ms, states=("starting", "active")) \
                        and ack.reason == p.START_FAILED:
                    conn.execute(insert(t.machine_events).values(
                        machine_id=machine_id, event_id=f"ack-{command_id}"[:40], kind=p.START_FAILED,
                        payload={"detail": p.EventKind.SESSION_START_FAILED.detail_of(session_id=sid,
                                                                                      detail=ack.detail)},
                        received_ms=now_ms, occurred_ms=now_ms, alarm=True))
            state = conn.execute(select(t.sessions.c.state).where(t.sessions.c.session_id == sid)).scalar()
        if ack.ok and state != "active":
            raise Conflict("start_void", f"this session is {state}: do not pour", session_state=state)
        return p.AckResult(session_state=state)

    def _void(self, conn: Connection, s: dict[str, Any], why: str, now_ms: int,
              states: tuple[str, ...] = ("starting",), new_state: str = "voided") -> bool:
        """End a session that poured nothing (or was lost), releasing its hold, if it is still in ``states``.
        A conditional update: of two racing callers (the void timer, a late claim, a report) one wins, and the
        hold is released only by the one that changed the row."""
        changed = conn.execute(update(t.sessions).where(and_(t.sessions.c.session_id == s["session_id"],
                                                             t.sessions.c.state.in_(states)))
                               .values(state=new_state, void_reason=why, ended_ms=now_ms)).rowcount
        if changed != 1:
            return False
        add_entry(conn, s["user_id"], "release", s["credit_limit_fen"], now_ms, s["session_id"],
                  "not charged" if new_state == "voided" else "released: the machine no longer has this session")
        conn.execute(update(t.machines).where(and_(t.machines.c.machine_id == s["machine_id"],
                                                   t.machines.c.open_session_id == s["session_id"]))
                     .values(open_session_id=None))
        conn.execute(update(t.commands).where(and_(t.commands.c.command_id == s["command_id"],
                                                   t.commands.c.acked_ms.is_(None))).values(expires_ms=now_ms))
        return True

    def void_unacknowledged(self, now_ms: int) -> list[str]:
        """Starts the machine never claimed by their deadline plus the allowed clock skew: void, release the hold.
        (The machine refuses a grant after its deadline, and a claim after the void is refused: the phone's
        "not charged" is true.)"""
        s = t.sessions.c
        voided = []
        with self.db.tx() as conn:
            for row in conn.execute(select(t.sessions).where(and_(
                    s.state == "starting", s.deadline_ms < now_ms - p.GRANT_SKEW_MS))).mappings().all():
                if self._void(conn, dict(row), "the machine did not confirm in time", now_ms):
                    voided.append(row["session_id"])
        return voided

    # ---------------------------------------------------------------- reconciliation
    def reconcile(self, machine_id: str, hb: p.HeartbeatMsg, sent_ms: int, now_ms: int) -> list[str]:
        """A heartbeat says which session the machine has open. An active session it does not have, when the
        heartbeat was sent well after the claim and nothing is waiting in its outbox (so no report is on its
        way), is ended as ``lost`` and its hold released; a late report still settles it by the measured water."""
        if hb.outbox_depth:
            return []
        with self.db.read() as conn:
            rows = conn.execute(_CLAIMED_BEFORE, {"machine_id": machine_id, "before_ms": sent_ms - LOST_GRACE_MS}
                                ).mappings().all()
        rows = [dict(r) for r in rows if r["session_id"] != hb.session_id]
        return self._lose(rows, "the machine reported no such session (boot "
                                f"{hb.boot_id}, state {hb.state})", now_ms) if rows else []

    def reconcile_stale(self, now_ms: int) -> list[str]:
        """Active sessions unconfirmed long past any possible end while their machine was reachable: lost."""
        s, m = t.sessions.c, t.machines.c
        cut = now_ms - MAX_SESSION_MS - STALE_AFTER_MS
        with self.db.read() as conn:
            rows = conn.execute(select(t.sessions).join(t.machines, m.machine_id == s.machine_id).where(and_(
                s.state == "active", s.acked_ms < cut, m.last_seen_ms > s.acked_ms + MAX_SESSION_MS))
            ).mappings().all()
        return self._lose([dict(r) for r in rows], "no report long after the longest possible session", now_ms)

    def _lose(self, rows: list[dict[str, Any]], why: str, now_ms: int) -> list[str]:
        lost = []
        with self.db.tx() as conn:
            for row in rows:
                if not self._void(conn, row, why, now_ms, states=("active",), new_state="lost"):
                    continue
                lost.append(row["session_id"])
                detail = p.EventKind.SESSION_LOST.detail_of(session_id=row["session_id"], user_id=row["user_id"],
                                                            why=why, released_fen=row["credit_limit_fen"])
                conn.execute(insert(t.machine_events).values(
                    machine_id=row["machine_id"], event_id=f"lost-{row['session_id']}"[:40],
                    kind=p.EventKind.SESSION_LOST, payload={"detail": detail},
                    received_ms=now_ms, occurred_ms=now_ms, alarm=True))
                on_machine_event(conn, row["machine_id"], p.EventKind.SESSION_LOST, detail, now_ms, now_ms)
                audit(conn, "system", "session_lost", row["session_id"],
                      {"machine_id": row["machine_id"], "why": why, "released_fen": row["credit_limit_fen"]}, now_ms)
        return lost

    def close_stuck(self, operator_id: str, session_id: str, reason: str, now_ms: int) -> dict[str, Any]:
        """An operator ends a session that is still starting or active because its machine never reported the
        end, the way the sweeps would: the hold is released and nothing is charged (an unclaimed start becomes
        ``voided``, a claimed one ``lost``). A cancel goes to the machine, so one that still pours stops and
        reports; a report that arrives later settles the session by the water measured, once, as for any lost
        session (:meth:`_settle`). Audit-logged with the reason."""
        with self.db.tx() as conn:
            q = select(t.sessions).where(t.sessions.c.session_id == session_id)
            if not self.db.is_sqlite:
                q = q.with_for_update()         # a claim or a report at the same moment waits for this
            s = first_row(conn, q)
            if s is None:
                raise NotFound("unknown_session", "no such session")
            if s["state"] not in ("starting", "active"):
                raise Conflict("session_over", f"this session is already {s['state']}: nothing to close",
                               session_state=s["state"])
            new_state = "voided" if s["state"] == "starting" else "lost"
            why = f"closed by operator {operator_id}: {reason}"[:200]
            if not self._void(conn, s, why, now_ms, states=(s["state"],), new_state=new_state):
                raise Conflict("session_changed", "this session changed meanwhile: look at it again")
            cancel_id = None
            if s["state"] == "active":
                cancel_id = Commands.queue(conn, s["machine_id"], "cancel", now_ms, session_id=session_id,
                                           reason="operator_close")
            audit(conn, operator_id, "close_session", session_id,
                  {"reason": reason, "was": s["state"], "now": new_state, "machine_id": s["machine_id"],
                   "user_id": s["user_id"], "released_fen": s["credit_limit_fen"], "cancel_command": cancel_id},
                  now_ms)
        if cancel_id:
            self._notify(s["machine_id"])
        return {"session_id": session_id, "state": new_state, "released_fen": s["credit_limit_fen"],
                "cancel_command_id": cancel_id}

    def progress(self, machine_id: str, msg: p.ProgressMsg) -> None:
        with self.db.tx() as conn:
            conn.execute(update(t.sessions).where(and_(t.sessions.c.session_id == msg.session_id,
                                                       t.sessions.c.machine_id == machine_id,
                                                       t.sessions.c.state.in_(("starting", "active"))))
                         .values(progress=msg.model_dump()))

    def stop(self, user_id: str, session_id: str, now_ms: int) -> None:
        with self.db.tx() as conn:
            s = first_row(conn, select(t.sessions).where(t.sessions.c.session_id == session_id))
            if s is None or s["user_id"] != user_id:
                raise NotFound("unknown_session", "no such session")
            if s["state"] not in ("starting", "active"):
                raise Conflict("session_over", f"this session is already {s['state']}")
            c = t.commands.c
            waiting = first_row(conn, select(c.command_id).where(and_(
                c.machine_id == s["machine_id"], c.kind == "cancel", c.acked_ms.is_(None), c.expires_ms > now_ms,
                c.created_ms > now_ms - COMMAND_TTL_MS)).where(c.body["session_id"].as_string() == session_id))
            if waiting is not None:
                return                    # one stop is on its way already: pressing again queues nothing more
            Commands.queue(conn, s["machine_id"], "cancel", now_ms, session_id=session_id, reason="phone_stop")
        self._notify(s["machine_id"])

    def running_session(self, user_id: str) -> dict[str, Any] | None:
        """The user's session that is starting or pouring now, with where (the phone's "pouring, view" bar)."""
        s = t.sessions.c
        with self.db.read() as conn:
            row = first_row(conn, select(s.session_id, s.machine_id, s.state, s.credit_limit_fen, t.machines.c.location)
                       .join(t.machines, t.machines.c.machine_id == s.machine_id)
                       .where(and_(s.user_id == user_id, s.state.in_(("starting", "active"))))
                       .order_by(s.created_ms.desc()).limit(1))
        return dict(row) if row else None

    def view(self, user_id: str, session_id: str) -> dict[str, Any]:
        with self.db.read() as conn:
            s = first_row(conn, select(t.sessions).where(t.sessions.c.session_id == session_id))
            if s is None or s["user_id"] != user_id:
                raise NotFound("unknown_session", "no such session")
            bill = first_row(conn, select(t.bills).where(t.bills.c.session_id == session_id))
            if bill is not None:
                bill = bill_views(conn, [bill])[0]
        out = {k: s[k] for k in ("session_id", "machine_id", "state", "price_fen_per_l", "credit_limit_fen",
                                 "progress", "void_reason", "end_reason", "fee_fen", "volume_ml")}
        out["charged"] = s["state"] == "ended"
        out["bill"] = bill
        return out

    def bills(self, user_id: str, limit: int) -> list[dict[str, Any]]:
        with self.db.read() as conn:
            return user_bills(conn, user_id, limit)

    def bill(self, user_id: str, session_id: str) -> dict[str, Any]:
        with self.db.read() as conn:
            return user_bill(conn, user_id, session_id)

    # ---------------------------------------------------------------- device events (s6, s7)

    def receive_events(self, machine_id: str, batch: p.EventBatch, now_ms: int) -> list[p.EventResult]:
        """One transaction for the whole batch (a backlog drains fast); each event is judged on its own."""
        results = []
        with self.db.tx() as conn:
            for ev in batch.events:
                results.append(self._receive(conn, machine_id, ev, now_ms))
        return results

    def _receive(self, conn: Connection, machine_id: str, ev: p.DeviceEvent, now_ms: int) -> p.EventResult:
        body = json.dumps({"kind": ev.kind, "payload": ev.payload}, sort_keys=True, separators=(",", ":"))
        digest = hashlib.sha256(body.encode()).hexdigest()
        for attempt in (1, 2, 3):
            prior = first_row(conn, _REPORT, {"machine_id": machine_id, "event_id": ev.event_id})
            if prior is not None:
                if prior["body_sha256"] != digest:
                    return p.EventResult(event_id=ev.event_id, status="rejected",
                                         detail="this event id was already used with a different body")
                return p.EventResult(event_id=ev.event_id, status="duplicate", detail=prior["detail"])
            malformed = _malformed(ev)
            report = {"machine_id": machine_id, "event_id": ev.event_id, "kind": ev.kind, "body_sha256": digest,
                      "payload": {} if malformed else ev.payload, "received_ms": now_ms,
                      "occurred_ms": now_ms - ev.age_ms}
            try:
                try:
                    # this event alone: a copy racing it, or a refusal, undoes only what it wrote
                    with conn.begin_nested():
                        status, detail = ("rejected", malformed) if malformed else \
                            self._apply(conn, machine_id, ev, now_ms)
                        conn.execute(_NEW_REPORT, {**report, "status": status, "detail": detail[:300]})
                except DomainError as e:
                    if isinstance(e, Unavailable):
                        raise                # not this report's fault: the whole batch is retried
                    status, detail = "rejected", e.message
                    with conn.begin_nested():     # refused: nothing of it is left but its report
                        conn.execute(_NEW_REPORT, {**report, "status": status, "detail": detail[:300]})
            except (IntegrityError, _Changed) as e:
                if attempt == 3:
                    raise Unavailable("retry", "this session kept changing while it was settled; send it again",
                                   retry_after_s=1) from e
                continue                     # a copy was settled, or the session voided, meanwhile: judge it again
            return p.EventResult(event_id=ev.event_id, status=status, detail=detail)
        raise AssertionError("unreachable")

    def _apply(self, conn: Connection, machine_id: str, ev: p.DeviceEvent, now_ms: int) -> tuple[str, str]:
        if ev.kind == "session_ended":
            return self._settle(conn, machine_id, ev, now_ms)
        conn.execute(insert(t.machine_events).values(machine_id=machine_id, event_id=ev.event_id, kind=ev.kind,
                                                     payload=ev.payload, received_ms=now_ms,
                                                     occurred_ms=now_ms - ev.age_ms, alarm=ev.kind in ALARM_KINDS))
        on_machine_event(conn, machine_id, ev.kind, ev.payload.get("detail", {}), now_ms - ev.age_ms, now_ms)
        return "accepted", ""

    def _settle(self, conn: Connection, machine_id: str, ev: p.DeviceEvent, now_ms: int) -> tuple[str, str]:
        """s6: the server recomputes the fee and settles it in one transaction; s7: the rental record."""
        r = p.SessionEndedPayload.model_validate(ev.payload)     # checked by _malformed already
        s = first_row(conn, _SESSION, {"session_id": r.session_id})
        if s is None or s["machine_id"] != machine_id:
            raise NotFound("unknown_session", f"session {r.session_id} was not started on this machine")
        if s["state"] == "ended":
            return "duplicate", "this session was already settled"
        expected_volume = p.volume_ml(r.billed_pulses, r.milli_pulses_per_litre)
        free = expected_volume < s["min_dispense_ml"]          # the same rule and value as the machine's receipt
        fee = 0 if free else p.fee_fen(r.billed_pulses, r.milli_pulses_per_litre, s["price_fen_per_l"])
        # a bill never exceeds what the grant allowed, whatever the report says (a faulty or forged meter)
        implausible = []
        lo, hi = p.CALIBRATION_RANGE_MPPL
        if not lo <= r.milli_pulses_per_litre <= hi:
            implausible.append(f"calibration {r.milli_pulses_per_litre} milli-pulses/L is outside {lo}-{hi}")
        if expected_volume > s["max_volume_ml"] * 101 // 100:
            implausible.append(f"{expected_volume} ml is more than the grant's {s['max_volume_ml']} ml")
            expected_volume = s["max_volume_ml"]
        if fee > s["credit_limit_fen"]:
            implausible.append(f"{fee} fen is more than the grant's credit of {s['credit_limit_fen']} fen")
            fee = s["credit_limit_fen"]
        if implausible:
            detail = p.EventKind.IMPLAUSIBLE_REPORT.detail_of(
                session_id=s["session_id"], problems=implausible, billed_pulses=r.billed_pulses,
                milli_pulses_per_litre=r.milli_pulses_per_litre, billed_fen=fee)
            conn.execute(insert(t.machine_events).values(
                machine_id=machine_id, event_id=ev.event_id, kind=p.EventKind.IMPLAUSIBLE_REPORT,
                payload={"detail": detail}, received_ms=now_ms, occurred_ms=now_ms - ev.age_ms, alarm=True))
            on_machine_event(conn, machine_id, p.EventKind.IMPLAUSIBLE_REPORT, detail, now_ms - ev.age_ms, now_ms)
            log.error("implausible report %s from %s: %s; billed %d fen", ev.event_id, machine_id,
                      "; ".join(implausible), fee)
        changed = conn.execute(_ENDED, {"b_session_id": s["session_id"], "b_state": s["state"], "ended_ms": now_ms,
                                        "end_reason": r.reason, "fee_fen": fee, "volume_ml": expected_volume}).rowcount
        if changed != 1:     # another request changed it meanwhile (a void, a lost, a copy of this report)
            raise _Changed()
        if s["state"] in ("starting", "active"):
            add_entry(conn, s["user_id"], "release", s["credit_limit_fen"], now_ms, s["session_id"])
        if fee:
            add_entry(conn, s["user_id"], "charge", -fee, now_ms, s["session_id"],
                      f"{expected_volume} ml at {s['price_fen_per_l']} fen/l")
        points = p.points_for_fee(fee)
        earn_points(conn, s["user_id"], points, s["session_id"], now_ms)
        conn.execute(FREE_MACHINE, {"b_machine_id": machine_id, "b_session_id": s["session_id"]})
        wq = dict(r.water_quality)
        wq.update(temp_start_c=r.temp_start_c, temp_end_c=r.temp_end_c)
        avg = expected_volume * 60_000 // r.duration_ms if r.duration_ms else 0
        started_at, closed_at = true_times(r, now_ms - ev.age_ms)
        conn.execute(_NEW_BILL, {
            "session_id": s["session_id"], "user_id": s["user_id"], "machine_id": machine_id,
            "started_at": started_at, "ended_at": closed_at, "duration_ms": r.duration_ms, "volume_ml": expected_volume,
            "avg_flow_ml_per_min": avg, "amount_fen": fee, "price_fen_per_l": s["price_fen_per_l"],
            "water_quality": wq, "points": points, "end_reason": r.reason, "created_ms": now_ms})
        conn.execute(_NEW_RECORD, {
            "session_id": s["session_id"], "machine_id": machine_id, "user_id": s["user_id"], "started_at": started_at,
            "ended_at": closed_at, "started_ms": s["created_ms"], "record": r.model_dump(mode="json")})
        note = "" if r.cost_fen == fee else f"device said {r.cost_fen} fen; billed {fee} fen by the server's tariff"
        if implausible:
            note = "implausible, capped by the grant: " + "; ".join(implausible)
        return "accepted", note


class _Changed(Exception):
    """The session row changed between reading and settling it (a concurrent request won)."""


def _malformed(ev: p.DeviceEvent) -> str | None:
    """Why one event cannot be accepted (each event is judged alone: the rest of its batch still settles)."""
    try:
        p.report_payload(ev.kind, ev.payload)
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(x) for x in first.get("loc", ()))
        return f"malformed {ev.kind} report: {where}: {first.get('msg', 'invalid')}"[:300]
    except ValueError as e:
        return f"malformed {ev.kind} report: {e}"[:300]
    return None


CLOCK_TRUST_MS = 2_000


def true_times(r: p.SessionEndedPayload, created_server_ms: int) -> tuple[str, str]:
    """The session's start and close in true time. The machine wrote them with its own wall clock, which may be
    days off; the report says how long ago it was written (``age_ms``), so the cloud knows when, in its own
    time, the machine's ``created_at`` was, and shifts the machine's times by the difference (ignored when
    within network noise)."""
    try:
        created_dev = _parse_iso_ms(r.created_at)
        started, closed = _parse_iso_ms(r.started_at), _parse_iso_ms(r.closed_at)
    except ValueError:
        return r.started_at, r.closed_at
    shift = created_server_ms - created_dev
    if abs(shift) <= CLOCK_TRUST_MS:
        return r.started_at, r.closed_at
    return _iso_ms(started + shift), _iso_ms(closed + shift)


def _parse_iso_ms(text: str) -> int:
    from datetime import datetime
    return int(datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp() * 1000)


def _iso_ms(ms: int) -> str:
    from datetime import UTC, datetime
    return datetime.fromtimestamp(ms / 1000, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


# ---------------------------------------------------------------- users (until the accounts issue)

