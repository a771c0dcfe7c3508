"""The on-device ledger: a real SQLite file through sqlite-utils, built to survive power loss.

* WAL journal with ``synchronous=FULL``: a commit that returned is on the SD card.
* A session row is written before its valve opens; while it runs, checkpoints are *appended* (at
  least every 250 ms of flow), so the per-second flow series, valve transitions and temperatures
  survive for the rental record. A session's end and its outgoing report (outbox row, event id
  ``<boot_id>-<seq>``) are written in one transaction.
* :meth:`Ledger.recover_open_sessions` closes any session a crash left open, with reason
  ``power_loss`` (or the reason already recorded when its valve closed), billed from its last
  checkpoint, and queues its report.
* A lifetime pulse totalizer that SQL triggers refuse to decrease or delete.
* An event log and sent reports kept bounded by :meth:`Ledger.prune`.

Every failure to open, read or write raises :class:`LedgerError` with a message a technician can act
on; the runtime then keeps the valve closed and the machine out of service.
"""

from __future__ import annotations

import json
import os
import secrets
import sqlite3
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlite_utils import Database
from sqlite_utils.migrations import Migrations

from contract.billing import Calibration
from contract.events import EventKind as K
from contract.messages import ReportEnvelope
from kiosk.events import Checkpoint, EndReason, SessionEnded, SessionRecord, SessionStarted

migrations = Migrations("tapshare-ledger")


class LedgerError(RuntimeError):
    """The ledger cannot be opened, read or written (corrupt file, read-only, disk full)."""


@migrations()
def m001_initial(db: Database) -> None:
    db.execute("""CREATE TABLE boots (
        boot_id INTEGER PRIMARY KEY AUTOINCREMENT, started_wall_ms INTEGER NOT NULL,
        software_version TEXT NOT NULL)""")
    db.execute("""CREATE TABLE sessions (
        session_id TEXT PRIMARY KEY, boot_id INTEGER NOT NULL, user_ref TEXT NOT NULL,
        state TEXT NOT NULL CHECK (state IN ('open', 'ended')),
        price_fen_per_l INTEGER NOT NULL, credit_limit_fen INTEGER NOT NULL,
        max_volume_ml INTEGER NOT NULL, max_duration_ms INTEGER NOT NULL, max_idle_ms INTEGER NOT NULL,
        limit_pulses INTEGER NOT NULL, milli_pulses_per_litre INTEGER NOT NULL,
        min_dispense_ml INTEGER NOT NULL,
        started_wall_ms INTEGER NOT NULL, started_mono_ms INTEGER NOT NULL, temp_start_c REAL,
        ended_wall_ms INTEGER, end_reason TEXT, billed_pulses INTEGER, overrun_pulses INTEGER,
        volume_ml INTEGER, cost_fen INTEGER, below_minimum INTEGER, duration_ms INTEGER,
        recovered INTEGER NOT NULL DEFAULT 0, report_event_id TEXT)""")
    db.execute("CREATE INDEX sessions_state ON sessions (state)")
    db.execute("""CREATE TRIGGER sessions_ended_immutable BEFORE UPDATE ON sessions
        WHEN OLD.state = 'ended' BEGIN SELECT RAISE(ABORT, 'an ended session cannot change'); END""")
    db.execute("""CREATE TABLE checkpoints (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        session_id TEXT NOT NULL REFERENCES sessions (session_id),
        wall_ms INTEGER NOT NULL, mono_ms INTEGER NOT NULL,
        billed_pulses INTEGER NOT NULL, overrun_pulses INTEGER NOT NULL,
        temp_c REAL, valve_open INTEGER NOT NULL, closing_reason TEXT)""")
    db.execute("CREATE INDEX checkpoints_session ON checkpoints (session_id, id)")
    db.execute("""CREATE TABLE outbox (
        event_id TEXT PRIMARY KEY, kind TEXT NOT NULL, payload TEXT NOT NULL,
        created_wall_ms INTEGER NOT NULL,
        state TEXT NOT NULL DEFAULT 'pending' CHECK (state IN ('pending', 'sent', 'dead')),
        attempts INTEGER NOT NULL DEFAULT 0, last_error TEXT, next_attempt_wall_ms INTEGER NOT NULL DEFAULT 0,
        done_wall_ms INTEGER)""")
    db.execute("CREATE INDEX outbox_pending ON outbox (state, created_wall_ms)")
    db.execute("""CREATE TABLE events (
        id INTEGER PRIMARY KEY AUTOINCREMENT, boot_id INTEGER NOT NULL, wall_ms INTEGER NOT NULL,
        kind TEXT NOT NULL, detail TEXT NOT NULL)""")
    db.execute("""CREATE TABLE totalizer (
        id INTEGER PRIMARY KEY CHECK (id = 1), pulses INTEGER NOT NULL CHECK (pulses >= 0))""")
    db.execute("INSERT INTO totalizer (id, pulses) VALUES (1, 0)")
    db.execute("""CREATE TRIGGER totalizer_never_decreases BEFORE UPDATE ON totalizer
        WHEN NEW.pulses < OLD.pulses OR NEW.id != OLD.id
        BEGIN SELECT RAISE(ABORT, 'the lifetime totalizer cannot be reduced'); END""")
    db.execute("""CREATE TRIGGER totalizer_never_deleted BEFORE DELETE ON totalizer
        BEGIN SELECT RAISE(ABORT, 'the lifetime totalizer cannot be deleted'); END""")
    db.execute("""CREATE TABLE lockouts (
        reason TEXT PRIMARY KEY, detail TEXT NOT NULL, since_wall_ms INTEGER NOT NULL)""")
    db.execute("""CREATE TABLE admin_commands (
        id INTEGER PRIMARY KEY AUTOINCREMENT, command TEXT NOT NULL, args TEXT NOT NULL,
        created_wall_ms INTEGER NOT NULL, taken_wall_ms INTEGER)""")


