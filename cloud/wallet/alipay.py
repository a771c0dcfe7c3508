"""Alipay (支付宝开放平台), the real payment provider: top-ups through the mobile-browser pay page
(``alipay.trade.wap.pay``, channel ``wap``) or a QR code to scan with the Alipay app (``alipay.trade.precreate``,
channel ``precreate``), order queries and closing, refunds and their queries, the daily trade bill, and the
asynchronous notifications Alipay posts to us. It speaks the open platform's published protocol with our own
code (``requests`` and ``cryptography``; no SDK), in public-key mode (公钥模式; certificate mode is not supported):

* Requests carry the common parameters (公共请求参数: app_id, method, format JSON, charset utf-8, sign_type RSA2,
  timestamp ``yyyy-MM-dd HH:mm:ss`` in China time, version 1.0, biz_content as JSON, notify_url / return_url
  where they apply), signed as published (自行实现签名): every parameter but ``sign`` and the empty ones, sorted
  by name, joined ``k=v`` with ``&`` on the raw values, SHA256withRSA with the app's private key, base64. API
  calls are POSTed to the gateway (the common parameters in the query string, biz_content in the form body);
  the WAP pay page is a signed GET address on the gateway that the person's browser opens.
* Every synchronous answer ``{"<method>_response": {...}, "sign": "..."}`` is checked before anything in it is
  trusted: the signature covers the raw JSON text of the ``…_response`` value exactly as received (it is cut out
  of the answer, never re-serialised), SHA256withRSA with Alipay's public key. ``code`` 10000 is success; other
  answers become :class:`ProviderError` with Alipay's ``sub_code`` (retryable for Alipay's system errors, code
  20000, ``isp.*`` and network failures). An unsigned or badly signed answer is never read as a fact ("no such
  trade" included): it is a retryable error, since what happened at Alipay is then unknown.
* Notifications (异步通知) are form-encoded POSTs, checked by the published rule (异步通知验签): drop ``sign``
  and ``sign_type``, sort the rest by name, join ``k=v`` with ``&`` on the URL-decoded values, verify
  SHA256withRSA with Alipay's public key; then ``app_id`` and ``seller_id`` must be ours. Alipay publishes no
  signed timestamp window for notifications; it retries an unanswered one for about 25 hours (4m, 10m, 10m, 1h,
  2h, 6h, 15h), so a ``notify_time`` more than 25 hours old (or an hour ahead) is refused as stale. A repeat is
  harmless: the wallet credits an order once. The answer Alipay expects is the bare text ``success``.
* Amounts are yuan with at most two decimals on the wire and integer fen here, converted exactly (Decimal).

Neither keys nor signatures are ever logged or put in an error message.
"""

from __future__ import annotations

import base64
import csv
import hashlib
import io
import json
import logging
import re
import time
import urllib.parse
import zipfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import date, datetime
from decimal import Decimal, InvalidOperation
from typing import Any

import requests
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from cloud.errors import Invalid, ProviderConfigError, Unauthenticated, Unavailable
from cloud.wallet.payments import (
    CHINA,
    BillRow,
    Notification,
    NotifyAck,
    PayRequest,
    PayStart,
    ProviderError,
    RefundNotice,
    RefundRequest,
)

log = logging.getLogger("tapshare.cloud.alipay")

NAME = "alipay"
DEFAULT_GATEWAY = "https://openapi.alipay.com/gateway.do"
CHANNELS = ("wap", "precreate")
TIMEOUT = (5, 10)                                   # connect, read (seconds)
NOTIFY_MAX_AGE_MS = 25 * 3_600_000                  # Alipay retries a notification for about 25 hours
NOTIFY_MAX_AHEAD_MS = 3_600_000                     # clocks differ; a notification from the future is not genuine
MAX_BILL_BYTES = 64 * 1024 * 1024
MAX_NOTIFY_BYTES = 256 * 1024
MIN_RSA_BITS = 2048

ENV_APP_ID = "TAPSHARE_ALIPAY_APP_ID"
ENV_PRIVATE_KEY = "TAPSHARE_ALIPAY_PRIVATE_KEY_FILE"
ENV_PUBLIC_KEY = "TAPSHARE_ALIPAY_PUBLIC_KEY_FILE"
ENV_SELLER_ID = "TAPSHARE_ALIPAY_SELLER_ID"
ENV_GATEWAY = "TAPSHARE_ALIPAY_GATEWAY"
ENV_CHANNELS = "TAPSHARE_ALIPAY_CHANNELS"
ENV_REFUND_WINDOW = "TAPSHARE_ALIPAY_REFUND_WINDOW_DAYS"

_APP_ID = re.compile(r"^[0-9]{16,32}$")             # APPIDs are 16 digits (String(32) in the common parameters)
_SELLER_ID = re.compile(r"^2088[0-9]{12}$")         # partner / seller ids: 16 digits starting 2088
_AMOUNT = re.compile(r"^(0|[1-9][0-9]{0,9})(\.[0-9]{1,2})?$")
_SIGNED_AMOUNT = re.compile(r"^-?(0|[1-9][0-9]{0,9})(\.[0-9]{1,2})?$")
_TIME = re.compile(r"^(\d{4})-(\d{2})-(\d{2}) (\d{2}):(\d{2}):(\d{2})(?:\.(\d{1,6}))?$")
_LOOPBACK = {"127.0.0.1", "localhost", "::1", "[::1]"}

