"""The console's users page in Chromium and over HTTP: people found by phone number or user id, masked by default,
with their balance and points histories, sessions and bills; the full phone number and real name shown only to
reviewers and admins who give a reason (audit-logged first); admins' adjustments of a balance or points (never below
zero, audit-logged); deleted accounts shown as deleted with their records kept; what each role is neither shown nor
allowed."""

import pytest
from sqlalchemy import select, update

from cloud import db as t
from cloud.accounts.identity import mask_name
from tests.cloudkit import CloudServer
from tests.consolekit import WIDE, XSS, Console, goto, open_console, shot
from tests.test_console_records import no_toast, pour, team

USERS = "/api/v1/operator/users"


@pytest.fixture
def world(tmp_path):
    with CloudServer(tmp_path / "cloud", scans_per_minute_per_network=100_000) as c:
        team(c)
        yield c


def named_user(cloud, phone: str, name: str):
    """A person registered with their real name through the phone pages, then (as if an older release had let
    it in) a name that is markup: it must show as text, masked and unmasked."""
    user = cloud.signup(phone, name="欧阳娜娜")
    pii = cloud.app.state.services.accounts.pii
    with cloud.app.state.database.tx() as conn:
        conn.execute(update(t.identities).where(t.identities.c.user_id == user.user_id).values(
            name_masked=name[:80], name_enc=pii.seal(name.encode(), f"name:{user.user_id}")))
    return user


def audit_rows(cloud, target: str) -> list[tuple[str, str, dict]]:
    a = t.audit_log.c
    with cloud.app.state.database.read() as conn:
        return [tuple(r) for r in conn.execute(select(a.operator_id, a.action, a.detail).where(a.target == target)
                                               .order_by(a.id))]


def test_a_viewer_finds_users_masked_and_reads_their_histories(world, browser):
    cloud = world
    dev = cloud.provision("U1")
    assert cloud.op("PATCH", "/api/v1/operator/machines/U1", json={"location": XSS}).ok
    for i in range(52):                                          # more than a page
        cloud.user(f"1370000{i:04d}", balance_fen=0)
    rich = cloud.user("13800138000", balance_fen=5_000)
    sids = [pour(dev, rich, 450), pour(dev, rich, 1350)]         # 2 yuan and 6 yuan: 2 and 6 points
    odd = named_user(cloud, "13900139000", XSS)

    page = open_console(browser, cloud, "kan.kan", hash_="#/users")
    page.wait_for_selector("#page-users tbody tr")
    assert page.locator("#page-users tbody tr").count() == 50
    page.click("#more")
    page.wait_for_function("() => document.querySelectorAll('#page-users tbody tr').length === 54")
    row = page.inner_text(f"tr[data-key='{odd.user_id}']")
    assert "139****9000" in row and XSS[:20] in row and "13900139000" not in row
    shot(page, "users")
    page.fill("#user-q", "13800138000")                          # the whole number, exactly
    page.click("#user-search button[type=submit]")
    page.wait_for_function("() => document.querySelectorAll('#page-users tbody tr').length === 1")
    assert "138****8000" in page.inner_text(f"tr[data-key='{rich.user_id}']")
    assert "¥42.00" in page.inner_text(f"tr[data-key='{rich.user_id}']")
    page.fill("#user-q", "1380013")                               # part of a number finds nobody
    page.click("#user-search button[type=submit]")
    page.wait_for_selector("#page-users .empty")
    page.fill("#user-q", rich.user_id)
    page.click("#user-search button[type=submit]")
    page.wait_for_selector(f"tr[data-key='{rich.user_id}']")
    page.click(f"tr[data-key='{rich.user_id}'] a.button")
    page.wait_for_selector("#user-stats")
    assert page.inner_text("#stat-balance b") == "¥42.00" and page.inner_text("#stat-points b") == "8"
    assert page.inner_text("#phone") == "138****8000"
    assert page.locator("#unmask").count() == 0 and page.locator("#adjust").count() == 0
    kinds = page.locator("#page-users tbody tr td:nth-child(2)").all_inner_texts()
    assert kinds == ["扣费", "解冻", "冻结", "扣费", "解冻", "冻结", "充值"]
    assert page.locator("#page-users tbody tr").first.locator("td").nth(3).inner_text() == "¥42.00"   # after it
    shot(page, "user")
    page.click("#tab-points")
    page.wait_for_selector("#page-users tbody tr:has-text('消费获得')")
    assert page.locator("#page-users tbody tr").count() == 2
    page.click("#tab-sessions")
    page.wait_for_selector(f"a[href='#/sessions/{sids[0]}']")
    page.click(f"a[href='#/sessions/{sids[1]}']")
    page.wait_for_selector("#facts")
    assert XSS in page.inner_text("#location")                   # a machine's place as text
    goto(page, f"#/users/{rich.user_id}?tab=bills", f"#page-users a[href='#/sessions/{sids[1]}']")
    assert "¥6.00" in page.inner_text("#page-users tbody")
    page.click("#lang")
    page.wait_for_selector("#tab-bills:has-text('Bills')")
    shot(page, "user")
    page.set_viewport_size(WIDE)
    goto(page, f"#/users/{rich.user_id}", "#page-users tbody tr:has-text('Top-up')")
    shot(page, "user")
    goto(page, "#/users", "#more")
    shot(page, "users")
    page.click("#lang")
    page.wait_for_selector("h1:has-text('用户')")
    shot(page, "users")
    goto(page, f"#/users/{rich.user_id}", "#page-users tbody tr:has-text('充值')")
    shot(page, "user")
    page.set_viewport_size({"width": 1366, "height": 768})
    page.click("#lang")
    goto(page, "#/users", "#more:has-text('More users')")
    shot(page, "users")
    assert page.errors == []
    page.context.close()

    for who in ("kan.kan", "yun.ying"):
        r = Console(cloud, who).call("POST", f"{USERS}/{odd.user_id}/unmask", json={"reason": "想看看"})
        assert r.status_code == 403, who
    for who in ("yun.ying", "shen.he"):
        r = Console(cloud, who).call("POST", f"{USERS}/{rich.user_id}/adjustments",
                                     json={"kind": "balance", "amount": 100, "reason": "补偿"})
        assert r.status_code == 403, who
    assert [a for _op, a, _d in audit_rows(cloud, odd.user_id) + audit_rows(cloud, rich.user_id)
            if a.startswith(("unmask", "adjust"))] == []


