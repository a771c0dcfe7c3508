"""Paying and being paid back, in real headless Chromium against the real cloud on loopback (issue 19): the person
picks WeChat Pay, Alipay or (development) the sandbox on the wallet page; the providers are local stand-ins of
their HTTP APIs (tests/standins), which check our signatures as the providers do and notify the cloud signed as
the providers do. Inside WeChat the page gets the openid through WeChat's web authorisation and pays through the
JSAPI bridge; other phone browsers go to WeChat's H5 page or Alipay's WAP page; a computer shows a QR code. The
balance goes back to the payments it came from from the wallet page. Screenshots: ``tests/screenshots/phone``."""

import pytest

from tests.cloudkit import CloudServer
from tests.test_phone_pages import OPERATOR, _page, shot
from tests.util import wait_until


@pytest.fixture
def sandbox_cloud(tmp_path):
    with CloudServer(tmp_path / "cloud", **OPERATOR) as cloud:
        yield cloud


@pytest.mark.parametrize(("lang", "width"), [("zh", 320), ("en", 430)])
def test_a_person_tops_up_in_the_sandbox_and_takes_the_balance_back(sandbox_cloud, browser, lang, width):
    cloud = sandbox_cloud
    user = cloud.user("13500000001", balance_fen=0)
    page, errors = _page(browser, cloud, user, lang, width)
    page.goto(cloud.url + "/app#/wallet")
    page.wait_for_selector("#withdraw-none")                      # nothing to take back yet, and it says so
    assert page.query_selector("button.method") is None           # one way to pay: no choice to make
    for fen in ("2000", "1000"):
        page.click(f"button.amt[data-fen='{fen}']")
        page.wait_for_selector("#pay")
        page.click("#pay")
        page.wait_for_selector("#paid", timeout=15_000)
    page.wait_for_selector("#withdraw-go")
    assert "30.00" in page.inner_text("#withdraw-go")
    page.click("#withdraw-go")                                    # a second tap confirms
    assert "30.00" in page.inner_text("#withdraw-go")
    shot(page, f"p1-withdraw-confirm-{lang}-{width}")
    page.click("#withdraw-go")
    page.wait_for_selector("#withdraw-done")
    assert page.inner_text("#available") == "¥0.00"
    rows = page.inner_text("#refunds")
    assert rows.count("已到账" if lang == "zh" else "Received") == 2 and "¥20.00" in rows and "¥10.00" in rows
    shot(page, f"p2-withdrawn-{lang}-{width}")
    w = user.call("GET", "/api/v1/me/wallet").json()
    assert w["available_fen"] == 0 and sorted(r["amount_fen"] for r in w["refunds"]) == [1000, 2000]
    sandbox = cloud.app.state.services.wallet.providers["sandbox"]
    assert wait_until(lambda: all(sandbox.query_refund(r["order_id"], r["refund_id"]) for r in w["refunds"]))
    assert errors == []
    page.close()


# ---------------------------------------------------------------- the real providers' stand-ins
PHONE_UA = ("Mozilla/5.0 (Linux; Android 14; Pixel 8) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/126.0 "
            "Mobile Safari/537.36")


@pytest.fixture
def providers_cloud(tmp_path):
    """A development cloud offering Alipay (its stand-in) and the sandbox, as an operator trying it would."""
    from cloud.security import SecretBox
    from cloud.wallet import alipay
    from cloud.wallet.payments import SandboxPay
    from tests.standins.alipay import AlipayStandIn
    with AlipayStandIn() as ali:
        pays = [alipay.from_env(ali.env(tmp_path / "keys")), SandboxPay(SecretBox(bytes(32)).subkey("sandbox-pay"))]
        with CloudServer(tmp_path / "cloud", payment_providers=pays, **OPERATOR) as cloud:
            yield cloud, ali


def _phone(b, cloud, user, lang, width, ua=PHONE_UA):
    page = b.new_page(viewport={"width": width, "height": 800}, user_agent=ua, has_touch=True,
                      is_mobile=True, locale="zh-CN" if lang == "zh" else "en-GB")
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(cloud.url + "/app")
    page.evaluate(f"() => {{ localStorage.setItem('tapshare.token', '{user.token}'); "
                  f"localStorage.setItem('tapshare.lang', '{lang}'); }}")
    page.reload()
    return page, errors


