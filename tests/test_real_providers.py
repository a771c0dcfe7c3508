"""The real payment adapters inside the real cloud (issue 19), over real HTTP: the cloud on loopback talks to local
stand-ins of Alipay's gateway and WeChat Pay's API (tests/standins), which check our signatures as the providers
do and notify the cloud signed as the providers do. Money is credited once whatever the providers send, lost
notifications are settled by the order query, refunds go back through the provider to their final state, the
day's bill reconciles, and production mode starts only with real providers whose credentials check out."""

import time
from datetime import datetime, timedelta

import pytest
import requests
from sqlalchemy import select

from cloud import db as t
from cloud.settings import CloudSettings, SettingsError
from cloud.wallet import alipay
from cloud.wallet.payments import CHINA
from tests.cloudkit import CloudServer
from tests.standins.alipay import AlipayStandIn
from tests.test_accounts import Clock
from tests.util import wait_until


def available(user) -> int:
    return user.call("GET", "/api/v1/me/wallet").json()["available_fen"]


def topup(user, amount_fen, provider, channel):
    r = user.call("POST", "/api/v1/me/topups", json={"amount_fen": amount_fen, "provider": provider,
                                                     "channel": channel})
    assert r.status_code == 200, r.text
    return r.json()


def notify_url(cloud, provider):
    return cloud.url + f"/api/v1/payments/notify/{provider}"


# ---------------------------------------------------------------- Alipay

@pytest.fixture
def ali(tmp_path):
    with AlipayStandIn() as gw:
        yield gw


@pytest.fixture
def ali_cloud(ali, tmp_path):
    with CloudServer(tmp_path / "cloud", payment_providers=[alipay.from_env(ali.env(tmp_path / "keys"))]) as cloud:
        yield cloud


def test_alipay_qr_and_wap_top_ups_are_credited_once_by_alipays_notifications(ali, ali_cloud):
    cloud = ali_cloud
    user = cloud.signup("13500000101")
    methods = user.call("GET", "/api/v1/me/wallet").json()["methods"]
    assert methods == [{"provider": "alipay", "channels": ["wap", "precreate"], "development": False}]
    qr = topup(user, 1200, "alipay", "precreate")
    assert qr["pay_kind"] == "qr" and qr["qr_text"] and qr["qr_svg"].startswith("<svg")
    ali.pay_qr(qr["qr_text"])
    assert wait_until(lambda: available(user) == 1200, timeout_s=10)
    wap = topup(user, 3000, "alipay", "wap")
    assert wap["pay_kind"] == "redirect" and wap["pay_url"].startswith(ali.gateway)
    back = ali.pay_wap(wap["pay_url"])
    assert back.startswith(cloud.url + "/app#/wallet?order=" + wap["order_id"])     # the browser's return ...
    assert wait_until(lambda: available(user) == 4200, timeout_s=10)        # ... credits nothing; the notice does
    # Alipay was answered "success" (and so stopped), and was never asked to sign anything it refused
    assert {d.status for d in ali.deliveries if d.kind == "payment"} == {200}
    assert all(c.sign_ok for c in ali.calls)
    with cloud.app.state.database.read() as conn:
        rows = conn.execute(select(t.topup_orders.c.order_id, t.topup_orders.c.provider_txn_id,
                                   t.topup_orders.c.channel)).all()
    assert {(o, c) for o, _txn, c in rows} == {(qr["order_id"], "precreate"), (wap["order_id"], "wap")}
    assert all(txn == ali.trade(o).trade_no for o, txn, _c in rows)


def test_alipay_notifications_that_are_not_genuine_or_do_not_match_credit_nothing(ali, ali_cloud):
    cloud = ali_cloud
    ali.auto_notify = False
    user = cloud.signup("13500000102")
    o = topup(user, 1000, "alipay", "precreate")
    ali.pay_qr(o["qr_text"])
    assert ali.notify(o["order_id"], bad_signature=True)[0][0] == 401
    assert ali.notify(o["order_id"], seller_id="2088000000000999")[0][0] == 401
    assert ali.notify(o["order_id"], app_id="2021000000000999")[0][0] == 401
    assert ali.notify(o["order_id"], total_amount="10.001")[0][0] == 422
    mismatch = ali.notify(o["order_id"], total_amount="0.01")
    assert mismatch[0][0] == 409 and "amount_mismatch" in mismatch[0][1]
    assert available(user) == 0
    alarms = cloud.op("GET", "/api/v1/operator/alarms").json()["service_alarms"]
    assert [(a["source"], a["kind"]) for a in alarms] == [("payments", "amount_mismatch")]
    # the genuine one, eight at once and again a second later (Alipay's retries): credited once
    answers = ali.notify(o["order_id"], repeat=2, interval_s=1.0, concurrent=8)
    assert answers == [(200, "success")] * 16
    assert available(user) == 1000