@migrations()
def m002_settings(db: Database) -> None:
    """Values the machine learns and keeps across restarts: the calibrated meter factor, the maintenance
    PIN's hash and lockout, consumable counters."""
    db.execute("""CREATE TABLE settings (
        key TEXT PRIMARY KEY, value TEXT NOT NULL, updated_wall_ms INTEGER NOT NULL)""")


@migrations()
def m003_ledger_id(db: Database) -> None:
    """A random id for this ledger file, part of every report id: a replaced ledger (a corrupt one swapped
    for a new file) never reuses an id the cloud has already seen with another body."""
    db.execute("INSERT OR IGNORE INTO settings (key, value, updated_wall_ms) VALUES ('ledger_id', ?, 0)",
               [json.dumps(secrets.token_hex(8))])
    db.execute("CREATE TABLE IF NOT EXISTS write_probe (id INTEGER PRIMARY KEY, filler BLOB NOT NULL)")
    # a report's age is measured on the monotonic clock while the machine has not restarted
    db.execute("ALTER TABLE outbox ADD COLUMN created_boot_id INTEGER")
    db.execute("ALTER TABLE outbox ADD COLUMN created_mono_ms INTEGER")


PROBE_BYTES = 256 * 1024        # a storage check writes (and deletes) this much: small writes may still fit
MIN_FREE_BYTES = 8 * 1024 * 1024  # ... and wants this much free space on the ledger's filesystem
CACHE_KIB = 2_000                # SQLite page cache of the ledger's one connection (SQLite's default, stated)


