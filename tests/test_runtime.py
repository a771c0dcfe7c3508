"""The core thread with simulated hardware and a real ledger: fail-safe paths end with the valve closed."""

import threading
import time

from hal.base import SystemClock
from hal.machine import simulated_config, simulated_dispenser
from kiosk.config import Config
from kiosk.events import GrantReceived, LinkChanged, State, StopPressed
from kiosk.ledger import Ledger
from kiosk.runtime import STORAGE_LOCKOUT
from tests.core_harness import grant
from tests.util import wait_until


class Machine:
    def __init__(self, tmp_path, **cfg_sections):
        sections = {"paths": {"data_dir": str(tmp_path)}, "machine": {"id": "M1"},
                    "flow": {"overrun_window_ms": 200, "sample_interval_ms": 5}}
        for k, v in cfg_sections.items():
            sections.setdefault(k, {}).update(v)
        self.cfg = simulated_config(Config().replace(**sections))
        self.clock = SystemClock()
        self.hw, self.rt, self.report = simulated_dispenser(self.cfg, self.clock, tmp_path / "sim")
        self.valve, self.meter, self.world = self.hw.valve, self.hw.meter, self.hw.world
        self.thread = threading.Thread(target=self.rt.run, daemon=True)
        self.valve_opened_at_least_once = False
        self.valve.on_change(self._seen)

    def _seen(self, opening):
        self.valve_opened_at_least_once |= opening

    def __enter__(self):
        self.thread.start()
        self.hw.start()
        self.rt.post(LinkChanged(True))
        assert wait_until(lambda: self.rt.snapshot.state is not State.OFFLINE or self.rt.core.lockouts)
        return self

    def __exit__(self, *exc):
        self.rt.request_stop()
        assert self.rt.wait_stopped(5)
        assert not self.valve.is_open
        self.hw.close()
        if self.rt.ledger is not None:
            self.rt.ledger.close()

    def grant(self, sid="s1", **kw):
        g = grant(sid, expires_at_ms=self.clock.monotonic_ms() + 30_000, **kw)
        self.rt.post(GrantReceived(g))


def test_a_session_runs_end_to_end(tmp_path):
    with Machine(tmp_path) as m:
        m.grant()
        assert wait_until(lambda: m.valve.is_open)
        assert wait_until(lambda: m.rt.snapshot.volume_ml > 50)
        m.rt.post(StopPressed())
        assert wait_until(lambda: m.rt.snapshot.state is State.RECEIPT)
        assert not m.valve.is_open
        receipt = m.rt.snapshot.receipt
        ledger = m.rt.ledger
        s = ledger.session("s1")
        assert s["state"] == "ended" and s["end_reason"] == "stop_button"
        assert s["billed_pulses"] == receipt.billed_pulses and s["cost_fen"] == receipt.cost_fen
        assert len(ledger.checkpoints("s1")) >= 2
        assert [r["payload"]["session_id"] for r in ledger.outbox() if r["kind"] == "session_ended"] == ["s1"]


def test_the_hardware_limit_closes_the_valve_on_the_credit_pulse(tmp_path):
    with Machine(tmp_path) as m:
        m.grant(credit_limit_fen=20, price_fen_per_l=200)         # 100 ml
        assert wait_until(lambda: m.rt.snapshot.state is State.RECEIPT)
        r = m.rt.snapshot.receipt
        assert r.reason == "credit_exhausted" and r.cost_fen == 20
        assert r.billed_pulses == m.rt.core.settings.calibration.max_pulses_for_credit(20, 200)


def test_a_session_row_that_cannot_be_written_never_opens_the_valve(tmp_path):
    with Machine(tmp_path) as m:
        m.rt.ledger.db.execute("""CREATE TRIGGER full BEFORE INSERT ON sessions
                                  BEGIN SELECT RAISE(ABORT, 'database or disk full'); END""")
        m.grant()
        assert wait_until(lambda: STORAGE_LOCKOUT in m.rt.core.lockouts)
        time.sleep(0.1)
        assert not m.valve_opened_at_least_once
        assert m.rt.snapshot.state is State.OUT_OF_SERVICE
        assert "disk is full" in m.rt.core.lockouts[STORAGE_LOCKOUT]


