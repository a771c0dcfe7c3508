"""Every page of the console on the demo fleet (``python -m cloud demo-data``: a week of a 31-machine fleet), in
Chinese at 1366x768, in English at 1920x1080 and in Chinese on a 1024 px tablet: each screenshot checked for
overflow, cut-off text, labels broken inside a word, a CJK font, axe-core violations, and no script error. Where a
page draws charts, they have data. Screenshots: ``tests/screenshots/console/tour-*``."""

import subprocess
import sys
from pathlib import Path

import pytest

from tests.cloudkit import CloudServer
from tests.consolekit import DESKTOP, TABLET, WIDE, Console, goto, open_console, shot

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    data = tmp_path_factory.mktemp("tour") / "cloud"
    r = subprocess.run([sys.executable, "-m", "cloud", "demo-data", "--data-dir", str(data)], cwd=ROOT,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    password = (data / "console-demo-admin.txt").read_text().strip()
    with CloudServer(data) as cloud:
        s = Console(cloud, "demo-admin", password)
        ids = {
            "machine": s.call("GET", "/api/v1/operator/fleet").json()["machines"][0]["machine_id"],
            "session": s.call("GET", "/api/v1/operator/sessions").json()["sessions"][0]["session_id"],
            "user": s.call("GET", "/api/v1/operator/users").json()["users"][0]["user_id"],
            "alarm": s.call("GET", "/api/v1/operator/alarm-cases").json()["alarms"][0]["alarm_id"],
        }
        pending = s.call("GET", "/api/v1/operator/identities").json()["pending"]
        ids["identity"] = pending[0]["user_id"] if pending else ""
        yield cloud, password, ids


def pages(ids: dict) -> list[tuple[str, str, str]]:
    """(name, address, what shows when it is ready)."""
    out = [("fleet", "#/fleet", "#page-fleet tbody tr"),
           ("machine", f"#/machines/{ids['machine']}", "#page-machine canvas"),
           ("sessions", "#/sessions", "#page-sessions tbody tr"),
           ("session", f"#/sessions/{ids['session']}", "#page-sessions canvas"),
           ("alarms", "#/alarms", "#page-alarms tbody tr"),
           ("alarm", f"#/alarms/{ids['alarm']}", "#alarm-facts"),
           ("identity", "#/identity", "#page-identity table"),
           ("users", "#/users", "#page-users tbody tr"),
           ("user", f"#/users/{ids['user']}", "#page-users h1"),
           ("gifts", "#/gifts", "#page-gifts tbody tr"),
           ("redemptions", "#/gifts?tab=redemptions", "#page-gifts table"),
           ("reports", "#/reports", "#page-reports canvas"),
           ("audit", "#/audit", "#page-audit tbody tr"),
           ("operators", "#/operators", "#page-operators tbody tr"),
           ("account", "#/account", "#acct-name")]
    if ids["identity"]:
        out.insert(7, ("identity-review", f"#/identity/{ids['identity']}", "#full-name"))
    return out


# each language once on the desktop, Chinese at the commoner 1366 and English at 1920, and the tablet's own
# single-column layout: the pages' own tests shoot theirs in both languages at 1366 and 1920 besides
@pytest.mark.parametrize("lang,viewport", [("zh", DESKTOP), ("en", WIDE), ("zh", TABLET)],
                         ids=["zh-1366", "en-1920", "zh-tablet"])
def test_every_page_of_the_demo_fleet(demo, browser, lang, viewport):
    cloud, password, ids = demo
    page = open_console(browser, cloud, "demo-admin", password=password, lang=lang, viewport=viewport,
                        hash_="#/account")
    for name, address, ready in pages(ids):
        goto(page, address, ready)
        for canvas in page.query_selector_all("#view canvas"):            # a chart draws something
            assert canvas.bounding_box()["width"] > 200, name
        shot(page, f"tour-{name}" + ("-tablet" if viewport is TABLET else ""))
    assert page.errors == [], page.errors
    page.context.close()