def test_an_alipay_notification_that_never_comes_is_settled_by_the_order_query(ali, tmp_path):
    clock = Clock()
    ali.auto_notify = False
    ali.clock_ms = clock
    with CloudServer(tmp_path / "cloud", clock_ms=clock,
                     payment_providers=[alipay.from_env(ali.env(tmp_path / "keys"))]) as cloud:
        user = cloud.signup("13500000103")
        paid = topup(user, 2000, "alipay", "precreate")
        unpaid = topup(user, 500, "alipay", "wap")
        ali.pay_qr(paid["qr_text"])
        time.sleep(0.5)
        assert available(user) == 0                  # no notification came
        clock.now += 16 * 60_000                     # past the order's 15 minutes: the cloud asks Alipay
        assert wait_until(lambda: available(user) == 2000, timeout_s=10)
        assert wait_until(lambda: user.call("GET", f"/api/v1/me/topups/{unpaid['order_id']}").json()["state"]
                          == "closed", timeout_s=10)
        assert user.call("GET", f"/api/v1/me/topups/{paid['order_id']}").json()["state"] == "paid"


def test_an_alipay_balance_goes_back_through_alipay_and_the_day_reconciles(ali, ali_cloud):
    cloud = ali_cloud
    ali.clock_ms = lambda: time.time_ns() // 1_000_000 - 86_400_000      # yesterday: bills come out the day after
    user = cloud.signup("13500000104")
    a = topup(user, 2000, "alipay", "precreate")
    ali.pay_qr(a["qr_text"])
    b = topup(user, 1000, "alipay", "precreate")
    ali.pay_qr(b["qr_text"])
    assert wait_until(lambda: available(user) == 3000, timeout_s=10)
    r = user.call("POST", "/api/v1/me/withdrawals", json={"amount_fen": 2500})
    assert r.status_code == 200, r.text
    assert sorted((x["order_id"], x["amount_fen"], x["state"]) for x in r.json()["refunds"]) == sorted(
        [(b["order_id"], 1000, "success"), (a["order_id"], 1500, "success")])
    assert ali.trade(a["order_id"]).refunded_fen() == 1500 and ali.trade(b["order_id"]).refunded_fen() == 1000
    day = datetime.fromtimestamp(ali.clock_ms() / 1000, CHINA).date()
    today = cloud.op("POST", "/api/v1/operator/reconciliations",
                     json={"provider": "alipay", "bill_date": str(day + timedelta(days=1))})
    assert today.status_code == 503 and today.json()["error"] == "bill_not_ready"
    rep = cloud.op("POST", "/api/v1/operator/reconciliations", json={"provider": "alipay", "bill_date": str(day)})
    assert rep.status_code == 200, rep.text
    rep = rep.json()
    assert rep["state"] == "matched", rep
    assert (rep["bill_payments"], rep["bill_payments_fen"], rep["bill_refunds"], rep["bill_refunds_fen"]) == (
        2, 3000, 2, 2500)


