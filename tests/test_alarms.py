"""Operator alarms with a life (issue 20), over real HTTP: every rule made to happen the way a machine or the service
really makes it (signed heartbeats and events, a lost session, a failing SMS gateway, a payment of the wrong amount,
a bill that does not match), the system resolving what clears, the lifecycle API with its refusals, and the
notifications received by a real SMTP server (aiosmtpd) and a real webhook receiver that checks the signature.
Races on PostgreSQL: parallel checks, events and acknowledgements, and two clouds on one database."""

from __future__ import annotations

import contextlib
import email
import email.policy
import hashlib
import hmac
import json
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import requests
from aiosmtpd.controller import Controller
from sqlalchemy import func, select

from cloud import db as t
from cloud.accounts.providers import SmsFailed
from cloud.settings import CloudSettings, ProductionRefused, SettingsError
from tests.cloudkit import PG_URL, CloudServer
from tests.conftest import _fresh_postgres_database
from tests.test_cloud import start_session
from tests.test_cloud_concurrency import at_once
from tests.util import wait_until

CASES = "/api/v1/operator/alarm-cases"


def real_ms() -> int:
    return time.time_ns() // 1_000_000


class Clock:
    """The cloud's clock, moved by the tests; the machines move theirs with it (their signatures stay fresh)."""

    def __init__(self) -> None:
        self.shift_ms = 0
        self.devices: list = []

    def __call__(self) -> int:
        return real_ms() + self.shift_ms

    def forward(self, ms: int) -> None:
        self.shift_ms += ms
        for d in self.devices:
            d.offset = self.shift_ms


def start_cloud(tmp_path, clock: Clock, url: str = "", name: str = "cloud", **settings) -> CloudServer:
    settings = {"alarm_check_interval_s": 0.05, "clock_ms": clock, **settings}
    return CloudServer(tmp_path / name, database_url=url, **settings)


@pytest.fixture
def clock():
    return Clock()


@pytest.fixture(params=["sqlite", "postgresql"])
def both(request, tmp_path, clock):
    """A cloud on SQLite and on PostgreSQL, checking its rules every 50 ms."""
    url, drop = "", None
    if request.param == "postgresql":
        url, drop = _postgres()
    with start_cloud(tmp_path, clock, url) as server:
        yield server
    if drop:
        server.app.state.database.dispose()
        drop()


@pytest.fixture
def cloud(tmp_path, clock):
    with start_cloud(tmp_path, clock) as server:
        yield server


def _postgres():
    if not PG_URL:
        pytest.skip("no PostgreSQL: run scripts/postgres-for-tests.sh and export TAPSHARE_TEST_POSTGRES_URL")
    return _fresh_postgres_database()


def machine(cloud, clock, machine_id: str):
    dev = cloud.provision(machine_id)
    dev.offset = clock.shift_ms
    clock.devices.append(dev)
    return dev


def send(dev, *events) -> list[dict]:
    r = dev.request("POST", "/device/v1/events", {"events": list(events)})
    assert r.status_code == 200, r.text
    return r.json()["results"]


def cases(cloud, token=None, **query) -> dict:
    r = cloud.op("GET", CASES, token=token, params=query)
    assert r.status_code == 200, r.text
    return r.json()


def find(cloud, rule: str, machine_id: str | None = None, state: str = "active") -> dict | None:
    query = {"rule": rule, "state": state, **({"machine_id": machine_id} if machine_id else {})}
    found = cases(cloud, **query)["alarms"]
    return found[0] if found else None


def wait_case(cloud, rule: str, machine_id: str | None = None, state: str = "active", timeout_s: float = 10) -> dict:
    assert wait_until(lambda: find(cloud, rule, machine_id, state) is not None, timeout_s), \
        (rule, machine_id, state, cases(cloud)["alarms"])
    return find(cloud, rule, machine_id, state)


def wait_resolved(cloud, alarm_id: int) -> dict:
    assert wait_until(lambda: get(cloud, alarm_id)["state"] == "resolved"), get(cloud, alarm_id)
    return get(cloud, alarm_id)


def get(cloud, alarm_id: int) -> dict:
    r = cloud.op("GET", f"{CASES}/{alarm_id}")
    assert r.status_code == 200, r.text
    return r.json()


def check(cloud) -> tuple[int, int]:
    """One check of the rules now (the background task does the same every 50 ms)."""
    return cloud.app.state.services.alarms.check(cloud.settings.clock_ms())


def stays(cloud, alarm_id: int, state: str) -> None:
    """Checked again after what was just sent, the alarm is still in ``state``."""
    check(cloud)
    assert get(cloud, alarm_id)["state"] == state


LEAK_WORDS = {"reason": "leak_sensor", "detail": "the leak sensor is wet"}


# ---------------------------------------------------------------- machines not heard from

def test_a_silent_machine_is_an_alarm_until_it_is_heard_again(both, clock):
    dev = machine(both, clock, "OFF1")
    assert dev.heartbeat().status_code == 200
    talks = machine(both, clock, "OFF2")
    clock.forward(290_000)
    assert talks.heartbeat().status_code == 200
    check(both)
    assert find(both, "offline") is None                     # not yet five minutes
    clock.forward(11_000)
    alarm = wait_case(both, "offline", "OFF1")
    assert alarm["severity"] == "critical" and alarm["state"] == "open" and alarm["location"] == "Lobby"
    assert alarm["detail"]["silent_s"] >= 300 and alarm["title_en"] == "machine offline"
    assert alarm["title_zh"] == "机器离线" and alarm["system_resolves"] and find(both, "offline", "OFF2") is None
    assert dev.heartbeat().status_code == 200
    done = wait_resolved(both, alarm["alarm_id"])
    assert done["resolved_by"] == "system" and "heard from again" in done["resolve_note"]
    # silent again: a new alarm, the resolved one stays as it was
    clock.forward(301_000)
    again = wait_case(both, "offline", "OFF1")
    assert again["alarm_id"] != alarm["alarm_id"] and get(both, alarm["alarm_id"])["state"] == "resolved"


