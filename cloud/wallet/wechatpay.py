"""WeChat Pay (微信支付) API v3, the real payment provider for a directly connected merchant (普通商户/直连模式):
top-ups inside WeChat (JSAPI, channel ``jsapi``, with the payer's openid from the official account's silent web
authorisation ``snsapi_base``), from another mobile browser (H5, channel ``h5``) or with a QR code to scan
(Native, channel ``native``); order queries and closing, refunds and their queries, the daily trade bill, and the
notifications WeChat Pay posts to us. It speaks the published API v3 with our own code (``requests`` and
``cryptography``; no SDK), following these published rules:

* 签名生成: every request carries ``Authorization: WECHATPAY2-SHA256-RSA2048 mchid="…",nonce_str="…",
  timestamp="…",serial_no="…",signature="…"``, the signature being SHA256withRSA with the merchant's API private
  key (apiclient_key.pem; ``serial_no`` is its certificate's serial) over ``METHOD\\nPATH?QUERY\\ntimestamp\\n
  nonce\\nbody\\n`` (the body exactly as sent, empty for GET). Requests also send ``Accept``, ``User-Agent`` and
  ``Wechatpay-Serial`` (the verification key we prefer: WeChat Pay answers with the same one during a switch).
* 签名验证: an answer or a notification is believed only after its ``Wechatpay-Signature`` (SHA256withRSA,
  base64) checks over ``Wechatpay-Timestamp\\nWechatpay-Nonce\\nraw body\\n`` with the key named by
  ``Wechatpay-Serial``: a platform certificate's serial (平台证书) or the id ``PUB_KEY_ID_…`` of the newer WeChat
  Pay public key (微信支付公钥); both may be configured at once during a switch. The timestamp must be within
  five minutes of now. WeChat Pay's signature probes (``WECHATPAY/SIGNTEST/…``) fail this check, as they must.
  An unsigned or badly signed answer is never read as a fact ("no such order" included); it is a retryable error.
  The bill download is the one unsigned answer: its SHA1 is checked against the signed ``hash_value`` instead.
* 回调通知 / 证书和回调报文解密: the notification's ``resource`` is AEAD_AES_256_GCM with the APIv3 key (nonce and
  associated_data from the resource, the 16-byte tag at the end of the base64 ciphertext); its mchid (and appid
  for payments) must be ours. We answer 204 without a body once the wallet has committed it, otherwise 500 with
  ``{"code": "FAIL", "message": …}`` (WeChat Pay then retries).
* JSAPI 调起支付: the page gets appId, timeStamp, nonceStr, package ``prepay_id=…``, signType ``RSA`` and paySign,
  SHA256withRSA with the merchant key over ``appId\\ntimeStamp\\nnonceStr\\npackage\\n``. H5: the person is sent
  to ``h5_url`` with ``&redirect_url=`` (URL-encoded) appended. Native: ``code_url`` becomes the QR code.
* Errors are JSON ``{"code", "message"}`` with an HTTP status; they become :class:`ProviderError` with WeChat
  Pay's code (retryable: 5xx, 429, SYSTEM_ERROR, FREQUENCY_LIMITED, BANK_ERROR, NOT_ENOUGH; network failures are
  ``unreachable``). Amounts are integer fen on the wire, as here; the bill's yuan become fen exactly (Decimal).
* Trade bill (申请交易账单 / 下载账单): ``GET /v3/bill/tradebill`` gives a download address and SHA1; the file is a
  UTF-8 CSV with a Chinese header row, every field prefixed with a backtick, and summary rows at the end.
* 网页授权 (snsapi_base): ``oauth_url`` / ``openid_for_code`` on the official account (appid + AppSecret).

Neither keys, the APIv3 key, the AppSecret nor signatures are ever logged or put in an error message.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import logging
import re
import secrets
import time
import urllib.parse
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from decimal import Decimal, InvalidOperation
from typing import Any

import requests
from cryptography import x509
from cryptography.exceptions import InvalidSignature, InvalidTag, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from pydantic import ValidationError

from cloud.errors import Invalid, ProviderConfigError, Unauthenticated
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

log = logging.getLogger("tapshare.cloud.wechatpay")

NAME = "wechatpay"
SCHEMA = "WECHATPAY2-SHA256-RSA2048"
DEFAULT_API_URL = "https://api.mch.weixin.qq.com"
DEFAULT_OAUTH_URL = "https://open.weixin.qq.com"
DEFAULT_SNS_URL = "https://api.weixin.qq.com"
CHANNELS = ("jsapi", "h5", "native")
TIMEOUT = (5, 10)                                   # connect, read (seconds)
MAX_SKEW_MS = 5 * 60_000                            # signed timestamps within five minutes of now, either way
MAX_NOTIFY_BYTES = 256 * 1024
MAX_ANSWER_BYTES = 1024 * 1024
MAX_BILL_BYTES = 64 * 1024 * 1024
MIN_RSA_BITS = 2048
USER_AGENT = "Tapshare-cloud/1 (python-requests; WeChat Pay API v3)"

ENV_MCHID = "TAPSHARE_WECHATPAY_MCHID"
ENV_APPID = "TAPSHARE_WECHATPAY_APPID"
ENV_APP_SECRET = "TAPSHARE_WECHATPAY_APP_SECRET_FILE"
ENV_MCH_SERIAL = "TAPSHARE_WECHATPAY_MCH_SERIAL"
ENV_MCH_KEY = "TAPSHARE_WECHATPAY_MCH_KEY_FILE"
ENV_APIV3_KEY = "TAPSHARE_WECHATPAY_APIV3_KEY_FILE"
ENV_PLATFORM_CERTS = "TAPSHARE_WECHATPAY_PLATFORM_CERT_FILES"
ENV_PUBLIC_KEY = "TAPSHARE_WECHATPAY_PUBLIC_KEY_FILE"
ENV_PUBLIC_KEY_ID = "TAPSHARE_WECHATPAY_PUBLIC_KEY_ID"
ENV_CHANNELS = "TAPSHARE_WECHATPAY_CHANNELS"
ENV_API_URL = "TAPSHARE_WECHATPAY_API_URL"
ENV_OAUTH_URL = "TAPSHARE_WECHATPAY_OAUTH_URL"
ENV_SNS_URL = "TAPSHARE_WECHATPAY_SNS_URL"
ENV_REFUND_WINDOW = "TAPSHARE_WECHATPAY_REFUND_WINDOW_DAYS"

_MCHID = re.compile(r"^[0-9]{8,32}$")                       # 商户号: digits (8 to 10 today; string(32))
_APPID = re.compile(r"^wx[0-9A-Za-z]{16}$")                  # an official account's AppID: wx + 16
_SERIAL = re.compile(r"^[0-9A-Fa-f]{8,64}$")                 # certificate serials: hex (40 digits today)
_PUBLIC_KEY_ID = re.compile(r"^PUB_KEY_ID_[0-9A-Za-z_]{1,80}$")
_APP_SECRET = re.compile(r"^[0-9A-Za-z]{32}$")
_OPENID = re.compile(r"^[0-9A-Za-z_-]{1,128}$")
_YUAN = re.compile(r"^-?(0|[1-9][0-9]{0,12})(\.[0-9]{1,2})?$")
_LOOPBACK = {"127.0.0.1", "localhost", "::1"}

# WeChat Pay's answers that mean "the same request may succeed later"
_RETRYABLE = {"SYSTEM_ERROR", "SYSTEMERROR", "FREQUENCY_LIMITED", "BANK_ERROR", "NOT_ENOUGH", "USER_PAYING",
              "USERPAYING"}
# a close refused for one of these: the order is paid or closed already (the order query then says which)
_CLOSE_STATE_CODES = {"ORDERPAID", "ORDER_PAID", "ORDER_CLOSED", "ORDERCLOSED", "TRADE_ERROR"}
_NOT_READY_BILL = {"NO_STATEMENT_EXIST", "STATEMENT_CREATING"}
# the snsapi errcodes that mean "try again": system busy, rate limits
_RETRYABLE_ERRCODES = {-1, 45009, 45011}
_REFUND_EVENTS = {"REFUND.SUCCESS": "SUCCESS", "REFUND.ABNORMAL": "ABNORMAL", "REFUND.CLOSED": "CLOSED"}


# ---------------------------------------------------------------------------------------------- the published rules


def request_message(method: str, path_query: str, timestamp: str, nonce: str, body: bytes) -> bytes:
    """What a merchant signs (签名生成): method, the URL's absolute path with its query, timestamp, nonce and body,
    each followed by ``\\n``."""
    return f"{method}\n{path_query}\n{timestamp}\n{nonce}\n".encode() + body + b"\n"


def answer_message(timestamp: str, nonce: str, body: bytes) -> bytes:
    """What WeChat Pay signs in an answer or a notification (签名验证): timestamp, nonce, raw body, each + ``\\n``."""
    return f"{timestamp}\n{nonce}\n".encode() + body + b"\n"


def jsapi_message(appid: str, timestamp: str, nonce: str, package: str) -> bytes:
    """What the merchant signs for the JSAPI pay call (paySign): appId, timeStamp, nonceStr, package + ``\\n``."""
    return f"{appid}\n{timestamp}\n{nonce}\n{package}\n".encode()


def rsa_sign(key: rsa.RSAPrivateKey, message: bytes) -> str:
    return base64.b64encode(key.sign(message, padding.PKCS1v15(), hashes.SHA256())).decode("ascii")


def rsa_verify(key: rsa.RSAPublicKey, message: bytes, signature: str) -> bool:
    try:
        raw = base64.b64decode(signature, validate=True)
        key.verify(raw, message, padding.PKCS1v15(), hashes.SHA256())
    except (InvalidSignature, ValueError, TypeError):
        return False
    return True


def authorization(mchid: str, serial: str, key: rsa.RSAPrivateKey, method: str, path_query: str, body: bytes,
                  timestamp: str | None = None, nonce: str | None = None) -> str:
    """The ``Authorization`` header of a request (WECHATPAY2-SHA256-RSA2048)."""
    ts = timestamp or str(int(time.time()))
    nonce = nonce or secrets.token_hex(16).upper()
    signature = rsa_sign(key, request_message(method, path_query, ts, nonce, body))
    return (f'{SCHEMA} mchid="{mchid}",nonce_str="{nonce}",signature="{signature}",timestamp="{ts}",'
            f'serial_no="{serial}"')


def decrypt_resource(apiv3_key: bytes, resource: Mapping[str, Any]) -> bytes:
    """A notification's ``resource`` decrypted (AEAD_AES_256_GCM with the APIv3 key). Raises ValueError."""
    if resource.get("algorithm") != "AEAD_AES_256_GCM":
        raise ValueError(f"unknown algorithm {str(resource.get('algorithm'))[:40]!r}")
    nonce, ad, ct = resource.get("nonce"), resource.get("associated_data", ""), resource.get("ciphertext")
    if not isinstance(nonce, str) or not isinstance(ct, str) or not isinstance(ad, str | type(None)):
        raise ValueError("the resource lacks nonce or ciphertext")
    try:
        return AESGCM(apiv3_key).decrypt(nonce.encode("utf-8"), base64.b64decode(ct, validate=True),
                                         (ad or "").encode("utf-8") or None)
    except (InvalidTag, ValueError) as e:
        raise ValueError(f"cannot be decrypted ({type(e).__name__})") from None


