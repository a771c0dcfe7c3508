"""The console's reports: sessions poured and settled through the real API, with known amounts on days around
China's midnight and at machines of two sites (and one with none), summed per day, machine and site to the fen, on
SQLite and PostgreSQL; the page in Chromium (periods, groupings, charts, totals, the CSV it downloads) for a viewer;
bad input refused; and the demo fleet (``python -m cloud demo-data``) that makes every chart show something."""

import csv
import io
import itertools
import os
import subprocess
import sys
from datetime import datetime
from decimal import Decimal
from pathlib import Path

import pytest
from sqlalchemy import func, select, update

from cloud import db as t
from cloud.wallet.payments import CHINA
from tests.cloudkit import CloudServer
from tests.consolekit import LONG_ADDRESS, WIDE, XSS, Console, download_csv, goto, make_operator, open_console, shot
from tests.test_cloud import start_session

ROOT = Path(__file__).resolve().parent.parent
SITE_A = "杭州西湖文化广场"
PERIOD = {"from": "2026-03-14", "to": "2026-03-16"}
EVENT_SEQ = itertools.count(1)


def china_ms(text: str) -> int:
    return int(datetime.fromisoformat(text).replace(tzinfo=CHINA).timestamp() * 1000)


def pour(cloud, device, user, pulses: int, price: int, started: str) -> str:
    """A session started, claimed, poured and settled through the API; then moved to ``started`` (China time):
    the day a session counts on is when it was started, and a test cannot wait for a real day to pass."""
    session, cmd = start_session(cloud, device, user, price)
    assert device.ack(cmd["command_id"]).status_code == 200
    r = device.report_end(f"1-{next(EVENT_SEQ)}", session["session_id"], pulses, price)
    assert r.json()["results"][0]["status"] == "accepted", r.text
    with cloud.app.state.database.tx() as conn:
        conn.execute(update(t.sessions).where(t.sessions.c.session_id == session["session_id"])
                     .values(created_ms=china_ms(started)))
    return session["session_id"]


def known_sessions(cloud) -> dict[str, str]:
    """S1 (200 fen/L) at site A, S2 (300 fen/L) at a site whose name is a script, S3 (150 fen/L) at none:
    day 14: S1 1 L = 200 fen (at 00:00:00.000), S1 0.5 L = 100, S2 2 L = 600 (refunded 50 fen);
    day 15: S3 1 L = 150 (23:59:59.999); day 16: S2 1 L = 300 (00:30, still the 15th in UTC), S3 2 L = 300;
    not counted: S1 on the 17th at 00:00:00.000 (the period's end), and a start S1 refused (voided)."""
    s1, s2, s3 = cloud.provision("S1", price=200), cloud.provision("S2", price=300), cloud.provision("S3", price=150)
    with cloud.app.state.database.tx() as conn:
        for machine_id, values in (("S1", {"site": SITE_A}), ("S2", {"site": XSS}), ("S3", {"location": LONG_ADDRESS})):
            conn.execute(update(t.machines).where(t.machines.c.machine_id == machine_id).values(**values))
    ann, bo = cloud.user("13800138101", balance_fen=5_000), cloud.user("13800138102", balance_fen=5_000)
    ids = {
        "a": pour(cloud, s1, ann, 450, 200, "2026-03-14T00:00:00.000"),
        "b": pour(cloud, s1, bo, 225, 200, "2026-03-14T12:10:00.000"),
        "c": pour(cloud, s2, ann, 900, 300, "2026-03-14T18:45:00.000"),
        "d": pour(cloud, s3, bo, 450, 150, "2026-03-15T23:59:59.999"),
        "e": pour(cloud, s2, bo, 450, 300, "2026-03-16T00:30:00.000"),
        "f": pour(cloud, s3, ann, 900, 150, "2026-03-16T09:05:00.000"),
        "late": pour(cloud, s1, ann, 450, 200, "2026-03-17T00:00:00.000"),
    }
    session, cmd = start_session(cloud, s1, bo, 200)
    assert s1.ack(cmd["command_id"], ok=False, reason="busy").status_code == 200       # voided: never charged
    with cloud.app.state.database.tx() as conn:
        conn.execute(update(t.sessions).where(t.sessions.c.session_id == session["session_id"])
                     .values(created_ms=china_ms("2026-03-15T10:00:00.000")))
    r = cloud.op("POST", f"/api/v1/operator/sessions/{ids['c']}/refund", json={"amount_fen": 50, "reason": "出水不足"})
    assert r.status_code == 200, r.text
    return ids


