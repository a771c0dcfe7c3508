"""The WeChat Pay adapter (cloud/wallet/wechatpay.py) against the local stand-in of WeChat Pay API v3
(tests/standins/wechatpay.py) over real HTTP on loopback: requests signed WECHATPAY2-SHA256-RSA2048 that the
stand-in checks as WeChat Pay does, answers and notifications it signs (platform certificate or WeChat Pay public
key) and encrypts (AEAD_AES_256_GCM with the APIv3 key) as published, its own order book, refunds, the trade bill
and the official account's web authorisation."""

from __future__ import annotations

import base64
import json
import threading
import time
import urllib.parse
from datetime import datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import requests
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding

from cloud.errors import DomainError, Invalid, ProviderConfigError, Unauthenticated
from cloud.wallet import wechatpay
from cloud.wallet.payments import (
    CHINA,
    BillRow,
    Notification,
    PayRequest,
    ProviderError,
    RefundNotice,
    RefundRequest,
)
from tests.standins.wechatpay import (
    APP_SECRET,
    WechatPayStandIn,
    default_keys,
    make_platform_cert,
    new_key,
    pem_cert,
    pem_private,
    pem_public,
)

DAY_MS = 86_400_000


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def lower(headers: dict[str, str]) -> dict[str, str]:
    return {k.lower(): v for k, v in headers.items()}


@pytest.fixture
def wx():
    with WechatPayStandIn(auto_notify=False) as stand_in:
        yield stand_in


@pytest.fixture
def pay(wx, tmp_path) -> wechatpay.WechatPay:
    return wechatpay.from_env(wx.env(tmp_path / "keys"))


def order(order_id: str, fen: int = 1230, channel: str = "native", notify_url: str = "http://127.0.0.1:9/n/wechatpay",
          return_url: str = "https://tapshare.example/app#/wallet?order=x", payer_id: str = "",
          client_ip: str = "") -> PayRequest:
    if channel == "jsapi" and not payer_id:
        payer_id = "oUpF8uMuAJO_M2pxb1Q9zNjWeS6o"
    if channel == "h5" and not client_ip:
        client_ip = "203.0.113.7"
    return PayRequest(order_id=order_id, amount_fen=fen, description=f"Tapshare 饮水充值 top-up ¥{fen / 100:.2f}",
                      notify_url=notify_url, return_url=return_url, expires_ms=now_ms() + 15 * 60_000,
                      channel=channel, client_ip=client_ip, payer_id=payer_id)


def paid(wx, pay, order_id: str, fen: int = 1230, at_ms: int | None = None) -> None:
    wx.scan(pay.create(order(order_id, fen)).qr_text, at_ms=at_ms)


def api_calls(wx, path_part: str) -> list:
    return [r for r in wx.received if r.kind == "api" and path_part in r.path]


class Receiver:
    """Our side of notifications, as the wallet does it: verify with the adapter, then acknowledge (204), or
    answer 500 FAIL for anything refused; ``fail_first``: answer 500 that many times first."""

    def __init__(self, provider: wechatpay.WechatPay, fail_first: int = 0) -> None:
        self.provider, self.fail_first = provider, fail_first
        self.results: list[object] = []
        self.lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:
                pass

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                try:
                    result: object = receiver.provider.verify(lower(dict(self.headers.items())), body, now_ms())
                    with receiver.lock:
                        failing = receiver.fail_first > 0
                        receiver.fail_first -= 1
                    ack = receiver.provider.ack(not failing, "not committed yet" if failing else "")
                except DomainError as e:
                    result, ack = e, receiver.provider.ack(False, e.code)
                with receiver.lock:
                    receiver.results.append(result)
                self.send_response(ack.status_code)
                self.send_header("Content-Type", ack.media_type)
                self.send_header("Content-Length", str(len(ack.body)))
                self.end_headers()
                self.wfile.write(ack.body)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/api/v1/payments/notify/wechatpay"
        threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receiver(pay):
    r = Receiver(pay)
    yield r
    r.close()


# ---------------------------------------------------------------------------------------------- creating


def test_jsapi_order_is_signed_and_its_pay_sign_checks_with_the_merchant_key(wx, pay):
    start = pay.create(order("o-jsapi-1", 1230, "jsapi", payer_id="oPayer_123-abc"))
    call = api_calls(wx, "/v3/pay/transactions/jsapi")[-1]
    assert (call.method, call.sign_ok, call.status) == ("POST", True, 200)
    assert call.headers["Authorization"].startswith('WECHATPAY2-SHA256-RSA2048 mchid="1900000109",')
    assert call.headers["Accept"] == "application/json" and call.headers["User-Agent"]
    body = call.body
    assert (body["appid"], body["mchid"], body["out_trade_no"]) == (wx.appid, wx.mchid, "o-jsapi-1")
    assert body["amount"] == {"total": 1230, "currency": "CNY"} and body["payer"] == {"openid": "oPayer_123-abc"}
    assert body["notify_url"] == "http://127.0.0.1:9/n/wechatpay" and body["description"].startswith("Tapshare")
    assert body["time_expire"].endswith("+08:00") and datetime.fromisoformat(body["time_expire"]).tzinfo
    assert start.kind == "jsapi" and not start.url and not start.qr_text
    p = start.jsapi_params
    assert set(p) == {"appId", "timeStamp", "nonceStr", "package", "signType", "paySign"}
    assert (p["appId"], p["signType"]) == (wx.appid, "RSA")
    assert p["package"] == "prepay_id=" + wx.order("o-jsapi-1").prepay_id and p["timeStamp"].isdigit()
    message = f"{p['appId']}\n{p['timeStamp']}\n{p['nonceStr']}\n{p['package']}\n".encode()
    default_keys().merchant.public_key().verify(base64.b64decode(p["paySign"]), message, padding.PKCS1v15(),
                                                hashes.SHA256())
    with pytest.raises(InvalidSignature):
        default_keys().merchant.public_key().verify(base64.b64decode(p["paySign"]), message.replace(b"prepay", b"x"),
                                                    padding.PKCS1v15(), hashes.SHA256())
    assert pay.query("o-jsapi-1").status == "NOTPAY"
    # the WeChat app refuses a forged paySign, then pays with the genuine parameters
    forged = wx.pay_jsapi(p | {"package": p["package"] + "0"})
    assert forged["err_msg"] == "get_brand_wcpay_request:fail"
    assert wx.pay_jsapi(p) == {"err_msg": "get_brand_wcpay_request:ok"}
    n = pay.query("o-jsapi-1")
    assert (n.status, n.amount_fen, n.provider_txn_id) == ("SUCCESS", 1230, wx.order("o-jsapi-1").transaction_id)