def test_a_machine_holding_a_long_poll_is_not_offline(cloud, clock):
    dev = machine(cloud, clock, "POLL1")
    assert dev.heartbeat().status_code == 200
    polling = threading.Thread(target=dev.poll, kwargs={"wait_ms": 2_000})
    polling.start()
    hub = cloud.app.state.hub
    assert wait_until(lambda: hub.connected("POLL1"))
    clock.forward(600_000)
    check(cloud)
    assert find(cloud, "offline", "POLL1") is None          # its last heartbeat is old, but it is connected now
    polling.join()
    wait_case(cloud, "offline", "POLL1")                      # once the poll is over and the hub forgets it


def test_the_round_reads_only_machines_that_may_need_a_change(both, clock, monkeypatch):
    """A fleet's healthy machines are not read by every round (at 10,000 machines that read held a core's share
    every 5 s): each heartbeat is judged when it arrives and the machine keeps whether it showed anything."""
    alarms = both.app.state.services.alarms
    silent = machine(both, clock, "QUIET")
    assert silent.heartbeat().status_code == 200
    clock.forward(301_000)
    healthy = [machine(both, clock, f"OK{i:02d}") for i in range(20)]
    for dev in healthy:
        assert dev.heartbeat(temp_c=12.0, tds_ppm=50).status_code == 200
    leaking = machine(both, clock, "WET")
    assert leaking.heartbeat(lockouts=["leak_sensor"]).status_code == 200
    with both.app.state.database.read() as conn:
        hints = dict(conn.execute(select(t.machines.c.machine_id, t.machines.c.alarm_hint)).all())
    assert hints["WET"] is True and hints["QUIET"] is False and {hints[d.machine_id] for d in healthy} == {False}
    judged: list[str] = []
    judge = alarms._judge
    monkeypatch.setattr(alarms, "_judge", lambda m, *a: judged.append(m["machine_id"]) or judge(m, *a))
    leak = wait_case(both, "leak", "WET")
    wait_case(both, "offline", "QUIET")
    judged.clear()
    check(both)
    assert sorted(set(judged)) == ["QUIET", "WET"]            # the silent one and the wet one, none of the 20
    # the leak is fixed: judged (it has an alarm) and resolved; from then on it is not read either
    assert leaking.heartbeat(lockouts=[]).status_code == 200
    wait_resolved(both, leak["alarm_id"])
    judged.clear()
    check(both)
    assert sorted(set(judged)) == ["QUIET"]


# ---------------------------------------------------------------- what the heartbeat says

@pytest.mark.parametrize("lockout, rule, severity, words_first", [
    ("leak_sensor", "leak", "critical", True),
    ("fault:storage", "storage", "critical", False),
    ("fault:valve", "hardware", "critical", True),
    ("low_water", "low_water", "warning", False),
])
def test_a_lockout_is_an_alarm_until_the_machine_lifts_it(cloud, clock, lockout, rule, severity, words_first):
    dev = machine(cloud, clock, "LOCK1")
    words = {"reason": lockout, "detail": f"why {lockout}"}
    if words_first:                                           # the event first, then the heartbeat: words looked up
        send(dev, dev.event("1-1", "lockout", words))
    assert dev.heartbeat(state="out_of_service", lockouts=[lockout]).status_code == 200
    alarm = wait_case(cloud, rule, "LOCK1")
    if not words_first:                                       # the heartbeat first: the event adds its words
        send(dev, dev.event("1-1", "lockout", words))
    assert wait_until(lambda: get(cloud, alarm["alarm_id"])["detail"].get("words") == {lockout: f"why {lockout}"})
    assert alarm["severity"] == severity and alarm["detail"]["lockouts"] == [lockout]
    stays(cloud, alarm["alarm_id"], "open")
    # an event that the outbox delivers late says nothing the heartbeat has not said: it does not resolve it
    send(dev, dev.event("1-2", "lockout_cleared", {"reason": lockout, "source": "site", "actor": "pin"}))
    stays(cloud, alarm["alarm_id"], "open")
    assert dev.heartbeat(lockouts=[]).status_code == 200
    done = wait_resolved(cloud, alarm["alarm_id"])
    assert done["resolved_by"] == "system" and done["detail"]["words"] == {lockout: f"why {lockout}"}
    with cloud.app.state.database.read() as conn:          # free for the next one
        assert conn.execute(select(t.operator_alarms.c.open_key)).scalars().all() == [None]


def test_several_faults_are_one_hardware_alarm_and_an_operator_lockout_is_none(cloud, clock):
    dev = machine(cloud, clock, "HW1")
    assert dev.heartbeat(lockouts=["fault:valve", "operator"]).status_code == 200
    alarm = wait_case(cloud, "hardware", "HW1")
    assert dev.heartbeat(lockouts=["fault:flow_meter", "fault:valve", "operator"]).status_code == 200
    assert wait_until(lambda: get(cloud, alarm["alarm_id"])["detail"]["lockouts"] == ["fault:flow_meter",
                                                                                       "fault:valve"])
    assert cases(cloud, machine_id="HW1")["counts"]["active"] == 1    # taken out of service by an operator: no alarm
    # an operator resolves it while the faults remain: the next check opens a new one
    r = cloud.op("POST", f"{CASES}/{alarm['alarm_id']}/resolve", json={"note": "valve replaced"})
    assert r.status_code == 200 and r.json()["resolved_by"].startswith("admin-")
    again = wait_case(cloud, "hardware", "HW1")
    assert again["alarm_id"] != alarm["alarm_id"]


