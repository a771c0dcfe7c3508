"""The dispenser's sync link against the real cloud on loopback, through a fault-injecting proxy."""

import contextlib
import threading
import time
import urllib.parse

import pytest

from hal.base import SystemClock
from hal.machine import simulated_config, simulated_dispenser
from kiosk.config import Config
from kiosk.events import State
from sync.client import CloudClient
from sync.link import SyncLink
from tests import cloudkit
from tests.cloudkit import CloudServer
from tests.faultproxy import FaultProxy
from tests.util import wait_until


class OffsetClock(SystemClock):
    """A Pi that booted with a wrong wall clock."""

    def __init__(self, offset_ms: int = 0) -> None:
        self.offset_ms = offset_ms

    def wall_ms(self) -> int:
        return super().wall_ms() + self.offset_ms


def heartbeat_state(cloud) -> str | None:
    """The state in the only machine's last heartbeat, as the cloud's operators see it."""
    return (cloud.op("GET", "/api/v1/operator/machines").json()["machines"][0]["heartbeat"] or {}).get("state")


class Dispenser:
    def __init__(self, tmp_path, url, machine_id, secret, clock_offset_ms=0, poll_wait_ms=1_000, data_dir=None,
                 heartbeat_interval_ms=300):
        self.cfg = simulated_config(Config().replace(
            paths={"data_dir": str(data_dir or tmp_path / "dispenser")}, machine={"id": machine_id},
            flow={"overrun_window_ms": 100, "sample_interval_ms": 5}, screen={"receipt_display_ms": 1_000}))
        self.clock = OffsetClock(clock_offset_ms)
        self.hw, self.rt, _ = simulated_dispenser(self.cfg, self.clock, tmp_path / "sim")
        self.client = CloudClient(url, machine_id, secret, wall_ms=self.clock.wall_ms,
                                  mono_ms=self.clock.monotonic_ms, timeout_s=5)
        self.link = SyncLink(self.rt, self.client, self.rt.ledger, software_version="test", poll_wait_ms=poll_wait_ms,
                             heartbeat_interval_ms=heartbeat_interval_ms, backoff_base_s=0.05, backoff_max_s=0.3,
                             link_lost_after_ms=800)
        self.thread = threading.Thread(target=self.rt.run, daemon=True)

    def __enter__(self):
        self.thread.start()
        self.hw.start()
        self.link.start()
        return self

    def __exit__(self, *exc):
        # the link's commands thread is held in a long-poll until poll_wait_ms ends; told to halt, then woken
        # by the cloud as a queued command would wake it, it stops now instead of at the end of that wait
        self.link._halt.set()
        for cloud in list(cloudkit.RUNNING):
            cloud.app.state.hub.notify(self.cfg.machine.id)
        self.link.stop()
        self.rt.request_stop()
        self.rt.wait_stopped(5)
        self.hw.close()
        self.rt.ledger.close()

    def qr_code(self, public_url):
        url = self.link.current_qr_url(public_url)
        assert url is not None
        return urllib.parse.parse_qs(urllib.parse.urlparse(url).query)["c"][0]


def cloud_sees_in_service(cloud, machine_id) -> bool:
    """The cloud's view (the machine's latest heartbeat): a person scanning sees the same."""
    for m in cloud.op("GET", "/api/v1/operator/machines").json()["machines"]:
        if m["machine_id"] == machine_id:
            return (m["heartbeat"] or {}).get("state") not in ("out_of_service", "maintenance")
    return False


def buy_water(cloud, d, user, pour_s=0.4):
    assert wait_until(lambda: d.rt.snapshot.state is State.IDLE), d.rt.snapshot
    assert wait_until(lambda: cloud_sees_in_service(cloud, d.cfg.machine.id), 5)
    presence = user.scan(d.cfg.machine.id, d.qr_code(cloud.url)).json()["presence_token"]
    start = user.start(presence)
    assert start.status_code == 200, start.text
    sid = start.json()["session_id"]
    assert wait_until(lambda: d.hw.valve.is_open)
    assert wait_until(lambda: user.call("GET", f"/api/v1/sessions/{sid}").json()["state"] == "active")
    time.sleep(pour_s)
    d.hw.world.press_stop()
    assert wait_until(lambda: d.rt.ledger.session(sid) and d.rt.ledger.session(sid)["state"] == "ended")
    return sid


