"""The cloud's money and limits under many parallel requests, on PostgreSQL (issue 15).

SQLite's single writer hides these races; PostgreSQL, which operators run, shows them. Every test sends at
least 20 requests at once over real HTTP and checks balances, refunds, points and limits to the unit.
"""

from __future__ import annotations

import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests
from sqlalchemy import event, select

import contract as p
from cloud import db as t
from tests.cloudkit import PG_URL, CloudServer
from tests.conftest import _fresh_postgres_database
from tests.test_cloud import start_session

N = 24


@pytest.fixture
def clock():
    """The cloud's clock, moved by the test (SMS resend limits are a minute)."""
    now = {"ms": time.time_ns() // 1_000_000}
    return now


@pytest.fixture
def pg(tmp_path, clock):
    if not PG_URL:
        if os.environ.get("TAPSHARE_TEST_ALL"):
            pytest.fail("test.sh set up everything, yet there is no PostgreSQL (TAPSHARE_TEST_POSTGRES_URL)")
        pytest.skip("no PostgreSQL: run scripts/postgres-for-tests.sh and export TAPSHARE_TEST_POSTGRES_URL")
    url, drop = _fresh_postgres_database()
    with CloudServer(tmp_path / "cloud", database_url=url, clock_ms=lambda: clock["ms"]) as server:
        yield server
    server.app.state.database.dispose()
    drop()


def at_once(fns) -> list:
    """Run the callables together (a barrier releases them at the same moment)."""
    barrier = threading.Barrier(len(fns))

    def go(fn):
        barrier.wait()
        return fn()
    with ThreadPoolExecutor(len(fns)) as pool:
        return list(pool.map(go, fns))


def entries(cloud, session_id: str) -> list[tuple[str, int]]:
    with cloud.app.state.database.read() as conn:
        e = t.balance_entries.c
        return [tuple(r) for r in conn.execute(select(e.kind, e.amount_fen).where(e.session_id == session_id))]


def test_a_hold_is_released_once_when_a_void_and_late_reports_race(pg):
    dev = pg.provision("C1")
    user = pg.user("13900000001", balance_fen=10_000)
    session, cmd = start_session(pg, dev, user)
    sid = session["session_id"]
    assert dev.ack(cmd["command_id"]).status_code == 200
    calls = []
    for i in range(N):
        if i % 2:
            calls.append(lambda: dev.ack(cmd["command_id"], ok=False, reason=p.START_FAILED))
        else:
            calls.append(lambda i=i: dev.report_end(f"1-{100 + i}", sid, 450))     # copies under new ids
    answers = at_once(calls)
    # 503: "kept changing, send it again"; never undone in a deadlock (the void and the settlement lock alike)
    assert all(r.status_code == 200 or (r.status_code == 503 and r.json()["error"] != "database_busy")
               for r in answers), [r.text for r in answers if r.status_code >= 400]
    kinds = [k for k, _ in entries(pg, sid)]
    assert kinds.count("hold") == 1 and kinds.count("release") == 1, kinds
    me = user.me()
    assert me["held_fen"] == 0
    assert me["available_fen"] in (10_000, 10_000 - 200)          # voided first, or settled first
    assert kinds.count("charge") == (me["available_fen"] == 9_800)
    assert me["available_fen"] + me["held_fen"] <= 10_000          # no money created


def test_parallel_refunds_never_exceed_the_charge(pg):
    from cloud.__main__ import create_operator
    operator = create_operator(pg.settings.url(), "op-c", "operator")
    dev = pg.provision("C2")
    user = pg.user("13900000002", balance_fen=10_000)
    session, cmd = start_session(pg, dev, user)
    sid = session["session_id"]
    dev.ack(cmd["command_id"])
    assert dev.report_end("1-1", sid, 450 * 4).json()["results"][0]["status"] == "accepted"     # 800 fen
    answers = at_once([lambda: pg.op("POST", f"/api/v1/operator/sessions/{sid}/refund", token=operator,
                                     json={"amount_fen": 800, "reason": "failed dispense"})] * N)
    assert sorted(r.status_code for r in answers) == [200] + [422] * (N - 1), [r.text for r in answers]
    assert sum(a for k, a in entries(pg, sid) if k == "refund") == 800
    assert user.me()["available_fen"] == 10_000


def test_sms_codes_and_guesses_are_limited_exactly(pg, clock):
    phone = "13900000003"
    answers = at_once([lambda: pg.http.post(pg.url + "/api/v1/auth/sms-code", json={"phone": phone}, timeout=10)]
                      * N)
    assert sorted(r.status_code for r in answers) == [200] + [429] * (N - 1)
    assert all(r.headers.get("Retry-After") for r in answers if r.status_code == 429)
    with pg.app.state.database.read() as conn:
        assert conn.execute(select(t.sms_codes.c.id).where(t.sms_codes.c.phone == phone)).all().__len__() == 1
    real = pg.sms_code(phone)
    wrong = f"{(int(real) + 1) % 1_000_000:06d}"
    guesses = at_once([lambda: requests.post(pg.url + "/api/v1/auth/login", json={"phone": phone, "code": wrong},
                                             timeout=10)] * N)
    codes = [r.json()["error"] for r in guesses]
    assert codes.count("wrong_code") == 5 and codes.count("too_many_attempts") == N - 5, codes
    with pg.app.state.database.read() as conn:
        assert conn.execute(select(t.sms_codes.c.attempts).where(t.sms_codes.c.phone == phone)).scalar() == 5
    ok = requests.post(pg.url + "/api/v1/auth/login", json={"phone": phone, "code": real}, timeout=10)
    assert ok.status_code == 401 and ok.json()["error"] == "too_many_attempts"


def test_a_login_burns_the_older_codes(pg, clock):
    phone = "13900000004"
    assert pg.http.post(pg.url + "/api/v1/auth/sms-code", json={"phone": phone}, timeout=10).status_code == 200
    older = pg.sms_code(phone)
    clock["ms"] += 61_000
    assert pg.http.post(pg.url + "/api/v1/auth/sms-code", json={"phone": phone}, timeout=10).status_code == 200
    newer = pg.sms_code(phone)
    r = requests.post(pg.url + "/api/v1/auth/login", json={"phone": phone, "code": newer}, timeout=10)
    assert r.status_code == 200
    again = requests.post(pg.url + "/api/v1/auth/login", json={"phone": phone, "code": older}, timeout=10)
    assert again.status_code == 401 and again.json()["error"] in ("no_code", "code_used")


def test_an_enrolment_token_issues_one_secret(pg):
    r = pg.op("POST", "/api/v1/operator/machines",
              json={"machine_id": "C5", "location": "Lobby", "price_fen_per_l": 200})
    token = r.json()["enrolment_token"]
    answers = at_once([lambda: requests.post(pg.url + "/device/v1/enroll", timeout=10,
                                             json={"machine_id": "C5", "enrolment_token": token})] * N)
    assert sorted(r.status_code for r in answers) == [200] + [401] * (N - 1), [r.text for r in answers]
    secret = bytes.fromhex(next(r.json()["secret_hex"] for r in answers if r.status_code == 200))
    from tests.cloudkit import DeviceClient
    assert DeviceClient(pg.url, "C5", secret).heartbeat().status_code == 200       # the one issued works


def test_copies_of_one_report_at_once_settle_once_and_answer_alike(pg):
    dev = pg.provision("C6")
    user = pg.user("13900000006", balance_fen=10_000)
    session, cmd = start_session(pg, dev, user)
    sid = session["session_id"]
    dev.ack(cmd["command_id"])
    answers = at_once([lambda: dev.report_end("1-9", sid, 450 * 2)] * N)
    assert all(r.status_code == 200 for r in answers), [r.text for r in answers if r.status_code != 200]
    statuses = sorted(r.json()["results"][0]["status"] for r in answers)
    assert statuses == ["accepted"] + ["duplicate"] * (N - 1)
    assert [k for k, _ in entries(pg, sid)].count("charge") == 1
    assert user.me()["available_fen"] == 10_000 - 400 and user.me()["points"] == 4


def test_redemptions_in_parallel_spend_points_and_stock_exactly(pg):
    dev = pg.provision("C7")
    user = pg.user("13900000007", balance_fen=10_000)
    session, cmd = start_session(pg, dev, user)
    dev.ack(cmd["command_id"])
    dev.report_end("1-1", session["session_id"], 450 * 25)          # 50 yuan: 50 points
    assert user.me()["points"] == 50
    gift = pg.op("POST", "/api/v1/operator/gifts", json={"name_zh": "水杯", "name_en": "Cup", "points_cost": 20,
                                                          "stock": 5}).json()
    answers = at_once([lambda i=i: user.call("POST", f"/api/v1/gifts/{gift['gift_id']}/redeem",
                                             json={"request_id": f"request-{i:04d}"}) for i in range(N)])
    assert sorted(r.status_code for r in answers) == [200] * 2 + [409] * (N - 2), [r.text for r in answers]
    assert user.me()["points"] == 10
    with pg.app.state.database.read() as conn:
        assert conn.execute(select(t.gifts.c.stock).where(t.gifts.c.gift_id == gift["gift_id"])).scalar() == 3


def test_an_account_deletion_and_a_start_at_once_never_both_take_the_balance(pg):
    """Deletion locks the user like a start does: either the start holds the money and the deletion waits for
    the pour, or the balance is paid back and the start is refused; never both."""
    from tests.test_cloud import connected
    deleted = 0
    for i in range(8):
        dev = pg.provision(f"D{i}")
        user = pg.user(f"1390000011{i}", balance_fen=5_000)
        connected(dev)
        presence = user.scan(dev.machine_id, dev.qr()).json()["presence_token"]
        start, delete = at_once([lambda u=user, pr=presence: u.start(pr),
                                 lambda u=user: u.call("DELETE", "/api/v1/me",
                                                       json={"confirm": True, "refund_balance": True})])
        assert not (start.status_code == 200 and delete.status_code == 200), (start.text, delete.text)
        if delete.status_code == 200:
            assert delete.json()["refund_fen"] == 5_000
            deleted += 1
        else:
            assert start.status_code == 200 and delete.json()["error"] == "session_open", (start.text, delete.text)
    refunds = pg.op("GET", "/api/v1/operator/balance-refunds").json()["refunds"]
    assert len(refunds) == deleted and all(r["amount_fen"] == 5_000 for r in refunds)
    if refunds:                     # and an owed refund is marked paid once, however many operators press at once
        rid = refunds[0]["refund_id"]
        answers = at_once([lambda n=n: pg.op("POST", f"/api/v1/operator/balance-refunds/{rid}/paid",
                                             json={"reference": f"WX-{n}"}) for n in range(N)])
        assert sorted(r.status_code for r in answers) == [200] + [409] * (N - 1), [r.text for r in answers]


def test_an_instance_opens_its_connections_at_start_and_keeps_those_a_burst_opened(pg):
    """Each connection PostgreSQL opens is a new backend (its caches cold) under a request that waits for it.
    An instance opens some when it starts, and one opened for a burst stays in the pool for the next burst: with
    an overflow beyond the pool, every burst opened (and closed) its own again, 14 in 40 s at 20,000 machines."""
    from cloud.db import PG_POOL_SIZE, PG_WARM_CONNECTIONS
    database = pg.app.state.database
    pool = database.engine.pool

    def pooled() -> int:                          # in the pool, or out with a request or a background job
        return pool.checkedin() + pool.checkedout()
    assert pooled() >= PG_WARM_CONNECTIONS        # before any request

    def burst() -> None:
        barrier = threading.Barrier(PG_POOL_SIZE)

        def hold() -> None:
            with database.read() as conn:
                conn.execute(select(1))
                barrier.wait(10)                  # every connection of the pool out at once
        with ThreadPoolExecutor(PG_POOL_SIZE) as ex:
            for f in [ex.submit(hold) for _ in range(PG_POOL_SIZE)]:
                f.result()

    opened = []
    event.listen(database.engine, "connect", lambda *_: opened.append(1))    # each new connection to PostgreSQL
    burst()
    after_first = len(opened)
    for _ in range(3):
        burst()
    assert len(opened) == after_first
    assert pooled() == PG_POOL_SIZE


def test_a_start_the_database_undoes_in_a_deadlock_is_answered_503_and_holds_nothing(pg):
    """Two transactions that take the same rows in opposite orders: PostgreSQL undoes one after a second. When
    that is a person's start, the phone gets 503 ``database_busy`` with Retry-After (not a 500 "internal error"),
    no money stays held, and the start made again goes through."""
    import psycopg

    from tests.test_cloud import connected
    url = pg.settings.database_url.replace("postgresql+psycopg://", "postgresql://")
    for attempt in range(3):
        dev, user = pg.provision(f"DL{attempt}"), pg.user(f"1390000021{attempt}", balance_fen=5_000)
        connected(dev)
        presence = user.scan(dev.machine_id, dev.qr()).json()["presence_token"]
        with psycopg.connect(url, autocommit=True) as watch:
            for _ in range(100):               # the poll's presence written (its flush locks the machine row too)
                if watch.execute("SELECT poll_until_ms FROM machines WHERE machine_id = %s",
                                 (dev.machine_id,)).fetchone()[0]:
                    break
                time.sleep(0.05)
        with psycopg.connect(url) as other, ThreadPoolExecutor(1) as ex, \
                psycopg.connect(url, autocommit=True) as watch:
            # the other transaction holds the machine; the start takes the person, then waits for the machine
            other.execute("SELECT 1 FROM machines WHERE machine_id = %s FOR UPDATE", (dev.machine_id,))
            start = ex.submit(user.start, presence)
            for _ in range(100):
                if watch.execute("SELECT count(*) FROM pg_stat_activity WHERE %s = ANY(pg_blocking_pids(pid)) "
                                 "AND query LIKE '%%FROM machines%%'", (other.info.backend_pid,)).fetchone()[0]:
                    break
                time.sleep(0.05)
            else:
                pytest.fail("the start never waited for the machine")
            # ... and now the other transaction wants the person: a cycle, which PostgreSQL breaks by undoing the
            # start (it waited first, so its deadlock check runs first, unless this thread was held up for a
            # whole deadlock_timeout: then it undoes this one, the start goes through, and the test goes again)
            try:
                other.execute("SELECT 1 FROM users WHERE user_id = %s FOR UPDATE", (user.user_id,))
                ours_undone = False
            except psycopg.errors.DeadlockDetected:
                ours_undone = True
            other.rollback()
            r = start.result(20)
        if not ours_undone:
            break
        assert r.status_code == 200, r.text
    else:
        pytest.fail("PostgreSQL undid the test's transaction, not the start, three times")
    assert r.status_code == 503 and r.json()["error"] == "database_busy", r.text
    assert r.headers["Retry-After"] == "1"
    assert user.me()["held_fen"] == 0 and user.me()["available_fen"] == 5_000
    again = user.start(presence)
    assert again.status_code == 200, again.text
    [cmd] = dev.poll()
    assert cmd["kind"] == "start" and cmd["session_id"] == again.json()["session_id"]


def test_a_database_that_is_gone_is_answered_503_not_an_internal_error(pg):
    """The database dropped under a running instance (its connections cut, new ones refused): a person's request
    is answered 503 ``database_unavailable`` with Retry-After, which the phone pages and devices retry, not 500
    "internal error"."""
    import psycopg
    user = pg.user("13900000202", balance_fen=5_000)
    assert user.call("GET", "/api/v1/me").status_code == 200
    name = pg.settings.database_url.rsplit("/", 1)[1]
    with psycopg.connect(PG_URL.replace("postgresql+psycopg://", "postgresql://"), autocommit=True) as c:
        c.execute(f"DROP DATABASE {name} WITH (FORCE)")
    r = user.call("GET", "/api/v1/me")
    assert r.status_code == 503 and r.json()["error"] == "database_unavailable", r.text
    assert r.headers["Retry-After"] == "2"
    assert "internal" not in r.text


def test_only_passing_database_trouble_is_a_503_and_a_bug_stays_a_500(tmp_path):
    """What the database raises, sorted as the 503/500 handler sorts it, from real errors of real databases: a
    database that cannot be reached passes (503), a wrong query or a statement timeout is a bug (500)."""
    from sqlalchemy import create_engine, exc, text

    from cloud.errors import database_trouble

    def raised(engine, *sql: str) -> exc.DBAPIError:
        with pytest.raises(exc.DBAPIError) as e, engine.connect() as conn:
            for s in sql:
                conn.execute(text(s))
        return e.value

    lite = create_engine(f"sqlite:///{tmp_path / 'x.db'}", connect_args={"timeout": 0.05})
    assert database_trouble(raised(lite, "SELECT * FROM no_such_table")) is None
    import sqlite3
    holder = sqlite3.connect(tmp_path / "x.db", isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")                  # another process writing: SQLite's busy wait runs out
    assert database_trouble(raised(lite, "SELECT 1 FROM sqlite_master")) == "busy"
    holder.execute("ROLLBACK")
    holder.close()
    if PG_URL:
        pg = create_engine(PG_URL)
        assert database_trouble(raised(pg, "SELECT * FROM no_such_table")) is None
        assert database_trouble(raised(pg, "SET statement_timeout = 50", "SELECT pg_sleep(1)")) is None
        assert database_trouble(raised(pg, "SELECT 1/0")) is None
        pg.dispose()
        gone = create_engine(PG_URL.rsplit(":", 1)[0] + ":1/postgres")       # nothing listens on port 1
        assert database_trouble(raised(gone, "SELECT 1")) == "unavailable"
