"""The session state machine: every transition, every limit, every end reason."""

import itertools

import pytest

from kiosk.events import (
    LOCKOUT_GHOST_FLOW,
    LOCKOUT_LEAK_SENSOR,
    LOCKOUT_REMOTE,
    AddToTotalizer,
    CancelReceived,
    Checkpoint,
    ClearLockout,
    ClearSource,
    CloseValve,
    EnterMaintenance,
    ExitMaintenance,
    Fault,
    GrantReceived,
    LeakSensor,
    LinkChanged,
    OpenValve,
    PulseCount,
    ReceiptDismissed,
    RecordEvent,
    SessionEnded,
    SessionStarted,
    SetLockout,
    SetOutOfService,
    Shutdown,
    State,
    StopPressed,
    TemperatureReading,
    Tick,
)
from tests.core_harness import Harness, grant


def kinds(actions):
    return [type(a).__name__ for a in actions]


def rejection(actions):
    [ev] = [a for a in actions if isinstance(a, RecordEvent) and a.kind == "grant_rejected"]
    return ev.detail["reason"]


# ---------------------------------------------------------------- starting

def test_a_grant_writes_the_session_before_opening_the_valve():
    h = Harness()
    actions = h.start(credit_limit_fen=500)
    assert kinds(actions) == ["SessionStarted", "OpenValve"]
    assert h.state == "dispensing"
    started, opened = actions
    assert started.session_id == opened.session_id == "s1"
    # 500 fen at 200 fen/l is 2.5 l = 1125 pulses; 1127 pulses cost 500.9 fen, billed 500
    assert opened.close_at_total_pulses == started.limit_pulses == 1_127


def test_the_volume_limit_applies_when_it_is_lower_than_the_credit():
    h = Harness()
    started = h.start(credit_limit_fen=5_000)[0]     # 25 l of credit, 5 l maximum volume
    assert started.limit_pulses == 2_250


@pytest.mark.parametrize("setup, g, reason", [
    (lambda h: h.send(LinkChanged(False)), {}, "offline"),
    (lambda h: h.start(session_id="other"), {}, "busy"),
    (lambda h: h.send(SetOutOfService("x")), {}, "out_of_service"),
    (lambda h: h.send(EnterMaintenance("tech")), {}, "maintenance"),
    (lambda h: None, {"machine_id": "M2"}, "wrong_machine"),
    (lambda h: None, {"session_id": ""}, "duplicate_session"),
    (lambda h: None, {"expires_at_ms": 999}, "expired"),
    (lambda h: None, {"price_fen_per_l": -1}, "invalid_grant"),
    (lambda h: None, {"max_idle_ms": 0}, "invalid_grant"),
    (lambda h: None, {"credit_limit_fen": 1.5}, "invalid_grant"),
    (lambda h: None, {"credit_limit_fen": 0}, "insufficient_credit"),
    (lambda h: None, {"credit_limit_fen": 1, "price_fen_per_l": 500}, "insufficient_credit"),  # 2 ml < 10 ml
])
def test_grants_that_must_not_open_the_valve(setup, g, reason):
    h = Harness()
    setup(h)
    before = h.valve_commands().count("open")
    actions = h.send(GrantReceived(grant(**g)))
    assert rejection(actions) == reason
    assert not any(isinstance(a, OpenValve | SessionStarted) for a in actions)
    assert h.valve_commands().count("open") == before
    assert h.core.snapshot().last_rejection == reason


def test_a_replayed_grant_is_refused_even_after_its_session_ended():
    h = Harness()
    h.start()
    h.pour(100)
    h.send(StopPressed())
    h.tick(1_000)
    assert rejection(h.start()) == "duplicate_session"


def test_sessions_remembered_from_the_ledger_are_refused():
    from kiosk.session import DispenserCore
    from tests.core_harness import SETTINGS
    core = DispenserCore(SETTINGS, seen_session_ids=["old-1"])
    core.handle(LinkChanged(True), 0)
    assert rejection(core.handle(GrantReceived(grant("old-1")), 1)) == "duplicate_session"


