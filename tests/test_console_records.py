"""The console's sessions (rental records) in Chromium and over HTTP: sessions reported end to end by machines (a
signed DeviceClient, and a simulated dispenser that really pours), searched by machine, user, days, end reason and
amount, paged, exported as CSV; a record with its flow chart, refunded through the page; a session stuck open closed
by an operator (the hold released, a late report billed once); what each role is neither shown nor allowed."""

import itertools

import pytest
from sqlalchemy import select

from cloud import db as t
from cloud.records.service import flow_chart
from tests.cloudkit import CloudServer
from tests.consolekit import LONG_ADDRESS, WIDE, XSS, Console, download_csv, goto, make_operator, open_console, shot
from tests.test_cloud import start_session
from tests.test_sync import Dispenser, buy_water
from tests.util import wait_until

SESSIONS = "/api/v1/operator/sessions"
EVENT_SEQ = itertools.count(1)


def team(cloud) -> None:
    make_operator(cloud, "admin", "boss", display_name="王经理")
    make_operator(cloud, "reviewer", "shen.he")
    make_operator(cloud, "operator", "yun.ying", display_name="运营小陈")
    make_operator(cloud, "viewer", "kan.kan")


@pytest.fixture
def world(tmp_path):
    with CloudServer(tmp_path / "cloud", scans_per_minute_per_network=100_000) as c:
        team(c)
        yield c


def pour(dev, user, pulses: int, reason: str = "stop_button", price: int = 200) -> str:
    """A session started by the phone, claimed by the machine and reported ended by it: settled by the server."""
    session, cmd = start_session(None, dev, user, price)
    assert dev.ack(cmd["command_id"]).status_code == 200
    sid = session["session_id"]
    r = dev.report_end(f"1-{next(EVENT_SEQ)}", sid, billed_pulses=pulses, reason=reason, price=price)
    assert r.status_code == 200 and r.json()["results"][0]["status"] == "accepted", r.text
    return sid


def stuck(dev, user) -> str:
    """A session the machine claimed and never reported the end of."""
    session, cmd = start_session(None, dev, user)
    assert dev.ack(cmd["command_id"]).json()["session_state"] == "active"
    return session["session_id"]


def no_toast(page) -> None:
    """The last action's toast away (it would cover the screenshot that follows)."""
    page.evaluate("document.getElementById('toast').hidden = true")


def balance(user) -> tuple[int, int]:
    me = user.me()
    return me["available_fen"], me["held_fen"]


def audit_actions(cloud, target: str) -> list[str]:
    with cloud.app.state.database.read() as conn:
        return list(conn.execute(select(t.audit_log.c.action).where(t.audit_log.c.target == target)
                                 .order_by(t.audit_log.c.id)).scalars())


# ---------------------------------------------------------------- search, paging, CSV

