"""Maintenance mode in the pure core (issue 8): technicians' pours are metered, logged and never billed,
close at their target or hard maximum, never count as ghost flow; calibration changes only in maintenance;
maintenance ends by itself when untouched. Plus the PIN lockout and the calibration arithmetic."""

import pytest

from kiosk import calibration as calib
from kiosk import pin as pins
from kiosk.events import (
    LOCKOUT_GHOST_FLOW,
    LOCKOUT_LEAK_SENSOR,
    CloseValve,
    EnterMaintenance,
    ExitMaintenance,
    Fault,
    MaintenanceActivity,
    OpenValve,
    RecordEvent,
    SaveCalibration,
    SessionEnded,
    SetCalibration,
    Shutdown,
    TechPour,
    TechStop,
)
from tests.core_harness import Harness


def events(h, kind):
    return [a.detail for a in h.log if isinstance(a, RecordEvent) and a.kind == kind]


def maintenance(**kw) -> Harness:
    h = Harness(**kw)
    h.send(EnterMaintenance(actor="tech"))
    assert h.state == "maintenance"
    return h


def test_a_flush_to_a_target_volume_is_metered_and_never_billed():
    h = maintenance()
    acts = h.send(TechPour("flush", target_ml=1_000, actor="tech"))
    assert [type(a) for a in acts] == [RecordEvent, OpenValve]            # logged before the valve opens
    assert acts[1].close_at_total_pulses == 450                           # hardware limit armed too
    assert h.core.valve_should_be_open and h.core.snapshot().tech_active
    h.flow(12)                                                            # 40 pulses/s: the target at 11.25 s
    assert isinstance(h.log[-1], CloseValve) or any(isinstance(a, CloseValve) for a in h.log)
    assert not h.core.valve_should_be_open
    h.tick(1_100)                                                         # overrun window
    [done] = events(h, "tech_pour")
    assert done["purpose"] == "flush" and done["reason"] == "target" and done["billed"] is False
    assert done["pulses"] >= 450 and done["volume_ml"] >= 1_000
    assert h.ended() == [] and events(h, "lockout") == []                 # no bill, no ghost-flow alarm
    last = h.core.snapshot().tech_last
    assert last.reason == "target" and last.pulses == done["pulses"]


def test_leaving_maintenance_mid_pour_without_an_overrun_window_logs_the_pour_once():
    """With no overrun window closing the pour finishes it at once; leaving maintenance then must not finish
    it a second time (once an internal fault)."""
    h = maintenance(overrun_window_ms=0)
    h.send(TechPour("flush", target_ml=2_000, actor="tech"))
    h.flow(2)
    acts = h.send(ExitMaintenance("tech"))
    assert any(isinstance(a, CloseValve) for a in acts) and not h.core.valve_should_be_open
    [done] = events(h, "tech_pour")
    assert done["reason"] == "exit" and done["pulses"] > 0
    assert h.state == "idle" and h.core.lockouts == {}


def test_a_pour_stops_at_its_hard_maximum_time():
    h = maintenance(tech_max_ms=5_000)
    h.send(TechPour("valve_test", target_ml=None, max_ms=60_000))         # asks for more than the machine allows
    h.flow(6)
    h.tick(1_100)
    [done] = events(h, "tech_pour")
    assert done["reason"] == "max_time" and 4_900 <= done["duration_ms"] <= 5_100


def test_a_pour_without_a_target_stops_at_the_hard_maximum_volume():
    h = maintenance(tech_max_ml=500)
    acts = h.send(TechPour("flush"))
    assert acts[1].close_at_total_pulses == 225
    h.flow(7)
    h.tick(1_100)
    assert events(h, "tech_pour")[0]["reason"] == "max_volume"


def test_stop_exit_fault_and_shutdown_all_close_the_valve():
    for stopper in (TechStop(), ExitMaintenance(actor="tech"), Fault("flow_meter", "x"), Shutdown("sigterm")):
        h = maintenance()
        h.send(TechPour("flush", target_ml=2_000))
        h.flow(1)
        acts = h.send(stopper)
        assert any(isinstance(a, CloseValve) for a in acts), stopper
        assert not h.core.valve_should_be_open, stopper
        h.tick(1_100)
        assert len(events(h, "tech_pour")) == 1, stopper


@pytest.mark.parametrize(("setup", "why"), [
    ("not_maintenance", "not in maintenance"),
    ("leak", "leak sensor"),
    ("busy", "already running"),
])
def test_pours_are_refused_when_unsafe(setup, why):
    h = Harness(lockouts={LOCKOUT_LEAK_SENSOR: "wet"} if setup == "leak" else None)
    if setup != "not_maintenance":
        h.send(EnterMaintenance(actor="tech"))
    if setup == "busy":
        h.send(TechPour("flush", target_ml=500))
    acts = h.send(TechPour("flush", target_ml=500))
    assert not any(isinstance(a, OpenValve) for a in acts)
    assert why in events(h, "tech_pour_refused")[0]["why"]