def test_grants_are_clamped_to_the_machines_hard_limits():
    h = Harness(max_volume_ml=1_000, max_duration_ms=60_000, max_idle_ms=5_000, max_credit_fen=300)
    started = h.start(credit_limit_fen=99_999, max_volume_ml=50_000, max_duration_ms=900_000, max_idle_ms=99_000,
                      price_fen_per_l=10)[0]
    assert (started.credit_limit_fen, started.max_volume_ml, started.max_duration_ms, started.max_idle_ms) == \
        (300, 1_000, 60_000, 5_000)
    assert started.limit_pulses == h.core.settings.calibration.max_pulses_for_volume(1_000)


def test_a_grant_is_accepted_while_the_previous_receipt_shows():
    h = Harness()
    h.start()
    h.pour(50)
    h.send(StopPressed())
    h.tick(1_000)
    assert h.state == "receipt"
    assert kinds(h.start(session_id="s2"))[-1] == "OpenValve"


# ---------------------------------------------------------------- ending

def _dispensing():
    h = Harness()
    h.start()
    h.pour(90)          # 200 ml
    return h


@pytest.mark.parametrize("event, reason", [
    (StopPressed(), "stop_button"),
    (StopPressed("screen"), "stop_button"),
    (CancelReceived("s1", "operator"), "cancelled"),
    (Fault("flow_meter", "x"), "fault"),
    (Fault("valve", "stuck"), "fault"),
    (LeakSensor(wet=True), "leak"),
    (Shutdown(), "shutdown"),
])
def test_events_that_end_a_session(event, reason):
    h = _dispensing()
    actions = h.send(event)
    assert isinstance(actions[0], CloseValve) and actions[0].reason == reason
    h.tick(1_000)
    [ended] = h.ended()
    assert ended.record.reason == reason
    assert ended.record.billed_pulses == 90
    assert h.valve_commands() == ["open", "close"]


def test_cancel_for_another_session_is_ignored():
    h = _dispensing()
    assert kinds(h.send(CancelReceived("s-other"))) == ["RecordEvent"]
    assert h.state == "dispensing"


def test_the_valve_closes_on_the_pulse_that_reaches_the_credit_and_never_bills_beyond_it():
    h = Harness()
    started = h.start(credit_limit_fen=100, price_fen_per_l=200)[0]   # 0.5 l: 226 pulses
    limit = started.limit_pulses
    h.pour(limit - 1)
    assert h.state == "dispensing"
    actions = h.pour(5)            # one sample crosses the limit: the excess is overrun
    assert actions[0] == CloseValve("credit_exhausted")
    h.pour(3)                      # the rotor spins on
    h.tick(1_000)
    r = h.ended()[0].record
    assert (r.billed_pulses, r.overrun_pulses) == (limit, 4 + 3)
    assert r.cost_fen <= 100
    assert r.cost_fen == h.core.settings.calibration.cost_fen(limit, 200) == 100


def test_max_volume_ends_the_session():
    h = Harness()
    started = h.start(max_volume_ml=500, credit_limit_fen=10_000)[0]
    h.pour(started.limit_pulses)
    h.tick(1_000)
    r = h.ended()[0].record
    assert r.reason == "max_volume" and r.volume_ml == 500


def test_max_duration_ends_the_session_even_while_water_flows():
    h = Harness()
    h.start(max_duration_ms=2_000)
    h.flow(1.9)
    assert h.state == "dispensing"
    h.flow(0.2)
    assert h.state == "settling"
    h.tick(1_000)
    assert h.ended()[0].record.reason == "max_duration"


def test_no_flow_for_max_idle_ends_the_session():
    h = Harness()
    h.start(max_idle_ms=3_000)
    h.tick(2_999)
    assert h.state == "dispensing"
    h.pour(10, dt=1)           # flow resets the idle timer
    h.tick(2_999)
    assert h.state == "dispensing"
    h.tick(1)
    assert h.state == "settling"
    h.tick(1_000)
    r = h.ended()[0].record
    assert (r.reason, r.volume_ml, r.cost_fen) == ("idle", 22, 4)
    assert r.duration_ms == 6_000         # the close happened at the idle timeout, not the last pulse


def test_sessions_under_the_minimum_are_reported_but_not_charged():
    h = Harness(min_dispense_ml=30)
    h.start()
    h.pour(10)                 # 22 ml
    h.send(StopPressed())
    h.tick(1_000)
    r = h.ended()[0].record
    assert r.volume_ml == 22 and r.below_minimum and r.cost_fen == 0
    h2 = Harness(min_dispense_ml=20)
    h2.start()
    h2.pour(10)
    h2.send(StopPressed())
    h2.tick(1_000)
    r2 = h2.ended()[0].record
    assert not r2.below_minimum and r2.cost_fen == 4