def test_an_operator_searches_pages_filters_and_exports_sessions(world, browser):
    cloud = world
    a = cloud.provision("A1")
    b = cloud.provision("B2")
    assert cloud.op("PATCH", "/api/v1/operator/machines/A1", json={"location": LONG_ADDRESS}).ok
    assert cloud.op("PATCH", "/api/v1/operator/machines/B2", json={"location": XSS}).ok
    alice = cloud.user("13800138000", balance_fen=100_000)
    bob = cloud.user("13900139000", balance_fen=100_000)
    for _ in range(52):                                        # more than a page, on A1, each 1 L (2 yuan)
        pour(a, alice, 450)
    leak = pour(b, bob, 2250, reason="leak")                   # 5 L: 10 yuan
    small = pour(b, bob, 90, reason="idle")                    # 200 ml: 0.40 yuan
    open_one = stuck(b, bob)

    page = open_console(browser, cloud, "yun.ying", hash_="#/sessions")
    page.wait_for_selector("#page-sessions tbody tr")
    assert page.inner_text("#count") == "共 55 条"
    assert page.locator("#page-sessions tbody tr").count() == 50
    page.click("#more")
    page.wait_for_function("() => document.querySelectorAll('#page-sessions tbody tr').length === 55")
    assert page.is_hidden("#more")
    assert page.locator(f"tr[data-key='{open_one}'] .chip.amber").count() == 1
    assert XSS in page.inner_text(f"tr[data-key='{leak}']")               # the machine's place as text
    shot(page, "sessions-search")

    page.fill("[name=user]", "13900139000")                     # a phone number: exactly
    page.click("#session-filters button[type=submit]")
    page.wait_for_function("() => document.querySelectorAll('#page-sessions tbody tr').length === 3")
    page.select_option("[name=reason]", "leak")
    page.click("#session-filters button[type=submit]")
    page.wait_for_function("() => document.querySelectorAll('#page-sessions tbody tr').length === 1")
    assert page.locator(f"tr[data-key='{leak}']").count() == 1
    page.select_option("[name=reason]", "")
    page.fill("[name=max]", "1")                                # at most 1 yuan
    page.click("#session-filters button[type=submit]")
    # the leak row was also the only row: wait for the new answer's row, not for a count of one
    page.wait_for_selector(f"tr[data-key='{small}']")
    assert page.locator("#page-sessions tbody tr").count() == 1
    page.fill("[name=user]", "")
    page.fill("[name=max]", "")
    page.fill("[name=machine]", "A1")
    page.fill("[name=min]", "2")
    page.click("#session-filters button[type=submit]")
    page.wait_for_function("() => document.querySelectorAll('#page-sessions tbody tr').length === 50")
    rows = download_csv(page)
    assert rows[0][:5] == ["session_id", "started_local", "machine_id", "location", "user_id"]
    assert len(rows) == 1 + 52                                  # every match, not one page
    assert {r[3] for r in rows[1:]} == {LONG_ADDRESS} and {r[5] for r in rows[1:]} == {"138****8000"}
    assert {r[9] for r in rows[1:]} == {"2.00"}

    goto(page, "#/sessions?from=&state=open", f"tr[data-key='{open_one}']")
    assert page.locator("#page-sessions tbody tr").count() == 1
    page.click("#lang")
    page.wait_for_selector("h1:has-text('Rental records')")
    goto(page, "#/sessions?from=", "#count:has-text('55 records')")
    shot(page, "sessions-search")
    page.set_viewport_size(WIDE)
    shot(page, "sessions-search")
    page.click("#lang")
    page.wait_for_selector("#count:has-text('共 55 条')")
    shot(page, "sessions-search")
    assert page.errors == []
    page.context.close()


def test_a_search_with_a_rare_filter_looks_at_a_bounded_number_of_sessions_per_page(world, monkeypatch):
    import cloud.records.service as records
    monkeypatch.setattr(records, "SCAN_ROWS", 4)
    cloud = world
    dev = cloud.provision("R1")
    user = cloud.user("13800138001", balance_fen=100_000)
    rare = pour(dev, user, 450, reason="fault")                # the oldest
    for _ in range(9):
        pour(dev, user, 450)
    s = Console(cloud, "kan.kan")
    found, pages, before = [], 0, ""
    while True:
        r = s.call("GET", SESSIONS, params={"end_reason": "fault", "limit": 2, "before": before})
        assert r.status_code == 200, r.text
        body = r.json()
        pages += 1
        assert body["count"] is None                         # counting would mean reading them all
        found += [x["session_id"] for x in body["sessions"]]
        if not body["next_before"]:
            break
        assert body["sessions"] or body["scanned_to_ms"]
        before = body["next_before"]
    assert found == [rare] and pages == 3                      # 10 sessions, 4 looked at per page
    every = s.call("GET", SESSIONS, params={"limit": 3}).json()
    assert every["count"] == 10 and len(every["sessions"]) == 3 and every["scanned_to_ms"] is None
    rest = s.call("GET", SESSIONS, params={"limit": 50, "before": every["next_before"]}).json()
    assert len(rest["sessions"]) == 7 and rest["next_before"] is None
    assert not {x["session_id"] for x in rest["sessions"]} & {x["session_id"] for x in every["sessions"]}


