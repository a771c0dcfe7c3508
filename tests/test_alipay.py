"""The Alipay adapter (cloud/wallet/alipay.py) against the local stand-in of Alipay's gateway
(tests/standins/alipay.py) over real HTTP on loopback: signed requests the stand-in checks as Alipay does, answers
and notifications it signs as Alipay does, its own trade book, refunds and the GBK bill zip."""

from __future__ import annotations

import base64
import json
import threading
import time
import urllib.parse
from datetime import date, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import requests

from cloud.errors import Invalid, ProviderConfigError, Unauthenticated
from cloud.wallet import alipay
from cloud.wallet.payments import CHINA, BillRow, Notification, PayRequest, ProviderError, RefundNotice, RefundRequest
from tests.standins.alipay import AlipayStandIn, default_keys, new_key, private_bytes, public_bytes

DAY_MS = 86_400_000


def now_ms() -> int:
    return time.time_ns() // 1_000_000


@pytest.fixture
def gw():
    with AlipayStandIn(auto_notify=False) as stand_in:
        yield stand_in


@pytest.fixture
def pay(gw, tmp_path) -> alipay.Alipay:
    return alipay.from_env(gw.env(tmp_path / "keys"))


def order(order_id: str, fen: int = 1230, channel: str = "precreate", notify_url: str = "http://127.0.0.1:9/n",
          return_url: str = "https://tapshare.example/app#/wallet?order=x") -> PayRequest:
    return PayRequest(order_id=order_id, amount_fen=fen, description=f"Tapshare 饮水充值 top-up ¥{fen / 100:.2f}",
                      notify_url=notify_url, return_url=return_url, expires_ms=now_ms() + 15 * 60_000,
                      channel=channel)


def paid(gw, pay, order_id: str, fen: int = 1230, at_ms: int | None = None) -> None:
    gw.pay_qr(pay.create(order(order_id, fen)).qr_text, at_ms=at_ms)


# ---------------------------------------------------------------------------------------------- creating


def test_the_wap_address_is_signed_and_the_gateway_takes_it(gw, pay):
    start = pay.create(order("o-wap1", 1230, "wap"))
    assert start.kind == "redirect" and start.url.startswith(gw.gateway + "?")
    q = dict(urllib.parse.parse_qsl(urllib.parse.urlsplit(start.url).query))
    assert (q["method"], q["sign_type"], q["charset"], q["format"], q["version"]) == \
        ("alipay.trade.wap.pay", "RSA2", "utf-8", "JSON", "1.0")
    assert q["app_id"] == gw.app_id and q["notify_url"] == "http://127.0.0.1:9/n"
    assert datetime.strptime(q["timestamp"], "%Y-%m-%d %H:%M:%S")     # China time, as published
    biz = json.loads(q["biz_content"])
    assert biz["out_trade_no"] == "o-wap1" and biz["total_amount"] == "12.30"
    assert biz["product_code"] == "QUICK_WAP_WAY" and biz["quit_url"] == q["return_url"]
    assert biz["subject"].startswith("Tapshare 饮水充值")
    # Alipay has no such trade until the person opens the page
    assert pay.query("o-wap1") is None
    page = requests.get(start.url, timeout=10)
    assert "确认付款" in page.text and "12.30" in page.text
    assert gw.calls[-1].method == "alipay.trade.wap.pay" and gw.calls[-1].sign_ok
    assert pay.query("o-wap1").status == "NOTPAY"
    back = gw.pay_wap(start.url)
    assert back.startswith("https://tapshare.example/app#/wallet?order=x&")
    ret = dict(urllib.parse.parse_qsl(back.split("order=x&", 1)[1]))
    assert ret["method"] == "alipay.trade.wap.pay.return" and ret["out_trade_no"] == "o-wap1"
    content = alipay.sign_content({k: v for k, v in ret.items() if k != "sign_type"})
    assert alipay.rsa2_verify(pay.config.alipay_public_key, content, ret["sign"])   # signed by Alipay
    n = pay.query("o-wap1")
    assert (n.status, n.amount_fen, n.order_id) == ("SUCCESS", 1230, "o-wap1") and n.paid_ms > 0


