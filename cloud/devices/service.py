"""Machines and what the cloud says to them: provisioning and enrolment, the signed-request check with its
replay guard, heartbeats, and the command queue each machine long-polls."""

from __future__ import annotations

import asyncio
import logging
import secrets
import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from fastapi.concurrency import run_in_threadpool
from sqlalchemy import Connection, and_, bindparam, insert, or_, select, text, update
from sqlalchemy.dialects.sqlite import insert as sqlite_insert

import contract as p
from cloud import db as t
from cloud.cluster import COMMANDS_CHANNEL, KEYS_CHANNEL, announce
from cloud.db import Database, audit, first_row
from cloud.errors import BadRequest, Conflict, Invalid, NotFound, Unauthenticated, Unavailable
from cloud.fleet.samples import Samples
from cloud.security import SecretBox, token_hash

log = logging.getLogger("tapshare.cloud")

ENROLMENT_TTL_MS = 7 * 86_400_000
NONCE_KEEP_MS = 2 * p.MAX_CLOCK_SKEW_MS + 60_000
SILENT_AFTER_MS = 120_000          # a machine not heard from this long is an alarm
RECENTLY_SEEN_MS = 10_000
COMMAND_TTL_MS = 60_000
REDELIVER_MS = 3_000               # an unacknowledged command is handed out again only after this long


@dataclass
class MachineAuth:
    machine_id: str
    secret: bytes
    timestamp_ms: int = 0          # when the machine signed the request (its server-corrected clock)
    nonce_seq: int = 0             # the request may be answered once the nonce journal is durable up to this
    nonce: str = ""