def test_refused_reports_are_an_alarm_until_the_machine_has_none(cloud, clock):
    dev = machine(cloud, clock, "DL1")
    refused = {"event_id": "1-7", "kind": "tech_pour", "error": "malformed tech_pour report"}
    assert dev.heartbeat(dead_letters=1).status_code == 200
    alarm = wait_case(cloud, "dead_letter", "DL1")
    assert alarm["severity"] == "warning" and alarm["detail"]["dead_letters"] == 1
    send(dev, dev.event("1-8", "report_dead_lettered", refused))
    assert wait_until(lambda: get(cloud, alarm["alarm_id"])["detail"].get("reports") == [refused])
    assert dev.heartbeat(dead_letters=0).status_code == 200       # retried or discarded by the technician
    assert wait_resolved(cloud, alarm["alarm_id"])["resolved_by"] == "system"


def test_ghost_flow_drips_and_lockout_clear_only_after_a_quiet_spell(cloud, clock):
    dev = machine(cloud, clock, "GH1")
    noise = machine(cloud, clock, "GH2")
    send(noise, noise.event("1-1", "ghost_flow", {"pulses": 2, "volume_ml": 4}))          # meter noise
    send(dev, dev.event("1-1", "ghost_flow", {"pulses": 20, "volume_ml": 44}))            # a drip
    alarm = find(cloud, "ghost_flow", "GH1")                  # opened with the event, no check needed
    assert alarm["severity"] == "warning" and alarm["detail"]["ghost_ml"] == 44
    assert find(cloud, "ghost_flow", "GH2") is None
    send(dev, dev.event("1-2", "ghost_flow", {"pulses": 30, "volume_ml": 66}))
    # it goes on until the machine locks itself out: the same alarm, now critical
    assert dev.heartbeat(lockouts=["ghost_flow"]).status_code == 200
    assert wait_until(lambda: get(cloud, alarm["alarm_id"])["severity"] == "critical")
    a = get(cloud, alarm["alarm_id"])
    assert (a["detail"]["ghost_ml"], a["detail"]["occurrences"], a["detail"]["lockouts"]) == (66, 2, ["ghost_flow"])
    assert len(cases(cloud, rule="ghost_flow")["alarms"]) == 1
    # the lockout cleared remotely: still open while a drip may come again
    assert dev.heartbeat(lockouts=[]).status_code == 200
    stays(cloud, alarm["alarm_id"], "open")
    clock.forward(16 * 60_000)
    assert dev.heartbeat(lockouts=[]).status_code == 200
    assert wait_resolved(cloud, alarm["alarm_id"])["resolved_by"] == "system"


def test_water_temperature_out_of_its_band(cloud, clock):
    dev = machine(cloud, clock, "T1")
    assert dev.heartbeat(temp_c=12.0).status_code == 200
    check(cloud)
    assert find(cloud, "temperature", "T1") is None
    assert dev.heartbeat(temp_c=33.5).status_code == 200
    alarm = wait_case(cloud, "temperature", "T1")
    assert alarm["severity"] == "warning" and alarm["detail"] == {"temp_c": 33.5, "band_c": [2.0, 30.0],
                                                                  "locked_out": False}
    assert dev.heartbeat(temp_c=None).status_code == 200        # the sensor failed: unknown proves nothing
    stays(cloud, alarm["alarm_id"], "open")
    assert dev.heartbeat(temp_c=12.0).status_code == 200
    wait_resolved(cloud, alarm["alarm_id"])
    # the machine's own judgement counts too (its band and its duration), whatever the reading now
    send(dev, dev.event("1-1", "lockout", {"reason": "temperature", "detail": "tank water at 36.0 C for 600 s"}))
    assert dev.heartbeat(temp_c=29.0, lockouts=["temperature"]).status_code == 200
    locked = wait_case(cloud, "temperature", "T1")
    assert locked["detail"]["locked_out"] is True
    assert locked["detail"]["words"] == {"temperature": "tank water at 36.0 C for 600 s"}


def test_tds_too_high_and_a_machine_without_a_probe(cloud, clock):
    dev = machine(cloud, clock, "Q1")
    old = machine(cloud, clock, "Q2")
    assert old.heartbeat().status_code == 200                   # no probe (tds_ppm absent): never an alarm
    assert dev.heartbeat(tds_ppm=380).status_code == 200        # under the default 400: no alarm
    check(cloud)
    assert find(cloud, "tds", "Q1") is None
    assert dev.heartbeat(tds_ppm=420).status_code == 200
    alarm = wait_case(cloud, "tds", "Q1")
    assert alarm["detail"]["tds_ppm"] == 420 and alarm["detail"]["max_ppm"] == 400
    assert dev.heartbeat().status_code == 200                   # no reading this time
    stays(cloud, alarm["alarm_id"], "open")
    assert dev.heartbeat(tds_ppm=12).status_code == 200
    wait_resolved(cloud, alarm["alarm_id"])
    assert find(cloud, "tds", "Q2", state="resolved") is None and find(cloud, "tds", "Q2") is None


def consumable(kind: str, permille: int, due: bool) -> dict:
    return {"kind": kind, "used_l": 3 * permille, "life_l": 3_000 if kind == "filter" else 0, "used_days": 20,
            "life_days": 180 if kind == "filter" else 365, "used_permille": permille, "due": due}


def test_a_filter_or_uv_lamp_due_and_machines_too_old_to_say(cloud, clock):
    dev = machine(cloud, clock, "F1")
    hb = {"consumables": [consumable("filter", 950, True), consumable("uv_lamp", 100, False)], "price_fen_per_l": 200}
    assert dev.heartbeat(**hb).status_code == 200
    alarm = wait_case(cloud, "filter_due", "F1")
    assert alarm["severity"] == "info" and alarm["detail"]["used_permille"] == 950
    check(cloud)
    assert find(cloud, "uv_lamp_due", "F1") is None
    stored = cloud.op("GET", "/api/v1/operator/machines").json()["machines"][0]["heartbeat"]
    assert stored["price_fen_per_l"] == 200 and stored["consumables"][1]["kind"] == "uv_lamp"
    assert dev.heartbeat().status_code == 200                   # older software: the fields left out, accepted
    stays(cloud, alarm["alarm_id"], "open")
    bad = dev.heartbeat(consumables=[{**consumable("filter", 1, False), "kind": "membrane"}])
    assert bad.status_code == 422
    assert dev.heartbeat(consumables=[consumable("filter", 0, False), consumable("uv_lamp", 1_000, True)]).ok
    assert wait_resolved(cloud, alarm["alarm_id"])["resolved_by"] == "system"     # replaced
    assert wait_case(cloud, "uv_lamp_due", "F1")["title_zh"] == "紫外灯需更换"