def figures(row) -> tuple:
    return (row["sessions"], row["volume_ml"], row["revenue_fen"], row["refunded_sessions"], row["refunded_fen"],
            row["net_fen"])


def test_the_report_sums_settled_sessions_to_the_fen_per_day_machine_and_site(cloud):
    known_sessions(cloud)
    viewer = make_operator(cloud, "viewer")
    viewer_http = Console(cloud, viewer)
    by_day = viewer_http.call("GET", "/api/v1/operator/reports", params=PERIOD).json()
    assert [(d["day"], figures(d)) for d in by_day["rows"]] == [
        ("2026-03-14", (3, 3500, 900, 1, 50, 850)),
        ("2026-03-15", (1, 1000, 150, 0, 0, 150)),
        ("2026-03-16", (2, 3000, 600, 0, 0, 600))]
    assert by_day["days"] == by_day["rows"]
    assert figures(by_day["totals"]) == (6, 7500, 1650, 1, 50, 1600)
    assert by_day["days"][0]["start_ms"] == china_ms("2026-03-14T00:00:00")
    by_machine = viewer_http.call("GET", "/api/v1/operator/reports", params={**PERIOD, "by": "machine"}).json()
    assert [(r["machine_id"], r["site"], figures(r)) for r in by_machine["rows"]] == [
        ("S1", SITE_A, (2, 1500, 300, 0, 0, 300)),
        ("S2", XSS, (2, 3000, 900, 1, 50, 850)),
        ("S3", "", (2, 3000, 450, 0, 0, 450))]
    assert by_machine["days"] == by_day["days"] and by_machine["totals"] == by_day["totals"]
    by_site = viewer_http.call("GET", "/api/v1/operator/reports", params={**PERIOD, "by": "site"}).json()
    assert sorted((r["site"], r["machines"], figures(r)) for r in by_site["rows"]) == sorted([
        (SITE_A, 1, (2, 1500, 300, 0, 0, 300)), (XSS, 1, (2, 3000, 900, 1, 50, 850)),
        ("", 1, (2, 3000, 450, 0, 0, 450))])
    assert by_site["rows"][-1]["site"] == ""                          # machines without a site come last
    one_day = viewer_http.call("GET", "/api/v1/operator/reports", params={"from": "2026-03-17", "to": "2026-03-17"})
    assert figures(one_day.json()["totals"]) == (1, 1000, 200, 0, 0, 200)
    text = viewer_http.call("GET", "/api/v1/operator/reports", params={**PERIOD, "by": "site", "format": "csv"})
    assert text.headers["content-type"].startswith("text/csv") and text.content.startswith(b"\xef\xbb\xbf")
    rows = list(csv.reader(io.StringIO(text.content.decode("utf-8-sig"))))
    assert rows[0] == ["site", "machines", "sessions", "litres", "revenue_yuan", "refunded_sessions", "refunds_yuan",
                       "net_yuan"]
    assert [XSS, "1", "2", "3.000", "9.00", "1", "0.50", "8.50"] in rows
    assert rows[-2][0] == "未分组 / No site" and rows[-1] == ["合计 / Total", "", "6", "7.500", "16.50", "1", "0.50",
                                                             "16.00"]


def test_bad_periods_and_groupings_are_refused_clearly(cloud):
    s = Console(cloud, make_operator(cloud, "viewer"))
    cases = [({"from": "2026-03-16", "to": "2026-03-14"}, "bad_period"),
             ({"from": "2026-02-30", "to": "2026-03-14"}, "bad_date"),
             ({"from": "14/03/2026", "to": "2026-03-14"}, "bad_date"),
             ({"from": "2026-03-14", "to": "20260314"}, "bad_date"),
             ({"from": "2025-03-13", "to": "2026-03-14"}, "period_too_long"),
             ({"from": "2026-03-14"}, "invalid_request"),
             ({**PERIOD, "by": "hour"}, "invalid_request"),
             ({**PERIOD, "format": "xlsx"}, "invalid_request"),
             ({"from": "2026-03-14" * 10, "to": "2026-03-14"}, "invalid_request")]
    for params, code in cases:
        r = s.call("GET", "/api/v1/operator/reports", params=params)
        assert r.status_code == 422 and r.json()["error"] == code, (params, r.text)
        assert r.json()["message"]
    assert "366 days" in s.call("GET", "/api/v1/operator/reports",
                                params={"from": "2025-01-01", "to": "2026-12-31"}).json()["message"]
    year = s.call("GET", "/api/v1/operator/reports", params={"from": "2028-01-01", "to": "2028-12-31"})
    assert year.status_code == 200 and len(year.json()["days"]) == 366           # a leap year is one period
    import requests
    assert requests.get(cloud.url + "/api/v1/operator/reports", params=PERIOD, timeout=10).status_code == 401