# ---------------------------------------------------------------- overrun and ghost flow

def test_pulses_in_the_overrun_window_are_recorded_not_billed():
    h = _dispensing()
    h.send(StopPressed())
    h.pour(4, dt=30)
    h.pour(2, dt=900)
    assert h.state == "settling"
    h.tick(70)                           # 1000 ms after the close
    r = h.ended()[0].record
    assert (r.billed_pulses, r.overrun_pulses) == (90, 6)
    assert h.core.lockouts == {}


def test_ghost_flow_is_never_billed_and_a_leak_locks_the_machine_out():
    h = Harness()
    h.pour(5, dt=60_000)                 # a drip: 11 ml, logged, not a leak yet
    h.tick(1_000)
    assert [a.kind for a in h.log if isinstance(a, RecordEvent)][-1] == "ghost_flow"
    assert h.state == "idle"
    actions = h.pour(20, dt=60_000)      # 55 ml within 10 minutes: leak
    assert SetLockout(LOCKOUT_GHOST_FLOW, active=True, detail=h.core.lockouts[LOCKOUT_GHOST_FLOW]) in actions
    assert h.state == "out_of_service"
    assert "ml flowed with the valve closed" in h.core.lockouts[LOCKOUT_GHOST_FLOW]
    assert rejection(h.start()) == "out_of_service"
    assert not h.ended()


def test_ghost_flow_outside_the_window_does_not_add_up():
    h = Harness(ghost_window_ms=60_000)
    for _ in range(10):
        h.pour(10, dt=61_000)            # 22 ml per minute, never 50 ml within one
    assert h.state == "idle"


def test_flow_after_the_overrun_window_is_ghost_flow():
    h = _dispensing()
    h.send(StopPressed())
    h.tick(1_000)
    h.pour(30, dt=2_000)                 # stuck valve: flow long after the close
    h.tick(1_000)
    assert h.ended()[0].record.overrun_pulses == 0
    assert next(a for a in h.log if isinstance(a, RecordEvent) and a.kind == "ghost_flow").detail["pulses"] == 30


@pytest.mark.parametrize("reason, source, cleared", [
    (LOCKOUT_GHOST_FLOW, ClearSource.REMOTE, True),
    (LOCKOUT_GHOST_FLOW, ClearSource.SITE, True),
    (LOCKOUT_LEAK_SENSOR, ClearSource.REMOTE, False),     # a wet floor is inspected on site
    (LOCKOUT_LEAK_SENSOR, ClearSource.SITE, True),
    (LOCKOUT_REMOTE, ClearSource.REMOTE, True),
    ("fault:flow_meter", ClearSource.SITE, True),
])
def test_who_may_clear_a_lockout(reason, source, cleared):
    h = Harness(lockouts={reason: "x"})
    assert h.state == "out_of_service"
    actions = h.send(ClearLockout(reason, source, actor="t"))
    assert (reason not in h.core.lockouts) == cleared
    assert (SetLockout(reason, active=False) in actions) == cleared
    assert h.state == ("idle" if cleared else "out_of_service")
    if not cleared:
        assert actions[0].kind == "lockout_clear_refused" and actions[0].report


def test_clearing_a_lockout_that_is_not_there_is_logged():
    h = Harness()
    assert h.send(ClearLockout("ghost_flow"))[0].kind == "lockout_clear_ignored"


# ---------------------------------------------------------------- meter faults

def test_a_counter_going_backwards_is_a_fault():
    h = _dispensing()
    h.total -= 10
    actions = h.send(PulseCount(h.total), 20)
    assert actions[0] == CloseValve("fault")
    assert "fault:flow_meter" in h.core.lockouts


def test_an_impossible_jump_is_a_fault_and_is_not_billed():
    h = _dispensing()
    actions = h.pour(500, dt=100)       # 1.1 l in 100 ms: 666 l/min
    assert actions[0] == CloseValve("fault")
    h.tick(1_000)
    assert h.ended()[0].record.billed_pulses == 90
    assert "faster than the plumbing" in h.core.lockouts["fault:flow_meter"]