# Alipay's answers that mean "try again later": its system errors, service unavailable (20000), isp.* (its side)
_RETRYABLE_SUB = {"ACQ.SYSTEM_ERROR", "aop.ACQ.SYSTEM_ERROR", "ACQ.SELLER_BALANCE_NOT_ENOUGH",
                  "ACQ.REFUND_CHARGE_ERROR"}


# ---------------------------------------------------------------------------------------------- small helpers


def yuan(fen: int) -> str:
    """Integer fen as Alipay's yuan text with two decimals, exactly: 1230 → ``12.30``."""
    if fen < 0:
        raise ValueError("a negative amount")
    return f"{fen // 100}.{fen % 100:02d}"


def fen_of(text: Any, *, signed: bool = False) -> int | None:
    """Alipay's yuan text (at most two decimals) as integer fen, exactly; None if it is not such a text."""
    if not isinstance(text, str) or not (_SIGNED_AMOUNT if signed else _AMOUNT).match(text):
        return None
    try:
        return int(Decimal(text) * 100)
    except InvalidOperation:
        return None


def china_time(ms: int) -> str:
    """Milliseconds since the epoch as Alipay's ``yyyy-MM-dd HH:mm:ss`` in China time (UTC+8)."""
    return datetime.fromtimestamp(ms / 1000, CHINA).strftime("%Y-%m-%d %H:%M:%S")


def china_ms(text: Any) -> int | None:
    """Alipay's ``yyyy-MM-dd HH:mm:ss`` (``gmt_refund`` adds ``.SSS``) in China time as milliseconds; None if
    it is not such a time."""
    m = _TIME.match(text) if isinstance(text, str) else None
    if m is None:
        return None
    try:
        frac = (m.group(7) or "0").ljust(6, "0")
        at = datetime(*(int(m.group(i)) for i in range(1, 7)), int(frac), tzinfo=CHINA)
    except ValueError:
        return None
    return int(at.timestamp() * 1000)


def sign_content(params: Mapping[str, str], drop: tuple[str, ...] = ("sign",), keep_empty: bool = False) -> str:
    """The published string to sign: the parameters but ``drop`` (and, unless ``keep_empty``, the empty
    ones), sorted by name, ``k=v`` joined with ``&``, on the raw (not URL-encoded) values."""
    return "&".join(f"{k}={params[k]}" for k in sorted(params)
                    if k not in drop and (keep_empty or params[k] != ""))


def rsa2_sign(key: rsa.RSAPrivateKey, content: str | bytes) -> str:
    data = content.encode("utf-8") if isinstance(content, str) else content
    return base64.b64encode(key.sign(data, padding.PKCS1v15(), hashes.SHA256())).decode("ascii")


def rsa2_verify(key: rsa.RSAPublicKey, content: str | bytes, signature: str) -> bool:
    data = content.encode("utf-8") if isinstance(content, str) else content
    try:
        raw = base64.b64decode(signature, validate=True)
        key.verify(raw, data, padding.PKCS1v15(), hashes.SHA256())
    except (InvalidSignature, ValueError, TypeError):
        return False
    return True


def response_value(text: str, name: str) -> str | None:
    """The raw JSON text of the top-level member ``name`` of the JSON object ``text``, exactly as it appears
    (Alipay signs those characters); None if there is no such member. Raises ValueError if ``text`` is not a
    JSON object."""
    dec = json.JSONDecoder()
    ws = " \t\r\n"
    i, n = 0, len(text)
    while i < n and text[i] in ws:
        i += 1
    if i >= n or text[i] != "{":
        raise ValueError("not a JSON object")
    i += 1
    found = None
    while True:
        while i < n and text[i] in ws:
            i += 1
        if i < n and text[i] == "}":
            return found
        key, i = dec.raw_decode(text, i)
        while i < n and text[i] in ws:
            i += 1
        if i >= n or text[i] != ":" or not isinstance(key, str):
            raise ValueError("not a JSON object")
        i += 1
        while i < n and text[i] in ws:
            i += 1
        start = i
        _value, i = dec.raw_decode(text, i)
        if key == name:
            found = text[start:i]
        while i < n and text[i] in ws:
            i += 1
        if i < n and text[i] == ",":
            i += 1
            continue
        if i < n and text[i] == "}":
            return found
        raise ValueError("not a JSON object")