def test_a_reviewer_shows_the_full_phone_and_name_with_a_reason_that_is_audited(world, browser):
    cloud = world
    odd = named_user(cloud, "13900139001", XSS)
    plain = cloud.signup("13900139002", name="阿卜杜热合曼·买买提依明")
    page = open_console(browser, cloud, "shen.he", hash_=f"#/users/{odd.user_id}")
    page.wait_for_selector("#unmask")
    assert page.inner_text("#phone") == "139****9001" and page.inner_text("#name") == XSS[:80]
    assert page.locator("#adjust").count() == 0                  # reviewers do not move money
    page.click("#unmask")
    page.click("dialog button[type=submit]")
    page.wait_for_selector("dialog .field-error:not(:empty)")    # no reason, no view
    assert audit_rows(cloud, odd.user_id) == []
    page.fill("dialog [name=reason]", "用户来电，核实身份")
    page.click("dialog button[type=submit]")
    page.wait_for_selector("#phone.unmasked")
    assert page.inner_text("#phone") == "13900139001" and page.inner_text("#name") == XSS
    assert audit_rows(cloud, odd.user_id) == [("shen.he", "unmask_user",
                                               {"reason": "用户来电，核实身份", "name": True})]
    assert page.locator("#unmask").count() == 0
    no_toast(page)
    shot(page, "user-unmasked")
    goto(page, f"#/users/{plain.user_id}", "#unmask")
    assert page.inner_text("#name") == mask_name("阿卜杜热合曼·买买提依明")     # masked again: each view is asked for
    assert page.errors == []
    page.context.close()

    boss = Console(cloud, "boss")
    r = boss.call("POST", f"{USERS}/{plain.user_id}/unmask", json={"reason": "投诉处理"})
    assert r.status_code == 200 and r.json() == {"user_id": plain.user_id, "phone": "13900139002",
                                                 "name": "阿卜杜热合曼·买买提依明"}
    r = boss.call("POST", f"{USERS}/{plain.user_id}/unmask", csrf=False, json={"reason": "投诉处理"})
    assert r.status_code == 403 and r.json()["error"] == "csrf"
    for body in ({}, {"reason": ""}, {"reason": " x "}, {"reason": "ok", "also": 1}):
        assert boss.call("POST", f"{USERS}/{plain.user_id}/unmask", json=body).status_code == 422, body
    assert boss.call("POST", f"{USERS}/u-nobody/unmask", json={"reason": "投诉处理"}).status_code == 404
    assert boss.call("GET", f"{USERS}/u-nobody").status_code == 404
    assert boss.call("GET", USERS, params={"before": "soon"}).status_code == 422
    assert boss.call("GET", USERS, params={"limit": 500}).status_code == 422