@pytest.mark.parametrize("field", ["biz_content", "sign"])
def test_a_tampered_wap_address_is_refused_by_the_gateway(gw, pay, field):
    url = pay.create(order("o-wap2", 1230, "wap")).url
    q = dict(urllib.parse.parse_qsl(urllib.parse.urlsplit(url).query))
    if field == "biz_content":
        q["biz_content"] = q["biz_content"].replace('"12.30"', '"0.01"')
    else:
        q["sign"] = base64.b64encode(b"\x01" * 256).decode()
    page = requests.get(gw.gateway + "?" + urllib.parse.urlencode(q), timeout=10)
    assert "invalid-signature" in page.text and "确认付款" not in page.text
    assert not gw.calls[-1].sign_ok and gw.calls[-1].sub_code == "isv.invalid-signature"
    assert "o-wap2" not in gw.trades


def test_precreate_gives_a_qr_code_that_pays(gw, pay):
    start = pay.create(order("o-qr1", 1))
    assert start.kind == "qr" and start.qr_text.startswith(gw.base_url + "/qr/")
    call = gw.calls[-1]
    assert (call.method, call.sign_ok, call.code) == ("alipay.trade.precreate", True, "10000")
    biz = json.loads(call.params["biz_content"])
    assert biz["total_amount"] == "0.01" and biz["product_code"] == "FACE_TO_FACE_PAYMENT"
    assert call.params["notify_url"] == "http://127.0.0.1:9/n"
    assert pay.query("o-qr1") is None                       # as published: the trade exists once scanned
    gw.scan(start.qr_text)
    assert pay.query("o-qr1").status == "NOTPAY"
    gw.pay("o-qr1")
    n = pay.query("o-qr1")
    assert (n.status, n.amount_fen, n.provider_txn_id) == ("SUCCESS", 1, gw.trade("o-qr1").trade_no)


def test_a_channel_not_configured_is_refused(gw, tmp_path):
    only_wap = alipay.from_env(gw.env(tmp_path / "k", TAPSHARE_ALIPAY_CHANNELS="wap"))
    assert only_wap.channels == ("wap",)
    with pytest.raises(ProviderError) as e:
        only_wap.create(order("o-ch", 100, "precreate"))
    assert e.value.code == "unsupported_channel" and not gw.calls


def test_an_answer_with_a_bad_signature_is_not_believed(gw, pay):
    gw.bad_answer_signature = True
    with pytest.raises(ProviderError) as e:
        pay.create(order("o-bad", 500))
    assert e.value.code == "bad_answer_signature" and e.value.retryable
    with pytest.raises(ProviderError) as e:                 # not even "no such trade"
        pay.query("o-never")
    assert e.value.code == "bad_answer_signature"
    with pytest.raises(ProviderError):
        pay.close("o-never")
    gw.bad_answer_signature, gw.unsigned_answers = False, True
    for call in (lambda: pay.query("o-never"), lambda: pay.close("o-never"), lambda: pay.create(order("o-u"))):
        with pytest.raises(ProviderError) as e:             # an unsigned refusal is a refusal, never a fact
            call()
        assert e.value.retryable
    gw.unsigned_answers = False
    assert pay.query("o-never") is None


def test_our_bad_request_signature_is_refused_as_alipay_does(gw, tmp_path):
    wrong = alipay.AlipayConfig.from_env(gw.env(tmp_path / "k"))
    wrong = alipay.AlipayConfig(app_id=wrong.app_id, seller_id=wrong.seller_id, private_key=new_key(),
                                alipay_public_key=wrong.alipay_public_key, gateway=wrong.gateway)
    with pytest.raises(ProviderError) as e:
        alipay.Alipay(wrong).query("o-x")
    assert e.value.code == "isv.invalid-signature" and not e.value.retryable
    assert gw.calls[-1].code == "40002" and not gw.calls[-1].sign_ok


def test_a_gateway_that_cannot_be_reached_is_retryable(gw, tmp_path):
    dead = alipay.from_env(gw.env(tmp_path / "k", TAPSHARE_ALIPAY_GATEWAY="http://127.0.0.1:9/gateway.do"))
    for call in (lambda: dead.query("o-1"), lambda: dead.create(order("o-1")), lambda: dead.bill(date(2026, 1, 1))):
        with pytest.raises(ProviderError) as e:
            call()
        assert (e.value.code, e.value.retryable) == ("unreachable", True)