def test_a_refund_alipay_will_not_make_comes_back_to_the_balance_with_an_alarm(ali, ali_cloud):
    cloud = ali_cloud
    user = cloud.signup("13500000105")
    o = topup(user, 1000, "alipay", "precreate")
    ali.pay_qr(o["qr_text"])
    assert wait_until(lambda: available(user) == 1000, timeout_s=10)
    ali.fail_next["alipay.trade.refund"] = ("40004", "ACQ.TRADE_HAS_FINISHED")
    r = user.call("POST", "/api/v1/me/withdrawals", json={})
    assert r.status_code == 200 and [x["state"] for x in r.json()["refunds"]] == ["failed"]
    assert available(user) == 1000
    kinds = [e["kind"] for e in user.call("GET", "/api/v1/me/wallet").json()["entries"]]
    assert kinds[:2] == ["refund_return", "withdrawal"]
    alarms = cloud.op("GET", "/api/v1/operator/alarms").json()["service_alarms"]
    assert [(a["kind"], a["detail"]["amount_fen"]) for a in alarms] == [("refund_failed", 1000)]
    # Alipay down for a moment: the refund waits and goes later, once
    ali.fail_next["alipay.trade.refund"] = ("20000", "isp.unknow-error")
    cloud.app.state.services.wallet.refund_retry_base_ms = 300      # (30 s in service)
    r = user.call("POST", "/api/v1/me/withdrawals", json={})
    assert [x["state"] for x in r.json()["refunds"]] == ["requested"]
    assert wait_until(lambda: next(x["state"] for x in user.call("GET", "/api/v1/me/wallet").json()["refunds"])
                      == "success", timeout_s=15)
    assert ali.trade(o["order_id"]).refunded_fen() == 1000 and available(user) == 0


# ---------------------------------------------------------------- production settings

def test_production_starts_with_real_providers_and_names_what_is_missing(ali, tmp_path, monkeypatch):
    from cloud.accounts.providers import ManualReview
    from tests.test_accounts import OPERATOR, RealishSms
    env = ali.env(tmp_path / "keys")
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("TAPSHARE_PAYMENT_PROVIDERS", "alipay")
    monkeypatch.setenv("TAPSHARE_CLOUD_KEY", "33" * 32)
    settings = CloudSettings(data_dir=tmp_path / "p", production=True, public_url="https://water.example",
                             sms_provider=RealishSms(), verifier=ManualReview(), **OPERATOR)
    from cloud.security import SecretBox
    _sms, _v, pays = settings.providers(SecretBox(bytes(32)))
    assert list(pays) == ["alipay"] and not pays["alipay"].is_development
    monkeypatch.setenv("TAPSHARE_PAYMENT_PROVIDERS", "alipay,sandbox")
    with pytest.raises(SettingsError, match="development sandbox"):
        CloudSettings(data_dir=tmp_path / "p", production=True, public_url="https://water.example",
                      sms_provider=RealishSms(), verifier=ManualReview(), **OPERATOR).providers(SecretBox(bytes(32)))
    monkeypatch.setenv("TAPSHARE_PAYMENT_PROVIDERS", "alipay,paypal")
    with pytest.raises(SettingsError, match="TAPSHARE_PAYMENT_PROVIDERS: must list wechatpay, alipay or sandbox"):
        CloudSettings(data_dir=tmp_path / "p").providers(SecretBox(bytes(32)))
    monkeypatch.setenv("TAPSHARE_PAYMENT_PROVIDERS", "alipay")
    monkeypatch.setenv("TAPSHARE_ALIPAY_PRIVATE_KEY_FILE", str(tmp_path / "missing.pem"))
    with pytest.raises(SettingsError, match="TAPSHARE_ALIPAY_PRIVATE_KEY_FILE") as e:
        CloudSettings(data_dir=tmp_path / "p").providers(SecretBox(bytes(32)))
    assert "PRIVATE KEY" not in str(e.value)
    monkeypatch.setenv("TAPSHARE_SMS_PROVIDER", "twilio")
    with pytest.raises(SettingsError, match="TAPSHARE_SMS_PROVIDER"):
        CloudSettings(data_dir=tmp_path / "p").providers(SecretBox(bytes(32)))


def test_the_serve_command_refuses_a_bad_provider_setting_in_words(tmp_path, monkeypatch, capsys):
    from cloud import __main__ as cli
    monkeypatch.setenv("TAPSHARE_PAYMENT_PROVIDERS", "alipay")
    monkeypatch.delenv("TAPSHARE_ALIPAY_APP_ID", raising=False)
    assert cli.main(["serve", "--data-dir", str(tmp_path / "d")]) == 2
    err = capsys.readouterr().err
    assert "TAPSHARE_ALIPAY_APP_ID" in err and "Traceback" not in err


def test_an_unknown_provider_in_the_notify_address_is_refused(ali_cloud):
    r = requests.post(notify_url(ali_cloud, "paypal"), data=b"x=1", timeout=5)
    assert r.status_code == 422 and r.json()["error"] == "unknown_provider"
    r = requests.post(notify_url(ali_cloud, "alipay"), data=b"\xff\xfe garbage", timeout=5)
    assert 400 <= r.status_code < 500 and r.json()["message"]