def test_an_admin_adjusts_a_balance_and_points_never_below_zero(world, browser):
    cloud = world
    user = cloud.user("13800138001", balance_fen=300)
    page = open_console(browser, cloud, "boss", hash_=f"#/users/{user.user_id}")
    page.wait_for_selector("#adjust")
    page.click("#adjust")
    page.fill("dialog [name=amount]", "5.5")
    page.fill("dialog [name=reason]", "设备故障补偿")
    page.click("dialog button[type=submit]")
    page.wait_for_selector("#stat-balance b:has-text('¥8.50')")
    page.click("#adjust")
    page.fill("dialog [name=amount]", "-100")
    page.fill("dialog [name=reason]", "误充值冲正")
    page.click("dialog button[type=submit]")
    page.wait_for_selector("dialog .field-error:has-text('below zero')")
    page.select_option("dialog [name=kind]", "points")
    page.fill("dialog [name=amount]", "20")
    page.click("dialog button[type=submit]")
    page.wait_for_selector("#stat-points b:has-text('20')")
    assert page.inner_text("#stat-balance b") == "¥8.50"
    assert page.locator("#page-users tbody tr td:nth-child(2)").first.inner_text() == "调整"
    page.click("#tab-points")
    page.wait_for_selector("#page-users tbody tr:has-text('人工调整')")
    assert "误充值冲正" in page.inner_text("#page-users tbody")
    no_toast(page)
    shot(page, "user-adjusted")
    assert page.errors == [f"409 {cloud.url}{USERS}/{user.user_id}/adjustments"]
    page.context.close()
    assert [(a, d["amount"]) for _op, a, d in audit_rows(cloud, user.user_id) if a.startswith("adjust")] == [
        ("adjust_balance", 550), ("adjust_points", 20)]
    assert user.me()["available_fen"] == 850 and user.me()["points"] == 20

    boss = Console(cloud, "boss")
    path = f"{USERS}/{user.user_id}/adjustments"
    r = boss.call("POST", path, json={"kind": "points", "amount": -21, "reason": "兑换撤销"})
    assert r.status_code == 409 and r.json()["error"] == "below_zero"
    assert boss.call("POST", path, json={"kind": "balance", "amount": -850, "reason": "清零"}).status_code == 200
    assert user.me()["available_fen"] == 0
    for body in ({"kind": "balance", "amount": 0, "reason": "零"}, {"kind": "gold", "amount": 1, "reason": "金子"},
                 {"kind": "balance", "amount": 1_000_001, "reason": "太多"}, {"kind": "balance", "amount": 1.5,
                                                                               "reason": "小数"},
                 {"kind": "points", "amount": "5", "reason": "文字"}, {"kind": "points", "amount": 5},
                 {"kind": "points", "amount": 5, "reason": "好", "note": "x"}):
        r = boss.call("POST", path, json=body)
        assert r.status_code == 422, (body, r.text)
    r = boss.call("POST", path, csrf=False, json={"kind": "points", "amount": 5, "reason": "补发"})
    assert r.status_code == 403 and r.json()["error"] == "csrf"
    assert boss.call("POST", f"{USERS}/u-nobody/adjustments",
                     json={"kind": "points", "amount": 5, "reason": "补发"}).status_code == 404
    assert user.me()["points"] == 20


def test_a_deleted_account_shows_as_deleted_with_its_records_kept(world, browser):
    cloud = world
    dev = cloud.provision("D1")
    user = cloud.user("13800138002", balance_fen=400)
    sid = pour(dev, user, 900)                                   # 2 L: the whole balance
    r = user.call("DELETE", "/api/v1/me", json={"confirm": True})
    assert r.status_code == 200, r.text
    page = open_console(browser, cloud, "boss", hash_="#/users")
    page.wait_for_selector(f"tr[data-key='{user.user_id}'] .chip.bad")
    page.click(f"tr[data-key='{user.user_id}'] a.button")
    page.wait_for_selector("#deleted-note")
    assert page.locator("#unmask").count() == 0 and page.locator("#adjust").count() == 0
    page.click("#tab-sessions")
    page.wait_for_selector(f"a[href='#/sessions/{sid}']")
    shot(page, "user-deleted")
    assert page.errors == []
    page.context.close()
    boss = Console(cloud, "boss")
    r = boss.call("POST", f"{USERS}/{user.user_id}/unmask", json={"reason": "核实"})
    assert r.status_code == 410 and r.json()["error"] == "account_deleted"
    r = boss.call("POST", f"{USERS}/{user.user_id}/adjustments",
                  json={"kind": "balance", "amount": 100, "reason": "补偿"})
    assert r.status_code == 409 and r.json()["error"] == "account_deleted"
    view = boss.call("GET", f"{USERS}/{user.user_id}").json()
    assert view["user"]["phone_masked"] == "" and [s["session_id"] for s in view["sessions"]] == [sid]
    assert [b["amount_fen"] for b in view["bills"]] == [400]