def load_private_key(data: bytes) -> rsa.RSAPrivateKey:
    """The app's RSA private key: PEM (PKCS#1 ``RSA PRIVATE KEY`` or PKCS#8 ``PRIVATE KEY``) or the bare base64
    of the DER that Alipay's key tool writes. Raises ValueError with a message holding no key material."""
    text = _key_text(data)
    if "ENCRYPTED" in text:
        raise ValueError("is encrypted with a passphrase: give the unencrypted key (readable only by the cloud)")
    if "-----BEGIN" in text and "PRIVATE KEY-----" not in text:
        raise ValueError("is not a private key (PEM PKCS#1 or PKCS#8)")
    try:
        if "-----BEGIN" in text:
            key = serialization.load_pem_private_key(text.encode("ascii"), password=None)
        else:
            key = serialization.load_der_private_key(_bare_base64(text), password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        raise ValueError("does not parse as a private key (PEM PKCS#1 / PKCS#8, or bare base64)") from None
    return _rsa_checked(key)


def load_public_key(data: bytes) -> rsa.RSAPublicKey:
    """Alipay's RSA public key: PEM (``PUBLIC KEY`` or ``RSA PUBLIC KEY``) or the bare base64 the open platform
    shows. Raises ValueError with a message holding no key material."""
    text = _key_text(data)
    private = ValueError("holds a private key: this must be Alipay's public key (支付宝公钥)")
    if "PRIVATE KEY" in text:
        raise private
    if "CERTIFICATE" in text:
        raise ValueError("is a certificate: certificate mode is not supported, give Alipay's public key "
                         "(公钥模式, 支付宝公钥)")
    if "-----BEGIN" in text:
        try:
            key = serialization.load_pem_public_key(text.encode("ascii"))
        except (ValueError, TypeError, UnsupportedAlgorithm):
            raise ValueError("does not parse as a public key (PEM, or bare base64)") from None
        return _rsa_checked(key)
    der = _bare_base64(text)
    try:
        key = serialization.load_der_public_key(der)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        try:
            serialization.load_der_private_key(der, password=None)
        except (ValueError, TypeError, UnsupportedAlgorithm):
            raise ValueError("does not parse as a public key (PEM, or bare base64)") from None
        raise private from None
    return _rsa_checked(key)


def _rsa_checked(key: Any) -> Any:
    if not isinstance(key, rsa.RSAPrivateKey | rsa.RSAPublicKey):
        raise ValueError("is not an RSA key (Alipay's RSA2 needs one)")
    if key.key_size < MIN_RSA_BITS:
        raise ValueError(f"is an RSA key of {key.key_size} bits: RSA2 needs {MIN_RSA_BITS} or more")
    return key


def _key_text(data: bytes) -> str:
    try:
        text = data.decode("ascii").strip()
    except UnicodeDecodeError:
        raise ValueError("is not a text key file (PEM or base64)") from None
    if not text:
        raise ValueError("is empty")
    return text


def _bare_base64(text: str) -> bytes:
    try:
        return base64.b64decode("".join(text.split()), validate=True)
    except ValueError:
        raise ValueError("is neither PEM nor base64") from None


def _public_numbers_equal(a: rsa.RSAPublicKey, b: rsa.RSAPublicKey) -> bool:
    return a.public_numbers() == b.public_numbers()


# ---------------------------------------------------------------------------------------------- configuration


@dataclass(frozen=True)
class AlipayConfig:
    """An app on Alipay's open platform: its APPID, its RSA private key (its public half is uploaded to Alipay
    as 应用公钥), Alipay's public key (支付宝公钥, shown on the platform), and the merchant's 2088… partner id."""

    app_id: str
    seller_id: str
    private_key: rsa.RSAPrivateKey = field(repr=False)
    alipay_public_key: rsa.RSAPublicKey = field(repr=False)
    gateway: str = DEFAULT_GATEWAY
    channels: tuple[str, ...] = CHANNELS
    # Alipay refunds a trade only within the refund period of the merchant's contract (签约时设置的可退款时间;
    # past it the trade becomes TRADE_FINISHED and refunds are refused). Twelve months is common: set this to the
    # contract's period.
    refund_window_days: int = 365

    @classmethod
    def from_env(cls, environ: Mapping[str, str]) -> AlipayConfig:
        """Read and check the TAPSHARE_ALIPAY_* variables; every problem at once in one ProviderConfigError that
        names the variables and holds no key material."""
        problems: list[str] = []

        def get(var: str) -> str:
            return (environ.get(var) or "").strip()

        app_id = get(ENV_APP_ID)
        if not app_id:
            problems.append(f"{ENV_APP_ID}: missing (the app's APPID on open.alipay.com)")
        elif not _APP_ID.match(app_id):
            problems.append(f"{ENV_APP_ID}: must be the app's APPID, 16 digits, got {app_id[:40]!r}")
        seller_id = get(ENV_SELLER_ID)
        if not seller_id:
            problems.append(f"{ENV_SELLER_ID}: missing (the merchant's partner id, 16 digits starting 2088)")
        elif not _SELLER_ID.match(seller_id):
            problems.append(f"{ENV_SELLER_ID}: must be 16 digits starting 2088, got {seller_id[:40]!r}")

        def key_file(var: str, loader: Callable[[bytes], Any], what: str) -> Any:
            path = get(var)
            if not path:
                problems.append(f"{var}: missing (the file holding {what})")
                return None
            try:
                with open(path, "rb") as f:
                    data = f.read(65_537)
            except OSError as e:
                problems.append(f"{var}: cannot read {path}: {e.strerror or type(e).__name__}")
                return None
            if len(data) > 65_536:
                problems.append(f"{var}: {path} is too large to be a key file")
                return None
            try:
                return loader(data)
            except ValueError as e:
                problems.append(f"{var}: {path} {e}")
                return None

        private_key = key_file(ENV_PRIVATE_KEY, load_private_key, "the app's RSA private key (应用私钥)")
        public_key = key_file(ENV_PUBLIC_KEY, load_public_key, "Alipay's public key (支付宝公钥)")
        if private_key is not None and public_key is not None and \
                _public_numbers_equal(private_key.public_key(), public_key):
            problems.append(f"{ENV_PUBLIC_KEY}: is the app's own public key (应用公钥), not Alipay's (支付宝公钥)")

        gateway = get(ENV_GATEWAY) or DEFAULT_GATEWAY
        parts = urllib.parse.urlsplit(gateway)
        loopback = parts.scheme == "http" and (parts.hostname or "") in _LOOPBACK
        if not ((parts.scheme == "https" or loopback) and parts.netloc and not parts.query and not parts.fragment):
            problems.append(f"{ENV_GATEWAY}: must be an https:// address without a query (http:// only on "
                            f"loopback), got {gateway[:80]!r}")

        channels = tuple(c.strip() for c in (get(ENV_CHANNELS) or ",".join(CHANNELS)).split(",") if c.strip())
        bad = [c for c in channels if c not in CHANNELS]
        if bad or not channels or len(set(channels)) != len(channels):
            problems.append(f"{ENV_CHANNELS}: must list wap and/or precreate once each, got "
                            f"{','.join(channels)[:80]!r}")

        window_text = get(ENV_REFUND_WINDOW) or "365"
        window = int(window_text) if window_text.isdigit() else 0
        if not 1 <= window <= 3650:
            problems.append(f"{ENV_REFUND_WINDOW}: must be a whole number of days from 1 to 3650 (the refund "
                            f"period in the Alipay contract), got {window_text[:20]!r}")
        if problems:
            raise ProviderConfigError("Alipay: " + "; ".join(problems))
        return cls(app_id=app_id, seller_id=seller_id, private_key=private_key, alipay_public_key=public_key,
                   gateway=gateway, channels=channels, refund_window_days=window)


# ---------------------------------------------------------------------------------------------- the provider


class AlipayError(ProviderError):
    """Alipay refused, or its answer could not be trusted. ``verified``: the refusal came in an answer whose
    signature checked, so its code is Alipay's word (only then is ``ACQ.TRADE_NOT_EXIST`` a fact)."""

    def __init__(self, code: str, message: str, retryable: bool = False, verified: bool = False) -> None:
        super().__init__(NAME, code, message, retryable)
        self.verified = verified


def _retryable(code: str, sub_code: str) -> bool:
    return code == "20000" or sub_code.startswith("isp.") or sub_code in _RETRYABLE_SUB


class Alipay:
    """The :class:`~cloud.wallet.payments.PaymentProvider` for Alipay. ``session``: a ``requests.Session`` to
    use (one is made otherwise); ``clock_ms``: the time source for request timestamps."""

    name = NAME
    is_development = False

    def __init__(self, config: AlipayConfig, session: requests.Session | None = None,
                 clock_ms: Callable[[], int] | None = None) -> None:
        self.config = config
        self.channels: tuple[str, ...] = tuple(config.channels)
        self.refund_window_days: int = config.refund_window_days
        self._session = session or requests.Session()
        self._clock = clock_ms or (lambda: time.time_ns() // 1_000_000)

    # ------------------------------------------------------------------ requests and answers

    def _params(self, method: str, biz: dict[str, Any], **extra: str) -> dict[str, str]:
        """The signed parameters of a request: the common ones, biz_content, notify_url / return_url."""
        cfg = self.config
        params = {"app_id": cfg.app_id, "method": method, "format": "JSON", "charset": "utf-8",
                  "sign_type": "RSA2", "timestamp": china_time(self._clock()), "version": "1.0",
                  "biz_content": json.dumps(biz, ensure_ascii=False, separators=(",", ":"))}
        params.update({k: v for k, v in extra.items() if v})
        params["sign"] = rsa2_sign(cfg.private_key, sign_content(params))
        return params

    def _call(self, method: str, biz: dict[str, Any], **extra: str) -> dict[str, Any]:
        """POST one API call to the gateway; the verified ``…_response`` of a successful answer (code 10000).
        Raises AlipayError for refusals, untrusted answers and network failures."""
        params = self._params(method, biz, **extra)
        body = urllib.parse.urlencode({"biz_content": params.pop("biz_content")}, quote_via=urllib.parse.quote)
        try:
            r = self._session.post(self.config.gateway, params=params, data=body.encode("ascii"), timeout=TIMEOUT,
                                   headers={"Content-Type": "application/x-www-form-urlencoded;charset=utf-8",
                                            "Accept": "application/json"})
        except requests.RequestException as e:
            log.warning("alipay %s: not reached: %s", method, type(e).__name__)
            raise AlipayError("unreachable", f"{method}: Alipay could not be reached ({type(e).__name__})",
                              retryable=True) from None
        if r.status_code != 200:
            log.warning("alipay %s: HTTP %d", method, r.status_code)
            raise AlipayError("unreachable", f"{method}: Alipay answered HTTP {r.status_code}", retryable=True)
        return self._answer(method, r.content)

    def _answer(self, method: str, content: bytes) -> dict[str, Any]:
        node_name = method.replace(".", "_") + "_response"
        try:
            text = content.decode("utf-8")
            doc = json.loads(text)
            if not isinstance(doc, dict):
                raise ValueError("not an object")
            name = node_name if node_name in doc else "error_response" if "error_response" in doc else ""
            raw = response_value(text, name) if name else None
            node = json.loads(raw) if raw is not None else None
            if not isinstance(node, dict):
                raise ValueError(f"no {node_name}")
        except (ValueError, UnicodeDecodeError) as e:
            log.error("alipay %s: unreadable answer (%s)", method, str(e)[:80])
            raise AlipayError("bad_answer", f"{method}: an answer that is not Alipay's JSON", retryable=True) \
                from None
        code, sub_code = str(node.get("code", "")), str(node.get("sub_code", "") or "")
        message = str(node.get("sub_msg") or node.get("msg") or "")[:200]
        sign = doc.get("sign")
        if not isinstance(sign, str) or not sign:
            # Alipay leaves some gateway refusals unsigned (an unknown app, say). Such an answer is not Alipay's
            # word: what happened there is unknown (a refund may have been made), so it is never final.
            log.warning("alipay %s: unsigned answer %s %s", method, code, sub_code)
            if code == "10000":
                raise AlipayError("unsigned_answer", f"{method}: an unsigned success answer", retryable=True)
            raise AlipayError(sub_code or code or "unsigned_answer", f"{message} (unsigned answer)", retryable=True)
        if not rsa2_verify(self.config.alipay_public_key, raw.encode("utf-8"), sign):
            log.error("alipay %s: the answer's signature does not match Alipay's public key", method)
            raise AlipayError("bad_answer_signature", f"{method}: the answer's signature does not match "
                              f"Alipay's public key ({ENV_PUBLIC_KEY})", retryable=True)
        if code != "10000":
            log.info("alipay %s: %s %s", method, code, sub_code)
            raise AlipayError(sub_code or code or "refused", message or "refused", _retryable(code, sub_code),
                              verified=True)
        return node

    @staticmethod
    def _bad(method: str, what: str) -> AlipayError:
        log.error("alipay %s: %s", method, what)
        return AlipayError("bad_answer", f"{method}: {what}", retryable=True, verified=True)

    # ------------------------------------------------------------------ orders

    def create(self, req: PayRequest) -> PayStart:
        if req.channel not in self.channels:
            raise AlipayError("unsupported_channel", f"Alipay here takes {', '.join(self.channels)}, not "
                              f"{req.channel!r}")
        if req.amount_fen <= 0:
            raise AlipayError("invalid_amount", "a top-up must be at least 0.01 yuan")
        biz: dict[str, Any] = {"out_trade_no": req.order_id, "total_amount": yuan(req.amount_fen),
                               "subject": _subject(req.description), "time_expire": china_time(req.expires_ms)}
        if req.channel == "wap":
            biz |= {"product_code": "QUICK_WAP_WAY", "quit_url": req.return_url}
            params = self._params("alipay.trade.wap.pay", biz, notify_url=req.notify_url,
                                  return_url=req.return_url)
            return PayStart("redirect", url=self.config.gateway + "?" +
                            urllib.parse.urlencode(params, quote_via=urllib.parse.quote))
        method = "alipay.trade.precreate"
        node = self._call(method, biz | {"product_code": "FACE_TO_FACE_PAYMENT"}, notify_url=req.notify_url)
        if node.get("out_trade_no") != req.order_id:
            raise self._bad(method, f"the answer is about another order ({str(node.get('out_trade_no'))[:40]})")
        qr = node.get("qr_code")
        if not isinstance(qr, str) or not qr:
            raise self._bad(method, "no qr_code in the answer")
        return PayStart("qr", qr_text=qr)

    def query(self, order_id: str) -> Notification | None:
        method = "alipay.trade.query"
        try:
            node = self._call(method, {"out_trade_no": order_id})
        except AlipayError as e:
            if e.verified and e.code == "ACQ.TRADE_NOT_EXIST":
                return None                 # a WAP page never opened, a QR code never scanned
            raise
        if node.get("out_trade_no") != order_id:
            raise self._bad(method, f"the answer is about another order ({str(node.get('out_trade_no'))[:40]})")
        trade_status = node.get("trade_status")
        status = {"TRADE_SUCCESS": "SUCCESS", "TRADE_FINISHED": "SUCCESS", "TRADE_CLOSED": "CLOSED",
                  "WAIT_BUYER_PAY": "NOTPAY"}.get(trade_status)
        amount = fen_of(node.get("total_amount"))
        if status is None or amount is None:
            raise self._bad(method, f"trade_status {str(trade_status)[:20]!r} / total_amount "
                            f"{str(node.get('total_amount'))[:20]!r} not understood")
        trade_no = str(node.get("trade_no") or "")
        paid_ms = (china_ms(node.get("send_pay_date")) or 0) if status == "SUCCESS" else 0
        return Notification(notification_id=_short(f"query:{trade_no or order_id}:{trade_status}"),
                            order_id=order_id, provider_txn_id=trade_no or "-", amount_fen=amount, status=status,
                            paid_ms=paid_ms)

    def close(self, order_id: str) -> bool:
        try:
            self._call("alipay.trade.close", {"out_trade_no": order_id})
            return True
        except AlipayError as e:
            if e.verified and e.code == "ACQ.TRADE_NOT_EXIST":
                return True                 # never opened / scanned: nothing to close
            if not (e.verified and e.code == "ACQ.TRADE_STATUS_ERROR"):
                raise
        n = self.query(order_id)            # paid, or closed already: ask which
        if n is None or n.status == "CLOSED":
            return True
        if n.status == "SUCCESS":
            return False
        raise AlipayError("ACQ.TRADE_STATUS_ERROR", f"Alipay would not close {order_id}, which waits for payment",
                          retryable=True, verified=True)

    # ------------------------------------------------------------------ notifications

    def verify(self, headers: dict[str, str], body: bytes, now_ms: int) -> Notification | RefundNotice:
        cfg = self.config
        params = _form(body)
        sign, sign_type = params.pop("sign", ""), params.pop("sign_type", "")
        if not sign:
            raise Unauthenticated("unsigned_notification", "Alipay notifications must be signed")
        if sign_type != "RSA2":
            raise Unauthenticated("bad_signature", "Alipay notifications here must be signed RSA2")
        full = sign_content(params, drop=(), keep_empty=True)
        if not rsa2_verify(cfg.alipay_public_key, full, sign):
            compact = sign_content(params, drop=())
            if compact == full or not rsa2_verify(cfg.alipay_public_key, compact, sign):
                log.warning("alipay notification with a bad signature (out_trade_no %s)",
                            str(params.get("out_trade_no"))[:40])
                raise Unauthenticated("bad_signature", "the Alipay notification's signature does not match")
        p = {k: v for k, v in params.items() if v != ""}
        if p.get("app_id") != cfg.app_id or p.get("auth_app_id", cfg.app_id) != cfg.app_id:
            raise Unauthenticated("wrong_merchant", "this Alipay notification is for another app")
        if p.get("seller_id") != cfg.seller_id:
            raise Unauthenticated("wrong_merchant", "this Alipay notification is for another merchant")
        notify_ms = china_ms(p.get("notify_time"))
        if notify_ms is None:
            raise Invalid("bad_notification", "the Alipay notification has no notify_time")
        if notify_ms < now_ms - NOTIFY_MAX_AGE_MS or notify_ms > now_ms + NOTIFY_MAX_AHEAD_MS:
            raise Unauthenticated("stale_notification", "the Alipay notification's notify_time is too far from now")
        if p.get("notify_type", "trade_status_sync") != "trade_status_sync":
            raise Invalid("bad_notification", f"unknown notify_type {p['notify_type'][:40]!r}")
        order_id, trade_no, notify_id = p.get("out_trade_no", ""), p.get("trade_no", ""), p.get("notify_id", "")
        if not order_id or len(order_id) > 40 or not trade_no or len(trade_no) > 64 or not notify_id:
            raise Invalid("bad_notification", "the Alipay notification lacks out_trade_no, trade_no or notify_id")
        amount = fen_of(p.get("total_amount"))
        if amount is None:
            raise Invalid("bad_notification", "total_amount must be yuan with at most two decimals, got "
                          f"{str(p.get('total_amount'))[:20]!r}")
        if "out_biz_no" in p:
            return self._refund_notice(p, order_id, now_ms)
        trade_status = p.get("trade_status")
        status = {"TRADE_SUCCESS": "SUCCESS", "TRADE_FINISHED": "SUCCESS", "TRADE_CLOSED": "CLOSED",
                  "WAIT_BUYER_PAY": "NOTPAY"}.get(trade_status or "")
        if status is None:
            raise Invalid("bad_notification", f"unknown trade_status {str(trade_status)[:40]!r}")
        paid_ms = 0
        if status == "SUCCESS":
            paid_ms = china_ms(p.get("gmt_payment")) or 0
            if not paid_ms:
                raise Invalid("bad_notification", "a paid Alipay notification without gmt_payment")
        try:
            return Notification(notification_id=_short(notify_id), order_id=order_id, provider_txn_id=trade_no,
                                amount_fen=amount, status=status, paid_ms=paid_ms)
        except ValueError as e:
            raise Invalid("bad_notification", f"malformed Alipay notification: {str(e)[:200]}") from None

    def _refund_notice(self, p: dict[str, str], order_id: str, now_ms: int) -> RefundNotice:
        """A trade notification that carries a refund (out_biz_no = our out_request_no, refund_fee, gmt_refund).
        Its ``refund_fee`` is the trade's total refunded so far, not this refund's amount, so Alipay is asked
        (refund query) for this refund's own amount and state."""
        refund_id = p["out_biz_no"]
        total_refunded = fen_of(p.get("refund_fee"))
        refund_ms = china_ms(p.get("gmt_refund"))
        if len(refund_id) > 64 or total_refunded is None or refund_ms is None:
            raise Invalid("bad_notification", "a refund notification needs out_biz_no, refund_fee and gmt_refund")
        try:
            known = self.query_refund(order_id, refund_id)
        except ProviderError as e:
            raise Unavailable("provider_unavailable", f"Alipay could not confirm refund {refund_id} now "
                              f"({e.code}); notify again", retry_after_s=60) from None
        if known is None:
            raise Invalid("unknown_refund", f"Alipay does not know refund {refund_id} of {order_id}")
        if known.amount_fen > total_refunded:
            raise Invalid("bad_notification", "the notification's refund_fee is below this refund's amount")
        if known.status == "SUCCESS" and not known.done_ms:
            known = known.model_copy(update={"done_ms": refund_ms})
        return known

    def ack(self, ok: bool, message: str = "") -> NotifyAck:
        """Alipay stops once it reads exactly ``success``; anything else is retried (about 25 hours)."""
        return NotifyAck(200, "text/plain", b"success") if ok else NotifyAck(500, "text/plain", b"fail")

    # ------------------------------------------------------------------ refunds

    def refund(self, req: RefundRequest) -> RefundNotice:
        method = "alipay.trade.refund"
        node = self._call(method, {"out_trade_no": req.order_id, "refund_amount": yuan(req.amount_fen),
                                   "out_request_no": req.refund_id,
                                   "refund_reason": _subject(req.reason or "退款")})
        if node.get("out_trade_no", req.order_id) != req.order_id:
            raise self._bad(method, f"the answer is about another order ({str(node.get('out_trade_no'))[:40]})")
        trade_no = str(node.get("trade_no") or "")[:64]
        if node.get("fund_change") == "Y":
            done = china_ms(node.get("gmt_refund_pay")) or self._clock()
            return RefundNotice(refund_id=req.refund_id, order_id=req.order_id, provider_refund_id=trade_no,
                                amount_fen=req.amount_fen, status="SUCCESS", done_ms=done)
        # fund_change N: no money moved by this call (a repeat of a refund already made, or one still in
        # progress): Alipay's refund query says which
        try:
            known = self.query_refund(req.order_id, req.refund_id)
        except ProviderError as e:
            log.warning("refund %s: accepted by Alipay, not confirmed yet (%s)", req.refund_id, e.code)
            known = None
        return known or RefundNotice(refund_id=req.refund_id, order_id=req.order_id, provider_refund_id=trade_no,
                                     amount_fen=req.amount_fen, status="PROCESSING")

    def query_refund(self, order_id: str, refund_id: str) -> RefundNotice | None:
        method = "alipay.trade.fastpay.refund.query"
        try:
            node = self._call(method, {"out_trade_no": order_id, "out_request_no": refund_id,
                                       "query_options": ["gmt_refund_pay"]})
        except AlipayError as e:
            if e.verified and e.code == "ACQ.TRADE_NOT_EXIST":
                return None
            raise
        if not node.get("out_request_no") and not node.get("refund_amount"):
            return None                     # code 10000 and nothing else: Alipay has no such refund
        if node.get("out_request_no", refund_id) != refund_id or node.get("out_trade_no", order_id) != order_id:
            raise self._bad(method, "the answer is about another refund")
        amount = fen_of(node.get("refund_amount"))
        if amount is None:
            raise self._bad(method, f"refund_amount {str(node.get('refund_amount'))[:20]!r} not understood")
        done = node.get("refund_status") == "REFUND_SUCCESS"
        return RefundNotice(refund_id=refund_id, order_id=order_id,
                            provider_refund_id=str(node.get("trade_no") or "")[:64], amount_fen=amount,
                            status="SUCCESS" if done else "PROCESSING",
                            done_ms=(china_ms(node.get("gmt_refund_pay")) or 0) if done else 0)

    # ------------------------------------------------------------------ the bill

    def bill(self, day: date) -> list[BillRow]:
        method = "alipay.data.dataservice.bill.downloadurl.query"
        node = self._call(method, {"bill_type": "trade", "bill_date": day.isoformat()})
        url = node.get("bill_download_url")
        if not isinstance(url, str) or urllib.parse.urlsplit(url).scheme not in ("https", "http"):
            raise self._bad(method, "no bill_download_url in the answer")
        try:
            with self._session.get(url, timeout=TIMEOUT, stream=True) as r:
                if r.status_code != 200:
                    raise AlipayError("unreachable", f"the bill download answered HTTP {r.status_code}",
                                      retryable=True)
                data = bytearray()
                for chunk in r.iter_content(65_536):
                    data += chunk
                    if len(data) > MAX_BILL_BYTES:
                        raise AlipayError("bad_bill", "the bill file is too large", retryable=False)
        except requests.RequestException as e:
            raise AlipayError("unreachable", f"the bill could not be downloaded ({type(e).__name__})",
                              retryable=True) from None
        return parse_bill(bytes(data))


def parse_bill(data: bytes) -> list[BillRow]:
    """Alipay's trade bill: a zip whose ``…_业务明细.csv`` (GBK, ``#`` comment lines around a Chinese header and
    the rows; ids padded with tabs) lists 业务类型 交易 (payments: 订单金额（元）) and 退款 (refunds, negative
    amounts, with 退款批次号/请求号 = our out_request_no). Amounts become fen exactly; times are China time."""
    try:
        zf = zipfile.ZipFile(io.BytesIO(data), metadata_encoding="gbk")   # Alipay's names are GBK, unflagged
        names = [n for n in zf.namelist() if n.endswith("业务明细.csv")]
        if len(names) != 1:
            raise AlipayError("bad_bill", f"the bill holds {len(names)} detail files (…_业务明细.csv), not one")
        raw = zf.read(names[0])
    except (zipfile.BadZipFile, KeyError, OSError) as e:
        raise AlipayError("bad_bill", f"the bill is not a readable zip ({type(e).__name__})") from None
    try:
        text = raw.decode("gb18030")                                   # a superset of GBK
    except UnicodeDecodeError:
        raise AlipayError("bad_bill", "the bill's detail file is not GBK text") from None
    lines = [ln for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
    if not lines:
        raise AlipayError("bad_bill", "the bill's detail file has no header")
    reader = csv.reader(lines)
    header = [_column(h) for h in next(reader)]
    need = ("支付宝交易号", "商户订单号", "业务类型", "完成时间", "订单金额(元)", "退款批次号/请求号")
    missing = [h for h in need if h not in header]
    if missing:
        raise AlipayError("bad_bill", f"the bill's header lacks {', '.join(missing)}")
    col = {h: header.index(h) for h in need}
    rows: list[BillRow] = []
    for n, cells in enumerate(reader, start=2):
        if len(cells) < len(header):
            raise AlipayError("bad_bill", f"bill line {n}: {len(cells)} fields, the header has {len(header)}")
        cell = {h: cells[i].strip() for h, i in col.items()}
        kind = {"交易": "payment", "退款": "refund"}.get(cell["业务类型"])
        if kind is None:
            continue
        amount = fen_of(cell["订单金额(元)"], signed=True)
        if amount is None or (kind == "payment" and amount < 0):
            raise AlipayError("bad_bill", f"bill line {n}: amount {cell['订单金额(元)'][:20]!r} not understood")
        at = china_ms(cell["完成时间"]) or 0
        if kind == "payment":
            rows.append(BillRow("payment", cell["商户订单号"], cell["支付宝交易号"], amount, at_ms=at))
        else:
            rows.append(BillRow("refund", cell["商户订单号"], cell["支付宝交易号"], abs(amount),
                                refund_id=cell["退款批次号/请求号"], at_ms=at))
    return rows


def _column(name: str) -> str:
    return name.strip().replace("（", "(").replace("）", ")")


def _subject(text: str) -> str:
    """Alipay's subject / refund_reason: at most 256 characters, without the characters it refuses there."""
    return re.sub(r"[/=&]", " ", text).strip()[:256] or "Tapshare"


def _short(text: str) -> str:
    return text if len(text) <= 64 else "h-" + hashlib.sha256(text.encode()).hexdigest()[:62]


def _form(body: bytes) -> dict[str, str]:
    """A notification's form-encoded body, URL-decoded in its ``charset`` (utf-8, or GBK if the app is set so)."""
    if len(body) > MAX_NOTIFY_BYTES:
        raise Invalid("bad_notification", "the Alipay notification is too large")
    try:
        text = body.decode("ascii")
        charset = dict(urllib.parse.parse_qsl(text, keep_blank_values=True, errors="replace")).get("charset", "")
        encoding = "gb18030" if charset.lower() in ("gbk", "gb2312", "gb18030") else "utf-8"
        pairs = urllib.parse.parse_qsl(text, keep_blank_values=True, strict_parsing=True, encoding=encoding,
                                       errors="strict")
    except (UnicodeDecodeError, ValueError):
        raise Invalid("bad_notification", "the Alipay notification is not a form-encoded body") from None
    params = dict(pairs)
    if len(params) != len(pairs):
        raise Invalid("bad_notification", "the Alipay notification repeats a field")
    return params


def from_env(environ: Mapping[str, str]) -> Alipay:
    """The Alipay provider from the TAPSHARE_ALIPAY_* variables (ProviderConfigError if they do not do)."""
    return Alipay(AlipayConfig.from_env(environ))
