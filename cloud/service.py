"""The cloud's rules (patent steps s2, s3, s6, s7) as transactions on :class:`cloud.db.Database`.

Every function either completes in one transaction or changes nothing, and raises :class:`ApiError`
(an HTTP status, a stable machine-readable code and a message for people) for anything refused.
"""

from __future__ import annotations

import hashlib
import json
import logging
import secrets
import threading
import uuid
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError
from sqlalchemy import Connection, and_, func, insert, select, update
from sqlalchemy.exc import IntegrityError

import contract as p
from cloud import db as t
from cloud.db import Database
from cloud.security import PresenceTokens, SecretBox, new_token, token_hash

GRANT_DEADLINE_MS = p.GRANT_DEADLINE_MS   # the machine must claim a start by then (its server-corrected clock)
VOID_AFTER_MS = p.GRANT_DEADLINE_MS + p.GRANT_SKEW_MS   # an unclaimed start is voided this long after it was made
log = logging.getLogger("tapshare.cloud")
ACK_TIMEOUT_MS = VOID_AFTER_MS
COMMAND_TTL_MS = 60_000
REDELIVER_MS = 3_000               # an unacknowledged command is handed out again only after this long
LOST_GRACE_MS = 2_000              # a heartbeat must be sent this long after the claim to say "no such session"
MAX_SESSION_MS = 600_000           # no grant lasts longer (GrantMsg's bound)
STALE_AFTER_MS = 10 * 60_000       # a session unconfirmed this long past any possible end, machine reachable: lost
PRESENCE_TTL_MS = 5 * 60_000
ENROLMENT_TTL_MS = 7 * 86_400_000
NONCE_KEEP_MS = 2 * p.MAX_CLOCK_SKEW_MS + 60_000
POINTS_PER_YUAN = p.POINTS_PER_YUAN
ALARM_KINDS = p.ALARM_EVENT_KINDS | p.CLOUD_ALARM_KINDS
SILENT_AFTER_MS = 120_000
RECENTLY_SEEN_MS = 10_000


class ApiError(Exception):
    def __init__(self, status: int, code: str, message: str, **extra: Any) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.extra = status, code, message, extra


@dataclass
class MachineAuth:
    machine_id: str
    secret: bytes
    timestamp_ms: int = 0          # when the machine signed the request (its server-corrected clock)
    nonce_seq: int = 0             # the request may be answered once the nonce journal is durable up to this


def _one(conn: Connection, stmt) -> dict[str, Any] | None:
    row = conn.execute(stmt).mappings().first()
    return dict(row) if row else None


# ---------------------------------------------------------------- machines and devices