@pytest.fixture
def sqlite_cloud(tmp_path):
    with CloudServer(tmp_path / "cloud") as c:
        make_operator(c, "viewer", "kan.kan", display_name="查看员小陈")
        yield c


CHART_INK = """(sel) => {
  const c = document.querySelector(sel + ' canvas');
  const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
  let n = 0;
  for (let i = 0; i < d.length; i += 4) {
    const rgb = [d[i], d[i + 1], d[i + 2]];
    if (d[i + 3] > 0 && Math.max(...rgb) - Math.min(...rgb) > 40) n++;       // coloured: a bar, not grid or text
  }
  return n;
}"""


def test_a_viewer_reads_the_reports_page_and_downloads_what_it_shows(sqlite_cloud, browser):
    cloud = sqlite_cloud
    known_sessions(cloud)
    page = open_console(browser, cloud, "kan.kan", hash_="#/reports?period=custom&from=2026-03-14&to=2026-03-16")
    page.wait_for_selector("#report-totals")
    assert page.inner_text("#page-reports h1") == "报表"
    totals = page.inner_text("#report-totals")
    assert "¥16.50" in totals and "¥16.00" in totals and "7.50 L" in totals and "¥0.50" in totals
    assert [page.inner_text(f"tr[data-key='2026-03-1{d}'] td:last-child") for d in (4, 5, 6)] == \
        ["¥8.50", "¥1.50", "¥6.00"]
    assert "¥16.00" in page.inner_text("#page-reports tfoot")
    assert page.evaluate(CHART_INK, "#chart-revenue") > 200 and page.evaluate(CHART_INK, "#chart-litres") > 200
    shot(page, "reports-day")
    rows = download_csv(page)
    assert rows[1:] == [["2026-03-14", "3", "3.500", "9.00", "1", "0.50", "8.50"],
                        ["2026-03-15", "1", "1.000", "1.50", "0", "0.00", "1.50"],
                        ["2026-03-16", "2", "3.000", "6.00", "0", "0.00", "6.00"],
                        ["合计 / Total", "6", "7.500", "16.50", "1", "0.50", "16.00"]]
    page.click("#by-site")
    page.wait_for_selector("#by-site[aria-current='page']")
    page.wait_for_selector("#page-reports td:has-text('未分组')")
    assert page.locator(f"#page-reports td:text-is('{SITE_A}')").count() == 1
    assert page.locator("#page-reports td", has_text="<img src=x").count() == 1      # the site's name, as text
    shot(page, "reports-site")
    rows = download_csv(page)
    assert [r[0] for r in rows] == ["site", XSS, SITE_A, "未分组 / No site", "合计 / Total"]    # by name, none last
    page.click("#by-machine")
    page.wait_for_selector("#page-reports tr[data-key='S2']")
    assert "¥8.50" in page.inner_text("tr[data-key='S2']")
    page.click("#lang")
    page.wait_for_selector("text=By machine")
    shot(page, "reports-machine")
    page.click("#by-day")
    page.wait_for_selector("#by-day[aria-current='page']")
    shot(page, "reports-day")
    page.fill("#from", "2026-03-17")                      # a period that ends before it starts: the server's words
    page.click("#show")
    page.wait_for_selector("#report-error")
    assert "after" in page.inner_text("#report-error")
    page.click("#period-last_month")
    page.wait_for_selector("#period-last_month[aria-current='true']")
    page.wait_for_selector("#report-totals")
    assert page.errors == ["422 " + cloud.url + "/api/v1/operator/reports?from=2026-03-17&to=2026-03-16&by=day"]
    page.context.close()