def test_the_dispenser_reports_its_consumables_and_price_and_an_old_filter_is_an_alarm(tmp_path, clock):
    from tests.test_sync import Dispenser
    with start_cloud(tmp_path, clock) as cloud:
        dev = cloud.provision("S9", price=230)
        d = Dispenser(tmp_path, cloud.url, "S9", dev.secret)
        # the filter was last replaced 200 days ago (its life: 180 days); the UV lamp never, i.e. at first boot
        d.rt.ledger.set_setting("consumable_filter", {"pulses": 0, "wall_ms": real_ms() - 200 * 86_400_000})
        with d:
            alarm = wait_case(cloud, "filter_due", "S9")

            def heartbeat():
                return cloud.op("GET", "/api/v1/operator/machines").json()["machines"][0]["heartbeat"]
            # what its screen shows: its configured price until the cloud's settings come back, then the cloud's
            assert wait_until(lambda: heartbeat()["price_fen_per_l"] == 230)
            hb = heartbeat()
            used = {c["kind"]: c for c in hb["consumables"]}
            assert used["filter"]["used_days"] == 200 and used["filter"]["due"] is True
            assert used["uv_lamp"]["used_days"] == 0 and used["uv_lamp"]["due"] is False
            assert alarm["detail"]["used_days"] == 200 and alarm["detail"]["life_days"] == 180


# ---------------------------------------------------------------- what the cloud finds itself

def test_a_lost_session_and_an_implausible_report_wait_for_an_operator(cloud, clock):
    dev = machine(cloud, clock, "M1")
    user = cloud.user("13800000201", balance_fen=1_000)
    session, cmd = start_session(cloud, dev, user)
    assert dev.ack(cmd["command_id"]).json()["session_state"] == "active"
    clock.forward(3_000)
    assert dev.heartbeat(session_id=None, outbox_depth=0).status_code == 200
    lost = find(cloud, "session_lost", "M1")
    assert lost["detail"]["session_id"] == session["session_id"] and lost["severity"] == "warning"
    assert lost["system_resolves"] is False
    # a late report settles it, implausibly
    r = dev.report_end("9-2", session["session_id"], 10**9, milli_pulses_per_litre=1_000, volume_ml=1_000_000,
                       cost_fen=100_000_000)
    assert r.json()["results"][0]["status"] == "accepted"
    odd = find(cloud, "implausible_report", "M1")
    assert "calibration 1000" in odd["detail"]["problems"][0]
    assert dev.heartbeat().status_code == 200
    for alarm in (lost, odd):
        stays(cloud, alarm["alarm_id"], "open")                  # nothing the machine says resolves these
        r = cloud.op("POST", f"{CASES}/{alarm['alarm_id']}/resolve", json={"note": "checked the bill"})
        assert r.status_code == 200 and r.json()["state"] == "resolved"


class DownSms:
    name, is_development = "gateway", False

    def send_code(self, phone, code, ttl_min):
        raise SmsFailed(self.name, "InternalError.Timeout", "backend timeout", retryable=True)


def test_the_service_alarms_open_one_case_per_problem(tmp_path, clock):
    with start_cloud(tmp_path, clock, sms_provider=DownSms()) as cloud:
        for phone in ("13900000001", "13900000002"):
            r = requests.post(cloud.url + "/api/v1/auth/sms-code", json={"phone": phone}, timeout=10)
            assert r.status_code == 503 and r.json()["error"] == "sms_unavailable"
        sms = find(cloud, "sms")
        assert sms["machine_id"] is None and sms["location"] is None and sms["severity"] == "warning"
        assert sms["detail"]["code"] == "InternalError.Timeout" and sms["detail"]["occurrences"] == 2
        # a payment notified with another amount than the order's
        from cloud.wallet.payments import Notification
        from tests.test_wallet import topup
        user = cloud.user("13700000201", balance_fen=0)
        order = topup(cloud, user, 1000)
        sandbox = cloud.app.state.services.wallet.provider
        headers, body = sandbox.signed(Notification(notification_id="n-1", order_id=order["order_id"],
                                                    provider_txn_id="sbx-1", amount_fen=1, status="SUCCESS",
                                                    paid_ms=1))
        r = requests.post(cloud.url + "/api/v1/payments/notify", data=body, headers=headers, timeout=10)
        assert r.status_code == 409
        pay = find(cloud, "payments")
        assert pay["severity"] == "critical" and pay["detail"]["kind"] == "amount_mismatch"
        assert pay["detail"]["order_id"] == order["order_id"] and pay["title_zh"] == "支付异常"
        # a bill that does not match our books
        from tests.test_refunds import _day_of, paid_topups
        paid_topups(cloud, user, 500)
        real_bill = sandbox.bill
        sandbox.bill = lambda d: [*real_bill(d), *real_bill(d)[:1]]        # a line printed twice
        with cloud.app.state.database.read() as conn:
            paid_ms = conn.execute(select(func.max(t.topup_orders.c.paid_ms))).scalar()
        day = str(_day_of(paid_ms))
        r = cloud.op("POST", "/api/v1/operator/reconciliations", json={"provider": "sandbox", "bill_date": day})
        assert r.json()["state"] == "mismatch"
        rec = find(cloud, "reconciliation")
        assert rec["detail"]["bill_date"] == day and rec["detail"]["duplicated"] == 1
        check(cloud)
        assert cases(cloud)["counts"] == {"open": 3, "acknowledged": 0, "resolved": 0, "active": 3}
        # the old list still shows them
        old = cloud.op("GET", "/api/v1/operator/alarms").json()["service_alarms"]
        assert sorted(a["source"] for a in old) == ["payments", "reconciliation", "sms", "sms"]