def settled(user, sid):
    return user.call("GET", f"/api/v1/sessions/{sid}").json()["state"] == "ended"


def assert_books_agree(d, user, sids):
    device_total = sum(d.rt.ledger.session(s)["cost_fen"] for s in sids)
    bills = user.me()["bills"]
    assert sorted(b["session_id"] for b in bills) == sorted(sids)            # each billed exactly once
    assert sum(b["amount_fen"] for b in bills) == device_total
    for s in sids:
        assert [b["volume_ml"] for b in bills if b["session_id"] == s] == [d.rt.ledger.session(s)["volume_ml"]]


@contextlib.contextmanager
def linked(tmp_path, machine_id: str, phone: str, balance_fen: int = 5_000):
    """A cloud, the fault proxy, a dispenser linked through it (online), a user with a balance."""
    with CloudServer(tmp_path / "cloud") as cloud, FaultProxy(cloud.url) as proxy:
        dev = cloud.provision(machine_id, price=200)
        user = cloud.user(phone, balance_fen=balance_fen)
        with Dispenser(tmp_path, proxy.url, machine_id, dev.secret) as d:
            assert wait_until(lambda: d.rt.snapshot.online)
            yield cloud, proxy, d, user


@pytest.fixture
def world(tmp_path):
    with linked(tmp_path, "S1", "13700000001") as w:
        yield w


def test_scan_pour_stop_bill_through_the_link(world):
    cloud, proxy, d, user = world
    sid = buy_water(cloud, d, user, pour_s=1.2)
    assert wait_until(lambda: settled(user, sid))
    assert_books_agree(d, user, [sid])
    view = user.call("GET", f"/api/v1/sessions/{sid}").json()
    assert view["bill"]["water_quality"]["tds_ppm"] == 80 and view["end_reason"] == "stop_button"
    assert wait_until(lambda: d.rt.ledger.outbox_depth() == 0)
    machines = cloud.op("GET", "/api/v1/operator/machines").json()["machines"]
    hb = machines[0]["heartbeat"]
    assert hb["software_version"] == "test" and hb["totalizer_pulses"] > 0 and hb["temp_c"] == 12.0
    assert any("/device/v1/progress" in s for s in proxy.seen)         # live progress while pouring


def test_a_dropped_answer_after_the_server_committed_is_not_billed_twice(world):
    cloud, proxy, d, user = world
    proxy.inject("/device/v1/events", "drop_response", times=2)
    proxy.inject("/device/v1/commands/", "drop_response", times=1)    # the start's ack is lost too
    sid = buy_water(cloud, d, user)
    assert wait_until(lambda: settled(user, sid) and d.rt.ledger.outbox_depth() == 0, 15)
    assert proxy.faults == []                                 # every injected fault was hit
    assert_books_agree(d, user, [sid])


def test_5xx_garbage_and_duplicates_are_survived(world):
    cloud, proxy, d, user = world
    proxy.inject("/device/v1/events", "503", times=3)
    proxy.inject("/device/v1/events", "garbage", times=1)
    proxy.inject("/device/v1/events", "duplicate", times=1)
    sids = [buy_water(cloud, d, user) for _ in range(2)]
    assert wait_until(lambda: all(settled(user, s) for s in sids) and d.rt.ledger.outbox_depth() == 0, 15)
    assert proxy.faults == []
    assert_books_agree(d, user, sids)