def serial_key(serial: str) -> str:
    """A serial as compared here: hex upper-case without leading zeros (a public key id stays as it is)."""
    if serial.startswith("PUB_KEY_ID_"):
        return serial
    return serial.strip().upper().lstrip("0") or "0"


def rfc3339(ms: int) -> str:
    """Milliseconds since the epoch as WeChat Pay's RFC 3339 time in China time: ``2018-06-08T10:34:56+08:00``."""
    return datetime.fromtimestamp(ms // 1000, CHINA).isoformat(timespec="seconds")


def rfc3339_ms(text: Any) -> int | None:
    """An RFC 3339 time with its offset as milliseconds; None if it is not one."""
    if not isinstance(text, str) or "T" not in text or len(text) > 40:
        return None
    try:
        at = datetime.fromisoformat(text)
    except ValueError:
        return None
    if at.tzinfo is None:
        return None
    return int(at.timestamp() * 1000)


def bill_fen(text: str) -> int | None:
    """A bill's yuan (at most two decimals, maybe negative) as integer fen, exactly; None if not such a text."""
    if not _YUAN.match(text):
        return None
    try:
        return int(Decimal(text) * 100)
    except InvalidOperation:
        return None


def _short(text: str) -> str:
    return text if len(text) <= 64 else "h-" + hashlib.sha256(text.encode()).hexdigest()[:62]


def _clip_utf8(text: str, limit: int) -> str:
    """At most ``limit`` UTF-8 bytes of ``text``, never cutting a character."""
    data = text.encode("utf-8")[:limit]
    return data.decode("utf-8", errors="ignore")


# ---------------------------------------------------------------------------------------------- configuration


@dataclass(frozen=True)
class WechatPayConfig:
    """A directly connected merchant: its 商户号 and the official account's AppID (and AppSecret for the payer's
    openid), the merchant API private key and its certificate's serial, the APIv3 key, and WeChat Pay's
    verification keys: platform certificates by serial and/or the WeChat Pay public key by its id."""

    mchid: str
    appid: str
    mch_serial: str
    mch_key: rsa.RSAPrivateKey = field(repr=False)
    apiv3_key: bytes = field(repr=False)
    verify_keys: Mapping[str, rsa.RSAPublicKey] = field(repr=False)     # serial_key(serial or id) -> key
    request_serial: str = ""          # sent as Wechatpay-Serial: the public key id if there is one
    app_secret: str = field(default="", repr=False)
    channels: tuple[str, ...] = CHANNELS
    api_url: str = DEFAULT_API_URL
    oauth_url: str = DEFAULT_OAUTH_URL
    sns_url: str = DEFAULT_SNS_URL
    # WeChat Pay refunds a payment for a year (交易时间超过一年的订单无法提交退款)
    refund_window_days: int = 365
    platform_serials: tuple[str, ...] = ()
    public_key_id: str = ""

    @classmethod
    def from_env(cls, environ: Mapping[str, str]) -> WechatPayConfig:
        """Read and check the TAPSHARE_WECHATPAY_* variables; every problem at once in one ProviderConfigError
        that names the variables and holds no key material."""
        problems: list[str] = []

        def get(var: str) -> str:
            return (environ.get(var) or "").strip()

        def read(var: str, path: str, what: str, limit: int = 65_536) -> bytes | None:
            if not path:
                problems.append(f"{var}: missing (the file holding {what})")
                return None
            try:
                with open(path, "rb") as f:
                    data = f.read(limit + 1)
            except OSError as e:
                reason = (e.strerror or type(e).__name__).lower()
                problems.append(f"{var}: {path} is not readable ({reason})")
                return None
            if len(data) > limit:
                problems.append(f"{var}: {path} is too large to be {what}")
                return None
            return data

        mchid = get(ENV_MCHID)
        if not mchid:
            problems.append(f"{ENV_MCHID}: missing (the merchant id, 商户号)")
        elif not _MCHID.match(mchid):
            problems.append(f"{ENV_MCHID}: must be the merchant id (商户号), digits only, got {mchid[:40]!r}")
        appid = get(ENV_APPID)
        if not appid:
            problems.append(f"{ENV_APPID}: missing (the official account's AppID bound to the merchant)")
        elif not _APPID.match(appid):
            problems.append(f"{ENV_APPID}: must be an AppID, wx and 16 letters or digits, got {appid[:40]!r}")
        mch_serial = get(ENV_MCH_SERIAL)
        if not mch_serial:
            problems.append(f"{ENV_MCH_SERIAL}: missing (the serial of the merchant API certificate, "
                            "商户API证书序列号)")
        elif not _SERIAL.match(mch_serial):
            problems.append(f"{ENV_MCH_SERIAL}: must be the merchant API certificate's serial in hex, got "
                            f"{mch_serial[:70]!r}")

        channels = tuple(c.strip() for c in (get(ENV_CHANNELS) or ",".join(CHANNELS)).split(",") if c.strip())
        if not channels or len(set(channels)) != len(channels) or any(c not in CHANNELS for c in channels):
            problems.append(f"{ENV_CHANNELS}: must list jsapi, h5 and/or native once each, got "
                            f"{','.join(channels)[:80]!r}")

        mch_key = None
        path = get(ENV_MCH_KEY)
        data = read(ENV_MCH_KEY, path, "the merchant API private key (apiclient_key.pem)")
        if data is not None:
            try:
                mch_key = load_private_key(data)
            except ValueError as e:
                problems.append(f"{ENV_MCH_KEY}: {path} {e}")

        apiv3_key = b""
        path = get(ENV_APIV3_KEY)
        data = read(ENV_APIV3_KEY, path, "the APIv3 key", limit=4096)
        if data is not None:
            key = data.strip(b" \t\r\n")
            if len(key) != 32:
                problems.append(f"{ENV_APIV3_KEY}: {path} must hold the APIv3 key, exactly 32 bytes; it holds "
                                f"{len(key)}")
            elif not all(0x21 <= b <= 0x7E for b in key):
                problems.append(f"{ENV_APIV3_KEY}: {path} must hold the APIv3 key, 32 printable ASCII characters")
            else:
                apiv3_key = key

        app_secret = ""
        path = get(ENV_APP_SECRET)
        if "jsapi" in channels or path:
            data = read(ENV_APP_SECRET, path, "the official account's AppSecret (needed for JSAPI: the payer's "
                        "openid)", limit=4096)
            if data is not None:
                text = data.decode("ascii", errors="replace").strip()
                if not _APP_SECRET.match(text):
                    problems.append(f"{ENV_APP_SECRET}: {path} must hold the official account's AppSecret, 32 "
                                    f"letters or digits (it holds {len(text)} characters)")
                else:
                    app_secret = text

        verify_keys: dict[str, rsa.RSAPublicKey] = {}
        platform_serials: list[str] = []
        cert_paths = [p.strip() for p in get(ENV_PLATFORM_CERTS).split(",") if p.strip()]
        now = datetime.now(UTC)
        for cert_path in cert_paths:
            data = read(ENV_PLATFORM_CERTS, cert_path, "a WeChat Pay platform certificate")
            if data is None:
                continue
            try:
                serial, key, not_after = load_platform_cert(data)
            except ValueError as e:
                problems.append(f"{ENV_PLATFORM_CERTS}: {cert_path} {e}")
                continue
            if not_after < now:
                problems.append(f"{ENV_PLATFORM_CERTS}: {cert_path} (serial {serial}) expired on "
                                f"{not_after:%Y-%m-%d}: download the current platform certificate")
                continue
            if mch_key is not None and key.public_numbers() == mch_key.public_key().public_numbers():
                problems.append(f"{ENV_PLATFORM_CERTS}: {cert_path} is the merchant's own API certificate, not a "
                                "WeChat Pay platform certificate (平台证书)")
                continue
            if serial_key(serial) in verify_keys:
                problems.append(f"{ENV_PLATFORM_CERTS}: {cert_path} repeats serial {serial}")
                continue
            if (not_after - now).days < 30:
                log.warning("wechatpay platform certificate %s expires on %s", serial, f"{not_after:%Y-%m-%d}")
            verify_keys[serial_key(serial)] = key
            platform_serials.append(serial)

        public_key_id = get(ENV_PUBLIC_KEY_ID)
        path = get(ENV_PUBLIC_KEY)
        if path or public_key_id:
            if not public_key_id:
                problems.append(f"{ENV_PUBLIC_KEY_ID}: missing (the WeChat Pay public key's id, PUB_KEY_ID_…, "
                                f"shown with the key; {ENV_PUBLIC_KEY} is set)")
            elif not _PUBLIC_KEY_ID.match(public_key_id):
                problems.append(f"{ENV_PUBLIC_KEY_ID}: must be the public key's id, PUB_KEY_ID_ and letters or "
                                f"digits, got {public_key_id[:80]!r}")
            data = read(ENV_PUBLIC_KEY, path, "the WeChat Pay public key (微信支付公钥, pub_key.pem)")
            if data is not None:
                try:
                    key = load_public_key(data)
                except ValueError as e:
                    problems.append(f"{ENV_PUBLIC_KEY}: {path} {e}")
                else:
                    if mch_key is not None and key.public_numbers() == mch_key.public_key().public_numbers():
                        problems.append(f"{ENV_PUBLIC_KEY}: {path} is the merchant's own public key, not the WeChat "
                                        "Pay public key (微信支付公钥)")
                    elif public_key_id and _PUBLIC_KEY_ID.match(public_key_id):
                        verify_keys[public_key_id] = key
        if not cert_paths and not path:
            problems.append(f"{ENV_PLATFORM_CERTS} / {ENV_PUBLIC_KEY}: neither is set: WeChat Pay's answers and "
                            "notifications cannot be verified without a platform certificate or the WeChat Pay "
                            f"public key (with {ENV_PUBLIC_KEY_ID}); give one, or both during a switch")

        urls = {}
        for var, default in ((ENV_API_URL, DEFAULT_API_URL), (ENV_OAUTH_URL, DEFAULT_OAUTH_URL),
                             (ENV_SNS_URL, DEFAULT_SNS_URL)):
            url = (get(var) or default).rstrip("/")
            parts = urllib.parse.urlsplit(url)
            loopback = parts.scheme == "http" and (parts.hostname or "") in _LOOPBACK
            if not ((parts.scheme == "https" or loopback) and parts.netloc and not parts.query
                    and not parts.fragment and parts.path in ("", "/")):
                problems.append(f"{var}: must be an https:// origin without a path or query (http:// only on "
                                f"loopback), got {url[:80]!r}")
            urls[var] = url

        window_text = get(ENV_REFUND_WINDOW) or "365"
        window = int(window_text) if window_text.isdigit() else 0
        if not 1 <= window <= 365:
            problems.append(f"{ENV_REFUND_WINDOW}: must be a whole number of days from 1 to 365 (WeChat Pay refunds "
                            f"payments up to a year old), got {window_text[:20]!r}")

        if problems:
            raise ProviderConfigError("WeChat Pay: " + "; ".join(problems))
        request_serial = public_key_id or platform_serials[-1]
        return cls(mchid=mchid, appid=appid, mch_serial=mch_serial, mch_key=mch_key, apiv3_key=apiv3_key,
                   verify_keys=verify_keys, request_serial=request_serial, app_secret=app_secret,
                   channels=channels, api_url=urls[ENV_API_URL], oauth_url=urls[ENV_OAUTH_URL],
                   sns_url=urls[ENV_SNS_URL], refund_window_days=window, platform_serials=tuple(platform_serials),
                   public_key_id=public_key_id)


def load_private_key(data: bytes) -> rsa.RSAPrivateKey:
    """The merchant API private key (apiclient_key.pem: PEM PKCS#8, or PKCS#1). ValueError without key material."""
    try:
        text = data.decode("ascii").strip()
    except UnicodeDecodeError:
        raise ValueError("is not a PEM key file") from None
    if not text:
        raise ValueError("is empty")
    if "ENCRYPTED" in text:
        raise ValueError("is encrypted with a passphrase: give the unencrypted apiclient_key.pem")
    if "PRIVATE KEY-----" not in text:
        raise ValueError("is not a PEM private key (apiclient_key.pem, BEGIN PRIVATE KEY)")
    try:
        key = serialization.load_pem_private_key(text.encode("ascii"), password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        raise ValueError("does not parse as a PEM private key") from None
    if not isinstance(key, rsa.RSAPrivateKey):
        raise ValueError("is not an RSA key (WECHATPAY2-SHA256-RSA2048 needs one)")
    if key.key_size < MIN_RSA_BITS:
        raise ValueError(f"is an RSA key of {key.key_size} bits: {MIN_RSA_BITS} or more are needed")
    return key


def load_public_key(data: bytes) -> rsa.RSAPublicKey:
    """The WeChat Pay public key (pub_key.pem, PEM ``PUBLIC KEY``). ValueError without key material."""
    try:
        text = data.decode("ascii").strip()
    except UnicodeDecodeError:
        raise ValueError("is not a PEM file") from None
    if "PRIVATE KEY" in text:
        raise ValueError("holds a private key: this must be the WeChat Pay public key (微信支付公钥)")
    if "CERTIFICATE" in text:
        raise ValueError(f"is a certificate: give it in {ENV_PLATFORM_CERTS}, not as the WeChat Pay public key")
    try:
        key = serialization.load_pem_public_key(text.encode("ascii"))
    except (ValueError, TypeError, UnsupportedAlgorithm):
        raise ValueError("does not parse as a PEM public key") from None
    if not isinstance(key, rsa.RSAPublicKey):
        raise ValueError("is not an RSA public key")
    if key.key_size < MIN_RSA_BITS:
        raise ValueError(f"is an RSA key of {key.key_size} bits: {MIN_RSA_BITS} or more are needed")
    return key


def load_platform_cert(data: bytes) -> tuple[str, rsa.RSAPublicKey, datetime]:
    """A WeChat Pay platform certificate (PEM): its serial (hex, upper case), public key and expiry."""
    if b"PRIVATE KEY" in data:
        raise ValueError("holds a private key, not a certificate")
    try:
        cert = x509.load_pem_x509_certificate(data)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        raise ValueError("does not parse as a PEM certificate") from None
    key = cert.public_key()
    if not isinstance(key, rsa.RSAPublicKey):
        raise ValueError("does not hold an RSA public key")
    if key.key_size < MIN_RSA_BITS:
        raise ValueError(f"holds an RSA key of {key.key_size} bits: {MIN_RSA_BITS} or more are needed")
    return f"{cert.serial_number:X}", key, cert.not_valid_after_utc


# ---------------------------------------------------------------------------------------------- the provider


class WechatPayError(ProviderError):
    """WeChat Pay refused, or its answer could not be trusted. ``verified``: the refusal came in an answer whose
    signature checked, so its code is WeChat Pay's word (only then is ``ORDER_NOT_EXIST`` a fact)."""

    def __init__(self, code: str, message: str, retryable: bool = False, verified: bool = False,
                 status: int = 0) -> None:
        super().__init__(NAME, code, message, retryable)
        self.verified, self.status = verified, status


class WechatPay:
    """The :class:`~cloud.wallet.payments.PaymentProvider` for WeChat Pay API v3. ``session``: a
    ``requests.Session`` to use (one is made otherwise); ``clock_ms``: the time source for signatures."""

    name = NAME
    is_development = False
    bill_refund_day = "requested"       # the trade bill lists a refund on the day it was asked for, not done

    def __init__(self, config: WechatPayConfig, session: requests.Session | None = None,
                 clock_ms: Callable[[], int] | None = None) -> None:
        self.config = config
        self.channels: tuple[str, ...] = tuple(config.channels)
        self.refund_window_days: int = config.refund_window_days
        self._session = session or requests.Session()
        self._clock = clock_ms or (lambda: time.time_ns() // 1_000_000)

    # ------------------------------------------------------------------ signatures

    def _authorization(self, method: str, path_query: str, body: bytes) -> str:
        cfg = self.config
        return authorization(cfg.mchid, cfg.mch_serial, cfg.mch_key, method, path_query, body,
                             timestamp=str(self._clock() // 1000))

    def _check_signature(self, headers: Mapping[str, str], body: bytes, now_ms: int) -> None:
        """WeChat Pay's signature on an answer or a notification (header names lower-case); raises
        Unauthenticated with unsigned_notification, unknown_serial, bad_signature or stale_notification."""
        ts, nonce = headers.get("wechatpay-timestamp", ""), headers.get("wechatpay-nonce", "")
        signature, serial = headers.get("wechatpay-signature", ""), headers.get("wechatpay-serial", "")
        if not (ts and nonce and signature and serial):
            raise Unauthenticated("unsigned_notification", "WeChat Pay messages carry Wechatpay-Timestamp, -Nonce, "
                                  "-Signature and -Serial")
        kind = headers.get("wechatpay-signature-type", SCHEMA)
        if kind != SCHEMA:
            raise Unauthenticated("bad_signature", f"unknown Wechatpay-Signature-Type {kind[:40]!r}")
        key = self.config.verify_keys.get(serial_key(serial))
        if key is None:
            raise Unauthenticated("unknown_serial", f"Wechatpay-Serial {serial[:80]!r} is neither a configured "
                                  f"platform certificate ({ENV_PLATFORM_CERTS}) nor the WeChat Pay public key "
                                  f"({ENV_PUBLIC_KEY_ID})")
        if not ts.isdigit() or len(ts) > 12:
            raise Unauthenticated("bad_signature", "Wechatpay-Timestamp is not a time")
        if not rsa_verify(key, answer_message(ts, nonce, body), signature):
            raise Unauthenticated("bad_signature", "the WeChat Pay signature does not match")
        if abs(now_ms - int(ts) * 1000) > MAX_SKEW_MS:
            raise Unauthenticated("stale_notification", "the WeChat Pay message's timestamp is more than five "
                                  "minutes from now (a replay, or this machine's clock is wrong)")

    # ------------------------------------------------------------------ requests and answers

    def _call(self, method: str, path_query: str, payload: dict[str, Any] | None = None, *, what: str
              ) -> tuple[int, dict[str, Any]]:
        """One signed API request; the verified answer (status, JSON object; {} when there is no body). Raises
        WechatPayError for refusals, untrusted answers and network failures."""
        cfg = self.config
        body = b"" if payload is None else json.dumps(payload, ensure_ascii=False, separators=(",", ":")).encode()
        headers = {"Authorization": self._authorization(method, path_query, body), "Accept": "application/json",
                   "User-Agent": USER_AGENT, "Wechatpay-Serial": cfg.request_serial}
        if payload is not None:
            headers["Content-Type"] = "application/json"
        try:
            r = self._session.request(method, cfg.api_url + path_query, data=body or None, headers=headers,
                                      timeout=TIMEOUT, allow_redirects=False)
            content = r.content
        except requests.RequestException as e:
            log.warning("wechatpay %s: not reached: %s", what, type(e).__name__)
            raise WechatPayError("unreachable", f"{what}: WeChat Pay could not be reached ({type(e).__name__})",
                                 retryable=True) from None
        request_id = r.headers.get("Request-ID", "")[:80]
        if len(content) > MAX_ANSWER_BYTES:
            raise WechatPayError("bad_answer", f"{what}: the answer is too large", retryable=True)
        answer_headers = {k.lower(): v for k, v in r.headers.items()}
        verified, why = False, "unsigned"
        if "wechatpay-signature" in answer_headers:
            try:
                self._check_signature(answer_headers, content, self._clock())
                verified = True
            except Unauthenticated as e:
                why = f"{e.code}: {e.message}"
        if 200 <= r.status_code < 300:
            if not verified:
                log.error("wechatpay %s: HTTP %d answer not believed (%s) request-id %s", what, r.status_code,
                          why[:120], request_id)
                raise WechatPayError("bad_answer_signature", f"{what}: WeChat Pay's answer is not verified ({why})",
                                     retryable=True, status=r.status_code)
            if not content:
                return r.status_code, {}
            try:
                data = json.loads(content.decode("utf-8"))
            except (ValueError, UnicodeDecodeError):
                data = None
            if not isinstance(data, dict):
                raise WechatPayError("bad_answer", f"{what}: the answer is not a JSON object", retryable=True,
                                     verified=True, status=r.status_code)
            return r.status_code, data
        code, message = f"http_{r.status_code}", ""
        try:
            err = json.loads(content.decode("utf-8")) if content else None
            if isinstance(err, dict) and isinstance(err.get("code"), str) and err["code"]:
                code, message = err["code"][:64], str(err.get("message") or "")[:200]
        except (ValueError, UnicodeDecodeError):
            pass
        if "wechatpay-signature" in answer_headers and not verified:
            log.error("wechatpay %s: HTTP %d %s with a signature that does not check (%s) request-id %s", what,
                      r.status_code, code, why[:120], request_id)
            raise WechatPayError("bad_answer_signature", f"{what}: WeChat Pay's refusal {code} is not verified "
                                 f"({why})", retryable=True, status=r.status_code)
        if r.status_code == 401 or code == "SIGN_ERROR":
            log.error("wechatpay %s: our request signature was refused (%s) request-id %s", what, code, request_id)
            raise WechatPayError(code, f"{what}: WeChat Pay refused our request signature ({message or code}): "
                                 f"check {ENV_MCH_KEY} (apiclient_key.pem), {ENV_MCH_SERIAL} (that certificate's "
                                 f"serial) and {ENV_MCHID}, and this machine's clock", retryable=False,
                                 verified=verified, status=r.status_code)
        retryable = r.status_code >= 500 or r.status_code == 429 or code in _RETRYABLE or not verified
        log.info("wechatpay %s: HTTP %d %s%s request-id %s", what, r.status_code, code,
                 "" if verified else " (unsigned)", request_id)
        raise WechatPayError(code, f"{what}: {message or code}" + ("" if verified else " (unsigned answer)"),
                             retryable=retryable, verified=verified, status=r.status_code)

    @staticmethod
    def _bad(what: str, problem: str) -> WechatPayError:
        log.error("wechatpay %s: %s", what, problem)
        return WechatPayError("bad_answer", f"{what}: {problem}", retryable=True, verified=True)

    def _ours(self, data: Mapping[str, Any], what: str, appid: bool = True) -> None:
        if data.get("mchid", self.config.mchid) != self.config.mchid or \
                (appid and data.get("appid", self.config.appid) != self.config.appid):
            raise self._bad(what, "the answer is for another merchant or app")

    # ------------------------------------------------------------------ orders

    def create(self, req: PayRequest) -> PayStart:
        cfg = self.config
        if req.channel not in self.channels:
            raise WechatPayError("unsupported_channel", f"WeChat Pay here takes {', '.join(self.channels)}, not "
                                 f"{req.channel!r}")
        if req.amount_fen <= 0:
            raise WechatPayError("invalid_amount", "a top-up must be at least 1 fen")
        body: dict[str, Any] = {
            "appid": cfg.appid, "mchid": cfg.mchid, "description": _clip_utf8(req.description, 127) or "Tapshare",
            "out_trade_no": req.order_id, "time_expire": rfc3339(req.expires_ms), "notify_url": req.notify_url,
            "amount": {"total": req.amount_fen, "currency": "CNY"}}
        if req.channel == "jsapi":
            if not req.payer_id:
                raise WechatPayError("payer_required", "JSAPI needs the payer's openid (web authorisation first)")
            body["payer"] = {"openid": req.payer_id}
        elif req.channel == "h5":
            if not req.client_ip:
                raise WechatPayError("client_ip_required", "H5 needs the payer's IP address")
            body["scene_info"] = {"payer_client_ip": req.client_ip, "h5_info": {"type": "Wap"}}
        what = f"{req.channel} order {req.order_id}"
        _, data = self._call("POST", f"/v3/pay/transactions/{req.channel}", body, what=what)
        if req.channel == "jsapi":
            prepay = data.get("prepay_id")
            if not isinstance(prepay, str) or not prepay or len(prepay) > 128:
                raise self._bad(what, "no prepay_id in the answer")
            return PayStart("jsapi", jsapi_params=self.jsapi_params(prepay))
        if req.channel == "h5":
            h5_url = data.get("h5_url")
            if not isinstance(h5_url, str) or urllib.parse.urlsplit(h5_url).scheme not in ("https", "http"):
                raise self._bad(what, "no h5_url in the answer")
            url = h5_url + ("&redirect_url=" + urllib.parse.quote(req.return_url, safe="") if req.return_url else "")
            return PayStart("redirect", url=url)
        code_url = data.get("code_url")
        if not isinstance(code_url, str) or not code_url.startswith("weixin://"):
            raise self._bad(what, "no code_url in the answer")
        return PayStart("qr", qr_text=code_url)

    def jsapi_params(self, prepay_id: str) -> dict[str, str]:
        """The parameters of ``WeixinJSBridge.invoke("getBrandWCPayRequest", …)`` for a prepay id (JSAPI调起支付)."""
        appid, ts, nonce = self.config.appid, str(self._clock() // 1000), secrets.token_hex(16)
        package = "prepay_id=" + prepay_id
        return {"appId": appid, "timeStamp": ts, "nonceStr": nonce, "package": package, "signType": "RSA",
                "paySign": rsa_sign(self.config.mch_key, jsapi_message(appid, ts, nonce, package))}

    def query(self, order_id: str) -> Notification | None:
        what = f"query {order_id}"
        path = f"/v3/pay/transactions/out-trade-no/{urllib.parse.quote(order_id, safe='')}?mchid={self.config.mchid}"
        try:
            _, data = self._call("GET", path, what=what)
        except WechatPayError as e:
            if e.verified and e.code == "ORDER_NOT_EXIST":
                return None
            raise
        self._ours(data, what)
        if data.get("out_trade_no") != order_id:
            raise self._bad(what, f"the answer is about another order ({str(data.get('out_trade_no'))[:40]})")
        state = data.get("trade_state")
        status = {"SUCCESS": "SUCCESS", "REFUND": "SUCCESS", "CLOSED": "CLOSED", "REVOKED": "CLOSED",
                  "PAYERROR": "CLOSED", "NOTPAY": "NOTPAY", "USERPAYING": "NOTPAY", "ACCEPT": "NOTPAY"
                  }.get(state if isinstance(state, str) else "")
        amount_obj = data.get("amount")
        amount = amount_obj.get("total", 0) if isinstance(amount_obj, dict) else 0
        if status is None or not isinstance(amount, int) or isinstance(amount, bool):
            raise self._bad(what, f"trade_state {str(state)[:20]!r} / amount not understood")
        txn = data.get("transaction_id") if isinstance(data.get("transaction_id"), str) else ""
        paid_ms = 0
        if status == "SUCCESS":
            paid_ms = rfc3339_ms(data.get("success_time")) or 0
            if not txn or not paid_ms or amount <= 0:
                raise self._bad(what, "a paid order without transaction_id, success_time or amount")
        try:
            return Notification(notification_id=_short(f"query:{txn or order_id}:{state}"), order_id=order_id,
                                provider_txn_id=txn or "-", amount_fen=amount, status=status, paid_ms=paid_ms)
        except ValidationError as e:
            raise self._bad(what, f"the answer does not fit ({str(e)[:120]})") from None

    def close(self, order_id: str) -> bool:
        """Close an unpaid order; False if it was paid. WeChat Pay's answer is confirmed by an order query (a
        close of a paid order is refused, and the query says it is paid)."""
        what = f"close {order_id}"
        path = f"/v3/pay/transactions/out-trade-no/{urllib.parse.quote(order_id, safe='')}/close"
        accepted = True
        try:
            status, data = self._call("POST", path, {"mchid": self.config.mchid}, what=what)
            if status == 202:                   # USERPAYING: the person is entering the password now
                raise WechatPayError(str(data.get("code") or "USERPAYING"), f"{what}: the payer is paying now",
                                     retryable=True, verified=True, status=202)
        except WechatPayError as e:
            if e.verified and e.code == "ORDER_NOT_EXIST":
                return True                     # nothing to close
            if not (e.verified and e.code in _CLOSE_STATE_CODES):
                raise
            accepted = False
        try:
            n = self.query(order_id)
        except ProviderError:
            if accepted:
                return True                     # WeChat Pay said it is closed
            raise
        if n is None or n.status == "CLOSED":
            return True
        if n.status == "SUCCESS":
            return False
        if accepted:
            return True
        raise WechatPayError("ORDER_NOT_CLOSED", f"{what}: WeChat Pay would not close it and it waits for payment",
                             retryable=True, verified=True)

    # ------------------------------------------------------------------ notifications

    def verify(self, headers: dict[str, str], body: bytes, now_ms: int) -> Notification | RefundNotice:
        cfg = self.config
        if len(body) > MAX_NOTIFY_BYTES:
            raise Invalid("bad_notification", "the WeChat Pay notification is too large")
        h = {k.lower(): v for k, v in headers.items()}
        try:
            self._check_signature(h, body, now_ms)
        except Unauthenticated as e:
            log.warning("wechatpay notification refused: %s (serial %s)", e.code,
                        h.get("wechatpay-serial", "")[:80])
            raise
        try:
            doc = json.loads(body.decode("utf-8"))
        except (ValueError, UnicodeDecodeError):
            raise Invalid("bad_notification", "the WeChat Pay notification is not JSON") from None
        if not isinstance(doc, dict) or not isinstance(doc.get("resource"), dict):
            raise Invalid("bad_notification", "the WeChat Pay notification has no resource")
        event_id, event_type = doc.get("id"), doc.get("event_type")
        if not isinstance(event_id, str) or not event_id or not isinstance(event_type, str):
            raise Invalid("bad_notification", "the WeChat Pay notification lacks id or event_type")
        try:
            plain = decrypt_resource(cfg.apiv3_key, doc["resource"])
        except ValueError as e:
            log.error("wechatpay notification %s: resource not decrypted (%s); is %s WeChat Pay's APIv3 key?",
                      event_id[:64], str(e)[:80], ENV_APIV3_KEY)
            raise Unauthenticated("undecryptable", f"the notification's resource {e} with our APIv3 key "
                                  f"({ENV_APIV3_KEY})") from None
        try:
            res = json.loads(plain.decode("utf-8"))
        except (ValueError, UnicodeDecodeError):
            raise Invalid("bad_notification", "the decrypted resource is not JSON") from None
        if not isinstance(res, dict):
            raise Invalid("bad_notification", "the decrypted resource is not a JSON object")
        if event_type == "TRANSACTION.SUCCESS":
            if res.get("mchid") != cfg.mchid or res.get("appid") != cfg.appid:
                raise Unauthenticated("wrong_merchant", "this WeChat Pay notification is for another merchant or app")
            return self._payment_notice(event_id, res)
        if event_type in _REFUND_EVENTS:
            if res.get("mchid") != cfg.mchid:
                raise Unauthenticated("wrong_merchant", "this WeChat Pay refund notification is for another "
                                      "merchant")
            return self._refund_notice(res, "refund notification", status_field="refund_status",
                                       expect=_REFUND_EVENTS[event_type], invalid=True)
        raise Invalid("bad_notification", f"unknown event_type {event_type[:40]!r}")

    @staticmethod
    def _payment_notice(event_id: str, res: Mapping[str, Any]) -> Notification:
        amount = res.get("amount")
        total = amount.get("total") if isinstance(amount, dict) else None
        paid_ms = rfc3339_ms(res.get("success_time"))
        if res.get("trade_state") != "SUCCESS" or not isinstance(total, int) or isinstance(total, bool) \
                or paid_ms is None:
            raise Invalid("bad_notification", "a payment notification needs trade_state SUCCESS, amount.total and "
                          "success_time")
        try:
            return Notification(notification_id=_short(event_id), order_id=res.get("out_trade_no"),
                                provider_txn_id=res.get("transaction_id"), amount_fen=total, status="SUCCESS",
                                paid_ms=paid_ms)
        except ValidationError as e:
            raise Invalid("bad_notification", f"malformed WeChat Pay notification: {str(e)[:200]}") from None

    def ack(self, ok: bool, message: str = "") -> NotifyAck:
        """WeChat Pay stops once it reads 200 or 204; anything else (here 500 with FAIL) is retried."""
        if ok:
            return NotifyAck(204, "application/json", b"")
        return NotifyAck(500, "application/json", json.dumps(
            {"code": "FAIL", "message": (message or "失败")[:200]}, ensure_ascii=False).encode("utf-8"))

    # ------------------------------------------------------------------ refunds

    def _refund_notice(self, data: Mapping[str, Any], what: str, *, status_field: str = "status",
                       expect: str = "", refund_id: str = "", order_id: str = "", invalid: bool = False
                       ) -> RefundNotice:
        def bad(problem: str) -> Exception:
            return Invalid("bad_notification", f"{what}: {problem}") if invalid else self._bad(what, problem)

        status = data.get(status_field)
        if status not in ("SUCCESS", "CLOSED", "PROCESSING", "ABNORMAL") or (expect and status != expect):
            raise bad(f"refund status {str(status)[:20]!r} not understood")
        if refund_id and data.get("out_refund_no") != refund_id:
            raise bad(f"the answer is about another refund ({str(data.get('out_refund_no'))[:64]})")
        if order_id and data.get("out_trade_no") != order_id:
            raise bad(f"the answer is about another order ({str(data.get('out_trade_no'))[:40]})")
        amount = data.get("amount")
        fen = amount.get("refund") if isinstance(amount, dict) else None
        if not isinstance(fen, int) or isinstance(fen, bool):
            raise bad("no amount.refund")
        done = 0
        if status == "SUCCESS":
            done = rfc3339_ms(data.get("success_time")) or 0
            if not done:
                raise bad("a successful refund without success_time")
        try:
            return RefundNotice(refund_id=data.get("out_refund_no"), order_id=data.get("out_trade_no"),
                                provider_refund_id=str(data.get("refund_id") or "")[:64], amount_fen=fen,
                                status=status, done_ms=done)
        except ValidationError as e:
            raise bad(f"does not fit ({str(e)[:160]})") from None

    def refund(self, req: RefundRequest) -> RefundNotice:
        what = f"refund {req.refund_id}"
        body: dict[str, Any] = {"out_trade_no": req.order_id, "out_refund_no": req.refund_id,
                                "amount": {"refund": req.amount_fen, "total": req.order_total_fen, "currency": "CNY"}}
        reason = _clip_utf8(req.reason, 80)
        if reason:
            body["reason"] = reason
        if req.notify_url:
            body["notify_url"] = req.notify_url
        try:
            _, data = self._call("POST", "/v3/refund/domestic/refunds", body, what=what)
        except WechatPayError as e:
            if not e.verified and not e.retryable:
                # an answer that is not WeChat Pay's word is never final for money: ask again later
                raise WechatPayError(e.code, e.message, retryable=True, verified=False, status=e.status) from None
            raise
        return self._refund_notice(data, what, refund_id=req.refund_id, order_id=req.order_id)

    def query_refund(self, order_id: str, refund_id: str) -> RefundNotice | None:
        what = f"query refund {refund_id}"
        try:
            _, data = self._call("GET", f"/v3/refund/domestic/refunds/{urllib.parse.quote(refund_id, safe='')}",
                                 what=what)
        except WechatPayError as e:
            if e.verified and e.code == "RESOURCE_NOT_EXISTS":
                return None
            raise
        return self._refund_notice(data, what, refund_id=refund_id, order_id=order_id)

    # ------------------------------------------------------------------ the bill

    def bill(self, day: date) -> list[BillRow]:
        what = f"trade bill {day.isoformat()}"
        try:
            _, data = self._call("GET", f"/v3/bill/tradebill?bill_date={day.isoformat()}&bill_type=ALL", what=what)
        except WechatPayError as e:
            if e.verified and e.code in _NOT_READY_BILL:
                raise WechatPayError(e.code, f"{what} is not ready yet ({e.code}); bills come out around 10:00 "
                                     "China time the next day", retryable=True, verified=True) from None
            raise
        url, hash_type, hash_value = data.get("download_url"), data.get("hash_type"), data.get("hash_value")
        if not isinstance(url, str) or not isinstance(hash_value, str) or str(hash_type).upper() != "SHA1":
            raise self._bad(what, "the answer lacks download_url, or its hash is not SHA1")
        api, target = urllib.parse.urlsplit(self.config.api_url), urllib.parse.urlsplit(url)
        if (target.scheme, target.netloc) != (api.scheme, api.netloc):
            raise self._bad(what, f"the download address is not on {self.config.api_url}")
        path_query = target.path + ("?" + target.query if target.query else "")
        try:
            with self._session.get(url, timeout=TIMEOUT, stream=True, allow_redirects=False, headers={
                    "Authorization": self._authorization("GET", path_query, b""), "User-Agent": USER_AGENT,
                    "Accept": "application/json"}) as r:
                if r.status_code != 200:
                    raise WechatPayError("unreachable", f"{what}: the download answered HTTP {r.status_code}",
                                         retryable=True, status=r.status_code)
                content = bytearray()
                for chunk in r.iter_content(65_536):
                    content += chunk
                    if len(content) > MAX_BILL_BYTES:
                        raise WechatPayError("bad_bill", f"{what}: the file is too large")
        except requests.RequestException as e:
            raise WechatPayError("unreachable", f"{what}: could not be downloaded ({type(e).__name__})",
                                 retryable=True) from None
        digest = hashlib.sha1(bytes(content)).hexdigest()
        if not hmac.compare_digest(digest, hash_value.strip().lower()):
            log.error("wechatpay %s: the downloaded file's SHA1 does not match the signed hash_value", what)
            raise WechatPayError("bad_bill_hash", f"{what}: the downloaded file's SHA1 is not the hash_value WeChat "
                                 "Pay gave", retryable=True)
        return parse_bill(bytes(content))

    # ------------------------------------------------------------------ the payer (web authorisation)

    def oauth_url(self, redirect_uri: str, state: str) -> str:
        """The official account's silent authorisation (snsapi_base) address; WeChat sends the person back to
        ``redirect_uri`` with ``code`` and ``state``. It works inside WeChat only."""
        q = urllib.parse.quote
        return (f"{self.config.oauth_url}/connect/oauth2/authorize?appid={q(self.config.appid, safe='')}"
                f"&redirect_uri={q(redirect_uri, safe='')}&response_type=code&scope=snsapi_base"
                f"&state={q(state, safe='')}#wechat_redirect")

    def openid_for_code(self, code: str) -> str:
        """The payer's openid for the code WeChat gave (网页授权 access_token); ProviderError if it cannot."""
        cfg = self.config
        if not cfg.app_secret:
            raise WechatPayError("oauth_not_configured", f"{ENV_APP_SECRET} is not set: no web authorisation")
        if not code or len(code) > 512:
            raise WechatPayError("invalid_code", "no authorisation code")
        query = urllib.parse.urlencode({"appid": cfg.appid, "secret": cfg.app_secret, "code": code,
                                        "grant_type": "authorization_code"})
        try:
            r = self._session.get(f"{cfg.sns_url}/sns/oauth2/access_token?{query}", timeout=TIMEOUT,
                                  headers={"User-Agent": USER_AGENT, "Accept": "application/json"},
                                  allow_redirects=False)
            content = r.content
        except requests.RequestException as e:              # its text may hold the address (the secret): not used
            log.warning("wechat oauth: not reached: %s", type(e).__name__)
            raise WechatPayError("unreachable", f"WeChat's web authorisation could not be reached "
                                 f"({type(e).__name__})", retryable=True) from None
        if r.status_code != 200:
            raise WechatPayError("unreachable", f"WeChat's web authorisation answered HTTP {r.status_code}",
                                 retryable=True, status=r.status_code)
        try:
            data = json.loads(content.decode("utf-8"))
        except (ValueError, UnicodeDecodeError):
            data = None
        if not isinstance(data, dict):
            raise WechatPayError("bad_answer", "WeChat's web authorisation answer is not JSON", retryable=True)
        errcode = data.get("errcode", 0)
        if errcode:
            message = str(data.get("errmsg") or "")[:200]
            log.warning("wechat oauth: errcode %s %s", str(errcode)[:12], message[:80])
            retryable = errcode in _RETRYABLE_ERRCODES
            raise WechatPayError(str(errcode)[:12], f"web authorisation refused: {message}", retryable=retryable)
        openid = data.get("openid")
        if not isinstance(openid, str) or not _OPENID.match(openid):
            raise WechatPayError("bad_answer", "WeChat's web authorisation gave no openid", retryable=True)
        if data.get("is_snapshotuser") == 1:
            # WeChat's snapshot page (快照页) mode: a virtual account that cannot pay
            raise WechatPayError("snapshot_user", "this page was opened in WeChat's snapshot mode: open it fully "
                                 "(使用完整服务) to pay")
        return openid


def parse_bill(data: bytes) -> list[BillRow]:
    """WeChat Pay's trade bill (ALL): a UTF-8 CSV whose first line is the Chinese header, then the rows (every
    field prefixed with a backtick), then the summary header (总交易单数,…) and its row. 交易状态 SUCCESS rows are
    payments (订单金额), REFUND rows refunds (申请退款金额, 商户退款单号); times are China time."""
    def bad(problem: str) -> WechatPayError:
        return WechatPayError("bad_bill", f"WeChat Pay's bill: {problem}")

    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise bad("not UTF-8 text") from None
    lines = [ln for ln in text.splitlines() if ln.strip()]
    if not lines:
        raise bad("empty")
    header = [h.strip().lstrip("`").replace("（", "(").replace("）", ")") for h in lines[0].split(",")]
    amount_col = "订单金额" if "订单金额" in header else "应结订单金额"
    refund_col = "申请退款金额" if "申请退款金额" in header else "退款金额"
    need = ("交易时间", "微信订单号", "商户订单号", "交易状态", amount_col, "微信退款单号", "商户退款单号", refund_col)
    missing = [h for h in need if h not in header]
    if missing:
        raise bad(f"the header lacks {', '.join(missing)}")
    col = {h: header.index(h) for h in need}
    rows: list[BillRow] = []
    summary = False
    for n, line in enumerate(lines[1:], start=2):
        if line.lstrip("`").startswith("总交易单数"):
            summary = True
            break
        if not line.startswith("`"):
            raise bad(f"line {n} does not start with a backtick")
        cells = [c.strip() for c in line[1:].split(",`")]
        if len(cells) != len(header):
            raise bad(f"line {n}: {len(cells)} fields, the header has {len(header)}")
        cell = {h: cells[i] for h, i in col.items()}
        at = _bill_time(cell["交易时间"])
        if cell["交易状态"] == "SUCCESS":
            fen = bill_fen(cell[amount_col])
            if fen is None or fen <= 0 or at is None:
                raise bad(f"line {n}: amount {cell[amount_col][:20]!r} or time not understood")
            rows.append(BillRow("payment", cell["商户订单号"], cell["微信订单号"], fen, at_ms=at))
        elif cell["交易状态"] == "REFUND":
            fen = bill_fen(cell[refund_col])
            if fen is None or at is None or not cell["商户退款单号"]:
                raise bad(f"line {n}: refund amount {cell[refund_col][:20]!r}, time or refund number not understood")
            rows.append(BillRow("refund", cell["商户订单号"], cell["微信退款单号"], abs(fen),
                                refund_id=cell["商户退款单号"], at_ms=at))
    if not summary:
        raise bad("no summary (总交易单数): the file is cut short")
    return rows


def _bill_time(text: str) -> int | None:
    try:
        return int(datetime.strptime(text, "%Y-%m-%d %H:%M:%S").replace(tzinfo=CHINA).timestamp() * 1000)
    except ValueError:
        return None


def from_env(environ: Mapping[str, str]) -> WechatPay:
    """The WeChat Pay provider from the TAPSHARE_WECHATPAY_* variables (ProviderConfigError if they do not do)."""
    return WechatPay(WechatPayConfig.from_env(environ))
