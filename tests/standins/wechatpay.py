"""A local stand-in of WeChat Pay API v3 (微信支付, a directly connected merchant) and of the official account's web
authorisation, written from WeChat Pay's published formats, for tests over real HTTP on loopback. It is not a mock
of our adapter: it checks requests and signs answers and notifications as WeChat Pay publishes, and keeps its own
order book. Its own small implementations of the published rules are deliberately separate from the adapter's.

* API (``/v3/…``): every request's ``Authorization: WECHATPAY2-SHA256-RSA2048 mchid,nonce_str,timestamp,serial_no,
  signature`` is checked with the merchant's public key over ``METHOD\\nPATH?QUERY\\ntimestamp\\nnonce\\nbody\\n``
  (the serial must be the merchant certificate's, the mchid ours, the timestamp within five minutes): otherwise
  401 ``SIGN_ERROR``, unsigned. Every other answer is signed over ``timestamp\\nnonce\\nbody\\n`` with the platform
  certificate's key (``Wechatpay-Serial`` = its serial) or the WeChat Pay public key's (``PUB_KEY_ID_…``): the one
  the request named in its ``Wechatpay-Serial`` header (as WeChat Pay does during a switch), else ``signer``.
  JSAPI / H5 / Native orders, query and close by out_trade_no, refunds (idempotent by out_refund_no, never more than
  the unrefunded amount, PROCESSING until :meth:`settle_refund`), refund query, the trade bill (SHA1, a download
  address valid 5 minutes whose answer is unsigned) — each with the published field names and error codes.
* How a person pays: :meth:`~WechatPayStandIn.pay` (what the WeChat app does after the person confirms);
  over HTTP the H5 page at ``h5_url`` (its "确认支付" button pays, then goes to ``redirect_url``),
  ``POST /standin/jsapi-pay`` (what the WeChat app does when the page calls ``getBrandWCPayRequest``: the full
  JSAPI parameters, whose paySign is checked, or ``{"prepay_id"}``; CORS-permissive), and
  ``POST /standin/native-pay`` ``{"code_url"}`` or the page ``GET /standin/scan?code_url=…`` (scanning a Native
  code). An unpaid order past its time_expire is closed.
* Notifications are posted to notify_url as published: JSON ``{id, create_time, resource_type, event_type,
  summary, resource{original_type, algorithm AEAD_AES_256_GCM, ciphertext, associated_data, nonce}}`` encrypted with
  the APIv3 key and signed like answers (Wechatpay-Timestamp/-Nonce/-Signature/-Serial headers), retried after
  ``notify_delays_s`` while the answer is not 200/204 (re-signed each time). ``auto_notify=False``: none is sent
  by itself (the order query then settles it). :meth:`~WechatPayStandIn.notify` /
  :meth:`~WechatPayStandIn.notify_refund` send crafted ones with knobs; :meth:`~WechatPayStandIn.notification`
  gives the headers and body for a direct ``verify``.
* Web authorisation: ``GET /connect/oauth2/authorize`` redirects to redirect_uri with ``code`` and ``state``;
  ``GET /sns/oauth2/access_token`` turns a code (once, within 5 minutes) into ``oauth_openid``.

Deviations, for tests: notify_url may be ``http://`` on loopback (WeChat Pay wants https); a payer's IP, the H5
domain and the JSAPI pay directory are not checked. Keys: :func:`make_keys` / :func:`default_keys`,
:meth:`WechatPayStandIn.env` writes the key files and gives the TAPSHARE_WECHATPAY_* variables.
"""

from __future__ import annotations

import base64
import hashlib
import html
import json
import re
import secrets
import threading
import time
import urllib.parse
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta, timezone
from decimal import ROUND_HALF_UP, Decimal
from functools import lru_cache
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import requests
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.x509.oid import NameOID

CHINA = timezone(timedelta(hours=8))
MCHID = "1900000109"
APPID = "wx8888888888888888"
APP_SECRET = "5f3a0d2c9b8e7f6a1c4d2e0b9a8f7c6d"
SCHEMA = "WECHATPAY2-SHA256-RSA2048"
REQUEST_WINDOW_S = 300                      # a request's timestamp within five minutes of WeChat Pay's clock
BILL_URL_TTL_S = 300                        # the bill download address is good for five minutes
OAUTH_CODE_TTL_S = 300                      # a web-authorisation code: once, within five minutes
REFUND_PERIOD_MS = 365 * 86_400_000         # 交易时间超过一年的订单无法提交退款

_OUT_TRADE_NO = re.compile(r"^[0-9A-Za-z_\-|*]{6,32}$")
_OUT_REFUND_NO = re.compile(r"^[0-9A-Za-z_\-|*@]{1,64}$")
_TRADE_TYPES = {"jsapi": "JSAPI", "h5": "MWEB", "native": "NATIVE"}
_STATE_DESC = {"SUCCESS": "支付成功", "NOTPAY": "未支付", "CLOSED": "已关闭",
               "REFUND": "订单发生过退款，退款详情请查询退款单"}
_REFUND_SUMMARY = {"SUCCESS": "退款成功", "ABNORMAL": "退款异常", "CLOSED": "退款关闭"}
_LOOPBACK = {"127.0.0.1", "localhost", "::1"}


# ---------------------------------------------------------------------------------------------- keys


def new_key(bits: int = 2048) -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=bits)


def new_serial() -> str:
    """A certificate serial as WeChat Pay shows them: 40 hex digits, upper case, no leading zero."""
    return f"{secrets.randbits(159) | (1 << 156):X}"


def make_merchant(bits: int = 2048) -> tuple[rsa.RSAPrivateKey, str]:
    """The merchant API key pair (apiclient_key.pem) and its certificate's serial (商户API证书序列号)."""
    return new_key(bits), new_serial()


def make_platform_cert(key: rsa.RSAPrivateKey | None = None, *, serial: str | None = None,
                       not_before: datetime | None = None, not_after: datetime | None = None
                       ) -> tuple[rsa.RSAPrivateKey, x509.Certificate]:
    """A WeChat Pay platform key pair and its (self-signed) certificate with a serial."""
    key = key or new_key()
    now = datetime.now(UTC)
    name = x509.Name([x509.NameAttribute(NameOID.COUNTRY_NAME, "CN"),
                      x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Tenpay.com"),
                      x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, "Tenpay.com CA Center"),
                      x509.NameAttribute(NameOID.COMMON_NAME, "Tenpay.com sign")])
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(int(serial or new_serial(), 16))
            .not_valid_before(not_before or now - timedelta(days=1))
            .not_valid_after(not_after or now + timedelta(days=5 * 365))
            .sign(key, hashes.SHA256()))
    return key, cert


def make_public_key() -> tuple[rsa.RSAPrivateKey, str]:
    """The WeChat Pay public key pair (微信支付公钥; WeChat Pay keeps the private half) and its id."""
    return new_key(), "PUB_KEY_ID_" + "".join(str(secrets.randbelow(10)) for _ in range(34))


def make_apiv3_key() -> str:
    """An APIv3 key as merchants set it: 32 letters and digits."""
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789"
    return "".join(secrets.choice(alphabet) for _ in range(32))