# ---------------------------------------------------------------- WeChat Pay

@pytest.fixture
def wx():
    from tests.standins.wechatpay import WechatPayStandIn
    with WechatPayStandIn() as stand_in:
        yield stand_in


def wx_cloud(wx, tmp_path, **kw):
    from cloud.wallet import wechatpay
    pay = wechatpay.from_env(wx.env(tmp_path / "keys", verify_with=("platform_cert", "public_key")))
    return CloudServer(tmp_path / "cloud", payment_providers=[pay], **kw)


def test_wechat_native_top_up_is_credited_once_whatever_wechat_sends(wx, tmp_path):
    wx.auto_notify = False
    with wx_cloud(wx, tmp_path) as cloud:
        user = cloud.signup("13500000201")
        o = topup(user, 1500, "wechatpay", "native")
        assert o["pay_kind"] == "qr" and o["qr_text"].startswith("weixin://wxpay/bizpayurl")
        wx.scan(o["qr_text"], notify=False)
        oid = o["order_id"]
        # not genuine, or not ours: refused, nothing credited
        assert wx.notify(oid, bad_signature=True)[0][0] == 401
        assert wx.notify(oid, serial="5157F09EFDC096DE15EBE81A47057A7232F1B8E1")[0][0] == 401   # unknown serial
        assert wx.notify(oid, timestamp_offset_s=-301)[0][0] == 401                           # stale
        assert wx.notify(oid, timestamp_offset_s=+301)[0][0] == 401
        assert wx.notify(oid, tamper_ciphertext=True)[0][0] == 401
        assert wx.notify(oid, mchid="1900009999")[0][0] == 401
        r = wx.notify(oid, amount_fen=1)
        assert r[0][0] == 409 and "amount_mismatch" in r[0][1]
        assert available(user) == 0
        # the genuine one, signed with the platform certificate and with the new public key (both accepted
        # during WeChat's switch), 8 at once and again a second later: credited once, answered 204 each time
        answers = wx.notify(oid, signer="platform_cert", concurrent=8) + \
            wx.notify(oid, signer="public_key", concurrent=8, repeat=2, interval_s=1.0)
        assert [s for s, _ in answers] == [204] * 24
        assert available(user) == 1500
        alarms = cloud.op("GET", "/api/v1/operator/alarms").json()["service_alarms"]
        assert [a["kind"] for a in alarms] == ["amount_mismatch"]


def test_wechat_h5_top_up_notified_before_the_browser_returns(wx, tmp_path):
    wx.notify_delays_s = (0.0, 0.5, 2.0)
    with wx_cloud(wx, tmp_path) as cloud:
        user = cloud.signup("13500000202")
        o = topup(user, 2000, "wechatpay", "h5")
        assert o["pay_kind"] == "redirect" and o["pay_url"].startswith(wx.base_url)
        assert "redirect_url=" in o["pay_url"]
        back = wx.pay_h5(o["pay_url"])
        assert wait_until(lambda: available(user) == 2000, timeout_s=10)      # the notification came first
        assert back.startswith(cloud.url + "/app#/wallet?order=" + o["order_id"])
        assert requests.get(back, timeout=10).status_code == 200               # the return credits nothing more
        assert available(user) == 2000
        sent = [r for r in wx.received if r.path.startswith("/v3/pay/transactions/h5")]
        assert len(sent) == 1 and sent[0].sign_ok


def test_a_wechat_notification_that_never_comes_is_settled_by_the_order_query(wx, tmp_path):
    clock = Clock()
    wx.auto_notify = False
    with wx_cloud(wx, tmp_path, clock_ms=clock) as cloud:
        wx.clock_ms = clock
        user = cloud.signup("13500000203")
        paid, unpaid = topup(user, 1000, "wechatpay", "native"), topup(user, 500, "wechatpay", "native")
        wx.scan(paid["qr_text"])
        clock.now += 16 * 60_000
        assert wait_until(lambda: available(user) == 1000, timeout_s=10)
        assert wait_until(lambda: user.call("GET", f"/api/v1/me/topups/{unpaid['order_id']}").json()["state"]
                          == "closed", timeout_s=10)
        assert wx.order(unpaid["order_id"]).state == "CLOSED"
        with pytest.raises(ValueError):
            wx.scan(unpaid["qr_text"])                  # closed at WeChat too: it can no longer be paid