class Machines:
    def __init__(self, db: Database, box: SecretBox, now_ms: int = 0,
                 alarm_hint: Callable[[dict[str, Any]], bool] | None = None) -> None:
        self.db, self.box = db, box
        # whether a heartbeat shows any alarm rule's condition (cloud.alarms.rules.alarming, wired by the app):
        # kept with the machine so the alarm round need not read the whole fleet; None leaves it unknown
        self.alarm_hint = alarm_hint
        self._secrets: dict[str, bytes] = {}
        self._secrets_generation = 0   # bumped whenever cached secrets are dropped (see :meth:`forget_secret`)
        self.samples = Samples()       # heartbeats kept every few minutes, for the console's charts
        # Replay protection: the database decides (a unique key on machine and nonce), so a nonce used at one
        # instance is refused at every other and after any restart. Nonces are written in group commits
        # (flush_nonces) and a request is answered only once its own is in; this process's own recent nonces are
        # also kept in memory (pruned with the database), which refuses a replay to this instance at once.
        self._nonces: dict[tuple[str, str], int] = {}
        self._replayed: dict[tuple[str, str], int] = {}   # nonces the database refused, until their request asks
        self._unflushed: list[dict[str, Any]] = []
        self._nonce_lock = threading.Lock()
        # one flush at a time (the group commit and the flusher's timer both flush): a later flush that committed
        # first must not mark an earlier one's nonces durable while they are still being written (a replay to
        # another instance in that gap was accepted)
        self._flush_lock = threading.Lock()
        self._nonce_seq = 0            # nonces accepted so far
        self.nonces_durable_seq = 0    # ... of which this many are committed (answers wait for theirs)
        self.reload_secrets()          # every enrolled machine's, decrypted once: a request never waits for them

    def provision(self, operator_id: str, machine_id: str, location: str, price_fen_per_l: int, limits: p.Limits,
                  now_ms: int) -> str:
        """Create a machine and a single-use enrolment token (returned once)."""
        if not p.MACHINE_ID_RE.fullmatch(machine_id):
            raise Invalid("bad_machine_id", "machine id: 1-64 letters, digits, '-' or '_'")
        token = secrets.token_hex(24)      # hex: never starts with '-', which a command line would take for an option
        with self.db.tx() as conn:
            if first_row(conn, select(t.machines.c.machine_id).where(t.machines.c.machine_id == machine_id)):
                raise Conflict("machine_exists", f"machine {machine_id} already exists")
            conn.execute(insert(t.machines).values(
                machine_id=machine_id, location=location, price_fen_per_l=price_fen_per_l, **limits.model_dump(),
                created_ms=now_ms))
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
            row = first_row(conn, select(t.enrolment_tokens)
                            .where(t.enrolment_tokens.c.token_hash == token_hash(token)))
            if row is None or row["machine_id"] != machine_id:
                raise Unauthenticated("bad_enrolment_token", "unknown enrolment token for this machine")
            if row["used_ms"] is not None:
                raise Unauthenticated("enrolment_token_used", "this enrolment token was already used")
            if row["expires_ms"] < now_ms:
                raise Unauthenticated("enrolment_token_expired", "this enrolment token has expired")
            e = t.enrolment_tokens.c
            used = update(t.enrolment_tokens).where(and_(e.token_hash == row["token_hash"], e.used_ms.is_(None)))
            if conn.execute(used.values(used_ms=now_ms)).rowcount != 1:      # single use, even for two at once
                raise Unauthenticated("enrolment_token_used", "this enrolment token was already used")
            conn.execute(update(t.machines).where(t.machines.c.machine_id == machine_id)
                         .values(secret_enc=self.box.seal(secret, f"machine:{machine_id}")))
            announce(conn, KEYS_CHANNEL, machine_id)
        self.forget_secret(machine_id)
        return secret

    def revoke_key(self, operator_id: str, machine_id: str, now_ms: int) -> None:
        """Forget a machine's secret (a stolen or retired machine): every request it signs is refused at once."""
        with self.db.tx() as conn:
            changed = conn.execute(update(t.machines).where(t.machines.c.machine_id == machine_id)
                                   .values(secret_enc=None)).rowcount
            if not changed:
                raise NotFound("unknown_machine", f"machine {machine_id} does not exist")
            conn.execute(update(t.enrolment_tokens).where(and_(t.enrolment_tokens.c.machine_id == machine_id,
                                                               t.enrolment_tokens.c.used_ms.is_(None)))
                         .values(used_ms=now_ms))
            audit(conn, operator_id, "revoke_machine_key", machine_id, {}, now_ms)
            announce(conn, KEYS_CHANNEL, machine_id)         # every other instance drops its cached secret
        self.forget_secret(machine_id)

    def new_enrolment_token(self, operator_id: str, machine_id: str, now_ms: int) -> str:
        """A fresh single-use enrolment token for an existing machine (re-enrolment after a revoke or a new SD card)."""
        token = secrets.token_hex(24)
        with self.db.tx() as conn:
            if first_row(conn, select(t.machines.c.machine_id).where(t.machines.c.machine_id == machine_id)) is None:
                raise NotFound("unknown_machine", f"machine {machine_id} does not exist")
            conn.execute(insert(t.enrolment_tokens).values(
                token_hash=token_hash(token), machine_id=machine_id, created_by=operator_id,
                expires_ms=now_ms + ENROLMENT_TTL_MS))
            audit(conn, operator_id, "new_enrolment_token", machine_id, {}, now_ms)
        return token

    def secret(self, machine_id: str) -> bytes | None:
        cached = self._secrets.get(machine_id)
        if cached is not None:
            return cached
        generation = self._secrets_generation
        with self.db.read() as conn:
            row = first_row(conn, select(t.machines.c.secret_enc).where(t.machines.c.machine_id == machine_id))
        if row is None or row["secret_enc"] is None:
            return None
        secret = self.box.open(row["secret_enc"], f"machine:{machine_id}")
        if generation == self._secrets_generation:   # not dropped while it was read: it may be out of date
            self._secrets[machine_id] = secret
        return secret

    def forget_secret(self, machine_id: str | None = None) -> None:
        """Drop a cached device secret (all of them with ``None``): another instance revoked or re-enrolled the
        machine, or the listener reconnected and may have missed that."""
        self._secrets_generation += 1
        if machine_id is None:
            self._secrets.clear()
        else:
            self._secrets.pop(machine_id, None)

    def reload_secrets(self) -> int:
        """Every enrolled machine's key read again, replacing the cache at once: the listener (re)connected, and a
        key revoked or re-enrolled while nobody listened is seen, while no request has to read its key from the
        database (dropping them all made each machine's next request at each instance do so). A key dropped
        here meanwhile (revoked at this instance) makes it read again; after three tries they are dropped."""
        sm = t.machines.c
        for _ in range(3):
            generation = self._secrets_generation
            with self.db.read() as conn:
                fresh = {mid: self.box.open(sealed, f"machine:{mid}") for mid, sealed in conn.execute(
                    select(sm.machine_id, sm.secret_enc).where(sm.secret_enc.is_not(None)))}
            if generation == self._secrets_generation:
                self._secrets_generation += 1
                self._secrets = fresh
                return len(fresh)
        self.forget_secret()
        return 0

    def cached_secret(self, machine_id: str) -> bytes | None:
        return self._secrets.get(machine_id)

    def authenticate(self, method: str, path: str, headers: dict[str, str], body: bytes, now_ms: int) -> MachineAuth:
        """Check a signed dispenser request; raises 401 with the precise reason."""
        machine_id = headers.get(p.HEADER_MACHINE.lower(), "")
        ts_text = headers.get(p.HEADER_TIMESTAMP.lower(), "")
        nonce = headers.get(p.HEADER_NONCE.lower(), "")
        signature = headers.get(p.HEADER_SIGNATURE.lower(), "")
        if not (machine_id and ts_text and nonce and signature):
            raise Unauthenticated("unsigned", "missing signature headers (X-Tapshare-Machine, -Timestamp, -Nonce, "
                                            "-Signature)")
        if not p.MACHINE_ID_RE.fullmatch(machine_id) or not p.NONCE_RE.fullmatch(nonce) or not ts_text.isdigit() \
                or len(ts_text) > 15:
            raise Unauthenticated("malformed_signature_headers", "malformed signature headers")
        version = headers.get(p.HEADER_PROTOCOL.lower(), "")
        if not (version.isdigit() and len(version) < 6 and int(version) in p.SUPPORTED_PROTOCOL_VERSIONS):
            supported = sorted(p.SUPPORTED_PROTOCOL_VERSIONS)
            raise BadRequest("unsupported_protocol", f"this cloud speaks protocol version {supported}; the machine "
                           f"sent {version or 'none'} ({p.HEADER_PROTOCOL}): update the machine's software",
                           supported=supported)
        secret = self.secret(machine_id)
        if secret is None:
            raise Unauthenticated("unknown_machine", f"machine {machine_id} is unknown or not enrolled")
        ts = int(ts_text)
        if not p.verify_signature(secret, method, path, ts, nonce, body, signature):
            raise Unauthenticated("bad_signature", "the request signature does not match")
        problem = p.clock_problem(ts, now_ms)
        if problem:
            raise Unauthenticated("clock_skew", problem, server_time_ms=now_ms)
        with self._nonce_lock:
            if (machine_id, nonce) in self._nonces:
                raise Unauthenticated("replayed_nonce", "this nonce was already used (a replayed request)")
            self._nonces[(machine_id, nonce)] = now_ms
            self._unflushed.append({"machine_id": machine_id, "nonce": nonce, "seen_ms": now_ms})
            self._nonce_seq += 1
            seq = self._nonce_seq
        return MachineAuth(machine_id, secret, ts, seq, nonce)

    def flush_nonces(self) -> int:
        """Write the nonces seen since the last flush, in one transaction (a group commit: every request waits
        for the flush that holds its nonce before it is answered, so a crash forgets no nonce it answered). A
        nonce already in the database (used at another instance, or before a restart) is not written again but
        remembered as replayed, which its request learns from :meth:`replayed` once the flush is durable."""
        with self._flush_lock:
            return self._flush_nonces()

    def _flush_nonces(self) -> int:
        with self._nonce_lock:
            rows, self._unflushed = self._unflushed, []
            seq = self._nonce_seq
        if rows:
            try:
                with self.db.tx() as conn:
                    if conn.dialect.name == "postgresql":
                        stored = _insert_nonces_pg(conn, rows)
                    else:
                        stored = {(m, n) for m, n in conn.execute(sqlite_insert(t.nonces).on_conflict_do_nothing()
                                                                  .returning(t.nonces.c.machine_id, t.nonces.c.nonce),
                                                                  rows)}
            except Exception:
                with self._nonce_lock:
                    self._unflushed[:0] = rows          # written with the next flush; nobody was answered
                raise
            if len(stored) < len(rows):
                with self._nonce_lock:
                    for r in rows:
                        if (r["machine_id"], r["nonce"]) not in stored:
                            self._replayed[(r["machine_id"], r["nonce"])] = r["seen_ms"]
        self.nonces_durable_seq = max(self.nonces_durable_seq, seq)
        return len(rows)

    def replayed(self, auth: MachineAuth) -> bool:
        """Whether the database refused this request's nonce (call after it is durable)."""
        if not self._replayed:
            return False
        with self._nonce_lock:
            return self._replayed.pop((auth.machine_id, auth.nonce), None) is not None

    def prune_local_nonces(self, now_ms: int) -> int:
        """This instance's memory of nonces: those older than the clock-skew window can no longer be replayed."""
        cut = now_ms - NONCE_KEEP_MS
        with self._nonce_lock:
            old = [k for k, seen in self._nonces.items() if seen < cut]
            for key in old:
                del self._nonces[key]
            for key in [k for k, seen in self._replayed.items() if seen < cut]:
                del self._replayed[key]
        return len(old)

    def prune_nonces(self, now_ms: int) -> int:
        """The database's nonces older than the clock-skew window (one instance does this: a leased job)."""
        with self.db.tx() as conn:
            return conn.execute(t.nonces.delete().where(t.nonces.c.seen_ms < now_ms - NONCE_KEEP_MS)).rowcount

    def get(self, machine_id: str) -> dict[str, Any]:
        with self.db.read() as conn:
            row = first_row(conn, select(t.machines).where(t.machines.c.machine_id == machine_id))
        if row is None:
            raise NotFound("unknown_machine", f"machine {machine_id} does not exist")
        return row

    def heartbeat(self, machine_id: str, hb: p.HeartbeatMsg, now_ms: int) -> dict[str, Any]:
        """Record the telemetry; returns the machine's settings row (price, time zone, hotline)."""
        heartbeat = hb.model_dump()
        with self.db.tx() as conn:
            m = first_row(conn, _HEARTBEAT, {"b_machine_id": machine_id, "last_seen_ms": now_ms, "heartbeat": heartbeat,
                                             "alarm_hint": self.alarm_hint(heartbeat) if self.alarm_hint else None})
            if m and m["open_session_id"] and hb.session_id is None:
                s = first_row(conn, _SESSION_STATE, {"session_id": m["open_session_id"]})
                if s is None or s["state"] != "starting":   # the machine is free (a report may be on its way)
                    conn.execute(FREE_MACHINE, {"b_machine_id": machine_id, "b_session_id": m["open_session_id"]})
            self.samples.record(conn, machine_id, heartbeat, now_ms)
        return m or {"price_fen_per_l": 0, "timezone": "Asia/Shanghai", "hotline": ""}