@pytest.mark.parametrize(("lang", "width"), [("zh", 320), ("zh", 390), ("en", 430)])
def test_on_a_phone_a_person_picks_alipay_and_pays_on_alipays_page(providers_cloud, browser, lang, width):
    cloud, ali = providers_cloud
    user = cloud.user(f"13500002{width}", balance_fen=0)
    page, errors = _phone(browser, cloud, user, lang, width)
    page.goto(cloud.url + "/app#/wallet")
    page.wait_for_selector("button.method[data-provider='alipay']")
    assert [b.inner_text().split("\n") for b in page.query_selector_all("button.method")] == (
        [["支付宝"], ["沙箱支付", "开发用，不扣款"]] if lang == "zh"
        else [["Alipay"], ["Sandbox", "development: no money"]])
    page.click("button.method[data-provider='alipay']")
    assert page.get_attribute("button.method[data-provider='alipay']", "aria-checked") == "true"
    shot(page, f"p3-methods-{lang}-{width}")
    page.click("button.amt[data-fen='5000']")
    page.wait_for_url(f"{ali.base_url}/**")                       # Alipay's own page (the stand-in's)
    assert "¥50.00" in page.content() or "50.00" in page.content()
    page.click("#pay")
    page.wait_for_url(f"{cloud.url}/app**")
    page.wait_for_selector("#paid", timeout=15_000)
    assert page.inner_text("#available") == "¥50.00"
    shot(page, f"p4-alipay-paid-{lang}-{width}")
    # the choice is remembered for next time
    page.goto(cloud.url + "/app#/wallet")
    page.wait_for_selector("button.method[aria-checked='true']")
    assert page.get_attribute("button.method[aria-checked='true']", "data-provider") == "alipay"
    assert errors == []
    page.close()


def test_on_a_computer_alipay_shows_a_qr_code_that_alipay_can_scan(providers_cloud, browser, tmp_path):
    import zxingcpp
    from PIL import Image
    cloud, ali = providers_cloud
    user = cloud.user("13500000301", balance_fen=0)
    page, errors = _page(browser, cloud, user, "zh", 1366)
    page.goto(cloud.url + "/app#/wallet")
    page.wait_for_selector("button.method[data-provider='alipay']")
    page.click("button.method[data-provider='alipay']")
    page.click("button.amt[data-fen='2000']")
    page.wait_for_selector("#pay-qr svg")
    assert "支付宝" in page.inner_text("#pay-qr")
    shot(page, "p5-alipay-qr-1366")
    png = tmp_path / "qr.png"
    page.locator("#pay-qr svg").screenshot(path=str(png))
    codes = [c.text for c in zxingcpp.read_barcodes(Image.open(png)) if c.format == zxingcpp.BarcodeFormat.QRCode]
    assert len(codes) == 1 and codes[0].startswith(ali.base_url)       # the code Alipay gave, readable
    ali.pay_qr(codes[0])                                               # scanned and paid in the Alipay app
    page.wait_for_selector("#paid", timeout=15_000)
    assert page.inner_text("#available") == "¥20.00"
    assert errors == []
    page.close()


@pytest.mark.parametrize("lang", ["zh", "en"])
def test_a_person_logs_in_with_a_code_tencent_delivered_and_is_told_when_sms_is_down(tmp_path, browser, lang):
    from cloud.accounts import sms_tencent
    from tests.standins.tencent_sms import TencentSmsStandIn
    with TencentSmsStandIn() as tc, CloudServer(tmp_path / "c", sms_provider=sms_tencent.from_env(
            tc.env(tmp_path / "keys")), **OPERATOR) as cloud:
        page = browser.new_page(viewport={"width": 360, "height": 780}, user_agent=PHONE_UA, is_mobile=True,
                                has_touch=True, locale="zh-CN" if lang == "zh" else "en-GB")
        errors: list[str] = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.goto(cloud.url + "/app")
        page.evaluate(f"() => localStorage.setItem('tapshare.lang', '{lang}')")
        page.goto(cloud.url + "/app#/login")
        page.reload()
        page.wait_for_selector("#agree-terms")
        page.click("label[for=agree-terms]")
        tc.error, tc.error_message = "InternalError.RequestTimeException", "backend timeout"
        page.fill("#phone", "139 0000 1234")
        page.click("#send")
        said = "短信暂时发送失败，请一分钟后再试。" if lang == "zh" else "The SMS could not be sent just now"
        page.wait_for_selector(f"#login-error:has-text('{said}')")
        assert page.query_selector("#sms-list .sms") is None      # nothing of a development inbox here
        shot(page, f"p6-sms-down-{lang}")
        alarms = cloud.op("GET", "/api/v1/operator/alarms").json()["service_alarms"]
        assert [(a["source"], a["kind"], a["detail"]["code"]) for a in alarms] == [
            ("sms", "send_failed", "InternalError.RequestTimeException")]
        # Tencent is back; the minute's wait still stands (no hammering), then the code arrives by SMS
        tc.error = tc.error_message = None
        with cloud.app.state.database.tx() as conn:
            from sqlalchemy import update

            from cloud import db as t
            conn.execute(update(t.sms_codes).values(created_ms=t.sms_codes.c.created_ms - 61_000))
        page.click("#send")
        assert wait_until(lambda: tc.codes("+8613900001234"), timeout_s=10)
        page.fill("#code", tc.last_code("+8613900001234"))
        page.click("#login")
        page.wait_for_selector("#nav-account")
        page.wait_for_function("() => !location.hash.startsWith('#/login')")
        assert errors == []
        page.close()


