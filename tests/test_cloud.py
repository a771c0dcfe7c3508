"""The cloud service over real HTTP on loopback, on SQLite and on PostgreSQL (the `cloud` fixture)."""

import secrets
import threading
import time

import pytest
import requests

import contract as p
from tests.util import wait_until


def connected(device):
    """A machine counts as connected while it long-polls (and a moment after)."""
    device.poll(wait_ms=0)


def start_session(cloud, device, user, price=200):
    connected(device)
    scan = user.scan(device.machine_id, device.qr())
    assert scan.status_code == 200, scan.text
    r = user.start(scan.json()["presence_token"], price)
    assert r.status_code == 200, r.text
    [cmd] = device.poll()
    assert cmd["kind"] == "start" and cmd["session_id"] == r.json()["session_id"]
    return r.json(), cmd


# ---------------------------------------------------------------- service basics

def test_health_and_openapi(cloud):
    h = requests.get(cloud.url + "/healthz", timeout=5).json()
    assert h["status"] == "ok"
    doc = requests.get(cloud.url + "/openapi.json", timeout=5).json()
    assert "/device/v1/events" in doc["paths"] and "GrantMsg" in doc["components"]["schemas"]


def test_a_server_whose_routes_were_built_builds_none_at_its_first_requests(tmp_path, monkeypatch):
    """FastAPI builds an included router's routes at the first request that reaches it, on the event loop (0.3-0.5
    s under a fleet's load, every held long-poll waiting): ``build_routes`` builds them all beforehand. A request
    for a path no router has tries every router in turn."""
    from fastapi import routing

    from cloud.app import build_routes
    from tests.cloudkit import CloudServer
    built: list[str] = []
    original = routing._IncludedRouter._build_effective_context

    def counting(self, route):
        built.append(getattr(route, "path", "?"))
        return original(self, route)
    monkeypatch.setattr(routing._IncludedRouter, "_build_effective_context", counting)
    with CloudServer(tmp_path / "cloud") as server:
        assert build_routes(server.app) > 100
        at_start = len(built)
        r = requests.get(server.url + "/no/such/page", timeout=5)
        assert r.status_code == 404
        assert requests.get(server.url + "/device/v1/time", timeout=5).status_code == 200
        assert requests.get(server.url + "/api/v1/machines/M1", timeout=5).status_code in (401, 404)
        assert built[at_start:] == []


def test_the_served_cloud_builds_its_routes_before_it_listens(tmp_path, monkeypatch):
    """``python -m cloud serve`` builds every route, then lets the collector freeze what the app holds, then
    listens."""
    import cloud.__main__ as cli
    import cloud.gc_policy
    import cloud.server
    done: list[str] = []
    build = cli.build_routes
    monkeypatch.setattr(cli, "build_routes", lambda app: done.append(f"routes {build(app)}"))
    monkeypatch.setattr(cloud.gc_policy.GcPolicy, "apply", lambda self: done.append("freeze"))
    monkeypatch.setattr(cloud.server.GracefulServer, "run", lambda self: done.append("listen"))
    assert cli.main(["serve", "--data-dir", str(tmp_path / "data"), "--port", "0"]) == 0
    assert len(done) == 3 and done[0].startswith("routes ") and int(done[0].split()[1]) > 100
    assert done[1:] == ["freeze", "listen"]


def test_operator_endpoints_need_a_token_and_a_role(cloud):
    body = {"machine_id": "X1", "price_fen_per_l": 200}
    assert requests.post(cloud.url + "/api/v1/operator/machines", json=body, timeout=5).status_code == 401
    assert cloud.op("POST", "/api/v1/operator/machines", token="nope", json=body).status_code == 401
    from cloud.__main__ import create_operator
    viewer = create_operator(cloud.settings.url(), "v1", "viewer")
    r = cloud.op("POST", "/api/v1/operator/machines", token=viewer, json=body)
    assert r.status_code == 403 and r.json()["error"] == "forbidden"
    assert cloud.op("GET", "/api/v1/operator/machines", token=viewer).status_code == 200


def test_enrolment_tokens_are_single_use(cloud):
    r = cloud.op("POST", "/api/v1/operator/machines", json={"machine_id": "E1", "price_fen_per_l": 150})
    token = r.json()["enrolment_token"]
    first = requests.post(cloud.url + "/device/v1/enroll", json={"machine_id": "E1", "enrolment_token": token},
                          timeout=5)
    assert first.status_code == 200 and len(bytes.fromhex(first.json()["secret_hex"])) == 32
    again = requests.post(cloud.url + "/device/v1/enroll", json={"machine_id": "E1", "enrolment_token": token},
                          timeout=5)
    assert again.status_code == 401 and again.json()["error"] == "enrolment_token_used"
    assert cloud.op("POST", "/api/v1/operator/machines",
                    json={"machine_id": "E1", "price_fen_per_l": 1}).json()["error"] == "machine_exists"


def test_device_secrets_are_encrypted_at_rest(cloud):
    dev = cloud.provision("ENC1")
    from sqlalchemy import select

    from cloud import db as t
    with cloud.app.state.database.read() as conn:
        sealed = conn.execute(select(t.machines.c.secret_enc).where(t.machines.c.machine_id == "ENC1")).scalar()
    assert dev.secret.hex() not in sealed and dev.secret not in sealed.encode()


# ---------------------------------------------------------------- device authentication

