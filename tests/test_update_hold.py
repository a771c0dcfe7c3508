"""An update's hold on the machine: the core takes it only when idle and, in the same step, refuses every start
until the restart; it lifts on EndUpdate or its deadline and is never written to the ledger's lockouts."""

import pytest

from kiosk.events import (
    LOCKOUT_REMOTE,
    BeginUpdate,
    EndUpdate,
    EnterMaintenance,
    OpenValve,
    ReceiptDismissed,
    RecordEvent,
    SetLockout,
    SetOutOfService,
    State,
    StopPressed,
    TechPour,
)
from kiosk.ui.present import present, screen_for
from tests.core_harness import Harness


def records(actions, kind):
    return [a.detail for a in actions if isinstance(a, RecordEvent) and a.kind == kind]


def rejection(actions):
    [ev] = records(actions, "grant_rejected")
    return ev["reason"]


def test_a_start_after_the_hold_is_refused_and_the_valve_stays_closed():
    h = Harness()
    actions = h.send(BeginUpdate("0.3.0", hold_ms=180_000))
    assert records(actions, "update_hold") == [{"version": "0.3.0", "hold_ms": 180_000}]
    assert h.core.updating == "0.3.0" and h.core.update_refusal is None
    assert h.state == "updating"
    refused = h.start(session_id="s1")
    assert rejection(refused) == "updating"
    assert not [a for a in refused if isinstance(a, OpenValve)] and not h.core.valve_should_be_open
    snap = h.core.snapshot()
    assert snap.state is State.UPDATING and snap.updating_version == "0.3.0" and snap.last_rejection == "updating"


@pytest.mark.parametrize("busy, why", [
    ("dispensing", "a session is dispensing"),
    ("settling", "a session is settling"),
    ("receipt", "a receipt is on the screen"),
    ("maintenance", "a technician is at the machine"),
    ("tech_pour", "the valve is open"),
])
def test_the_hold_is_refused_while_the_machine_is_busy_and_starts_go_on(busy, why):
    h = Harness()
    if busy in ("dispensing", "settling", "receipt"):
        h.start(session_id="s1")
        h.flow(0.5)
        if busy != "dispensing":
            h.send(StopPressed())
        if busy == "receipt":
            h.tick(2_000)
        assert h.state == busy
    else:
        h.send(EnterMaintenance("tech"))
        if busy == "tech_pour":
            assert [a for a in h.send(TechPour("flush", target_ml=500)) if isinstance(a, OpenValve)]
    actions = h.send(BeginUpdate("0.3.0"))
    assert records(actions, "update_hold_refused") == [{"version": "0.3.0", "why": why}]
    assert h.core.updating is None and h.core.update_refusal == why
    assert h.state != "updating"
    if busy == "receipt":                # the machine serves as before: the next customer pours
        h.send(ReceiptDismissed())
        assert [a for a in h.start(session_id="s2") if isinstance(a, OpenValve)]


def test_the_runtimes_own_check_refuses_too():
    h = Harness()
    actions = h.send(BeginUpdate("0.3.0", refused_why="the valve is open"))
    assert records(actions, "update_hold_refused") == [{"version": "0.3.0", "why": "the valve is open"}]
    assert h.state == "idle" and [a for a in h.start() if isinstance(a, OpenValve)]


def test_end_update_restores_serving_and_only_for_its_own_version():
    h = Harness()
    h.send(BeginUpdate("0.3.0"))
    assert h.send(EndUpdate("0.2.9", "failed")) == [] and h.state == "updating"
    actions = h.send(EndUpdate("0.3.0", "switch_failed"))
    assert records(actions, "update_hold_ended") == [{"version": "0.3.0", "reason": "switch_failed"}]
    assert h.state == "idle" and h.core.updating is None
    assert [a for a in h.start(session_id="s1") if isinstance(a, OpenValve)]


def test_the_hold_lifts_by_itself_at_its_deadline():
    h = Harness()
    h.send(BeginUpdate("0.3.0", hold_ms=180_000))
    h.tick(179_999)
    assert h.state == "updating"
    actions = h.tick(1)
    assert records(actions, "update_hold_ended") == [{"version": "0.3.0", "reason": "timeout"}]
    assert h.state == "idle" and [a for a in h.start(session_id="s1") if isinstance(a, OpenValve)]


def test_a_second_update_cannot_take_the_hold_but_the_same_one_may_ask_again():
    h = Harness()
    h.send(BeginUpdate("0.3.0"))
    assert records(h.send(BeginUpdate("0.4.0")), "update_hold_refused")[0]["why"] == \
        "the update to 0.3.0 holds the machine"
    assert records(h.send(BeginUpdate("0.3.0")), "update_hold") and h.core.updating == "0.3.0"


def test_no_technician_may_enter_maintenance_under_the_hold():
    h = Harness()
    h.send(BeginUpdate("0.3.0"))
    actions = h.send(EnterMaintenance("tech"))
    assert records(actions, "maintenance_refused")[0]["why"].startswith("a software update")
    assert not h.core.maintenance and h.state == "updating"