def test_bad_searches_and_unknown_records_get_clear_errors(world):
    s = Console(world, "kan.kan")
    for params, code in (({"from_ms": 10, "to_ms": 5}, "bad_period"),
                         ({"min_fen": 500, "max_fen": 100}, "bad_amount_range"),
                         ({"before": "yesterday"}, "bad_cursor"), ({"state": "maybe"}, "invalid_request"),
                         ({"limit": 0}, "invalid_request"), ({"format": "xml"}, "invalid_request"),
                         ({"min_fen": -1}, "invalid_request"), ({"end_reason": "<b>"}, "invalid_request")):
        r = s.call("GET", SESSIONS, params=params)
        assert r.status_code == 422 and r.json()["error"] == code, (params, r.text)
    assert s.call("GET", SESSIONS, params={"user": "13700000000"}).json()["sessions"] == []   # nobody's number
    r = s.call("GET", f"{SESSIONS}/s-nothing")
    assert r.status_code == 404 and r.json()["error"] == "unknown_session"


# ---------------------------------------------------------------- one record: the chart, a refund

def test_a_record_poured_by_a_real_dispenser_shows_its_flow_and_is_refunded_through_the_page(world, browser, tmp_path):
    cloud = world
    dev = cloud.provision("S1", price=200)
    assert cloud.op("PATCH", "/api/v1/operator/machines/S1", json={"location": LONG_ADDRESS}).ok
    user = cloud.user("13800138002", balance_fen=5_000)
    with Dispenser(tmp_path, cloud.url, "S1", dev.secret) as d:
        assert wait_until(lambda: d.rt.snapshot.online)
        sid = buy_water(cloud, d, user, pour_s=2.5)
        assert wait_until(lambda: user.call("GET", f"/api/v1/sessions/{sid}").json()["state"] == "ended", 15)
    rec = Console(cloud, "kan.kan").call("GET", f"{SESSIONS}/{sid}").json()
    fee = rec["session"]["fee_fen"]
    assert fee > 0 and rec["flow"]["source"] == "record" and len(rec["flow"]["t_ms"]) >= 3
    assert rec["flow"]["volume_ml"][-1] <= rec["session"]["volume_ml"] + 5
    assert [v["action"] for v in rec["valve"]] == ["open", "close"] and rec["valve"][1]["reason"] == "stop_button"
    assert rec["money"]["charged_fen"] == fee and rec["money"]["held_fen"] == rec["money"]["released_fen"]
    before, _held = balance(user)

    page = open_console(browser, cloud, "yun.ying", hash_=f"#/sessions/{sid}")
    page.wait_for_selector("#flow-chart canvas")
    assert "采样点" in page.inner_text("#flow-note")
    assert page.evaluate("() => document.querySelector('#flow-chart canvas').width") > 300
    assert LONG_ADDRESS in page.inner_text("#location")
    assert page.locator("#close-session").count() == 0             # settled: nothing to close
    shot(page, "session-record")
    page.click("#refund")
    page.fill("dialog [name=amount]", f"{fee / 100 + 1:.2f}")      # more than was charged: the server says so
    page.fill("dialog [name=reason]", "出水浑浊，用户投诉")
    page.click("dialog button[type=submit]")
    page.wait_for_selector(f"dialog .field-error:has-text('refundable: {fee} fen')")
    page.fill("dialog [name=amount]", "0.10")
    page.click("dialog button[type=submit]")
    page.wait_for_selector("#stat-refunded b:has-text('¥0.10')")
    assert balance(user)[0] == before + 10
    assert audit_actions(cloud, sid) == ["refund"]
    page.click("#facts a[href^='#/users/']")
    page.wait_for_selector("#page-users tbody tr")
    assert page.locator("#page-users tbody tr").filter(has_text="¥0.10").count() == 1
    assert page.inner_text("#stat-balance b") == f"¥{(before + 10) / 100:.2f}"
    goto(page, f"#/sessions/{sid}", "#flow-chart canvas")
    no_toast(page)
    page.click("#lang")
    page.wait_for_selector("text=Refundable")
    shot(page, "session-record")
    page.set_viewport_size(WIDE)
    page.wait_for_timeout(100)                                   # the chart follows its box's new width
    shot(page, "session-record")
    page.click("#lang")
    page.wait_for_selector("text=可退款")
    shot(page, "session-record")
    assert page.errors == [f"422 {cloud.url}{SESSIONS}/{sid}/refund"]
    page.context.close()