class Machines:
    def __init__(self, db: Database, box: SecretBox, now_ms: int = 0) -> None:
        self.db, self.box = db, box
        self._secrets: dict[str, bytes] = {}
        # Replay protection: nonces seen within the clock-skew window, checked in memory and written to
        # the database in group commits (flush_nonces), reloaded at start so a restart forgets nothing.
        self._nonces: dict[tuple[str, str], int] = {}
        self._unflushed: list[dict[str, Any]] = []
        self._nonce_lock = threading.Lock()
        self._nonce_seq = 0            # nonces accepted so far
        self.nonces_durable_seq = 0    # ... of which this many are committed (answers wait for theirs)
        with db.read() as conn:
            # every enrolled machine's secret, decrypted once: a request never waits for the database
            for mid, sealed in conn.execute(select(t.machines.c.machine_id, t.machines.c.secret_enc)
                                            .where(t.machines.c.secret_enc.is_not(None))):
                self._secrets[mid] = box.open(sealed, f"machine:{mid}")
            for m, n, seen in conn.execute(select(t.nonces.c.machine_id, t.nonces.c.nonce, t.nonces.c.seen_ms)
                                           .where(t.nonces.c.seen_ms >= now_ms - NONCE_KEEP_MS)):
                self._nonces[(m, n)] = seen

    def provision(self, operator_id: str, machine_id: str, location: str, price_fen_per_l: int, *,
                  max_volume_ml: int, max_duration_ms: int, max_idle_ms: int, max_credit_fen: int,
                  now_ms: int, min_dispense_ml: int = 10) -> str:
        """Create a machine and a single-use enrolment token (returned once)."""
        if not p.MACHINE_ID_RE.fullmatch(machine_id):
            raise ApiError(422, "bad_machine_id", "machine id: 1-64 letters, digits, '-' or '_'")
        token = secrets.token_hex(24)      # hex: never starts with '-', which a command line would take for an option
        with self.db.tx() as conn:
            if _one(conn, select(t.machines.c.machine_id).where(t.machines.c.machine_id == machine_id)):
                raise ApiError(409, "machine_exists", f"machine {machine_id} already exists")
            conn.execute(insert(t.machines).values(
                machine_id=machine_id, location=location, price_fen_per_l=price_fen_per_l,
                max_volume_ml=max_volume_ml, max_duration_ms=max_duration_ms, max_idle_ms=max_idle_ms,
                max_credit_fen=max_credit_fen, min_dispense_ml=min_dispense_ml, created_ms=now_ms))
            conn.execute(insert(t.enrolment_tokens).values(
                token_hash=token_hash(token), machine_id=machine_id, created_by=operator_id,
                expires_ms=now_ms + ENROLMENT_TTL_MS))
            audit(conn, operator_id, "provision_machine", machine_id,
                  {"location": location, "price_fen_per_l": price_fen_per_l}, now_ms)
        return token

    def enroll(self, machine_id: str, token: str, now_ms: int) -> bytes:
        """Exchange the enrolment token for the device secret (32 random bytes, shown once)."""
        secret = secrets.token_bytes(32)
        with self.db.tx() as conn:
            row = _one(conn, select(t.enrolment_tokens).where(t.enrolment_tokens.c.token_hash == token_hash(token)))
            if row is None or row["machine_id"] != machine_id:
                raise ApiError(401, "bad_enrolment_token", "unknown enrolment token for this machine")
            if row["used_ms"] is not None:
                raise ApiError(401, "enrolment_token_used", "this enrolment token was already used")
            if row["expires_ms"] < now_ms:
                raise ApiError(401, "enrolment_token_expired", "this enrolment token has expired")
            e = t.enrolment_tokens.c
            used = update(t.enrolment_tokens).where(and_(e.token_hash == row["token_hash"], e.used_ms.is_(None)))
            if conn.execute(used.values(used_ms=now_ms)).rowcount != 1:      # single use, even for two at once
                raise ApiError(401, "enrolment_token_used", "this enrolment token was already used")
            conn.execute(update(t.machines).where(t.machines.c.machine_id == machine_id)
                         .values(secret_enc=self.box.seal(secret, f"machine:{machine_id}")))
        self._secrets.pop(machine_id, None)
        return secret

    def revoke_key(self, operator_id: str, machine_id: str, now_ms: int) -> None:
        """Forget a machine's secret (a stolen or retired machine): every request it signs is refused at once."""
        with self.db.tx() as conn:
            changed = conn.execute(update(t.machines).where(t.machines.c.machine_id == machine_id)
                                   .values(secret_enc=None)).rowcount
            if not changed:
                raise ApiError(404, "unknown_machine", f"machine {machine_id} does not exist")
            conn.execute(update(t.enrolment_tokens).where(and_(t.enrolment_tokens.c.machine_id == machine_id,
                                                               t.enrolment_tokens.c.used_ms.is_(None)))
                         .values(used_ms=now_ms))
            audit(conn, operator_id, "revoke_machine_key", machine_id, {}, now_ms)
        self._secrets.pop(machine_id, None)

    def new_enrolment_token(self, operator_id: str, machine_id: str, now_ms: int) -> str:
        """A fresh single-use enrolment token for an existing machine (re-enrolment after a revoke or a new SD card)."""
        token = secrets.token_hex(24)
        with self.db.tx() as conn:
            if _one(conn, select(t.machines.c.machine_id).where(t.machines.c.machine_id == machine_id)) is None:
                raise ApiError(404, "unknown_machine", f"machine {machine_id} does not exist")
            conn.execute(insert(t.enrolment_tokens).values(
                token_hash=token_hash(token), machine_id=machine_id, created_by=operator_id,
                expires_ms=now_ms + ENROLMENT_TTL_MS))
            audit(conn, operator_id, "new_enrolment_token", machine_id, {}, now_ms)
        return token

    def secret(self, machine_id: str) -> bytes | None:
        cached = self._secrets.get(machine_id)
        if cached is not None:
            return cached
        with self.db.read() as conn:
            row = _one(conn, select(t.machines.c.secret_enc).where(t.machines.c.machine_id == machine_id))
        if row is None or row["secret_enc"] is None:
            return None
        secret = self.box.open(row["secret_enc"], f"machine:{machine_id}")
        self._secrets[machine_id] = secret
        return secret

    def cached_secret(self, machine_id: str) -> bytes | None:
        return self._secrets.get(machine_id)

    def authenticate(self, method: str, path: str, headers: dict[str, str], body: bytes, now_ms: int) -> MachineAuth:
        """Check a signed dispenser request; raises 401 with the precise reason."""
        machine_id = headers.get(p.HEADER_MACHINE.lower(), "")
        ts_text = headers.get(p.HEADER_TIMESTAMP.lower(), "")
        nonce = headers.get(p.HEADER_NONCE.lower(), "")
        signature = headers.get(p.HEADER_SIGNATURE.lower(), "")
        if not (machine_id and ts_text and nonce and signature):
            raise ApiError(401, "unsigned", "missing signature headers (X-Tapshare-Machine, -Timestamp, -Nonce, "
                                            "-Signature)")
        if not p.MACHINE_ID_RE.fullmatch(machine_id) or not p.NONCE_RE.fullmatch(nonce) or not ts_text.isdigit() \
                or len(ts_text) > 15:
            raise ApiError(401, "malformed_signature_headers", "malformed signature headers")
        version = headers.get(p.HEADER_PROTOCOL.lower(), "")
        if not (version.isdigit() and len(version) < 6 and int(version) in p.SUPPORTED_PROTOCOL_VERSIONS):
            supported = sorted(p.SUPPORTED_PROTOCOL_VERSIONS)
            raise ApiError(400, "unsupported_protocol", f"this cloud speaks protocol version {supported}; the machine "
                           f"sent {version or 'none'} ({p.HEADER_PROTOCOL}): update the machine's software",
                           supported=supported)
        secret = self.secret(machine_id)
        if secret is None:
            raise ApiError(401, "unknown_machine", f"machine {machine_id} is unknown or not enrolled")
        ts = int(ts_text)
        if not p.verify_signature(secret, method, path, ts, nonce, body, signature):
            raise ApiError(401, "bad_signature", "the request signature does not match")
        problem = p.clock_problem(ts, now_ms)
        if problem:
            raise ApiError(401, "clock_skew", problem, server_time_ms=now_ms)
        with self._nonce_lock:
            if (machine_id, nonce) in self._nonces:
                raise ApiError(401, "replayed_nonce", "this nonce was already used (a replayed request)")
            self._nonces[(machine_id, nonce)] = now_ms
            self._unflushed.append({"machine_id": machine_id, "nonce": nonce, "seen_ms": now_ms})
            self._nonce_seq += 1
            seq = self._nonce_seq
        return MachineAuth(machine_id, secret, ts, seq)

    def flush_nonces(self) -> int:
        """Write the nonces seen since the last flush, in one transaction (a group commit: every request waits
        for the flush that holds its nonce before it is answered, so a crash forgets no nonce it answered)."""
        with self._nonce_lock:
            rows, self._unflushed = self._unflushed, []
            seq = self._nonce_seq
        if rows:
            try:
                with self.db.tx() as conn:
                    conn.execute(insert(t.nonces), rows)
            except Exception:
                with self._nonce_lock:
                    self._unflushed[:0] = rows          # written with the next flush; nobody was answered
                raise
        self.nonces_durable_seq = max(self.nonces_durable_seq, seq)
        return len(rows)

    def prune_nonces(self, now_ms: int) -> int:
        cut = now_ms - NONCE_KEEP_MS
        with self._nonce_lock:
            for key in [k for k, seen in self._nonces.items() if seen < cut]:
                del self._nonces[key]
        with self.db.tx() as conn:
            return conn.execute(t.nonces.delete().where(t.nonces.c.seen_ms < cut)).rowcount

    def get(self, machine_id: str) -> dict[str, Any]:
        with self.db.read() as conn:
            row = _one(conn, select(t.machines).where(t.machines.c.machine_id == machine_id))
        if row is None:
            raise ApiError(404, "unknown_machine", f"machine {machine_id} does not exist")
        return row

    def heartbeat(self, machine_id: str, hb: p.HeartbeatMsg, now_ms: int) -> dict[str, Any]:
        """Record the telemetry; returns the machine's settings row (price, time zone, hotline)."""
        mc = t.machines.c
        with self.db.tx() as conn:
            values: dict[str, Any] = {"last_seen_ms": now_ms, "heartbeat": hb.model_dump()}
            m = _one(conn, select(mc.open_session_id, mc.price_fen_per_l, mc.timezone, mc.hotline)
                     .where(mc.machine_id == machine_id))
            if m and m["open_session_id"] and hb.session_id is None:
                s = _one(conn, select(t.sessions.c.state).where(t.sessions.c.session_id == m["open_session_id"]))
                if s is None or s["state"] != "starting":   # the machine is free (a report may be on its way)
                    values["open_session_id"] = None
            conn.execute(update(t.machines).where(t.machines.c.machine_id == machine_id).values(**values))
        return m or {"price_fen_per_l": 0, "timezone": "Asia/Shanghai", "hotline": ""}


