"""The cloud for a fleet (issue 21): three real instances (``python -m cloud serve`` processes) on one real
PostgreSQL, behind a real HAProxy with the repository's configuration and TLS. Machines and phones talk to the
balancer (or to one instance, where the test must know which); instances are killed with SIGKILL and restarted
with SIGTERM as systemd does. Nothing may be lost, nothing done twice, and a rolling restart fails no request."""

from __future__ import annotations

import os
import secrets
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests
from sqlalchemy import create_engine, select, text

import contract as p
from cloud import db as t
from tests.cloudkit import PG_URL, DeviceClient, UserClient
from tests.fleetkit import CloudFleet
from tests.util import wait_until

pytestmark = pytest.mark.timeout(600)


@pytest.fixture(scope="module")
def wx():
    from tests.standins.wechatpay import WechatPayStandIn
    with WechatPayStandIn() as stand_in:
        yield stand_in


@pytest.fixture(scope="module")
def fleet(wx, tmp_path_factory):
    if not PG_URL:
        if os.environ.get("TAPSHARE_TEST_ALL"):
            pytest.fail("test.sh set up everything, yet there is no PostgreSQL (TAPSHARE_TEST_POSTGRES_URL)")
        pytest.skip("no PostgreSQL: run scripts/postgres-for-tests.sh and export TAPSHARE_TEST_POSTGRES_URL")
    from tests.conftest import _fresh_postgres_database
    url, drop = _fresh_postgres_database()
    directory = tmp_path_factory.mktemp("fleet")
    env = {**wx.env(directory / "wxkeys"), "TAPSHARE_PAYMENT_PROVIDERS": "wechatpay",
           # only a notification can wake a poll in these tests' time: the periodic re-check is far off
           "TAPSHARE_COMMAND_RECHECK_S": "120",
           # every phone here is on one network (loopback); the limit per network is tested on its own below
           "TAPSHARE_SCANS_PER_MINUTE_PER_NETWORK": "100000"}
    before = os.environ.get("REQUESTS_CA_BUNDLE")
    try:
        with CloudFleet(directory, url, n=3, env=env) as f:
            os.environ["REQUESTS_CA_BUNDLE"] = str(f.ca)      # phones (requests) trust the balancer's certificate
            f.engine = create_engine(url.replace("postgresql+psycopg", "postgresql+psycopg"), pool_size=2)
            yield f
            f.engine.dispose()
    finally:
        if before is None:
            os.environ.pop("REQUESTS_CA_BUNDLE", None)
        else:
            os.environ["REQUESTS_CA_BUNDLE"] = before
        drop()


@pytest.fixture
def healthy(fleet):
    """Every instance running and in the balancer before (and after) each test."""
    def heal():
        for inst in fleet.instances:
            if not inst.alive:
                inst.start()
        fleet.wait_balanced()
    heal()
    yield fleet
    heal()


def machine(fleet: CloudFleet, base: str | None = None, price: int = 200) -> DeviceClient:
    mid = "F" + secrets.token_hex(4)
    r = fleet.op("POST", "/api/v1/operator/machines", json={"machine_id": mid, "location": "北京市朝阳区某某路 1 号",
                                                          "price_fen_per_l": price})
    assert r.status_code == 200, r.text
    e = requests.post(fleet.url + "/device/v1/enroll", timeout=10,
                      json={"machine_id": mid, "enrolment_token": r.json()["enrolment_token"]})
    assert e.status_code == 200, e.text
    dev = DeviceClient(base or fleet.url, mid, bytes.fromhex(e.json()["secret_hex"]))
    dev.http.verify = str(fleet.ca)
    assert dev.heartbeat().status_code == 200
    return dev


def person(fleet: CloudFleet, balance_fen: int = 5_000) -> UserClient:
    phone = "139" + f"{secrets.randbelow(10**8):08d}"
    r = fleet.op("POST", "/api/v1/dev/users", json={"phone": phone, "balance_fen": balance_fen, "registered": True})
    assert r.status_code == 200, r.text
    return UserClient(fleet.url, r.json()["token"], r.json()["user_id"])


def start(user: UserClient, dev: DeviceClient) -> dict:
    scan = user.scan(dev.machine_id, dev.qr())
    assert scan.status_code == 200, scan.text
    r = user.start(scan.json()["presence_token"])
    assert r.status_code == 200, r.text
    return r.json()