def test_alipay_system_errors_are_retryable_and_business_refusals_are_not(gw, pay):
    gw.fail_next["alipay.trade.query"] = ("40004", "ACQ.SYSTEM_ERROR")
    with pytest.raises(ProviderError) as e:
        pay.query("o-1")
    assert (e.value.code, e.value.retryable) == ("ACQ.SYSTEM_ERROR", True)
    gw.fail_next["alipay.trade.precreate"] = ("20000", "isp.unknow-error")
    with pytest.raises(ProviderError) as e:
        pay.create(order("o-2"))
    assert e.value.retryable
    with pytest.raises(ProviderError) as e:                 # no such paid trade
        pay.refund(RefundRequest("r-1", "o-nothing", 100, 100, "test", ""))
    assert (e.value.code, e.value.retryable) == ("ACQ.TRADE_NOT_EXIST", False)


# ---------------------------------------------------------------------------------------------- query, close


def test_close_unpaid_true_and_paid_false(gw, pay):
    assert pay.close("o-unknown") is True                   # never opened: nothing to close
    start = pay.create(order("o-c1", 300))
    assert pay.close("o-c1") is True                        # precreated, never scanned
    with pytest.raises(ValueError):
        gw.scan(start.qr_text)                              # and it can no longer be paid
    gw.scan(pay.create(order("o-c2", 300)).qr_text)
    assert pay.close("o-c2") is True
    assert pay.query("o-c2").status == "CLOSED"
    assert pay.close("o-c2") is True                        # closed already
    paid(gw, pay, "o-c3", 300)
    assert pay.close("o-c3") is False
    assert pay.query("o-c3").status == "SUCCESS"


def test_a_query_about_another_order_is_not_believed(gw, pay, monkeypatch):
    paid(gw, pay, "o-q1", 300)
    real = gw._alipay_trade_query
    monkeypatch.setattr(gw, "_alipay_trade_query", lambda biz, params: real(biz, params) | {"out_trade_no": "o-zz"})
    with pytest.raises(ProviderError) as e:
        pay.query("o-q1")
    assert e.value.code == "bad_answer"


# ---------------------------------------------------------------------------------------------- notifications


def test_a_genuine_notification_is_verified(gw, pay):
    paid(gw, pay, "o-n1", 1230)
    n = pay.verify({}, gw.notification("o-n1"), now_ms())
    assert isinstance(n, Notification)
    t = gw.trade("o-n1")
    assert (n.order_id, n.provider_txn_id, n.amount_fen, n.status) == ("o-n1", t.trade_no, 1230, "SUCCESS")
    assert n.paid_ms // 1000 == t.paid_ms // 1000 and n.notification_id
    assert pay.ack(True) == alipay.NotifyAck(200, "text/plain", b"success")
    assert pay.ack(False).body == b"fail" and pay.ack(False).status_code != 200


@pytest.mark.parametrize(("knob", "error", "code"), [
    ({"bad_signature": True}, Unauthenticated, "bad_signature"),
    ({"app_id": "2021004199999999"}, Unauthenticated, "wrong_merchant"),
    ({"seller_id": "2088101999999999"}, Unauthenticated, "wrong_merchant"),
    ({"total_amount": "12.301"}, Invalid, "bad_notification"),
    ({"total_amount": "12.3.0"}, Invalid, "bad_notification"),
    ({"notify_time": "2020-01-01 00:00:00"}, Unauthenticated, "stale_notification"),
    ({"notify_time": "yesterday"}, Invalid, "bad_notification"),
    ({"trade_status": "TRADE_PENDING"}, Invalid, "bad_notification"),
])
def test_a_notification_that_is_not_genuine_or_not_ours_is_refused(gw, pay, knob, error, code):
    paid(gw, pay, "o-n2", 1230)
    with pytest.raises(error) as e:
        pay.verify({}, gw.notification("o-n2", **knob), now_ms())
    assert e.value.code == code