# a heartbeat's statements, built once (every machine sends one every few seconds): the telemetry written and the
# settings read back in one statement
_mc = t.machines.c
_HEARTBEAT = update(t.machines).where(_mc.machine_id == bindparam("b_machine_id")).returning(
    _mc.open_session_id, _mc.price_fen_per_l, _mc.timezone, _mc.hotline)
_SESSION_STATE = select(t.sessions.c.state).where(t.sessions.c.session_id == bindparam("session_id"))
# a machine freed from the session it was seen serving, and only from that one (a heartbeat, a settlement)
FREE_MACHINE = update(t.machines).where(and_(_mc.machine_id == bindparam("b_machine_id"),
                                             _mc.open_session_id == bindparam("b_session_id"))
                                        ).values(open_session_id=None)


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
        announce(conn, COMMANDS_CHANNEL, machine_id)     # wakes its long-poll at whichever instance holds it
        return command_id

    def due_machines(self, now_ms: int) -> set[str]:
        """Every machine with a command to hand out now, each marked as maybe pending: the periodic re-check that
        bounds what a missed notification can cost (one query an instance every few seconds)."""
        c = t.commands.c
        with self.db.read() as conn:
            due = {r[0] for r in conn.execute(select(c.machine_id).where(and_(
                c.acked_ms.is_(None), c.expires_ms > now_ms,
                or_(c.delivered_ms.is_(None), c.delivered_ms <= now_ms - REDELIVER_MS))).distinct())}
        self.maybe_pending |= due
        return due

    def prune(self, now_ms: int, keep_ms: int) -> int:
        """Delete the commands queued more than ``keep_ms`` ago that are over: answered, or expired unanswered (a
        command is never handed out after it expires). Without it the table grew by two rows a session forever."""
        c, cut = t.commands.c, now_ms - keep_ms
        with self.db.tx() as conn:
            return conn.execute(t.commands.delete().where(and_(
                c.created_ms < cut, or_(c.acked_ms.is_not(None), c.expires_ms < cut)))).rowcount

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
                if not self.db.is_sqlite:
                    # not worth an fsync on the way to the machine: if the database crashes before it is on disk,
                    # the command is handed out again at once, and the machine takes a command id only once
                    conn.execute(text("SET LOCAL synchronous_commit = off"))
                conn.execute(update(t.commands).where(t.commands.c.command_id.in_([r[0] for r in due]))
                             .values(delivered_ms=now_ms))
        return [p.CommandMsg(**r[1]) for r in due], min(held) if held else None


