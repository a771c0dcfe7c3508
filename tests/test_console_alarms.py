"""The console's alarms page in Chromium: alarms raised by real machines over signed HTTP (a leak, a hot tank, a
machine gone silent), seen by an operator who acknowledges one with a note and resolves another, the system
resolving what cleared; a viewer sees them but gets no buttons and is refused by the server."""

import pytest

from tests.consolekit import LONG_ADDRESS, WIDE, XSS, Console, goto, make_operator, open_console, shot
from tests.test_alarms import CASES, Clock, check, start_cloud, wait_case, wait_resolved


@pytest.fixture
def clock():
    return Clock()


@pytest.fixture
def world(tmp_path, clock):
    with start_cloud(tmp_path, clock) as cloud:
        make_operator(cloud, "operator", "yun.ying", display_name="值班员")
        make_operator(cloud, "viewer", "kan.kan")
        machines = {}
        for mid, location in (("HZ-001", LONG_ADDRESS), ("HZ-002", XSS), ("SH-001", "上海市徐汇区漕溪北路 88 号")):
            dev = cloud.provision(mid, price=200)
            dev.offset = clock.shift_ms
            clock.devices.append(dev)
            assert cloud.op("PATCH", f"/api/v1/operator/machines/{mid}", json={"location": location}).status_code == 200
            assert dev.heartbeat(temp_c=12.0, tds_ppm=8).status_code == 200
            machines[mid] = dev
        yield cloud, machines


def test_an_operator_acknowledges_and_resolves_alarms_raised_by_machines(world, browser, clock):
    cloud, m = world
    assert m["HZ-001"].heartbeat(temp_c=12.0, lockouts=["leak_sensor"]).status_code == 200
    assert m["HZ-002"].heartbeat(temp_c=33.5, tds_ppm=8).status_code == 200
    leak = wait_case(cloud, "leak", "HZ-001")
    hot = wait_case(cloud, "temperature", "HZ-002")
    page = open_console(browser, cloud, "yun.ying", hash_="#/alarms")
    page.wait_for_selector(f"tr[data-key='{leak['alarm_id']}']")
    assert "漏水" in page.inner_text(f"tr[data-key='{leak['alarm_id']}']")
    assert LONG_ADDRESS in page.inner_text(f"tr[data-key='{leak['alarm_id']}']")
    assert XSS in page.inner_text(f"tr[data-key='{hot['alarm_id']}']")                # the location, as text
    assert "(2)" in page.inner_text("#tab-active")
    shot(page, "alarms")
    page.click(f"tr[data-key='{leak['alarm_id']}'] button:has-text('确认')")
    page.click("dialog button[type=submit]")                                            # a note is required
    page.wait_for_selector("dialog .field-error:not(:empty)")
    page.fill("dialog textarea[name=note]", "已通知维修师傅，预计 30 分钟到场")
    page.click("dialog button[type=submit]")
    page.wait_for_selector(f"tr[data-key='{leak['alarm_id']}'] .chip:has-text('已确认')")
    page.click(f"tr[data-key='{leak['alarm_id']}'] a:has-text('漏水')")
    page.wait_for_selector("#alarm-facts")
    assert "已通知维修师傅" in page.inner_text("#alarm-facts") and "yun.ying" in page.inner_text("#alarm-facts")
    shot(page, "alarm")
    page.click("#lang")
    page.wait_for_selector("#alarm-facts:has-text('Acknowledged')")
    shot(page, "alarm")
    page.click("button:has-text('Resolve')")
    page.fill("dialog textarea[name=note]", "Leak sensor dried, hose clamp replaced")
    page.click("dialog button[type=submit]")
    page.wait_for_selector("#alarm-facts:has-text('Hose clamp replaced'), #alarm-facts:has-text('hose clamp')")
    assert Console(cloud, "yun.ying").call("GET", f"{CASES}/{leak['alarm_id']}").json()["resolved_by"] == "yun.ying"
    assert m["HZ-002"].heartbeat(temp_c=12.0, tds_ppm=8).status_code == 200            # the tank cooled down
    assert wait_resolved(cloud, hot["alarm_id"])["resolved_by"] == "system"
    goto(page, "#/alarms?state=resolved", f"tr[data-key='{hot['alarm_id']}']")
    page.set_viewport_size(WIDE)
    shot(page, "alarms-resolved")
    page.click("#lang")
    page.wait_for_selector("#tab-resolved:has-text('已解决')")
    shot(page, "alarms-resolved")
    assert page.errors == []
    page.context.close()


def test_a_silent_machine_and_the_filters(world, browser, clock):
    cloud, m = world
    clock.forward(20 * 60_000)                               # nobody heard from for 20 minutes
    for mid, dev in m.items():
        if mid != "SH-001":
            assert dev.heartbeat(temp_c=12.0, tds_ppm=8).status_code == 200
    check(cloud)
    silent = wait_case(cloud, "offline", "SH-001")
    page = open_console(browser, cloud, "kan.kan", hash_="#/alarms")
    page.wait_for_selector(f"tr[data-key='{silent['alarm_id']}']")
    assert page.locator("#page-alarms tbody button").count() == 0                      # a viewer: no buttons
    page.select_option("[name=rule]", "offline")
    page.click("#alarm-filters button[type=submit]")
    page.wait_for_function("() => location.hash.includes('rule=offline')")
    page.wait_for_selector(f"tr[data-key='{silent['alarm_id']}']")
    assert page.locator("#page-alarms tbody tr").count() == 1
    page.fill("[name=machine_id]", "HZ-001")
    page.click("#alarm-filters button[type=submit]")
    page.wait_for_selector("#page-alarms .empty")
    page.context.close()
    viewer = Console(cloud, "kan.kan")
    for action in ("acknowledge", "resolve"):
        r = viewer.call("POST", f"{CASES}/{silent['alarm_id']}/{action}", json={"note": "看过了"})
        assert r.status_code == 403 and r.json()["error"] == "forbidden"
    op = Console(cloud, "yun.ying")
    r = op.call("POST", f"{CASES}/{silent['alarm_id']}/acknowledge", csrf=False, json={"note": "x"})
    assert r.status_code == 403 and r.json()["error"] == "csrf"