# ---------------------------------------------------------------- commands

class Commands:
    """Commands for machines. ``maybe_pending`` is an in-memory hint of which machines may have commands
    waiting, so an idle long-poll never touches the database; it is filled from the database at start
    and by :meth:`mark`, and cleared when a read finds nothing."""

    def __init__(self, db: Database, now_ms: int = 0) -> None:
        self.db = db
        with db.read() as conn:
            c = t.commands.c
            self.maybe_pending: set[str] = {r[0] for r in conn.execute(
                select(c.machine_id).where(and_(c.acked_ms.is_(None), c.expires_ms > now_ms)).distinct())}

    def mark(self, machine_id: str) -> None:
        self.maybe_pending.add(machine_id)

    @staticmethod
    def queue(conn: Connection, machine_id: str, msg_kind: str, now_ms: int, ttl_ms: int = COMMAND_TTL_MS,
              **fields: Any) -> str:
        command_id = "c-" + uuid.uuid4().hex[:20]
        body = p.CommandMsg(command_id=command_id, kind=msg_kind, **fields).model_dump(mode="json")
        conn.execute(insert(t.commands).values(command_id=command_id, machine_id=machine_id, kind=msg_kind,
                                               body=body, created_ms=now_ms, expires_ms=now_ms + ttl_ms))
        return command_id

    def pending(self, machine_id: str, now_ms: int) -> tuple[list[p.CommandMsg], int | None]:
        """Unacknowledged commands to hand out now, and when (server ms) one held back may be handed out again.

        A command is handed out once; only if it is still unacknowledged ``REDELIVER_MS`` later (its answer was
        lost) is it handed out again, so a machine that polls again at once never gets the same start twice.
        """
        c = t.commands.c
        with self.db.read() as conn:
            rows = conn.execute(select(c.command_id, c.body, c.delivered_ms).where(and_(
                c.machine_id == machine_id, c.acked_ms.is_(None), c.expires_ms > now_ms)).order_by(c.created_ms)
            ).all()
        if not rows:
            self.maybe_pending.discard(machine_id)
            return [], None
        due = [r for r in rows if r[2] is None or r[2] <= now_ms - REDELIVER_MS]
        held = [r[2] + REDELIVER_MS for r in rows if r not in due]
        if due:
            with self.db.tx() as conn:
                conn.execute(update(t.commands).where(t.commands.c.command_id.in_([r[0] for r in due]))
                             .values(delivered_ms=now_ms))
        return [p.CommandMsg(**r[1]) for r in due], min(held) if held else None