def test_an_outage_mid_session_finishes_the_pour_and_bills_later(world):
    cloud, proxy, d, user = world
    assert wait_until(lambda: d.rt.snapshot.state is State.IDLE)
    presence = user.scan("S1", d.qr_code(cloud.url)).json()["presence_token"]
    sid = user.start(presence).json()["session_id"]
    assert wait_until(lambda: d.hw.valve.is_open)
    assert wait_until(lambda: user.call("GET", f"/api/v1/sessions/{sid}").json()["state"] == "active")
    proxy.down = True                                        # the network goes away mid-pour
    time.sleep(1.5)
    assert d.hw.valve.is_open                                # the authorized pour goes on
    d.hw.world.press_stop()
    assert wait_until(lambda: d.rt.snapshot.state is State.OFFLINE, 10)   # no QR that cannot work
    assert d.link.current_qr_url(cloud.url) is None
    assert d.rt.ledger.outbox_depth() >= 1                   # the report waits on disk
    proxy.down = False
    assert wait_until(lambda: settled(user, sid) and d.rt.ledger.outbox_depth() == 0, 15)
    assert wait_until(lambda: d.rt.snapshot.state is State.IDLE)
    assert_books_agree(d, user, [sid])


def test_a_report_the_cloud_refuses_is_dead_lettered_not_dropped(world):
    cloud, _, d, user = world
    # one the protocol's model refuses (never sent), one the cloud refuses (a session it never started)
    bad = d.rt.ledger.record_event("session_ended", {"session_id": "never-started"}, report=True)
    with d.rt.ledger._tx("queue a report for a session the cloud does not know") as db:
        refused = d.rt.ledger._queue(db, "session_ended", {
            "session_id": "s-unknown", "user_ref": "u-x", "reason": "stop_button",
            "started_at": "2026-11-29T10:00:00.000Z", "closed_at": "2026-11-29T10:00:05.000Z",
            "ended_at": "2026-11-29T10:00:06.000Z", "duration_ms": 5_000, "price_fen_per_l": 200,
            "credit_limit_fen": 1_000, "min_dispense_ml": 10, "milli_pulses_per_litre": 450_000,
            "billed_pulses": 45, "volume_ml": 100, "cost_fen": 20})
    sid = buy_water(cloud, d, user)
    assert wait_until(lambda: settled(user, sid), 10)
    assert wait_until(lambda: sorted(r["event_id"] for r in d.rt.ledger.outbox("dead")) == sorted([bad, refused]), 10)
    errors = {r["event_id"]: r["last_error"] for r in d.rt.ledger.outbox("dead")}
    assert "does not match the protocol" in errors[bad] and "was not started on this machine" in errors[refused]
    assert wait_until(lambda: d.rt.ledger.outbox_depth() == 0, 10)     # everything else was delivered
    # each dead letter is an operator alarm in the cloud
    def dead_alarms():
        alarms = cloud.op("GET", "/api/v1/operator/alarms").json()["alarms"]
        return sorted(a["payload"]["detail"]["event_id"] for a in alarms if a["kind"] == "report_dead_lettered")
    assert wait_until(lambda: dead_alarms() == sorted([bad, refused]), 10)


def test_a_wrong_clock_is_corrected_and_events_keep_true_times(tmp_path):
    with CloudServer(tmp_path / "cloud") as cloud:
        dev = cloud.provision("S2")
        user = cloud.user("13700000002", balance_fen=5_000)
        with Dispenser(tmp_path, cloud.url, "S2", dev.secret, clock_offset_ms=-3 * 86_400_000) as d:
            assert wait_until(lambda: d.rt.snapshot.online)
            assert abs(d.client.offset_ms - 3 * 86_400_000) < 5_000
            sid = buy_water(cloud, d, user)
            assert wait_until(lambda: settled(user, sid))
            from sqlalchemy import select

            from cloud import db as t
            with cloud.app.state.database.read() as conn:
                rows = conn.execute(select(t.reports.c.received_ms, t.reports.c.occurred_ms)).all()
            assert rows and all(0 <= r.received_ms - r.occurred_ms < 60_000 for r in rows)
            # the bill carries true times, not the Pi's clock three days slow
            from datetime import datetime
            bill = user.call("GET", f"/api/v1/sessions/{sid}").json()["bill"]
            for key in ("started_at", "ended_at"):
                at = datetime.fromisoformat(bill[key].replace("Z", "+00:00")).timestamp()
                assert abs(at - time.time()) < 120, (key, bill[key])