def iso_utc(wall_ms: int) -> str:
    return datetime.fromtimestamp(wall_ms / 1000, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _describe(e: BaseException) -> str:
    msg = str(e)
    if "disk" in msg and "full" in msg:
        return f"the disk is full ({msg})"
    if "readonly" in msg or "read-only" in msg:
        return f"the database is read-only ({msg})"
    return msg


class Ledger:
    """The dispenser's on-disk state. Thread-safe (one lock); the core thread is its main writer."""

    def __init__(self, db: Database, path: Path, machine_id: str, boot_id: int,
                 wall_clock: Callable[[], int], ledger_id: str = "",
                 mono_clock: Callable[[], int] | None = None) -> None:
        self.db, self.path, self.machine_id, self.boot_id = db, path, machine_id, boot_id
        self.ledger_id = ledger_id
        self._wall = wall_clock
        self._mono = mono_clock
        self._lock = threading.RLock()
        self._seq = 0

    def set_wall_clock(self, wall_clock: Callable[[], int]) -> None:
        """Stamp records from now on with this clock (the server-corrected one once the link has synced
        time, so a Pi whose clock is days off still writes true times)."""
        self._wall = wall_clock

    # ------------------------------------------------------------------ opening
    @classmethod
    def open(cls, path: str | Path, *, machine_id: str, wall_clock: Callable[[], int],
             software_version: str = "dev", new_boot: bool = True,
             mono_clock: Callable[[], int] | None = None) -> Ledger:
        """Open (creating if needed) and migrate the ledger; with ``new_boot`` record a boot.

        :raises LedgerError: the file is corrupt, not a database, unreadable or unwritable.
        """
        path = Path(path)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise LedgerError(f"ledger {path}: cannot create its folder: {e.strerror}") from e
        conn = None
        try:
            conn = sqlite3.connect(str(path), check_same_thread=False, timeout=10)
            db = Database(conn)
            db.execute("PRAGMA busy_timeout = 10000")
            mode = db.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            if mode != "wal":
                raise LedgerError(f"ledger {path}: cannot use WAL journal (got {mode})")
            db.execute("PRAGMA synchronous = FULL")
            db.execute("PRAGMA foreign_keys = ON")
            # the page cache fills as the ledger grows, then stays: the bound of the kiosk's native memory that a
            # soak sees grow longest (~1.6 KB a session until it is full)
            db.execute(f"PRAGMA cache_size = -{CACHE_KIB}")
            check = db.execute("PRAGMA quick_check").fetchone()[0]
            if check != "ok":
                raise LedgerError(f"ledger {path} is corrupt ({check}); keep the file for the "
                                  "operator and replace it, the machine stays out of service")
            migrations.apply(db)
            boot_id = 0
            if new_boot:
                with db.atomic():
                    cur = db.execute("INSERT INTO boots (started_wall_ms, software_version) VALUES (?, ?)",
                                     [wall_clock(), software_version])
                    boot_id = cur.lastrowid
            # else: an administrative handle (a CLI beside the running kiosk): boot_id 0, and it may
            # not queue reports, whose ids belong to the running boot.
            row = db.execute("SELECT value FROM settings WHERE key = 'ledger_id'").fetchone()
            ledger_id = json.loads(row[0]) if row else ""
        except LedgerError:
            if conn is not None:
                conn.close()
            raise
        except sqlite3.DatabaseError as e:
            if conn is not None:
                conn.close()
            if "not a database" in str(e) or "malformed" in str(e):
                raise LedgerError(f"ledger {path} is corrupt or not a database ({e}); keep the file "
                                  "for the operator and replace it, the machine stays out of service") from e
            raise LedgerError(f"ledger {path}: cannot open: {_describe(e)}") from e
        return cls(db, path, machine_id, boot_id, wall_clock, ledger_id, mono_clock)

    def close(self) -> None:
        with self._lock:
            self.db.close()

    @contextmanager
    def _tx(self, what: str) -> Iterator[Database]:
        with self._lock:
            try:
                with self.db.atomic():
                    yield self.db
            except sqlite3.Error as e:
                raise LedgerError(f"ledger {self.path}: cannot {what}: {_describe(e)}") from e

    def _read(self, sql: str, params: list | tuple = ()) -> list[dict[str, Any]]:
        with self._lock:
            try:
                return list(self.db.query(sql, params))
            except sqlite3.Error as e:
                raise LedgerError(f"ledger {self.path}: cannot read: {_describe(e)}") from e

    def _next_event_id(self) -> str:
        if self.boot_id <= 0:
            raise sqlite3.ProgrammingError("an administrative ledger handle cannot queue reports")
        self._seq += 1
        prefix = f"{self.ledger_id}-" if self.ledger_id else ""
        return f"{prefix}{self.boot_id}-{self._seq}"

    def _queue(self, db: Database, kind: str, payload: dict[str, Any]) -> str:
        event_id = self._next_event_id()
        now = self._wall()
        envelope = ReportEnvelope(event_id=event_id, kind=kind, machine_id=self.machine_id, boot_id=self.boot_id,
                                  created_at=iso_utc(now))
        body = {**envelope.model_dump(), **payload}
        db.execute("INSERT INTO outbox (event_id, kind, payload, created_wall_ms, created_boot_id, created_mono_ms) "
                   "VALUES (?, ?, ?, ?, ?, ?)",
                   [event_id, kind, json.dumps(body, separators=(",", ":"), ensure_ascii=False), now, self.boot_id,
                    self._mono() if self._mono else None])
        return event_id

    # ------------------------------------------------------------------ sessions
    def start_session(self, a: SessionStarted) -> None:
        with self._tx("write the session row") as db:
            db.execute("""INSERT INTO sessions (session_id, boot_id, user_ref, state, price_fen_per_l,
                credit_limit_fen, max_volume_ml, max_duration_ms, max_idle_ms, limit_pulses,
                milli_pulses_per_litre, min_dispense_ml, started_wall_ms, started_mono_ms, temp_start_c)
                VALUES (?, ?, ?, 'open', ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)""",
                       [a.session_id, self.boot_id, a.user_ref, a.price_fen_per_l, a.credit_limit_fen,
                        a.max_volume_ml, a.max_duration_ms, a.max_idle_ms, a.limit_pulses,
                        a.milli_pulses_per_litre, a.min_dispense_ml, self._wall(), a.started_mono_ms, a.temp_c])

    def checkpoint(self, c: Checkpoint) -> None:
        with self._tx("write a checkpoint") as db:
            db.execute("""INSERT INTO checkpoints (session_id, wall_ms, mono_ms, billed_pulses,
                overrun_pulses, temp_c, valve_open, closing_reason) VALUES (?, ?, ?, ?, ?, ?, ?, ?)""",
                       [c.session_id, self._wall(), c.mono_ms, c.billed_pulses, c.overrun_pulses, c.temp_c,
                        int(c.valve_open), c.closing_reason])
            if c.totalizer_pulses:
                db.execute("UPDATE totalizer SET pulses = pulses + ? WHERE id = 1", [c.totalizer_pulses])

    def end_session(self, a: SessionEnded) -> str:
        """Write the end and its report in one transaction; returns the report's event id."""
        r = a.record
        with self._tx("write the session end") as db:
            event_id = self._end(db, r, recovered=False)
            if a.totalizer_pulses:
                db.execute("UPDATE totalizer SET pulses = pulses + ? WHERE id = 1", [a.totalizer_pulses])
        return event_id

    def _end(self, db: Database, r: SessionRecord, *, recovered: bool) -> str:
        cur = db.execute("SELECT * FROM sessions WHERE session_id = ?", [r.session_id])
        row = cur.fetchone()
        if row is None:
            raise sqlite3.IntegrityError(f"session {r.session_id} was never started")
        session = dict(zip([d[0] for d in cur.description], row, strict=True))
        if session["state"] != "open":
            raise sqlite3.IntegrityError(f"session {r.session_id} has already ended")
        now = self._wall()
        payload = self._rental_record(db, session, r, now, recovered)
        event_id = self._queue(db, "session_ended", payload)
        db.execute("""UPDATE sessions SET state = 'ended', ended_wall_ms = ?, end_reason = ?, billed_pulses = ?,
            overrun_pulses = ?, volume_ml = ?, cost_fen = ?, below_minimum = ?, duration_ms = ?, recovered = ?,
            report_event_id = ? WHERE session_id = ?""",
                   [now, r.reason, r.billed_pulses, r.overrun_pulses, r.volume_ml, r.cost_fen, int(r.below_minimum),
                    r.duration_ms, int(recovered), event_id, r.session_id])
        return event_id

    def _rental_record(self, db: Database, s: dict[str, Any], r: SessionRecord, now: int,
                       recovered: bool) -> dict[str, Any]:
        """The session's bill and rental record (patent s6/s7): times, volume, money, flow series,
        valve transitions and temperatures, sampled about once a second from the checkpoints."""
        t0_mono, t0_wall = s["started_mono_ms"], s["started_wall_ms"]
        series: list[list[Any]] = []
        valve: list[list[Any]] = [[0, "open"]]
        last_t = None
        cps = db.execute("""SELECT mono_ms, billed_pulses, overrun_pulses, temp_c, valve_open, closing_reason
            FROM checkpoints WHERE session_id = ? ORDER BY id""", [r.session_id]).fetchall()
        for i, (mono, billed, overrun, temp, is_open, closing) in enumerate(cps):
            t = mono - t0_mono
            if last_t is None or t - last_t >= 1000 or i == len(cps) - 1 or closing:
                series.append([t, billed, overrun, temp, bool(is_open)])
                last_t = t
            if closing:
                valve.append([t, "close", closing])
        if len(valve) == 1:
            valve.append([r.closed_mono_ms - t0_mono, "close", r.reason])
        return {
            "session_id": r.session_id, "user_ref": r.user_ref, "reason": r.reason, "recovered": recovered,
            "started_at": iso_utc(t0_wall), "closed_at": iso_utc(t0_wall + r.duration_ms),
            "ended_at": iso_utc(now), "duration_ms": r.duration_ms,
            "price_fen_per_l": r.price_fen_per_l, "credit_limit_fen": r.credit_limit_fen,
            "min_dispense_ml": s["min_dispense_ml"],
            "milli_pulses_per_litre": r.milli_pulses_per_litre, "billed_pulses": r.billed_pulses,
            "overrun_pulses": r.overrun_pulses, "volume_ml": r.volume_ml, "cost_fen": r.cost_fen,
            "below_minimum": r.below_minimum, "avg_flow_ml_per_min": r.avg_flow_ml_per_min,
            "temp_start_c": r.temp_start_c, "temp_end_c": r.temp_end_c,
            "water_quality": {"tds_ppm": r.tds_ppm, "tds_measured": r.tds_measured,
                              "tds_limit_ppm": r.tds_limit_ppm},
            "flow_series_columns": ["t_ms", "billed_pulses", "overrun_pulses", "temp_c", "valve_open"],
            "flow_series": series, "valve_events": valve,
        }

    def recover_open_sessions(self, *, keep: str | None = None) -> list[SessionRecord]:
        """Close every session a crash or power loss left open, billed from its last checkpoint.

        The end reason is the one recorded when the valve closed, if it got that far, else
        ``power_loss``. Each is written with its report in one transaction. ``keep`` names a session
        the running core still holds (it will end it itself).
        """
        records = []
        for s in self._read("SELECT * FROM sessions WHERE state = 'open' ORDER BY started_wall_ms"):
            if s["session_id"] == keep:
                continue
            cp = self._read("""SELECT mono_ms, billed_pulses, overrun_pulses, temp_c, closing_reason
                FROM checkpoints WHERE session_id = ? ORDER BY id DESC LIMIT 1""", [s["session_id"]])
            last = cp[0] if cp else {"mono_ms": s["started_mono_ms"], "billed_pulses": 0, "overrun_pulses": 0,
                                     "temp_c": s["temp_start_c"], "closing_reason": None}
            cal = Calibration(s["milli_pulses_per_litre"])
            volume = cal.volume_ml(last["billed_pulses"])
            below = volume < s["min_dispense_ml"]
            r = SessionRecord(
                session_id=s["session_id"], user_ref=s["user_ref"],
                reason=last["closing_reason"] or EndReason.POWER_LOSS.value,
                started_mono_ms=s["started_mono_ms"], closed_mono_ms=last["mono_ms"], ended_mono_ms=last["mono_ms"],
                price_fen_per_l=s["price_fen_per_l"], credit_limit_fen=s["credit_limit_fen"],
                milli_pulses_per_litre=s["milli_pulses_per_litre"], billed_pulses=last["billed_pulses"],
                overrun_pulses=last["overrun_pulses"], volume_ml=volume,
                cost_fen=0 if below else cal.cost_fen(last["billed_pulses"], s["price_fen_per_l"]),
                below_minimum=below, temp_start_c=s["temp_start_c"], temp_end_c=last["temp_c"])
            with self._tx("close a session left open") as db:
                self._end(db, r, recovered=True)
                self._event(db, K.SESSION_RECOVERED, K.SESSION_RECOVERED.detail_of(
                    session_id=r.session_id, reason=r.reason, billed_pulses=r.billed_pulses, cost_fen=r.cost_fen))
            records.append(r)
        return records

    def session(self, session_id: str) -> dict[str, Any] | None:
        rows = self._read("SELECT * FROM sessions WHERE session_id = ?", [session_id])
        return rows[0] if rows else None

    def sessions(self, state: str | None = None) -> list[dict[str, Any]]:
        if state is None:
            return self._read("SELECT * FROM sessions ORDER BY started_wall_ms, session_id")
        return self._read("SELECT * FROM sessions WHERE state = ? ORDER BY started_wall_ms, session_id", [state])

    def recent_session_ids(self, limit: int = 10_000) -> list[str]:
        rows = self._read("SELECT session_id FROM sessions ORDER BY rowid DESC LIMIT ?", [limit])
        return [r["session_id"] for r in reversed(rows)]

    def checkpoints(self, session_id: str) -> list[dict[str, Any]]:
        return self._read("SELECT * FROM checkpoints WHERE session_id = ? ORDER BY id", [session_id])

    # ------------------------------------------------------------------ totalizer, events, lockouts
    def add_to_totalizer(self, pulses: int) -> None:
        with self._tx("update the totalizer") as db:
            db.execute("UPDATE totalizer SET pulses = pulses + ? WHERE id = 1", [pulses])

    def totalizer_pulses(self) -> int:
        return self._read("SELECT pulses FROM totalizer WHERE id = 1")[0]["pulses"]

    def _event(self, db: Database, kind: str, detail: dict[str, Any]) -> None:
        db.execute("INSERT INTO events (boot_id, wall_ms, kind, detail) VALUES (?, ?, ?, ?)",
                   [self.boot_id, self._wall(), kind, json.dumps(detail, ensure_ascii=False)])

    def record(self, kind: K, **detail: Any) -> str | None:
        """Log an event, its detail checked against its kind's model; a kind the contract marks reported is also
        queued for the cloud, by a running boot (an administrative handle only logs). Returns the report's id."""
        return self.record_event(kind, kind.detail_of(**detail), report=kind.reported and self.boot_id > 0)

    def record_event(self, kind: str, detail: dict[str, Any] | None = None, report: bool = False) -> str | None:
        """Append to the event log; with ``report`` queue it for the cloud in the same transaction (the
        storage primitive: the domain uses :meth:`record` or the core's ``RecordEvent``)."""
        detail = detail or {}
        with self._tx("write the event log") as db:
            self._event(db, kind, detail)
            return self._queue(db, kind, {"detail": detail}) if report else None

    def events(self, kind: str | None = None, limit: int = 1000) -> list[dict[str, Any]]:
        where, params = ("WHERE kind = ?", [kind]) if kind else ("", [])
        rows = self._read(f"SELECT * FROM events {where} ORDER BY id DESC LIMIT ?", [*params, limit])
        return [{**r, "detail": json.loads(r["detail"])} for r in reversed(rows)]

    def set_lockout(self, reason: str, active: bool, detail: str = "") -> None:
        with self._tx("write a lockout") as db:
            if active:
                db.execute("INSERT OR REPLACE INTO lockouts (reason, detail, since_wall_ms) VALUES (?, ?, ?)",
                           [reason, detail, self._wall()])
            else:
                db.execute("DELETE FROM lockouts WHERE reason = ?", [reason])

    def lockouts(self) -> dict[str, str]:
        return {r["reason"]: r["detail"] for r in self._read("SELECT reason, detail FROM lockouts ORDER BY reason")}

    # ------------------------------------------------------------------ outbox
    def outbox(self, state: str = "pending", limit: int = 100) -> list[dict[str, Any]]:
        rows = self._read("SELECT * FROM outbox WHERE state = ? ORDER BY created_wall_ms, rowid LIMIT ?",
                          [state, limit])
        return [{**r, "payload": json.loads(r["payload"])} for r in rows]

    def outbox_depth(self, state: str = "pending") -> int:
        """How many reports are in ``state`` (pending by default; "dead" for dead letters)."""
        return self._read("SELECT COUNT(*) AS n FROM outbox WHERE state = ?", [state])[0]["n"]

    def mark_sent(self, event_ids: list[str]) -> None:
        with self._tx("mark reports sent") as db:
            now = self._wall()
            for eid in event_ids:
                db.execute("UPDATE outbox SET state = 'sent', done_wall_ms = ?, attempts = attempts + 1 "
                           "WHERE event_id = ? AND state = 'pending'", [now, eid])

    def mark_dead(self, event_id: str, error: str) -> None:
        """Dead-letter a report the cloud refused; the fact itself is logged and reported (an operator alarm),
        except for a refused report of a dead letter (no loop)."""
        with self._tx("dead-letter a report") as db:
            row = db.execute("SELECT kind FROM outbox WHERE event_id = ? AND state = 'pending'", [event_id]).fetchone()
            if row is None:
                return
            db.execute("UPDATE outbox SET state = 'dead', last_error = ?, done_wall_ms = ?, attempts = attempts + 1"
                       " WHERE event_id = ? AND state = 'pending'", [error, self._wall(), event_id])
            detail = K.REPORT_DEAD_LETTERED.detail_of(event_id=event_id, kind=row[0], error=error[:500])
            self._event(db, K.REPORT_DEAD_LETTERED, detail)
            if row[0] != K.REPORT_DEAD_LETTERED and self.boot_id > 0:
                self._queue(db, K.REPORT_DEAD_LETTERED, {"detail": detail})

    # ------------------------------------------------------------------ storage health
    def probe_write(self, min_free_bytes: int = MIN_FREE_BYTES) -> None:
        """A real test that the ledger can take writes again (after a storage fault): enough free space on its
        filesystem, and a write that needs new pages, committed and removed.

        :raises LedgerError: with the reason (free space, or SQLite's error).
        """
        try:
            st = os.statvfs(self.path.parent)
        except OSError as e:
            raise LedgerError(f"ledger {self.path}: cannot check free space: {e.strerror}") from e
        free = st.f_bavail * st.f_frsize
        if free < min_free_bytes:
            raise LedgerError(f"ledger {self.path}: only {free // 1024} KiB free on its disk (at least "
                              f"{min_free_bytes // 1024 // 1024} MiB needed): free some space first")
        with self._tx("test a write") as db:
            db.execute("INSERT INTO write_probe (filler) VALUES (zeroblob(?))", [PROBE_BYTES])
        with self._tx("remove the write test") as db:
            db.execute("DELETE FROM write_probe")

    def retry_dead(self, event_id: str) -> bool:
        """Send a dead letter again (a technician's decision, e.g. after the cloud fixed its side)."""
        with self._tx("retry a dead letter") as db:
            n = db.execute("UPDATE outbox SET state = 'pending', next_attempt_wall_ms = 0, done_wall_ms = NULL "
                           "WHERE event_id = ? AND state = 'dead'", [event_id]).rowcount
            if n:
                self._event(db, K.DEAD_LETTER_RETRIED, K.DEAD_LETTER_RETRIED.detail_of(event_id=event_id))
            return n == 1

    def discard_dead(self, event_id: str, actor: str) -> bool:
        """Give up on a dead letter: the row leaves the outbox, its whole content stays in the event log."""
        with self._tx("discard a dead letter") as db:
            row = db.execute("SELECT kind, payload, last_error FROM outbox WHERE event_id = ? AND state = 'dead'",
                             [event_id]).fetchone()
            if row is None:
                return False
            self._event(db, K.DEAD_LETTER_DISCARDED, K.DEAD_LETTER_DISCARDED.detail_of(
                event_id=event_id, kind=row[0], payload=json.loads(row[1]), error=row[2], actor=actor))
            db.execute("DELETE FROM outbox WHERE event_id = ?", [event_id])
            return True

    # ------------------------------------------------------------------ local admin commands
    # ------------------------------------------------------------------ settings
    def setting(self, key: str, default: Any = None) -> Any:
        rows = self._read("SELECT value FROM settings WHERE key = ?", [key])
        return json.loads(rows[0]["value"]) if rows else default

    def set_setting(self, key: str, value: Any) -> None:
        with self._tx("setting") as db:
            db.execute("INSERT INTO settings (key, value, updated_wall_ms) VALUES (?, ?, ?) ON CONFLICT (key) "
                       "DO UPDATE SET value = excluded.value, updated_wall_ms = excluded.updated_wall_ms",
                       [key, json.dumps(value), self._wall()])

    def queue_admin_command(self, command: str, args: dict[str, Any]) -> int:
        with self._tx("queue an admin command") as db:
            cur = db.execute("INSERT INTO admin_commands (command, args, created_wall_ms) VALUES (?, ?, ?)",
                             [command, json.dumps(args), self._wall()])
            return cur.lastrowid

    def take_admin_commands(self) -> list[dict[str, Any]]:
        with self._tx("take admin commands") as db:
            rows = db.execute("SELECT id, command, args FROM admin_commands WHERE taken_wall_ms IS NULL "
                              "ORDER BY id").fetchall()
            if rows:
                db.execute("UPDATE admin_commands SET taken_wall_ms = ? WHERE id <= ? AND taken_wall_ms IS NULL",
                           [self._wall(), rows[-1][0]])
        return [{"id": i, "command": c, "args": json.loads(a)} for i, c, a in rows]

    # ------------------------------------------------------------------ retention
    def prune(self, *, event_log_max_rows: int, retention_days: int) -> dict[str, int]:
        """Keep the database bounded: the newest ``event_log_max_rows`` events; reported sessions,
        their checkpoints and sent reports for ``retention_days``. Pending and dead-lettered reports
        and unreported sessions are never pruned."""
        cutoff = self._wall() - retention_days * 86_400_000
        with self._tx("prune old rows") as db:
            n_events = db.execute("""DELETE FROM events WHERE id <= (SELECT id FROM events ORDER BY id DESC
                LIMIT 1 OFFSET ?)""", [event_log_max_rows]).rowcount
            old = """SELECT s.session_id FROM sessions s JOIN outbox o ON o.event_id = s.report_event_id
                WHERE s.state = 'ended' AND o.state = 'sent' AND s.ended_wall_ms < ?"""
            n_cps = db.execute(f"DELETE FROM checkpoints WHERE session_id IN ({old})", [cutoff]).rowcount
            n_sessions = db.execute(f"DELETE FROM sessions WHERE session_id IN ({old})", [cutoff]).rowcount
            n_sent = db.execute("DELETE FROM outbox WHERE state = 'sent' AND done_wall_ms < ?", [cutoff]).rowcount
            db.execute("DELETE FROM admin_commands WHERE taken_wall_ms < ?", [cutoff])
        return {"events": n_events, "checkpoints": n_cps, "sessions": n_sessions, "sent_reports": n_sent}
