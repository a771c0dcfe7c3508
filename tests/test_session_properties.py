"""Random event sequences against the core: the safety and billing invariants hold after every step."""

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kiosk.events import (
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
    ReceiptDismissed,
    SessionEnded,
    SessionStarted,
    SetOutOfService,
    Shutdown,
    State,
    StopPressed,
)
from tests.core_harness import Harness, grant

step = st.one_of(
    st.tuples(st.just("grant"), st.integers(0, 3_000), st.integers(0, 500), st.integers(0, 6_000)),
    st.tuples(st.just("pour"), st.integers(0, 60), st.integers(1, 2_000)),
    st.tuples(st.just("tick"), st.integers(0, 20_000)),
    st.tuples(st.just("event"), st.sampled_from([
        StopPressed(), CancelReceived("g0"), CancelReceived("g1"), Fault("flow_meter"), LeakSensor(True),
        LinkChanged(False), LinkChanged(True), SetOutOfService(), ClearLockout("operator", ClearSource.REMOTE),
        ClearLockout("fault:flow_meter"), ClearLockout("leak_sensor"), ClearLockout("ghost_flow", ClearSource.REMOTE),
        EnterMaintenance(), ExitMaintenance(), ReceiptDismissed()])),
)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(step, max_size=60))
def test_invariants_hold_for_any_sequence(steps):
    h = Harness()
    valve_open = False
    started: dict[str, SessionStarted] = {}
    ended: dict[str, int] = {}
    n = rejected = 0
    for s in steps:
        if s[0] == "grant":
            n += 1
            actions = h.send(GrantReceived(grant(f"g{n}", credit_limit_fen=s[1], price_fen_per_l=s[2],
                                                 max_volume_ml=max(1, s[3]))))
        elif s[0] == "pour":
            actions = h.pour(s[1], dt=s[2])
            if CloseValve("fault") in actions:      # an impossible jump: rejected, never billed or counted
                rejected += s[1]
        elif s[0] == "tick":
            actions = h.tick(s[1])
        else:
            actions = h.send(s[1])
        for i, a in enumerate(actions):
            if isinstance(a, OpenValve):
                # the valve opens only right after its session row, in the same batch
                assert i > 0 and isinstance(actions[i - 1], SessionStarted)
                assert actions[i - 1].session_id == a.session_id
                valve_open = True
            elif isinstance(a, CloseValve):
                valve_open = False
            elif isinstance(a, SessionStarted):
                assert a.session_id not in started
                started[a.session_id] = a
            elif isinstance(a, SessionEnded):
                r = a.record
                ended[r.session_id] = ended.get(r.session_id, 0) + 1
                st_ = started[r.session_id]
                assert r.billed_pulses <= st_.limit_pulses
                assert r.cost_fen <= st_.credit_limit_fen               # never beyond credit
                assert r.cost_fen == (0 if r.below_minimum else
                                      h.core.settings.calibration.cost_fen(r.billed_pulses, r.price_fen_per_l))
        # the valve is open exactly when the core is dispensing
        assert valve_open == (h.core.state is State.DISPENSING)
        if set(h.core.lockouts) - {"operator"}:     # an operator's request lets the pour finish; faults don't
            assert not valve_open
        snap = h.core.snapshot()
        assert snap.cost_fen <= max(snap.credit_limit_fen, 0)
    h.send(Shutdown())
    h.tick(0)
    all_ends = [a.record.session_id for a in h.log if isinstance(a, SessionEnded)]
    assert sorted(all_ends) == sorted(started)          # every started session ends exactly once
    counted = sum(a.pulses for a in h.log if isinstance(a, AddToTotalizer)) \
        + sum(a.totalizer_pulses for a in h.log if isinstance(a, Checkpoint | SessionEnded))
    assert counted == h.total - rejected