def test_signed_requests(cloud):
    a = cloud.provision("A1")
    b = cloud.provision("B1")
    assert a.heartbeat().status_code == 200
    nonce = secrets.token_hex(16)
    assert a.request("POST", "/device/v1/heartbeat", {"state": "idle", "valve_open": False}, nonce=nonce).ok
    replay = a.request("POST", "/device/v1/heartbeat", {"state": "idle", "valve_open": False}, nonce=nonce)
    assert replay.status_code == 401 and replay.json()["error"] == "replayed_nonce"
    forged = a.request("POST", "/device/v1/heartbeat", {"state": "idle", "valve_open": False}, secret=b.secret)
    assert forged.status_code == 401 and forged.json()["error"] == "bad_signature"   # B's key cannot act for A
    a.offset = -400_000
    skew = a.heartbeat()
    assert skew.status_code == 401 and skew.json()["error"] == "clock_skew" and "server_time_ms" in skew.json()
    unsigned = requests.post(cloud.url + "/device/v1/heartbeat", json={"state": "idle", "valve_open": False},
                             timeout=5)
    assert unsigned.status_code == 401 and unsigned.json()["error"] == "unsigned"
    ghost = type(a)(cloud.url, "NOPE", bytes(32))
    assert ghost.heartbeat().json()["error"] == "unknown_machine"


def _ready_devices_counting_flushes(cloud, prefix: str, n: int) -> tuple[list, list[int]]:
    """``n`` machines with their connections open and keys cached, and the rows each flush of the replay guard
    wrote from now on."""
    machines = cloud.app.state.services.machines
    devs = [cloud.provision(f"{prefix}{i:02d}") for i in range(n)]
    for d in devs:
        assert d.heartbeat().status_code == 200
    flushed: list[int] = []
    flush = machines.flush_nonces
    machines.flush_nonces = lambda: flushed.append(flush()) or flushed[-1]
    return devs, flushed


@pytest.mark.parametrize("kind", ["poll", "heartbeat"])
def test_polls_arriving_together_share_a_flush_of_the_replay_guard_and_a_replay_is_still_refused(cloud, kind):
    """A long-poll's nonce joins a flush with the others that came within POLL_GATHER_S (a flush per poll was most
    of the cost of a fleet's polls), and a heartbeat's within HEARTBEAT_GATHER_S; it is still durable before the
    request is answered, and a replay is refused at once."""
    method, path, body = ("GET", "/device/v1/commands?wait_ms=0", None) if kind == "poll" else \
        ("POST", "/device/v1/heartbeat", {"state": "idle", "valve_open": False})
    from concurrent.futures import ThreadPoolExecutor
    devs, flushed = _ready_devices_counting_flushes(cloud, "G", 8)
    start = threading.Barrier(len(devs))

    def poll(i: int) -> requests.Response:
        start.wait()
        time.sleep(0.004 * i)                                      # one every 4 ms: 28 ms for the eight
        return devs[i].request(method, path, body)
    with ThreadPoolExecutor(len(devs)) as pool:
        answers = list(pool.map(poll, range(len(devs))))
    assert [r.status_code for r in answers] == [200] * len(devs)
    written = [n for n in flushed if n]
    assert sum(written) == len(devs) and len(written) <= 4, flushed     # gathered, not a flush a poll
    nonce = secrets.token_hex(16)
    t0 = time.monotonic()
    assert devs[0].request(method, path, body, nonce=nonce).status_code == 200
    assert time.monotonic() - t0 < 2                                # alone: answered after its short gather
    replay = devs[0].request(method, path, body, nonce=nonce)
    assert replay.status_code == 401 and replay.json()["error"] == "replayed_nonce"


def test_held_polls_are_written_by_the_periodic_flush_and_durable_while_they_are_held(cloud):
    """A poll that will be held has its nonce written by the instance's periodic flush (every 0.1 s), with every
    other that came meanwhile, not by a flush of its own (ten polls 25 ms apart made about ten flushes); the nonce
    is in the database while the poll is still held, and a replay of it is refused."""
    from concurrent.futures import ThreadPoolExecutor

    from sqlalchemy import func, select

    from cloud import db as t
    devs, flushed = _ready_devices_counting_flushes(cloud, "W", 10)
    nonces = [secrets.token_hex(16) for _ in devs]

    def poll(i: int) -> requests.Response:
        time.sleep(0.025 * i)
        return devs[i].request("GET", "/device/v1/commands?wait_ms=2500", None, nonce=nonces[i])
    with ThreadPoolExecutor(len(devs)) as pool:
        held = [pool.submit(poll, i) for i in range(len(devs))]
        time.sleep(0.025 * len(devs) + 0.4)                        # all sent, each flush done; none answered yet
        assert not any(f.done() for f in held)
        with cloud.app.state.database.read() as conn:
            stored = conn.execute(select(func.count()).select_from(t.nonces).where(
                t.nonces.c.nonce.in_(nonces))).scalar()
        assert stored == len(devs)                                 # durable while held
        answers = [f.result() for f in held]
    assert [r.status_code for r in answers] == [200] * len(devs)
    assert all(r.json()["commands"] == [] for r in answers)
    written = [n for n in flushed if n]
    assert sum(written) >= len(devs) and len(written) <= 5, flushed
    replay = devs[3].request("GET", "/device/v1/commands?wait_ms=0", None, nonce=nonces[3])
    assert replay.status_code == 401 and replay.json()["error"] == "replayed_nonce"