def pem_private(key: rsa.RSAPrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def pem_public(key: rsa.RSAPublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


def pem_cert(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


@dataclass(frozen=True)
class Keys:
    merchant: rsa.RSAPrivateKey             # the merchant signs requests and paySign with it
    merchant_serial: str
    platform: rsa.RSAPrivateKey             # WeChat Pay signs with it (platform certificate mode)
    platform_cert: x509.Certificate
    wechat: rsa.RSAPrivateKey               # WeChat Pay signs with it (public key mode; we hold the public half)
    public_key_id: str
    apiv3_key: str

    @property
    def platform_serial(self) -> str:
        return f"{self.platform_cert.serial_number:X}"

    def write(self, directory: Path) -> dict[str, Path]:
        """The files a merchant has: apiclient_key.pem, the platform certificate, pub_key.pem, the APIv3 key
        and the official account's AppSecret (the key files readable by their owner only)."""
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        files = {"mch_key": d / "apiclient_key.pem", "platform_cert": d / f"wechatpay_{self.platform_serial}.pem",
                 "public_key": d / "pub_key.pem", "apiv3_key": d / "apiv3_key.txt", "app_secret": d / "app_secret.txt"}
        files["mch_key"].write_bytes(pem_private(self.merchant))
        files["platform_cert"].write_bytes(pem_cert(self.platform_cert))
        files["public_key"].write_bytes(pem_public(self.wechat.public_key()))
        files["apiv3_key"].write_text(self.apiv3_key)
        files["app_secret"].write_text(APP_SECRET + "\n")
        for name in ("mch_key", "apiv3_key", "app_secret"):
            files[name].chmod(0o600)
        return files


def make_keys() -> Keys:
    merchant, merchant_serial = make_merchant()
    platform, cert = make_platform_cert()
    wechat, public_key_id = make_public_key()
    return Keys(merchant, merchant_serial, platform, cert, wechat, public_key_id, make_apiv3_key())


@lru_cache(maxsize=1)
def default_keys() -> Keys:
    """One set of keys per test process (generating RSA keys takes a moment)."""
    return make_keys()


def sign(key: rsa.RSAPrivateKey, message: bytes) -> str:
    return base64.b64encode(key.sign(message, padding.PKCS1v15(), hashes.SHA256())).decode()


def verify(key: rsa.RSAPublicKey, message: bytes, signature: str) -> bool:
    try:
        key.verify(base64.b64decode(signature, validate=True), message, padding.PKCS1v15(), hashes.SHA256())
    except (InvalidSignature, ValueError):
        return False
    return True


def _norm_serial(serial: str) -> str:
    return serial.strip().upper().lstrip("0")


# ---------------------------------------------------------------------------------------------- the book


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


def _rfc3339(ms: int) -> str:
    return datetime.fromtimestamp(ms // 1000, CHINA).isoformat(timespec="seconds")


def _parse_rfc3339(text: Any) -> int | None:
    if not isinstance(text, str) or "T" not in text:
        return None
    try:
        at = datetime.fromisoformat(text)
    except ValueError:
        return None
    return int(at.timestamp() * 1000) if at.tzinfo is not None else None


def _yuan(fen: int) -> str:
    sign_ = "-" if fen < 0 else ""
    return f"{sign_}{abs(fen) // 100}.{abs(fen) % 100:02d}"


def _ctime(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, CHINA).strftime("%Y-%m-%d %H:%M:%S")


def _digits(n: int) -> str:
    return "".join(str(secrets.randbelow(10)) for _ in range(n))


@dataclass
class Refund:
    out_refund_no: str
    refund_id: str                          # WeChat Pay's (微信退款单号)
    out_trade_no: str
    amount_fen: int
    reason: str
    notify_url: str
    created_ms: int
    status: str = "PROCESSING"              # PROCESSING, SUCCESS, ABNORMAL, CLOSED
    success_ms: int = 0


@dataclass
class Order:
    out_trade_no: str
    appid: str
    mchid: str
    channel: str                            # jsapi, h5, native
    description: str
    notify_url: str
    amount_fen: int
    expires_ms: int
    created_ms: int
    prepay_id: str
    payer_openid: str = ""
    client_ip: str = ""
    h5_url: str = ""
    code_url: str = ""
    attach: str = ""
    state: str = "NOTPAY"                   # NOTPAY, SUCCESS, CLOSED, REFUND
    transaction_id: str = ""
    success_ms: int = 0
    closed_ms: int = 0
    refunds: dict[str, Refund] = field(default_factory=dict)

    @property
    def trade_type(self) -> str:
        return _TRADE_TYPES[self.channel]

    def refunded_fen(self) -> int:
        """Refunded or on its way (a CLOSED refund gave its amount back)."""
        return sum(r.amount_fen for r in self.refunds.values() if r.status != "CLOSED")


@dataclass
class Received:
    """One request the stand-in received: ``kind`` api, page, oauth; for the API whether the Authorization
    signature checked, and the status and error code it was answered with."""

    kind: str
    method: str
    path: str
    headers: dict[str, str]
    body: Any
    sign_ok: bool | None = None
    status: int = 0
    code: str = ""


@dataclass
class Delivery:
    kind: str                               # payment, refund, crafted
    order_id: str
    refund_id: str
    url: str
    status: int                             # 0: not delivered (network)
    body: str


class _Refusal(Exception):
    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(code)
        self.status, self.code, self.message = status, code, message


def _required(name: str) -> _Refusal:
    return _Refusal(400, "PARAM_ERROR", f"输入源“/body/{name}”映射到值字段“{name}”必填性规则校验失败，此字段为必填项")


# ---------------------------------------------------------------------------------------------- the stand-in


class WechatPayStandIn:
    """WeChat Pay on ``127.0.0.1``. Use as a context manager (or ``start()`` / ``stop()``); ``base_url`` serves the
    API, the pay pages and the web authorisation; :meth:`env` writes the key files and gives the whole
    environment for ``from_env``.

    Knobs: ``signer`` (``platform_cert`` or ``public_key``: notifications, and answers to requests that name no
    key), ``follow_request_serial`` (False: answers always by ``signer``), ``auto_notify``, ``notify_delays_s``,
    ``bad_answer_signature`` (answers signed with a key that is not WeChat Pay's), ``unsigned_answers``,
    ``sign_test_answers`` (answers carry a ``WECHATPAY/SIGNTEST/`` probe signature), ``bill_state`` (ready, missing,
    creating), ``bill_hash_wrong``, ``refund_instant`` (refunds SUCCESS at once), ``fail_next``
    (``{operation: (status, code, message)}`` answered once; operations jsapi, h5, native, query, close, refund,
    query_refund, tradebill, download), ``payer_openid`` (who pays H5 / Native orders), ``oauth_openid`` and
    ``snapshot_user`` (web authorisation), ``clock_ms`` (the book's time: payments, refunds; request timestamps are
    checked against the real time)."""

    def __init__(self, *, mchid: str = MCHID, appid: str = APPID, app_secret: str = APP_SECRET,
                 keys: Keys | None = None, signer: str = "platform_cert", auto_notify: bool = True,
                 notify_delays_s: tuple[float, ...] = (0.05, 0.5, 2.0)) -> None:
        if signer not in ("platform_cert", "public_key"):
            raise ValueError("signer: platform_cert or public_key")
        self.mchid, self.appid, self.app_secret = mchid, appid, app_secret
        self.keys = keys or default_keys()
        self.signer = signer
        self.follow_request_serial = True
        self.auto_notify = auto_notify
        self.notify_delays_s = notify_delays_s
        self.bad_answer_signature = False
        self.unsigned_answers = False
        self.sign_test_answers = False
        self.bill_state = "ready"
        self.bill_hash_wrong = False
        self.refund_instant = False
        self.fail_next: dict[str, tuple[int, str, str]] = {}
        self.payer_openid = "oUpF8uMuAJO_M2pxb1Q9zNjWeS6o"
        self.oauth_openid = "oUpF8uMuAJO_M2pxb1Q9zNjWeS6o"
        self.snapshot_user = False
        self.clock_ms = _now_ms
        self.orders: dict[str, Order] = {}
        self.refunds: dict[str, Refund] = {}
        self.received: list[Received] = []
        self.deliveries: list[Delivery] = []
        self._prepay: dict[str, str] = {}               # prepay_id -> out_trade_no
        self._codes: dict[str, str] = {}                # code_url -> out_trade_no
        self._bills: dict[str, tuple[float, bytes]] = {}
        self._oauth_codes: dict[str, tuple[str, float]] = {}
        self._lock = threading.RLock()
        self._server: ThreadingHTTPServer | None = None
        self._threads: list[threading.Thread] = []
        self._stopping = threading.Event()
        self.base_url = ""

    # ------------------------------------------------------------------ life

    def start(self) -> WechatPayStandIn:
        stand_in = self

        class Handler(_Handler):
            owner = stand_in

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.base_url = f"http://127.0.0.1:{self._server.server_address[1]}"
        t = threading.Thread(target=self._server.serve_forever, args=(0.05,), name="wechatpay-standin", daemon=True)
        t.start()
        return self

    def stop(self) -> None:
        self._stopping.set()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        for t in list(self._threads):
            t.join(timeout=5)

    def __enter__(self) -> WechatPayStandIn:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def env(self, directory: Path, *, verify_with: tuple[str, ...] | None = None, **overrides: str
            ) -> dict[str, str]:
        """Write the merchant's key files under ``directory`` and return the TAPSHARE_WECHATPAY_* variables for
        them and this stand-in. ``verify_with``: which WeChat Pay keys the merchant configures, ``platform_cert``
        and/or ``public_key`` (default: the stand-in's ``signer``). ``overrides`` replace any variable."""
        files = self.keys.write(Path(directory))
        env = {"TAPSHARE_WECHATPAY_MCHID": self.mchid, "TAPSHARE_WECHATPAY_APPID": self.appid,
               "TAPSHARE_WECHATPAY_APP_SECRET_FILE": str(files["app_secret"]),
               "TAPSHARE_WECHATPAY_MCH_SERIAL": self.keys.merchant_serial,
               "TAPSHARE_WECHATPAY_MCH_KEY_FILE": str(files["mch_key"]),
               "TAPSHARE_WECHATPAY_APIV3_KEY_FILE": str(files["apiv3_key"]),
               "TAPSHARE_WECHATPAY_API_URL": self.base_url, "TAPSHARE_WECHATPAY_OAUTH_URL": self.base_url,
               "TAPSHARE_WECHATPAY_SNS_URL": self.base_url}
        for which in verify_with or (self.signer,):
            if which == "platform_cert":
                env["TAPSHARE_WECHATPAY_PLATFORM_CERT_FILES"] = str(files["platform_cert"])
            elif which == "public_key":
                env["TAPSHARE_WECHATPAY_PUBLIC_KEY_FILE"] = str(files["public_key"])
                env["TAPSHARE_WECHATPAY_PUBLIC_KEY_ID"] = self.keys.public_key_id
            else:
                raise ValueError(f"verify_with: platform_cert or public_key, not {which!r}")
        return env | overrides

    # ------------------------------------------------------------------ what people do

    def order(self, order_id: str) -> Order:
        with self._lock:
            return self._fresh(self.orders[order_id])

    def pay(self, order_id: str, *, at_ms: int | None = None, openid: str | None = None,
            notify: bool | None = None) -> Order:
        """The person confirms in the WeChat app: the order is paid (once; paying a paid order changes nothing)
        and the notification is sent unless ``notify`` (default ``auto_notify``) is False. Raises KeyError for
        an unknown order, ValueError for a closed one."""
        with self._lock:
            o = self.orders.get(order_id)
            if o is None:
                raise KeyError(f"WeChat Pay knows no order {order_id}")
            self._fresh(o)
            if o.state == "CLOSED":
                raise ValueError("订单已关闭 (the order is closed)")
            if o.state != "NOTPAY":
                return o
            o.state, o.success_ms = "SUCCESS", at_ms if at_ms is not None else self.clock_ms()
            o.transaction_id = "4200" + f"{datetime.fromtimestamp(o.success_ms / 1000, CHINA):%Y%m%d}" + _digits(16)
            o.payer_openid = o.payer_openid or openid or self.payer_openid
        if (self.auto_notify if notify is None else notify) and o.notify_url:
            self._send_later("payment", o.out_trade_no, "", o.notify_url,
                             self._event("TRANSACTION.SUCCESS", "支付成功", "transaction", self._paid_resource(o)))
        return o

    def pay_prepay(self, prepay_id: str, **kw: Any) -> Order:
        with self._lock:
            order_id = self._prepay.get(prepay_id)
        if order_id is None:
            raise KeyError(f"unknown prepay_id {prepay_id}")
        return self.pay(order_id, **kw)

    def scan(self, code_url: str, **kw: Any) -> Order:
        """The person scans a Native code_url with WeChat and confirms."""
        with self._lock:
            order_id = self._codes.get(code_url)
        if order_id is None:
            raise KeyError(f"unknown code_url {code_url}")
        return self.pay(order_id, **kw)

    def pay_h5(self, url: str) -> str:
        """Over HTTP: a phone browser opens the H5 address and the person presses 确认支付; returns where WeChat
        Pay sends the browser next (redirect_url)."""
        page = requests.get(url, timeout=10)
        page.raise_for_status()
        m = re.search(r'<form method="post" action="([^"]+)">(.*?)</form>', page.text, re.S)
        if m is None:
            raise AssertionError(f"no pay button on WeChat Pay's page: {page.text[:300]}")
        fields = dict(re.findall(r'name="([^"]+)" value="([^"]*)"', m.group(2)))
        fields = {k: html.unescape(v) for k, v in fields.items()}
        r = requests.post(self.base_url + m.group(1), data=fields, allow_redirects=False, timeout=10)
        if r.status_code != 303:
            raise AssertionError(f"paying failed: {r.status_code} {r.text[:300]}")
        return r.headers["Location"]

    def pay_jsapi(self, params: Mapping[str, str]) -> dict[str, str]:
        """Over HTTP: what the WeChat app does when the page calls getBrandWCPayRequest with ``params``."""
        r = requests.post(self.base_url + "/standin/jsapi-pay", json=dict(params), timeout=10)
        return r.json()

    def settle_refund(self, refund_id: str, status: str = "SUCCESS", *, at_ms: int | None = None,
                      notify: bool | None = None) -> Refund:
        """A PROCESSING refund finishes: SUCCESS (money back to the payer), ABNORMAL (the payer's account cannot
        take it) or CLOSED (it failed; the amount may be refunded again); the refund notification goes to its
        notify_url unless ``notify`` (default ``auto_notify``) is False."""
        if status not in _REFUND_SUMMARY:
            raise ValueError("status: SUCCESS, ABNORMAL or CLOSED")
        with self._lock:
            r = self.refunds[refund_id]
            if r.status != "PROCESSING":
                raise ValueError(f"refund {refund_id} is {r.status} already")
            r.status = status
            if status == "SUCCESS":
                r.success_ms = at_ms if at_ms is not None else self.clock_ms()
            body = self._event("REFUND." + status, _REFUND_SUMMARY[status], "refund", self._refund_resource(r))
        if (self.auto_notify if notify is None else notify) and r.notify_url:
            self._send_later("refund", r.out_trade_no, r.out_refund_no, r.notify_url, body)
        return r

    def wait_deliveries(self, count: int, timeout_s: float = 5.0) -> list[Delivery]:
        """Wait until at least ``count`` notifications were posted (answered or not); returns them."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            with self._lock:
                if len(self.deliveries) >= count:
                    return list(self.deliveries)
            time.sleep(0.01)
        raise AssertionError(f"{len(self.deliveries)} notifications posted, not {count}")

    # ------------------------------------------------------------------ notifications

    def sign_headers(self, body: bytes, signer: str | None = None, *, bad: bool = False, serial: str | None = None,
                     timestamp: int | None = None) -> dict[str, str]:
        """WeChat Pay's signature headers for an answer or notification body."""
        which = signer or self.signer
        if which == "public_key":
            key, key_serial = self.keys.wechat, self.keys.public_key_id
        else:
            key, key_serial = self.keys.platform, self.keys.platform_serial
        if bad:
            key = self.keys.merchant                        # not WeChat Pay's key
        ts = str(timestamp if timestamp is not None else int(time.time()))
        nonce = secrets.token_hex(16).upper()
        message = f"{ts}\n{nonce}\n".encode() + body + b"\n"
        return {"Wechatpay-Timestamp": ts, "Wechatpay-Nonce": nonce, "Wechatpay-Signature": sign(key, message),
                "Wechatpay-Serial": serial or key_serial, "Wechatpay-Signature-Type": SCHEMA}

    def _resource(self, original_type: str, plain: dict[str, Any], *, apiv3_key: str | None = None,
                  tamper: bool = False) -> dict[str, str]:
        nonce = secrets.token_urlsafe(9)[:12]
        data = json.dumps(plain, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
        ct = bytearray(AESGCM((apiv3_key or self.keys.apiv3_key).encode()).encrypt(nonce.encode(), data,
                                                                                  original_type.encode()))
        if tamper:
            ct[3] ^= 0x01
        return {"original_type": original_type, "algorithm": "AEAD_AES_256_GCM",
                "ciphertext": base64.b64encode(bytes(ct)).decode(), "associated_data": original_type,
                "nonce": nonce}

    def _event(self, event_type: str, summary: str, original_type: str, plain: dict[str, Any], *,
               event_id: str | None = None, **resource_knobs: Any) -> bytes:
        doc = {"id": event_id or f"EV-{datetime.now(CHINA):%Y%m%d%H%M%S}{_digits(8)}",
               "create_time": _rfc3339(self.clock_ms()), "resource_type": "encrypt-resource",
               "event_type": event_type, "summary": summary,
               "resource": self._resource(original_type, plain, **resource_knobs)}
        return json.dumps(doc, ensure_ascii=False, separators=(",", ":")).encode("utf-8")

    def _paid_resource(self, o: Order) -> dict[str, Any]:
        return {"mchid": o.mchid, "appid": o.appid, "out_trade_no": o.out_trade_no,
                "transaction_id": o.transaction_id, "trade_type": o.trade_type, "trade_state": "SUCCESS",
                "trade_state_desc": "支付成功", "bank_type": "OTHERS", "attach": o.attach,
                "success_time": _rfc3339(o.success_ms), "payer": {"openid": o.payer_openid},
                "amount": {"total": o.amount_fen, "payer_total": o.amount_fen, "currency": "CNY",
                           "payer_currency": "CNY"}}

    def _refund_resource(self, r: Refund) -> dict[str, Any]:
        o = self.orders[r.out_trade_no]
        plain: dict[str, Any] = {
            "mchid": o.mchid, "out_trade_no": o.out_trade_no, "transaction_id": o.transaction_id,
            "out_refund_no": r.out_refund_no, "refund_id": r.refund_id, "refund_status": r.status,
            "user_received_account": "支付用户零钱",
            "amount": {"total": o.amount_fen, "refund": r.amount_fen, "payer_total": o.amount_fen,
                       "payer_refund": r.amount_fen}}
        if r.success_ms:
            plain["success_time"] = _rfc3339(r.success_ms)
        return plain

    def notification(self, order_id: str, *, mchid: str | None = None, appid: str | None = None,
                     amount_fen: int | None = None, signer: str | None = None, bad_signature: bool = False,
                     serial: str | None = None, timestamp_offset_s: int = 0, tamper_ciphertext: bool = False,
                     apiv3_key: str | None = None, event_id: str | None = None) -> tuple[dict[str, str], bytes]:
        """The headers and body of a paid order's notification (TRANSACTION.SUCCESS) as WeChat Pay posts it now.
        The knobs change a field and still encrypt and sign it properly (``mchid``, ``appid``, ``amount_fen``,
        ``apiv3_key``, ``tamper_ciphertext``: a ciphertext that does not decrypt, signed), or break the signature
        (``bad_signature``: another key; ``serial``: another Wechatpay-Serial; ``timestamp_offset_s``)."""
        with self._lock:
            o = self._fresh(self.orders[order_id])
            if not o.transaction_id:
                raise ValueError(f"order {order_id} is not paid")
            plain = self._paid_resource(o)
        plain |= {k: v for k, v in (("mchid", mchid), ("appid", appid)) if v is not None}
        if amount_fen is not None:
            plain["amount"] = plain["amount"] | {"total": amount_fen, "payer_total": amount_fen}
        body = self._event("TRANSACTION.SUCCESS", "支付成功", "transaction", plain, event_id=event_id,
                           apiv3_key=apiv3_key, tamper=tamper_ciphertext)
        return self._signed(body, signer, bad_signature, serial, timestamp_offset_s), body

    def refund_notification(self, refund_id: str, *, mchid: str | None = None, signer: str | None = None,
                            bad_signature: bool = False, serial: str | None = None, timestamp_offset_s: int = 0,
                            tamper_ciphertext: bool = False, apiv3_key: str | None = None
                            ) -> tuple[dict[str, str], bytes]:
        """The headers and body of a finished refund's notification (REFUND.SUCCESS / ABNORMAL / CLOSED)."""
        with self._lock:
            r = self.refunds[refund_id]
            if r.status == "PROCESSING":
                raise ValueError(f"refund {refund_id} is still PROCESSING: settle_refund first")
            plain = self._refund_resource(r)
        if mchid is not None:
            plain["mchid"] = mchid
        body = self._event("REFUND." + r.status, _REFUND_SUMMARY[r.status], "refund", plain,
                           apiv3_key=apiv3_key, tamper=tamper_ciphertext)
        return self._signed(body, signer, bad_signature, serial, timestamp_offset_s), body

    def _signed(self, body: bytes, signer: str | None, bad: bool, serial: str | None, offset_s: int
                ) -> dict[str, str]:
        return {"Content-Type": "application/json", "User-Agent": "Mozilla/4.0", "Request-ID": secrets.token_hex(16)
                } | self.sign_headers(body, signer, bad=bad, serial=serial, timestamp=int(time.time()) + offset_s)

    def notify(self, order_id: str, *, url: str | None = None, bad_signature: bool = False,
               serial: str | None = None, timestamp_offset_s: int = 0, mchid: str | None = None,
               appid: str | None = None, amount_fen: int | None = None, signer: str | None = None,
               tamper_ciphertext: bool = False, repeat: int = 1, interval_s: float = 1.0, concurrent: int = 1
               ) -> list[tuple[int, str]]:
        """Post a paid order's notification (see :meth:`notification`) to ``url`` (default its notify_url),
        ``repeat`` times ``interval_s`` apart with ``concurrent`` copies at once, as WeChat Pay's retries do (the
        same id and resource, signed afresh); returns every HTTP answer (status, body text)."""
        _, body = self.notification(order_id, mchid=mchid, appid=appid, amount_fen=amount_fen,
                                    tamper_ciphertext=tamper_ciphertext)
        target = url or self.order(order_id).notify_url
        return self._post_repeatedly(body, target, order_id, "", signer, bad_signature, serial, timestamp_offset_s,
                                     repeat, interval_s, concurrent)

    def notify_refund(self, refund_id: str, *, url: str | None = None, bad_signature: bool = False,
                      serial: str | None = None, timestamp_offset_s: int = 0, mchid: str | None = None,
                      signer: str | None = None, tamper_ciphertext: bool = False, repeat: int = 1,
                      interval_s: float = 1.0, concurrent: int = 1) -> list[tuple[int, str]]:
        """Post a finished refund's notification to ``url`` (default its notify_url); like :meth:`notify`."""
        _, body = self.refund_notification(refund_id, mchid=mchid, tamper_ciphertext=tamper_ciphertext)
        with self._lock:
            r = self.refunds[refund_id]
        target = url or r.notify_url
        return self._post_repeatedly(body, target, r.out_trade_no, refund_id, signer, bad_signature, serial,
                                     timestamp_offset_s, repeat, interval_s, concurrent)

    def _post_repeatedly(self, body: bytes, url: str, order_id: str, refund_id: str, signer: str | None, bad: bool,
                         serial: str | None, offset_s: int, repeat: int, interval_s: float, concurrent: int
                         ) -> list[tuple[int, str]]:
        answers: list[tuple[int, str]] = []
        for i in range(repeat):
            if i:
                time.sleep(interval_s)
            with ThreadPoolExecutor(max_workers=concurrent) as ex:
                answers += list(ex.map(lambda _: self._post(
                    "crafted", order_id, refund_id, url, body, self._signed(body, signer, bad, serial, offset_s)),
                    range(concurrent)))
        return answers

    def _post(self, kind: str, order_id: str, refund_id: str, url: str, body: bytes, headers: dict[str, str]
              ) -> tuple[int, str]:
        try:
            r = requests.post(url, data=body, headers=headers, timeout=10)
            answer = (r.status_code, r.text)
        except requests.RequestException:
            answer = (0, "")
        with self._lock:
            self.deliveries.append(Delivery(kind, order_id, refund_id, url, *answer))
        return answer

    def _send_later(self, kind: str, order_id: str, refund_id: str, url: str, body: bytes) -> None:
        """WeChat Pay's delivery: post, and post again after each delay while the answer is not 200 / 204."""
        def run() -> None:
            for delay in self.notify_delays_s:
                if self._stopping.wait(delay):
                    return
                status, _ = self._post(kind, order_id, refund_id, url, body,
                                       self._signed(body, None, False, None, 0))
                if status in (200, 204):
                    return

        th = threading.Thread(target=run, name=f"wechatpay-notify-{order_id}", daemon=True)
        with self._lock:
            self._threads = [x for x in self._threads if x.is_alive()] + [th]
        th.start()

    # ------------------------------------------------------------------ the API

    def _fresh(self, o: Order) -> Order:
        """An unpaid order past its time_expire is closed."""
        if o.state == "NOTPAY" and o.expires_ms and self.clock_ms() > o.expires_ms:
            o.state, o.closed_ms = "CLOSED", o.expires_ms
        return o

    def _check_auth(self, method: str, raw_path: str, headers: Mapping[str, str], body: bytes) -> str:
        """The published request signature check; "" if it holds, else why not."""
        schema, _, rest = (headers.get("Authorization") or "").partition(" ")
        if schema != SCHEMA:
            return "Authorization 的认证类型不是 WECHATPAY2-SHA256-RSA2048"
        fields = dict(re.findall(r'([a-z_]+)="([^"]*)"', rest))
        for k in ("mchid", "nonce_str", "timestamp", "serial_no", "signature"):
            if not fields.get(k):
                return f"Authorization 缺少 {k}"
        if fields["mchid"] != self.mchid:
            return "商户号不存在，或与商户证书不匹配"
        if _norm_serial(fields["serial_no"]) != _norm_serial(self.keys.merchant_serial):
            return "商户证书序列号有误"
        ts = fields["timestamp"]
        if not ts.isdigit() or abs(int(ts) - time.time()) > REQUEST_WINDOW_S:
            return "请求的时间戳与微信支付服务器时间相差过大"
        message = f"{method}\n{raw_path}\n{ts}\n{fields['nonce_str']}\n".encode() + body + b"\n"
        if not verify(self.keys.merchant.public_key(), message, fields["signature"]):
            return "签名错误，验签失败"
        return ""

    def api(self, method: str, raw_path: str, headers: Mapping[str, str], body: bytes
            ) -> tuple[int, dict[str, str], bytes]:
        """One API request: (status, headers, body) of the answer."""
        parts = urllib.parse.urlsplit(raw_path)
        query = dict(urllib.parse.parse_qsl(parts.query, keep_blank_values=True))
        rec = Received("api", method, raw_path, dict(headers), _parsed(body))
        op, handler = self._route(method, parts.path)
        out_headers = {"Content-Type": "application/json; charset=utf-8", "Request-ID": secrets.token_hex(20)}
        signed = True
        try:
            problem = self._check_auth(method, raw_path, headers, body)
            if problem:
                signed = False                      # WeChat Pay does not sign the refusal of an unsigned request
                raise _Refusal(401, "SIGN_ERROR", problem)
            rec.sign_ok = True
            if not headers.get("User-Agent"):
                raise _Refusal(400, "INVALID_REQUEST", "HTTP 请求缺少 User-Agent")
            if "json" not in (headers.get("Accept") or "*/*") and "*/*" not in (headers.get("Accept") or ""):
                raise _Refusal(400, "INVALID_REQUEST", "Accept 应为 application/json")
            if handler is None:
                raise _Refusal(404, "NOT_FOUND", "请求的资源不存在")
            if method == "POST" and "application/json" not in (headers.get("Content-Type") or ""):
                raise _Refusal(400, "INVALID_REQUEST", "Content-Type 应为 application/json")
            with self._lock:
                fail = self.fail_next.pop(op, None)
            if fail is not None:
                raise _Refusal(*fail)
            with self._lock:
                status, data = handler(parts.path, query, body, headers)
        except _Refusal as r:
            status, data = r.status, {"code": r.code, "message": r.message}
            rec.code = r.code
        rec.status = status
        if rec.sign_ok is None:
            rec.sign_ok = False
        with self._lock:
            self.received.append(rec)
        if isinstance(data, bytes):                 # the bill download: not signed (check its SHA1 instead)
            return status, {"Content-Type": "text/plain; charset=utf-8"}, data
        out = b"" if data is None else json.dumps(data, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
        if signed and not self.unsigned_answers:
            which = self.signer
            asked = headers.get("Wechatpay-Serial") or ""
            if self.follow_request_serial and asked:
                if asked == self.keys.public_key_id:
                    which = "public_key"
                elif _norm_serial(asked) == _norm_serial(self.keys.platform_serial):
                    which = "platform_cert"
            out_headers |= self.sign_headers(out, which, bad=self.bad_answer_signature)
            if self.sign_test_answers:
                out_headers["Wechatpay-Signature"] = "WECHATPAY/SIGNTEST/" + out_headers["Wechatpay-Signature"][19:]
        return status, out_headers, out

    def _route(self, method: str, path: str) -> tuple[str, Any]:
        if method == "POST" and path in ("/v3/pay/transactions/jsapi", "/v3/pay/transactions/h5",
                                         "/v3/pay/transactions/native"):
            kind = path.rsplit("/", 1)[1]
            return kind, lambda p, q, b, h: self._create(kind, _json_body(b), h)
        m = re.fullmatch(r"/v3/pay/transactions/out-trade-no/([^/]+)", path)
        if method == "GET" and m:
            return "query", lambda p, q, b, h: self._query(urllib.parse.unquote(m.group(1)), q)
        m = re.fullmatch(r"/v3/pay/transactions/out-trade-no/([^/]+)/close", path)
        if method == "POST" and m:
            return "close", lambda p, q, b, h: self._close(urllib.parse.unquote(m.group(1)), _json_body(b))
        if method == "POST" and path == "/v3/refund/domestic/refunds":
            return "refund", lambda p, q, b, h: self._refund(_json_body(b))
        m = re.fullmatch(r"/v3/refund/domestic/refunds/([^/]+)", path)
        if method == "GET" and m:
            return "query_refund", lambda p, q, b, h: self._query_refund(urllib.parse.unquote(m.group(1)))
        if method == "GET" and path == "/v3/bill/tradebill":
            return "tradebill", lambda p, q, b, h: self._tradebill(q)
        if method == "GET" and path == "/v3/billdownload/file":
            return "download", lambda p, q, b, h: self._download(q)
        return "", None

    def _create(self, kind: str, b: dict[str, Any], headers: Mapping[str, str]) -> tuple[int, dict[str, Any]]:
        for name in ("appid", "mchid", "description", "out_trade_no", "notify_url", "amount"):
            if b.get(name) in (None, ""):
                raise _required(name)
        if b["mchid"] != self.mchid:
            raise _Refusal(400, "INVALID_REQUEST", "请求的 mchid 与 Authorization 中的商户号不一致")
        if b["appid"] != self.appid:
            raise _Refusal(400, "APPID_MCHID_NOT_MATCH", "appid 和 mchid 不匹配")
        no = b["out_trade_no"]
        if not isinstance(no, str) or not _OUT_TRADE_NO.match(no):
            raise _Refusal(400, "PARAM_ERROR", "out_trade_no 为6-32位数字、大小写字母或_-|*")
        desc = b["description"]
        if not isinstance(desc, str) or len(desc.encode("utf-8")) > 127:
            raise _Refusal(400, "PARAM_ERROR", "description 长度超过 127 字节")
        amount = b["amount"]
        total = amount.get("total") if isinstance(amount, dict) else None
        if not isinstance(total, int) or isinstance(total, bool) or total < 1:
            raise _Refusal(400, "PARAM_ERROR", "amount.total 必须为大于0的整数（分）")
        if amount.get("currency", "CNY") != "CNY":
            raise _Refusal(400, "PARAM_ERROR", "amount.currency 只支持 CNY")
        _check_notify_url(b["notify_url"])
        now = self.clock_ms()
        expires = now + 2 * 3_600_000                # the published default: two hours
        if "time_expire" in b:
            expires = _parse_rfc3339(b["time_expire"]) or 0
            if not expires:
                raise _Refusal(400, "PARAM_ERROR", "time_expire 不是 rfc3339 格式")
            if expires <= now:
                raise _Refusal(400, "PARAM_ERROR", "time_expire 早于当前时间")
        openid, ip = "", ""
        if kind == "jsapi":
            payer = b.get("payer")
            openid = payer.get("openid") if isinstance(payer, dict) else None
            if not isinstance(openid, str) or not openid:
                raise _required("payer/openid")
        if kind == "h5":
            scene = b.get("scene_info")
            ip = scene.get("payer_client_ip") if isinstance(scene, dict) else None
            h5 = scene.get("h5_info") if isinstance(scene, dict) else None
            if not isinstance(ip, str) or not ip:
                raise _required("scene_info/payer_client_ip")
            if not isinstance(h5, dict) or h5.get("type") not in ("iOS", "Android", "Wap"):
                raise _required("scene_info/h5_info/type")
        known = self.orders.get(no)
        if known is not None:
            self._fresh(known)
            if known.state in ("SUCCESS", "REFUND"):
                raise _Refusal(400, "ORDERPAID", "该订单已支付")
            if known.state == "CLOSED":
                raise _Refusal(400, "ORDER_CLOSED", "订单已关闭")
            if (known.channel, known.amount_fen, known.description, known.payer_openid) != (kind, total, desc, openid):
                raise _Refusal(403, "OUT_TRADE_NO_USED", "商户订单号重复")
            return 200, self._prepay_answer(known)
        o = Order(out_trade_no=no, appid=b["appid"], mchid=b["mchid"], channel=kind, description=desc,
                  notify_url=b["notify_url"], amount_fen=total, expires_ms=expires, created_ms=now,
                  prepay_id=f"wx{datetime.now(CHINA):%d%H%M%S}{secrets.token_hex(13)}", payer_openid=openid or "",
                  client_ip=ip or "", attach=str(b.get("attach") or ""))
        if kind == "h5":
            o.h5_url = (f"{self.base_url}/cgi-bin/mmpayweb-bin/checkmweb?prepay_id={o.prepay_id}"
                        f"&package={_digits(10)}")
        if kind == "native":
            o.code_url = f"weixin://wxpay/bizpayurl?pr={secrets.token_urlsafe(6)[:7]}"
            self._codes[o.code_url] = no
        self.orders[no] = o
        self._prepay[o.prepay_id] = no
        return 200, self._prepay_answer(o)

    @staticmethod
    def _prepay_answer(o: Order) -> dict[str, str]:
        return {"jsapi": {"prepay_id": o.prepay_id}, "h5": {"h5_url": o.h5_url},
                "native": {"code_url": o.code_url}}[o.channel]

    def _transaction(self, o: Order) -> dict[str, Any]:
        d: dict[str, Any] = {"appid": o.appid, "mchid": o.mchid, "out_trade_no": o.out_trade_no,
                             "trade_type": o.trade_type, "trade_state": o.state,
                             "trade_state_desc": _STATE_DESC[o.state], "attach": o.attach,
                             "amount": {"total": o.amount_fen, "currency": "CNY"}}
        if o.transaction_id:
            d |= {"transaction_id": o.transaction_id, "bank_type": "OTHERS", "success_time": _rfc3339(o.success_ms),
                  "payer": {"openid": o.payer_openid},
                  "amount": {"total": o.amount_fen, "payer_total": o.amount_fen, "currency": "CNY",
                             "payer_currency": "CNY"}}
        return d

    def _known(self, no: str) -> Order:
        o = self.orders.get(no)
        if o is None:
            raise _Refusal(404, "ORDER_NOT_EXIST", "订单不存在")
        return self._fresh(o)

    def _query(self, no: str, query: dict[str, str]) -> tuple[int, dict[str, Any]]:
        if query.get("mchid") != self.mchid:
            raise _Refusal(400, "PARAM_ERROR", "mchid 与请求的商户号不一致")
        return 200, self._transaction(self._known(no))

    def _close(self, no: str, b: dict[str, Any]) -> tuple[int, None]:
        if b.get("mchid") != self.mchid:
            raise _required("mchid")
        o = self._known(no)
        if o.state in ("SUCCESS", "REFUND"):
            raise _Refusal(400, "ORDERPAID", "该订单已支付，无法关闭")
        if o.state == "NOTPAY":
            o.state, o.closed_ms = "CLOSED", self.clock_ms()
        return 204, None

    def _refund_json(self, r: Refund) -> dict[str, Any]:
        o = self.orders[r.out_trade_no]
        d: dict[str, Any] = {
            "refund_id": r.refund_id, "out_refund_no": r.out_refund_no, "transaction_id": o.transaction_id,
            "out_trade_no": o.out_trade_no, "channel": "ORIGINAL", "user_received_account": "支付用户零钱",
            "create_time": _rfc3339(r.created_ms), "status": r.status, "funds_account": "AVAILABLE",
            "amount": {"total": o.amount_fen, "refund": r.amount_fen, "from": [], "payer_total": o.amount_fen,
                       "payer_refund": r.amount_fen, "settlement_refund": r.amount_fen,
                       "settlement_total": o.amount_fen, "discount_refund": 0, "currency": "CNY", "refund_fee": 0}}
        if r.success_ms:
            d["success_time"] = _rfc3339(r.success_ms)
        return d

    def _refund(self, b: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        no = b.get("out_refund_no")
        if not isinstance(no, str) or not _OUT_REFUND_NO.match(no):
            raise _required("out_refund_no")
        amount = b.get("amount")
        if not isinstance(amount, dict):
            raise _required("amount")
        refund, total = amount.get("refund"), amount.get("total")
        if not all(isinstance(x, int) and not isinstance(x, bool) for x in (refund, total)) or refund < 1:
            raise _Refusal(400, "PARAM_ERROR", "amount.refund / amount.total 必须为正整数（分）")
        if amount.get("currency", "CNY") != "CNY":
            raise _Refusal(400, "PARAM_ERROR", "amount.currency 只支持 CNY")
        if b.get("notify_url"):
            _check_notify_url(b["notify_url"])
        reason = b.get("reason") or ""
        if not isinstance(reason, str) or len(reason.encode("utf-8")) > 80:
            raise _Refusal(400, "PARAM_ERROR", "reason 长度超过 80 字节")
        trade_no, txn = b.get("out_trade_no"), b.get("transaction_id")
        o = self.orders.get(trade_no) if trade_no else next(
            (x for x in self.orders.values() if txn and x.transaction_id == txn), None)
        if o is None:
            raise _Refusal(404, "RESOURCE_NOT_EXISTS", "订单不存在")
        known = self.refunds.get(no)
        if known is not None:
            if known.out_trade_no != o.out_trade_no or known.amount_fen != refund:
                raise _Refusal(400, "INVALID_REQUEST", "退款单号已使用，但本次请求的参数与原请求不一致")
            return 200, self._refund_json(known)            # the same out_refund_no refunds once
        if o.state not in ("SUCCESS", "REFUND"):
            raise _Refusal(400, "INVALID_REQUEST", "订单状态不正确，未支付的订单不能退款")
        if total != o.amount_fen:
            raise _Refusal(400, "INVALID_REQUEST", "订单金额与原订单金额不一致")
        now = self.clock_ms()
        if now - o.success_ms > REFUND_PERIOD_MS:
            raise _Refusal(400, "INVALID_REQUEST", "订单已超过可退款的最大期限")
        if refund > o.amount_fen - o.refunded_fen():
            raise _Refusal(400, "INVALID_REQUEST", "申请退款金额超过订单可退金额")
        r = Refund(out_refund_no=no, refund_id="503" + _digits(26), out_trade_no=o.out_trade_no, amount_fen=refund,
                   reason=reason, notify_url=str(b.get("notify_url") or ""), created_ms=now)
        if self.refund_instant:
            r.status, r.success_ms = "SUCCESS", now
        self.refunds[no] = r
        o.refunds[no] = r
        o.state = "REFUND"
        if self.refund_instant and self.auto_notify and r.notify_url:
            self._send_later("refund", o.out_trade_no, no, r.notify_url,
                             self._event("REFUND.SUCCESS", "退款成功", "refund", self._refund_resource(r)))
        return 200, self._refund_json(r)

    def _query_refund(self, no: str) -> tuple[int, dict[str, Any]]:
        r = self.refunds.get(no)
        if r is None:
            raise _Refusal(404, "RESOURCE_NOT_EXISTS", "退款单不存在")
        return 200, self._refund_json(r)

    def _tradebill(self, query: dict[str, str]) -> tuple[int, dict[str, Any]]:
        try:
            day = date.fromisoformat(query.get("bill_date", ""))
        except ValueError:
            raise _Refusal(400, "PARAM_ERROR", "bill_date 格式应为 yyyy-MM-DD") from None
        if query.get("bill_type", "ALL") != "ALL":
            raise _Refusal(400, "PARAM_ERROR", "this stand-in gives bill_type ALL only")
        today = datetime.fromtimestamp(self.clock_ms() / 1000, CHINA).date()
        if day < today - timedelta(days=92):
            raise _Refusal(400, "INVALID_REQUEST", "仅支持三个月内的账单下载申请")
        if self.bill_state == "creating":
            raise _Refusal(400, "STATEMENT_CREATING", "账单生成中，请稍后再试")
        if self.bill_state == "missing" or day >= today:
            raise _Refusal(400, "NO_STATEMENT_EXIST", "账单文件不存在")
        data = self.bill_csv(day)
        token = secrets.token_urlsafe(24)
        self._bills[token] = (time.monotonic() + BILL_URL_TTL_S, data)
        digest = hashlib.sha1(data + (b"!" if self.bill_hash_wrong else b"")).hexdigest()
        return 200, {"hash_type": "SHA1", "hash_value": digest,
                     "download_url": f"{self.base_url}/v3/billdownload/file?token={token}"}

    def _download(self, query: dict[str, str]) -> tuple[int, bytes | dict[str, Any]]:
        expires, data = self._bills.get(query.get("token", ""), (0.0, b""))
        if time.monotonic() > expires:
            raise _Refusal(400, "INVALID_REQUEST", "下载地址已失效，请重新申请")
        return 200, data

    # ------------------------------------------------------------------ the bill

    def bill_csv(self, day: date) -> bytes:
        """The day's trade bill (ALL) as WeChat Pay's file: the payments that succeeded that day and the refunds
        asked for that day (with their state then), every field prefixed with a backtick, then the summary."""
        lo = int(datetime(day.year, day.month, day.day, tzinfo=CHINA).timestamp() * 1000)
        hi = lo + 86_400_000
        header = ("交易时间,公众账号ID,商户号,特约商户号,设备号,微信订单号,商户订单号,用户标识,交易类型,交易状态,"
                  "付款银行,货币种类,应结订单金额,代金券金额,微信退款单号,商户退款单号,退款金额,充值券退款金额,退款类型,"
                  "退款状态,商品名称,商户数据包,手续费,费率,订单金额,申请退款金额,费率备注")
        rows: list[list[str]] = []
        paid_fen = refunded_fen = 0
        fee_total = Decimal(0)
        with self._lock:
            for o in self.orders.values():
                if o.transaction_id and lo <= o.success_ms < hi:
                    fee = _fee(o.amount_fen)
                    fee_total += fee
                    paid_fen += o.amount_fen
                    rows.append([_ctime(o.success_ms), o.appid, o.mchid, "0", "", o.transaction_id, o.out_trade_no,
                                 o.payer_openid, o.trade_type, "SUCCESS", "OTHERS", "CNY", _yuan(o.amount_fen), "0.00",
                                 "0", "0", "0.00", "0.00", "", "", o.description, o.attach, f"{fee:.5f}", "0.60%",
                                 _yuan(o.amount_fen), "0.00", ""])
                for r in o.refunds.values():
                    if lo <= r.created_ms < hi:
                        fee = _fee(r.amount_fen)
                        fee_total -= fee
                        refunded_fen += r.amount_fen
                        rows.append([_ctime(r.created_ms), o.appid, o.mchid, "0", "", o.transaction_id,
                                     o.out_trade_no, o.payer_openid, o.trade_type, "REFUND", "OTHERS", "CNY", "0.00",
                                     "0.00", r.refund_id, r.out_refund_no, _yuan(r.amount_fen), "0.00", "ORIGINAL",
                                     r.status, o.description, o.attach, f"-{fee:.5f}", "0.60%", "0.00",
                                     _yuan(r.amount_fen), ""])
        rows.sort(key=lambda row: row[0])
        lines = [header] + [",".join("`" + c for c in row) for row in rows]
        lines.append("总交易单数,应结订单总金额,退款总金额,充值券退款总金额,手续费总金额,订单总金额,申请退款总金额")
        lines.append(",".join("`" + c for c in (str(len(rows)), _yuan(paid_fen), _yuan(refunded_fen), "0.00",
                                                f"{fee_total:.5f}", _yuan(paid_fen), _yuan(refunded_fen))))
        return ("\r\n".join(lines) + "\r\n").encode("utf-8")

    # ------------------------------------------------------------------ pages and the web authorisation

    def h5_page(self, query: dict[str, str]) -> tuple[int, str]:
        with self._lock:
            no = self._prepay.get(query.get("prepay_id", ""))
            o = self._fresh(self.orders[no]) if no else None
        if o is None or o.channel != "h5":
            return 200, _page("商家参数格式有误，请联系商家解决", '<p id="error">prepay_id 无效</p>')
        redirect = query.get("redirect_url", "")
        e = html.escape
        if o.state != "NOTPAY":
            body = f'<p id="state">{"该订单已支付" if o.state != "CLOSED" else "订单已关闭"}</p>'
        else:
            body = (f'<form method="post" action="/standin/h5-pay"><input type="hidden" name="prepay_id" '
                    f'value="{e(o.prepay_id)}"><input type="hidden" name="redirect_url" value="{e(redirect)}">'
                    f'<button id="pay" type="submit">确认支付</button></form>')
        return 200, _page("微信支付", f'<p id="subject">{e(o.description)}</p><p id="amount">￥{_yuan(o.amount_fen)}'
                                       f"</p>{body}")

    def h5_pay(self, form: dict[str, str]) -> tuple[int, dict[str, str], str]:
        try:
            self.pay_prepay(form.get("prepay_id", ""))
        except KeyError:
            return 404, {}, _page("微信支付", '<p id="error">订单不存在</p>')
        except ValueError as e:
            return 200, {}, _page("微信支付", f'<p id="error">{html.escape(str(e))}</p>')
        redirect = form.get("redirect_url", "")
        if not redirect:
            return 200, {}, _page("微信支付", '<p id="state">支付成功</p>')
        return 303, {"Location": redirect}, ""

    def jsapi_pay(self, params: dict[str, Any]) -> tuple[int, dict[str, str]]:
        """The WeChat app's getBrandWCPayRequest: the full JSAPI parameters (paySign checked with the merchant's
        public key over appId\\ntimeStamp\\nnonceStr\\npackage\\n), or just ``prepay_id``; ``cancel`` true: the
        person closes the sheet."""
        def fail(why: str) -> tuple[int, dict[str, str]]:
            return 400, {"err_msg": "get_brand_wcpay_request:fail", "err_desc": why}

        if "package" in params:
            appid, ts, nonce, package = (str(params.get(k, "")) for k in ("appId", "timeStamp", "nonceStr", "package"))
            if appid != self.appid:
                return fail("appId 与商户号不匹配")
            if params.get("signType") != "RSA":
                return fail("signType 应为 RSA")
            message = f"{appid}\n{ts}\n{nonce}\n{package}\n".encode()
            if not verify(self.keys.merchant.public_key(), message, str(params.get("paySign", ""))):
                return fail("支付验证签名失败")
            if not package.startswith("prepay_id="):
                return fail("package 格式错误")
            prepay = package[len("prepay_id="):]
        else:
            prepay = str(params.get("prepay_id", ""))
        with self._lock:
            no = self._prepay.get(prepay)
            o = self.orders.get(no) if no else None
        if o is None or o.channel != "jsapi":
            return fail("prepay_id 无效")
        if params.get("cancel"):
            return 200, {"err_msg": "get_brand_wcpay_request:cancel"}
        try:
            self.pay(o.out_trade_no)
        except ValueError as e:
            return fail(str(e))
        return 200, {"err_msg": "get_brand_wcpay_request:ok"}

    def native_pay(self, code_url: str) -> tuple[int, str]:
        try:
            self.scan(code_url)
        except KeyError:
            return 404, "二维码无效"
        except ValueError as e:
            return 400, str(e)
        return 200, "支付成功"

    def scan_page(self, code_url: str) -> str:
        with self._lock:
            no = self._codes.get(code_url)
            o = self._fresh(self.orders[no]) if no else None
        if o is None:
            return _page("微信支付", '<p id="error">二维码无效</p>')
        if o.state != "NOTPAY":
            return _page("微信支付", f'<p id="state">{"该订单已支付" if o.state != "CLOSED" else "订单已关闭"}</p>')
        return _page("微信支付", f'<p id="amount">￥{_yuan(o.amount_fen)}</p><form method="post" '
                                 f'action="/standin/native-pay"><input type="hidden" name="code_url" '
                                 f'value="{html.escape(code_url)}"><button id="pay" type="submit">确认支付</button>'
                                 "</form>")

    def authorize(self, query: dict[str, str]) -> tuple[int, dict[str, str], str]:
        """``/connect/oauth2/authorize``: inside WeChat, snsapi_base sends the person straight back to
        redirect_uri with ``code`` and ``state``."""
        redirect, state = query.get("redirect_uri", ""), query.get("state", "")
        if query.get("appid") != self.appid:
            return 200, {}, _page("微信授权", '<p id="error">Oops! Something went wrong:( 10016 appid 参数错误</p>')
        if query.get("response_type") != "code" or query.get("scope") not in ("snsapi_base", "snsapi_userinfo"):
            return 200, {}, _page("微信授权", '<p id="error">10005 scope 参数错误或没有 scope 权限</p>')
        if urllib.parse.urlsplit(redirect).scheme not in ("http", "https"):
            return 200, {}, _page("微信授权", '<p id="error">10003 redirect_uri 参数错误</p>')
        code = secrets.token_hex(16)
        with self._lock:
            self._oauth_codes[code] = (self.oauth_openid, time.monotonic() + OAUTH_CODE_TTL_S)
        target, _, fragment = redirect.partition("#")
        back = target + ("&" if "?" in target else "?") + urllib.parse.urlencode({"code": code, "state": state})
        return 302, {"Location": back + ("#" + fragment if fragment else "")}, ""

    def access_token(self, query: dict[str, str]) -> dict[str, Any]:
        """``/sns/oauth2/access_token``: a code (once, within 5 minutes) for the openid."""
        if query.get("appid") != self.appid:
            return {"errcode": 40013, "errmsg": "invalid appid"}
        if query.get("secret") != self.app_secret:
            return {"errcode": 40125, "errmsg": "invalid appsecret"}
        if query.get("grant_type") != "authorization_code":
            return {"errcode": 40002, "errmsg": "invalid grant_type"}
        with self._lock:
            known = self._oauth_codes.pop(query.get("code", ""), None)
        if known is None:
            return {"errcode": 40029, "errmsg": "invalid code"}
        openid, expires = known
        if time.monotonic() > expires:
            return {"errcode": 40163, "errmsg": "code been used"}
        out: dict[str, Any] = {"access_token": secrets.token_urlsafe(48), "expires_in": 7200,
                               "refresh_token": secrets.token_urlsafe(48), "openid": openid, "scope": "snsapi_base"}
        if self.snapshot_user:
            out["is_snapshotuser"] = 1
        return out


def _fee(fen: int) -> Decimal:
    return (Decimal(fen) * Decimal("0.006") / 100).quantize(Decimal("0.00001"), ROUND_HALF_UP)


def _check_notify_url(url: Any) -> None:
    parts = urllib.parse.urlsplit(url) if isinstance(url, str) else None
    ok = parts is not None and len(url) <= 256 and parts.netloc and not parts.query and not parts.fragment and (
        parts.scheme == "https" or (parts.scheme == "http" and (parts.hostname or "") in _LOOPBACK))
    if not ok:
        raise _Refusal(400, "PARAM_ERROR", "notify_url 必须为 https 地址，不能携带参数")


def _json_body(body: bytes) -> dict[str, Any]:
    try:
        data = json.loads(body.decode("utf-8")) if body else None
    except (ValueError, UnicodeDecodeError):
        data = None
    if not isinstance(data, dict):
        raise _Refusal(400, "PARAM_ERROR", "请求体不是合法的 JSON 对象")
    return data


def _parsed(body: bytes) -> Any:
    if not body:
        return None
    try:
        return json.loads(body.decode("utf-8"))
    except (ValueError, UnicodeDecodeError):
        return body.decode("utf-8", errors="replace")


def _page(title: str, body: str) -> str:
    return (f'<!doctype html><html lang="zh"><head><meta charset="utf-8"><meta name="viewport" '
            f'content="width=device-width,initial-scale=1"><title>{html.escape(title)} (stand-in)</title></head>'
            f"<body><h1>微信支付 WeChat Pay (stand-in)</h1>{body}</body></html>")


_CORS = {"Access-Control-Allow-Origin": "*", "Access-Control-Allow-Methods": "POST, OPTIONS",
         "Access-Control-Allow-Headers": "Content-Type", "Access-Control-Max-Age": "600"}


class _Handler(BaseHTTPRequestHandler):
    owner: WechatPayStandIn
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _send(self, status: int, ctype: str, body: bytes, headers: Mapping[str, str] | None = None) -> None:
        self.send_response(status)
        if body or status not in (204, 304):
            self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        for k, v in (headers or {}).items():
            if k.lower() != "content-type":
                self.send_header(k, v)
        self.end_headers()
        if body:
            self.wfile.write(body)

    def _html(self, status: int, text: str, headers: Mapping[str, str] | None = None) -> None:
        self._send(status, "text/html;charset=utf-8", text.encode("utf-8"), headers)

    def _json(self, status: int, data: Any, headers: Mapping[str, str] | None = None) -> None:
        self._send(status, "application/json; charset=utf-8",
                   json.dumps(data, ensure_ascii=False).encode("utf-8"), headers)

    def _body(self) -> bytes:
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _record(self, kind: str, body: Any) -> None:
        with self.owner._lock:
            self.owner.received.append(Received(kind, self.command, self.path, dict(self.headers.items()), body))

    def _api(self) -> None:
        body = self._body()
        status, headers, out = self.owner.api(self.command, self.path, dict(self.headers.items()), body)
        self._send(status, headers.get("Content-Type", "application/json"), out, headers)

    def do_GET(self) -> None:
        parts = urllib.parse.urlsplit(self.path)
        query = dict(urllib.parse.parse_qsl(parts.query, keep_blank_values=True))
        s = self.owner
        if parts.path.startswith("/v3/"):
            self._api()
        elif parts.path == "/cgi-bin/mmpayweb-bin/checkmweb":
            self._record("page", None)
            self._html(*s.h5_page(query))
        elif parts.path == "/standin/scan":
            self._record("page", None)
            self._html(200, s.scan_page(query.get("code_url", "")))
        elif parts.path == "/connect/oauth2/authorize":
            self._record("oauth", None)
            status, headers, text = s.authorize(query)
            self._html(status, text, headers)
        elif parts.path == "/sns/oauth2/access_token":
            self._record("oauth", None)
            self._json(200, s.access_token(query))
        else:
            self._html(404, _page("404", "<p>not found</p>"))

    def do_POST(self) -> None:
        parts = urllib.parse.urlsplit(self.path)
        s = self.owner
        if parts.path.startswith("/v3/"):
            self._api()
            return
        raw = self._body()
        is_json = "json" in (self.headers.get("Content-Type") or "")
        form = _parsed(raw) if is_json else dict(urllib.parse.parse_qsl(raw.decode("utf-8", errors="replace"),
                                                                        keep_blank_values=True))
        self._record("page", form)
        if not isinstance(form, dict):
            self._json(400, {"err_msg": "bad request"}, _CORS)
        elif parts.path == "/standin/h5-pay":
            status, headers, text = s.h5_pay(form)
            self._html(status, text, headers)
        elif parts.path == "/standin/jsapi-pay":
            self._json(*s.jsapi_pay(form), _CORS)
        elif parts.path == "/standin/native-pay":
            status, text = s.native_pay(str(form.get("code_url", "")))
            if is_json:
                self._json(status, {"ok": status == 200, "message": text}, _CORS)
            else:
                self._html(status, _page("微信支付", f'<p id="state">{html.escape(text)}</p>'))
        else:
            self._html(404, _page("404", "<p>not found</p>"))

    def do_OPTIONS(self) -> None:
        self._send(204, "text/plain", b"", _CORS)