# ---------------------------------------------------------------- balances

def balance(conn: Connection, user_id: str) -> tuple[int, int]:
    """(available, held) in fen. Available is the sum of every entry; held is the sum of open holds."""
    e = t.balance_entries.c
    available = conn.execute(select(func.coalesce(func.sum(e.amount_fen), 0)).where(e.user_id == user_id)).scalar()
    held = conn.execute(select(func.coalesce(func.sum(e.amount_fen), 0)).where(
        and_(e.user_id == user_id, e.kind.in_(("hold", "release"))))).scalar()
    return int(available), -int(held)


def add_entry(conn: Connection, user_id: str, kind: str, amount_fen: int, now_ms: int, session_id: str | None = None,
              note: str = "") -> None:
    conn.execute(insert(t.balance_entries).values(user_id=user_id, kind=kind, amount_fen=amount_fen,
                                                  session_id=session_id, note=note, created_ms=now_ms))


points_for_fee = p.points_for_fee


def earn_points(conn: Connection, user_id: str, points: int, session_id: str, now_ms: int) -> None:
    if points <= 0:
        return
    conn.execute(update(t.users).where(t.users.c.user_id == user_id).values(points=t.users.c.points + points))
    conn.execute(insert(t.points_entries).values(user_id=user_id, delta=points, kind="earn", ref=session_id,
                                                 note="water bought", created_ms=now_ms))


