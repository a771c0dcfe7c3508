"""The console's back-office pages in Chromium, as reviewers, operators and admins use them, and as a role that may
not: identity review (the full name and number, the photo viewed on purpose and audit-logged, approve, reject
with a reason the person sees), gifts (catalogue, restock, pickup codes handed over once) and the audit log
(filters, paging, CSV)."""


import pytest
from sqlalchemy import select, update

from cloud import db as t
from tests.cloudkit import CloudServer, resident_id
from tests.consolekit import WIDE, XSS, Console, download_csv, goto, make_operator, open_console, shot

LONG_GIFT = {"name_zh": "定制款不锈钢真空保温杯（五百毫升，附赠杯套与清洁刷）",
             "name_en": "Custom stainless-steel vacuum flask (500 ml, with sleeve and cleaning brush)"}


@pytest.fixture
def cloud(tmp_path):
    with CloudServer(tmp_path / "cloud", id_verify="manual") as c:
        make_operator(c, "admin", "boss", display_name="王经理")
        make_operator(c, "reviewer", "shen.he", display_name="审核员小李")
        make_operator(c, "operator", "yun.ying")
        make_operator(c, "viewer", "kan.kan")
        yield c


def audit_actions(cloud, target: str) -> list[str]:
    with cloud.app.state.database.read() as conn:
        return list(conn.execute(select(t.audit_log.c.action).where(t.audit_log.c.target == target)
                                 .order_by(t.audit_log.c.id)).scalars())


def test_a_reviewer_compares_the_photo_and_approves_one_registration_and_rejects_another(cloud, browser):
    first = cloud.signup("13800138001", resident_id(1), name="欧阳娜娜")
    second = cloud.signup("13800138002", resident_id(2), name="阿卜杜热合曼·买买提依明")
    page = open_console(browser, cloud, "shen.he", hash_="#/identity")
    page.wait_for_selector(f"tr[data-key='{first.user_id}']")
    assert "欧**" in page.inner_text(f"tr[data-key='{first.user_id}']")         # masked in the queue
    shot(page, "identity-queue")
    page.click(f"tr[data-key='{first.user_id}'] button")
    page.wait_for_selector("#full-name")
    assert page.inner_text("#full-name") == "欧阳娜娜" and page.inner_text("#full-number") == resident_id(1)
    assert audit_actions(cloud, first.user_id)[-1] == "view_identity"
    assert page.locator("img.idphoto").count() == 0                              # not until asked for
    page.click("#show-photo")
    page.wait_for_function("() => document.querySelector('img.idphoto')?.naturalWidth > 0")
    assert audit_actions(cloud, first.user_id)[-1] == "view_id_photo"
    shot(page, "identity-review")
    page.click("#approve")
    page.wait_for_selector(f"tr[data-key='{second.user_id}']")
    assert first.call("GET", "/api/v1/me/identity").json()["state"] == "verified"
    page.click(f"tr[data-key='{second.user_id}'] button")
    page.wait_for_selector("#full-name")
    assert page.inner_text("#full-name") == "阿卜杜热合曼·买买提依明"
    page.click("#reject")
    page.click("dialog button[type=submit]")                                     # no reason: refused in the page
    page.wait_for_selector("dialog .field-error:not(:empty)")
    page.fill("dialog textarea[name=reason]", "照片模糊，请在光线充足处重新拍摄证件正面")
    page.click("dialog button[type=submit]")
    page.wait_for_selector("#page-identity .empty")
    me = second.call("GET", "/api/v1/me/identity").json()
    assert me["state"] == "rejected" and me["reject_reason"] == "照片模糊，请在光线充足处重新拍摄证件正面"
    goto(page, "#/identity?state=rejected", f"tr[data-key='{second.user_id}']")
    shot(page, "identity-rejected")
    page.click("#lang")
    page.wait_for_selector("text=Rejected")
    shot(page, "identity-rejected")
    assert page.errors == []
    page.context.close()