def test_a_changed_field_breaks_the_signature(gw, pay):
    paid(gw, pay, "o-n3", 1230)
    body = gw.notification("o-n3").replace(b"total_amount=12.30", b"total_amount=99.30")
    with pytest.raises(Unauthenticated) as e:
        pay.verify({}, body, now_ms())
    assert e.value.code == "bad_signature"
    for junk in (b"", b"\xff\xfe", b"a=1&a=2", b"sign=x&sign_type=RSA"):
        with pytest.raises((Invalid, Unauthenticated)):
            pay.verify({}, junk, now_ms())


def test_amounts_are_exact(gw, pay):
    for fen in (1, 10, 1230, 50000, 999999):
        paid(gw, pay, f"o-a{fen}", fen)
        assert pay.verify({}, gw.notification(f"o-a{fen}"), now_ms()).amount_fen == fen
    paid(gw, pay, "o-a2", 1230)
    assert pay.verify({}, gw.notification("o-a2", total_amount="12.3"), now_ms()).amount_fen == 1230


def test_a_closed_trade_notification(gw, pay):
    gw.scan(pay.create(order("o-n4", 700)).qr_text)
    pay.close("o-n4")
    n = pay.verify({}, gw.notification("o-n4"), now_ms())
    assert (n.status, n.amount_fen, n.paid_ms) == ("CLOSED", 700, 0)


def test_a_refund_notification_becomes_a_refund_notice_with_this_refunds_amount(gw, pay):
    paid(gw, pay, "o-n5", 1000)
    pay.refund(RefundRequest("r-n5a", "o-n5", 300, 1000, "test", ""))
    pay.refund(RefundRequest("r-n5b", "o-n5", 200, 1000, "test", ""))
    body = gw.notification("o-n5", refund="r-n5b")
    fields = dict(urllib.parse.parse_qsl(body.decode()))
    assert fields["refund_fee"] == "5.00" and fields["out_biz_no"] == "r-n5b"    # the trade's total so far
    notice = pay.verify({}, body, now_ms())
    assert isinstance(notice, RefundNotice)
    assert (notice.refund_id, notice.order_id, notice.amount_fen, notice.status) == ("r-n5b", "o-n5", 200, "SUCCESS")
    assert notice.done_ms > 0
    pay.refund(RefundRequest("r-n5c", "o-n5", 500, 1000, "test", ""))           # the rest: the trade closes
    notice = pay.verify({}, gw.notification("o-n5", refund="r-n5c"), now_ms())
    assert (notice.refund_id, notice.amount_fen, notice.status) == ("r-n5c", 500, "SUCCESS")
    assert dict(urllib.parse.parse_qsl(gw.notification("o-n5", refund="r-n5c").decode()))["trade_status"] == \
        "TRADE_CLOSED"


class _Receiver:
    """Our notification endpoint in miniature: verify, then answer as the adapter says."""

    def __init__(self, provider: alipay.Alipay) -> None:
        self.got: list[Notification | RefundNotice] = []
        self.lock = threading.Lock()
        receiver = self

        class H(BaseHTTPRequestHandler):
            def log_message(self, *a) -> None:
                pass

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                try:
                    n = provider.verify({k.lower(): v for k, v in self.headers.items()}, body, now_ms())
                    with receiver.lock:
                        receiver.got.append(n)
                    ack = provider.ack(True)
                except (Invalid, Unauthenticated) as e:
                    ack = provider.ack(False, e.code)
                self.send_response(ack.status_code)
                self.send_header("Content-Type", ack.media_type)
                self.send_header("Content-Length", str(len(ack.body)))
                self.end_headers()
                self.wfile.write(ack.body)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), H)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/notify/alipay"
        threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def test_notifications_posted_over_http_repeated_and_concurrent(gw, pay):
    rx = _Receiver(pay)
    try:
        gw.scan(pay.create(order("o-h1", 1230, notify_url=rx.url)).qr_text)
        gw.pay("o-h1", notify=False)
        answers = gw.notify("o-h1", repeat=2, interval_s=0.05, concurrent=3)
        assert answers == [(200, "success")] * 6
        assert {(n.order_id, n.amount_fen, n.status) for n in rx.got} == {("o-h1", 1230, "SUCCESS")}
        assert len({n.notification_id for n in rx.got}) == 1 and len(rx.got) == 6     # the same notification
        assert gw.notify("o-h1", bad_signature=True) == [(500, "fail")]
        assert gw.notify("o-h1", seller_id="2088101999999999") == [(500, "fail")]
        assert len(rx.got) == 6
        # Alipay's own delivery after paying, and again after a refund
        gw.auto_notify = True
        gw.scan(pay.create(order("o-h2", 800, notify_url=rx.url)).qr_text)
        gw.pay("o-h2")
        _wait(lambda: any(n.order_id == "o-h2" for n in rx.got))
        pay.refund(RefundRequest("r-h2", "o-h2", 800, 800, "test", ""))
        _wait(lambda: any(isinstance(n, RefundNotice) and n.refund_id == "r-h2" for n in rx.got))
        # the stand-in notes a delivery once it has read the answer, a moment after the receiver took it in
        _wait(lambda: sum(d.order_id == "o-h2" for d in gw.deliveries) == 2)
        assert [(d.kind, d.status, d.body) for d in gw.deliveries if d.order_id == "o-h2"] == \
            [("payment", 200, "success"), ("refund", 200, "success")]
    finally:
        rx.close()