def on(dev: DeviceClient, base: str) -> DeviceClient:
    """The same machine talking to another address (one instance directly)."""
    other = DeviceClient(base, dev.machine_id, dev.secret)
    other.http.verify = dev.http.verify
    return other


def holding(fleet: CloudFleet) -> list[int]:
    """Which instances hold a long-poll now (their /healthz)."""
    return [i for i, inst in enumerate(fleet.instances) if inst.alive and
            requests.get(inst.url + "/healthz", timeout=5).json()["connected_machines"] > 0]


def background_poll(dev: DeviceClient, wait_ms: int) -> tuple[threading.Thread, dict]:
    out: dict = {}

    def run() -> None:
        try:
            r = dev.request("GET", f"/device/v1/commands?wait_ms={wait_ms}", timeout=wait_ms / 1000 + 15)
            out["status"], out["body"] = r.status_code, r.json() if r.headers.get("content-type", "").startswith(
                "application/json") else r.text
        except requests.RequestException as e:
            out["error"] = repr(e)
    th = threading.Thread(target=run, daemon=True)
    th.start()
    return th, out


# ---------------------------------------------------------------- commands across instances

def test_a_start_queued_at_one_instance_wakes_the_poll_held_at_another(healthy):
    fleet = healthy
    a, b = fleet.instances[0], fleet.instances[1]
    dev = machine(fleet)
    user = person(fleet)
    user_b = UserClient(b.url, user.token, user.user_id)
    th, out = background_poll(on(dev, a.url), wait_ms=20_000)
    assert wait_until(lambda: holding(fleet) == [0], timeout_s=10)
    session = start(user_b, on(dev, b.url))            # the phone's requests reach instance B
    th.join(25)
    # the re-check is 120 s away: only B's NOTIFY, heard by A's listener, can have answered A's poll
    assert out.get("status") == 200, out
    [cmd] = out["body"]["commands"]
    assert cmd["kind"] == "start" and cmd["session_id"] == session["session_id"]
    # and B shows the machine online: each instance writes the polls it holds every 0.1 s, so a phone at B sees a
    # machine polling A within that (and a start to it is accepted meanwhile, on its last contact)
    assert wait_until(lambda: requests.get(b.url + "/api/v1/machines/" + dev.machine_id, timeout=5).json()["online"],
                      timeout_s=3)


def test_an_instance_killed_mid_poll_loses_no_command_and_gives_none_twice(healthy):
    fleet = healthy
    dev, user = machine(fleet), person(fleet)
    th, out = background_poll(dev, wait_ms=20_000)       # through the balancer: to whichever instance
    assert wait_until(lambda: len(holding(fleet)) == 1, timeout_s=10)
    [victim] = holding(fleet)
    fleet.instances[victim].kill9()
    th.join(20)
    assert out.get("status", 0) >= 500 or "error" in out, out     # the held poll died with its instance
    session = start(user, dev)                           # queued at a surviving instance (the balancer's choice)
    got = []
    deadline = time.monotonic() + 20
    while not got and time.monotonic() < deadline:       # the machine polls again, through the balancer
        r = dev.request("GET", "/device/v1/commands?wait_ms=5000", timeout=20)
        if r.status_code == 200:
            got = r.json()["commands"]
    assert [c["session_id"] for c in got] == [session["session_id"]]
    assert dev.ack(got[0]["command_id"]).status_code == 200
    report = dev.report_end("1-1", session["session_id"], billed_pulses=450)
    assert report.status_code == 200, report.text
    assert report.json()["results"][0]["status"] == \
        "accepted"
    assert dev.request("GET", "/device/v1/commands?wait_ms=0").json()["commands"] == []    # not again
    me = user.me()
    assert me["available_fen"] == 5_000 - 200 and me["held_fen"] == 0


# ---------------------------------------------------------------- replays and duplicates across instances

