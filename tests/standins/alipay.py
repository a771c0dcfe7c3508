"""A local stand-in of Alipay's open-platform gateway (支付宝开放平台), written from Alipay's published formats, for
tests over real HTTP on loopback. It is not a mock of our adapter: it checks requests and signs answers and
notifications as Alipay publishes, and keeps its own trade book.

* ``POST /gateway.do`` (and GET): the API. Every request's RSA2 signature is checked with the app's public key
  (all parameters but ``sign`` and the empty ones, sorted, ``k=v`` joined with ``&``, SHA256withRSA); a bad
  one is answered ``code 40002, sub_code isv.invalid-signature`` as Alipay does; ``app_id`` must be the app's.
  Answers have the published layout ``{"alipay_trade_query_response": {...}, "sign": "..."}``, the signature
  covering the raw JSON text of the ``…_response`` value, made with Alipay's key. Methods:
  alipay.trade.precreate / query / close / refund / fastpay.refund.query and
  alipay.data.dataservice.bill.downloadurl.query.
* ``GET /gateway.do?method=alipay.trade.wap.pay&…``: the WAP pay page the person's browser opens (signature
  checked; a bad one shows Alipay's error page). The trade exists from then on; its "确认付款" button pays and
  goes to return_url with the published signed return parameters (method alipay.trade.wap.pay.return, …).
* A precreate answers a ``qr_code`` (``<base>/qr/<code>``); as Alipay publishes, the trade only exists once
  the QR code is scanned (``scan``, or opening that address); before that a query says ACQ.TRADE_NOT_EXIST,
  and closing it then stops the code from being paid.
* After a payment (and after a refund that moved money) it posts the trade notification form-encoded to
  notify_url, signed as Alipay does (all fields but sign and sign_type, sorted), until it reads ``success``.
* Refunds are idempotent by out_request_no (a repeat answers ``fund_change N`` and refunds nothing) and never
  more than the unrefunded amount. Bills: a zip with the GBK ``…_业务明细.csv`` (``#`` comment lines, Chinese
  header, tab-padded ids; refunds negative), downloadable for 30 s; ``bill_ready = False`` answers
  ``isp.bill_not_exist``.

For tests: :func:`make_keys` / :meth:`AlipayStandIn.env` (key files and TAPSHARE_ALIPAY_* for ``from_env``),
:meth:`~AlipayStandIn.pay`, :meth:`~AlipayStandIn.pay_wap`, :meth:`~AlipayStandIn.scan`,
:meth:`~AlipayStandIn.notify` / :meth:`~AlipayStandIn.notification` with knobs, ``calls`` and ``deliveries``.
"""

from __future__ import annotations

import base64
import html
import io
import json
import secrets
import threading
import time
import urllib.parse
import zipfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta, timezone
from decimal import ROUND_HALF_UP, Decimal
from functools import lru_cache
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import requests
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa

CHINA = timezone(timedelta(hours=8))
APP_ID = "2021004100000001"
SELLER_ID = "2088101000000001"
TIMESTAMP_WINDOW_MS = 30 * 60_000           # Alipay: a request expires 30 minutes after its timestamp
BILL_URL_TTL_S = 30                          # Alipay: the download address is good for 30 seconds

METHODS = ("alipay.trade.precreate", "alipay.trade.query", "alipay.trade.close", "alipay.trade.refund",
           "alipay.trade.fastpay.refund.query", "alipay.data.dataservice.bill.downloadurl.query")


# ---------------------------------------------------------------------------------------------- keys