def test_inside_wechat_the_openid_comes_from_wechats_authorisation_then_jsapi_pays(wx, tmp_path):
    with wx_cloud(wx, tmp_path) as cloud:
        user = cloud.signup("13500000204")
        r = user.call("POST", "/api/v1/me/topups", json={"amount_fen": 3000, "provider": "wechatpay",
                                                         "channel": "jsapi"})
        assert r.status_code == 409 and r.json()["error"] == "payer_unknown"
        asked = user.call("POST", "/api/v1/me/payer-link", json={"resume_fen": 3000})
        link, browser = asked.json()["url"], asked.cookies.get("tapshare_payer_link")
        state = link.split("state=")[1].split("#")[0].split("&")[0]
        assert state.isalnum() and len(state) <= 128                  # WeChat takes [a-zA-Z0-9]{0,128}
        hop = requests.get(link, allow_redirects=False, timeout=10)      # WeChat asks nothing: snsapi_base
        assert hop.status_code in (302, 303) and hop.headers["location"].startswith(cloud.url)
        # the link opened in another browser (someone it was sent to) binds nothing
        elsewhere = requests.get(hop.headers["location"], allow_redirects=False, timeout=10)
        assert elsewhere.status_code == 401 and elsewhere.json()["error"] == "bad_state"
        hop = requests.get(link, allow_redirects=False, timeout=10)
        back = requests.get(hop.headers["location"], allow_redirects=False, timeout=10,
                            cookies={"tapshare_payer_link": browser})
        assert back.status_code == 303 and back.headers["location"] == "/app#/wallet?resume=3000"
        # a forged or stale state is refused
        forged = requests.get(cloud.url + "/api/v1/payments/wechatpay/oauth", params={"code": "x", "state": "A" * 60},
                              timeout=10)
        assert forged.status_code == 401 and forged.json()["error"] == "bad_state"
        o = topup(user, 3000, "wechatpay", "jsapi")
        assert o["pay_kind"] == "jsapi" and o["jsapi_params"]["package"].startswith("prepay_id=")
        assert wx.pay_jsapi(o["jsapi_params"]) == {"err_msg": "get_brand_wcpay_request:ok"}
        assert wait_until(lambda: available(user) == 3000, timeout_s=10)
        assert wx.order(o["order_id"]).payer_openid == wx.oauth_openid


def test_wechat_refunds_are_followed_to_their_end(wx, tmp_path):
    with wx_cloud(wx, tmp_path) as cloud:
        user = cloud.signup("13500000205")
        orders = [topup(user, fen, "wechatpay", "native") for fen in (1000, 2000, 3000)]
        for o in orders:
            wx.scan(o["qr_text"])
        assert wait_until(lambda: available(user) == 6000, timeout_s=10)
        out = user.call("POST", "/api/v1/me/withdrawals", json={}).json()
        assert out["withdrawn_fen"] == 6000 and {x["state"] for x in out["refunds"]} == {"processing"}
        by_order = {x["order_id"]: x["refund_id"] for x in out["refunds"]}
        ok, abnormal, closed = (by_order[o["order_id"]] for o in orders)
        wx.settle_refund(ok, "SUCCESS")
        wx.settle_refund(abnormal, "ABNORMAL")
        wx.settle_refund(closed, "CLOSED")

        def states():
            return {x["refund_id"]: x["state"] for x in user.call("GET", "/api/v1/me/wallet").json()["refunds"]}
        assert wait_until(lambda: states() == {ok: "success", abnormal: "abnormal", closed: "closed"}, timeout_s=10)
        # CLOSED: the money is back in the wallet; ABNORMAL: the operators pay it by hand, with an alarm
        assert available(user) == 3000
        owed = cloud.op("GET", "/api/v1/operator/balance-refunds").json()["refunds"]
        assert [(x["amount_fen"], x["orders"][0]["failed_refund_id"]) for x in owed] == [(2000, abnormal)]
        kinds = sorted(a["kind"] for a in cloud.op("GET", "/api/v1/operator/alarms").json()["service_alarms"])
        assert kinds == ["refund_abnormal", "refund_closed"]
        # WeChat repeats the refund notifications: nothing changes
        assert [s for s, _ in wx.notify_refund(ok, repeat=1, concurrent=4)] == [204] * 4
        assert available(user) == 3000 and states()[ok] == "success"
        # a refund notification that is not genuine changes nothing
        assert wx.notify_refund(closed, bad_signature=True)[0][0] == 401