# One statement with three arrays, whatever the number of nonces: its text never changes, so psycopg prepares it
# once per connection; SQLAlchemy's many-row INSERT ... RETURNING rendered and bound each batch row by row in
# Python, a fifth of an instance's time under a fleet's polls. In (machine, nonce) order, so two instances'
# flushes holding the same nonces (a replay sent to both at once) take them in the same order.
_NONCES_PG = ("INSERT INTO nonces (machine_id, nonce, seen_ms) "
              "SELECT m, n, s FROM unnest(%(m)s::varchar[], %(n)s::varchar[], %(s)s::bigint[]) "
              "WITH ORDINALITY AS batch(m, n, s, i) ORDER BY i "
              "ON CONFLICT DO NOTHING RETURNING machine_id, nonce")


def _insert_nonces_pg(conn: Connection, rows: list[dict[str, Any]]) -> set[tuple[str, str]]:
    rows = sorted(rows, key=lambda r: (r["machine_id"], r["nonce"]))
    params = {"m": [r["machine_id"] for r in rows], "n": [r["nonce"] for r in rows],
              "s": [r["seen_ms"] for r in rows]}
    return {(m, n) for m, n in conn.exec_driver_sql(_NONCES_PG, params)}


class DurableNonces:
    """Group commit of the replay guard: a device request is answered only after its nonce is in the database.
    Requests that arrive while a flush runs wait for the next one, which takes them all in one transaction."""

    def __init__(self, machines: Machines) -> None:
        self.machines = machines
        self._wake = asyncio.Event()
        self._next: asyncio.Future | None = None
        self._gathering: asyncio.TimerHandle | None = None

    async def durable(self, seq: int, timeout_s: float = 10.0, gather_s: float = 0.0) -> None:
        """Returns once the nonce journal is durable up to ``seq``. ``gather_s``: the request can wait that long
        for a flush that takes others' nonces too (a long-poll, whose answer is not awaited), instead of asking
        for one at once (a flush a request was most of the cost of a fleet's polls)."""
        while self.machines.nonces_durable_seq < seq:
            loop = asyncio.get_running_loop()
            if self._next is None:
                self._next = loop.create_future()
            fut = self._next
            if gather_s <= 0:
                self._wake.set()
            elif self._gathering is None:
                self._gathering = loop.call_later(gather_s, self._gathered)
            try:
                await asyncio.wait_for(asyncio.shield(fut), timeout_s)
            except Exception as e:
                raise Unavailable("busy", "the server could not record this request; try again",
                               retry_after_s=1) from e

    def _gathered(self) -> None:
        self._gathering = None
        self._wake.set()

    def flushed(self) -> None:
        """On the event loop, after the instance's periodic flush (:func:`cloud.app.flusher`) wrote the nonces: the
        requests waiting for a flush are answered by that one (each checks it covered its nonce), and the gathering
        flush they asked for is not needed."""
        fut, self._next = self._next, None
        if fut is not None and not fut.done():
            fut.set_result(True)
        if self._gathering is not None:
            self._gathering.cancel()
            self._gathering = None

    async def run(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            fut, self._next = self._next, None
            try:
                await run_in_threadpool(self.machines.flush_nonces)
            except Exception as e:
                log.exception("cannot write the replay guard's nonces")
                if fut is not None and not fut.done():
                    fut.set_exception(e)
                    fut.exception()                     # retrieved: no "never retrieved" warning
                await asyncio.sleep(0.1)
                continue
            if fut is not None and not fut.done():
                fut.set_result(True)