def test_the_jsapi_bridge_route_is_callable_from_another_origin(wx, pay):
    start = pay.create(order("o-jsapi-2", 100, "jsapi"))
    pre = requests.options(wx.base_url + "/standin/jsapi-pay", headers={
        "Origin": "http://127.0.0.1:1234", "Access-Control-Request-Method": "POST"}, timeout=5)
    assert pre.status_code == 204 and pre.headers["Access-Control-Allow-Origin"] == "*"
    prepay = start.jsapi_params["package"].split("=", 1)[1]
    r = requests.post(wx.base_url + "/standin/jsapi-pay", json={"prepay_id": prepay, "cancel": True}, timeout=5)
    assert r.json() == {"err_msg": "get_brand_wcpay_request:cancel"} and r.headers["Access-Control-Allow-Origin"]
    assert pay.query("o-jsapi-2").status == "NOTPAY"
    r = requests.post(wx.base_url + "/standin/jsapi-pay", json={"prepay_id": prepay}, timeout=5)
    assert r.json()["err_msg"] == "get_brand_wcpay_request:ok"
    assert pay.query("o-jsapi-2").status == "SUCCESS"


def test_h5_order_redirects_to_wechat_pay_and_back(wx, pay):
    start = pay.create(order("o-h5-1", 1, "h5", client_ip="198.51.100.20"))
    call = api_calls(wx, "/v3/pay/transactions/h5")[-1]
    assert call.body["scene_info"] == {"payer_client_ip": "198.51.100.20", "h5_info": {"type": "Wap"}}
    h5_url = wx.order("o-h5-1").h5_url
    back = "https://tapshare.example/app#/wallet?order=x"
    assert start.kind == "redirect" and start.url == h5_url + "&redirect_url=" + urllib.parse.quote(back, safe="")
    page = requests.get(start.url, timeout=5)
    assert "确认支付" in page.text and "0.01" in page.text
    assert wx.pay_h5(start.url) == back
    n = pay.query("o-h5-1")
    assert (n.status, n.amount_fen) == ("SUCCESS", 1)
    assert "该订单已支付" in requests.get(start.url, timeout=5).text


def test_native_order_gives_a_code_url_that_pays(wx, pay):
    start = pay.create(order("o-native-1", 50_000))
    assert start.kind == "qr" and start.qr_text.startswith("weixin://wxpay/bizpayurl?pr=")
    page = requests.get(wx.base_url + "/standin/scan", params={"code_url": start.qr_text}, timeout=5)
    assert "确认支付" in page.text and "500.00" in page.text
    r = requests.post(wx.base_url + "/standin/native-pay", json={"code_url": start.qr_text}, timeout=5)
    assert r.json()["ok"] is True
    n = pay.query("o-native-1")
    assert (n.status, n.amount_fen, n.order_id) == ("SUCCESS", 50_000, "o-native-1") and n.paid_ms > 0


def test_the_same_order_twice_answers_the_same_prepay_and_a_changed_one_is_refused(wx, pay):
    first = pay.create(order("o-again-1", 300))
    assert pay.create(order("o-again-1", 300)).qr_text == first.qr_text
    with pytest.raises(ProviderError) as e:
        pay.create(order("o-again-1", 301))
    assert (e.value.code, e.value.retryable) == ("OUT_TRADE_NO_USED", False)


def test_what_is_refused_before_asking_wechat_pay(wx, tmp_path):
    only_native = wechatpay.from_env(wx.env(tmp_path / "k", TAPSHARE_WECHATPAY_CHANNELS="native"))
    assert only_native.channels == ("native",)
    for req, code in ((order("o-ch-1", 100, "jsapi"), "unsupported_channel"),
                      (order("o-ch-2", 100, "wap"), "unsupported_channel"), (order("o-ch-3", 0), "invalid_amount")):
        with pytest.raises(ProviderError) as e:
            only_native.create(req)
        assert e.value.code == code
    every = wechatpay.from_env(wx.env(tmp_path / "k2"))
    with pytest.raises(ProviderError) as e:
        every.create(PayRequest("o-ch-4", 100, "d", "http://127.0.0.1:9/n", "", now_ms() + 60_000, "jsapi"))
    assert e.value.code == "payer_required"
    with pytest.raises(ProviderError) as e:
        every.create(PayRequest("o-ch-5", 100, "d", "http://127.0.0.1:9/n", "", now_ms() + 60_000, "h5"))
    assert e.value.code == "client_ip_required"
    assert not wx.received


# ---------------------------------------------------------------------------------------------- signatures


def test_a_request_signed_with_another_merchant_key_is_refused_clearly(wx, tmp_path):
    env = wx.env(tmp_path / "k")
    other = tmp_path / "other_key.pem"
    other.write_bytes(pem_private(new_key()))
    stranger = wechatpay.from_env(env | {"TAPSHARE_WECHATPAY_MCH_KEY_FILE": str(other)})
    with pytest.raises(ProviderError) as e:
        stranger.create(order("o-sign-1"))
    assert (e.value.code, e.value.retryable) == ("SIGN_ERROR", False)
    assert "TAPSHARE_WECHATPAY_MCH_KEY_FILE" in e.value.message and "TAPSHARE_WECHATPAY_MCH_SERIAL" in e.value.message
    assert wx.received[-1].sign_ok is False and wx.received[-1].status == 401 and "o-sign-1" not in wx.orders
    other_serial = "5157F09EFDC096DE15EBE81A47057A7232F1B8E1"
    wrong_serial = wechatpay.from_env(env | {"TAPSHARE_WECHATPAY_MCH_SERIAL": other_serial})
    with pytest.raises(ProviderError) as e:
        wrong_serial.query("o-sign-1")
    assert e.value.code == "SIGN_ERROR" and "序列号" in e.value.message
    # a refund refused that way is never final: the money question stays open until the key is fixed
    with pytest.raises(ProviderError) as e:
        stranger.refund(RefundRequest("rf-sign-1", "o-sign-1", 100, 1230, "r", ""))
    assert e.value.code == "SIGN_ERROR" and e.value.retryable


def test_an_appid_not_bound_to_the_merchant_is_refused(wx, tmp_path):
    other_app = wechatpay.from_env(wx.env(tmp_path / "k", TAPSHARE_WECHATPAY_APPID="wx0123456789abcdef"))
    with pytest.raises(ProviderError) as e:
        other_app.create(order("o-appid-1"))
    assert (e.value.code, e.value.retryable) == ("APPID_MCHID_NOT_MATCH", False)
    assert wx.received[-1].sign_ok and "o-appid-1" not in wx.orders