def test_only_reviewers_and_admins_see_registrations_and_photos(cloud, browser):
    user = cloud.signup("13800138003", resident_id(3))
    for who in ("yun.ying", "kan.kan"):
        s = Console(cloud, who)
        for path in ("/api/v1/operator/identities", f"/api/v1/operator/identities/{user.user_id}",
                     f"/api/v1/operator/identities/{user.user_id}/photo"):
            assert s.call("GET", path).status_code == 403, (who, path)
        r = s.call("POST", f"/api/v1/operator/identities/{user.user_id}/review", json={"approve": True})
        assert r.status_code == 403
    page = open_console(browser, cloud, "yun.ying", hash_="#/fleet")
    assert page.locator("#nav-identity").count() == 0 and page.locator("#nav-audit").count() == 0
    page.context.close()
    admin = Console(cloud, "boss")
    assert admin.call("GET", "/api/v1/operator/identities/u-nobody").status_code == 404
    assert admin.call("GET", "/api/v1/operator/identities", params={"state": "maybe"}).status_code == 422
    r = admin.call("POST", f"/api/v1/operator/identities/{user.user_id}/review", json={"approve": False})
    assert r.status_code == 422 and r.json()["error"] == "reason_required"


def test_an_operator_keeps_the_catalogue_and_hands_a_gift_over_once(cloud, browser):
    user = cloud.user("13800138004", balance_fen=0)
    with cloud.app.state.database.tx() as conn:
        conn.execute(update(t.users).where(t.users.c.user_id == user.user_id).values(points=500))
    page = open_console(browser, cloud, "yun.ying", hash_="#/gifts")
    page.click("#new-gift")
    page.fill("dialog [name=name_zh]", LONG_GIFT["name_zh"])
    page.fill("dialog [name=name_en]", LONG_GIFT["name_en"])
    page.fill("dialog [name=points_cost]", "120")
    page.fill("dialog [name=stock]", "3")
    page.click("dialog button[type=submit]")
    page.wait_for_selector(f"td:has-text('{LONG_GIFT['name_zh']}')")
    page.click("#new-gift")
    page.fill("dialog [name=name_zh]", XSS[:90])
    page.fill("dialog [name=name_en]", "Mug")
    page.fill("dialog [name=points_cost]", "0")
    page.fill("dialog [name=stock]", "1")
    page.click("dialog button[type=submit]")
    page.wait_for_selector("dialog .field-error:not(:empty)")                   # points at least 1: the server says
    page.fill("dialog [name=points_cost]", "50")
    page.click("dialog button[type=submit]")
    page.wait_for_selector("td:has-text('Mug')")
    gift = next(g for g in cloud.op("GET", "/api/v1/operator/gifts").json()["gifts"]
                if g["name_zh"] == LONG_GIFT["name_zh"])
    row = f"tr[data-key='{gift['gift_id']}']"
    page.click(f"{row} button:has-text('补货')")
    page.fill("dialog [name=stock_add]", "-4")
    page.click("dialog button[type=submit]")
    page.wait_for_selector("dialog .field-error:has-text('库存不能低于零')")
    page.fill("dialog [name=stock_add]", "10")
    page.click("dialog button[type=submit]")
    page.wait_for_selector(f"{row} td.num:has-text('13')")
    shot(page, "gifts")
    redeemed = user.call("POST", f"/api/v1/gifts/{gift['gift_id']}/redeem", json={"request_id": "req-console-1"})
    assert redeemed.status_code == 200, redeemed.text
    code = redeemed.json()["pickup_code"]
    goto(page, "#/gifts?tab=redemptions", "#code")
    page.fill("#code", code)
    page.click("#find")
    page.wait_for_selector(f"td:has-text('{code}')")
    assert "138****8004" in page.inner_text("#page-gifts table")
    shot(page, "gifts-redemptions")
    page.click("button:has-text('标记为已领取')")
    page.wait_for_selector(".chip:has-text('已领取')")
    rid = redeemed.json()["redemption_id"]
    again = Console(cloud, "yun.ying").call("POST", f"/api/v1/operator/redemptions/{rid}/picked-up")
    assert again.status_code == 409 and again.json()["error"] == "already_picked_up"
    assert audit_actions(cloud, rid) == ["gift_picked_up"]
    page.click("#lang")
    page.wait_for_selector(".chip:has-text('Picked up')")
    shot(page, "gifts-redemptions")
    page.context.close()