# ---------------------------------------------------------------- the lifecycle API

def drips(cloud, clock, *machine_ids) -> list[int]:
    out = []
    for mid in machine_ids:
        dev = machine(cloud, clock, mid)
        send(dev, dev.event("1-1", "ghost_flow", {"pulses": 20, "volume_ml": 44}))
        out.append(find(cloud, "ghost_flow", mid)["alarm_id"])
    return out


def test_listing_acknowledging_and_resolving(both, clock):
    from cloud.__main__ import create_operator
    first, second, third = drips(both, clock, "L1", "L2", "L3")
    listed = cases(both, state="active")
    assert [a["alarm_id"] for a in listed["alarms"]] == [third, second, first]          # newest first
    assert listed["counts"] == {"open": 3, "acknowledged": 0, "resolved": 0, "active": 3}
    page = cases(both, limit=2)
    assert len(page["alarms"]) == 2 and page["next_before_id"] == second
    rest = cases(both, limit=2, before_id=page["next_before_id"])
    assert [a["alarm_id"] for a in rest["alarms"]] == [first] and rest["next_before_id"] is None
    assert [a["machine_id"] for a in cases(both, machine_id="L2")["alarms"]] == ["L2"]
    assert cases(both, rule="leak")["alarms"] == []
    assert cases(both, machine_id="L2")["counts"]["active"] == 1

    viewer = create_operator(both.settings.url(), "viewer-1", "viewer")
    assert cases(both, token=viewer)["counts"]["active"] == 3
    r = both.op("POST", f"{CASES}/{first}/acknowledge", token=viewer, json={"note": "looking"})
    assert r.status_code == 403 and r.json()["error"] == "forbidden"
    for bad in ({}, {"note": ""}, {"note": "   "}, {"note": "x" * 501}, {"note": 5}, {"note": "ok", "by": "me"}):
        r = both.op("POST", f"{CASES}/{first}/acknowledge", json=bad)
        assert r.status_code == 422 and r.json()["error"] == "invalid_request", (bad, r.text)
    r = both.op("POST", f"{CASES}/{first}/acknowledge", json={"note": "  技术员已出发 / on the way  "})
    assert r.status_code == 200, r.text
    acked = r.json()
    assert acked["state"] == "acknowledged" and acked["ack_note"] == "技术员已出发 / on the way"
    assert acked["acked_by"].startswith("admin-") and acked["acked_ms"] is not None
    again = both.op("POST", f"{CASES}/{first}/acknowledge", json={"note": "me too"})
    assert again.status_code == 409 and again.json()["error"] == "already_acknowledged"
    assert cases(both)["counts"] == {"open": 2, "acknowledged": 1, "resolved": 0, "active": 3}
    assert [a["alarm_id"] for a in cases(both, state="acknowledged")["alarms"]] == [first]

    r = both.op("POST", f"{CASES}/{first}/resolve", json={"note": "valve seat replaced"})
    assert r.status_code == 200 and (r.json()["state"], r.json()["resolve_note"]) == ("resolved", "valve seat replaced")
    for action in ("resolve", "acknowledge"):
        r = both.op("POST", f"{CASES}/{first}/{action}", json={"note": "again"})
        assert r.status_code == 409 and r.json()["error"] == "already_resolved"
        assert "already resolved" in r.json()["message"]
    r = both.op("POST", f"{CASES}/{second}/resolve", json={"note": "a false alarm"})     # straight from open
    assert r.status_code == 200
    assert cases(both)["counts"] == {"open": 1, "acknowledged": 0, "resolved": 2, "active": 1}
    assert [a["alarm_id"] for a in cases(both, state="resolved")["alarms"]] == [second, first]

    with both.app.state.database.read() as conn:
        log = conn.execute(select(t.audit_log.c.action, t.audit_log.c.target, t.audit_log.c.detail)
                           .where(t.audit_log.c.action.like("%_alarm")).order_by(t.audit_log.c.id)).all()
    assert [(a, tg, d["note"]) for a, tg, d in log] == [
        ("acknowledge_alarm", f"alarm:{first}", "技术员已出发 / on the way"),
        ("resolve_alarm", f"alarm:{first}", "valve seat replaced"),
        ("resolve_alarm", f"alarm:{second}", "a false alarm")]

    missing = both.op("POST", f"{CASES}/999999/acknowledge", json={"note": "x"})
    assert missing.status_code == 404 and missing.json()["error"] == "unknown_alarm"
    assert both.op("GET", f"{CASES}/999999").json()["error"] == "unknown_alarm"
    for path in (f"{CASES}/abc", f"{CASES}/0", f"{CASES}?state=closed", f"{CASES}?limit=0", f"{CASES}?limit=501",
                 f"{CASES}?before_id=-1", f"{CASES}?machine_id=" + "m" * 65):
        r = both.op("GET", path)
        assert r.status_code == 422 and r.json()["error"] == "invalid_request", (path, r.text)
    assert requests.get(both.url + CASES, timeout=5).status_code == 401
    # the raw events are still listed where they were
    old = both.op("GET", "/api/v1/operator/alarms").json()["alarms"]
    assert sorted(a["machine_id"] for a in old if a["kind"] == "ghost_flow") == ["L1", "L2", "L3"]


# ---------------------------------------------------------------- races (PostgreSQL)