def test_only_operators_and_admins_are_offered_and_allowed_a_refund(world, browser):
    cloud = world
    dev = cloud.provision("V1")
    user = cloud.user("13800138003", balance_fen=5_000)
    sid = pour(dev, user, 900)
    for who in ("kan.kan", "shen.he"):
        page = open_console(browser, cloud, who, hash_=f"#/sessions/{sid}")
        page.wait_for_selector("#facts")
        assert page.locator("#refund").count() == 0 and page.locator("#close-session").count() == 0
        page.context.close()
        r = Console(cloud, who).call("POST", f"{SESSIONS}/{sid}/refund", json={"amount_fen": 10, "reason": "x"})
        assert r.status_code == 403, who
    r = Console(cloud, "yun.ying").call("POST", f"{SESSIONS}/{sid}/refund", csrf=False,
                                        json={"amount_fen": 10, "reason": "x"})
    assert r.status_code == 403 and r.json()["error"] == "csrf"
    assert balance(user)[0] == 5_000 - 400


# ---------------------------------------------------------------- closing a stuck session

def test_closing_a_stuck_session_releases_the_hold_and_a_late_report_is_billed_once(cloud):
    make_operator(cloud, "operator", "yun.ying")
    make_operator(cloud, "viewer", "kan.kan")
    make_operator(cloud, "reviewer", "shen.he")
    dev = cloud.provision("K1")
    user = cloud.user("13800138004", balance_fen=1_000)
    sid = stuck(dev, user)
    assert balance(user) == (0, 1_000)
    op = Console(cloud, "yun.ying")
    for who in ("kan.kan", "shen.he"):
        assert Console(cloud, who).call("POST", f"{SESSIONS}/{sid}/close", json={"reason": "卡住了"}).status_code == 403
    assert op.call("POST", f"{SESSIONS}/{sid}/close", csrf=False, json={"reason": "卡住了"}).status_code == 403
    for body in ({}, {"reason": " "}, {"reason": "x" * 201}, {"reason": "卡住了", "charge": 5}):
        assert op.call("POST", f"{SESSIONS}/{sid}/close", json=body).status_code == 422, body
    assert op.call("POST", f"{SESSIONS}/s-none/close", json={"reason": "卡住了"}).status_code == 404

    r = op.call("POST", f"{SESSIONS}/{sid}/close", json={"reason": "设备断网，用户已离开"})
    assert r.status_code == 200, r.text
    assert r.json()["state"] == "lost" and r.json()["released_fen"] == 1_000
    assert balance(user) == (1_000, 0)                          # released, nothing charged
    again = op.call("POST", f"{SESSIONS}/{sid}/close", json={"reason": "再试一次"})
    assert again.status_code == 409 and again.json()["error"] == "session_over"
    assert audit_actions(cloud, sid) == ["close_session"]
    [cancel] = dev.poll()                                       # the machine is told to stop, if it still pours
    assert cancel["kind"] == "cancel" and cancel["session_id"] == sid
    rec = op.call("GET", f"{SESSIONS}/{sid}").json()
    assert rec["session"]["state"] == "lost" and not rec["stuck"] and "设备断网" in rec["session"]["void_reason"]

    late = dev.report_end("7-1", sid, billed_pulses=900)     # 2 L measured: 400 fen
    assert late.json()["results"][0]["status"] == "accepted"
    assert dev.report_end("7-2", sid, billed_pulses=900).json()["results"][0]["status"] == "duplicate"
    assert balance(user) == (600, 0)
    money = op.call("GET", f"{SESSIONS}/{sid}").json()["money"]
    assert [e["kind"] for e in money["entries"]] == ["hold", "release", "charge"]
    assert (money["charged_fen"], money["held_fen"], money["released_fen"]) == (400, 1_000, 1_000)
    assert op.call("POST", f"{SESSIONS}/{sid}/close", json={"reason": "再试一次"}).status_code == 409