def test_pulses_delivered_late_in_one_burst_are_not_a_fault():
    """The edge callback thread was held up for 600 ms (a busy CPU): the counter stood still, then caught up with
    the 9 pulses that came meanwhile, 32 ms after the last reading. Over the last second that is 5 l/min."""
    h = Harness()
    h.start()
    h.flow(1.5, pulses_per_s=15, step_ms=20)
    billed = h.total
    for _ in range(30):
        h.send(PulseCount(h.total), 20)           # nothing arrives for 600 ms
    actions = h.pour(9, dt=32)
    assert not any(isinstance(a, CloseValve) for a in actions) and h.state == "dispensing"
    assert "fault:flow_meter" not in h.core.lockouts
    h.send(StopPressed())
    h.tick(1_000)
    assert h.ended()[0].record.billed_pulses == billed + 9       # every pulse billed, once


def test_a_meter_counting_too_fast_for_a_second_is_a_fault_even_in_small_steps():
    """Noise on the line: 300 pulses a second (40 l/min) in steps that each look small."""
    h = Harness()
    h.start()
    h.flow(0.5)
    actions = h.flow(1.5, pulses_per_s=300, step_ms=20)
    assert CloseValve("fault") in actions
    assert "faster than the plumbing" in h.core.lockouts["fault:flow_meter"]


def test_noise_right_after_a_long_pause_is_a_fault_at_once():
    """Readings come only when the count changes: the one before the noise is ten minutes old, but the core's steps
    (every 100 ms at rest) say the count stood still. Noise at 400 l/min (3,000 pulses a second) is refused within
    its first readings, not after a second of it."""
    h = Harness()
    h.start()
    h.pour(40, dt=1_000)
    h.tick(600_000)
    for _ in range(15):
        h.tick(100)
    out = []
    for _ in range(10):
        out += h.pour(60, dt=20)
        if CloseValve("fault") in out:
            break
    assert CloseValve("fault") in out and "fault:flow_meter" in h.core.lockouts
    h.tick(1_000)
    assert h.ended()[0].record.billed_pulses <= 40 + 120        # at most two readings of it billed


def test_fast_but_possible_flow_is_not_a_fault():
    h = Harness()
    h.start()
    h.flow(2, pulses_per_s=70)          # 9.3 l/min, under the 10 l/min maximum
    assert h.state == "dispensing"


# ---------------------------------------------------------------- out of service, maintenance, receipt

def test_an_operator_taking_the_machine_out_of_service_lets_the_session_finish():
    h = _dispensing()
    actions = h.send(SetOutOfService("cleaning at 3pm"))
    assert not any(isinstance(a, CloseValve) for a in actions)
    assert h.state == "dispensing"
    h.send(StopPressed())
    h.tick(1_000)
    assert h.state == "receipt"
    h.tick(15_000)
    assert h.state == "out_of_service"


def test_faults_while_idle_lock_out_and_command_the_valve_closed():
    h = Harness()
    actions = h.send(Fault("valve", "no feedback"))
    assert actions[0] == CloseValve("fault")
    assert h.state == "out_of_service"


def test_a_leak_sensor_going_dry_does_not_clear_its_lockout():
    h = Harness()
    h.send(LeakSensor(True))
    h.send(LeakSensor(False))
    assert h.state == "out_of_service"


def test_maintenance_is_refused_while_water_flows():
    h = _dispensing()
    assert h.send(EnterMaintenance("tech"))[0].kind == "maintenance_refused"
    assert h.state == "dispensing"


def test_maintenance_enter_and_exit():
    h = Harness()
    h.send(EnterMaintenance("tech"))
    assert h.state == "maintenance"
    h.send(ExitMaintenance("tech"))
    assert h.state == "idle"


@pytest.mark.parametrize("event, dt", [(ReceiptDismissed(), 0), (StopPressed(), 0), (Tick(), 15_000)])
def test_the_receipt_goes_away(event, dt):
    h = _dispensing()
    h.send(StopPressed())
    h.tick(1_000)
    assert h.state == "receipt"
    assert h.core.snapshot().receipt.session_id == "s1"
    h.send(event, dt)
    assert h.state == "idle"


