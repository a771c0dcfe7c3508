"""Wallet, top-ups, refunds, bills, points and gifts over real HTTP (issue 6), on SQLite and PostgreSQL.
The sandbox payment provider delivers its signed notifications over real HTTP to the real server."""

import itertools
import threading
import time

import pytest
import requests
from sqlalchemy import select

from cloud import db as t
from cloud.wallet.payments import Notification
from cloud.wallet.service import ORDER_TTL_MS
from tests.cloudkit import CloudServer
from tests.test_accounts import Clock
from tests.util import wait_until


def topup(cloud, user, amount_fen=2000):
    r = user.call("POST", "/api/v1/me/topups", json={"amount_fen": amount_fen})
    assert r.status_code == 200, r.text
    return r.json()


def pay(cloud, order):
    """The person presses "pay" on the sandbox page; the browser follows the redirect back."""
    r = requests.post(cloud.url + order["pay_url"] + "/pay", timeout=10, allow_redirects=False)
    assert r.status_code == 303, r.text
    return r.headers["location"]


def available(user) -> int:
    return user.call("GET", "/api/v1/me/wallet").json()["available_fen"]


def test_a_top_up_is_credited_once_by_the_notification_not_by_the_return(cloud):
    user = cloud.signup("13700000001")
    order = topup(cloud, user, 2000)
    assert order["state"] == "pending" and order["sandbox"] is True
    page = requests.get(cloud.url + order["pay_url"], timeout=10)
    assert page.status_code == 200 and "沙箱" in page.text and "¥20.00" in page.text
    sandbox = cloud.app.state.services.wallet.provider
    sandbox.first_delay_s = 0.5
    back = pay(cloud, order)
    assert back.endswith(f"/app#/wallet?order={order['order_id']}")
    assert requests.get(back, timeout=10).status_code == 200          # the return page credits nothing
    assert available(user) == 0
    wait_until(lambda: len(sandbox.deliveries) == 2, timeout_s=10)     # the provider says it twice
    assert [s for _, s in sandbox.deliveries] == [200, 200]
    assert available(user) == 2000
    o = user.call("GET", f"/api/v1/me/topups/{order['order_id']}").json()
    assert o["state"] == "paid" and o["paid_ms"]
    w = user.call("GET", "/api/v1/me/wallet").json()
    assert [(e["kind"], e["amount_fen"]) for e in w["entries"]] == [("topup", 2000)]
    with cloud.app.state.database.read() as conn:
        assert conn.execute(select(t.topup_orders.c.notifications)).scalar() == 2


def test_notifications_must_be_genuine_and_match_the_order(cloud):
    user = cloud.signup("13700000002")
    order = topup(cloud, user, 1000)
    sandbox = cloud.app.state.services.wallet.provider
    good = Notification(notification_id="n-1", order_id=order["order_id"], provider_txn_id="sbx-1",
                        amount_fen=1000, status="SUCCESS", paid_ms=1)
    url = cloud.url + "/api/v1/payments/notify"
    # unsigned, wrong signature, stale
    assert requests.post(url, data=good.model_dump_json(), timeout=5).json()["error"] == "unsigned_notification"
    headers, body = sandbox.signed(good)
    forged = requests.post(url, data=body, headers={**headers, "X-Pay-Signature": "0" * 64}, timeout=5)
    assert forged.status_code == 401 and forged.json()["error"] == "bad_signature"
    tampered = body.replace(b'"amount_fen":1000', b'"amount_fen":9000')
    assert requests.post(url, data=tampered, headers=headers, timeout=5).json()["error"] == "bad_signature"
    old_headers, old_body = sandbox.signed(good, now_ms=int(time.time() * 1000) - 3_600_000)
    assert requests.post(url, data=old_body, headers=old_headers, timeout=5).json()["error"] == "stale_notification"
    # signed, but the amount differs from the order: refused and recorded
    h2, b2 = sandbox.signed(good.model_copy(update={"amount_fen": 1}))
    r = requests.post(url, data=b2, headers=h2, timeout=5)
    assert r.status_code == 409 and r.json()["error"] == "amount_mismatch"
    h3, b3 = sandbox.signed(good.model_copy(update={"order_id": "o-unknown"}))
    assert requests.post(url, data=b3, headers=h3, timeout=5).status_code == 404
    assert requests.post(url, data=b"{not json", headers=sandbox.signed(good)[0] | {
        "X-Pay-Signature": sandbox.signed(good)[0]["X-Pay-Signature"]}, timeout=5).status_code == 401
    assert available(user) == 0
    # the genuine one, replayed: credited once
    for _ in range(3):
        r = requests.post(url, data=body, headers=headers, timeout=5)
        assert r.status_code == 200 and r.json()["code"] == "SUCCESS"
    assert available(user) == 1000
    with cloud.app.state.database.read() as conn:
        actions = conn.execute(select(t.audit_log.c.action)).scalars().all()
    assert "amount_mismatch" in actions