def test_closing_an_unclaimed_start_voids_it_and_the_machine_may_no_longer_pour(cloud):
    make_operator(cloud, "admin", "boss")
    dev = cloud.provision("K2")
    user = cloud.user("13800138005", balance_fen=1_000)
    session, cmd = start_session(None, dev, user)
    r = Console(cloud, "boss").call("POST", f"{SESSIONS}/{session['session_id']}/close", json={"reason": "没有确认"})
    assert r.status_code == 200 and r.json()["state"] == "voided" and r.json()["cancel_command_id"] is None
    claim = dev.ack(cmd["command_id"])
    assert claim.status_code == 409 and claim.json()["error"] == "start_void"
    assert balance(user) == (1_000, 0)


def test_an_operator_closes_a_stuck_session_in_the_page(world, browser):
    cloud = world
    dev = cloud.provision("P1")
    user = cloud.user("13800138006", balance_fen=1_000)
    sid = stuck(dev, user)
    dev.request("POST", "/device/v1/progress", {"session_id": sid, "volume_ml": 350, "cost_fen": 70,
                                                "flow_ml_per_min": 4200, "elapsed_ms": 5000})
    page = open_console(browser, cloud, "yun.ying", hash_=f"#/sessions/{sid}")
    page.wait_for_selector("#flow-chart canvas")                 # two honest points: opening and the last progress
    assert "进度" in page.inner_text("#flow-note")
    assert page.locator("#refund").count() == 0
    shot(page, "session-stuck")
    page.click("#close-session")
    page.click("dialog button[type=submit]")
    page.wait_for_selector("dialog .field-error:not(:empty)")   # a reason is needed
    page.fill("dialog [name=reason]", "设备断电，用户已离开")
    page.click("dialog button[type=submit]")
    page.wait_for_selector("#facts .chip.bad")
    assert page.locator("#close-session").count() == 0
    assert balance(user) == (1_000, 0)
    assert page.errors == []
    page.context.close()


# ---------------------------------------------------------------- the series, pure

def test_the_flow_chart_is_what_the_machine_measured_and_no_more():
    record = {"milli_pulses_per_litre": 450_000, "flow_series_columns": ["t_ms", "billed_pulses", "overrun_pulses",
                                                                         "temp_c", "valve_open"],
              "flow_series": [[0, 0, 0, 12.0, True], [1000, 45, 0, 12.1, True], [2000, 135, 0, None, True],
                              [2500, 135, 3, 12.3, False]]}
    f = flow_chart(record, 1_000_000, {})
    assert f["source"] == "record" and f["t_ms"] == [1_000_000, 1_001_000, 1_002_000, 1_002_500]
    assert f["volume_ml"] == [0, 100, 300, 300]
    assert f["flow_ml_per_min"] == [0, 6000, 12000, 0] and f["temp_c"] == [12.0, 12.1, None, 12.3]
    late = flow_chart({**record, "flow_series": [[500, 45, 0, 12.0, True], [1500, 90, 0, 12.0, True]]}, 0, {})
    assert late["t_ms"] == [0, 500, 1500] and late["volume_ml"] == [0, 100, 200]     # from the valve opening
    assert late["flow_ml_per_min"] == [0, 12000, 6000] and late["temp_c"] == [None, 12.0, 12.0]
    assert flow_chart(None, None, {"progress": {"elapsed_ms": 4000, "volume_ml": 300, "flow_ml_per_min": 4500},
                                   "acked_ms": 50})["volume_ml"] == [0, 300]
    late = flow_chart({**record, "flow_series": [[500, 45, 0, 12.0, True], [1500, 90, 0, 12.0, True]]}, 0, {})
    assert late["t_ms"] == [0, 500, 1500] and late["volume_ml"] == [0, 100, 200]     # from the valve opening
    assert late["flow_ml_per_min"] == [0, 12000, 6000] and late["temp_c"] == [None, 12.0, 12.0]
    assert flow_chart(None, None, {"progress": None})["source"] == "none"
    assert flow_chart({**record, "flow_series_columns": ["x"]}, 0, {})["t_ms"] == []
