"""The on-device ledger on a real SQLite file."""

import json
import os
import sqlite3

import pytest

from kiosk.events import Checkpoint, SessionEnded, SessionRecord, SessionStarted
from kiosk.ledger import Ledger, LedgerError


class WallClock:
    def __init__(self, t: int = 1_764_000_000_000) -> None:
        self.t = t

    def __call__(self) -> int:
        return self.t


@pytest.fixture
def wall():
    return WallClock()


def open_ledger(path, wall, **kw):
    return Ledger.open(path / "ledger.db", machine_id="M1", wall_clock=wall, **kw)


def started(sid="s1", mono=1_000, temp=11.0):
    return SessionStarted(session_id=sid, user_ref="u1", price_fen_per_l=200, credit_limit_fen=1_000,
                          max_volume_ml=5_000, max_duration_ms=300_000, max_idle_ms=15_000, limit_pulses=2_250,
                          milli_pulses_per_litre=450_000, min_dispense_ml=10, started_mono_ms=mono, temp_c=temp)


def record(sid="s1", billed=450, start=1_000, closed=11_000, reason="stop_button"):
    return SessionRecord(session_id=sid, user_ref="u1", reason=reason, started_mono_ms=start, closed_mono_ms=closed,
                         ended_mono_ms=closed + 1_000, price_fen_per_l=200, credit_limit_fen=1_000,
                         milli_pulses_per_litre=450_000, billed_pulses=billed, overrun_pulses=3, volume_ml=1_000,
                         cost_fen=200, below_minimum=False, temp_start_c=11.0, temp_end_c=11.5)


def test_durability_settings(tmp_path, wall):
    led = open_ledger(tmp_path, wall)
    assert led.db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert led.db.execute("PRAGMA synchronous").fetchone()[0] == 2          # FULL
    applied = [m.name for m in __import__("kiosk.ledger").ledger.migrations.applied(led.db)]
    assert applied == ["m001_initial", "m002_settings", "m003_ledger_id"]


def test_a_session_from_start_to_report(tmp_path, wall):
    led = open_ledger(tmp_path, wall)
    led.start_session(started())
    for i in range(1, 11):
        wall.t += 250
        led.checkpoint(Checkpoint("s1", 1_000 + i * 250, i * 20, 0, 11.0 + i / 10, True, totalizer_pulses=20))
    wall.t += 10
    led.checkpoint(Checkpoint("s1", 3_600, 210, 0, 12.0, False, totalizer_pulses=10, closing_reason="stop_button"))
    event_id = led.end_session(SessionEnded(record(billed=210, closed=3_600), totalizer_pulses=3))
    assert event_id == f"{led.ledger_id}-{led.boot_id}-1" and len(led.ledger_id) == 16
    s = led.session("s1")
    assert (s["state"], s["end_reason"], s["billed_pulses"], s["cost_fen"], s["report_event_id"]) == \
        ("ended", "stop_button", 210, 200, event_id)
    [row] = led.outbox()
    p = row["payload"]
    assert row["event_id"] == p["event_id"] == event_id and p["kind"] == "session_ended"
    assert p["machine_id"] == "M1" and p["session_id"] == "s1" and p["recovered"] is False
    assert p["started_at"].endswith("Z") and p["duration_ms"] == 2_600
    # about one sample a second, plus the closing checkpoint, with valve state and temperature
    assert [pt[0] for pt in p["flow_series"]] == [250, 1_250, 2_250, 2_600]
    assert p["flow_series"][-1] == [2_600, 210, 0, 12.0, False]
    assert p["valve_events"] == [[0, "open"], [2_600, "close", "stop_button"]]
    assert led.totalizer_pulses() == 213


def test_a_session_ends_exactly_once(tmp_path, wall):
    led = open_ledger(tmp_path, wall)
    led.start_session(started())
    led.end_session(SessionEnded(record()))
    with pytest.raises(LedgerError, match="already ended"):
        led.end_session(SessionEnded(record()))
    with pytest.raises(LedgerError, match="never started"):
        led.end_session(SessionEnded(record("nope")))
    assert len(led.outbox()) == 1
    with pytest.raises(LedgerError, match="UNIQUE"):
        led.start_session(started())          # a replayed session id cannot start again