def test_the_wechat_bill_reconciles_with_refunds_listed_on_the_day_they_were_asked(wx, tmp_path):
    yesterday = time.time_ns() // 1_000_000 - 2 * 86_400_000   # the day before yesterday: out for sure by now
    wx.clock_ms = lambda: yesterday
    with wx_cloud(wx, tmp_path) as cloud:
        user = cloud.signup("13500000206")
        a, b = topup(user, 1000, "wechatpay", "native"), topup(user, 2500, "wechatpay", "native")
        wx.scan(a["qr_text"])
        wx.scan(b["qr_text"])
        assert wait_until(lambda: available(user) == 3500, timeout_s=10)
        out = user.call("POST", "/api/v1/me/withdrawals", json={"amount_fen": 500}).json()
        refund_id = out["refunds"][0]["refund_id"]
        # our refund was asked for today (the cloud's clock), WeChat's book says yesterday: move ours back, as if
        # the person had asked yesterday, and leave it processing over midnight
        from sqlalchemy import update
        with cloud.app.state.database.tx() as conn:
            conn.execute(update(t.provider_refunds).values(created_ms=yesterday))
        day = datetime.fromtimestamp(yesterday / 1000, CHINA).date()
        wx.clock_ms = lambda: time.time_ns() // 1_000_000              # and now it is today: the bill is out
        rep = cloud.op("POST", "/api/v1/operator/reconciliations",
                       json={"provider": "wechatpay", "bill_date": str(day)}).json()
        assert rep["state"] == "matched", rep
        assert (rep["bill_payments"], rep["bill_payments_fen"], rep["bill_refunds"]) == (2, 3500, 1)
        # it succeeds the next day: that day's bill does not list it (it was asked for the day before), and that
        # is no mismatch
        wx.settle_refund(refund_id, "SUCCESS", at_ms=yesterday + 86_400_000)
        assert wait_until(lambda: user.call("GET", "/api/v1/me/wallet").json()["refunds"][0]["state"] == "success")
        with cloud.app.state.database.read() as conn:
            done_ms = conn.execute(select(t.provider_refunds.c.done_ms)).scalar()     # WeChat's time, to the second
        assert done_ms // 1000 == (yesterday + 86_400_000) // 1000
        rep = cloud.op("POST", "/api/v1/operator/reconciliations",
                       json={"provider": "wechatpay", "bill_date": str(day + timedelta(days=1))}).json()
        assert rep["state"] == "matched" and rep["bill_refunds"] == 0, rep
        wx.bill_state = "creating"
        r = cloud.op("POST", "/api/v1/operator/reconciliations",
                     json={"provider": "wechatpay", "bill_date": str(day - timedelta(days=1))})
        assert r.status_code == 503 and r.json()["error"] == "bill_not_ready"