def test_a_stopping_instance_answers_its_held_polls_without_reading_and_still_hands_out_a_command(cloud):
    """Stopping wakes every held poll at once: those with nothing waiting answer without a database read (at
    10,000 machines, 3,000 reads at once outlasted the graceful shutdown and were cancelled as errors), and one
    woken by a command still gets it."""
    from concurrent.futures import ThreadPoolExecutor
    hub, commands = cloud.app.state.hub, cloud.app.state.services.commands
    devs = [cloud.provision(f"H{i:02d}") for i in range(12)]
    user = cloud.user("13800001212", balance_fen=5_000)
    reads: list[str] = []
    pending = commands.pending
    commands.pending = lambda machine_id, now_ms: reads.append(machine_id) or pending(machine_id, now_ms)
    with ThreadPoolExecutor(len(devs)) as pool:
        held = [pool.submit(d.poll, 30_000) for d in devs]
        assert wait_until(lambda: hub.connected_count == len(devs))
        scan = user.scan("H00", devs[0].qr())                     # a command for H00: its poll wakes with it
        started = user.start(scan.json()["presence_token"], 200)
        assert started.status_code == 200, started.text
        [cmd] = held[0].result(timeout=10)
        assert cmd["kind"] == "start" and cmd["session_id"] == started.json()["session_id"]
        reads.clear()
        t0 = time.monotonic()
        hub.close()
        answers = [f.result(timeout=10) for f in held[1:]]
    assert answers == [[]] * (len(devs) - 1) and time.monotonic() - t0 < 5
    assert reads == []


def test_a_drained_instance_answers_its_held_polls_in_turn_not_in_one_wave(cloud, monkeypatch):
    """Behind a balancer, a drained instance that stops answers its held polls RELEASE_PER_S a second, so their
    machines reach the other instances as a stream (3,333 at once kept two instances' cores busy for seconds);
    every poll is answered, none waits for its own end, and a poll that arrives meanwhile is not held."""
    from concurrent.futures import ThreadPoolExecutor
    hub = cloud.app.state.hub
    monkeypatch.setattr(hub, "RELEASE_PER_S", 20)                  # 24 polls: answered over 1.2 s
    devs = [cloud.provision(f"R{i:02d}") for i in range(24)]
    answered: dict[int, float] = {}

    def poll(i: int) -> list:
        cmds = devs[i].poll(30_000)
        answered[i] = time.monotonic()
        return cmds
    with ThreadPoolExecutor(len(devs)) as pool:
        held = [pool.submit(poll, i) for i in range(len(devs))]
        assert wait_until(lambda: hub.connected_count == len(devs))
        t0 = time.monotonic()
        hub.close(spread=True)
        late = devs[0].request("GET", "/device/v1/commands?wait_ms=30000", None)   # arrives while they answer
        assert late.status_code == 200 and late.json()["commands"] == [] and time.monotonic() - t0 < 1.0
        answers = [f.result(timeout=10) for f in held]
    assert answers == [[]] * len(devs)
    times = sorted(t - t0 for t in answered.values())
    assert times[-1] < 5                                            # not held to their end (30 s)
    assert times[-1] - times[0] >= 0.8, times                       # in turn: over about 1.2 s, not at once
    assert sum(1 for t in times if t < 0.3) <= 10, times


