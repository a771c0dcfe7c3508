"""Long-lived collections stay within their stated bounds (README, "Bounded resources"): counted after many
events, never timed. bench/bench_soak.py measures the whole app; these catch a bound that goes missing."""

from __future__ import annotations

import pytest
from sqlalchemy import insert, select, update

from cloud import db as t
from cloud.db import Database
from cloud.devices.service import COMMAND_TTL_MS, Commands
from hal.gpio import GpioFlowMeter, GpioValve, Mcp3008Voltage
from hal.sim import PIN_STATES_KEPT, SimMcp3008
from sync.link import _keep_newest

DAY_MS = 86_400_000




def test_the_flow_meter_keeps_only_the_last_second_of_edges(factory):
    now = [0.0]
    valve = GpioValve(17, active_high=True, pin_factory=factory)
    meter = GpioFlowMeter(27, valve=valve, pin_factory=factory, clock=lambda: now[0])
    pin = factory.pin(27)
    for _ in range(20_000):                     # 20 s at 1 kHz: a long pour
        now[0] += 0.001
        pin.drive_low()
        pin.drive_high()
    assert meter.total_pulses() == 20_000
    assert len(meter._edges) <= 1_001           # the last second's, not every pulse of the machine's life
    assert meter.pulses_per_s() == pytest.approx(1_000, abs=2)


def test_simulated_spi_pins_keep_a_bounded_history(factory):
    adc = SimMcp3008(factory)
    v = Mcp3008Voltage(3, vref=3.3, pin_factory=factory)
    adc.volts[3] = 1.0
    for _ in range(40):                         # each conversion toggles the clock ~50 times
        v.voltage()
    for pin in (adc.clock_pin, adc.select_pin, factory.pin(10), factory.pin(9)):
        assert len(pin.states) <= PIN_STATES_KEPT


def test_keep_newest_forgets_the_oldest():
    table = {str(i): i for i in range(150)}
    _keep_newest(table, 100)
    assert list(table) == [str(i) for i in range(50, 150)]


def test_commands_are_pruned_after_their_retention_unless_still_waiting(tmp_path):
    db = Database(f"sqlite:///{tmp_path / 'cloud.db'}")
    db.create_all()
    now = 400 * DAY_MS
    with db.tx() as conn:
        conn.execute(insert(t.machines).values(machine_id="M-1", price_fen_per_l=200, max_volume_ml=2_000,
                                               max_duration_ms=120_000, max_idle_ms=30_000, max_credit_fen=2_000,
                                               min_dispense_ml=10, created_ms=0))
        old_acked = Commands.queue(conn, "M-1", "cancel", now - 8 * DAY_MS, session_id="s-1", reason="phone_stop")
        old_expired = Commands.queue(conn, "M-1", "cancel", now - 8 * DAY_MS, session_id="s-2", reason="phone_stop")
        recent = Commands.queue(conn, "M-1", "cancel", now - 6 * DAY_MS, session_id="s-3", reason="phone_stop")
        waiting = Commands.queue(conn, "M-1", "cancel", now - 8 * DAY_MS, ttl_ms=9 * DAY_MS, session_id="s-4",
                                 reason="phone_stop")
        conn.execute(update(t.commands).where(t.commands.c.command_id.in_([old_acked, recent]))
                     .values(acked_ms=now - 8 * DAY_MS + 100, ack_ok=True))
    assert Commands(db, now).prune(now, 7 * DAY_MS) == 2
    with db.read() as conn:
        left = {r[0] for r in conn.execute(select(t.commands.c.command_id))}
    assert left == {recent, waiting} and old_expired not in left
    assert COMMAND_TTL_MS < 7 * DAY_MS
    db.dispose()


def test_the_diagnostics_line_counts_native_memory_too(tmp_path, monkeypatch):
    """A soak's line says what grows outside Python's heap: SQLite's caches and malloc's free-but-held memory."""
    import json
    import sqlite3

    from kiosk.diag import Diagnostics
    monkeypatch.setenv("TAPSHARE_DIAG_FILE", str(tmp_path / "diag.jsonl"))
    diag = Diagnostics.from_env()
    diag.providers["core"] = lambda: {"seen_session_ids": 3}
    con = sqlite3.connect(tmp_path / "x.db")
    before = diag.figures()["native"]["sqlite_kb"]
    con.execute("CREATE TABLE t (x TEXT)")
    con.executemany("INSERT INTO t VALUES (?)", [("x" * 200,)] * 10_000)
    con.commit()
    diag.write_line()
    line = json.loads((tmp_path / "diag.jsonl").read_text())
    assert line["native"]["sqlite_kb"] >= before + 1_000          # its page cache filled (2 MB at most by default)
    assert line["native"]["malloc_in_use_kb"] > 0 and line["native"]["malloc_free_kb"] >= 0
    assert line["core"] == {"seen_session_ids": 3} and line["rss_kb"] > 0 and line["fds"] > 0
    con.close()