def test_a_wechat_refund_given_up_on_that_succeeds_later_is_taken_back(wx, tmp_path):
    """WeChat lets a merchant settle an ABNORMAL refund by hand, and then it reports SUCCESS; a CLOSED one can
    never succeed, but if WeChat says so we believe the signed word and take the money back from the balance."""
    with wx_cloud(wx, tmp_path) as cloud:
        user = cloud.signup("13500000207")
        orders = [topup(user, fen, "wechatpay", "native") for fen in (1000, 2000)]
        for o in orders:
            wx.scan(o["qr_text"])
        assert wait_until(lambda: available(user) == 3000, timeout_s=10)
        out = user.call("POST", "/api/v1/me/withdrawals", json={}).json()
        by_amount = {x["amount_fen"]: x["refund_id"] for x in out["refunds"]}
        abnormal, closed = by_amount[2000], by_amount[1000]
        wx.settle_refund(abnormal, "ABNORMAL")
        wx.settle_refund(closed, "CLOSED")
        assert wait_until(lambda: available(user) == 1000, timeout_s=10)      # CLOSED came back
        assert [x["amount_fen"] for x in cloud.op("GET", "/api/v1/operator/balance-refunds").json()["refunds"]] \
            == [2000]
        with wx._lock:
            wx.refunds[abnormal].status = wx.refunds[closed].status = "SUCCESS"
            wx.refunds[abnormal].success_ms = wx.refunds[closed].success_ms = time.time_ns() // 1_000_000
        assert [s for s, _ in wx.notify_refund(abnormal) + wx.notify_refund(closed)] == [204, 204]
        assert wait_until(lambda: available(user) == 0, timeout_s=10)         # taken back from the balance
        assert cloud.op("GET", "/api/v1/operator/balance-refunds").json()["refunds"] == []   # withdrawn, not owed
        late = [a for a in cloud.op("GET", "/api/v1/operator/alarms").json()["service_alarms"]
                if a["kind"] == "refund_succeeded_late"]
        assert sorted(a["detail"]["was"] for a in late) == ["abnormal", "closed"]
        states = {x["refund_id"]: x["state"] for x in cloud.op("GET", "/api/v1/operator/refunds").json()["refunds"]}
        assert states == {abnormal: "success", closed: "success"}


def test_money_paid_to_an_account_deleted_meanwhile_goes_back_through_wechat(wx, tmp_path):
    clock = Clock()
    wx.auto_notify = False
    with wx_cloud(wx, tmp_path, clock_ms=clock) as cloud:
        wx.clock_ms = clock
        user = cloud.signup("13500000208")
        o = topup(user, 1500, "wechatpay", "native")
        wx.scan(o["qr_text"])                                   # paid at the last second, no notification yet
        wx.unsigned_answers = True                              # and the cloud's questions get no answer it trusts
        clock.now += 16 * 60_000
        time.sleep(0.5)
        r = user.call("DELETE", "/api/v1/me", json={"confirm": True, "refund_balance": True})
        assert r.status_code == 200 and r.json()["refund_fen"] == 0, r.text
        wx.unsigned_answers = False
        clock.now = time.time_ns() // 1_000_000     # WeChat signs its notification with the real time
        assert [s for s, _ in wx.notify(o["order_id"])] == [204]          # WeChat's notification arrives now
        assert wait_until(lambda: wx.refunds and next(iter(wx.refunds.values())).amount_fen == 1500, timeout_s=10)
        alarms = [a["kind"] for a in cloud.op("GET", "/api/v1/operator/alarms").json()["service_alarms"]]
        assert "paid_after_deletion" in alarms
        with cloud.app.state.database.read() as conn:
            kinds = [(e.kind, e.amount_fen) for e in conn.execute(select(t.balance_entries).where(
                t.balance_entries.c.user_id == user.user_id)).all()]
        assert kinds == [("topup", 1500), ("payout", -1500)]


def test_a_refund_answer_that_does_not_match_is_an_alarm_and_holds_up_no_other_refund(wx, tmp_path):
    from cloud.wallet.payments import RefundNotice
    with wx_cloud(wx, tmp_path) as cloud:
        wallet = cloud.app.state.services.wallet
        user = cloud.signup("13500000209")
        o = topup(user, 2000, "wechatpay", "native")
        wx.scan(o["qr_text"])
        assert wait_until(lambda: available(user) == 2000, timeout_s=10)
        out = user.call("POST", "/api/v1/me/withdrawals", json={"amount_fen": 1000})
        assert out.status_code == 200
        rid = out.json()["refunds"][0]["refund_id"]
        wallet.apply_refund("wechatpay", RefundNotice(refund_id=rid, order_id=o["order_id"], amount_fen=999,
                                                      status="SUCCESS"), time.time_ns() // 1_000_000)
        alarms = cloud.op("GET", "/api/v1/operator/alarms").json()["service_alarms"]
        assert [(a["kind"], a["detail"]["notified_fen"]) for a in alarms] == [("refund_amount_mismatch", 999)]
        refunds = cloud.op("GET", "/api/v1/operator/refunds").json()["refunds"]
        assert refunds[0]["state"] == "processing" and "refund_amount_mismatch" in refunds[0]["last_error"]
        # the next withdrawal goes through as usual
        again = user.call("POST", "/api/v1/me/withdrawals", json={})
        assert again.status_code == 200 and again.json()["withdrawn_fen"] == 1000