WECHAT_UA = ("Mozilla/5.0 (Linux; Android 14; Pixel 8) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/126.0 "
             "Mobile Safari/537.36 XWEB/1300 MMWEBSDK/20240301 MicroMessenger/8.0.49.2600 NetType/WIFI Language/zh_CN")


@pytest.fixture
def wechat_cloud(tmp_path):
    """A development cloud offering WeChat Pay (its stand-in), Alipay (its stand-in) and the sandbox."""
    from cloud.security import SecretBox
    from cloud.wallet import alipay, wechatpay
    from cloud.wallet.payments import SandboxPay
    from tests.standins.alipay import AlipayStandIn
    from tests.standins.wechatpay import WechatPayStandIn
    with WechatPayStandIn() as wx, AlipayStandIn() as ali:
        pays = [wechatpay.from_env(wx.env(tmp_path / "wx")), alipay.from_env(ali.env(tmp_path / "ali")),
                SandboxPay(SecretBox(bytes(32)).subkey("sandbox-pay"))]
        with CloudServer(tmp_path / "cloud", payment_providers=pays, **OPERATOR) as cloud:
            yield cloud, wx


@pytest.mark.parametrize(("lang", "width"), [("zh", 320), ("en", 390)])
def test_inside_wechat_a_person_authorises_once_and_pays_through_the_jsapi_bridge(wechat_cloud, browser, lang,
                                                                                  width):
    """WeChat's in-app browser: the page asks WeChat who pays (silent authorisation, once), comes back, and pays
    through WeixinJSBridge. The bridge is WeChat's native code, outside the page: here it hands the parameters to
    the stand-in as the WeChat app would."""
    cloud, wx = wechat_cloud
    user = cloud.user(f"13500003{width}", balance_fen=0)
    page, errors = _phone(browser, cloud, user, lang, width, ua=WECHAT_UA)
    bridge_calls: list[dict] = []
    visits: list[str] = []
    page.on("request", lambda r: visits.append(r.url) if r.is_navigation_request() else None)

    def bridge(params):
        bridge_calls.append(params)
        return wx.pay_jsapi(params)
    page.expose_function("tapshareTestWechatPay", bridge)
    page.add_init_script("""window.WeixinJSBridge = {invoke(name, params, cb) {
        if (name !== 'getBrandWCPayRequest') return cb({err_msg: name + ':fail'});
        window.tapshareTestWechatPay(params).then(cb); }};""")
    page.reload()                                   # a fresh document, with WeChat's bridge in it
    page.goto(cloud.url + "/app#/wallet")
    page.wait_for_selector("button.method")
    providers = [b.get_attribute("data-provider") for b in page.query_selector_all("button.method")]
    assert providers == ["wechatpay", "sandbox"]                    # Alipay cannot open inside WeChat
    assert page.get_attribute("button.method[data-provider='wechatpay']", "aria-checked") == "true"
    shot(page, f"p7-in-wechat-{lang}-{width}")
    page.click("button.amt[data-fen='2000']")
    page.wait_for_selector("#paid", timeout=15_000)                 # authorised, back, resumed, paid
    assert page.inner_text("#available") == "¥20.00"
    assert len(bridge_calls) == 1 and bridge_calls[0]["package"].startswith("prepay_id=")
    shot(page, f"p8-wechat-paid-{lang}-{width}")
    assert len([u for u in visits if "/connect/oauth2/authorize" in u]) == 1      # went to WeChat once
    # the next top-up needs no authorisation
    page.click("button.amt[data-fen='1000']")
    page.wait_for_function("() => document.querySelector('#available')?.textContent === '¥30.00'", timeout=15_000)
    assert len(bridge_calls) == 2
    assert len([u for u in visits if "/connect/oauth2/authorize" in u]) == 1
    assert errors == []
    page.close()


