"""The console's fleet and machine pages in Chromium, against a cloud whose machines really heartbeat (signed HTTP,
spread over the past week on a moved clock) and really pour: filters, sorting, search, CSV, a price for several
machines at once, the charts, each action on a machine by the role that may, and a viewer who sees none and is
refused; then the fleet API's own rules on SQLite and PostgreSQL (samples at most every 5 minutes, pruned after 35
days, litres per hour of the machine's clock, bad input)."""

from __future__ import annotations

import csv
import io
import math
import time

import pytest
from sqlalchemy import insert, select

import contract as p
from cloud import db as t
from cloud.app import _prune
from cloud.fleet.samples import SAMPLE_EVERY_MS, SAMPLES_KEEP_MS
from cloud.fleet.service import CONSUMABLES_KEY, DISPLAYED_PRICE_KEY, fleet_row
from tests.cloudkit import PG_URL, CloudServer
from tests.consolekit import LONG_ADDRESS, WIDE, XSS, Console, download_csv, goto, make_operator, open_console, shot

HOUR_MS = 3_600_000
MIN_MS = 60_000


def real_ms() -> int:
    return time.time_ns() // 1_000_000


class Clock:
    """The cloud's clock: real time moved by ``offset_ms``. History is made in the past, then the offset goes back
    to 0 and time runs on, as the browser's does."""

    def __init__(self) -> None:
        self.offset_ms = 0

    def __call__(self) -> int:
        return real_ms() + self.offset_ms

    def at(self, ms: int) -> None:
        self.offset_ms = ms - real_ms()


def beat(clock: Clock, dev, at_ms: int | None = None, **fields) -> None:
    """A heartbeat over signed HTTP at ``at_ms`` of the cloud's clock (the machine's clock agrees)."""
    if at_ms is not None:
        clock.at(at_ms)
    dev.offset = clock.offset_ms
    r = dev.heartbeat(**fields)
    assert r.status_code == 200, r.text