def test_concurrent_duplicate_notifications_credit_once(cloud):
    user = cloud.signup("13700000003")
    order = topup(cloud, user, 5000)
    sandbox = cloud.app.state.services.wallet.provider
    headers, body = sandbox.signed(Notification(notification_id="n-x", order_id=order["order_id"],
                                                provider_txn_id="sbx-x", amount_fen=5000, status="SUCCESS",
                                                paid_ms=1))
    codes = []
    threads = [threading.Thread(target=lambda: codes.append(requests.post(
        cloud.url + "/api/v1/payments/notify", data=body, headers=headers, timeout=10).status_code)) for _ in range(8)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert codes == [200] * 8 and available(user) == 5000


@pytest.mark.parametrize("amount", [0, 99, 50_001, -5])
def test_top_up_amounts_are_bounded(cloud, amount):
    user = cloud.signup("13700000004")
    r = user.call("POST", "/api/v1/me/topups", json={"amount_fen": amount})
    assert r.status_code == 422 and r.json()["message"]


def test_unpaid_orders_close_after_the_timeout_and_late_payments_are_not_lost(tmp_path):
    clock = Clock()
    with CloudServer(tmp_path / "c", clock_ms=clock) as cloud:
        user = cloud.signup("13700000005")
        wallet = cloud.app.state.services.wallet
        stale = topup(cloud, user, 1000)
        paid_late = topup(cloud, user, 3000)
        wallet.provider.first_delay_s = 60          # its notification is "lost" for now
        pay(cloud, paid_late)
        clock.now += ORDER_TTL_MS + 1
        closed = wallet.close_expired(clock.now)
        assert closed == [stale["order_id"]]
        # the order paid at the provider was credited by asking the provider, not closed
        assert user.call("GET", f"/api/v1/me/topups/{paid_late['order_id']}").json()["state"] == "paid"
        assert user.call("GET", f"/api/v1/me/topups/{stale['order_id']}").json()["state"] == "closed"
        assert available(user) == 3000
        r = requests.post(cloud.url + stale["pay_url"] + "/pay", timeout=10, allow_redirects=False)
        assert r.status_code == 410                                   # closed at the provider too


# ---------------------------------------------------------------- sessions, bills, refunds, points

EVENT_SEQ = itertools.count(1)


def _session(cloud, device, user, pulses=2250, price=200):
    from tests.test_cloud import start_session
    s, cmd = start_session(cloud, device, user, price)
    assert device.ack(cmd["command_id"]).ok
    r = device.report_end(f"1-{next(EVENT_SEQ)}", s["session_id"], pulses, price)
    assert r.json()["results"][0]["status"] == "accepted", r.text
    return s["session_id"]


def _fund(cloud, user, fen):
    with cloud.app.state.database.tx() as conn:
        from cloud.wallet.balance import add_entry
        add_entry(conn, user.user_id, "topup", fen, int(time.time() * 1000), note="test top-up")


def test_arrears_block_starting_until_paid(cloud):
    device = cloud.provision("W1")
    user = cloud.signup("13700000006")
    with cloud.app.state.database.tx() as conn:
        from cloud.wallet.balance import add_entry
        add_entry(conn, user.user_id, "charge", -150, int(time.time() * 1000), note="earlier shortfall")
    device.poll(wait_ms=0)
    scan = user.scan("W1", device.qr()).json()
    r = user.start(scan["presence_token"])
    assert r.status_code == 402 and r.json()["error"] == "arrears"
    w = user.call("GET", "/api/v1/me/wallet").json()
    assert w["arrears_fen"] == 150
    _fund(cloud, user, 1000)
    assert user.start(user.scan("W1", device.qr()).json()["presence_token"]).status_code == 200


def test_bills_are_shown_in_the_machine_time_zone(cloud):
    device = cloud.provision("W2")
    user = cloud.signup("13700000007")
    _fund(cloud, user, 2000)
    sid = _session(cloud, device, user, pulses=2250)          # 5 litres at 2.00/L = 10.00
    bills = user.call("GET", "/api/v1/me/bills").json()["bills"]
    assert len(bills) == 1
    b = user.call("GET", f"/api/v1/me/bills/{sid}").json()
    assert b["started_at"] == "2026-11-25T10:00:00.000Z" and b["started_local"] == "2026-11-25 18:00:00"
    assert b["timezone"] == "Asia/Shanghai" and b["location"] == "Lobby"
    assert b["amount_fen"] == 1000 and b["volume_ml"] == 5000 and b["avg_flow_ml_per_min"] == 15000
    assert b["water_quality"]["tds_ppm"] == 80 and b["points"] == 10
    other = cloud.signup("13700000008")
    assert other.call("GET", f"/api/v1/me/bills/{sid}").status_code == 404
    s = user.call("GET", f"/api/v1/sessions/{sid}").json()
    assert s["bill"]["started_local"] == "2026-11-25 18:00:00"


def test_operator_refund_of_a_failed_dispense(cloud):
    from cloud.__main__ import create_operator
    operator = create_operator(cloud.settings.url(), "op-r", "operator")
    viewer = create_operator(cloud.settings.url(), "view-r", "viewer")
    device = cloud.provision("W3")
    user = cloud.signup("13700000009")
    _fund(cloud, user, 2000)
    sid = _session(cloud, device, user, pulses=450)           # 1 litre: 2.00
    path = f"/api/v1/operator/sessions/{sid}/refund"
    assert cloud.op("POST", path, token=viewer, json={"amount_fen": 50, "reason": "x"}).status_code == 403
    r = cloud.op("POST", path, token=operator, json={"amount_fen": 150, "reason": "cup overflowed: valve fault"})
    assert r.status_code == 200 and r.json() == {"session_id": sid, "refunded_fen": 150, "charged_fen": 200,
                                                 "to": "balance", "to_balance_fen": 150, "to_original_fen": 0,
                                                 "provider_refunds": []}
    over = cloud.op("POST", path, token=operator, json={"amount_fen": 51, "reason": "again"})
    assert over.status_code == 422 and over.json()["refundable_fen"] == 50
    assert cloud.op("POST", "/api/v1/operator/sessions/s-none/refund", token=operator,
                    json={"amount_fen": 1, "reason": "x"}).status_code == 404
    assert available(user) == 2000 - 200 + 150
    assert user.call("GET", f"/api/v1/me/bills/{sid}").json()["refunded_fen"] == 150
    kinds = [e["kind"] for e in user.call("GET", "/api/v1/me/wallet").json()["entries"]]
    assert kinds[:2] == ["refund", "charge"]


def test_points_are_earned_by_the_rule_and_redeemed_exactly_once(cloud):
    from cloud.__main__ import create_operator
    operator = create_operator(cloud.settings.url(), "op-g", "operator")
    device = cloud.provision("W4")
    user = cloud.signup("13700000010")
    _fund(cloud, user, 5000)
    _session(cloud, device, user, pulses=2250)           # 10.00 yuan: 10 points
    device.heartbeat()                                   # frees the machine
    _session(cloud, device, user, pulses=449)            # 998 ml: 1.99 yuan: 1 point (whole yuan only)
    pts = user.call("GET", "/api/v1/me/points").json()
    assert pts["points"] == 11 and [h["delta"] for h in pts["history"]] == [1, 10]
    cup = cloud.op("POST", "/api/v1/operator/gifts", token=operator,
                   json={"name_zh": "保温杯", "name_en": "Vacuum flask", "points_cost": 6, "stock": 5}).json()
    rare = cloud.op("POST", "/api/v1/operator/gifts", token=operator,
                    json={"name_zh": "水票", "name_en": "Water voucher", "points_cost": 1, "stock": 0}).json()
    assert {g["gift_id"] for g in requests.get(cloud.url + "/api/v1/gifts", timeout=5).json()["gifts"]} == \
        {cup["gift_id"], rare["gift_id"]}
    first = user.call("POST", f"/api/v1/gifts/{cup['gift_id']}/redeem", json={"request_id": "req-00000001"})
    assert first.status_code == 200 and first.json()["repeated"] is False and len(first.json()["pickup_code"]) == 8
    again = user.call("POST", f"/api/v1/gifts/{cup['gift_id']}/redeem", json={"request_id": "req-00000001"})
    assert again.json()["redemption_id"] == first.json()["redemption_id"] and again.json()["repeated"] is True
    assert user.call("GET", "/api/v1/me/points").json()["points"] == 5
    short = user.call("POST", f"/api/v1/gifts/{cup['gift_id']}/redeem", json={"request_id": "req-00000002"})
    assert short.status_code == 409 and short.json()["error"] == "insufficient_points" and short.json()["points"] == 5
    empty = user.call("POST", f"/api/v1/gifts/{rare['gift_id']}/redeem", json={"request_id": "req-00000003"})
    assert empty.status_code == 409 and empty.json()["error"] == "out_of_stock"
    assert user.call("GET", "/api/v1/me/points").json()["points"] == 5           # a refused redemption costs nothing
    bad = user.call("POST", f"/api/v1/gifts/{cup['gift_id']}/redeem", json={"request_id": "x"})
    assert bad.status_code == 422
    assert user.call("POST", "/api/v1/gifts/g-nope/redeem", json={"request_id": "req-00000004"}).status_code == 404
    cloud.op("PATCH", f"/api/v1/operator/gifts/{cup['gift_id']}", token=operator, json={"active": False})
    assert [g["gift_id"] for g in requests.get(cloud.url + "/api/v1/gifts", timeout=5).json()["gifts"]] == \
        [rare["gift_id"]]
    reds = user.call("GET", "/api/v1/me/redemptions").json()["redemptions"]
    assert [r["name_en"] for r in reds] == ["Vacuum flask"]


def test_concurrent_redemptions_cannot_overspend(cloud):
    from cloud.__main__ import create_operator
    operator = create_operator(cloud.settings.url(), "op-c", "operator")
    user = cloud.signup("13700000011")
    with cloud.app.state.database.tx() as conn:
        conn.execute(t.users.update().where(t.users.c.user_id == user.user_id).values(points=10))
    gift = cloud.op("POST", "/api/v1/operator/gifts", token=operator,
                    json={"name_zh": "杯子", "name_en": "Cup", "points_cost": 3, "stock": 100}).json()
    codes = []

    def go(i):
        codes.append(user.call("POST", f"/api/v1/gifts/{gift['gift_id']}/redeem",
                               json={"request_id": f"parallel-{i:04d}"}).status_code)

    threads = [threading.Thread(target=go, args=(i,)) for i in range(8)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert sorted(codes) == [200, 200, 200, 409, 409, 409, 409, 409]
    assert user.call("GET", "/api/v1/me/points").json()["points"] == 1