def test_answers_that_are_not_genuine_are_not_believed(wx, pay):
    wx.bad_answer_signature = True
    with pytest.raises(ProviderError) as e:
        pay.create(order("o-bad-1", 500))
    assert (e.value.code, e.value.retryable) == ("bad_answer_signature", True)
    with pytest.raises(ProviderError) as e:                 # not even "no such order"
        pay.query("o-never")
    assert e.value.code == "bad_answer_signature"
    wx.bad_answer_signature, wx.unsigned_answers = False, True
    for call in (lambda: pay.query("o-never"), lambda: pay.close("o-never"), lambda: pay.create(order("o-bad-2"))):
        with pytest.raises(ProviderError) as e:             # an unsigned answer is never a fact
            call()
        assert e.value.retryable
    wx.unsigned_answers, wx.sign_test_answers = False, True
    with pytest.raises(ProviderError) as e:                 # WeChat Pay's probe signatures must fail
        pay.query("o-never")
    assert e.value.code == "bad_answer_signature"
    wx.sign_test_answers = False
    assert pay.query("o-never") is None


def test_answers_follow_the_key_we_name_and_an_unknown_key_is_refused(wx, tmp_path):
    only_public = wechatpay.from_env(wx.env(tmp_path / "k", verify_with=("public_key",)))
    assert only_public.query("o-none") is None              # we sent Wechatpay-Serial PUB_KEY_ID_…: answered so
    assert wx.received[-1].headers["Wechatpay-Serial"] == wx.keys.public_key_id
    wx.follow_request_serial = False                        # signed with the platform certificate we do not have
    with pytest.raises(ProviderError) as e:
        only_public.query("o-none")
    assert e.value.code == "bad_answer_signature" and "unknown_serial" in e.value.message
    both = wechatpay.from_env(wx.env(tmp_path / "k2", verify_with=("platform_cert", "public_key")))
    assert both.query("o-none") is None


def test_a_clock_far_from_wechat_pays_is_refused_by_it(wx, tmp_path):
    late = wechatpay.WechatPay(wechatpay.WechatPayConfig.from_env(wx.env(tmp_path / "k")),
                               clock_ms=lambda: now_ms() - 301_000)
    with pytest.raises(ProviderError) as e:
        late.query("o-none")
    assert e.value.code == "SIGN_ERROR" and "时间戳" in e.value.message


# ---------------------------------------------------------------------------------------------- query and close


def test_query_close_unpaid_true_paid_false(wx, pay):
    assert pay.query("o-nowhere") is None
    assert pay.close("o-nowhere") is True
    start = pay.create(order("o-close-1", 700))
    n = pay.query("o-close-1")
    assert (n.status, n.amount_fen, n.provider_txn_id, n.paid_ms) == ("NOTPAY", 700, "-", 0)
    assert pay.close("o-close-1") is True
    assert pay.query("o-close-1").status == "CLOSED"
    with pytest.raises(ValueError):                         # the code cannot be paid any more
        wx.scan(start.qr_text)
    assert pay.close("o-close-1") is True                   # closing again is harmless
    paid(wx, pay, "o-close-2", 800)
    assert pay.close("o-close-2") is False
    refused = api_calls(wx, "/o-close-2/close")[-1]
    assert (refused.status, refused.code) == (400, "ORDERPAID")
    assert pay.query("o-close-2").status == "SUCCESS"


def test_close_answers_wechat_pay_may_give(wx, pay):
    pay.create(order("o-close-3", 100))
    wx.fail_next["close"] = (400, "ORDER_CLOSED", "订单已关闭")
    wx.orders["o-close-3"].state = "CLOSED"
    assert pay.close("o-close-3") is True
    pay.create(order("o-close-4", 100))
    wx.fail_next["close"] = (202, "USERPAYING", "用户支付中，需要输入密码")
    with pytest.raises(ProviderError) as e:
        pay.close("o-close-4")
    assert e.value.retryable
    wx.fail_next["close"] = (500, "SYSTEM_ERROR", "系统异常，请稍后重试")
    with pytest.raises(ProviderError) as e:
        pay.close("o-close-4")
    assert (e.value.code, e.value.retryable) == ("SYSTEM_ERROR", True)
    assert pay.close("o-close-4") is True


def test_expired_orders_close_themselves(wx, pay):
    pay.create(order("o-exp-1", 100))
    wx.clock_ms = lambda: now_ms() + 16 * 60_000
    assert pay.query("o-exp-1").status == "CLOSED"


@pytest.mark.parametrize(("status", "code", "retryable"), [
    (500, "SYSTEM_ERROR", True), (429, "FREQUENCY_LIMITED", True), (400, "PARAM_ERROR", False),
    (403, "NO_AUTH", False), (503, "BUSY", True), (500, "SOMETHING_ELSE", True), (502, "http_502", True)])
def test_wechat_pay_refusals_carry_its_code(wx, pay, status, code, retryable):
    wx.fail_next["query"] = (status, code, "说明")
    with pytest.raises(ProviderError) as e:
        pay.query("o-any")
    assert (e.value.provider, e.value.code, e.value.retryable) == ("wechatpay", code, retryable)
    assert "说明" in e.value.message


def test_wechat_pay_that_cannot_be_reached_is_retryable(wx, tmp_path):
    env = wx.env(tmp_path / "k", TAPSHARE_WECHATPAY_API_URL="http://127.0.0.1:9")
    with pytest.raises(ProviderError) as e:
        wechatpay.from_env(env).query("o-any")
    assert (e.value.code, e.value.retryable) == ("unreachable", True)
    assert "127.0.0.1" not in e.value.message


def test_an_answer_about_another_merchant_is_not_believed(wx, pay):
    pay.create(order("o-other-1", 100))
    wx.orders["o-other-1"].mchid = "1900000999"
    with pytest.raises(ProviderError) as e:
        pay.query("o-other-1")
    assert e.value.code == "bad_answer" and e.value.retryable


# ---------------------------------------------------------------------------------------------- notifications


def test_a_genuine_notification_is_verified(wx, pay):
    paid(wx, pay, "o-ntf-1", 1230)
    headers, body = wx.notification("o-ntf-1")
    n = pay.verify(lower(headers), body, now_ms())
    o = wx.order("o-ntf-1")
    assert isinstance(n, Notification)
    assert (n.order_id, n.provider_txn_id, n.amount_fen, n.status) == ("o-ntf-1", o.transaction_id, 1230, "SUCCESS")
    assert n.paid_ms == o.success_ms // 1000 * 1000 and n.notification_id == json.loads(body)["id"]
    doc = json.loads(body)
    assert doc["resource"]["algorithm"] == "AEAD_AES_256_GCM" and "o-ntf-1" not in body.decode()   # encrypted