def pour(clock: Clock, dev, user, at_ms: int, pulses: int, event_id: str, price: int = 200) -> str:
    """A real session at ``at_ms``: scan, start, the machine claims it and reports the end; returns its id."""
    clock.at(at_ms)
    dev.offset = clock.offset_ms
    dev.poll(wait_ms=0)
    scan = user.scan(dev.machine_id, p.qr_code(dev.secret, dev.machine_id, clock() // 1000))
    assert scan.status_code == 200, scan.text
    r = user.start(scan.json()["presence_token"], price)
    assert r.status_code == 200, r.text
    [cmd] = dev.poll()
    assert dev.ack(cmd["command_id"]).status_code == 200
    end = dev.report_end(event_id, cmd["session_id"], billed_pulses=pulses, price=price)
    assert end.json()["results"][0]["status"] == "accepted", end.text
    return cmd["session_id"]


def consumables(filter_permille: int, uv_permille: int) -> list[dict]:
    return [{"kind": "filter", "used_l": filter_permille * 3, "life_l": 3000, "used_days": 40, "life_days": 180,
             "used_permille": filter_permille, "due": filter_permille >= 900},
            {"kind": "uv_lamp", "used_l": 0, "life_l": 0, "used_days": uv_permille * 365 // 1000, "life_days": 365,
             "used_permille": uv_permille, "due": uv_permille >= 900}]


@pytest.fixture
def fleet(tmp_path):
    """Four machines: S1 in the lobby, heard from for a week and poured from, its screen showing an old price, its
    filter due; S2 at a long address, out of service with a ghost-flow lockout and a dead letter; S3 with script
    for its place, silent for 10 minutes; S4 enrolled and never heard from. The alarm rules judged once (TDS above
    50 ppm is one: S1 and S2); operators of every role."""
    clock = Clock()
    with CloudServer(tmp_path / "cloud", clock_ms=clock, alarm_check_interval_s=3600) as c:
        c.clock = clock
        for role, name in (("admin", "boss"), ("operator", "yun.ying"), ("viewer", "kan.kan")):
            make_operator(c, role, name)
        devs = {mid: c.provision(mid, price=price) for mid, price in (("S1", 200), ("S2", 250), ("S3", 300),
                                                                        ("S4", 200))}
        for mid, place in (("S1", {"location": "一楼大堂", "site": "总部"}),
                           ("S2", {"location": LONG_ADDRESS, "site": "杭州华星"}),
                           ("S3", {"location": XSS, "site": XSS[:100]})):
            assert c.op("PATCH", f"/api/v1/operator/machines/{mid}", json=place).status_code == 200
        now = real_ms()
        week = [*range(now - 7 * 24 * HOUR_MS, now - 24 * HOUR_MS, 30 * MIN_MS),
                *range(now - 24 * HOUR_MS, now, 10 * MIN_MS)]
        for i, at in enumerate(week):                  # a week, every 30 minutes, the last day every 10
            beat(clock, devs["S1"], at, temp_c=round(10 + 3 * math.sin(at / (4 * HOUR_MS)), 1), tds_ppm=60 + i % 9,
                 software_version="1.4.2")
        for i in range(24, 0, -1):
            beat(clock, devs["S2"], now - i * HOUR_MS, temp_c=14.0, tds_ppm=420, software_version="1.4.2")
        user = c.user("13800138000", balance_fen=100_000)
        c.sessions = [pour(clock, devs["S1"], user, now - h * HOUR_MS - 20 * MIN_MS, 450 * n, f"1-{h}")
                      for h, n in ((30, 4), (5, 3), (2, 2), (1, 1))]      # litres, hours ago
        # 10 minutes before the real time now, not before the start of this set-up: the week of heartbeats above
        # takes a while, and the page reads "10 分钟前" only until 11 minutes have passed
        beat(clock, devs["S3"], real_ms() - 10 * MIN_MS, temp_c=11.0, tds_ppm=90, software_version="1.3.0")
        clock.offset_ms = 0
        for dev in devs.values():
            dev.offset = 0

        def alive() -> None:
            """S1 and S2 heard from now (a machine not heard from for 2 minutes is offline)."""
            beat(clock, devs["S1"], price_fen_per_l=180, consumables=consumables(950, 300), temp_c=12.5, tds_ppm=80,
                 software_version="1.4.2")
            beat(clock, devs["S2"], state="out_of_service", lockouts=["ghost_flow"], temp_c=14.2, tds_ppm=430,
                 software_version="1.4.2", outbox_depth=3, dead_letters=1)
        alive()
        c.alive = alive
        r = devs["S2"].request("POST", "/device/v1/events", {"events": [
            devs["S2"].event("2-1", "boot"), devs["S2"].event("2-2", "lockout", {"reason": "ghost_flow"})]})
        assert r.status_code == 200, r.text
        c.app.state.services.alarms.check(clock())
        with c.app.state.database.tx() as conn:        # resolved long ago: not counted
            conn.execute(insert(t.operator_alarms).values(
                rule="offline", machine_id="S4", severity="critical", state="resolved", detail={},
                opened_ms=now - HOUR_MS, last_ms=now - HOUR_MS, resolved_ms=now - HOUR_MS))
        c.devs = devs
        yield c


def keys(page) -> list[str]:
    return page.eval_on_selector_all("#page-fleet tbody tr", "rows => rows.map((r) => r.dataset.key)")


def rerendered(page, action) -> None:
    """Do ``action`` (which changes the address) and wait for the fleet page drawn anew."""
    old = page.query_selector("#page-fleet")
    action()
    page.wait_for_function("(el) => !el.isConnected", arg=old)
    page.wait_for_selector("#page-fleet .tablewrap")


def search(page, **fields) -> None:
    """Set the fleet's filters in the form and search."""
    page.fill("#fleet-q", fields.get("q", ""))
    page.select_option("#fleet-online", fields.get("online", ""))
    for box, on in (("#fleet-alarms", "alarms"), ("#fleet-lockouts", "lockouts"), ("#fleet-mismatch", "mismatch")):
        page.set_checked(box, bool(fields.get(on)))
    rerendered(page, lambda: page.click("#fleet-search"))


def prices(cloud) -> dict[str, int]:
    return {m["machine_id"]: m["price_fen_per_l"] for m in cloud.op("GET", "/api/v1/operator/fleet").json()["machines"]}


def audit(cloud, action: str) -> list[tuple[str, dict]]:
    with cloud.app.state.database.read() as conn:
        return [(r.target, r.detail) for r in conn.execute(
            select(t.audit_log).where(t.audit_log.c.action == action).order_by(t.audit_log.c.id))]


# ---------------------------------------------------------------- the fleet page

def test_the_fleet_page_filters_sorts_searches_and_downloads_what_it_shows(fleet, browser, tmp_path):
    page = open_console(browser, fleet, "yun.ying", hash_="#/fleet")
    page.wait_for_selector("#page-fleet tr[data-key='S4']")
    assert keys(page) == ["S1", "S2", "S3", "S4"]
    assert [page.inner_text(f"#stat-{x} b") for x in ("machines", "online", "offline", "alarms", "lockouts",
                                                       "mismatch")] == ["4", "2/4", "2", "3", "1", "1"]
    assert "50%" in page.inner_text("#stat-online span")
    s1, s2, s3 = (page.inner_text(f"tr[data-key='{m}']") for m in ("S1", "S2", "S3"))
    assert "¥2.00" in s1 and "屏显 ¥1.80" in s1 and "12.5 °C" in s1 and "80 ppm" in s1 and "95% / 30%" in s1
    assert "暂停服务" in s2 and "异常流量" in s2 and "3 / 1" in s2 and LONG_ADDRESS in s2
    assert XSS in s3 and "离线" in s3 and "10 分钟前" in s3                    # the script is text
    assert page.locator("tr[data-key='S1'] .mismatch").count() == 1
    shot(page, "fleet")

    search(page, q="华星")                                                   # a site
    assert keys(page) == ["S2"]
    search(page, q="s3")                                                     # a machine id, any case
    assert keys(page) == ["S3"]
    search(page, online="offline")
    assert keys(page) == ["S3", "S4"]
    search(page, lockouts=True)
    assert keys(page) == ["S2"]
    search(page, alarms=True)
    assert keys(page) == ["S1", "S2", "S3"]
    search(page, mismatch=True)
    assert keys(page) == ["S1"]
    page.select_option("#fleet-state", "out_of_service")
    search(page)
    assert keys(page) == ["S2"]
    rerendered(page, lambda: page.click("#fleet-reset"))
    assert keys(page) == ["S1", "S2", "S3", "S4"]

    rerendered(page, lambda: page.click("th button:has-text('水温')"))      # sorted by the server, unknown last
    assert keys(page) == ["S3", "S1", "S2", "S4"]
    rerendered(page, lambda: page.click("th button:has-text('水温')"))
    assert keys(page) == ["S2", "S1", "S3", "S4"] and "order=desc" in page.evaluate("location.hash")

    fleet.alive()
    search(page, online="offline")
    header, *body = download_csv(page, "#page-fleet a:has-text('导出 CSV')")
    rows = [dict(zip(header, r, strict=True)) for r in body]
    assert [r["machine_id"] for r in rows] == ["S3", "S4"]                   # every row of the search, sorted
    assert rows[0]["location"] == XSS and rows[0]["temp_c"] == "11.0" and rows[0]["online"] == "false"
    assert rows[0]["last_seen_utc"].endswith("Z") and rows[1]["last_seen_utc"] == ""
    everything = Console(fleet, "kan.kan").call("GET", "/api/v1/operator/fleet", params={"format": "csv"})
    assert everything.headers["content-type"].startswith("text/csv")
    rows = list(csv.DictReader(io.StringIO(everything.content.decode("utf-8-sig"))))
    assert [(r["machine_id"], r["location"], r["site"]) for r in rows][:2] == [("S1", "一楼大堂", "总部"),
                                                                                ("S2", LONG_ADDRESS, "杭州华星")]
    assert (rows[0]["displayed_price_fen_per_l"], rows[0]["price_mismatch"], rows[1]["lockouts"]) == \
        ("180", "true", "ghost_flow")

    fleet.alive()
    rerendered(page, lambda: page.click("#fleet-reset"))
    page.click("#lang")
    page.wait_for_selector("#stat-online span:has-text('Online 50%')")
    shot(page, "fleet")
    page.set_viewport_size(WIDE)
    shot(page, "fleet")
    fleet.alive()
    page.click("#lang")
    page.wait_for_selector("#stat-online span:has-text('在线率')")
    shot(page, "fleet")
    assert page.errors == []
    page.context.close()


def test_an_operator_gives_the_ticked_machines_a_new_price_at_once(fleet, browser):
    page = open_console(browser, fleet, "yun.ying", hash_="#/fleet")
    page.wait_for_selector("#page-fleet tr[data-key='S4']")
    assert page.is_disabled("#bulk-price")
    page.check("tr[data-key='S1'] input[type=checkbox]")
    page.check("tr[data-key='S3'] input[type=checkbox]")
    assert page.inner_text("#bulk-price") == "批量改价（2 台）"
    page.click("#bulk-price")
    assert "S1, S3" in page.inner_text("dialog")
    page.fill("dialog [name=price_yuan]", "1001")
    page.click("dialog button[type=submit]")
    page.wait_for_selector("dialog .field-error:not(:empty)")                # above the bound: the server says
    assert fleet.op("GET", "/api/v1/operator/fleet/S1").json()["price_fen_per_l"] == 200
    page.errors.clear()
    page.fill("dialog [name=price_yuan]", "2.8")
    page.click("dialog button[type=submit]")
    page.wait_for_selector(".toast:has-text('已为 2 台设备设置新单价 ¥2.80/升')")
    page.wait_for_selector("tr[data-key='S3']:has-text('¥2.80')")
    assert prices(fleet) == {"S1": 280, "S2": 250, "S3": 280, "S4": 200}
    for mid in ("S1", "S3"):
        assert [(c["kind"], c["price_fen_per_l"]) for c in fleet.devs[mid].poll()] == [("price", 280)]
    assert fleet.devs["S2"].poll() == []
    assert audit(fleet, "change_machine")[-2:] == [("S1", {"price_fen_per_l": 280, "bulk": 2}),
                                                   ("S3", {"price_fen_per_l": 280, "bulk": 2})]
    assert page.errors == []
    page.context.close()


# ---------------------------------------------------------------- the machine page

def test_the_machine_page_draws_its_week_and_shows_its_log_commands_and_sessions(fleet, browser):
    page = open_console(browser, fleet, "boss", hash_="#/machines/S1")
    for chart in ("temp", "tds", "litres"):
        page.wait_for_selector(f"#chart-{chart} canvas")
    assert "#/sessions/" in page.get_attribute("#sessions tbody tr a", "href")
    assert page.locator("#sessions tbody tr").count() == 4
    assert "共 6.00 L" in page.inner_text("#charts")                        # 3 + 2 + 1 litres in the last 24 hours
    for chart, unit in (("temp", "°C"), ("tds", "ppm"), ("litres", "L")):   # the legend: the value under the cursor
        over = page.locator(f"#chart-{chart} .u-over")
        box = over.bounding_box()
        over.hover(position={"x": box["width"] * 0.97, "y": box["height"] / 2})
        value = page.inner_text(f"#chart-{chart} .u-legend .u-series:nth-child(2) .u-value")
        assert value.endswith(unit) and any(ch.isdigit() for ch in value), (chart, value)
    page.mouse.move(0, 0)
    assert "12.5 °C" in page.inner_text("#fact-temp") and "屏显 ¥1.80" in page.inner_text("#fact-price")
    shot(page, "machine")
    page.click("#range-7d")
    page.wait_for_selector("#charts:has-text('共 10.00 L')")
    assert page.evaluate("location.hash") == "#/machines/S1?range=7d"         # kept when the page is drawn again
    series = fleet.op("GET", "/api/v1/operator/fleet/S1/series", params={"range": "7d"}).json()
    assert len(series["hours"]["at_ms"]) == 168 and sum(series["hours"]["litres"]) == 10.0
    at = series["samples"]["at_ms"]
    assert len(at) > 400 and at == sorted(at) and series["from_ms"] <= at[0] and at[-1] <= series["to_ms"]
    page.click("#lang")
    page.wait_for_selector("#charts:has-text('10.00 L in all')")
    shot(page, "machine")
    page.set_viewport_size(WIDE)
    page.evaluate("location.hash = '#/machines/S2'")
    page.wait_for_selector("#events tbody tr:has-text('lockout')")
    alarms = page.inner_text("#alarms")
    assert LONG_ADDRESS in page.inner_text("#fact-location")
    assert "water flowing with the valve closed\tCritical" in alarms
    assert "reports refused by the cloud" in alarms and "TDS too high" in alarms
    assert page.locator("#events tbody tr").count() == 2
    page.wait_for_selector("#chart-tds canvas")
    shot(page, "machine")
    page.click("#lang")
    page.wait_for_selector("#chart-tds canvas")
    page.wait_for_selector("text=最近用水记录")
    shot(page, "machine")
    goto(page, "#/machines/S3", "#fact-location")
    assert page.inner_text("#fact-location") == XSS and page.inner_text("#fact-site") == XSS[:100]
    page.wait_for_selector("#chart-tds canvas")
    shot(page, "machine-s3")
    goto(page, "#/machines/S4", "#chart-litres canvas")                     # never heard from: no lines, words
    assert page.locator("#charts .nodata").count() == 2
    assert page.errors == []
    page.context.close()


def test_each_action_on_a_machine_through_its_page(fleet, browser):
    s2 = fleet.devs["S2"]
    page = open_console(browser, fleet, "yun.ying", hash_="#/machines/S2")
    page.wait_for_selector("#act-price")
    assert page.locator("#act-token, #act-revoke").count() == 0             # admins only
    page.click("#act-price")
    assert page.input_value("dialog [name=price_yuan]") == "2.50"
    page.fill("dialog [name=price_yuan]", "3.5")
    page.click("dialog button[type=submit]")
    page.wait_for_selector("#fact-price:has-text('¥3.50')")
    assert [(c["kind"], c["price_fen_per_l"]) for c in s2.poll()] == [("price", 350)]

    page.click("#act-edit")
    page.fill("dialog [name=timezone]", "Mars/Olympus")
    page.click("dialog button[type=submit]")
    page.wait_for_selector("dialog .field-error:has-text('unknown time zone')")
    page.errors.clear()
    page.fill("dialog [name=location]", "二楼茶水间")
    page.fill("dialog [name=site]", "总部")
    page.fill("dialog [name=timezone]", "Asia/Urumqi")
    page.fill("dialog [name=hotline]", "400-800-1234")
    page.click("dialog button[type=submit]")
    page.wait_for_selector("#fact-location:has-text('二楼茶水间')")
    m = fleet.op("GET", "/api/v1/operator/fleet/S2").json()
    assert (m["location"], m["site"], m["timezone"], m["hotline"]) == \
        ("二楼茶水间", "总部", "Asia/Urumqi", "400-800-1234")
    assert s2.heartbeat(state="idle", valve_open=False).json()["settings"]["hotline"] == "400-800-1234"

    page.click("#act-out")
    page.click("dialog button[type=submit]")
    page.wait_for_selector("dialog .field-error:not(:empty)")               # a reason is needed
    page.fill("dialog [name=detail]", "更换滤芯")
    page.click("dialog button[type=submit]")
    page.wait_for_selector("#commands tr:has-text('更换滤芯'):has-text('等待设备')")
    [cmd] = s2.poll()
    assert (cmd["kind"], cmd["detail"]) == ("out_of_service", "更换滤芯")
    assert s2.ack(cmd["command_id"]).status_code == 200
    page.click("#act-in")
    page.fill("dialog [name=detail]", "滤芯已更换")
    page.click("dialog button[type=submit]")
    page.wait_for_selector("#commands tr:has-text('更换滤芯'):has-text('已执行')")
    [cmd] = s2.poll()
    assert cmd["kind"] == "in_service"
    assert s2.ack(cmd["command_id"], ok=False, reason="leak_sensor_wet").status_code == 200

    beat(fleet.clock, s2, state="out_of_service", lockouts=["ghost_flow", "leak_sensor"])
    page.reload()
    page.wait_for_selector("#commands tr:has-text('被拒绝：leak_sensor_wet')")
    page.click("#act-clear")
    assert page.input_value("dialog [name=reason]") == "ghost_flow"
    assert "须到现场处理" in page.inner_text("dialog select")
    page.fill("dialog [name=note]", "现场确认无漏水")
    page.click("dialog button[type=submit]")
    page.wait_for_selector("#commands tr:has-text('解除锁定：异常流量')")
    [cmd] = s2.poll()
    assert (cmd["kind"], cmd["reason"], cmd["detail"]) == ("clear_lockout", "ghost_flow", "现场确认无漏水")
    assert audit(fleet, "clear_lockout")[-1] == ("S2", {"reason": "ghost_flow", "note": "现场确认无漏水"})
    assert [a[1] for a in audit(fleet, "out_of_service")] == [{"detail": "更换滤芯"}]
    assert page.errors == []
    page.context.close()

    page = open_console(browser, fleet, "boss", hash_="#/machines/S2")
    page.context.grant_permissions(["clipboard-read", "clipboard-write"])
    page.click("#act-revoke")
    assert "S2" in page.inner_text("dialog")
    page.click("dialog button[type=submit]")
    page.wait_for_selector("#fact-key:has-text('未注册')")
    assert s2.heartbeat().status_code == 401
    page.click("#act-token")
    page.click("dialog button[type=submit]")
    token = page.input_value("#token-value")
    page.click("#token-copy")
    page.wait_for_selector(".toast:has-text('已复制')")
    assert page.evaluate("navigator.clipboard.readText()") == token
    page.click("#token-done")
    page.wait_for_selector("#token-dialog", state="detached")
    e = s2.http.post(fleet.url + "/device/v1/enroll", json={"machine_id": "S2", "enrolment_token": token}, timeout=10)
    assert e.status_code == 200, e.text
    assert [a[0] for a in audit(fleet, "revoke_machine_key")] == ["S2"]
    assert [a[0] for a in audit(fleet, "new_enrolment_token")] == ["S2"]
    assert page.errors == []
    page.context.close()


def test_a_viewer_sees_no_actions_and_the_server_refuses_them(fleet, browser):
    page = open_console(browser, fleet, "kan.kan", hash_="#/fleet")
    page.wait_for_selector("#page-fleet tr[data-key='S4']")
    assert page.locator("#bulk-price, #page-fleet input[type=checkbox][aria-label]").count() == 0
    goto(page, "#/machines/S2", "#chart-litres canvas")
    assert page.locator("#page-machine .pagehead button").count() == 0
    assert page.errors == []
    page.context.close()
    viewer, operator = Console(fleet, "kan.kan"), Console(fleet, "yun.ying")
    for path in ("/api/v1/operator/fleet", "/api/v1/operator/fleet/S2", "/api/v1/operator/fleet/S2/series",
                 "/api/v1/operator/fleet/S2/events", "/api/v1/operator/fleet/S2/commands",
                 "/api/v1/operator/fleet/S2/sessions"):
        assert viewer.call("GET", path).status_code == 200, path
    changes = [("PATCH", "/api/v1/operator/machines/S2", {"price_fen_per_l": 1}),
               ("PATCH", "/api/v1/operator/machines/S2", {"site": "x"}),
               ("POST", "/api/v1/operator/machines/S2/service", {"in_service": False, "detail": "x"}),
               ("POST", "/api/v1/operator/machines/S2/clear-lockout", {"reason": "ghost_flow", "note": "x"}),
               ("POST", "/api/v1/operator/fleet/price", {"machine_ids": ["S2"], "price_fen_per_l": 1}),
               ("POST", "/api/v1/operator/machines/S2/enrolment-token", None),
               ("POST", "/api/v1/operator/machines/S2/revoke-key", None)]
    for method, path, body in changes:
        r = viewer.call(method, path, json=body)
        assert r.status_code == 403 and r.json()["error"] == "forbidden", (path, r.text)
    for method, path, body in changes[-2:]:
        assert operator.call(method, path, json=body).status_code == 403, path
    r = operator.call("POST", "/api/v1/operator/fleet/price", csrf=False, json={"machine_ids": ["S2"],
                                                                                "price_fen_per_l": 1})
    assert r.status_code == 403 and r.json()["error"] == "csrf"
    m = fleet.op("GET", "/api/v1/operator/fleet/S2").json()
    assert (m["price_fen_per_l"], m["site"], m["enrolled"]) == (250, "杭州华星", True)
    assert fleet.devs["S2"].poll() == []


# ---------------------------------------------------------------- the API on SQLite and PostgreSQL

def test_the_fleet_reads_the_heartbeat_fields_the_contract_names():
    hb = p.HeartbeatMsg(state="idle", valve_open=False, price_fen_per_l=180, consumables=consumables(950, 300))
    row = fleet_row({"machine_id": "X", "location": "", "online": True, "enrolled": True, "last_seen_ms": 1,
                     "price_fen_per_l": 200, "heartbeat": hb.model_dump()}, 0)
    assert {DISPLAYED_PRICE_KEY, CONSUMABLES_KEY} <= set(p.HeartbeatMsg.model_fields)
    assert (row["displayed_price_fen_per_l"], row["price_mismatch"], row["filter_used_permille"], row["filter_due"],
            row["uv_used_permille"], row["uv_due"]) == (180, True, 950, True, 300, False)
    older = fleet_row({"machine_id": "X", "location": "", "online": False, "enrolled": True, "last_seen_ms": 1,
                       "price_fen_per_l": 200, "heartbeat": {"state": "idle", "valve_open": False}}, 0)
    assert (older["displayed_price_fen_per_l"], older["price_mismatch"], older["filter_used_permille"]) == \
        (None, False, None)


@pytest.fixture(params=["sqlite", "postgresql"])
def timed(request, tmp_path):
    """A cloud whose clock the test moves, on SQLite and on PostgreSQL."""
    url, drop = "", None
    if request.param == "postgresql":
        if not PG_URL:
            pytest.skip("no PostgreSQL: run scripts/postgres-for-tests.sh and export TAPSHARE_TEST_POSTGRES_URL")
        from tests.conftest import _fresh_postgres_database
        url, drop = _fresh_postgres_database()
    clock = Clock()
    with CloudServer(tmp_path / "cloud", database_url=url, clock_ms=clock) as c:
        c.clock = clock
        yield c
    if drop is not None:
        c.app.state.database.dispose()
        drop()


def samples(cloud, machine_id: str) -> list[int]:
    with cloud.app.state.database.read() as conn:
        return list(conn.execute(select(t.machine_samples.c.at_ms).where(t.machine_samples.c.machine_id == machine_id)
                                 .order_by(t.machine_samples.c.at_ms)).scalars())


def test_heartbeats_are_sampled_at_most_every_5_minutes_and_kept_35_days(timed):
    clock, dev, other = timed.clock, timed.provision("S1"), timed.provision("S2")
    t0 = real_ms() - HOUR_MS
    for minutes in (0, 1, 4):
        beat(clock, dev, t0 + minutes * MIN_MS, temp_c=10.0 + minutes, tds_ppm=70)
    beat(clock, other, t0 + 2 * MIN_MS, temp_c=20.0)
    assert len(samples(timed, "S1")) == 1 and len(samples(timed, "S2")) == 1   # one each, the first
    beat(clock, dev, t0 + 5 * MIN_MS + 100, temp_c=15.0)
    assert len(samples(timed, "S1")) == 2
    timed.app.state.services.machines.samples._last_ms.clear()                 # a restart: the database knows
    beat(clock, dev, t0 + 7 * MIN_MS, temp_c=16.0)
    assert len(samples(timed, "S1")) == 2
    beat(clock, dev, t0 + 11 * MIN_MS, temp_c=17.0)
    s = timed.op("GET", "/api/v1/operator/fleet/S1/series").json()["samples"]
    assert s["temp_c"] == [10.0, 15.0, 17.0] and s["tds_ppm"] == [70, None, None]
    assert SAMPLE_EVERY_MS == 5 * MIN_MS
    clock.offset_ms = 0
    now = clock()
    with timed.app.state.database.tx() as conn:
        conn.execute(insert(t.machine_samples), [{"machine_id": "S3", "at_ms": now - SAMPLES_KEEP_MS - MIN_MS},
                                                  {"machine_id": "S3", "at_ms": now - SAMPLES_KEEP_MS + MIN_MS}])
    _prune(timed.app.state.services)
    assert samples(timed, "S3") == [now - SAMPLES_KEEP_MS + MIN_MS] and len(samples(timed, "S1")) == 3


def test_litres_per_hour_follow_the_machines_own_clock(timed):
    clock, dev = timed.clock, timed.provision("K1")
    assert timed.op("PATCH", "/api/v1/operator/machines/K1", json={"timezone": "Asia/Kolkata"}).status_code == 200
    user = timed.user("13800138009", balance_fen=100_000)
    now = real_ms()
    ended = [pour(clock, dev, user, now - h * HOUR_MS, 450 * n, f"1-{i}")
             for i, (h, n) in enumerate(((50, 4), (3, 1), (3, 2)))]
    assert len(ended) == 3
    clock.offset_ms = 0
    day = timed.op("GET", "/api/v1/operator/fleet/K1/series", params={"range": "24h"}).json()
    hours = day["hours"]
    assert len(hours["at_ms"]) == 24 and all(x % HOUR_MS == 30 * MIN_MS for x in hours["at_ms"])   # UTC+5:30
    assert hours["at_ms"][-1] <= clock() < hours["at_ms"][-1] + HOUR_MS
    with timed.app.state.database.read() as conn:
        ends = sorted(conn.execute(select(t.sessions.c.ended_ms).where(t.sessions.c.machine_id == "K1")).scalars())
    assert hours["litres"][max(i for i, x in enumerate(hours["at_ms"]) if x <= ends[-1])] == 3.0      # 1 + 2 L
    assert sum(hours["litres"]) == 3.0
    week = timed.op("GET", "/api/v1/operator/fleet/K1/series", params={"range": "7d"}).json()["hours"]
    assert len(week["at_ms"]) == 168 and sum(week["litres"]) == 7.0 and week["at_ms"][-24:] == hours["at_ms"]


def test_the_fleet_api_refuses_bad_input_clearly_and_changes_nothing(timed):
    for mid in ("B1", "B2"):
        timed.provision(mid, price=200)
    for path in ("", "/series", "/events", "/commands", "/sessions"):
        r = timed.op("GET", f"/api/v1/operator/fleet/NOPE{path}")
        assert r.status_code == 404 and r.json()["error"] == "unknown_machine", path
    for path, params in (("/B1/series", {"range": "30d"}), ("/B1/events", {"limit": 0}),
                         ("/B1/commands", {"limit": 999}), ("", {"sort": "secret_enc"}), ("", {"online": "maybe"}),
                         ("", {"limit": 501}), ("", {"format": "xml"}), ("", {"has_alarms": "perhaps"}),
                         ("/bad%20id", {})):
        r = timed.op("GET", f"/api/v1/operator/fleet{path}", params=params)
        assert r.status_code == 422 and r.json()["error"] == "invalid_request", (path, params, r.text)
    bulk = "/api/v1/operator/fleet/price"
    r = timed.op("POST", bulk, json={"machine_ids": ["B1", "NOPE", "B2"], "price_fen_per_l": 300})
    assert r.status_code == 404 and r.json()["unknown"] == ["NOPE"] and "nothing was changed" in r.json()["message"]
    for body in ({"machine_ids": ["B1"], "price_fen_per_l": 100_001}, {"machine_ids": ["B1"], "price_fen_per_l": -1},
                 {"machine_ids": [], "price_fen_per_l": 300}, {"machine_ids": ["B1"], "price_fen_per_l": "300"},
                 {"machine_ids": ["B 1"], "price_fen_per_l": 300}, {"machine_ids": ["B1"]},
                 {"machine_ids": ["B1"], "price_fen_per_l": 300, "also": 1},
                 {"machine_ids": ["B1"] * 1001, "price_fen_per_l": 300}):
        assert timed.op("POST", bulk, json=body).status_code == 422, body
    assert prices(timed) == {"B1": 200, "B2": 200}
    assert audit(timed, "change_machine") == []
    r = timed.op("PATCH", "/api/v1/operator/machines/B1", json={"site": "x" * 101})
    assert r.status_code == 422
    r = timed.op("POST", bulk, json={"machine_ids": ["B2", "B1", "B2"], "price_fen_per_l": 0})
    assert r.status_code == 200 and r.json() == {"machine_ids": ["B1", "B2"], "price_fen_per_l": 0}
    page = timed.op("GET", "/api/v1/operator/fleet", params={"limit": 1, "offset": 1}).json()
    assert [m["machine_id"] for m in page["machines"]] == ["B2"] and page["total"] == 2