@pytest.fixture
def pg(tmp_path, clock):
    url, drop = _postgres()
    with start_cloud(tmp_path, clock, url, alarm_check_interval_s=3600) as server:     # the test checks, at once
        yield server
    server.app.state.database.dispose()
    drop()


def test_parallel_checks_events_and_acknowledgements_change_each_alarm_once(pg, clock):
    devs = [machine(pg, clock, f"P{i}") for i in range(4)]
    for d in devs:
        assert d.heartbeat(lockouts=["leak_sensor"], temp_c=40.0).status_code == 200
    results = at_once([lambda: check(pg)] * 12)
    assert sum(o for o, _ in results) == 8
    with pg.app.state.database.read() as conn:
        a = t.operator_alarms.c
        counts = conn.execute(select(a.rule, a.machine_id, func.count()).group_by(a.rule, a.machine_id)).all()
    assert sorted(counts) == sorted([(r, d.machine_id, 1) for d in devs for r in ("leak", "temperature")])
    # 16 drips from one machine at once: one alarm, every one counted
    dev = devs[0]
    answers = at_once([lambda i=i: send(dev, dev.event(f"2-{i}", "ghost_flow", {"pulses": 9, "volume_ml": 20}))
                       for i in range(16)])
    assert all(r[0]["status"] == "accepted" for r in answers)
    ghost = cases(pg, rule="ghost_flow")["alarms"]
    assert len(ghost) == 1 and ghost[0]["detail"]["occurrences"] == 16
    # ten operators acknowledge at once: one does
    acks = at_once([lambda i=i: pg.op("POST", f"{CASES}/{ghost[0]['alarm_id']}/acknowledge", json={"note": f"#{i}"})
                    for i in range(10)])
    assert sorted(r.status_code for r in acks) == [200] + [409] * 9
    # the conditions clear; parallel checks resolve each alarm once
    for d in devs:
        assert d.heartbeat(temp_c=10.0).status_code == 200
    results = at_once([lambda: check(pg)] * 12)
    assert sum(r for _, r in results) == 8
    assert cases(pg)["counts"]["active"] == 1 and cases(pg)["counts"]["resolved"] == 8


# ---------------------------------------------------------------- notifications

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Mailbox:
    """A real SMTP server (aiosmtpd) on loopback that keeps every message it is given."""

    def __init__(self, port: int | None = None, delay_s: float = 0.0) -> None:
        self.port, self.delay_s, self.messages = port or free_port(), delay_s, []
        self.controller = Controller(self, hostname="127.0.0.1", port=self.port)

    async def handle_DATA(self, server, session, envelope):
        if self.delay_s:
            import asyncio
            await asyncio.sleep(self.delay_s)
        self.messages.append((envelope.mail_from, list(envelope.rcpt_tos),
                              email.message_from_bytes(envelope.content, policy=email.policy.default)))
        return "250 OK"

    def __enter__(self) -> Mailbox:
        self.controller.start()
        return self

    def __exit__(self, *exc) -> None:
        self.controller.stop()


SECRET = b"whsec-test-0123456789abcdef"


def verify(secret: bytes, headers, raw: bytes, now_s: int, tolerance_s: int = 300) -> bool:
    """What a receiver does: recompute the HMAC over "<t>.<raw body>", compare in constant time, refuse old ones."""
    parts = dict(x.split("=", 1) for x in headers.get("X-Tapshare-Signature", "").split(","))
    expected = hmac.new(secret, parts["t"].encode() + b"." + raw, hashlib.sha256).hexdigest()
    return hmac.compare_digest(expected, parts.get("v1", "")) and abs(now_s - int(parts["t"])) <= tolerance_s