def test_maintenance_is_refused_during_a_paid_session_and_grants_during_maintenance():
    h = Harness()
    h.start()
    h.pour(10)
    h.send(EnterMaintenance(actor="tech"))
    assert h.state == "dispensing" and events(h, "maintenance_refused")
    h2 = maintenance()
    h2.start(session_id="s2")
    assert h2.core.snapshot().last_rejection == "maintenance" and not h2.core.valve_should_be_open


def test_ghost_flow_still_counts_when_no_pour_is_running():
    h = maintenance()
    h.send(TechPour("flush", target_ml=200))
    h.flow(3)
    h.tick(1_100)
    h.pour(200, 2_000)                          # water with the valve shut after the pour: a leak
    assert LOCKOUT_GHOST_FLOW in h.core.lockouts


def test_calibration_changes_only_in_maintenance_and_is_saved():
    h = Harness()
    assert events(h, "calibration_changed") == [] and not [a for a in h.send(SetCalibration(480_000))
                                                          if isinstance(a, SaveCalibration)]
    h.send(EnterMaintenance(actor="tech"))
    acts = h.send(SetCalibration(486_000, actor="tech", pours=((486, 1000),)))
    assert SaveCalibration(486_000) in acts
    assert events(h, "calibration_changed")[0] == {"from": 450_000, "to": 486_000, "actor": "tech",
                                                  "pours": [[486, 1000]]}
    assert h.core.snapshot().milli_pulses_per_litre == 486_000
    assert "outside" in next(a for a in h.send(SetCalibration(5)) if isinstance(a, RecordEvent)).detail["why"]
    h.send(ExitMaintenance())
    h.start()
    h.pour(486)
    h.send(__import__("kiosk.events").events.StopPressed())
    h.tick(1_100)
    [end] = h.ended()
    assert isinstance(end, SessionEnded) and end.record.volume_ml == 1_000   # billed by the new factor


def test_maintenance_ends_by_itself_when_untouched():
    h = maintenance(maintenance_timeout_ms=60_000)
    h.tick(40_000)
    h.send(MaintenanceActivity())
    h.tick(40_000)
    assert h.state == "maintenance"
    h.tick(21_000)
    assert h.state == "idle" and events(h, "maintenance_exited")[-1]["actor"] == "inactivity"


# ---------------------------------------------------------------- PIN

def test_pin_hashes_are_salted_and_slow_and_verify():
    a, b = pins.hash_pin("482913"), pins.hash_pin("482913")
    assert a != b and a.startswith("scrypt$16384$8$1$") and "482913" not in a
    assert pins.verify_pin(a, "482913") and not pins.verify_pin(a, "482914") and not pins.verify_pin("junk", "1")


@pytest.mark.parametrize("bad", ["12345", "123456789", "12a456", "111111", "123456", "987654"])
def test_easy_or_malformed_pins_are_refused(bad):
    with pytest.raises(pins.PinError):
        pins.check_new_pin(bad)


def test_five_wrong_pins_lock_entry_for_a_growing_time():
    stored = pins.hash_pin("482913")
    state, now = pins.PinState(), 0
    for left in (4, 3, 2, 1):
        r = pins.attempt(stored, "000000", state, now)
        assert not r.ok and r.attempts_left == left
        state = r.state
    r = pins.attempt(stored, "000000", state, now)
    assert r.locked_for_ms == 60_000
    state = r.state
    assert pins.attempt(stored, "482913", state, now + 59_000).ok is False     # locked: not even checked
    for _ in range(5):
        r = pins.attempt(stored, "000000", r.state, now + 61_000)
    assert r.locked_for_ms == 120_000                                          # doubled
    ok = pins.attempt(stored, "482913", r.state, now + 61_000 + 120_001)
    assert ok.ok and ok.state == pins.PinState()


# ---------------------------------------------------------------- calibration arithmetic

def test_three_pours_give_the_averaged_factor_and_the_spread():
    pours = [calib.check_pour(p, ml) for p, ml in ((486, 1000), (490, 1008), (243, 499))]
    r = calib.compute(pours, 450_000)
    assert r.milli_pulses_per_litre == (486 + 490 + 243) * 1_000_000 // (1000 + 1008 + 499)
    assert 0 < r.spread_permille < 20 and r.change_permille == 80 and calib.acceptable(r) is None
    with pytest.raises(calib.CalibrationError, match="at least 3"):
        calib.compute(pours[:2], 450_000)
    wild = calib.compute([calib.check_pour(450, 1000), calib.check_pour(450, 1000), calib.check_pour(520, 1000)],
                         450_000)
    assert "disagree" in calib.acceptable(wild)
    for pulses, ml in ((0, 1000), (450, 50), (5, 1000)):
        with pytest.raises(calib.CalibrationError):
            calib.check_pour(pulses, ml)