def test_an_out_of_service_machine_may_update_and_keeps_its_lockouts_which_the_hold_never_joins():
    h = Harness()
    h.send(SetOutOfService("cleaning"))
    actions = h.send(BeginUpdate("0.3.0"))
    assert records(actions, "update_hold") and h.state == "updating"
    assert not [a for a in actions if isinstance(a, SetLockout)]
    assert set(h.core.lockouts) == {LOCKOUT_REMOTE}
    assert not [a for a in h.log if isinstance(a, SetLockout) and a.reason != LOCKOUT_REMOTE]
    h.send(EndUpdate("0.3.0"))
    assert h.state == "out_of_service"


def test_a_hold_that_is_refused_or_taken_holds_nothing_for_the_next_boot():
    """The core a restart builds (from the ledger's lockouts, which the hold never wrote) serves."""
    h = Harness()
    h.send(BeginUpdate("0.3.0"))
    persisted = {}
    for a in h.log:
        if isinstance(a, SetLockout):
            persisted[a.reason] = a.detail
    assert persisted == {}
    rebooted = Harness(lockouts=persisted)
    assert rebooted.state == "idle" and [a for a in rebooted.start(session_id="s9") if isinstance(a, OpenValve)]


def test_the_screen_says_the_machine_is_updating_chinese_first():
    h = Harness()
    h.send(BeginUpdate("0.3.0"))
    snap = h.core.snapshot()
    assert screen_for(snap) == "updating"
    zh, en = present(snap, "zh"), present(snap, "en")
    assert zh["updating"].startswith("升级期间暂停取水") and "新版本 0.3.0" in zh["updating"]
    assert "0.3.0" in en["updating"] and "paused" in en["updating"]
    h.start(session_id="s1")
    assert "正在升级软件" in present(h.core.snapshot(), "zh")["rejection"]


# ---------------------------------------------------------------- the runtime: ask from another thread, wait


def test_the_updater_asks_the_core_thread_and_a_start_after_the_answer_never_opens_the_valve(tmp_path):
    from tests.test_runtime import Machine
    from tests.util import wait_until
    with Machine(tmp_path) as m:
        assert m.rt.begin_update("0.3.0", hold_ms=60_000) is None
        assert m.rt.snapshot.state is State.UPDATING
        m.grant("s1")
        assert wait_until(lambda: m.rt.snapshot.last_rejection == "updating")
        assert not m.valve_opened_at_least_once and m.rt.ledger.session("s1") is None
        m.rt.end_update("0.3.0", "switch_failed")
        assert wait_until(lambda: m.rt.snapshot.state is State.IDLE)
        m.grant("s2")
        assert wait_until(lambda: m.valve.is_open)
        why = m.rt.begin_update("0.3.0")                    # now busy: refused, with why
        assert why == "the valve is open" and m.rt.snapshot.state is State.DISPENSING
    with Machine(tmp_path) as again:                        # the next boot from the same ledger serves
        assert again.rt.core.lockouts == {} and again.rt.ledger.lockouts() == {}
        assert again.rt.snapshot.state is State.IDLE


def test_a_core_thread_that_does_not_answer_is_a_refusal_and_the_late_hold_is_ended(tmp_path):
    from tests.test_runtime import Machine
    from tests.util import wait_until
    m = Machine(tmp_path)                                   # not started: nobody answers
    assert m.rt.begin_update("0.3.0", timeout_s=0.05).startswith("the core thread did not answer")
    with m:                                                 # the core thread runs the request, then its end
        assert wait_until(lambda: m.rt.core.updating is None and m.rt.loop_count > 2)
        assert m.rt.snapshot.state is State.IDLE


# ---------------------------------------------------------------- the cloud: refused up front, said in words


def test_the_cloud_refuses_a_start_up_front_while_the_machine_updates_and_holds_nothing(tmp_path):
    """The core would refuse the start anyway (and the cloud void it); saying so before the hold is taken spares the
    person a spinner and the account a hold, and the phone tells them why in their language."""
    from tests.cloudkit import CloudServer
    from tests.test_sync import Dispenser, heartbeat_state
    from tests.util import wait_until
    with CloudServer(tmp_path / "cloud") as cloud:
        dev = cloud.provision("U7", price=200)
        user = cloud.user("13700000017", balance_fen=5_000)
        with Dispenser(tmp_path, cloud.url, "U7", dev.secret, heartbeat_interval_ms=30_000) as d:
            assert wait_until(lambda: d.rt.snapshot.online)

            assert wait_until(lambda: heartbeat_state(cloud) == "idle", 5)
            scan = user.scan("U7", d.qr_code(cloud.url)).json()
            assert d.rt.begin_update("0.9.0", hold_ms=60_000) is None
            assert wait_until(lambda: heartbeat_state(cloud) == "updating", 2.0), heartbeat_state(cloud)
            assert user.scan("U7", d.qr_code(cloud.url)).json()["machine"]["state"] == "updating"
            r = user.start(scan["presence_token"])
            assert r.status_code == 409 and r.json()["error"] == "machine_updating", r.text
            assert "software update" in r.json()["message"]
            assert user.me()["held_fen"] == 0
            d.rt.end_update("0.9.0", "switch_failed")          # the switch did not happen: serving again
            assert wait_until(lambda: heartbeat_state(cloud) == "idle", 2.0)
            r = user.start(user.scan("U7", d.qr_code(cloud.url)).json()["presence_token"])
            assert r.status_code in (200, 201), r.text