class Receiver:
    """A webhook receiver on loopback: records each delivery and whether its signature verified; answers
    ``status``."""

    def __init__(self, status: int = 204) -> None:
        self.status, self.got = status, []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                raw = self.rfile.read(int(self.headers["Content-Length"]))
                outer.got.append((dict(self.headers), raw, verify(SECRET, self.headers, raw, real_ms() // 1000)))
                self.send_response(outer.status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args):
                pass
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hooks/tapshare"
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True)

    def __enter__(self) -> Receiver:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()


def mail_settings(port: int, **more) -> dict:
    return {"smtp_host": "127.0.0.1", "smtp_port": port, "smtp_starttls": False, "alarm_notify_retry_s": 0.05,
            "alarm_email_from": "Tapshare 告警 <alarms@water.example>",
            "alarm_email_to": "ops@water.example, night@water.example", **more}


def test_an_alarm_is_mailed_once_in_chinese_then_english_and_posted_signed(tmp_path, clock):
    secret_file = tmp_path / "webhook.secret"
    secret_file.write_bytes(SECRET + b"\n")
    with Mailbox() as box, Receiver() as hook, start_cloud(
            tmp_path, clock, **mail_settings(box.port), alarm_webhook_url=hook.url,
            alarm_webhook_secret_file=str(secret_file)) as cloud:
        dev = machine(cloud, clock, "MAIL1")
        cloud.op("PATCH", "/api/v1/operator/machines/MAIL1", json={"location": "图书馆一楼\nLibrary"})
        send(dev, dev.event("1-1", "lockout", LEAK_WORDS))
        assert dev.heartbeat(lockouts=["leak_sensor"], consumables=[consumable("filter", 990, True)]).ok
        alarm = wait_case(cloud, "leak", "MAIL1")
        assert wait_until(lambda: len(box.messages) == 1 and len(hook.got) == 1)
        sender, rcpt, msg = box.messages[0]
        assert sender == "alarms@water.example" and rcpt == ["ops@water.example", "night@water.example"]
        subject = msg["Subject"]
        assert subject.startswith("[Tapshare] 严重 漏水：机器 MAIL1 (图书馆一楼 Library) / "
                                  "CRITICAL leak: machine MAIL1 (图书馆一楼 Library)")
        assert f"(#{alarm['alarm_id']})" in subject
        body = msg.get_content()
        link = f"{cloud.url}/console#/alarms/{alarm['alarm_id']}"
        assert msg.get_content_charset() == "utf-8" and body.count(link) == 2
        assert body.index("漏水") < body.index("开始时间") < body.index("CRITICAL: leak") < body.index("Since:")
        assert "(Asia/Shanghai)" in body and "the leak sensor is wet" in body and "图书馆一楼" in body
        headers, raw, verified = hook.got[0]
        assert verified and headers["X-Tapshare-Alarm-Id"] == str(alarm["alarm_id"])
        assert not verify(SECRET, headers, raw.replace(b"leak", b"lake"), real_ms() // 1000)     # tampered: refused
        assert not verify(b"another secret", headers, raw, real_ms() // 1000)
        payload = json.loads(raw)
        assert payload["alarm_id"] == alarm["alarm_id"] and payload["rule"] == "leak" and payload["url"] == link
        assert payload["title_zh"] == "漏水" and payload["detail"]["words"] == {"leak_sensor": "the leak sensor is wet"}
        assert wait_until(lambda: get(cloud, alarm["alarm_id"])["notifications"]["email"] == "sent")
        sent = get(cloud, alarm["alarm_id"])
        assert sent["emailed_ms"] and sent["webhooked_ms"] and sent["notifications"] == {
            "email": "sent", "webhook": "sent", "attempts": 1, "error": None}
        # at most once: more rounds send nothing; the filter (info) is below the severity sent
        notifier = cloud.app.state.services.alarms.notifier
        assert notifier.send_due() == 0 and len(box.messages) == 1 and len(hook.got) == 1
        filt = wait_case(cloud, "filter_due", "MAIL1")
        assert filt["notifications"]["email"] == "not_sent" and notifier.send_due() == 0


def test_a_mail_server_that_is_down_is_retried_and_mails_once_when_up(tmp_path, clock):
    port = free_port()
    with start_cloud(tmp_path, clock, **mail_settings(port)) as cloud:
        dev = machine(cloud, clock, "DOWN1")
        assert dev.heartbeat(lockouts=["fault:storage"]).status_code == 200
        alarm = wait_case(cloud, "storage", "DOWN1")
        seen = []

        def failed_twice_and_between_attempts():
            # the notifier retries on its own; a read taken while it holds the claim says "sending"
            seen.append(get(cloud, alarm["alarm_id"]))
            return seen[-1]["notify_attempts"] >= 2 and seen[-1]["notifications"]["email"] != "sending"

        assert wait_until(failed_twice_and_between_attempts)
        failing = seen[-1]
        assert "email: ConnectionRefusedError" in failing["notify_error"] and failing["emailed_ms"] is None
        assert failing["notifications"]["email"] == "not_sent"
        with Mailbox(port) as box:
            assert wait_until(lambda: get(cloud, alarm["alarm_id"])["notifications"]["email"] == "sent")
            sent = get(cloud, alarm["alarm_id"])
            assert sent["notify_error"] is None and sent["emailed_ms"] > 0
            assert cloud.app.state.services.alarms.notifier.send_due() == 0
            assert len(box.messages) == 1 and "存储故障" in box.messages[0][2]["Subject"]


def test_a_webhook_that_keeps_failing_is_given_up_with_its_error_kept(tmp_path, clock):
    from cloud.alarms.notify import MAX_ATTEMPTS
    secret_file = tmp_path / "s"
    secret_file.write_bytes(SECRET)
    with Receiver(status=500) as hook, start_cloud(tmp_path, clock, alarm_webhook_url=hook.url,
                                                   alarm_webhook_secret_file=str(secret_file),
                                                   alarm_notify_retry_s=0.01) as cloud:
        [alarm_id] = drips(cloud, clock, "W1")
        assert wait_until(lambda: get(cloud, alarm_id)["notifications"]["webhook"] == "gave_up", 20)
        gave_up = get(cloud, alarm_id)
        assert gave_up["notify_attempts"] == MAX_ATTEMPTS and len(hook.got) == MAX_ATTEMPTS
        assert gave_up["notify_error"].startswith(f"gave up after {MAX_ATTEMPTS} attempts: webhook: "
                                                  "RuntimeError: HTTP 500")
        assert all(verified for _, _, verified in hook.got)
        assert cloud.app.state.services.alarms.notifier.send_due() == 0 and len(hook.got) == MAX_ATTEMPTS


def test_two_clouds_on_one_database_open_one_alarm_and_mail_it_once(tmp_path, clock):
    url, drop = _postgres()
    try:
        with Mailbox(delay_s=0.2) as box, start_cloud(tmp_path, clock, url, "a", **mail_settings(box.port)) as one, \
                start_cloud(tmp_path, clock, url, "b", **mail_settings(box.port)) as two:
            devs = [machine(one, clock, f"TWO{i}") for i in range(5)]
            for d in devs:
                assert d.heartbeat(lockouts=["leak_sensor"]).status_code == 200
            assert wait_until(lambda: len(cases(two, rule="leak")["alarms"]) == 5)
            # and two more notifier loops at once, beside the clouds' own
            notifiers = [s.app.state.services.alarms.notifier for s in (one, two)]
            at_once([n.send_due for n in notifiers] * 4)
            assert wait_until(lambda: all(a["notifications"]["email"] == "sent"
                                          for a in cases(one, rule="leak")["alarms"]))
            # every alarm is marked sent only after its mail was taken, and a claim is needed to send: all are in
            ids = sorted(int(m["Subject"].rsplit("#", 1)[1].rstrip(")")) for _, _, m in box.messages)
            assert ids == sorted(a["alarm_id"] for a in cases(one, rule="leak")["alarms"])
            with one.app.state.database.read() as conn:
                assert conn.execute(select(func.count()).select_from(t.operator_alarms)).scalar() == 5
        one.app.state.database.dispose()
        two.app.state.database.dispose()
    finally:
        drop()


# ---------------------------------------------------------------- settings

def test_alarm_settings_are_checked_naming_the_variable(tmp_path, monkeypatch):
    for var, value, said in [
            ("TAPSHARE_SMTP_PORT", "smtp", "TAPSHARE_SMTP_PORT: must be a whole number from 1 to 65535, got 'smtp'"),
            ("TAPSHARE_ALARM_OFFLINE_AFTER_S", "0", "TAPSHARE_ALARM_OFFLINE_AFTER_S: must be from 1"),
            ("TAPSHARE_SMTP_STARTTLS", "yes", "TAPSHARE_SMTP_STARTTLS: must be 1 (on) or 0 (off)"),
            ("TAPSHARE_ALARM_NOTIFY_MIN_SEVERITY", "loud", "TAPSHARE_ALARM_NOTIFY_MIN_SEVERITY: must be critical"),
            ("TAPSHARE_ALARM_EMAIL_TO", "ops@water.example", "TAPSHARE_SMTP_HOST is not"),
            ("TAPSHARE_ALARM_WEBHOOK_URL", "ftp://hooks", "TAPSHARE_ALARM_WEBHOOK_URL: must start with https://"),
            ("TAPSHARE_ALARM_TEMP_MIN_C", "40", "TAPSHARE_ALARM_TEMP_MIN_C: must be below TAPSHARE_ALARM_TEMP_MAX_C")]:
        with monkeypatch.context() as m:
            m.setenv(var, value)
            with pytest.raises(SettingsError, match=said.replace("(", r"\(").replace(")", r"\)")):
                CloudSettings(data_dir=tmp_path)
    with monkeypatch.context() as m:
        m.setenv("TAPSHARE_SMTP_HOST", "smtp.example")
        m.setenv("TAPSHARE_ALARM_EMAIL_FROM", "alarms@water.example")
        with pytest.raises(SettingsError, match="TAPSHARE_ALARM_EMAIL_TO must say"):
            CloudSettings(data_dir=tmp_path)
        m.setenv("TAPSHARE_ALARM_EMAIL_TO", "ops@water.example,\r\nBcc: x@evil.example")
        with pytest.raises(SettingsError, match="TAPSHARE_ALARM_EMAIL_TO: not an email address"):
            CloudSettings(data_dir=tmp_path)
        m.setenv("TAPSHARE_ALARM_EMAIL_TO", "ops@water.example, night@water.example")
        m.setenv("TAPSHARE_SMTP_PASSWORD_FILE", str(tmp_path / "missing"))
        s = CloudSettings(data_dir=tmp_path)
        assert s.email_to() == ["ops@water.example", "night@water.example"] and s.smtp_starttls and s.smtp_port == 587
        with pytest.raises(SettingsError, match="TAPSHARE_SMTP_PASSWORD_FILE: cannot read"):
            s.notify_settings()
        (tmp_path / "pw").write_text("s3cret\n")
        m.setenv("TAPSHARE_SMTP_PASSWORD_FILE", str(tmp_path / "pw"))
        assert CloudSettings(data_dir=tmp_path).notify_settings().smtp_password == "s3cret"
    d = CloudSettings(data_dir=tmp_path)
    assert (d.alarm_offline_after_s, d.alarm_temp_min_c, d.alarm_temp_max_c, d.alarm_tds_max_ppm,
            d.alarm_check_interval_s, d.alarm_notify_min_severity) == (300, 2.0, 30.0, 400, 5.0, "warning")


def test_production_refuses_a_plain_webhook_and_one_without_a_secret(tmp_path, monkeypatch):
    from cloud.accounts.providers import ManualReview
    from cloud.app import create_app
    from tests.test_accounts import OPERATOR, RealishSms, _RealishPay
    monkeypatch.setenv("TAPSHARE_CLOUD_KEY", "11" * 32)
    real = {"production": True, "public_url": "https://water.example", "sms_provider": RealishSms(),
            "verifier": ManualReview(), "payment_provider": _RealishPay(), **OPERATOR}
    with pytest.raises(ProductionRefused, match=r"TAPSHARE_ALARM_WEBHOOK_URL must be https:// .*"
                                                r"TAPSHARE_ALARM_WEBHOOK_SECRET_FILE must name"):
        create_app(CloudSettings(data_dir=tmp_path / "a", alarm_webhook_url="http://hooks.example/x", **real))
    with pytest.raises(SettingsError, match="TAPSHARE_ALARM_WEBHOOK_SECRET_FILE: cannot read"):
        create_app(CloudSettings(data_dir=tmp_path / "b", alarm_webhook_url="https://hooks.example/x",
                                 alarm_webhook_secret_file=str(tmp_path / "nowhere"), **real))
    (tmp_path / "empty").write_text(" \n")
    with pytest.raises(SettingsError, match=r"TAPSHARE_ALARM_WEBHOOK_SECRET_FILE: .* is empty"):
        create_app(CloudSettings(data_dir=tmp_path / "c", alarm_webhook_url="https://hooks.example/x",
                                 alarm_webhook_secret_file=str(tmp_path / "empty"), **real))
    with pytest.raises(ProductionRefused, match="the SMTP password would cross the network in clear"):
        create_app(CloudSettings(data_dir=tmp_path / "e", smtp_host="smtp.example", smtp_user="alarms",
                                 smtp_starttls=False, alarm_email_from="a@water.example",
                                 alarm_email_to="ops@water.example", **real))
    (tmp_path / "secret").write_text("whsec-1")
    app = create_app(CloudSettings(data_dir=tmp_path / "d", alarm_webhook_url="https://hooks.example/x",
                                   alarm_webhook_secret_file=str(tmp_path / "secret"), **real))
    assert app.state.services.alarms.notifier.cfg.webhook_secret == b"whsec-1"
    with contextlib.suppress(Exception):
        app.state.database.dispose()