def test_no_notification_mode_sends_nothing(gw, pay):
    gw.auto_notify = False
    gw.scan(pay.create(order("o-h3", 100)).qr_text)
    gw.pay("o-h3")
    time.sleep(0.2)
    assert gw.deliveries == []


def _wait(cond, timeout_s: float = 5.0) -> None:
    end = time.monotonic() + timeout_s
    while not cond():
        if time.monotonic() > end:
            raise AssertionError("timed out")
        time.sleep(0.02)


# ---------------------------------------------------------------------------------------------- refunds


def test_refunds_are_idempotent_and_never_more_than_paid(gw, pay):
    paid(gw, pay, "o-r1", 1000)
    first = pay.refund(RefundRequest("r-1", "o-r1", 400, 1000, "退款 refund", ""))
    assert (first.refund_id, first.order_id, first.amount_fen, first.status) == ("r-1", "o-r1", 400, "SUCCESS")
    assert first.provider_refund_id == gw.trade("o-r1").trade_no and first.done_ms > 0
    again = pay.refund(RefundRequest("r-1", "o-r1", 400, 1000, "退款 refund", ""))   # fund_change N: asked
    assert (again.refund_id, again.amount_fen, again.status) == ("r-1", 400, "SUCCESS")
    assert gw.trade("o-r1").refunded_fen() == 400                                     # refunded once
    calls = [c.method for c in gw.calls][-3:]
    assert calls == ["alipay.trade.refund", "alipay.trade.refund", "alipay.trade.fastpay.refund.query"]
    biz = json.loads(gw.calls[-2].params["biz_content"])
    assert biz == {"out_trade_no": "o-r1", "refund_amount": "4.00", "out_request_no": "r-1",
                   "refund_reason": "退款 refund"}
    with pytest.raises(ProviderError) as e:
        pay.refund(RefundRequest("r-2", "o-r1", 601, 1000, "too much", ""))
    assert (e.value.code, e.value.retryable) == ("ACQ.REFUND_AMT_NOT_EQUAL_TOTAL", False)
    assert pay.refund(RefundRequest("r-2", "o-r1", 600, 1000, "the rest", "")).status == "SUCCESS"
    assert gw.trade("o-r1").refunded_fen() == 1000


def test_query_refund(gw, pay):
    assert pay.query_refund("o-none", "r-none") is None
    paid(gw, pay, "o-r2", 500)
    assert pay.query_refund("o-r2", "r-none") is None
    pay.refund(RefundRequest("r-3", "o-r2", 500, 500, "test", ""))
    q = pay.query_refund("o-r2", "r-3")
    assert (q.refund_id, q.order_id, q.amount_fen, q.status) == ("r-3", "o-r2", 500, "SUCCESS") and q.done_ms > 0


def test_a_refund_not_done_yet_is_processing(gw, pay):
    paid(gw, pay, "o-r3", 500)
    gw.refund_pending = True
    r = pay.refund(RefundRequest("r-4", "o-r3", 200, 500, "test", ""))
    assert (r.status, r.amount_fen) == ("PROCESSING", 200)
    assert pay.query_refund("o-r3", "r-4").status == "PROCESSING"
    gw.finish_refunds()
    assert pay.query_refund("o-r3", "r-4").status == "SUCCESS"