def test_a_nonce_used_at_one_instance_is_refused_at_the_others_and_after_a_restart(healthy):
    fleet = healthy
    dev = machine(fleet)
    raw = b'{"state":"idle","valve_open":false}'
    headers = {**p.signed_headers(dev.secret, dev.machine_id, "POST", "/device/v1/heartbeat", raw,
                                  timestamp_ms=time.time_ns() // 1_000_000, nonce=secrets.token_hex(16)),
               "Content-Type": "application/json"}
    first = requests.post(fleet.instances[0].url + "/device/v1/heartbeat", data=raw, headers=headers, timeout=5)
    assert first.status_code == 200, first.text
    for inst in fleet.instances[1:]:
        again = requests.post(inst.url + "/device/v1/heartbeat", data=raw, headers=headers, timeout=5)
        assert again.status_code == 401 and again.json()["error"] == "replayed_nonce", again.text
    fleet.instances[0].stop()
    fleet.instances[0].start()
    again = requests.post(fleet.instances[0].url + "/device/v1/heartbeat", data=raw, headers=headers, timeout=5)
    assert again.status_code == 401 and again.json()["error"] == "replayed_nonce", again.text
    # the same request sent to all three at once: one answer, two refusals
    headers2 = {**p.signed_headers(dev.secret, dev.machine_id, "POST", "/device/v1/heartbeat", raw,
                                   timestamp_ms=time.time_ns() // 1_000_000, nonce=secrets.token_hex(16)),
                "Content-Type": "application/json"}
    with ThreadPoolExecutor(3) as pool:
        codes = sorted(pool.map(lambda inst: requests.post(inst.url + "/device/v1/heartbeat", data=raw,
                                                           headers=headers2, timeout=5).status_code, fleet.instances))
    assert codes == [200, 401, 401]


def test_fifty_copies_of_one_report_spread_over_the_instances_settle_once(healthy):
    fleet = healthy
    dev, user = machine(fleet), person(fleet, balance_fen=10_000)
    session = start(user, dev)
    [cmd] = dev.poll(wait_ms=5000)
    assert dev.ack(cmd["command_id"]).status_code == 200
    copies = [on(dev, fleet.instances[i % 3].url) for i in range(50)]
    with ThreadPoolExecutor(50) as pool:
        answers = list(pool.map(lambda d: d.report_end("1-1", session["session_id"], billed_pulses=900), copies))
    assert all(r.status_code == 200 for r in answers), [r.text for r in answers if r.status_code != 200]
    statuses = sorted(r.json()["results"][0]["status"] for r in answers)
    assert statuses == ["accepted"] + ["duplicate"] * 49
    me = user.me()
    assert me["available_fen"] == 10_000 - 400 and me["held_fen"] == 0 and len(me["bills"]) == 1


def test_one_top_up_notification_delivered_to_every_instance_credits_once(healthy, wx):
    fleet = healthy
    user = person(fleet, balance_fen=0)
    r = user.call("POST", "/api/v1/me/topups", json={"amount_fen": 1500, "provider": "wechatpay", "channel": "native"})
    assert r.status_code == 200, r.text
    order = r.json()
    wx.scan(order["qr_text"], notify=False)
    with ThreadPoolExecutor(3) as pool:
        answers = [a for each in pool.map(lambda inst: wx.notify(order["order_id"], concurrent=6,
                                                                 url=inst.url + "/api/v1/payments/notify/wechatpay"),
                                          fleet.instances) for a in each]
    assert [s for s, _ in answers] == [204] * 18, answers
    assert user.call("GET", "/api/v1/me/wallet").json()["available_fen"] == 1500


# ---------------------------------------------------------------- background jobs and restarts

def test_a_void_timer_of_a_killed_instance_still_fires_elsewhere(healthy):
    fleet = healthy
    dev, user = machine(fleet), person(fleet, balance_fen=3_000)

    def holder() -> str | None:
        with fleet.engine.connect() as conn:
            row = conn.execute(select(t.job_leases.c.holder, t.job_leases.c.until_ms)
                               .where(t.job_leases.c.job == "expire_sessions")).first()
        return row[0] if row and row[1] > time.time() * 1000 else None
    assert wait_until(lambda: holder() is not None, timeout_s=10)
    owner = holder()
    session = start(user, dev)                           # the machine never claims it
    assert user.me()["held_fen"] == 3_000
    fleet.instances[int(owner.removeprefix("cloud")) - 1].kill9()
    assert wait_until(lambda: user.call("GET", f"/api/v1/sessions/{session['session_id']}").json()["state"]
                      == "voided", timeout_s=40), "the unclaimed start was never voided"
    me = user.me()
    assert me["available_fen"] == 3_000 and me["held_fen"] == 0
    assert wait_until(lambda: holder() not in (None, owner), timeout_s=10)
    with fleet.engine.connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM balance_entries WHERE session_id = :s AND kind = 'release'"),
                            {"s": session["session_id"]}).scalar() == 1


def test_a_rolling_restart_of_every_instance_during_sessions_fails_no_request(healthy):
    """Machines and phones keep working through the balancer while each instance in turn is stopped with SIGTERM
    (it drains: /healthz 503, held polls answered, requests in flight finished) and started again."""
    fleet = healthy
    devices = [machine(fleet) for _ in range(3)]
    people = [person(fleet, balance_fen=100_000) for _ in devices]
    failures: list[str] = []
    settled: list[str] = []
    ended: dict[str, int] = {}
    handed: dict[str, list[str]] = {d.machine_id: [] for d in devices}
    stop = threading.Event()

    def check(r: requests.Response, what: str) -> requests.Response:
        if r.status_code >= 400:
            failures.append(f"{what}: {r.status_code} {r.text[:200]}")
        return r

    def run_machine(dev: DeviceClient) -> None:
        n = 0
        while not stop.is_set():
            try:
                r = check(dev.request("GET", "/device/v1/commands?wait_ms=2000", timeout=30), "poll")
            except requests.RequestException as e:
                failures.append(f"poll: {e!r}")
                continue
            for cmd in r.json().get("commands", []) if r.ok else []:
                handed[dev.machine_id].append(cmd["command_id"])
                check(dev.ack(cmd["command_id"]), "ack")
                if cmd["kind"] == "start":
                    n += 1
                    check(dev.report_end(f"1-{n}", cmd["session_id"], billed_pulses=450), "report")

    def run_person(user: UserClient, dev: DeviceClient) -> None:
        while not stop.wait(0.6):                # the next person (a machine takes at most 120 scans a minute)
            try:
                scan = check(user.scan(dev.machine_id, dev.qr()), "scan")
                if not scan.ok:
                    continue
                r = check(user.start(scan.json()["presence_token"]), "start")
                if not r.ok:
                    continue
                sid = r.json()["session_id"]
                deadline = time.monotonic() + 30
                while time.monotonic() < deadline:
                    state = check(user.call("GET", f"/api/v1/sessions/{sid}"), "view").json().get("state")
                    if state in ("ended", "voided", "lost"):
                        break
                    time.sleep(0.1)
                settled.append(state)
                ended[user.user_id] = ended.get(user.user_id, 0) + (state == "ended")
            except requests.RequestException as e:
                failures.append(f"phone: {e!r}")

    threads = [threading.Thread(target=run_machine, args=(d,), daemon=True) for d in devices] + [
        threading.Thread(target=run_person, args=(u, d), daemon=True) for u, d in zip(people, devices, strict=True)]
    for th in threads:
        th.start()
    assert wait_until(lambda: len(settled) >= 3, timeout_s=30), (failures[:5], settled, handed)
    for inst in fleet.instances:
        # uvicorn ends by raising the SIGTERM it handled again, which systemd counts as a clean stop
        assert inst.stop() in (0, -15), inst.log.read_text()[-2000:]
        inst.start()
        fleet.wait_balanced()
        time.sleep(1)
    before = len(settled)
    assert wait_until(lambda: len(settled) >= before + 3, timeout_s=30)
    stop.set()
    for th in threads:
        th.join(40)
    assert failures == [], sorted({f[:80] for f in failures})
    assert settled and set(settled) == {"ended"}, settled
    for dev in devices:                                    # every start handed out once and claimed
        assert len(handed[dev.machine_id]) == len(set(handed[dev.machine_id]))
    for user in people:
        me = user.me()
        assert me["held_fen"] == 0 and me["available_fen"] == 100_000 - 200 * ended[user.user_id]


# ---------------------------------------------------------------- what instances must agree on at once

def test_a_revoked_machine_key_is_refused_by_every_instance_at_once(healthy):
    fleet = healthy
    dev = machine(fleet)
    for inst in fleet.instances:                           # each instance has the secret cached now
        assert on(dev, inst.url).heartbeat().status_code == 200
    r = requests.post(fleet.instances[0].url + f"/api/v1/operator/machines/{dev.machine_id}/revoke-key",
                      headers={"Authorization": f"Bearer {fleet.admin}"}, timeout=10)
    assert r.status_code == 200, r.text
    # the other instances hear of it by NOTIFY (milliseconds), not at their next restart
    for inst in fleet.instances:
        assert wait_until(lambda i=inst: on(dev, i.url).heartbeat().json().get("error") == "unknown_machine",
                          timeout_s=3), inst.index


def test_scan_limits_are_counted_by_every_instance_together(healthy):
    fleet = healthy
    dev, user = machine(fleet), person(fleet)
    while time.time() % 60 > 45:                           # the whole burst inside one minute's window
        time.sleep(0.5)
    bases = [inst.url for inst in fleet.instances]
    with ThreadPoolExecutor(12) as pool:
        codes = list(pool.map(lambda i: requests.get(bases[i % 3] + "/api/v1/scan", timeout=10, headers={
            "Authorization": f"Bearer {user.token}"}, params={"machine": dev.machine_id, "c": dev.qr()}).status_code,
            range(120)))
    assert codes == [200] * 120                            # 120 a minute per machine (the default)
    for base in bases:
        over = requests.get(base + "/api/v1/scan", params={"machine": dev.machine_id, "c": dev.qr()}, timeout=10)
        assert over.status_code == 429 and over.json()["error"] == "too_many_scans", over.text


def test_each_instance_says_who_it_is_and_that_it_listens(healthy):
    for inst in healthy.instances:
        h = requests.get(inst.url + "/healthz", timeout=5).json()
        assert (h["status"], h["database"], h["instance"], h["listening"]) == \
            ("ok", "postgresql", f"cloud{inst.index + 1}", True)
    via = requests.get(healthy.url + "/healthz", timeout=5)
    assert via.status_code == 200 and via.headers["strict-transport-security"]
    plain = requests.get(f"http://127.0.0.1:{healthy.http_port}/healthz", timeout=5, allow_redirects=False)
    assert plain.status_code == 301 and plain.headers["location"].startswith("https://")


def test_a_stopping_instance_drains_then_answers_its_held_polls_and_serves_meanwhile(healthy):
    """SIGTERM: for the drain (3 s here, as in the unit) health says 503 and everything is served as usual, held
    polls too, until the balancer has taken the instance out; only then are the held polls answered (their
    machines poll again elsewhere: answered at the start, they came straight back to the instance with the
    fewest connections, in a loop), and it exits."""
    fleet = healthy
    inst = fleet.instances[2]
    dev = machine(fleet)
    th, out = background_poll(on(dev, inst.url), wait_ms=30_000)
    assert wait_until(lambda: 2 in holding(fleet), timeout_s=10)
    t0 = time.monotonic()
    inst.proc.send_signal(15)                             # SIGTERM, as systemctl stop
    assert wait_until(lambda: requests.get(inst.url + "/healthz", timeout=5).json().get("error") == "draining", 2)
    assert on(dev, inst.url).heartbeat().status_code == 200       # still serving while the balancer moves off
    assert "status" not in out                                      # still held
    assert wait_until(lambda: fleet.servers_up().get("cloud3") is False, timeout_s=5)
    th.join(10)
    assert out.get("status") == 200 and out["body"]["commands"] == [], out    # answered at the drain's end
    assert 2.5 <= time.monotonic() - t0 < 10                               # not in 30 s
    assert inst.proc.wait(15) in (0, -15)


def test_a_missed_notification_is_made_good_by_the_periodic_recheck(tmp_path):
    """One instance whose LISTEN connection is down: a command queued meanwhile still reaches the poll it holds,
    found by the re-check (here every 0.5 s)."""
    if not PG_URL:
        pytest.skip("no PostgreSQL (TAPSHARE_TEST_POSTGRES_URL)")
    from tests.cloudkit import CloudServer
    from tests.conftest import _fresh_postgres_database
    url, drop = _fresh_postgres_database()
    try:
        with CloudServer(tmp_path / "cloud", database_url=url, command_recheck_s=0.5) as cloud:
            svc = cloud.app.state.services
            assert wait_until(svc.listener.connected.is_set)
            svc.listener.stop()                          # deaf: NOTIFY reaches nobody here
            dev = cloud.provision("R1")
            th, out = background_poll(dev, wait_ms=20_000)
            assert wait_until(lambda: svc.hub.connected_count == 1)
            from cloud.devices.service import Commands
            with svc.database.tx() as conn:               # queued as another instance would: no local wake-up
                cid = Commands.queue(conn, "R1", p.CommandKind.PRICE, svc.now(), price_fen_per_l=300)
            th.join(25)
            assert out.get("status") == 200 and [c["command_id"] for c in out["body"]["commands"]] == [cid], out
            cloud.app.state.database.dispose()
    finally:
        drop()


@pytest.fixture
def pg_database():
    """A fresh PostgreSQL database: its URL, its name and the server's address for psycopg; dropped after."""
    if not PG_URL:
        pytest.skip("no PostgreSQL (TAPSHARE_TEST_POSTGRES_URL)")
    from tests.conftest import _fresh_postgres_database
    url, drop = _fresh_postgres_database()
    try:
        yield url, url.rsplit("/", 1)[1], PG_URL.replace("postgresql+psycopg://", "postgresql://")
    finally:
        drop()


def test_health_answers_at_once_and_says_when_the_database_has_gone(tmp_path, pg_database):
    """/healthz is the balancer's only question: it is answered on the event loop from the flusher's last answer
    from the database (asked each second), so a burst of requests waiting for database connections cannot make a
    live instance look dead; and an instance whose database is gone for HEALTH_DATABASE_S says so with 503, and
    serves again once it is back."""
    import psycopg

    from cloud.app import HEALTH_DATABASE_S
    from tests.cloudkit import CloudServer
    url, name, admin = pg_database
    with CloudServer(tmp_path / "cloud", database_url=url) as cloud:
        assert requests.get(cloud.url + "/healthz", timeout=5).status_code == 200
        with psycopg.connect(admin, autocommit=True) as c:     # the database goes: no connection is let in
            c.execute(f"ALTER DATABASE {name} WITH ALLOW_CONNECTIONS false")
            c.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s", (name,))
        t0 = time.monotonic()

        def unhealthy() -> bool:
            r = requests.get(cloud.url + "/healthz", timeout=5)
            return r.status_code == 503 and r.json()["error"] == "database_unreachable"
        assert wait_until(unhealthy, HEALTH_DATABASE_S + 10)
        assert time.monotonic() - t0 >= HEALTH_DATABASE_S - 1.5     # not at the first failed probe
        with psycopg.connect(admin, autocommit=True) as c:
            c.execute(f"ALTER DATABASE {name} WITH ALLOW_CONNECTIONS true")
        assert wait_until(lambda: requests.get(cloud.url + "/healthz", timeout=5).status_code == 200, 15)
        cloud.app.state.database.dispose()


def test_pooled_connections_cut_while_idle_are_replaced_before_they_are_used(pg_database):
    """PostgreSQL restarted (or ended the connections) while the pool held them: the next transactions are served,
    each on a connection that was checked first. One that has sat for PING_IDLE_S is pinged; one used a moment ago
    is checked without a round trip (the server has said goodbye on its socket), not pinged before every
    transaction as SQLAlchemy's pool_pre_ping would (a round trip per transaction under load)."""
    import psycopg
    from sqlalchemy import text

    from cloud.db import PING_IDLE_S, Database
    url, name, admin = pg_database
    db = Database(url)
    db.create_all()
    for idle_s in (0, PING_IDLE_S + 0.3):          # cut right after use, and after a pause
        with db.read() as conn, db.read() as other:     # two pooled connections
            assert conn.execute(text("SELECT 1")).scalar() == other.execute(text("SELECT 1")).scalar() == 1
        time.sleep(idle_s)
        with psycopg.connect(admin, autocommit=True) as c:   # waits until each has ended
            cut = c.execute("SELECT count(pg_terminate_backend(pid, 5000)) FROM pg_stat_activity "
                            "WHERE datname = %s AND pid <> pg_backend_pid()", (name,)).fetchone()[0]
        assert cut >= 2
        for _ in range(4):
            with db.read() as conn:
                assert conn.execute(text("SELECT count(*) FROM machines")).scalar() == 0
    db.dispose()


def test_a_listener_that_reconnects_reloads_the_keys_and_sees_a_revocation_it_missed(tmp_path, pg_database):
    """When its LISTEN session breaks, an instance may miss a key revoked at another one: on reconnecting it reads
    every key again, so the revoked one is refused and the others are still answered without a database read
    (dropping them all, as it did, made each machine's next request read its key: 10,000 reads after a blip)."""
    import psycopg

    from tests.cloudkit import CloudServer
    url, name, admin = pg_database
    with CloudServer(tmp_path / "cloud", database_url=url) as cloud:
        devs = [cloud.provision(f"K{i}") for i in range(3)]
        listener, machines = cloud.app.state.services.listener, cloud.app.state.services.machines
        assert wait_until(lambda: listener.connected.is_set())
        with psycopg.connect(admin, autocommit=True) as c, \
                psycopg.connect(url.replace("postgresql+psycopg://", "postgresql://"), autocommit=True) as there:
            # the listener goes and cannot come back; meanwhile K0's key is revoked, unannounced
            c.execute(f"ALTER DATABASE {name} WITH ALLOW_CONNECTIONS false")
            c.execute("SELECT pg_terminate_backend(pid, 5000) FROM pg_stat_activity WHERE datname = %s "
                      "AND application_name = 'tapshare-listener'", (name,))
            assert wait_until(lambda: not listener.connected.is_set(), 5)
            there.execute("UPDATE machines SET secret_enc = NULL WHERE machine_id = 'K0'")
            c.execute(f"ALTER DATABASE {name} WITH ALLOW_CONNECTIONS true")
        assert wait_until(lambda: listener.connected.is_set(), 15)
        assert machines.cached_secret("K0") is None
        assert all(machines.cached_secret(d.machine_id) is not None for d in devs[1:])
        assert devs[0].heartbeat().status_code == 401
        assert [d.heartbeat().status_code for d in devs[1:]] == [200, 200]
        cloud.app.state.database.dispose()


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_presence_writes_keep_the_latest_time_for_each_machine(tmp_path, backend):
    """Each instance writes until when its held polls last, in one batch a flush (on PostgreSQL two statements,
    whatever the number): a later time is kept, an earlier one written after it (another instance's older poll)
    does not replace it, and a machine not in the table is no error."""
    from sqlalchemy import insert, select

    from cloud import db as t
    from cloud.db import Database
    from cloud.devices.hub import CommandHub, Presence
    drop = None
    if backend == "postgresql":
        if not PG_URL:
            pytest.skip("no PostgreSQL (TAPSHARE_TEST_POSTGRES_URL)")
        from tests.conftest import _fresh_postgres_database
        url, drop = _fresh_postgres_database()
    else:
        url = f"sqlite:///{tmp_path / 'p.db'}"
    db = Database(url)
    db.create_all()
    try:
        with db.tx() as conn:
            conn.execute(insert(t.machines), [dict(machine_id=f"P{i}", location="x", price_fen_per_l=200,
                                                   max_volume_ml=5000, max_duration_ms=300_000, max_idle_ms=15_000,
                                                   max_credit_fen=10_000, created_ms=0) for i in range(3)])
        now = {"ms": 1_000_000}
        a = Presence(CommandHub(), db, lambda: now["ms"], shared=True)
        b = Presence(CommandHub(), db, lambda: now["ms"], shared=True)
        a.polling("P0", 50_000, now["ms"])
        a.polling("P1", 50_000, now["ms"])
        a.polling("GONE", 50_000, now["ms"])
        assert a.flush() == 3
        b.polling("P1", 10_000, now["ms"])                  # an older poll's end, written after
        b.polling("P2", 20_000, now["ms"])
        assert b.flush() == 2
        with db.read() as conn:
            got = dict(conn.execute(select(t.machines.c.machine_id, t.machines.c.poll_until_ms)).all())
        r = Presence.RECENT_MS
        assert got == {"P0": 1_050_000 + r, "P1": 1_050_000 + r, "P2": 1_020_000 + r}
    finally:
        db.dispose()
        if drop:
            drop()