@dataclass(frozen=True)
class Keys:
    app: rsa.RSAPrivateKey          # the app's key pair: we sign with it, Alipay holds its public half
    alipay: rsa.RSAPrivateKey       # Alipay's key pair: Alipay signs with it, we hold its public half

    def write(self, directory: Path, private_form: str = "pkcs8", public_form: str = "pem") -> tuple[Path, Path]:
        """The app's private key (``pkcs8``, ``pkcs1`` PEM or ``base64`` bare DER as Alipay's key tool writes)
        and Alipay's public key (``pem`` or ``base64``) as files; returns their paths."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        priv, pub = directory / "app_private_key.pem", directory / "alipay_public_key.pem"
        priv.write_bytes(private_bytes(self.app, private_form))
        pub.write_bytes(public_bytes(self.alipay.public_key(), public_form))
        priv.chmod(0o600)
        return priv, pub


def new_key(bits: int = 2048) -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=bits)


def make_keys(bits: int = 2048) -> Keys:
    return Keys(app=new_key(bits), alipay=new_key(bits))


@lru_cache(maxsize=1)
def default_keys() -> Keys:
    """One pair of 2048-bit key pairs per test process (generating them takes a moment)."""
    return make_keys()


def private_bytes(key: rsa.RSAPrivateKey, form: str = "pkcs8") -> bytes:
    if form == "pkcs1":
        return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL,
                                 serialization.NoEncryption())
    der_or_pem = key.private_bytes(serialization.Encoding.DER if form == "base64" else serialization.Encoding.PEM,
                                   serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    return base64.b64encode(der_or_pem) + b"\n" if form == "base64" else der_or_pem


def public_bytes(key: rsa.RSAPublicKey, form: str = "pem") -> bytes:
    if form == "base64":
        return base64.b64encode(key.public_bytes(serialization.Encoding.DER,
                                                 serialization.PublicFormat.SubjectPublicKeyInfo)) + b"\n"
    return key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


def sign(key: rsa.RSAPrivateKey, content: str) -> str:
    return base64.b64encode(key.sign(content.encode("utf-8"), padding.PKCS1v15(), hashes.SHA256())).decode()


def verify(key: rsa.RSAPublicKey, content: str, signature: str) -> bool:
    try:
        key.verify(base64.b64decode(signature, validate=True), content.encode("utf-8"), padding.PKCS1v15(),
                   hashes.SHA256())
    except (InvalidSignature, ValueError):
        return False
    return True


def request_content(params: dict[str, str]) -> str:
    """What an app signs (自行实现签名): all but ``sign`` and the empty values, sorted, ``k=v`` with ``&``."""
    return "&".join(f"{k}={params[k]}" for k in sorted(params) if k != "sign" and params[k] != "")


def notify_content(params: dict[str, str]) -> str:
    """What Alipay signs in a notification or return: all but ``sign`` and ``sign_type``, sorted."""
    return "&".join(f"{k}={params[k]}" for k in sorted(params) if k not in ("sign", "sign_type"))


# ---------------------------------------------------------------------------------------------- the book


def _yuan(fen: int) -> str:
    sign_ = "-" if fen < 0 else ""
    fen = abs(fen)
    return f"{sign_}{fen // 100}.{fen % 100:02d}"


def _fen(text: Any) -> int | None:
    if not isinstance(text, str) or not text or text.count(".") > 1:
        return None
    whole, _, frac = text.partition(".")
    if not whole.isdigit() or len(frac) > 2 or (frac and not frac.isdigit()):
        return None
    return int(Decimal(text) * 100)


def _ctime(ms: int, millis: bool = False) -> str:
    at = datetime.fromtimestamp(ms / 1000, CHINA)
    return at.strftime("%Y-%m-%d %H:%M:%S") + (f".{ms % 1000:03d}" if millis else "")


def _parse_ctime(text: str) -> int | None:
    try:
        return int(datetime.strptime(text, "%Y-%m-%d %H:%M:%S").replace(tzinfo=CHINA).timestamp() * 1000)
    except (TypeError, ValueError):
        return None


@dataclass
class Refund:
    out_request_no: str
    amount_fen: int
    reason: str
    requested_ms: int
    done_ms: int = 0                # 0: accepted, not done yet (refund_pending)


@dataclass
class Trade:
    out_trade_no: str
    amount_fen: int
    subject: str
    channel: str                    # wap, precreate
    notify_url: str
    return_url: str
    quit_url: str
    expires_ms: int
    created_ms: int
    trade_no: str
    state: str = "WAIT_BUYER_PAY"   # WAIT_BUYER_PAY, TRADE_SUCCESS, TRADE_CLOSED
    exists: bool = False            # opened (WAP) or scanned (QR): only then does Alipay know the trade
    locked: bool = False            # closed before it existed: it can no longer be paid
    qr_code: str = ""
    paid_ms: int = 0
    closed_ms: int = 0
    buyer_id: str = "2088102177846880"
    buyer_logon_id: str = "159****5620"
    refunds: dict[str, Refund] = field(default_factory=dict)

    def refunded_fen(self) -> int:
        return sum(r.amount_fen for r in self.refunds.values())


@dataclass
class Call:
    """One request the gateway received: its method, parameters (``sign`` left out), whether the signature
    checked, and the code / sub_code it was answered with."""

    method: str
    params: dict[str, str]
    sign_ok: bool
    code: str = ""
    sub_code: str = ""


@dataclass
class Delivery:
    order_id: str
    url: str
    kind: str                       # payment, refund, crafted
    status: int                     # 0: not delivered (network)
    body: str


class _Refusal(Exception):
    def __init__(self, code: str, msg: str, sub_code: str = "", sub_msg: str = "", signed: bool = True) -> None:
        super().__init__(sub_code or code)
        self.node = {"code": code, "msg": msg} | ({"sub_code": sub_code, "sub_msg": sub_msg} if sub_code else {})
        self.signed = signed


def _business(sub_code: str, sub_msg: str) -> _Refusal:
    return _Refusal("40004", "Business Failed", sub_code, sub_msg)


# ---------------------------------------------------------------------------------------------- the stand-in


class AlipayStandIn:
    """Alipay's gateway on ``127.0.0.1``. Use as a context manager (or ``start()`` / ``stop()``); ``gateway`` is
    the address to configure (TAPSHARE_ALIPAY_GATEWAY), :meth:`env` writes the key files and gives the whole
    environment for ``from_env``.

    Knobs: ``auto_notify`` (False: no notification is sent by itself), ``notify_delays_s`` (the first
    notification's delay, then the retries while the answer is not ``success``), ``bill_ready``,
    ``bad_answer_signature`` (answers signed with the wrong key), ``unsigned_answers`` (no ``sign`` at all),
    ``refund_pending`` (refunds accepted but not done until :meth:`finish_refunds`), ``fail_next``
    (``{method: (code, sub_code)}`` answered once), ``clock_ms`` (the book's time: payments, refunds; requests'
    timestamps are checked against the real time)."""

    def __init__(self, *, app_id: str = APP_ID, seller_id: str = SELLER_ID, keys: Keys | None = None,
                 auto_notify: bool = True, notify_delays_s: tuple[float, ...] = (0.05, 0.5, 2.0)) -> None:
        self.app_id, self.seller_id = app_id, seller_id
        self.keys = keys or default_keys()
        self.auto_notify = auto_notify
        self.notify_delays_s = notify_delays_s
        self.bill_ready = True
        self.bad_answer_signature = False
        self.unsigned_answers = False
        self.refund_pending = False
        self.fail_next: dict[str, tuple[str, str]] = {}
        self.clock_ms = lambda: time.time_ns() // 1_000_000
        self.trades: dict[str, Trade] = {}
        self.calls: list[Call] = []
        self.deliveries: list[Delivery] = []
        self._qr: dict[str, str] = {}                   # qr code -> out_trade_no
        self._bills: dict[str, tuple[float, bytes]] = {}
        self._lock = threading.RLock()
        self._server: ThreadingHTTPServer | None = None
        self._threads: list[threading.Thread] = []
        self.base_url = ""

    # ------------------------------------------------------------------ life

    def start(self) -> AlipayStandIn:
        stand_in = self

        class Handler(_Handler):
            owner = stand_in

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.base_url = f"http://127.0.0.1:{self._server.server_address[1]}"
        t = threading.Thread(target=self._server.serve_forever, args=(0.05,), name="alipay-standin", daemon=True)
        t.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        for t in list(self._threads):
            t.join(timeout=5)

    def __enter__(self) -> AlipayStandIn:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def gateway(self) -> str:
        return self.base_url + "/gateway.do"

    def env(self, directory: Path, *, private_form: str = "pkcs8", public_form: str = "pem",
            **overrides: str) -> dict[str, str]:
        """Write the app's private key and Alipay's public key under ``directory`` and return the
        TAPSHARE_ALIPAY_* variables pointing at them and at this gateway (``overrides`` replace any)."""
        priv, pub = self.keys.write(Path(directory), private_form, public_form)
        return {"TAPSHARE_ALIPAY_APP_ID": self.app_id, "TAPSHARE_ALIPAY_SELLER_ID": self.seller_id,
                "TAPSHARE_ALIPAY_PRIVATE_KEY_FILE": str(priv), "TAPSHARE_ALIPAY_PUBLIC_KEY_FILE": str(pub),
                "TAPSHARE_ALIPAY_GATEWAY": self.gateway} | overrides

    # ------------------------------------------------------------------ what people do

    def trade(self, order_id: str) -> Trade:
        with self._lock:
            return self.trades[order_id]

    def pay_wap(self, url: str) -> str:
        """A person opens the WAP pay address and presses 确认付款, over HTTP; returns where Alipay sends the
        browser next (return_url with the signed return parameters)."""
        page = requests.get(url, timeout=10)
        page.raise_for_status()
        marker = 'name="trade_no" value="'
        if marker not in page.text:
            raise AssertionError(f"no pay button on Alipay's page: {page.text[:300]}")
        trade_no = page.text.split(marker, 1)[1].split('"', 1)[0]
        r = requests.post(self.base_url + "/wap/pay", data={"trade_no": trade_no}, allow_redirects=False,
                          timeout=10)
        if r.status_code != 303:
            raise AssertionError(f"paying failed: {r.status_code} {r.text[:300]}")
        return r.headers["Location"]

    def scan(self, qr_text: str) -> Trade:
        """A person scans a precreate QR code with the Alipay app: the trade exists from now on."""
        code = qr_text.rsplit("/", 1)[-1]
        with self._lock:
            order_id = self._qr.get(code)
            if order_id is None:
                raise KeyError(f"unknown QR code {qr_text}")
            t = self._fresh(self.trades[order_id])
            if t.locked:
                raise ValueError("支付失败，本笔交易已关闭 (closed before it was scanned)")
            t.exists = True
            return t

    def pay_qr(self, qr_text: str, at_ms: int | None = None) -> Trade:
        """Scan and pay a precreate QR code."""
        return self.pay(self.scan(qr_text).out_trade_no, at_ms=at_ms)

    def pay(self, order_id: str, *, at_ms: int | None = None, notify: bool | None = None) -> Trade:
        """The person pays (a WAP page already opened, or a QR code: scanned here if not yet). Sends the
        notification unless ``notify`` (default ``auto_notify``) is False."""
        with self._lock:
            t = self.trades.get(order_id)
            if t is None:
                raise KeyError(f"Alipay knows no trade {order_id} (a WAP page must be opened first)")
            t = self._fresh(t)
            if t.locked or t.state == "TRADE_CLOSED":
                raise ValueError("交易已关闭 (the trade is closed)")
            if t.state == "WAIT_BUYER_PAY":
                t.exists, t.state, t.paid_ms = True, "TRADE_SUCCESS", at_ms or self.clock_ms()
                fresh = True
            else:
                fresh = False
        if fresh and (self.auto_notify if notify is None else notify):
            self._send_later(t, self._notify_params(t), "payment")
        return t

    def finish_refunds(self) -> None:
        """Refunds accepted while ``refund_pending`` are done now (and notified)."""
        with self._lock:
            done = [(t, r) for t in self.trades.values() for r in t.refunds.values() if not r.done_ms]
            for _t, r in done:
                r.done_ms = self.clock_ms()
        for t, r in done:
            if self.auto_notify:
                self._send_later(t, self._notify_params(t, refund=r.out_request_no), "refund")

    # ------------------------------------------------------------------ notifications

    def notification(self, order_id: str, *, refund: str | None = None, bad_signature: bool = False,
                     app_id: str | None = None, seller_id: str | None = None, total_amount: str | None = None,
                     notify_time_ms: int | None = None, **fields: str) -> bytes:
        """The form-encoded body Alipay posts about ``order_id`` now (a refund's if ``refund`` names an
        out_request_no), signed as Alipay does; the knobs change a field and still sign it with Alipay's key,
        except ``bad_signature`` (signed with another key). ``fields`` set further fields."""
        with self._lock:
            t = self._fresh(self.trades[order_id])
            params = self._notify_params(t, refund=refund, notify_time_ms=notify_time_ms)
        params |= {k: v for k, v in (("app_id", app_id), ("auth_app_id", app_id), ("seller_id", seller_id),
                                     ("total_amount", total_amount)) if v is not None} | fields
        params.pop("sign", None)
        params["sign"] = sign(self.keys.app if bad_signature else self.keys.alipay, notify_content(params))
        return urllib.parse.urlencode(params).encode("ascii")

    def notify(self, order_id: str, *, url: str | None = None, refund: str | None = None,
               bad_signature: bool = False, app_id: str | None = None, seller_id: str | None = None,
               total_amount: str | None = None, repeat: int = 1, interval_s: float = 1.0, concurrent: int = 1,
               **fields: str) -> list[tuple[int, str]]:
        """Post the notification (see :meth:`notification`) to ``url`` (default: the trade's notify_url),
        ``repeat`` times ``interval_s`` apart, ``concurrent`` copies at once each time, as Alipay's retries do
        (the same notify_id); returns every HTTP answer (status, body text)."""
        body = self.notification(order_id, refund=refund, bad_signature=bad_signature, app_id=app_id,
                                 seller_id=seller_id, total_amount=total_amount, **fields)
        target = url or self.trade(order_id).notify_url
        answers: list[tuple[int, str]] = []
        for i in range(repeat):
            if i:
                time.sleep(interval_s)
            with ThreadPoolExecutor(max_workers=concurrent) as ex:
                answers += list(ex.map(lambda _: self._post(order_id, target, body, "crafted"), range(concurrent)))
        return answers

    def _notify_params(self, t: Trade, refund: str | None = None, notify_time_ms: int | None = None
                       ) -> dict[str, str]:
        now = self.clock_ms()
        amount = _yuan(t.amount_fen)
        p = {"gmt_create": _ctime(t.created_ms), "charset": "utf-8", "seller_email": "tapshare@example.com",
             "subject": t.subject, "buyer_id": t.buyer_id, "invoice_amount": amount,
             "notify_id": "2026" + secrets.token_hex(15), "fund_bill_list": json.dumps(
                 [{"amount": amount, "fundChannel": "ALIPAYACCOUNT"}], separators=(",", ":")),
             "notify_type": "trade_status_sync", "trade_status": t.state, "receipt_amount": amount,
             "buyer_pay_amount": amount, "app_id": self.app_id, "sign_type": "RSA2", "seller_id": self.seller_id,
             "notify_time": _ctime(notify_time_ms if notify_time_ms is not None else now), "version": "1.0",
             "out_trade_no": t.out_trade_no, "total_amount": amount, "trade_no": t.trade_no,
             "auth_app_id": self.app_id, "buyer_logon_id": t.buyer_logon_id, "point_amount": "0.00"}
        if t.paid_ms:
            p["gmt_payment"] = _ctime(t.paid_ms)
        if refund is not None:
            r = t.refunds[refund]
            done = [x for x in t.refunds.values() if x.done_ms]
            p |= {"out_biz_no": refund, "refund_fee": _yuan(sum(x.amount_fen for x in done)),
                  "gmt_refund": _ctime(r.done_ms or now, millis=True)}
            if t.state == "TRADE_CLOSED":
                p["gmt_close"] = _ctime(t.closed_ms or now)
        p["sign"] = sign(self.keys.alipay, notify_content(p))
        return p

    def _post(self, order_id: str, url: str, body: bytes, kind: str) -> tuple[int, str]:
        try:
            r = requests.post(url, data=body, timeout=10,
                              headers={"Content-Type": "application/x-www-form-urlencoded; charset=utf-8"})
            answer = (r.status_code, r.text)
        except requests.RequestException:
            answer = (0, "")
        with self._lock:
            self.deliveries.append(Delivery(order_id, url, kind, *answer))
        return answer

    def _send_later(self, t: Trade, params: dict[str, str], kind: str) -> None:
        if not t.notify_url:
            return
        body = urllib.parse.urlencode(params).encode("ascii")

        def run() -> None:
            for delay in self.notify_delays_s:
                time.sleep(delay)
                status, text = self._post(t.out_trade_no, t.notify_url, body, kind)
                if status == 200 and text == "success":
                    return

        th = threading.Thread(target=run, name=f"alipay-notify-{t.out_trade_no}", daemon=True)
        self._threads = [x for x in self._threads if x.is_alive()] + [th]
        th.start()

    # ------------------------------------------------------------------ the gateway

    def _fresh(self, t: Trade) -> Trade:
        """An unpaid trade past its time_expire is closed."""
        if t.state == "WAIT_BUYER_PAY" and t.expires_ms and self.clock_ms() > t.expires_ms:
            t.state, t.closed_ms = "TRADE_CLOSED", t.expires_ms
        return t

    def _check(self, params: dict[str, str], method: str) -> None:
        """The gateway's checks of the common parameters and the signature, in Alipay's codes."""
        if not params.get("app_id"):
            raise _Refusal("40001", "Missing Required Arguments", "isv.missing-app-id", "缺少AppID参数", False)
        if params["app_id"] != self.app_id:
            raise _Refusal("40002", "Invalid Arguments", "isv.invalid-app-id", "无效的AppID参数", False)
        if not params.get("sign"):
            raise _Refusal("40001", "Missing Required Arguments", "isv.missing-signature", "缺少签名参数")
        if params.get("sign_type") != "RSA2":
            raise _Refusal("40002", "Invalid Arguments", "isv.invalid-signature-type", "无效的签名类型参数")
        if (params.get("charset") or "").lower() != "utf-8":
            raise _Refusal("40002", "Invalid Arguments", "isv.invalid-charset", "字符集错误")
        if params.get("version") != "1.0" or params.get("format", "JSON").upper() != "JSON":
            raise _Refusal("40002", "Invalid Arguments", "isv.invalid-parameter", "version / format")
        ts = _parse_ctime(params.get("timestamp", ""))
        if ts is None or abs(time.time() * 1000 - ts) > TIMESTAMP_WINDOW_MS:
            raise _Refusal("40002", "Invalid Arguments", "isv.invalid-timestamp", "非法的时间戳参数")
        content = request_content(params)
        if not verify(self.keys.app.public_key(), content, params["sign"]):
            raise _Refusal("40002", "Invalid Arguments", "isv.invalid-signature",
                           "验签出错，建议检查签名字符串或签名私钥与应用公钥是否匹配，"
                           "网关生成的验签字符串为：" + content)

    def _biz(self, params: dict[str, str]) -> dict[str, Any]:
        try:
            biz = json.loads(params.get("biz_content") or "{}")
        except ValueError:
            raise _Refusal("40002", "Invalid Arguments", "isv.invalid-parameter", "biz_content 不是 JSON") from None
        if not isinstance(biz, dict):
            raise _Refusal("40002", "Invalid Arguments", "isv.invalid-parameter", "biz_content 不是 JSON 对象")
        return biz

    def api(self, params: dict[str, str]) -> tuple[str, bytes]:
        """One API request (parameters from the query string and the form body): the answer's JSON text."""
        method = params.get("method", "")
        call = Call(method, {k: v for k, v in params.items() if k != "sign"}, False)
        node_name = method.replace(".", "_") + "_response" if method in METHODS else "error_response"
        try:
            if method not in METHODS:
                raise _Refusal("40002", "Invalid Arguments", "isv.invalid-method", "不存在的方法名", False)
            self._check(params, method)
            call.sign_ok = True
            failure = self.fail_next.pop(method, None)
            if failure is not None:
                code, sub_code = failure
                raise _Refusal(code, "Service Currently Unavailable" if code == "20000" else "Business Failed",
                               sub_code, "系统繁忙")
            biz = self._biz(params)
            with self._lock:
                node = {"code": "10000", "msg": "Success"} | getattr(self, "_" + method.replace(".", "_"))(
                    biz, params)
            signed = True
        except _Refusal as r:
            node, signed = r.node, r.signed
        call.code, call.sub_code = node["code"], node.get("sub_code", "")
        with self._lock:
            self.calls.append(call)
        raw = json.dumps(node, ensure_ascii=False, separators=(",", ":"))
        text = '{"' + node_name + '":' + raw
        if signed and not self.unsigned_answers:
            key = self.keys.app if self.bad_answer_signature else self.keys.alipay
            text += ',"sign":"' + sign(key, raw) + '"'
        return "text/html;charset=utf-8", (text + "}").encode("utf-8")

    def _order_fields(self, biz: dict[str, Any], params: dict[str, str], channel: str) -> dict[str, Any]:
        order_id = biz.get("out_trade_no")
        amount = _fen(biz.get("total_amount"))
        if not isinstance(order_id, str) or not order_id or len(order_id) > 64:
            raise _Refusal("40002", "Invalid Arguments", "isv.missing-parameter", "缺少必选参数 out_trade_no")
        if amount is None or not 1 <= amount <= 10_000_000_000:
            raise _Refusal("40002", "Invalid Arguments", "isv.invalid-parameter", "total_amount 无效")
        if not biz.get("subject"):
            raise _Refusal("40002", "Invalid Arguments", "isv.missing-parameter", "缺少必选参数 subject")
        expires = _parse_ctime(biz.get("time_expire", "")) if biz.get("time_expire") else 0
        if expires is None:
            raise _Refusal("40002", "Invalid Arguments", "isv.invalid-parameter", "time_expire 格式错误")
        return {"out_trade_no": order_id, "amount_fen": amount, "subject": str(biz["subject"]), "channel": channel,
                "notify_url": params.get("notify_url", ""), "return_url": params.get("return_url", ""),
                "quit_url": str(biz.get("quit_url") or ""), "expires_ms": expires}

    def _new_trade(self, fields: dict[str, Any]) -> Trade:
        known = self.trades.get(fields["out_trade_no"])
        if known is not None:
            if (known.amount_fen, known.subject) != (fields["amount_fen"], fields["subject"]):
                raise _business("ACQ.CONTEXT_INCONSISTENT", "交易信息被篡改")
            return self._fresh(known)
        now = self.clock_ms()
        trade_no = datetime.fromtimestamp(now / 1000, CHINA).strftime("%Y%m%d") + "22001" + \
            "".join(secrets.choice("0123456789") for _ in range(15))
        t = Trade(**fields, created_ms=now, trade_no=trade_no)
        self.trades[t.out_trade_no] = t
        return t

    def _known(self, biz: dict[str, Any]) -> Trade:
        t = self.trades.get(str(biz.get("out_trade_no") or ""))
        if t is None or not t.exists:
            raise _business("ACQ.TRADE_NOT_EXIST", "交易不存在")
        return self._fresh(t)

    def _alipay_trade_precreate(self, biz: dict[str, Any], params: dict[str, str]) -> dict[str, Any]:
        t = self._new_trade(self._order_fields(biz, params, "precreate"))
        if t.state != "WAIT_BUYER_PAY" or t.locked:
            raise _business("ACQ.TRADE_HAS_CLOSE" if t.state != "TRADE_SUCCESS" else "ACQ.TRADE_HAS_SUCCESS",
                            "交易已关闭" if t.state != "TRADE_SUCCESS" else "交易已被支付")
        if not t.qr_code:
            code = "bax" + secrets.token_hex(11)
            t.qr_code = f"{self.base_url}/qr/{code}"
            self._qr[code] = t.out_trade_no
        return {"out_trade_no": t.out_trade_no, "qr_code": t.qr_code}

    def _alipay_trade_query(self, biz: dict[str, Any], params: dict[str, str]) -> dict[str, Any]:
        t = self._known(biz)
        amount = _yuan(t.amount_fen)
        out = {"trade_no": t.trade_no, "out_trade_no": t.out_trade_no, "buyer_logon_id": t.buyer_logon_id,
               "trade_status": t.state, "total_amount": amount, "buyer_user_id": t.buyer_id}
        if t.paid_ms:
            out |= {"buyer_pay_amount": amount, "point_amount": "0.00", "invoice_amount": amount,
                    "receipt_amount": amount, "send_pay_date": _ctime(t.paid_ms)}
        return out

    def _alipay_trade_close(self, biz: dict[str, Any], params: dict[str, str]) -> dict[str, Any]:
        t = self.trades.get(str(biz.get("out_trade_no") or ""))
        if t is not None and not t.exists:
            t.locked = True                 # closed before the page was opened / the code scanned
        t = self._known(biz)
        if t.state != "WAIT_BUYER_PAY":
            raise _business("ACQ.TRADE_STATUS_ERROR", "交易状态不合法")
        t.state, t.closed_ms = "TRADE_CLOSED", self.clock_ms()
        return {"trade_no": t.trade_no, "out_trade_no": t.out_trade_no}

    def _alipay_trade_refund(self, biz: dict[str, Any], params: dict[str, str]) -> dict[str, Any]:
        t = self._known(biz)
        amount = _fen(biz.get("refund_amount"))
        request_no = str(biz.get("out_request_no") or t.out_trade_no)
        if amount is None or amount <= 0:
            raise _Refusal("40002", "Invalid Arguments", "isv.invalid-parameter", "refund_amount 无效")
        known = t.refunds.get(request_no)
        if known is not None:
            if known.amount_fen != amount:
                raise _business("ACQ.DISCORDANT_REPEAT_REQUEST", "再次请求参数与原请求不一致")
            fund_change, r = "N", known                     # a repeat: refunds nothing again
        else:
            if t.paid_ms == 0:
                raise _business("ACQ.TRADE_STATUS_ERROR", "交易状态不合法")
            if amount > t.amount_fen - t.refunded_fen():
                raise _business("ACQ.REFUND_AMT_NOT_EQUAL_TOTAL", "退款金额超限")
            now = self.clock_ms()
            r = Refund(request_no, amount, str(biz.get("refund_reason") or ""), now,
                       done_ms=0 if self.refund_pending else now)
            t.refunds[request_no] = r
            fund_change = "N" if self.refund_pending else "Y"
            if t.refunded_fen() == t.amount_fen and not self.refund_pending:
                t.state, t.closed_ms = "TRADE_CLOSED", now
            if fund_change == "Y" and self.auto_notify:
                self._send_later(t, self._notify_params(t, refund=request_no), "refund")
        done = sum(x.amount_fen for x in t.refunds.values() if x.done_ms)
        out = {"trade_no": t.trade_no, "out_trade_no": t.out_trade_no, "buyer_logon_id": t.buyer_logon_id,
               "fund_change": fund_change, "refund_fee": _yuan(done), "buyer_user_id": t.buyer_id}
        if r.done_ms:
            out["gmt_refund_pay"] = _ctime(r.done_ms)
        return out

    def _alipay_trade_fastpay_refund_query(self, biz: dict[str, Any], params: dict[str, str]) -> dict[str, Any]:
        t = self._known(biz)
        r = t.refunds.get(str(biz.get("out_request_no") or ""))
        if r is None:
            return {}                       # code 10000 and nothing more: no such refund
        out = {"trade_no": t.trade_no, "out_trade_no": t.out_trade_no, "out_request_no": r.out_request_no,
               "total_amount": _yuan(t.amount_fen), "refund_amount": _yuan(r.amount_fen)}
        if r.done_ms:
            out["refund_status"] = "REFUND_SUCCESS"
            if "gmt_refund_pay" in (biz.get("query_options") or []):
                out["gmt_refund_pay"] = _ctime(r.done_ms)
        return out

    def _alipay_data_dataservice_bill_downloadurl_query(self, biz: dict[str, Any], params: dict[str, str]
                                                        ) -> dict[str, Any]:
        if biz.get("bill_type") != "trade":
            raise _Refusal("40002", "Invalid Arguments", "isv.invalid-parameter", "bill_type 只支持 trade")
        try:
            day = date.fromisoformat(str(biz.get("bill_date")))
        except ValueError:
            raise _business("isp.bill_date_error", "账单日期格式错误") from None
        today = datetime.now(CHINA).date()
        if not self.bill_ready or day >= today:
            raise _business("isp.bill_not_exist", "账单不存在")
        token = secrets.token_hex(12)
        self._bills[token] = (time.monotonic() + BILL_URL_TTL_S, self.bill_zip(day))
        return {"bill_download_url": f"{self.base_url}/downloadBillFile.resource?bizType=trade&"
                                     f"bizDates={day:%Y%m%d}&fileType=csv.zip&token={token}"}

    # ------------------------------------------------------------------ the bill

    def bill_zip(self, day: date) -> bytes:
        """The day's trade bill as Alipay's zip: ``<pid>_<yyyymmdd>_业务明细.csv`` and ``…(汇总).csv``, GBK."""
        lo = int(datetime(day.year, day.month, day.day, tzinfo=CHINA).timestamp() * 1000)
        hi = lo + 86_400_000
        header = ("支付宝交易号,商户订单号,业务类型,商品名称,创建时间,完成时间,门店编号,门店名称,操作员,终端号,"
                  "对方账户,订单金额（元）,商家实收（元）,支付宝红包（元）,集分宝（元）,支付宝优惠（元）,商家优惠（元）,"
                  "券核销金额（元）,券名称,商家红包消费金额（元）,卡消费金额（元）,退款批次号/请求号,服务费（元）,分润（元）,备注")
        rows, paid, refunded = [], [], []
        with self._lock:
            for t in self.trades.values():
                if t.paid_ms and lo <= t.paid_ms < hi:
                    paid.append(t.amount_fen)
                    rows.append(self._bill_row(t, "交易", t.amount_fen, t.paid_ms, ""))
                for r in t.refunds.values():
                    if r.done_ms and lo <= r.done_ms < hi:
                        refunded.append(r.amount_fen)
                        rows.append(self._bill_row(t, "退款", -r.amount_fen, r.done_ms, r.out_request_no))
        d = f"{day:%Y年%m月%d日}"
        end = f"{day + timedelta(days=1):%Y年%m月%d日}"
        lines = ["#支付宝业务明细查询", f"#账号：[{self.seller_id}0156]",
                 f"#起始日期：[{d} 00:00:00]   终止日期：[{end} 00:00:00]",
                 "#-----------------------------------------业务明细列表----------------------------------------",
                 header, *rows,
                 "#-----------------------------------------业务明细列表结束------------------------------------",
                 f"#交易合计：{len(paid)}笔，商家实收共：{_yuan(sum(paid))}元，商家优惠共：0.00元",
                 f"#退款合计：{len(refunded)}笔，商家实收退款共：{_yuan(-sum(refunded))}元，商家优惠退款共：0.00元",
                 f"#导出时间：[{datetime.now(CHINA):%Y年%m月%d日 %H:%M:%S}]"]
        summary = ["#支付宝业务汇总查询",
                   "门店编号,门店名称,交易订单总笔数,退款订单总笔数,订单金额（元）,商家实收（元）",
                   f"合计,,{len(paid)},{len(refunded)},{_yuan(sum(paid) - sum(refunded))},"
                   f"{_yuan(sum(paid) - sum(refunded))}"]
        stem = f"{self.seller_id}0156_{day:%Y%m%d}"
        out = io.BytesIO()
        with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as zf:
            for name, text in ((f"{stem}_业务明细.csv", lines), (f"{stem}_业务明细(汇总).csv", summary)):
                zf.writestr(_GbkName(name, date_time=(day.year, day.month, day.day, 9, 0, 0)),
                            ("\r\n".join(text) + "\r\n").encode("gbk", errors="replace"))
        return out.getvalue()

    @staticmethod
    def _bill_row(t: Trade, kind: str, fen: int, at_ms: int, request_no: str) -> str:
        fee = (Decimal(abs(fen)) * Decimal("0.006") / 100).quantize(Decimal("0.01"), ROUND_HALF_UP)
        fee_text = f"{fee if fen < 0 else -fee:.2f}"
        cells = [t.trade_no + "\t", t.out_trade_no + "\t", kind, t.subject.replace(",", " "), _ctime(t.created_ms),
                 _ctime(at_ms), "", "", "", "", t.buyer_logon_id + "\t", _yuan(fen), _yuan(fen), "0.00", "0.00",
                 "0.00", "0.00", "0.00", "", "0.00", "0.00", request_no + "\t" if request_no else "", fee_text,
                 "0.00", ""]
        return ",".join(cells)

    # ------------------------------------------------------------------ pages

    def wap_page(self, params: dict[str, str]) -> str:
        """GET gateway?method=alipay.trade.wap.pay&…: Alipay's cashier page, or its error page."""
        call = Call("alipay.trade.wap.pay", {k: v for k, v in params.items() if k != "sign"}, False)
        try:
            self._check(params, "alipay.trade.wap.pay")
            call.sign_ok = True
            biz = self._biz(params)
            if biz.get("product_code", "QUICK_WAP_WAY") != "QUICK_WAP_WAY":
                raise _Refusal("40002", "Invalid Arguments", "isv.invalid-parameter", "product_code 无效")
            with self._lock:
                t = self._new_trade(self._order_fields(biz, params, "wap"))
                if t.locked:
                    raise _business("ACQ.TRADE_HAS_CLOSE", "交易已关闭")
                t.exists = True
        except _Refusal as r:
            call.code, call.sub_code = r.node["code"], r.node.get("sub_code", "")
            with self._lock:
                self.calls.append(call)
            return _error_page(r.node.get("sub_code", r.node["code"]), r.node.get("sub_msg", r.node["msg"]))
        call.code = "10000"
        with self._lock:
            self.calls.append(call)
        return self._cashier(t)

    def _cashier(self, t: Trade) -> str:
        e = html.escape
        if t.state == "TRADE_SUCCESS":
            action = '<p id="state">该订单已支付 This order is paid</p>'
        elif t.state == "TRADE_CLOSED":
            action = '<p id="state">交易已关闭 This trade is closed</p>'
        else:
            action = (f'<form method="post" action="/wap/pay"><input type="hidden" name="trade_no" '
                      f'value="{e(t.trade_no)}"><button id="pay" type="submit">确认付款</button></form>')
        quit_link = f'<p><a id="quit" href="{e(t.quit_url)}">取消 Cancel</a></p>' if t.quit_url else ""
        return (f'<!doctype html><html lang="zh"><head><meta charset="utf-8"><meta name="viewport" '
                f'content="width=device-width,initial-scale=1"><title>支付宝 - 网上支付 (stand-in)</title></head>'
                f'<body><h1>支付宝 Alipay (stand-in)</h1><p id="subject">{e(t.subject)}</p>'
                f'<p id="amount">￥{_yuan(t.amount_fen)}</p>{action}{quit_link}</body></html>')

    def wap_pay(self, trade_no: str) -> tuple[int, dict[str, str], str]:
        """The person pressed 确认付款: pay, then go to return_url with the signed return parameters."""
        with self._lock:
            t = next((x for x in self.trades.values() if x.trade_no == trade_no), None)
        if t is None:
            return 404, {}, _error_page("ACQ.TRADE_NOT_EXIST", "交易不存在")
        try:
            self.pay(t.out_trade_no)
        except ValueError as e:
            return 200, {}, _error_page("ACQ.TRADE_HAS_CLOSE", str(e))
        if not t.return_url:
            return 200, {}, '<!doctype html><meta charset="utf-8"><p id="state">支付成功 Paid</p>'
        back = {"charset": "utf-8", "out_trade_no": t.out_trade_no, "method": "alipay.trade.wap.pay.return",
                "total_amount": _yuan(t.amount_fen), "trade_no": t.trade_no, "auth_app_id": self.app_id,
                "version": "1.0", "app_id": self.app_id, "sign_type": "RSA2", "seller_id": self.seller_id,
                "timestamp": _ctime(self.clock_ms())}
        back["sign"] = sign(self.keys.alipay, notify_content(back))
        sep = "&" if "?" in t.return_url else "?"
        return 303, {"Location": t.return_url + sep + urllib.parse.urlencode(back)}, ""

    def qr_page(self, code: str, pay: bool) -> tuple[int, str]:
        """Opening (or paying at) a precreate QR code's address: what the Alipay app shows after a scan."""
        try:
            t = self.scan(code)
            if pay:
                self.pay(t.out_trade_no)
        except KeyError:
            return 404, _error_page("ACQ.TRADE_NOT_EXIST", "二维码无效")
        except ValueError as e:
            return 200, _error_page("ACQ.TRADE_HAS_CLOSE", str(e))
        if t.state != "WAIT_BUYER_PAY":
            return 200, self._cashier(t)
        return 200, self._cashier(t).replace('action="/wap/pay"', f'action="/qr/{html.escape(code)}/pay"')


class _GbkName(zipfile.ZipInfo):
    """A zip member whose name is stored in GBK without the UTF-8 flag, as Alipay's bill zips are."""

    def _encodeFilenameFlags(self) -> tuple[bytes, int]:
        return self.filename.encode("gbk"), self.flag_bits


def _error_page(code: str, message: str) -> str:
    return (f'<!doctype html><html lang="zh"><head><meta charset="utf-8"><title>支付宝 - 错误</title></head><body>'
            f'<p>调试错误，请回到请求来源地，重新发起请求。</p><p id="error">错误代码 {html.escape(code)}</p>'
            f'<p>错误原因: {html.escape(message)}</p></body></html>')


class _Handler(BaseHTTPRequestHandler):
    owner: AlipayStandIn
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _send(self, status: int, ctype: str, body: bytes, headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(body)

    def _html(self, status: int, text: str, headers: dict[str, str] | None = None) -> None:
        self._send(status, "text/html;charset=utf-8", text.encode("utf-8"), headers)

    def _form(self) -> dict[str, str]:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length).decode("ascii", errors="replace") if length else ""
        return dict(urllib.parse.parse_qsl(body, keep_blank_values=True, encoding="utf-8", errors="replace"))

    def do_GET(self) -> None:
        parts = urllib.parse.urlsplit(self.path)
        query = dict(urllib.parse.parse_qsl(parts.query, keep_blank_values=True, errors="replace"))
        s = self.owner
        if parts.path == "/gateway.do":
            if query.get("method") == "alipay.trade.wap.pay":
                self._html(200, s.wap_page(query))
            else:
                self._send(200, *s.api(query))
        elif parts.path == "/downloadBillFile.resource":
            with s._lock:
                expires, data = s._bills.get(query.get("token", ""), (0.0, b""))
            if time.monotonic() > expires:
                self._html(404, _error_page("bill.url.expired", "下载地址已失效"))
            else:
                self._send(200, "application/octet-stream", data,
                           {"Content-Disposition": 'attachment; filename="bill.csv.zip"'})
        elif parts.path.startswith("/qr/"):
            self._html(*s.qr_page(parts.path[4:], pay=False))
        else:
            self._html(404, _error_page("not_found", self.path[:80]))

    def do_POST(self) -> None:
        parts = urllib.parse.urlsplit(self.path)
        s = self.owner
        form = self._form()
        if parts.path == "/gateway.do":
            params = dict(urllib.parse.parse_qsl(parts.query, keep_blank_values=True, errors="replace")) | form
            self._send(200, *s.api(params))
        elif parts.path == "/wap/pay":
            status, headers, text = s.wap_pay(form.get("trade_no", ""))
            self._html(status, text, headers)
        elif parts.path.startswith("/qr/") and parts.path.endswith("/pay"):
            self._html(*s.qr_page(parts.path[4:-4], pay=True))
        else:
            self._html(404, _error_page("not_found", self.path[:80]))