def test_a_notification_checked_five_minutes_either_way(wx, pay):
    paid(wx, pay, "o-ntf-2", 100)
    headers, body = wx.notification("o-ntf-2")
    ts_ms = int(headers["Wechatpay-Timestamp"]) * 1000
    for now in (ts_ms + 300_000, ts_ms - 300_000):
        assert pay.verify(lower(headers), body, now).order_id == "o-ntf-2"
    for now in (ts_ms + 300_001, ts_ms - 300_001):
        with pytest.raises(Unauthenticated) as e:
            pay.verify(lower(headers), body, now)
        assert e.value.code == "stale_notification"


@pytest.mark.parametrize(("knobs", "code"), [
    ({"bad_signature": True}, "bad_signature"),
    ({"serial": "1DDE55AD98ED71D6EDD4A4A16996DE7B47773A8C"}, "unknown_serial"),
    ({"serial": "PUB_KEY_ID_0000000000000024101100397200000006"}, "unknown_serial"),
    ({"timestamp_offset_s": -400}, "stale_notification"),
    ({"timestamp_offset_s": 400}, "stale_notification"),
    ({"mchid": "1900000999"}, "wrong_merchant"),
    ({"appid": "wx0000000000000000"}, "wrong_merchant"),
    ({"tamper_ciphertext": True}, "undecryptable"),
])
def test_a_notification_that_is_not_genuine_or_not_ours_is_refused(wx, pay, knobs, code):
    paid(wx, pay, "o-ntf-3", 100)
    headers, body = wx.notification("o-ntf-3", **knobs)
    with pytest.raises(Unauthenticated) as e:
        pay.verify(lower(headers), body, now_ms())
    assert e.value.code == code


def test_a_changed_body_or_a_probe_signature_breaks_the_signature(wx, pay):
    paid(wx, pay, "o-ntf-4", 100)
    headers, body = wx.notification("o-ntf-4")
    doc = json.loads(body)
    ct = bytearray(base64.b64decode(doc["resource"]["ciphertext"]))
    ct[0] ^= 1
    doc["resource"]["ciphertext"] = base64.b64encode(bytes(ct)).decode()
    tampered = json.dumps(doc, ensure_ascii=False, separators=(",", ":")).encode()
    for h, b in ((headers, tampered), (headers, body + b" "),
                 (headers | {"Wechatpay-Signature": "WECHATPAY/SIGNTEST/" + headers["Wechatpay-Signature"][19:]}, body),
                 (headers | {"Wechatpay-Nonce": "X" + headers["Wechatpay-Nonce"]}, body)):
        with pytest.raises(Unauthenticated) as e:
            pay.verify(lower(h), b, now_ms())
        assert e.value.code == "bad_signature"
    with pytest.raises(Unauthenticated) as e:
        pay.verify({"content-type": "application/json"}, body, now_ms())
    assert e.value.code == "unsigned_notification"


def test_our_wrong_apiv3_key_cannot_read_notifications(wx, tmp_path):
    env = wx.env(tmp_path / "k")
    other = tmp_path / "other_apiv3.txt"
    other.write_text("0123456789abcdef0123456789abcdef")
    mistaken = wechatpay.from_env(env | {"TAPSHARE_WECHATPAY_APIV3_KEY_FILE": str(other)})
    paid(wx, mistaken, "o-ntf-5", 100)
    headers, body = wx.notification("o-ntf-5")
    with pytest.raises(Unauthenticated) as e:
        mistaken.verify(lower(headers), body, now_ms())
    assert e.value.code == "undecryptable" and "TAPSHARE_WECHATPAY_APIV3_KEY_FILE" in e.value.message


def test_platform_certificate_and_public_key_are_both_accepted_during_a_switch(wx, tmp_path):
    both = wechatpay.from_env(wx.env(tmp_path / "k", verify_with=("platform_cert", "public_key")))
    only_cert = wechatpay.from_env(wx.env(tmp_path / "k2", verify_with=("platform_cert",)))
    paid(wx, both, "o-ntf-6", 250)
    for signer in ("platform_cert", "public_key"):
        headers, body = wx.notification("o-ntf-6", signer=signer)
        assert headers["Wechatpay-Serial"].startswith("PUB_KEY_ID_") == (signer == "public_key")
        assert both.verify(lower(headers), body, now_ms()).amount_fen == 250
    headers, body = wx.notification("o-ntf-6", signer="public_key")
    with pytest.raises(Unauthenticated) as e:
        only_cert.verify(lower(headers), body, now_ms())
    assert e.value.code == "unknown_serial"
    headers, body = wx.notification("o-ntf-6", signer="platform_cert")
    assert only_cert.verify(lower(headers), body, now_ms()).order_id == "o-ntf-6"


def test_malformed_notifications_are_invalid(wx, pay):
    def signed(doc: object) -> tuple[dict[str, str], bytes]:
        body = json.dumps(doc).encode() if not isinstance(doc, bytes) else doc
        return lower(wx.sign_headers(body)), body

    for doc in (b"not json", [1, 2], {"id": "EV-1", "event_type": "TRANSACTION.SUCCESS"}):
        with pytest.raises(Invalid) as e:
            pay.verify(*signed(doc), now_ms())
        assert e.value.code == "bad_notification"
    paid(wx, pay, "o-ntf-7", 100)
    _, body = wx.notification("o-ntf-7")
    doc = json.loads(body)
    with pytest.raises(Invalid):                            # an event we do not know
        pay.verify(*signed(doc | {"event_type": "TRANSACTION.SOMETHING"}), now_ms())
    resource = wx._resource("transaction", {"mchid": wx.mchid, "appid": wx.appid, "out_trade_no": "o-ntf-7",
                                            "trade_state": "SUCCESS", "amount": {"total": "100"}})
    with pytest.raises(Invalid):                            # fields of the wrong type
        pay.verify(*signed(doc | {"resource": resource}), now_ms())


def test_ack_is_as_published(pay):
    assert pay.ack(True) == wechatpay.NotifyAck(204, "application/json", b"")
    fail = pay.ack(False, "数据库忙")
    assert fail.status_code == 500 and json.loads(fail.body) == {"code": "FAIL", "message": "数据库忙"}


def test_notifications_arrive_over_http_and_are_retried_until_acknowledged(wx, pay):
    rec = Receiver(pay, fail_first=1)
    try:
        wx.auto_notify, wx.notify_delays_s = True, (0.01, 0.05, 0.05)
        pay.create(order("o-http-1", 1230, notify_url=rec.url))
        wx.scan(wx.order("o-http-1").code_url)
        deliveries = wx.wait_deliveries(2)
        assert [d.status for d in deliveries] == [500, 204]
        assert json.loads(deliveries[0].body) == {"code": "FAIL", "message": "not committed yet"}
        assert all(isinstance(x, Notification) and x.order_id == "o-http-1" for x in rec.results)
        assert rec.results[0].notification_id == rec.results[1].notification_id      # the same notification again
    finally:
        rec.close()