def test_the_reports_page_at_1920_and_the_named_periods(sqlite_cloud, browser):
    cloud = sqlite_cloud
    known_sessions(cloud)
    for lang in ("zh", "en"):
        page = open_console(browser, cloud, "kan.kan", lang=lang, viewport=WIDE,
                            hash_="#/reports?period=custom&from=2026-03-14&to=2026-03-16&by=machine")
        page.wait_for_selector("#page-reports tr[data-key='S1']")
        shot(page, "reports-machine")
        goto(page, "#/reports?period=custom&from=2026-03-14&to=2026-03-16&by=site", "#by-site[aria-current='page']")
        page.wait_for_selector("#page-reports tfoot")
        shot(page, "reports-site")
        goto(page, "#/reports?period=custom&from=2026-03-14&to=2026-03-16", "tr[data-key='2026-03-15']")
        shot(page, "reports-day")
        today = page.evaluate("new Intl.DateTimeFormat('sv-SE', {timeZone: 'Asia/Shanghai'}).format(new Date())")
        for name, first, last in (("7d", -6, 0), ("30d", -29, 0)):
            page.click(f"#period-{name}")
            page.wait_for_selector(f"#period-{name}[aria-current='true']")
            page.wait_for_function("(n) => document.querySelectorAll('#page-reports .tablewrap tbody tr').length === n",
                                   arg=last - first + 1)
            assert page.input_value("#to") == today
        page.click("#period-this_month")
        page.wait_for_selector("#period-this_month[aria-current='true']")
        assert page.input_value("#from") == today[:8] + "01" and page.input_value("#to") == today
        assert page.errors == []
        page.context.close()


def demo_data(data_dir: Path, **env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cloud", "demo-data", "--data-dir", str(data_dir)], cwd=ROOT,
                          env={**os.environ, **env}, capture_output=True, text=True, timeout=120)


def test_the_demo_fleet_fills_every_report_and_chart_once_and_never_in_production(tmp_path, browser):
    refused = demo_data(tmp_path / "prod", TAPSHARE_PRODUCTION="1")
    assert refused.returncode == 1 and "refused in production mode" in refused.stderr
    assert not (tmp_path / "prod" / "cloud.db").exists()
    first = demo_data(tmp_path / "cloud")
    assert first.returncode == 0, first.stderr
    password = (tmp_path / "cloud" / "console-demo-admin.txt").read_text().strip()
    assert f"name: demo-admin  password: {password}" in first.stdout
    again = demo_data(tmp_path / "cloud")
    assert again.returncode == 1 and "has the demo fleet already" in again.stderr
    assert "nothing was changed" in again.stderr
    with CloudServer(tmp_path / "cloud") as cloud:
        week = cloud.op("GET", "/api/v1/operator/reports", params={"from": _day(-6), "to": _day(0)}).json()
        # every whole day has sessions; today has none yet just after midnight (China time), as a real fleet
        assert len(week["days"]) == 7 and all(d["sessions"] > 0 and d["revenue_fen"] > 0
                                              for d in week["days"][:-1]), week["days"]
        books = cloud.op("GET", "/api/v1/operator/reports", params={"from": _day(-8), "to": _day(0), "by": "site"})
        body = books.json()
        assert len(body["rows"]) == 6 and body["rows"][-1]["site"] == "" and body["totals"]["refunded_sessions"] == 4
        with cloud.app.state.database.read() as conn:
            charged = -conn.execute(select(func.sum(t.balance_entries.c.amount_fen))
                                    .where(t.balance_entries.c.kind == "charge")).scalar()
        assert body["totals"]["revenue_fen"] == charged                          # the report is the ledger's
        page = open_console(browser, cloud, "demo-admin", password=password, hash_="#/reports?period=7d")
        page.wait_for_selector("#report-totals")
        assert page.evaluate(CHART_INK, "#chart-revenue") > 2_000 and page.evaluate(CHART_INK, "#chart-litres") > 2_000
        shot(page, "reports-demo")
        page.click("#by-machine")
        page.wait_for_selector("tr[data-key='SH-RM-05']")
        shot(page, "reports-demo-machine")
        assert page.errors == []
        page.context.close()


def _day(offset: int) -> str:
    from datetime import timedelta
    return (datetime.now(CHINA) + timedelta(days=offset)).date().isoformat()


def test_csv_amounts_are_exact_decimals():
    from cloud.reports.router import _decimal
    assert [_decimal(n, 2) for n in (0, 5, 100, 123456, -50)] == ["0.00", "0.05", "1.00", "1234.56", "-0.50"]
    assert _decimal(7500, 3) == "7.500" and Decimal(_decimal(10**15 + 1, 2)) * 100 == 10**15 + 1