def test_a_person_who_closes_the_wechat_pay_sheet_is_told_nothing_was_charged(wechat_cloud, browser):
    cloud, wx = wechat_cloud
    user = cloud.user("13500003999", balance_fen=0)
    with cloud.app.state.database.tx() as conn:       # authorised before
        from cloud import db as t
        conn.execute(t.payer_accounts.insert().values(user_id=user.user_id, provider="wechatpay",
                                                      payer_id=wx.oauth_openid, created_ms=1))
    page, errors = _phone(browser, cloud, user, "zh", 390, ua=WECHAT_UA)
    page.expose_function("tapshareTestWechatPay", lambda params: wx.pay_jsapi({**params, "cancel": True}))
    page.add_init_script("""window.WeixinJSBridge = {invoke(name, params, cb) {
        window.tapshareTestWechatPay(params).then(cb); }};""")
    page.reload()                                   # a fresh document, with WeChat's bridge in it
    page.goto(cloud.url + "/app#/wallet")
    page.wait_for_selector("button.amt")
    page.click("button.amt[data-fen='5000']")
    page.wait_for_function("() => document.querySelector('#topup-error').textContent !== ''", timeout=10_000)
    assert page.inner_text('#topup-error') == '已取消付款，未扣款。'
    assert page.inner_text("#available") == "¥0.00"
    assert errors == []
    page.close()


def test_a_phone_browser_pays_on_wechats_h5_page(wechat_cloud, browser):
    cloud, wx = wechat_cloud
    user = cloud.user("13500004001", balance_fen=0)
    page, errors = _phone(browser, cloud, user, "zh", 390)
    page.goto(cloud.url + "/app#/wallet")
    page.wait_for_selector("button.method[data-provider='wechatpay']")
    assert [b.get_attribute("data-provider") for b in page.query_selector_all("button.method")] == [
        "wechatpay", "alipay", "sandbox"]
    page.click("button.method[data-provider='wechatpay']")
    page.click("button.amt[data-fen='1000']")
    page.wait_for_url(f"{wx.base_url}/**")
    assert "￥10.00" in page.inner_text("#amount")
    page.click("#pay")
    page.wait_for_url(f"{cloud.url}/app**")
    page.wait_for_selector("#paid", timeout=15_000)
    assert page.inner_text("#available") == "¥10.00"
    assert errors == []
    page.close()


def test_a_computer_shows_the_wechat_native_qr_code(wechat_cloud, browser, tmp_path):
    import zxingcpp
    from PIL import Image
    cloud, wx = wechat_cloud
    user = cloud.user("13500004002", balance_fen=0)
    page, errors = _page(browser, cloud, user, "en", 1366)
    page.reload()
    page.goto(cloud.url + "/app#/wallet")
    page.wait_for_selector("button.method[data-provider='wechatpay']")
    page.click("button.method[data-provider='wechatpay']")
    page.click("button.amt[data-fen='5000']")
    page.wait_for_selector("#pay-qr svg")
    assert "with WeChat to pay" in page.inner_text("#pay-qr")
    shot(page, "p9-wechat-qr-1366-en")
    png = tmp_path / "qr.png"
    page.locator("#pay-qr svg").screenshot(path=str(png))
    codes = [c.text for c in zxingcpp.read_barcodes(Image.open(png)) if c.format == zxingcpp.BarcodeFormat.QRCode]
    assert len(codes) == 1 and codes[0].startswith("weixin://wxpay/bizpayurl")
    wx.scan(codes[0])
    page.wait_for_selector("#paid", timeout=15_000)
    assert page.inner_text("#available") == "¥50.00"
    assert errors == []
    page.close()