def test_a_viewer_sees_gifts_but_cannot_change_them(cloud, browser):
    gift = cloud.op("POST", "/api/v1/operator/gifts", json={**LONG_GIFT, "points_cost": 10, "stock": 1}).json()
    page = open_console(browser, cloud, "kan.kan", hash_="#/gifts")
    page.wait_for_selector(f"tr[data-key='{gift['gift_id']}']")
    assert page.locator("#new-gift").count() == 0 and page.locator("#page-gifts tbody button").count() == 0
    page.context.close()
    s = Console(cloud, "kan.kan")
    assert s.call("POST", "/api/v1/operator/gifts", json={**LONG_GIFT, "points_cost": 1, "stock": 1}).status_code == 403
    assert s.call("PATCH", f"/api/v1/operator/gifts/{gift['gift_id']}", json={"stock_add": 5}).status_code == 403
    assert s.call("POST", "/api/v1/operator/redemptions/r-x/picked-up").status_code == 403
    op = Console(cloud, "yun.ying")
    assert op.call("POST", "/api/v1/operator/redemptions/r-nope/picked-up").status_code == 404
    assert op.call("GET", "/api/v1/operator/redemptions", params={"code": "12ab"}).status_code == 422
    assert op.call("GET", "/api/v1/operator/redemptions", params={"state": "lost"}).status_code == 422


def test_an_admin_reads_filters_pages_and_exports_the_audit_log(cloud, browser):
    gifts = []
    for i in range(130):                                   # enough for a second page
        cloud.op("PATCH", "/api/v1/operator/machines/NONE", json={"location": "x"})      # refused: not logged
        gifts.append(cloud.op("POST", "/api/v1/operator/gifts", json={"name_zh": f"杯子{i}", "name_en": f"Cup {i}",
                                                                      "points_cost": 10, "stock": 1}).json())
    make_operator(cloud, "viewer", "v007")
    page = open_console(browser, cloud, "boss", hash_="#/audit", viewport=WIDE)
    page.wait_for_selector("#page-audit tbody tr")
    assert page.locator("#page-audit tbody tr").count() == 100
    page.click("#more")
    page.wait_for_function("() => document.querySelectorAll('#page-audit tbody tr').length > 100")
    page.select_option("[name=action]", "operator_created")
    page.fill("[name=target]", "v007")
    page.click("#audit-filters button[type=submit]")
    page.wait_for_function("() => document.querySelectorAll('#page-audit tbody tr').length === 1")
    assert "v007" in page.inner_text("#page-audit tbody")
    shot(page, "audit")
    rows = download_csv(page)
    assert rows[0] == ["id", "at_utc", "operator_id", "action", "target", "detail"]
    assert len(rows) == 2 and rows[1][3:5] == ["operator_created", "v007"]
    goto(page, f"#/audit?action=add_gift&target={gifts[7]['gift_id']}", "#page-audit tbody tr")
    assert page.locator("#page-audit tbody tr").count() == 1 and "杯子7" in page.inner_text("#page-audit tbody")
    page.context.close()
    assert Console(cloud, "yun.ying").call("GET", "/api/v1/operator/audit").status_code == 403
    admin = Console(cloud, "boss")
    assert admin.call("GET", "/api/v1/operator/audit", params={"limit": 0}).status_code == 422
    assert admin.call("GET", "/api/v1/operator/audit", params={"format": "xml"}).status_code == 422


def test_csv_cells_that_a_spreadsheet_would_run_are_made_text():
    from cloud.csvout import cell
    assert [cell(v) for v in ("=HYPERLINK(\"http://evil\")", "+1", "-2+3", "@SUM(A1)", "张三", -5, None)] == \
        ["'=HYPERLINK(\"http://evil\")", "'+1", "'-2+3", "'@SUM(A1)", "张三", -5, ""]