def test_operator_commands_reach_the_core(world):
    cloud, _, d, _ = world
    cloud.op("PATCH", "/api/v1/operator/machines/S1", json={"price_fen_per_l": 250})
    assert wait_until(lambda: d.rt.snapshot.display_price_fen_per_l == 250)
    cloud.op("POST", "/api/v1/operator/machines/S1/service", json={"in_service": False, "detail": "cleaning"})
    assert wait_until(lambda: d.rt.snapshot.state is State.OUT_OF_SERVICE)
    cloud.op("POST", "/api/v1/operator/machines/S1/service", json={"in_service": True})
    assert wait_until(lambda: d.rt.snapshot.state is State.IDLE)


def test_a_slow_answer_the_device_gave_up_on_is_not_billed_twice(world):
    cloud, proxy, d, user = world
    proxy.slow_s = d.client.timeout_s + 1                  # the server commits after the client timed out
    proxy.inject("/device/v1/events", "slow", times=1)
    sid = buy_water(cloud, d, user)
    assert wait_until(lambda: settled(user, sid) and d.rt.ledger.outbox_depth() == 0, 20)
    assert proxy.faults == []
    assert_books_agree(d, user, [sid])


def test_online_at_once_with_a_long_poll_and_its_wait_does_not_skew_the_clock(tmp_path):
    """With the production long-poll (55 s), the first heartbeat proves the link; a poll answer the server
    held for its whole wait must not be taken as a clock sample (its midpoint is half the wait off)."""
    with CloudServer(tmp_path / "cloud") as cloud:
        dev = cloud.provision("LP1")
        with Dispenser(tmp_path, cloud.url, "LP1", dev.secret, poll_wait_ms=55_000) as d:
            t0 = time.monotonic()
            assert wait_until(lambda: d.rt.snapshot.online, timeout_s=5)
            assert time.monotonic() - t0 < 3
            offset = d.client.offset_ms
            d.client._learn_time(d.client.server_now_ms() + 27_000, 0, 55_000)       # a held long-poll
            assert d.client.offset_ms == offset


def test_each_long_poll_asks_for_its_own_wait_so_a_fleet_does_not_return_in_waves(tmp_path):
    """A fleet that reconnected at once (a cloud instance restarted) would otherwise come back to the cloud in
    one wave every 55 s for ever: each poll asks for between 80 % and all of the configured wait."""
    with CloudServer(tmp_path / "cloud") as cloud:
        dev = cloud.provision("J1")
        with Dispenser(tmp_path, cloud.url, "J1", dev.secret, poll_wait_ms=300) as d:
            asked: list[int] = []
            real = d.client.poll
            d.client.poll = lambda wait_ms: asked.append(wait_ms) or real(wait_ms)
            assert wait_until(lambda: len(asked) >= 15, timeout_s=20)
    assert all(240 <= w <= 300 for w in asked), asked
    assert max(asked) - min(asked) >= 20 and len(set(asked)) >= 5, asked


def test_the_phone_sees_service_changes_within_two_seconds_and_cannot_start_meanwhile(tmp_path):
    """Heartbeats come every 30 s in the field; a change a phone must see goes at once."""
    from kiosk.events import ClearLockout, ClearSource, SetOutOfService
    with CloudServer(tmp_path / "cloud") as cloud:
        dev = cloud.provision("S7", price=200)
        user = cloud.user("13700000007", balance_fen=5_000)
        with Dispenser(tmp_path, cloud.url, "S7", dev.secret, heartbeat_interval_ms=30_000) as d:
            assert wait_until(lambda: d.rt.snapshot.online)

            assert wait_until(lambda: heartbeat_state(cloud) == "idle", 5)
            presence = user.scan("S7", d.qr_code(cloud.url)).json()["presence_token"]
            d.rt.post(SetOutOfService("cleaning"))
            t0 = time.monotonic()
            assert wait_until(lambda: heartbeat_state(cloud) == "out_of_service", 2.0), heartbeat_state(cloud)
            seen_s = time.monotonic() - t0
            r = user.start(presence)
            assert r.status_code == 409 and r.json()["error"] == "machine_out_of_service", r.text
            assert user.me()["held_fen"] == 0
            d.rt.post(ClearLockout("operator", ClearSource.SITE, actor="tech"))
            assert wait_until(lambda: heartbeat_state(cloud) == "idle", 2.0)
            assert seen_s < 2.0