def test_offline_and_back():
    h = Harness()
    h.send(LinkChanged(False))
    assert h.state == "offline"
    h.send(LinkChanged(True))
    assert h.state == "idle"


def test_a_session_keeps_pouring_when_the_link_drops():
    h = _dispensing()
    h.send(LinkChanged(False))
    assert h.state == "dispensing"
    h.send(StopPressed())
    h.tick(1_000)
    h.tick(15_000)
    assert h.state == "offline"


# ---------------------------------------------------------------- records, checkpoints, totalizer

def test_checkpoints_at_least_every_interval_while_water_flows():
    h = Harness()
    h.start()
    h.flow(3)
    cps = [a for a in h.log if isinstance(a, Checkpoint)]
    gaps = [b.mono_ms - a.mono_ms for a, b in itertools.pairwise(cps)]
    assert len(cps) >= 11 and max(gaps) <= 250 + 50
    assert all(cp.valve_open for cp in cps)


def test_the_close_writes_a_checkpoint_with_the_reason():
    h = _dispensing()
    actions = h.send(StopPressed())
    cp = actions[1]
    assert isinstance(cp, Checkpoint)
    assert (cp.session_id, cp.mono_ms, cp.billed_pulses, cp.valve_open, cp.closing_reason) == \
        ("s1", h.t, 90, False, "stop_button")


def test_temperatures_reach_the_record():
    h = Harness()
    h.send(TemperatureReading(12.5))
    h.start()
    h.pour(100)
    h.send(TemperatureReading(None))      # sensor unplugged: unknown, the session goes on
    assert h.state == "dispensing"
    h.send(StopPressed())
    h.tick(1_000)
    r = h.ended()[0].record
    assert (r.temp_start_c, r.temp_end_c) == (12.5, None)


def test_every_pulse_reaches_the_totalizer_once():
    h = Harness()
    h.pour(3, dt=10_000)                 # ghost
    h.start()
    h.flow(1)
    h.send(StopPressed())
    h.pour(2, dt=10)                     # overrun
    h.tick(1_000)
    h.pour(4, dt=10_000)                 # ghost again
    h.send(Shutdown())
    counted = sum(a.pulses for a in h.log if isinstance(a, AddToTotalizer)) \
        + sum(a.totalizer_pulses for a in h.log if isinstance(a, Checkpoint | SessionEnded))
    assert counted == h.total


def test_snapshot_shows_live_volume_cost_and_flow():
    h = Harness()
    h.start(credit_limit_fen=1_000)
    h.flow(2, pulses_per_s=40)
    s = h.core.snapshot()
    assert s.state is State.DISPENSING
    assert s.volume_ml == 177 and s.cost_fen == 35 and s.remaining_credit_fen == 965
    assert 5_000 <= s.flow_ml_per_min <= 5_700        # 40 pulses/s = 5.33 l/min
    assert s.elapsed_ms == 2_000
    assert 0 < s.progress_permille < 100


def test_shutdown_while_idle_still_closes_the_valve():
    h = Harness()
    assert h.send(Shutdown("sigterm"))[0] == CloseValve("sigterm")


def test_a_session_whose_row_failed_is_dropped_without_a_bill():
    from kiosk.events import SessionStartFailed
    h = Harness()
    h.start()
    actions = h.send(SessionStartFailed("s1", "disk full"))
    assert CloseValve("fault") in actions
    assert h.state == "out_of_service"
    assert h.core.snapshot().receipt is None and h.core.session_id is None
    h.tick(2_000)
    assert h.ended() == []


# ---------------------------------------------------------------- condition alarms (temperature, TDS, low water)

def test_a_tank_outside_its_band_for_long_enough_stops_sales_and_clears_itself():
    from kiosk.events import LOCKOUT_TEMPERATURE
    h = Harness(temp_alarm_after_ms=60_000)
    h.send(TemperatureReading(38.0))
    h.tick(59_999)
    assert h.state == "idle"                      # a short excursion is tolerated
    actions = h.tick(1)
    assert h.state == "out_of_service"
    assert "38.0 C, outside the safe band 2-35 C" in h.core.lockouts[LOCKOUT_TEMPERATURE]
    assert any(isinstance(a, RecordEvent) and a.kind == "lockout" and a.report for a in actions)
    h.send(TemperatureReading(None))              # unknown: neither clears nor raises
    assert h.state == "out_of_service"
    actions = h.send(TemperatureReading(20.0))
    assert h.state == "idle"
    assert SetLockout(LOCKOUT_TEMPERATURE, active=False) in actions