def test_crafted_notifications_repeated_and_concurrent(wx, pay, receiver):
    pay.create(order("o-http-2", 300, notify_url=receiver.url))
    wx.scan(wx.order("o-http-2").code_url)
    answers = wx.notify("o-http-2", repeat=2, interval_s=0.01, concurrent=3)
    assert [a[0] for a in answers] == [204] * 6
    assert len({r.notification_id for r in receiver.results}) == 1
    assert wx.notify("o-http-2", bad_signature=True)[0][0] == 500
    assert wx.notify("o-http-2", amount_fen=1)[0][0] == 204                # the wallet compares the amount
    assert receiver.results[-1].amount_fen == 1
    assert wx.notify("o-http-2", mchid="1900000999")[0][0] == 500
    assert wx.notify("o-http-2", timestamp_offset_s=-600)[0][0] == 500


def test_without_notifications_the_query_settles_the_order(wx, pay, receiver):
    pay.create(order("o-quiet-1", 400, notify_url=receiver.url))
    wx.scan(wx.order("o-quiet-1").code_url)                 # auto_notify is off in this fixture
    time.sleep(0.1)
    assert not wx.deliveries and not receiver.results
    n = pay.query("o-quiet-1")
    assert (n.status, n.amount_fen) == ("SUCCESS", 400)


# ---------------------------------------------------------------------------------------------- refunds


def test_refund_is_requested_as_published_and_a_repeat_refunds_once(wx, pay):
    paid(wx, pay, "o-rf-1", 1230)
    req = RefundRequest("rf-1", "o-rf-1", 230, 1230, "退款 refund: 用户提现", "http://127.0.0.1:9/n/wechatpay")
    first = pay.refund(req)
    assert isinstance(first, RefundNotice)
    assert (first.refund_id, first.order_id, first.amount_fen, first.status, first.done_ms) == \
        ("rf-1", "o-rf-1", 230, "PROCESSING", 0)
    call = api_calls(wx, "/v3/refund/domestic/refunds")[-1]
    assert call.sign_ok and call.body == {"out_trade_no": "o-rf-1", "out_refund_no": "rf-1",
                                          "amount": {"refund": 230, "total": 1230, "currency": "CNY"},
                                          "reason": "退款 refund: 用户提现",
                                          "notify_url": "http://127.0.0.1:9/n/wechatpay"}
    again = pay.refund(req)
    assert again.provider_refund_id == first.provider_refund_id and len(wx.refunds) == 1
    assert wx.order("o-rf-1").refunded_fen() == 230
    with pytest.raises(ProviderError) as e:                 # more than what is left
        pay.refund(RefundRequest("rf-2", "o-rf-1", 1001, 1230, "r", ""))
    assert (e.value.code, e.value.retryable) == ("INVALID_REQUEST", False)
    assert pay.refund(RefundRequest("rf-3", "o-rf-1", 1000, 1230, "r", "")).status == "PROCESSING"
    with pytest.raises(ProviderError) as e:                 # the same refund id with another amount
        pay.refund(RefundRequest("rf-3", "o-rf-1", 999, 1230, "r", ""))
    assert e.value.code == "INVALID_REQUEST"
    assert pay.query("o-rf-1").status == "SUCCESS"          # trade_state REFUND: it was paid