def test_an_ended_session_cannot_be_changed(tmp_path, wall):
    led = open_ledger(tmp_path, wall)
    led.start_session(started())
    led.end_session(SessionEnded(record()))
    with pytest.raises(sqlite3.IntegrityError, match="cannot change"):
        led.db.execute("UPDATE sessions SET cost_fen = 0 WHERE session_id = 's1'")


def test_the_end_and_its_report_are_one_transaction(tmp_path, wall):
    led = open_ledger(tmp_path, wall)
    led.start_session(started())
    led.db.execute("""CREATE TRIGGER fail_outbox BEFORE INSERT ON outbox
                      BEGIN SELECT RAISE(ABORT, 'disk full simulation'); END""")
    with pytest.raises(LedgerError):
        led.end_session(SessionEnded(record()))
    assert led.session("s1")["state"] == "open"          # neither half was written
    assert led.outbox() == []


def test_boot_recovery_bills_from_the_last_checkpoint(tmp_path, wall):
    led = open_ledger(tmp_path, wall)
    led.start_session(started("crashed"))
    led.checkpoint(Checkpoint("crashed", 1_250, 100, 0, 11.0, True))
    led.checkpoint(Checkpoint("crashed", 1_500, 225, 0, 11.2, True))     # 500 ml: 100 fen
    led.start_session(started("closing", mono=9_000))
    led.checkpoint(Checkpoint("closing", 9_900, 90, 0, 11.2, False, closing_reason="stop_button"))
    led.start_session(started("nothing", mono=12_000))
    led.db.close()                                                        # power loss

    wall.t += 60_000
    led2 = open_ledger(tmp_path, wall)
    assert led2.boot_id == led.boot_id + 1
    recovered = {r.session_id: r for r in led2.recover_open_sessions()}
    assert recovered["crashed"].reason == "power_loss"
    assert (recovered["crashed"].billed_pulses, recovered["crashed"].cost_fen) == (225, 100)
    assert recovered["closing"].reason == "stop_button"       # its valve had closed: the real reason is kept
    assert recovered["nothing"].cost_fen == 0 and recovered["nothing"].below_minimum
    assert led2.sessions("open") == []
    reports = {r["payload"]["session_id"]: r["payload"] for r in led2.outbox()}
    assert reports["crashed"]["recovered"] is True and reports["crashed"]["reason"] == "power_loss"
    assert [e["detail"]["session_id"] for e in led2.events("session_recovered")] == ["crashed", "closing", "nothing"]
    assert led2.recover_open_sessions() == []                  # idempotent


def test_event_ids_are_unique_across_boots(tmp_path, wall):
    ids = set()
    for _ in range(3):
        led = open_ledger(tmp_path, wall)
        for _ in range(5):
            ids.add(led.record_event("x", {}, report=True))
        led.close()
    assert len(ids) == 15


def test_an_admin_handle_cannot_queue_reports(tmp_path, wall):
    open_ledger(tmp_path, wall).close()
    admin = open_ledger(tmp_path, wall, new_boot=False)
    with pytest.raises(LedgerError, match="administrative"):
        admin.record_event("x", {}, report=True)
    admin.queue_admin_command("clear_lockout", {"reason": "ghost_flow"})
    running = open_ledger(tmp_path, wall)
    assert [c["command"] for c in running.take_admin_commands()] == ["clear_lockout"]
    assert running.take_admin_commands() == []


def test_the_totalizer_cannot_be_reset(tmp_path, wall):
    led = open_ledger(tmp_path, wall)
    led.add_to_totalizer(1_000)
    with pytest.raises(sqlite3.IntegrityError, match="cannot be reduced"):
        led.db.execute("UPDATE totalizer SET pulses = 0")
    with pytest.raises(sqlite3.IntegrityError, match="cannot be deleted"):
        led.db.execute("DELETE FROM totalizer")
    with pytest.raises(LedgerError):
        led.add_to_totalizer(-5)
    assert led.totalizer_pulses() == 1_000