def audit(conn: Connection, operator_id: str, action: str, target: str, detail: dict, now_ms: int) -> None:
    conn.execute(insert(t.audit_log).values(operator_id=operator_id, action=action, target=target, detail=detail,
                                            at_ms=now_ms))


# ---------------------------------------------------------------- sessions (s1-s3, s6, s7)

class Sessions:
    def __init__(self, db: Database, machines: Machines, hub_connected, notify) -> None:
        self.db, self.machines = db, machines
        self._connected, self._notify = hub_connected, notify
        self.presence = PresenceTokens(machines.box.subkey("presence"))

    def scan(self, machine_id: str, code: str, now_ms: int) -> tuple[str, dict[str, Any]]:
        """The phone opened the QR link: check the time-based code, give a presence token (consumes nothing)."""
        secret = self.machines.secret(machine_id)
        if secret is None:
            raise ApiError(404, "unknown_machine", f"machine {machine_id} does not exist")
        if p.qr_step(secret, machine_id, code, now_ms // 1000) is None:
            raise ApiError(410, "qr_expired", "this QR code has expired: scan the code on the machine's screen again")
        return self.presence.issue(machine_id, now_ms + PRESENCE_TTL_MS), self.machine_info(machine_id, now_ms)

    def machine_info(self, machine_id: str, now_ms: int) -> dict[str, Any]:
        m = self.machines.get(machine_id)
        hb = m["heartbeat"] or {}
        return {"machine_id": machine_id, "location": m["location"], "price_fen_per_l": m["price_fen_per_l"],
                "online": self._connected(machine_id), "temp_c": hb.get("temp_c"), "tds_ppm": hb.get("tds_ppm"),
                "busy": m["open_session_id"] is not None, "state": hb.get("state", "unknown")}

    def start(self, user_id: str, presence_token: str, expected_price_fen_per_l: int, now_ms: int) -> dict[str, Any]:
        """s2 + s3: check the user and balance, hold the credit, queue the start command."""
        running = self.running_session(user_id)
        if running is not None:            # the real reason comes first, even when the visit has expired too
            raise ApiError(409, "session_open", "you already have a session running", session_id=running["session_id"],
                           machine_id=running["machine_id"])
        machine_id = self.presence.check(presence_token, now_ms)
        if machine_id is None:
            raise ApiError(410, "scan_again", "your visit to this machine has expired: scan its QR code again")
        presence_hash = token_hash(presence_token)
        with self.db.tx() as conn:
            if _one(conn, select(t.sessions.c.session_id).where(t.sessions.c.presence_hash == presence_hash)):
                raise ApiError(409, "scan_again", "this scan already started a session: scan the QR code again")
            users_q = select(t.users).where(t.users.c.user_id == user_id)
            if not self.db.is_sqlite:
                users_q = users_q.with_for_update()      # one balance cannot pay for two machines at once
            user = _one(conn, users_q)
            if user is None or not user["registered"]:
                raise ApiError(403, "not_registered", "register with your real name before buying water")
            machine_q = select(t.machines).where(t.machines.c.machine_id == machine_id)
            if not self.db.is_sqlite:
                machine_q = machine_q.with_for_update()    # one session per machine
            m = _one(conn, machine_q)
            if m is None:
                raise ApiError(404, "unknown_machine", f"machine {machine_id} does not exist")
            if m["price_fen_per_l"] != expected_price_fen_per_l:
                raise ApiError(409, "price_changed", "the price has changed; please confirm the new price",
                               price_fen_per_l=m["price_fen_per_l"])
            s = t.sessions.c
            running = _one(conn, select(s.session_id, s.machine_id).where(
                and_(s.user_id == user_id, s.state.in_(("starting", "active")))))
            if running:
                raise ApiError(409, "session_open", "you already have a session running",
                               session_id=running["session_id"], machine_id=running["machine_id"])
            if m["open_session_id"] is not None:
                raise ApiError(409, "machine_busy", "this machine is serving someone else; please wait")
            hb_state = (m["heartbeat"] or {}).get("state")
            if hb_state in ("out_of_service", "maintenance"):       # the machine says so in its latest heartbeat
                words = "is out of service" if hb_state == "out_of_service" else "is being serviced"
                raise ApiError(409, f"machine_{hb_state}", f"this machine {words} right now; you were not charged",
                               lockouts=(m["heartbeat"] or {}).get("lockouts", []))
            # reachable: long-polling now, or a signed heartbeat just now (its poll is on the way; the command
            # waits for it, and an unconfirmed start is voided after ACK_TIMEOUT_MS with the hold released)
            if not self._connected(machine_id) and (m["last_seen_ms"] or 0) < now_ms - RECENTLY_SEEN_MS:
                raise ApiError(503, "machine_offline", "this machine is offline right now; you were not charged")
            available, _ = balance(conn, user_id)
            if available < 0:
                raise ApiError(402, "arrears", f"your account is in arrears ({-available} fen): please top up",
                               balance_fen=available)
            credit = min(available, m["max_credit_fen"])
            if credit < max(1, m["price_fen_per_l"] // 50):      # less than 20 ml of water
                raise ApiError(402, "insufficient_balance", "your balance is too low: please top up",
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
            conn.execute(insert(t.sessions).values(
                session_id=session_id, machine_id=machine_id, user_id=user_id, state="starting",
                price_fen_per_l=m["price_fen_per_l"], credit_limit_fen=credit, command_id=command_id,
                presence_hash=presence_hash, created_ms=now_ms, deadline_ms=deadline,
                min_dispense_ml=m["min_dispense_ml"], max_volume_ml=m["max_volume_ml"]))
            add_entry(conn, user_id, "hold", -credit, now_ms, session_id, "held while the machine pours")
            conn.execute(update(t.machines).where(t.machines.c.machine_id == machine_id)
                         .values(open_session_id=session_id))
        self._notify(machine_id)
        return {"session_id": session_id, "state": "starting", "machine_id": machine_id,
                "price_fen_per_l": grant.price_fen_per_l, "credit_limit_fen": credit}

    def ack(self, machine_id: str, command_id: str, ack: p.AckMsg, now_ms: int) -> p.AckResult:
        """A machine's answer to a command. For a start, ``ok`` is the claim: the session becomes active only if
        it is still starting (a conditional update), and the answer tells the machine whether to pour."""
        with self.db.tx() as conn:
            cmd = _one(conn, select(t.commands).where(t.commands.c.command_id == command_id))
            if cmd is None or cmd["machine_id"] != machine_id:
                raise ApiError(404, "unknown_command", "no such command for this machine")
            first = cmd["acked_ms"] is None
            if first:
                conn.execute(update(t.commands).where(and_(t.commands.c.command_id == command_id,
                                                           t.commands.c.acked_ms.is_(None)))
                             .values(acked_ms=now_ms, ack_ok=ack.ok, ack_reason=(ack.detail or ack.reason)[:200],
                                     delivered_ms=func.coalesce(t.commands.c.delivered_ms, now_ms)))
            if cmd["kind"] != "start":
                return p.AckResult()
            sid = cmd["body"]["session_id"]
            if ack.ok:
                conn.execute(update(t.sessions).where(and_(t.sessions.c.session_id == sid,
                                                           t.sessions.c.state == "starting"))
                             .values(state="active", acked_ms=now_ms))
            else:
                s = _one(conn, select(t.sessions).where(t.sessions.c.session_id == sid))
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
            raise ApiError(409, "start_void", f"this session is {state}: do not pour", session_state=state)
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
        s = t.sessions.c
        with self.db.read() as conn:
            rows = conn.execute(select(t.sessions).where(and_(
                s.machine_id == machine_id, s.state == "active", s.acked_ms < sent_ms - LOST_GRACE_MS))
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
                conn.execute(insert(t.machine_events).values(
                    machine_id=row["machine_id"], event_id=f"lost-{row['session_id']}"[:40],
                    kind=p.EventKind.SESSION_LOST,
                    payload={"detail": p.EventKind.SESSION_LOST.detail_of(
                        session_id=row["session_id"], user_id=row["user_id"], why=why,
                        released_fen=row["credit_limit_fen"])},
                    received_ms=now_ms, occurred_ms=now_ms, alarm=True))
                audit(conn, "system", "session_lost", row["session_id"],
                      {"machine_id": row["machine_id"], "why": why, "released_fen": row["credit_limit_fen"]}, now_ms)
        return lost

    def progress(self, machine_id: str, msg: p.ProgressMsg) -> None:
        with self.db.tx() as conn:
            conn.execute(update(t.sessions).where(and_(t.sessions.c.session_id == msg.session_id,
                                                       t.sessions.c.machine_id == machine_id,
                                                       t.sessions.c.state.in_(("starting", "active"))))
                         .values(progress=msg.model_dump()))

    def stop(self, user_id: str, session_id: str, now_ms: int) -> None:
        with self.db.tx() as conn:
            s = _one(conn, select(t.sessions).where(t.sessions.c.session_id == session_id))
            if s is None or s["user_id"] != user_id:
                raise ApiError(404, "unknown_session", "no such session")
            if s["state"] not in ("starting", "active"):
                raise ApiError(409, "session_over", f"this session is already {s['state']}")
            c = t.commands.c
            waiting = _one(conn, select(c.command_id).where(and_(
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
            row = _one(conn, select(s.session_id, s.machine_id, s.state, s.credit_limit_fen, t.machines.c.location)
                       .join(t.machines, t.machines.c.machine_id == s.machine_id)
                       .where(and_(s.user_id == user_id, s.state.in_(("starting", "active"))))
                       .order_by(s.created_ms.desc()).limit(1))
        return dict(row) if row else None

    def view(self, user_id: str, session_id: str) -> dict[str, Any]:
        with self.db.read() as conn:
            s = _one(conn, select(t.sessions).where(t.sessions.c.session_id == session_id))
            if s is None or s["user_id"] != user_id:
                raise ApiError(404, "unknown_session", "no such session")
            bill = _one(conn, select(t.bills).where(t.bills.c.session_id == session_id))
        out = {k: s[k] for k in ("session_id", "machine_id", "state", "price_fen_per_l", "credit_limit_fen",
                                 "progress", "void_reason", "end_reason", "fee_fen", "volume_ml")}
        out["charged"] = s["state"] == "ended"
        out["bill"] = bill
        return out

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
            prior = _one(conn, select(t.reports).where(and_(t.reports.c.machine_id == machine_id,
                                                             t.reports.c.event_id == ev.event_id)))
            if prior is not None:
                if prior["body_sha256"] != digest:
                    return p.EventResult(event_id=ev.event_id, status="rejected",
                                         detail="this event id was already used with a different body")
                return p.EventResult(event_id=ev.event_id, status="duplicate", detail=prior["detail"])
            malformed = _malformed(ev)
            try:
                with conn.begin_nested():    # this event alone: a copy racing it, or a refusal, undoes only it
                    if malformed:
                        status, detail = "rejected", malformed
                    else:
                        try:
                            with conn.begin_nested():      # a refused event leaves no half-written rows behind
                                status, detail = self._apply(conn, machine_id, ev, now_ms)
                        except ApiError as e:
                            if e.status >= 500:
                                raise        # not this report's fault: the whole batch is retried
                            status, detail = "rejected", e.message
                    conn.execute(insert(t.reports).values(
                        machine_id=machine_id, event_id=ev.event_id, kind=ev.kind, body_sha256=digest, status=status,
                        detail=detail[:300], payload={} if malformed else ev.payload, received_ms=now_ms,
                        occurred_ms=now_ms - ev.age_ms))
            except (IntegrityError, _Changed) as e:
                if attempt == 3:
                    raise ApiError(503, "retry", "this session kept changing while it was settled; send it again",
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
        return "accepted", ""

    def _settle(self, conn: Connection, machine_id: str, ev: p.DeviceEvent, now_ms: int) -> tuple[str, str]:
        """s6: the server recomputes the fee and settles it in one transaction; s7: the rental record."""
        r = p.SessionEndedPayload.model_validate(ev.payload)     # checked by _malformed already
        s = _one(conn, select(t.sessions).where(t.sessions.c.session_id == r.session_id))
        if s is None or s["machine_id"] != machine_id:
            raise ApiError(404, "unknown_session", f"session {r.session_id} was not started on this machine")
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
            conn.execute(insert(t.machine_events).values(
                machine_id=machine_id, event_id=ev.event_id, kind=p.EventKind.IMPLAUSIBLE_REPORT,
                payload={"detail": p.EventKind.IMPLAUSIBLE_REPORT.detail_of(
                    session_id=s["session_id"], problems=implausible, billed_pulses=r.billed_pulses,
                    milli_pulses_per_litre=r.milli_pulses_per_litre, billed_fen=fee)},
                received_ms=now_ms, occurred_ms=now_ms - ev.age_ms, alarm=True))
            log.error("implausible report %s from %s: %s; billed %d fen", ev.event_id, machine_id,
                      "; ".join(implausible), fee)
        changed = conn.execute(update(t.sessions).where(and_(t.sessions.c.session_id == s["session_id"],
                                                             t.sessions.c.state == s["state"]))
                               .values(state="ended")).rowcount
        if changed != 1:     # another request changed it meanwhile (a void, a lost, a copy of this report)
            raise _Changed()
        if s["state"] in ("starting", "active"):
            add_entry(conn, s["user_id"], "release", s["credit_limit_fen"], now_ms, s["session_id"])
        if fee:
            add_entry(conn, s["user_id"], "charge", -fee, now_ms, s["session_id"],
                      f"{expected_volume} ml at {s['price_fen_per_l']} fen/l")
        points = points_for_fee(fee)
        earn_points(conn, s["user_id"], points, s["session_id"], now_ms)
        conn.execute(update(t.sessions).where(t.sessions.c.session_id == s["session_id"]).values(
            state="ended", ended_ms=now_ms, end_reason=r.reason, fee_fen=fee, volume_ml=expected_volume))
        conn.execute(update(t.machines).where(and_(t.machines.c.machine_id == machine_id,
                                                   t.machines.c.open_session_id == s["session_id"]))
                     .values(open_session_id=None))
        wq = dict(r.water_quality)
        wq.update(temp_start_c=r.temp_start_c, temp_end_c=r.temp_end_c)
        avg = expected_volume * 60_000 // r.duration_ms if r.duration_ms else 0
        started_at, closed_at = true_times(r, now_ms - ev.age_ms)
        conn.execute(insert(t.bills).values(
            session_id=s["session_id"], user_id=s["user_id"], machine_id=machine_id, started_at=started_at,
            ended_at=closed_at, duration_ms=r.duration_ms, volume_ml=expected_volume, avg_flow_ml_per_min=avg,
            amount_fen=fee, price_fen_per_l=s["price_fen_per_l"], water_quality=wq, points=points,
            end_reason=r.reason, created_ms=now_ms))
        conn.execute(insert(t.rental_records).values(
            session_id=s["session_id"], machine_id=machine_id, user_id=s["user_id"], started_at=started_at,
            ended_at=closed_at, started_ms=s["created_ms"], record=r.model_dump(mode="json")))
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

def create_dev_user(db: Database, phone: str, balance_fen: int, registered: bool, now_ms: int) -> tuple[str, str]:
    user_id = "u-" + uuid.uuid4().hex[:16]
    token = new_token()
    with db.tx() as conn:
        conn.execute(insert(t.users).values(user_id=user_id, phone=phone, registered=registered, created_ms=now_ms))
        conn.execute(insert(t.user_tokens).values(token_hash=token_hash(token), user_id=user_id, created_ms=now_ms))
        if balance_fen:
            add_entry(conn, user_id, "topup", balance_fen, now_ms, note="development top-up")
    return user_id, token