def test_query_refund(wx, pay):
    paid(wx, pay, "o-rf-4", 500)
    assert pay.query_refund("o-rf-4", "rf-none") is None
    pay.refund(RefundRequest("rf-4", "o-rf-4", 500, 500, "r", ""))
    assert pay.query_refund("o-rf-4", "rf-4").status == "PROCESSING"
    at = now_ms() - 5_000
    wx.settle_refund("rf-4", "SUCCESS", at_ms=at)
    done = pay.query_refund("o-rf-4", "rf-4")
    assert (done.status, done.amount_fen, done.done_ms) == ("SUCCESS", 500, at // 1000 * 1000)
    with pytest.raises(ProviderError) as e:                 # an answer about another order is not believed
        pay.query_refund("o-other", "rf-4")
    assert e.value.code == "bad_answer"


def test_refund_notifications_success_and_abnormal(wx, pay):
    paid(wx, pay, "o-rf-5", 1000)
    pay.refund(RefundRequest("rf-5", "o-rf-5", 600, 1000, "r", "http://127.0.0.1:9/n"))
    pay.refund(RefundRequest("rf-6", "o-rf-5", 400, 1000, "r", "http://127.0.0.1:9/n"))
    wx.settle_refund("rf-5", "SUCCESS", notify=False)
    wx.settle_refund("rf-6", "ABNORMAL", notify=False)
    n = pay.verify(*_lowered(wx.refund_notification("rf-5")), now_ms())
    assert isinstance(n, RefundNotice)
    assert (n.refund_id, n.order_id, n.amount_fen, n.status, n.provider_refund_id) == \
        ("rf-5", "o-rf-5", 600, "SUCCESS", wx.refunds["rf-5"].refund_id) and n.done_ms > 0
    n = pay.verify(*_lowered(wx.refund_notification("rf-6")), now_ms())
    assert (n.refund_id, n.status, n.amount_fen, n.done_ms) == ("rf-6", "ABNORMAL", 400, 0)
    with pytest.raises(Unauthenticated) as e:
        pay.verify(*_lowered(wx.refund_notification("rf-6", mchid="1900000999")), now_ms())
    assert e.value.code == "wrong_merchant"
    with pytest.raises(Unauthenticated):
        pay.verify(*_lowered(wx.refund_notification("rf-6", bad_signature=True)), now_ms())


def test_a_closed_refund_frees_its_amount_and_notifications_arrive_over_http(wx, pay, receiver):
    wx.auto_notify = True
    paid(wx, pay, "o-rf-7", 300)
    pay.refund(RefundRequest("rf-7", "o-rf-7", 300, 300, "r", receiver.url))
    wx.settle_refund("rf-7", "CLOSED")
    deliveries = wx.wait_deliveries(2)                      # the payment's (no notify_url: none) and the refund's
    assert [d.kind for d in deliveries if d.refund_id == "rf-7"] == ["refund"]
    assert deliveries[-1].status == 204
    notice = receiver.results[-1]
    assert isinstance(notice, RefundNotice) and (notice.refund_id, notice.status) == ("rf-7", "CLOSED")
    assert pay.refund(RefundRequest("rf-8", "o-rf-7", 300, 300, "r", "")).status == "PROCESSING"


def test_refunding_what_wechat_pay_does_not_know(wx, pay):
    with pytest.raises(ProviderError) as e:
        pay.refund(RefundRequest("rf-9", "o-unknown", 100, 100, "r", ""))
    assert (e.value.code, e.value.retryable) == ("RESOURCE_NOT_EXISTS", False)
    pay.create(order("o-rf-10", 100))
    with pytest.raises(ProviderError) as e:                 # not paid
        pay.refund(RefundRequest("rf-10", "o-rf-10", 100, 100, "r", ""))
    assert e.value.code == "INVALID_REQUEST"


def _lowered(pair: tuple[dict[str, str], bytes]) -> tuple[dict[str, str], bytes]:
    return lower(pair[0]), pair[1]


# ---------------------------------------------------------------------------------------------- the bill


def _yesterday_noon_ms() -> int:
    today = datetime.now(CHINA).date()
    y = today - timedelta(days=1)
    return int(datetime(y.year, y.month, y.day, 12, tzinfo=CHINA).timestamp() * 1000)


def test_the_bill_is_parsed_exactly(wx, pay):
    noon = _yesterday_noon_ms()
    day = datetime.fromtimestamp(noon / 1000, CHINA).date()
    for i, fen in enumerate((1, 1230, 50_000, 29)):
        paid(wx, pay, f"o-bill-{i}", fen, at_ms=noon + i * 1000)
    paid(wx, pay, "o-bill-other-day", 999, at_ms=noon - DAY_MS)
    wx.clock_ms = lambda: noon + 3_600_000
    pay.refund(RefundRequest("rf-bill-1", "o-bill-1", 1230, 1230, "r", ""))
    wx.settle_refund("rf-bill-1", "SUCCESS")
    wx.clock_ms = lambda: now_ms()
    csv_text = wx.bill_csv(day).decode()
    assert all(f"`{y}," in csv_text for y in ("0.01", "0.29", "12.30", "500.00"))
    rows = pay.bill(day)
    payments = sorted((r for r in rows if r.kind == "payment"), key=lambda r: r.amount_fen)
    assert [(r.order_id, r.amount_fen) for r in payments] == [("o-bill-0", 1), ("o-bill-3", 29), ("o-bill-1", 1230),
                                                             ("o-bill-2", 50_000)]
    assert payments[2] == BillRow("payment", "o-bill-1", wx.order("o-bill-1").transaction_id, 1230,
                                  at_ms=noon + 1000)
    refunds = [r for r in rows if r.kind == "refund"]
    assert refunds == [BillRow("refund", "o-bill-1", wx.refunds["rf-bill-1"].refund_id, 1230, refund_id="rf-bill-1",
                               at_ms=noon + 3_600_000)]
    assert all(isinstance(r.amount_fen, int) for r in rows)
    call = api_calls(wx, "/v3/billdownload/file")[-1]
    assert call.sign_ok and call.status == 200              # the download request is signed too
    assert api_calls(wx, "/v3/bill/tradebill")[-1].path == f"/v3/bill/tradebill?bill_date={day}&bill_type=ALL"


def test_a_bill_whose_hash_does_not_match_is_refused(wx, pay):
    noon = _yesterday_noon_ms()
    paid(wx, pay, "o-bill-h", 100, at_ms=noon)
    wx.bill_hash_wrong = True
    with pytest.raises(ProviderError) as e:
        pay.bill(datetime.fromtimestamp(noon / 1000, CHINA).date())
    assert e.value.code == "bad_bill_hash"


@pytest.mark.parametrize(("state", "code"), [("missing", "NO_STATEMENT_EXIST"), ("creating", "STATEMENT_CREATING")])
def test_a_bill_not_out_yet_is_retryable(wx, pay, state, code):
    wx.bill_state = state
    with pytest.raises(ProviderError) as e:
        pay.bill(datetime.now(CHINA).date() - timedelta(days=1))
    assert (e.value.code, e.value.retryable) == (code, True) and "not ready" in e.value.message
    wx.bill_state = "ready"
    with pytest.raises(ProviderError) as e:                 # today's bill does not exist yet
        pay.bill(datetime.now(CHINA).date())
    assert (e.value.code, e.value.retryable) == ("NO_STATEMENT_EXIST", True)
    assert pay.bill(datetime.now(CHINA).date() - timedelta(days=1)) == []


def test_a_malformed_bill_is_refused():
    header = ("交易时间,公众账号ID,商户号,特约商户号,设备号,微信订单号,商户订单号,用户标识,交易类型,交易状态,"
              "付款银行,货币种类,应结订单金额,代金券金额,微信退款单号,商户退款单号,退款金额,充值券退款金额,退款类型,"
              "退款状态,商品名称,商户数据包,手续费,费率,订单金额,申请退款金额,费率备注")
    row = ("`2024-05-01 10:00:00,`wx8888888888888888,`1900000109,`0,`,`4200000001,`o-1,`oX,`NATIVE,`SUCCESS,`OTHERS,"
           "`CNY,`12.30,`0.00,`0,`0,`0.00,`0.00,`,`,`d,`,`0.07380,`0.60%,`{amount},`0.00,`")
    summary = ("总交易单数,应结订单总金额,退款总金额,充值券退款总金额,手续费总金额,订单总金额,申请退款总金额\n"
               "`1,`12.30,`0,`0,`0,`12.30,`0")
    good = f"{header}\n{row.format(amount='12.30')}\n{summary}\n"
    assert wechatpay.parse_bill(("\ufeff" + good).encode()) == [BillRow(
        "payment", "o-1", "4200000001", 1230, at_ms=int(datetime(2024, 5, 1, 10, tzinfo=CHINA).timestamp() * 1000))]
    for bad in (f"{header}\n{row.format(amount='12.30')}\n",                      # cut short: no summary
                f"{header}\n{row.format(amount='12.305')}\n{summary}\n",          # three decimals
                f"{header}\n{row.format(amount='12.30')[1:]}\n{summary}\n",       # no backtick
                f"{header.replace('商户订单号,', '')}\n{row.format(amount='1.00')}\n{summary}\n",
                f"{header}\n{row.format(amount='12.30')},`extra\n{summary}\n"):
        with pytest.raises(ProviderError) as e:
            wechatpay.parse_bill(bad.encode())
        assert e.value.code == "bad_bill"
    with pytest.raises(ProviderError):
        wechatpay.parse_bill(good.encode("utf-16"))


def test_bill_amounts_become_fen_exactly():
    for fen in [*range(0, 2000), 2_999_999, 10_000_000]:
        assert wechatpay.bill_fen(f"{fen // 100}.{fen % 100:02d}") == fen
    assert (wechatpay.bill_fen("12.3"), wechatpay.bill_fen("-0.29"), wechatpay.bill_fen("500")) == (1230, -29, 50_000)
    for bad in ("12.345", "1e3", "", "¥1.00", " 1.00", "1,000.00", "01.00", "NaN"):
        assert wechatpay.bill_fen(bad) is None


# ---------------------------------------------------------------------------------------------- web authorisation


def test_web_authorisation_gives_the_payer_openid(wx, pay):
    redirect = "https://tapshare.example/api/v1/payments/wechatpay/oauth"
    url = pay.oauth_url(redirect, "St4te")
    assert url == (f"{wx.base_url}/connect/oauth2/authorize?appid={wx.appid}&redirect_uri="
                   f"{urllib.parse.quote(redirect, safe='')}&response_type=code&scope=snsapi_base&state=St4te"
                   "#wechat_redirect")
    r = requests.get(url, allow_redirects=False, timeout=5)
    assert r.status_code == 302
    back = urllib.parse.urlsplit(r.headers["Location"])
    q = dict(urllib.parse.parse_qsl(back.query))
    assert back.scheme + "://" + back.netloc + back.path == redirect and q["state"] == "St4te"
    wx.oauth_openid = "oPayer-From_OAuth"
    assert pay.openid_for_code(q["code"]) == "oUpF8uMuAJO_M2pxb1Q9zNjWeS6o"      # the code was given before
    with pytest.raises(ProviderError) as e:                                     # a code works once
        pay.openid_for_code(q["code"])
    assert (e.value.code, e.value.retryable) == ("40029", False)
    code = dict(urllib.parse.parse_qsl(urllib.parse.urlsplit(requests.get(
        url, allow_redirects=False, timeout=5).headers["Location"]).query))["code"]
    assert pay.openid_for_code(code) == "oPayer-From_OAuth"
    wx.snapshot_user = True
    code = dict(urllib.parse.parse_qsl(urllib.parse.urlsplit(requests.get(
        url, allow_redirects=False, timeout=5).headers["Location"]).query))["code"]
    with pytest.raises(ProviderError) as e:
        pay.openid_for_code(code)
    assert e.value.code == "snapshot_user"


def test_web_authorisation_with_a_wrong_secret_or_unreachable(wx, tmp_path):
    env = wx.env(tmp_path / "k")
    other = tmp_path / "secret.txt"
    other.write_text("0" * 32)
    with pytest.raises(ProviderError) as e:
        wechatpay.from_env(env | {"TAPSHARE_WECHATPAY_APP_SECRET_FILE": str(other)}).openid_for_code("abc")
    assert e.value.code == "40125" and "0" * 32 not in str(e.value)
    with pytest.raises(ProviderError) as e:
        wechatpay.from_env(env | {"TAPSHARE_WECHATPAY_SNS_URL": "http://127.0.0.1:9"}).openid_for_code("abc")
    assert (e.value.code, e.value.retryable) == ("unreachable", True) and APP_SECRET not in str(e.value)
    native_only = wechatpay.from_env({k: v for k, v in env.items() if k != "TAPSHARE_WECHATPAY_APP_SECRET_FILE"}
                                     | {"TAPSHARE_WECHATPAY_CHANNELS": "h5,native"})
    with pytest.raises(ProviderError) as e:
        native_only.openid_for_code("abc")
    assert e.value.code == "oauth_not_configured"


# ---------------------------------------------------------------------------------------------- configuration


def _secrets() -> list[str]:
    keys = default_keys()
    pem = pem_private(keys.merchant).decode()
    return [pem.splitlines()[1][:40], pem.splitlines()[5][:40], keys.apiv3_key, APP_SECRET, "PRIVATE KEY-----",
            pem_public(keys.wechat.public_key()).decode().splitlines()[1][:40]]


def _refused(env: dict[str, str]) -> str:
    with pytest.raises(ProviderConfigError) as e:
        wechatpay.from_env(env)
    message = str(e.value)
    assert message.startswith("WeChat Pay: ")
    assert not any(s in message for s in _secrets())
    return message


def test_config_from_the_stand_ins_files(wx, tmp_path):
    env = wx.env(tmp_path / "k", verify_with=("platform_cert", "public_key"))
    p = wechatpay.from_env(env)
    assert (p.name, p.is_development, p.channels, p.refund_window_days) == \
        ("wechatpay", False, ("jsapi", "h5", "native"), 365)
    cfg = p.config
    assert cfg.platform_serials == (wx.keys.platform_serial,) and cfg.public_key_id == wx.keys.public_key_id
    assert cfg.request_serial == wx.keys.public_key_id and cfg.app_secret == APP_SECRET
    assert not any(s in repr(cfg) for s in _secrets()) and "apiv3" not in repr(cfg)
    defaults = wechatpay.WechatPayConfig.from_env({k: v for k, v in env.items() if not k.endswith("_URL")}
                                                  | {"TAPSHARE_WECHATPAY_REFUND_WINDOW_DAYS": "180"})
    assert (defaults.api_url, defaults.oauth_url, defaults.sns_url, defaults.refund_window_days) == \
        ("https://api.mch.weixin.qq.com", "https://open.weixin.qq.com", "https://api.weixin.qq.com", 180)


def test_config_missing_ids_and_files_are_named_all_at_once(tmp_path):
    message = _refused({})
    for var in ("TAPSHARE_WECHATPAY_MCHID", "TAPSHARE_WECHATPAY_APPID", "TAPSHARE_WECHATPAY_MCH_SERIAL",
                "TAPSHARE_WECHATPAY_MCH_KEY_FILE", "TAPSHARE_WECHATPAY_APIV3_KEY_FILE",
                "TAPSHARE_WECHATPAY_APP_SECRET_FILE", "TAPSHARE_WECHATPAY_PLATFORM_CERT_FILES",
                "TAPSHARE_WECHATPAY_PUBLIC_KEY_FILE"):
        assert var in message
    message = _refused({"TAPSHARE_WECHATPAY_MCHID": "19000x", "TAPSHARE_WECHATPAY_APPID": "wx123",
                        "TAPSHARE_WECHATPAY_MCH_SERIAL": "not-hex", "TAPSHARE_WECHATPAY_CHANNELS": "jsapi,wap",
                        "TAPSHARE_WECHATPAY_REFUND_WINDOW_DAYS": "400",
                        "TAPSHARE_WECHATPAY_API_URL": "http://api.mch.weixin.qq.com",
                        "TAPSHARE_WECHATPAY_PUBLIC_KEY_ID": "KEY_1"})
    for var in ("TAPSHARE_WECHATPAY_MCHID", "TAPSHARE_WECHATPAY_APPID", "TAPSHARE_WECHATPAY_MCH_SERIAL",
                "TAPSHARE_WECHATPAY_CHANNELS", "TAPSHARE_WECHATPAY_REFUND_WINDOW_DAYS", "TAPSHARE_WECHATPAY_API_URL",
                "TAPSHARE_WECHATPAY_PUBLIC_KEY_ID", "TAPSHARE_WECHATPAY_PUBLIC_KEY_FILE: missing"):
        assert var in message


def test_config_unreadable_files(wx, tmp_path):
    good = wx.env(tmp_path / "k")
    message = _refused(good | {"TAPSHARE_WECHATPAY_MCH_KEY_FILE": str(tmp_path / "nowhere.pem")})
    assert f"TAPSHARE_WECHATPAY_MCH_KEY_FILE: {tmp_path / 'nowhere.pem'} is not readable (no such file or " \
        "directory)" in message
    assert "APIV3" not in message and "PLATFORM" not in message
    message = _refused(good | {"TAPSHARE_WECHATPAY_APIV3_KEY_FILE": str(tmp_path)})
    assert f"TAPSHARE_WECHATPAY_APIV3_KEY_FILE: {tmp_path} is not readable (is a directory)" in message


@pytest.mark.skipif(hasattr(__import__("os"), "geteuid") and __import__("os").geteuid() == 0,
                    reason="root reads files whatever their mode")
def test_config_key_file_without_permission(wx, tmp_path):
    good = wx.env(tmp_path / "k")
    locked = tmp_path / "locked.pem"
    locked.write_bytes(pem_private(default_keys().merchant))
    locked.chmod(0)
    message = _refused(good | {"TAPSHARE_WECHATPAY_MCH_KEY_FILE": str(locked)})
    assert f"TAPSHARE_WECHATPAY_MCH_KEY_FILE: {locked} is not readable (permission denied)" in message


def test_config_keys_and_certificates_that_do_not_parse_or_do_not_fit(wx, tmp_path):
    keys = default_keys()
    good = wx.env(tmp_path / "k", verify_with=("platform_cert",))
    pem = pem_private(keys.merchant).decode()
    damaged = tmp_path / "damaged.pem"
    damaged.write_text(pem[:200] + "AAAA" + pem[204:])
    message = _refused(good | {"TAPSHARE_WECHATPAY_MCH_KEY_FILE": str(damaged)})
    assert "TAPSHARE_WECHATPAY_MCH_KEY_FILE" in message and "does not parse" in message
    small = tmp_path / "small.pem"
    small.write_bytes(pem_private(new_key(1024)))
    assert "1024 bits" in _refused(good | {"TAPSHARE_WECHATPAY_MCH_KEY_FILE": str(small)})
    bad_cert = tmp_path / "bad_cert.pem"
    cert_pem = pem_cert(keys.platform_cert).decode()
    bad_cert.write_text(cert_pem[:100] + "!!!!" + cert_pem[104:])
    message = _refused(good | {"TAPSHARE_WECHATPAY_PLATFORM_CERT_FILES": str(bad_cert)})
    assert f"TAPSHARE_WECHATPAY_PLATFORM_CERT_FILES: {bad_cert} does not parse as a PEM certificate" in message
    old = tmp_path / "expired.pem"
    now = datetime.now(CHINA)
    old.write_bytes(pem_cert(make_platform_cert(keys.platform, not_before=now - timedelta(days=800),
                                                not_after=now - timedelta(days=1))[1]))
    assert "expired on" in _refused(good | {"TAPSHARE_WECHATPAY_PLATFORM_CERT_FILES": str(old)})
    own = tmp_path / "apiclient_cert.pem"
    own.write_bytes(pem_cert(make_platform_cert(keys.merchant)[1]))
    assert "merchant's own API certificate" in _refused(good | {"TAPSHARE_WECHATPAY_PLATFORM_CERT_FILES": str(own)})
    message = _refused(good | {"TAPSHARE_WECHATPAY_PLATFORM_CERT_FILES": good["TAPSHARE_WECHATPAY_MCH_KEY_FILE"]})
    assert "private key" in message
    for length in (31, 33, 0):
        short = tmp_path / f"apiv3_{length}.txt"
        short.write_text("k" * length)
        message = _refused(good | {"TAPSHARE_WECHATPAY_APIV3_KEY_FILE": str(short)})
        assert f"TAPSHARE_WECHATPAY_APIV3_KEY_FILE: {short} must hold the APIv3 key, exactly 32 bytes; it holds " \
            f"{length}" in message
    spaced = tmp_path / "apiv3_spaced.txt"
    spaced.write_text("k" * 15 + " " + "k" * 16)
    assert "32 printable ASCII" in _refused(good | {"TAPSHARE_WECHATPAY_APIV3_KEY_FILE": str(spaced)})
    secret = tmp_path / "secret.txt"
    secret.write_text("short")
    assert "TAPSHARE_WECHATPAY_APP_SECRET_FILE" in _refused(good | {"TAPSHARE_WECHATPAY_APP_SECRET_FILE": str(secret)})
    pub = tmp_path / "pub.pem"
    pub.write_bytes(pem_cert(keys.platform_cert))
    message = _refused(good | {"TAPSHARE_WECHATPAY_PUBLIC_KEY_FILE": str(pub),
                               "TAPSHARE_WECHATPAY_PUBLIC_KEY_ID": keys.public_key_id})
    assert "TAPSHARE_WECHATPAY_PUBLIC_KEY_FILE" in message and "is a certificate" in message


def test_config_needs_a_platform_certificate_or_the_public_key(wx, tmp_path):
    env = {k: v for k, v in wx.env(tmp_path / "k").items() if "PLATFORM" not in k and "PUBLIC_KEY" not in k}
    message = _refused(env)
    assert "TAPSHARE_WECHATPAY_PLATFORM_CERT_FILES / TAPSHARE_WECHATPAY_PUBLIC_KEY_FILE: neither is set" in message
    public_only = wx.env(tmp_path / "k2", verify_with=("public_key",))
    assert wechatpay.from_env(public_only).config.platform_serials == ()
    no_id = {k: v for k, v in public_only.items() if k != "TAPSHARE_WECHATPAY_PUBLIC_KEY_ID"}
    assert "TAPSHARE_WECHATPAY_PUBLIC_KEY_ID: missing" in _refused(no_id)


def test_config_the_app_secret_is_needed_only_for_jsapi(wx, tmp_path):
    env = {k: v for k, v in wx.env(tmp_path / "k").items() if k != "TAPSHARE_WECHATPAY_APP_SECRET_FILE"}
    assert "TAPSHARE_WECHATPAY_APP_SECRET_FILE: missing" in _refused(env)
    assert wechatpay.from_env(env | {"TAPSHARE_WECHATPAY_CHANNELS": "h5,native"}).channels == ("h5", "native")