def test_lockouts_survive_a_restart(tmp_path, wall):
    led = open_ledger(tmp_path, wall)
    led.set_lockout("ghost_flow", True, "55 ml")
    led.set_lockout("operator", True, "x")
    led.set_lockout("operator", False)
    led.close()
    assert open_ledger(tmp_path, wall).lockouts() == {"ghost_flow": "55 ml"}


def test_retention_keeps_the_database_bounded(tmp_path, wall):
    led = open_ledger(tmp_path, wall)
    for i in range(3_000):
        led.record_event("tick", {"i": i})
    led.start_session(started("old"))
    led.checkpoint(Checkpoint("old", 1_100, 10, 0, None, True))
    eid = led.end_session(SessionEnded(record("old")))
    led.mark_sent([eid])
    led.start_session(started("unsent"))
    led.end_session(SessionEnded(record("unsent")))
    wall.t += 100 * 86_400_000
    pruned = led.prune(event_log_max_rows=1_000, retention_days=90)
    assert pruned["sessions"] == 1 and pruned["checkpoints"] == 1 and pruned["sent_reports"] == 1
    assert len(led.events(limit=10_000)) == 1_000
    assert led.events(limit=1)[0]["detail"] == {"i": 2_999}
    assert led.session("old") is None
    assert led.session("unsent") is not None               # an unreported session is never pruned
    assert led.outbox_depth() == 1


def test_dead_letters_stay_visible(tmp_path, wall):
    led = open_ledger(tmp_path, wall)
    eid = led.record_event("x", {}, report=True)
    led.mark_dead(eid, "400 unknown session")
    # the dead letter itself is reported (an operator alarm), once: its own refusal would not loop
    assert [(r["kind"], r["payload"]["detail"]["event_id"]) for r in led.outbox()] == [("report_dead_lettered", eid)]
    alarm = led.outbox()[0]["event_id"]
    led.mark_dead(alarm, "400 refused too")
    assert led.outbox_depth() == 0
    assert [(r["event_id"], r["last_error"]) for r in led.outbox("dead")] == [(eid, "400 unknown session"),
                                                                             (alarm, "400 refused too")]


def test_a_corrupt_file_gives_a_clear_error(tmp_path, wall):
    (tmp_path / "ledger.db").write_bytes(b"this is not a database" * 100)
    with pytest.raises(LedgerError, match="corrupt or not a database"):
        open_ledger(tmp_path, wall)


def test_a_damaged_page_gives_a_clear_error(tmp_path, wall):
    led = open_ledger(tmp_path, wall)
    for i in range(2_000):
        led.record_event("filler", {"i": i, "pad": "x" * 200})
    led.db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    led.close()
    path = tmp_path / "ledger.db"
    data = bytearray(path.read_bytes())
    data[8_192:40_960] = os.urandom(32_768)                 # scribble over pages in the middle
    path.write_bytes(bytes(data))
    with pytest.raises(LedgerError, match="corrupt"):
        open_ledger(tmp_path, wall)


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write read-only files")
def test_a_read_only_file_gives_a_clear_error(tmp_path, wall):
    open_ledger(tmp_path, wall).close()
    os.chmod(tmp_path, 0o500)
    try:
        with pytest.raises(LedgerError, match=r"read-only|cannot open"):
            open_ledger(tmp_path, wall)
    finally:
        os.chmod(tmp_path, 0o700)


def test_an_unwritable_folder_gives_a_clear_error(tmp_path, wall):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(LedgerError, match="cannot create its folder"):
        Ledger.open(blocker / "sub" / "ledger.db", machine_id="M1", wall_clock=wall)


def test_report_payloads_are_compact_json(tmp_path, wall):
    led = open_ledger(tmp_path, wall)
    led.record_event("lockout", {"reason": "漏水"}, report=True)
    raw = led.db.execute("SELECT payload FROM outbox").fetchone()[0]
    assert "漏水" in raw and ", " not in raw
    assert json.loads(raw)["detail"] == {"reason": "漏水"}