# ---------------------------------------------------------------------------------------------- the bill


def test_the_bill_is_parsed_exactly(gw, pay):
    yesterday = datetime.now(CHINA).date() - timedelta(days=1)
    noon = int(datetime(yesterday.year, yesterday.month, yesterday.day, 12, tzinfo=CHINA).timestamp() * 1000)
    gw.clock_ms = lambda: noon + 3_600_000
    for order_id, fen in (("o-b1", 1), ("o-b2", 1230), ("o-b3", 50000)):
        paid(gw, pay, order_id, fen, at_ms=noon)
    pay.refund(RefundRequest("r-b1", "o-b3", 20000, 50000, "test", ""))
    pay.refund(RefundRequest("r-b2", "o-b2", 1230, 1230, "test", ""))
    paid(gw, pay, "o-b4", 999, at_ms=noon - DAY_MS)          # another day: not in this bill
    rows = pay.bill(yesterday)
    trade = {o: gw.trade(o).trade_no for o in ("o-b1", "o-b2", "o-b3")}
    assert sorted(rows, key=lambda b: (b.kind, b.order_id)) == [
        BillRow("payment", "o-b1", trade["o-b1"], 1, at_ms=noon),
        BillRow("payment", "o-b2", trade["o-b2"], 1230, at_ms=noon),
        BillRow("payment", "o-b3", trade["o-b3"], 50000, at_ms=noon),
        BillRow("refund", "o-b2", trade["o-b2"], 1230, "r-b2", noon + 3_600_000),
        BillRow("refund", "o-b3", trade["o-b3"], 20000, "r-b1", noon + 3_600_000),
    ]
    # the file is as published: GBK, GBK member names, comment lines, refunds negative, padded ids
    import io
    import zipfile
    zf = zipfile.ZipFile(io.BytesIO(gw.bill_zip(yesterday)), metadata_encoding="gbk")
    name = next(n for n in zf.namelist() if n.endswith("_业务明细.csv"))
    text = zf.read(name).decode("gbk")
    assert text.startswith("#支付宝业务明细查询") and "退款批次号/请求号" in text and ",-200.00,-200.00," in text
    assert f"{trade['o-b2']}\t," in text


def test_a_bill_not_out_yet_is_retryable(gw, pay):
    with pytest.raises(ProviderError) as e:
        pay.bill(datetime.now(CHINA).date())                 # today's bill comes out tomorrow
    assert (e.value.code, e.value.retryable) == ("isp.bill_not_exist", True)
    gw.bill_ready = False
    with pytest.raises(ProviderError) as e:
        pay.bill(date(2026, 1, 1))
    assert e.value.retryable
    gw.bill_ready = True
    assert pay.bill(date(2020, 1, 1)) == []                  # a quiet day


def test_a_malformed_bill_is_refused():
    with pytest.raises(ProviderError) as e:
        alipay.parse_bill(b"not a zip")
    assert e.value.code == "bad_bill"


# ---------------------------------------------------------------------------------------------- configuration


def _env(tmp_path, **overrides) -> dict[str, str]:
    stand_in = AlipayStandIn()                              # not started: only its keys and ids
    env = stand_in.env(tmp_path / "keys", **overrides)
    env["TAPSHARE_ALIPAY_GATEWAY"] = overrides.get("TAPSHARE_ALIPAY_GATEWAY", "https://openapi.alipay.com/gateway.do")
    return env


def _secrets() -> list[str]:
    keys = default_keys()
    pems = [private_bytes(keys.app, f).decode() for f in ("pkcs8", "pkcs1", "base64")]
    pems.append(public_bytes(keys.alipay.public_key(), "base64").decode())
    # any 40-character run of the key bodies must not appear in a message
    return [line[:40] for pem in pems for line in pem.splitlines() if len(line) >= 40]


def _refused(env) -> str:
    with pytest.raises(ProviderConfigError) as e:
        alipay.from_env(env)
    message = str(e.value)
    assert not any(s in message for s in _secrets())
    return message