def test_a_thermometer_lost_while_the_tank_is_out_of_its_band_still_raises_the_alarm_in_words():
    """The water was last read out of band and is not known to be back: the alarm comes when due, naming the
    last reading (not a crash turned into an internal fault)."""
    from kiosk.events import LOCKOUT_TEMPERATURE
    h = Harness(temp_alarm_after_ms=60_000)
    h.send(TemperatureReading(38.5))
    h.send(TemperatureReading(None), 10_000)       # the sensor stops answering
    h.tick(50_000)
    assert h.state == "out_of_service"
    assert list(h.core.lockouts) == [LOCKOUT_TEMPERATURE]
    assert "38.5 C, outside the safe band" in h.core.lockouts[LOCKOUT_TEMPERATURE]


def test_a_brief_excursion_resets_the_alarm_timer():
    h = Harness(temp_alarm_after_ms=60_000)
    h.send(TemperatureReading(1.0))
    h.tick(50_000)
    h.send(TemperatureReading(5.0))
    h.send(TemperatureReading(1.0), 1_000)
    h.tick(50_000)
    assert h.state == "idle"


def test_tds_above_the_limit_stops_sales_but_lets_the_pour_finish():
    from kiosk.events import WaterQualityReading
    h = Harness(tds_alarm_after_ms=10_000)
    h.start()
    h.send(WaterQualityReading(620))
    h.flow(1)
    h.tick(10_000)
    assert "tds" in h.core.lockouts
    assert h.state == "dispensing"                # the cup being filled is not cut off
    h.send(StopPressed())
    h.tick(1_000)
    r = h.ended()[0].record
    assert (r.tds_ppm, r.tds_measured, r.tds_limit_ppm) == (620, True, 500)
    h.tick(15_000)
    assert h.state == "out_of_service"
    h.send(WaterQualityReading(90))
    assert h.state == "idle"


def test_tds_not_measured_is_not_a_number():
    from kiosk.events import WaterQualityReading
    h = Harness()
    h.send(WaterQualityReading(None, measured=False))
    s = h.core.snapshot()
    assert s.tds_ppm is None and not s.tds_measured


def test_low_water_stops_sales_until_refilled():
    from kiosk.events import LowWater
    h = Harness()
    h.send(LowWater(True))
    assert h.state == "out_of_service"
    assert rejection(h.start()) == "out_of_service"
    h.send(LowWater(False))
    assert h.state == "idle"


def test_a_grant_at_another_price_than_shown_is_refused_and_settings_change_what_is_shown():
    """China's price-marking rules: the price on the screen is the price charged."""
    from kiosk.events import MachineSettings
    h = Harness()
    assert h.core.display_price_fen_per_l == 200
    actions = h.core.handle(GrantReceived(grant(price_fen_per_l=150)), h.t)     # not shown: refused
    assert rejection(actions) == "price_changed" and not any(isinstance(a, OpenValve) for a in actions)
    h.core.handle(MachineSettings(150, "Asia/Shanghai", "400-800-1234"), h.t)
    snap = h.core.snapshot()
    assert snap.display_price_fen_per_l == 150 and snap.timezone == "Asia/Shanghai" and snap.hotline == "400-800-1234"
    actions = h.core.handle(GrantReceived(grant("s2", price_fen_per_l=150)), h.t)
    assert any(isinstance(a, OpenValve) for a in actions)


def test_a_refusal_is_shown_to_the_person_it_concerns_only():
    h = Harness()
    h.send(SetOutOfService("x"))
    h.core.handle(GrantReceived(grant()), h.t)
    assert h.core.snapshot().last_rejection == "out_of_service"
    h.tick(11_000)                                           # ten seconds later the next person sees nothing
    assert h.core.snapshot().last_rejection is None
    h.core.handle(GrantReceived(grant("s2")), h.t)
    assert h.core.snapshot().last_rejection == "out_of_service"
    from kiosk.events import ClearLockout
    h.send(ClearLockout("operator", actor="tech"))           # the state changed: gone at once
    assert h.core.snapshot().state.value == "idle" and h.core.snapshot().last_rejection is None