def test_a_full_disk_mid_session_closes_the_valve(tmp_path):
    with Machine(tmp_path, flow={"checkpoint_interval_ms": 10}) as m:
        m.grant()
        assert wait_until(lambda: m.valve.is_open)
        db = m.rt.ledger.db
        pages = db.execute("PRAGMA page_count").fetchone()[0]
        db.execute(f"PRAGMA max_page_count = {pages}")           # SQLite's own SQLITE_FULL from here on
        assert wait_until(lambda: STORAGE_LOCKOUT in m.rt.core.lockouts, 20)
        assert not m.valve.is_open
        # the snapshot is published after the core has handled the fault: wait for it, do not race it
        assert wait_until(lambda: m.rt.snapshot.state in (State.OUT_OF_SERVICE, State.RECEIPT, State.SETTLING))


def test_the_storage_lockout_clears_once_the_disk_works_again(tmp_path):
    from kiosk.events import ClearLockout
    with Machine(tmp_path) as m:
        db = m.rt.ledger.db
        db.execute("CREATE TRIGGER full BEFORE INSERT ON checkpoints BEGIN SELECT RAISE(ABORT, 'disk I/O error'); END")
        m.grant()
        assert wait_until(lambda: STORAGE_LOCKOUT in m.rt.core.lockouts, 10)
        assert not m.valve.is_open
        db.execute("DROP TRIGGER full")
        m.rt.post(ClearLockout(STORAGE_LOCKOUT))
        assert wait_until(lambda: m.rt.snapshot.state in (State.IDLE, State.RECEIPT) and not m.rt.core.lockouts)
        assert wait_until(lambda: m.rt.ledger.sessions("open") == [])   # the interrupted session was closed
        assert m.rt.ledger_ok
        m.grant("s2")
        assert wait_until(lambda: m.valve.is_open)


def test_an_exception_in_the_core_closes_the_valve_and_locks_out(tmp_path):
    with Machine(tmp_path) as m:
        m.grant()
        assert wait_until(lambda: m.valve.is_open)
        m.rt.post(object())                                      # the core raises on an unknown event
        assert wait_until(lambda: "fault:internal" in m.rt.core.lockouts)
        assert not m.valve.is_open
        assert wait_until(lambda: m.rt.ledger.session("s1")["state"] == "ended")
        assert m.rt.ledger.session("s1")["end_reason"] == "fault"


def test_a_valve_open_outside_a_session_is_closed(tmp_path):
    with Machine(tmp_path) as m:
        m.valve.open()                                           # a stray command, a wiring fault
        assert wait_until(lambda: not m.valve.is_open, 1)


def test_ghost_flow_locks_out_and_the_cli_command_clears_it(tmp_path):
    with Machine(tmp_path, leak={"ghost_volume_ml": 20}) as m:
        m.world.water.set_ghost_flow(3_000)                            # a stuck valve: 50 ml/s with the valve closed
        assert wait_until(lambda: m.rt.snapshot.state is State.OUT_OF_SERVICE)
        m.world.water.set_ghost_flow(0)
        assert m.rt.ledger.lockouts().keys() == {"ghost_flow"}
        admin = Ledger.open(m.cfg.db_path, machine_id="M1", wall_clock=m.clock.wall_ms, new_boot=False)
        admin.queue_admin_command("clear_lockout", {"reason": "ghost_flow", "actor": "tech-7"})
        admin.close()
        assert wait_until(lambda: m.rt.snapshot.state is State.IDLE, 3)
        [cleared] = m.rt.ledger.events("lockout_cleared")
        assert cleared["detail"]["actor"] == "tech-7"