def test_the_body_is_signed(cloud):
    a = cloud.provision("A2")
    raw = b'{"state":"idle","valve_open":false}'
    headers = p.signed_headers(a.secret, "A2", "POST", "/device/v1/heartbeat", raw,
                               timestamp_ms=time.time_ns() // 1_000_000, nonce=secrets.token_hex(16))
    tampered = b'{"state":"busy","valve_open":false}'
    r = requests.post(cloud.url + "/device/v1/heartbeat", data=tampered, timeout=5,
                      headers={**headers, "Content-Type": "application/json"})
    assert r.status_code == 401 and r.json()["error"] == "bad_signature"


def test_a_protocol_version_the_cloud_does_not_speak_is_refused_in_words(cloud):
    a = cloud.provision("A3")
    raw = b'{"state":"idle","valve_open":false}'
    for version in ("2", None, "x"):
        headers = p.signed_headers(a.secret, "A3", "POST", "/device/v1/heartbeat", raw,
                                   timestamp_ms=time.time_ns() // 1_000_000, nonce=secrets.token_hex(16))
        if version is None:
            del headers[p.HEADER_PROTOCOL]
        else:
            headers[p.HEADER_PROTOCOL] = version
        r = requests.post(cloud.url + "/device/v1/heartbeat", data=raw, timeout=5,
                          headers={**headers, "Content-Type": "application/json"})
        assert r.status_code == 400 and r.json()["error"] == "unsupported_protocol", r.text
        assert r.json()["supported"] == [1] and "update the machine's software" in r.json()["message"]
    health = requests.get(cloud.url + "/healthz", timeout=5).json()
    assert health["version"] == p.SOFTWARE_VERSION and health["protocol_versions"] == [1]


def test_time_is_unsigned(cloud):
    r = requests.get(cloud.url + "/device/v1/time", timeout=5).json()
    assert abs(r["server_time_ms"] - time.time() * 1000) < 5_000


# ---------------------------------------------------------------- the method: s1-s3, s6, s7

def test_scan_start_pour_report_bill(cloud):
    dev = cloud.provision("M1", price=200)
    user = cloud.user("13800000001", balance_fen=1_000)
    session, cmd = start_session(cloud, dev, user)
    grant = p.GrantMsg(**cmd["grant"])
    assert grant.machine_id == "M1" and grant.credit_limit_fen == 1_000 and grant.price_fen_per_l == 200
    me = user.me()
    assert (me["available_fen"], me["held_fen"], me["balance_fen"]) == (0, 1_000, 1_000)
    assert dev.ack(cmd["command_id"]).status_code == 200
    assert user.call("GET", f"/api/v1/sessions/{session['session_id']}").json()["state"] == "active"
    prog = dev.request("POST", "/device/v1/progress", {"session_id": session["session_id"], "volume_ml": 250,
                                                      "cost_fen": 50, "flow_ml_per_min": 6000, "elapsed_ms": 2500})
    assert prog.ok
    view = user.call("GET", f"/api/v1/sessions/{session['session_id']}").json()
    assert view["progress"]["volume_ml"] == 250
    r = dev.report_end("1-7", session["session_id"], billed_pulses=452)       # 1004 ml: 200 fen
    assert r.json()["results"][0]["status"] == "accepted"
    me = user.me()
    assert (me["available_fen"], me["held_fen"], me["points"]) == (800, 0, 2)
    [bill] = me["bills"]
    assert (bill["amount_fen"], bill["volume_ml"], bill["duration_ms"]) == (200, 1004, 20_000)
    assert bill["water_quality"]["tds_ppm"] == 80 and bill["water_quality"]["temp_end_c"] == 12.5
    assert bill["avg_flow_ml_per_min"] == 1004 * 60_000 // 20_000
    recs = cloud.op("GET", "/api/v1/operator/records", params={"machine_id": "M1"}).json()["records"]
    assert len(recs) == 1 and recs[0]["user_id"] == user.user_id
    assert recs[0]["record"]["flow_series"][1] == [1000, 40, 0, 12.0, True]
    assert recs[0]["record"]["valve_events"][-1] == [20000, "close", "stop_button"]
    assert cloud.op("GET", "/api/v1/operator/records", params={"user_id": "nobody"}).json()["records"] == []


def test_reports_are_idempotent(cloud):
    dev = cloud.provision("M2")
    user = cloud.user("13800000002", balance_fen=1_000)
    session, cmd = start_session(cloud, dev, user)
    dev.ack(cmd["command_id"])
    assert dev.report_end("3-1", session["session_id"], 225).json()["results"][0]["status"] == "accepted"
    again = dev.report_end("3-1", session["session_id"], 225).json()["results"][0]
    assert again["status"] == "duplicate"
    changed = dev.report_end("3-1", session["session_id"], 300).json()["results"][0]
    assert changed["status"] == "rejected" and "different body" in changed["detail"]
    other_id = dev.report_end("4-1", session["session_id"], 225).json()["results"][0]
    assert other_id["status"] == "duplicate" and "already settled" in other_id["detail"]
    assert user.me()["available_fen"] == 900                                  # billed exactly once


def test_the_sessions_csv_streams_every_session_on_either_database(cloud):
    """The operators' export reads its rows as it writes them (a server-side cursor on PostgreSQL, which needs a
    transaction although every other read runs without one): every settled session comes back, newest first."""
    import csv
    import io
    dev = cloud.provision("CSV1")
    user = cloud.user("13800009999", balance_fen=5_000)
    sids = []
    for n in range(3):
        session, cmd = start_session(cloud, dev, user)
        assert dev.ack(cmd["command_id"]).status_code == 200
        assert dev.report_end(f"1-{n + 1}", session["session_id"], 450).json()["results"][0]["status"] == "accepted"
        sids.append(session["session_id"])
    r = cloud.op("GET", "/api/v1/operator/sessions", params={"format": "csv"})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/csv"), r.text[:300]
    rows = list(csv.reader(io.StringIO(r.content.decode("utf-8-sig"))))
    assert [row[0] for row in rows[1:]] == sids[::-1]


def test_the_server_bills_by_its_own_tariff(cloud):
    dev = cloud.provision("M3", price=200)
    user = cloud.user("13800000003", balance_fen=1_000)
    session, cmd = start_session(cloud, dev, user)
    dev.ack(cmd["command_id"])
    res = dev.report_end("1-1", session["session_id"], 450, cost_fen=1, price_fen_per_l=1).json()["results"][0]
    assert res["status"] == "accepted" and "billed 200 fen" in res["detail"]
    assert user.me()["available_fen"] == 800


def test_a_report_from_another_machine_is_rejected(cloud):
    dev = cloud.provision("M4")
    thief = cloud.provision("M5")
    user = cloud.user("13800000004", balance_fen=1_000)
    session, cmd = start_session(cloud, dev, user)
    res = thief.report_end("1-1", session["session_id"], 10).json()["results"][0]
    assert res["status"] == "rejected" and "not started on this machine" in res["detail"]
    assert thief.ack(cmd["command_id"]).status_code == 404


def test_a_machine_that_just_heartbeated_can_be_started_before_its_poll_arrives(cloud):
    """The device shows its QR once a signed heartbeat succeeded; its long-poll may land a moment later."""
    dev = cloud.provision("M6H", price=200)
    user = cloud.user("13800000066", balance_fen=5_000)
    assert dev.heartbeat().status_code == 200
    r = user.start(user.scan("M6H", dev.qr()).json()["presence_token"])
    assert r.status_code == 200, r.text
    [cmd] = dev.poll()                       # the command waited for the poll
    assert cmd["kind"] == "start" and cmd["session_id"] == r.json()["session_id"]


def test_start_refusals(cloud):
    dev = cloud.provision("M6", price=200)
    rich = cloud.user("13800000005", balance_fen=5_000)
    scan = rich.scan("M6", dev.qr()).json()
    offline = rich.start(scan["presence_token"])
    assert offline.status_code == 503 and offline.json()["error"] == "machine_offline"
    connected(dev)
    assert rich.start(scan["presence_token"], price=150).json()["error"] == "price_changed"
    unregistered = cloud.user("13800000006", balance_fen=5_000, registered=False)
    r = unregistered.start(unregistered.scan("M6", dev.qr()).json()["presence_token"])
    assert r.status_code == 403 and r.json()["error"] == "not_registered"
    poor = cloud.user("13800000007", balance_fen=0)
    r = poor.start(poor.scan("M6", dev.qr()).json()["presence_token"])
    assert r.status_code == 402 and r.json()["error"] == "insufficient_balance"
    ok = rich.start(scan["presence_token"])
    assert ok.status_code == 200
    reused = rich.start(scan["presence_token"])          # the real reason first: a pour of theirs is running
    assert reused.status_code == 409 and reused.json()["error"] == "session_open"
    assert reused.json()["session_id"] == ok.json()["session_id"] and reused.json()["machine_id"] == "M6"
    expired_visit = rich.start("x" * 40)                   # even with a visit that is no good any more
    assert expired_visit.json()["error"] == "session_open"
    assert rich.me()["running_session"]["session_id"] == ok.json()["session_id"]
    again = rich.start(rich.scan("M6", dev.qr()).json()["presence_token"])
    assert again.json()["error"] == "session_open"
    other = cloud.user("13800000008", balance_fen=5_000)
    busy = other.start(other.scan("M6", dev.qr()).json()["presence_token"])
    assert busy.status_code == 409 and busy.json()["error"] == "machine_busy"


def test_qr_codes_expire_and_are_bound_to_the_machine(cloud):
    dev = cloud.provision("M7")
    cloud.provision("M8")
    user = cloud.user("13800000009")
    old = p.qr_code(dev.secret, "M7", int(time.time()) - 90)
    r = user.scan("M7", old)
    assert r.status_code == 410 and r.json()["error"] == "qr_expired"
    assert user.scan("M8", dev.qr()).status_code == 410
    assert user.scan("NOPE", dev.qr()).status_code == 404
    assert user.scan("M7", "not-digits").status_code == 410


class MovedClock:
    """The cloud's clock: real time moved on by ``offset_ms``."""

    def __init__(self) -> None:
        self.offset_ms = 0

    def __call__(self) -> int:
        return time.time_ns() // 1_000_000 + self.offset_ms


@pytest.fixture(params=["sqlite", "postgresql"])
def timed_cloud(request, tmp_path):
    """Like ``cloud``, with a clock the test moves on (``timed_cloud.clock``) instead of waiting for it."""
    from tests.cloudkit import PG_URL, CloudServer
    url, drop = "", None
    if request.param == "postgresql":
        if not PG_URL:
            pytest.skip("no PostgreSQL: run scripts/postgres-for-tests.sh and export TAPSHARE_TEST_POSTGRES_URL")
        from tests.conftest import _fresh_postgres_database
        url, drop = _fresh_postgres_database()
    clock = MovedClock()
    with CloudServer(tmp_path / "cloud", database_url=url, clock_ms=clock) as c:
        c.clock = clock
        yield c
    if drop is not None:
        c.app.state.database.dispose()
        drop()


def test_an_unacknowledged_start_is_voided_and_not_charged(timed_cloud):
    from cloud.sessions import service
    cloud = timed_cloud
    dev = cloud.provision("M9")
    user = cloud.user("13800000010", balance_fen=1_000)
    session, cmd = start_session(cloud, dev, user)

    def state() -> str:
        return user.call("GET", f"/api/v1/sessions/{session['session_id']}").json()["state"]
    assert state() == "starting"
    # the machine never claims it: the cloud's clock (and the machine's) moves past the void time, and the
    # cloud's background task voids it on its own
    cloud.clock.offset_ms = dev.offset = service.ACK_TIMEOUT_MS + 1_000
    assert wait_until(lambda: state() == "voided", 5), state()
    view = user.call("GET", f"/api/v1/sessions/{session['session_id']}").json()
    assert view["state"] == "voided" and not view["charged"] and "did not confirm" in view["void_reason"]
    assert user.me()["available_fen"] == 1_000
    late = dev.ack(cmd["command_id"])                             # a late claim is refused: the machine must not pour
    assert late.status_code == 409 and late.json()["error"] == "start_void" and late.json()["session_state"] == "voided"
    assert user.me()["available_fen"] == 1_000
    # if a (faulty) machine poured anyway, its report is still billed for the water measured, never past the grant
    assert dev.report_end("9-1", session["session_id"], 450 * 4).json()["results"][0]["status"] == "accepted"
    me = user.me()
    assert me["available_fen"] == 1_000 - 800 and me["arrears_fen"] == 0 and me["held_fen"] == 0


def test_a_bill_never_exceeds_the_grant_and_an_implausible_report_is_an_alarm(cloud):
    """One report with 10^9 pulses and a calibration of 1,000 once made 2x10^11 fen of arrears and 2x10^9 points."""
    dev = cloud.provision("M9b")
    user = cloud.user("13800000110", balance_fen=1_000)
    session, cmd = start_session(cloud, dev, user)
    assert dev.ack(cmd["command_id"]).status_code == 200
    r = dev.report_end("9-2", session["session_id"], 10**9, milli_pulses_per_litre=1_000, volume_ml=1_000_000,
                       cost_fen=100_000_000)
    assert r.json()["results"][0]["status"] == "accepted" and "implausible" in r.json()["results"][0]["detail"]
    me = user.me()
    assert me["available_fen"] == 0 and me["arrears_fen"] == 0 and me["held_fen"] == 0     # at most the credit held
    assert me["points"] <= 10
    view = user.call("GET", f"/api/v1/sessions/{session['session_id']}").json()
    assert view["fee_fen"] == 1_000 and view["volume_ml"] <= 5_000
    alarms = cloud.op("GET", "/api/v1/operator/alarms").json()["alarms"]
    alarm = [a for a in alarms if a["kind"] == "implausible_report"]
    assert len(alarm) == 1 and "calibration 1000" in alarm[0]["payload"]["detail"]["problems"][0]


def test_a_refused_start_releases_the_hold(cloud):
    dev = cloud.provision("M10")
    user = cloud.user("13800000011", balance_fen=700)
    session, cmd = start_session(cloud, dev, user)
    dev.ack(cmd["command_id"], ok=False, reason="out_of_service")
    view = user.call("GET", f"/api/v1/sessions/{session['session_id']}").json()
    assert view["state"] == "voided" and "out_of_service" in view["void_reason"]
    assert user.me()["available_fen"] == 700


def test_a_waiting_long_poll_gets_the_start_at_once(cloud):
    dev = cloud.provision("M11")
    user = cloud.user("13800000012", balance_fen=1_000)
    got: dict = {}

    def poll():
        t0 = time.monotonic()
        got["cmds"] = dev.poll(wait_ms=20_000)
        got["t"] = time.monotonic()
        got["waited"] = got["t"] - t0

    th = threading.Thread(target=poll)
    th.start()
    time.sleep(0.3)
    presence = user.scan("M11", dev.qr()).json()["presence_token"]
    t_start = time.monotonic()
    assert user.start(presence).status_code == 200
    th.join(10)
    assert got["cmds"][0]["kind"] == "start"
    assert got["t"] - t_start < 1.0                     # delivered promptly, no fixed polling delay


def test_the_phone_can_stop_and_operators_can_change_price_and_service(cloud):
    dev = cloud.provision("M12")
    user = cloud.user("13800000013", balance_fen=1_000)
    session, cmd = start_session(cloud, dev, user)
    dev.ack(cmd["command_id"])
    assert user.call("POST", f"/api/v1/sessions/{session['session_id']}/stop").ok
    [cancel] = dev.poll()
    assert cancel["kind"] == "cancel" and cancel["session_id"] == session["session_id"]
    dev.ack(cancel["command_id"])
    assert cloud.op("PATCH", "/api/v1/operator/machines/M12", json={"price_fen_per_l": 250}).ok
    assert cloud.op("POST", "/api/v1/operator/machines/M12/service", json={"in_service": False,
                                                                           "detail": "filter change"}).ok
    kinds = [(c["kind"], c.get("price_fen_per_l"), c.get("detail")) for c in dev.poll()]
    assert kinds == [("price", 250, ""), ("out_of_service", None, "filter change")]


def test_heartbeats_and_alarms(cloud):
    dev = cloud.provision("M13")
    assert dev.heartbeat(temp_c=11.5, tds_ppm=90, outbox_depth=3).ok
    ev = {"events": [dev.event("2-5", "lockout", {"reason": "ghost_flow"}), dev.event("2-6", "boot")]}
    res = dev.request("POST", "/device/v1/events", ev).json()["results"]
    assert [r["status"] for r in res] == ["accepted", "accepted"]
    alarms = cloud.op("GET", "/api/v1/operator/alarms").json()
    assert [a["kind"] for a in alarms["alarms"]] == ["lockout"]
    machines = {m["machine_id"]: m for m in cloud.op("GET", "/api/v1/operator/machines").json()["machines"]}
    assert machines["M13"]["heartbeat"]["tds_ppm"] == 90 and "secret_enc" not in machines["M13"]


def test_a_session_the_machine_no_longer_has_is_ended_as_lost_and_its_hold_released(cloud):
    from tests.cloudkit import DeviceClient
    dev = cloud.provision("M14")
    user = cloud.user("13800000014", balance_fen=1_000)
    session, cmd = start_session(cloud, dev, user)
    sid = session["session_id"]
    assert dev.ack(cmd["command_id"]).json()["session_state"] == "active"
    assert user.me()["held_fen"] == 1_000
    # a heartbeat sent right after the claim may have been built before it: it proves nothing
    dev.heartbeat(session_id=None)
    # nor one while a report waits in the machine's outbox (the report will settle the session)
    later = DeviceClient(dev.base, dev.machine_id, dev.secret, clock_offset_ms=3_000)
    later.heartbeat(session_id=None, outbox_depth=1)
    assert user.call("GET", f"/api/v1/sessions/{sid}").json()["state"] == "active"
    # a heartbeat well after the claim, nothing waiting, no such session on the machine: lost
    later.heartbeat(session_id=None, outbox_depth=0)
    view = user.call("GET", f"/api/v1/sessions/{sid}").json()
    assert view["state"] == "lost" and not view["charged"]
    assert user.me()["held_fen"] == 0 and user.me()["available_fen"] == 1_000
    alarms = cloud.op("GET", "/api/v1/operator/alarms").json()["alarms"]
    assert [a["payload"]["detail"]["session_id"] for a in alarms if a["kind"] == "session_lost"] == [sid]
    # the machine is free for the next person
    other = cloud.user("13800000015", balance_fen=1_000)
    r = other.start(other.scan("M14", dev.qr()).json()["presence_token"])
    assert r.status_code == 200
    # and a late report still settles the lost session by the water measured, once
    assert dev.report_end("9-7", sid, 450).json()["results"][0]["status"] == "accepted"
    me = user.me()
    assert me["available_fen"] == 1_000 - 200 and me["held_fen"] == 0
    assert [b["amount_fen"] for b in me["bills"]] == [200]


# ---------------------------------------------------------------- bad input

def test_bad_input_gets_clear_4xx(cloud):
    dev = cloud.provision("M15")
    user = cloud.user("13800000016")
    r = dev.request("POST", "/device/v1/events", {"events": []})
    assert r.status_code == 422 and r.json()["error"] == "invalid_request"
    r = dev.request("POST", "/device/v1/events", {"events": [{"event_id": "1-1", "kind": "session_ended",
                                                               "payload": {"session_id": "x", "volume_ml": -5}}]})
    assert r.json()["results"][0]["status"] == "rejected" and "malformed" in r.json()["results"][0]["detail"]
    raw = requests.post(cloud.url + "/api/v1/sessions", data=b"{not json", timeout=5,
                        headers={"Authorization": f"Bearer {user.token}", "Content-Type": "application/json"})
    assert raw.status_code == 422
    big = requests.post(cloud.url + "/api/v1/sessions", data=b"x" * (300 * 1024), timeout=5,
                        headers={"Authorization": f"Bearer {user.token}", "Content-Type": "application/json"})
    assert big.status_code == 413 and big.json()["error"] == "body_too_large"
    assert user.call("GET", "/api/v1/sessions/nope").status_code == 404
    r = cloud.op("POST", "/api/v1/dev/users", json={"phone": "12345"})
    assert r.status_code == 422 and "phone" in r.json()["message"]


def test_operator_actions_are_audit_logged(cloud):
    cloud.provision("M16")
    cloud.op("PATCH", "/api/v1/operator/machines/M16", json={"price_fen_per_l": 180})
    cloud.user("13800000017")
    from sqlalchemy import select

    from cloud import db as t
    with cloud.app.state.database.read() as conn:
        actions = [r[0] for r in conn.execute(select(t.audit_log.c.action).order_by(t.audit_log.c.id))]
    assert actions == ["provision_machine", "change_machine", "dev_create_user"]


def test_stopping_the_cloud_answers_every_held_long_poll(tmp_path):
    """A graceful stop (a deploy, a restart behind the load balancer) answers the dispensers' held polls at
    once, so each polls again (another instance) instead of being cut off or held to the end of its wait."""
    from tests.cloudkit import CloudServer
    server = CloudServer(tmp_path / "c").__enter__()
    dev = server.provision("GS1")
    got: dict = {}

    def poll():
        got["cmds"] = dev.poll(wait_ms=30_000)
        got["t"] = time.monotonic()

    th = threading.Thread(target=poll)
    th.start()
    time.sleep(0.5)
    stopping = time.monotonic()
    server.__exit__(None, None, None)
    th.join(35)
    assert got["cmds"] == []                             # answered, empty, not an error
    assert got["t"] - stopping < 5                       # not held for the rest of its 30 s
    assert not server.thread.is_alive()


def test_production_mode_refuses_development_users(tmp_path, monkeypatch):
    from cloud.accounts.providers import ManualReview
    from tests.cloudkit import CloudServer
    from tests.test_accounts import OPERATOR, RealishSms, _RealishPay
    monkeypatch.setenv("TAPSHARE_CLOUD_KEY", "11" * 32)
    with CloudServer(tmp_path / "prod", production=True, public_url="https://water.example", **OPERATOR,
                     sms_provider=RealishSms(), verifier=ManualReview(), payment_provider=_RealishPay()) as prod:
        # behind a TLS proxy on loopback (uvicorn trusts X-Forwarded-Proto from 127.0.0.1)
        r = prod.op("POST", "/api/v1/dev/users", json={"phone": "13800000099", "balance_fen": 100},
                    headers={"X-Forwarded-Proto": "https"})
        # development routes are not there at all in production (issue 17: one router, included only outside it)
        assert r.status_code == 404 and r.json()["error"] == "not_found"
        paths = prod.op("GET", "/openapi.json", headers={"X-Forwarded-Proto": "https"}).json()["paths"]
        assert paths and not [x for x in paths if "/dev/" in x]
        for path in ("/dev/qr/X1", "/api/v1/dev/sms?phone=13800000099"):
            assert prod.op("GET", path, headers={"X-Forwarded-Proto": "https"}).status_code == 404


def test_production_mode_needs_a_server_key(tmp_path, monkeypatch):
    import pytest

    from cloud.app import CloudSettings, create_app
    from cloud.security import KeyError_
    monkeypatch.delenv("TAPSHARE_CLOUD_KEY", raising=False)
    with pytest.raises(KeyError_, match="production mode needs TAPSHARE_CLOUD_KEY"):
        create_app(CloudSettings(data_dir=tmp_path / "p", production=True))


def test_presence_tokens_cannot_be_forged_or_moved(cloud):
    dev = cloud.provision("M17")
    cloud.provision("M18")
    user = cloud.user("13800000018", balance_fen=1_000)
    connected(dev)
    token = user.scan("M17", dev.qr()).json()["presence_token"]
    machine, expires, nonce, mac = token.split(".")
    for forged in (f"M18.{expires}.{nonce}.{mac}", f"{machine}.{int(expires) + 10**9}.{nonce}.{mac}",
                   f"{machine}.{expires}.{nonce}.{'0' * 32}", "garbage-token-value"):
        r = user.start(forged)
        assert r.status_code == 410 and r.json()["error"] == "scan_again", forged
    assert user.start(token).status_code == 200


def test_operators_change_limits_and_clear_lockouts_remotely(cloud):
    dev = cloud.provision("M19")
    r = cloud.op("PATCH", "/api/v1/operator/machines/M19", json={"max_volume_ml": 800, "max_credit_fen": 300})
    assert r.status_code == 200 and r.json()["machines"][0]["max_volume_ml"] == 800
    assert cloud.op("PATCH", "/api/v1/operator/machines/M19", json={}).status_code == 422
    assert dev.poll() == []                         # limits apply to new grants; nothing to tell the machine
    user = cloud.user("13800000019", balance_fen=1_000)
    _, cmd = start_session(cloud, dev, user)
    assert (cmd["grant"]["max_volume_ml"], cmd["grant"]["credit_limit_fen"]) == (800, 300)
    r = cloud.op("POST", "/api/v1/operator/machines/M19/clear-lockout", json={"reason": "ghost_flow"})
    assert r.status_code == 200
    assert [(c["kind"], c["reason"]) for c in dev.poll()][-1] == ("clear_lockout", "ghost_flow")
    assert cloud.op("POST", "/api/v1/operator/machines/NOPE/clear-lockout",
                    json={"reason": "ghost_flow"}).status_code == 404


def test_the_openapi_document_describes_every_response(cloud):
    doc = requests.get(cloud.url + "/openapi.json", timeout=5).json()
    for path, ops in doc["paths"].items():
        for method, op in ops.items():
            content = op["responses"]["200"]["content"]
            if "image/jpeg" in content or "application/octet-stream" in content:   # an ID photo, a bundle
                assert content.get("image/jpeg", content.get("application/octet-stream"))["schema"]["format"] \
                    == "binary", (method, path)
                continue
            schema = content["application/json"]["schema"]
            ref = schema.get("$ref", "")
            assert ref and not ref.endswith("/Out"), (method, path, schema)


def test_a_refused_event_in_a_batch_leaves_the_others_settled(cloud):
    dev = cloud.provision("M20")
    user = cloud.user("13800000020", balance_fen=1_000)
    session, cmd = start_session(cloud, dev, user)
    dev.ack(cmd["command_id"])
    good_end = dev.report_end("7-2", session["session_id"], 225).request.body     # reuse its JSON shape
    import json as _json
    good = _json.loads(good_end)["events"][0]
    thief_end = {"event_id": "7-1", "kind": "session_ended",
                 "payload": {**good["payload"], "session_id": "someone-elses"}}
    # the good one was already sent above; send a fresh batch: refused, accepted-duplicate, plain event
    batch = {"events": [thief_end, good, dev.event("7-3", "boot")]}
    res = dev.request("POST", "/device/v1/events", batch).json()["results"]
    assert [r["status"] for r in res] == ["rejected", "duplicate", "accepted"]
    assert user.me()["available_fen"] == 900
    from sqlalchemy import func, select

    from cloud import db as t
    with cloud.app.state.database.read() as conn:
        assert conn.execute(select(func.count()).select_from(t.bills)).scalar() == 1
        assert conn.execute(select(func.count()).select_from(t.reports)).scalar() == 3


def test_reports_delivered_out_of_order_settle_each_session_once(cloud):
    dev = cloud.provision("M21")
    first, second = cloud.user("13800000021", balance_fen=1_000), cloud.user("13800000022", balance_fen=1_000)
    s1, c1 = start_session(cloud, dev, first)
    dev.ack(c1["command_id"])
    dev.heartbeat(session_id=None, outbox_depth=1)   # the machine is free again; its report is still queued
    s2, c2 = start_session(cloud, dev, second)
    dev.ack(c2["command_id"])
    assert dev.report_end("5-9", s2["session_id"], 450).json()["results"][0]["status"] == "accepted"
    assert dev.report_end("5-8", s1["session_id"], 225).json()["results"][0]["status"] == "accepted"
    assert first.me()["available_fen"] == 900 and second.me()["available_fen"] == 800
    assert dev.report_end("5-8", s1["session_id"], 225).json()["results"][0]["status"] == "duplicate"