@pytest.mark.parametrize(("private_form", "public_form"), [("pkcs8", "pem"), ("pkcs1", "pem"),
                                                           ("base64", "base64")])
def test_config_takes_the_published_key_forms(gw, tmp_path, private_form, public_form):
    env = gw.env(tmp_path, private_form=private_form, public_form=public_form)
    p = alipay.from_env(env)
    assert (p.name, p.is_development, p.channels, p.refund_window_days) == ("alipay", False, ("wap", "precreate"), 365)
    assert p.config.gateway.startswith("http://127.0.0.1")
    assert "PRIVATE" not in repr(p.config) and "private_key" not in repr(p.config)
    assert alipay.AlipayConfig.from_env({**env, "TAPSHARE_ALIPAY_GATEWAY": ""}).gateway == alipay.DEFAULT_GATEWAY
    assert p.query("o-none") is None                        # the keys work both ways


def test_config_missing_ids_and_files_are_named_all_at_once(tmp_path):
    message = _refused({})
    for var in ("TAPSHARE_ALIPAY_APP_ID", "TAPSHARE_ALIPAY_SELLER_ID", "TAPSHARE_ALIPAY_PRIVATE_KEY_FILE",
                "TAPSHARE_ALIPAY_PUBLIC_KEY_FILE"):
        assert var in message
    message = _refused(_env(tmp_path, TAPSHARE_ALIPAY_APP_ID="abc", TAPSHARE_ALIPAY_SELLER_ID="1234567890123456",
                            TAPSHARE_ALIPAY_CHANNELS="wap,jsapi", TAPSHARE_ALIPAY_REFUND_WINDOW_DAYS="forever",
                            TAPSHARE_ALIPAY_GATEWAY="http://openapi.alipay.com/gateway.do"))
    for var in ("TAPSHARE_ALIPAY_APP_ID", "TAPSHARE_ALIPAY_SELLER_ID", "TAPSHARE_ALIPAY_CHANNELS",
                "TAPSHARE_ALIPAY_REFUND_WINDOW_DAYS", "TAPSHARE_ALIPAY_GATEWAY"):
        assert var in message
    assert "KEY_FILE" not in message


def test_config_unreadable_key_file(tmp_path):
    message = _refused(_env(tmp_path, TAPSHARE_ALIPAY_PRIVATE_KEY_FILE=str(tmp_path / "nowhere.pem")))
    assert "TAPSHARE_ALIPAY_PRIVATE_KEY_FILE: cannot read" in message and "PUBLIC_KEY_FILE" not in message


def test_config_keys_that_do_not_parse_or_do_not_fit(tmp_path):
    keys = default_keys()
    good = _env(tmp_path)
    bad = tmp_path / "bad.pem"
    pem = private_bytes(keys.app).decode()
    bad.write_text(pem[:200] + "AAAA" + pem[204:])                           # a damaged key
    message = _refused({**good, "TAPSHARE_ALIPAY_PRIVATE_KEY_FILE": str(bad)})
    assert "TAPSHARE_ALIPAY_PRIVATE_KEY_FILE" in message and "does not parse" in message
    small = tmp_path / "small.pem"
    small.write_bytes(private_bytes(new_key(1024)))
    assert "1024 bits" in _refused({**good, "TAPSHARE_ALIPAY_PRIVATE_KEY_FILE": str(small)})
    swapped = {**good, "TAPSHARE_ALIPAY_PUBLIC_KEY_FILE": good["TAPSHARE_ALIPAY_PRIVATE_KEY_FILE"]}
    assert "TAPSHARE_ALIPAY_PUBLIC_KEY_FILE" in (m := _refused(swapped)) and "private key" in m
    own = tmp_path / "app_public.pem"
    own.write_bytes(public_bytes(keys.app.public_key()))
    assert "应用公钥" in _refused({**good, "TAPSHARE_ALIPAY_PUBLIC_KEY_FILE": str(own)})
    garbage = tmp_path / "garbage.txt"
    garbage.write_text("MIIB this is not a key")
    assert "TAPSHARE_ALIPAY_PUBLIC_KEY_FILE" in _refused({**good, "TAPSHARE_ALIPAY_PUBLIC_KEY_FILE": str(garbage)})