def test_a_corrupt_ledger_starts_out_of_service_with_the_valve_closed(tmp_path):
    (tmp_path / "ledger.db").write_bytes(b"garbage" * 1000)
    with Machine(tmp_path) as m:
        assert m.report.ledger_error and "corrupt" in m.report.ledger_error
        assert m.rt.snapshot.state is State.OUT_OF_SERVICE
        m.grant()
        time.sleep(0.1)
        assert not m.valve_opened_at_least_once
        assert m.rt.snapshot.last_rejection == "out_of_service"


def test_lockouts_and_seen_sessions_survive_a_restart(tmp_path):
    with Machine(tmp_path) as m:
        m.grant()
        assert wait_until(lambda: m.valve.is_open)
        m.rt.post(StopPressed())
        assert wait_until(lambda: m.rt.snapshot.state is State.RECEIPT)
        m.world.water.set_ghost_flow(6_000)
        assert wait_until(lambda: "ghost_flow" in m.rt.core.lockouts, 10)
        m.world.water.set_ghost_flow(0)
    with Machine(tmp_path) as m2:
        assert m2.rt.snapshot.state is State.OUT_OF_SERVICE
        from kiosk.events import ClearLockout, ClearSource
        m2.rt.post(ClearLockout("ghost_flow", ClearSource.REMOTE))
        assert wait_until(lambda: m2.rt.snapshot.state is State.IDLE)
        m2.grant()                                                # the same session id again
        assert wait_until(lambda: m2.rt.snapshot.last_rejection == "duplicate_session")
        assert not m2.valve_opened_at_least_once




def test_the_physical_stop_button_ends_the_session(tmp_path):
    with Machine(tmp_path) as m:
        m.grant()
        assert wait_until(lambda: m.rt.snapshot.volume_ml > 20)
        m.world.press_stop()
        assert not m.valve.is_open                 # closed in the edge callback, before the core ran
        assert wait_until(lambda: m.rt.snapshot.state is State.RECEIPT)
        assert m.rt.snapshot.receipt.reason == "stop_button"


def test_a_wet_leak_sensor_stops_the_pour_and_needs_a_technician(tmp_path):
    from kiosk.events import ClearLockout, ClearSource
    with Machine(tmp_path) as m:
        m.grant()
        assert wait_until(lambda: m.valve.is_open)
        m.world.set_leak(True)
        assert wait_until(lambda: not m.valve.is_open)
        assert wait_until(lambda: m.rt.ledger.session("s1")["state"] == "ended")
        assert m.rt.ledger.session("s1")["end_reason"] == "leak"
        m.world.set_leak(False)                    # dry again: still locked out
        m.rt.post(ClearLockout("leak_sensor", ClearSource.REMOTE))
        time.sleep(0.1)
        assert "leak_sensor" in m.rt.core.lockouts
        m.rt.post(ClearLockout("leak_sensor", ClearSource.SITE, actor="tech"))
        assert wait_until(lambda: not m.rt.core.lockouts)


def test_low_water_and_sensor_readings_reach_the_core(tmp_path):
    with Machine(tmp_path, sensors={"read_interval_ms": 1_000}) as m:
        assert wait_until(lambda: m.rt.snapshot.temp_c == 12.0)
        assert wait_until(lambda: m.rt.snapshot.tds_measured and 75 <= m.rt.snapshot.tds_ppm <= 85)
        m.world.thermometer.unplug()
        assert wait_until(lambda: m.rt.snapshot.temp_c is None, 5)
        assert m.rt.snapshot.state is State.IDLE   # an unknown temperature does not stop sales
        m.world.set_low_water(True)
        assert wait_until(lambda: m.rt.snapshot.state is State.OUT_OF_SERVICE)
        m.world.set_low_water(False)
        assert wait_until(lambda: m.rt.snapshot.state is State.IDLE)


def test_a_failing_listener_does_not_stop_the_core(tmp_path):
    def broken(snapshot, actions):
        raise RuntimeError("observer bug")

    with Machine(tmp_path) as m:
        m.rt.listeners.append(broken)
        m.grant()
        assert wait_until(lambda: m.valve.is_open)
        m.world.press_stop()
        assert wait_until(lambda: m.rt.snapshot.state is State.RECEIPT)
        assert m.thread.is_alive()
