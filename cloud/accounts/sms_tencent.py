"""Tencent Cloud SMS (腾讯云短信), the real SMS gateway for login codes: API 3.0 ``SendSms``, version 2021-01-11,
spoken with our own code (``requests``; no SDK) from Tencent's published formats:

* Every request is signed with 签名方法 v3 (TC3-HMAC-SHA256, :func:`tc3_sign`): the canonical request (method, URI
  ``/``, the empty query of a POST, the signed headers ``content-type``, ``host`` and ``x-tc-action`` as
  ``name:value`` lines, lower case and trimmed, their names joined with ``;``, and the hex SHA-256 of the body),
  the string to sign (``TC3-HMAC-SHA256``, the timestamp, the credential scope ``<UTC date>/sms/tc3_request`` and
  the hex SHA-256 of the canonical request), the derived keys (SecretDate = HMAC("TC3" + SecretKey, date),
  SecretService = HMAC(SecretDate, "sms"), SecretSigning = HMAC(SecretService, "tc3_request")) and the
  ``Authorization`` header ``TC3-HMAC-SHA256 Credential=<SecretId>/<scope>, SignedHeaders=…, Signature=…``. The
  common parameters go in headers: X-TC-Action ``SendSms``, X-TC-Version ``2021-01-11``, X-TC-Timestamp (Unix
  seconds; Tencent refuses one more than five minutes off its clock: AuthFailure.SignatureExpire) and X-TC-Region.
* The body: ``PhoneNumberSet`` (E.164, ``+86…``), ``SmsSdkAppId``, ``SignName``, ``TemplateId`` and
  ``TemplateParamSet`` (our template takes two parameters: the code and its lifetime in minutes).
* The answer ``{"Response": {...}}``: ``Error.Code/Message`` when the whole request was refused; otherwise
  ``SendStatusSet[]`` with one ``Code`` per number (``Ok`` when taken, with its ``SerialNo``) and ``RequestId``.
  Anything but ``Ok`` becomes :class:`SmsFailed` with Tencent's code: retryable for ``InternalError.*``,
  ``RequestLimitExceeded*``, Tencent's per-number frequency limits and network failures; the person's fault for a
  number Tencent calls wrong or will not send to.

Neither the SecretKey nor a login code is ever logged or put in an error message (Tencent's own messages are
scrubbed of the code and the number before they go anywhere).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import re
import stat
import time
import urllib.parse
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import requests
import urllib3

from cloud.accounts.providers import SmsFailed, SmsReceipt
from cloud.errors import ProviderConfigError

log = logging.getLogger("tapshare.cloud.sms.tencent")

NAME = "tencent"
SERVICE = "sms"
ACTION = "SendSms"
VERSION = "2021-01-11"
ALGORITHM = "TC3-HMAC-SHA256"
CONTENT_TYPE = "application/json; charset=utf-8"
DEFAULT_ENDPOINT = "https://sms.tencentcloudapi.com"
DEFAULT_REGION = "ap-guangzhou"
TIMEOUT = (5, 10)                                   # connect, read (seconds)
MAX_ANSWER_BYTES = 64 * 1024

ENV_SECRET_ID = "TAPSHARE_TENCENT_SECRET_ID"
ENV_SECRET_KEY_FILE = "TAPSHARE_TENCENT_SECRET_KEY_FILE"
ENV_SDK_APP_ID = "TAPSHARE_TENCENT_SMS_SDK_APP_ID"
ENV_SIGN_NAME = "TAPSHARE_TENCENT_SMS_SIGN_NAME"
ENV_TEMPLATE_ID = "TAPSHARE_TENCENT_SMS_TEMPLATE_ID"
ENV_REGION = "TAPSHARE_TENCENT_SMS_REGION"
ENV_ENDPOINT = "TAPSHARE_TENCENT_SMS_ENDPOINT"

_SECRET_ID = re.compile(r"^[A-Za-z0-9]{8,128}$")     # AKID… (36 characters for a permanent key)
_SECRET_KEY = re.compile(r"^[\x21-\x7e]{16,128}$")    # printable, no spaces (32 characters for a permanent key)
_SDK_APP_ID = re.compile(r"^[0-9]{6,20}$")           # e.g. 1400006666
_TEMPLATE_ID = re.compile(r"^[0-9]{1,20}$")
_REGION = re.compile(r"^[a-z]{2,}(-[a-z]+)+(-[0-9]+)?$")
_LOOPBACK = {"127.0.0.1", "localhost", "::1"}
_MAINLAND = re.compile(r"^1[3-9][0-9]{9}$")

# Tencent's codes that mean "the same request may work later"
_RETRYABLE_PREFIXES = ("InternalError", "RequestLimitExceeded", "LimitExceeded.PhoneNumber",
                       "LimitExceeded.DeliveryFrequencyLimit", "ResourceUnavailable")
# ... and those that mean "this number": the person must check it; operators have nothing to fix
_USER_FAULT = frozenset({"InvalidParameterValue.IncorrectPhoneNumber", "FailedOperation.PhoneNumberParseFail",
                         "FailedOperation.PhoneNumberInBlacklist"})


# ---------------------------------------------------------------------------------------------- TC3 signing


@dataclass(frozen=True)
class Tc3Signature:
    """Each step of 签名方法 v3, so a test can hold them against Tencent's published example."""

    canonical_request: str
    credential_scope: str
    string_to_sign: str
    signed_headers: str
    signature: str

    def authorization(self, secret_id: str) -> str:
        return (f"{ALGORITHM} Credential={secret_id}/{self.credential_scope}, "
                f"SignedHeaders={self.signed_headers}, Signature={self.signature}")


def _sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _hmac(key: bytes, msg: str) -> bytes:
    return hmac.new(key, msg.encode("utf-8"), hashlib.sha256).digest()


def tc3_sign(secret_key: str, *, service: str, timestamp: int, headers: Mapping[str, str], payload: bytes,
             method: str = "POST", uri: str = "/", query: str = "") -> Tc3Signature:
    """Sign a request with TC3-HMAC-SHA256 as Tencent publishes it. ``headers`` are the signed ones (name → value
    as sent; ``content-type`` and ``host`` at least); ``payload`` the exact body bytes; the date of the credential
    scope is the UTC date of ``timestamp`` (not China's: at 00:44 in Beijing it is still yesterday in UTC)."""
    lines = sorted((k.strip().lower(), v.strip().lower()) for k, v in headers.items())
    canonical_headers = "".join(f"{k}:{v}\n" for k, v in lines)
    signed_headers = ";".join(k for k, _ in lines)
    canonical_request = "\n".join((method.upper(), uri, query, canonical_headers, signed_headers,
                                   _sha256_hex(payload)))
    date = datetime.fromtimestamp(timestamp, UTC).strftime("%Y-%m-%d")
    scope = f"{date}/{service}/tc3_request"
    string_to_sign = "\n".join((ALGORITHM, str(timestamp), scope, _sha256_hex(canonical_request.encode("utf-8"))))
    secret_date = _hmac(("TC3" + secret_key).encode("utf-8"), date)
    secret_signing = _hmac(_hmac(secret_date, service), "tc3_request")
    signature = hmac.new(secret_signing, string_to_sign.encode("utf-8"), hashlib.sha256).hexdigest()
    return Tc3Signature(canonical_request, scope, string_to_sign, signed_headers, signature)


# ---------------------------------------------------------------------------------------------- configuration


@dataclass(frozen=True)
class TencentSmsConfig:
    """A Tencent Cloud API key (SecretId, and the SecretKey read from a file), the SMS application (SdkAppId), the
    approved signature (签名, the name without 【】) and the approved verification-code template (its two
    parameters: the code, then the minutes it is valid)."""

    secret_id: str
    secret_key: str = field(repr=False)
    sdk_app_id: str = ""
    sign_name: str = ""
    template_id: str = ""
    region: str = DEFAULT_REGION
    endpoint: str = DEFAULT_ENDPOINT

    @classmethod
    def from_env(cls, environ: Mapping[str, str]) -> TencentSmsConfig:
        """Read and check the TAPSHARE_TENCENT_* variables; every problem at once in one ProviderConfigError that
        names the variables and never holds the SecretKey."""
        problems: list[str] = []

        def get(var: str) -> str:
            return (environ.get(var) or "").strip()

        secret_id = get(ENV_SECRET_ID)
        if not secret_id:
            problems.append(f"{ENV_SECRET_ID}: missing (the SecretId of a Tencent Cloud API key, AKID…)")
        elif not _SECRET_ID.match(secret_id):
            problems.append(f"{ENV_SECRET_ID}: must be letters and digits only, as the console shows it "
                            f"({len(secret_id)} characters given)")
        secret_key = cls._read_secret_key(get(ENV_SECRET_KEY_FILE), problems)

        sdk_app_id = get(ENV_SDK_APP_ID)
        if not sdk_app_id:
            problems.append(f"{ENV_SDK_APP_ID}: missing (the SMS application's SdkAppId, e.g. 1400006666)")
        elif not _SDK_APP_ID.match(sdk_app_id):
            problems.append(f"{ENV_SDK_APP_ID}: must be the SdkAppId, digits only, got {sdk_app_id[:24]!r}")

        sign_name = get(ENV_SIGN_NAME)
        if not sign_name:
            problems.append(f"{ENV_SIGN_NAME}: missing (the approved SMS signature, e.g. 腾讯云)")
        elif any(c in sign_name for c in "【】[]"):
            problems.append(f"{ENV_SIGN_NAME}: give the signature without 【】 (Tencent adds them), "
                            f"got {sign_name[:24]!r}")
        elif len(sign_name) > 32 or not sign_name.isprintable():
            problems.append(f"{ENV_SIGN_NAME}: must be the approved signature (at most 32 printable characters)")

        template_id = get(ENV_TEMPLATE_ID)
        if not template_id:
            problems.append(f"{ENV_TEMPLATE_ID}: missing (the approved template's ID; it takes two parameters, "
                            "the code and the minutes it is valid)")
        elif not _TEMPLATE_ID.match(template_id):
            problems.append(f"{ENV_TEMPLATE_ID}: must be the template ID, digits only, got {template_id[:24]!r}")

        region = get(ENV_REGION) or DEFAULT_REGION
        if not _REGION.match(region):
            problems.append(f"{ENV_REGION}: must be a region such as ap-guangzhou, ap-beijing or ap-nanjing, "
                            f"got {region[:40]!r}")

        endpoint = (get(ENV_ENDPOINT) or DEFAULT_ENDPOINT).rstrip("/")
        parts = urllib.parse.urlsplit(endpoint)
        loopback = parts.scheme == "http" and (parts.hostname or "") in _LOOPBACK
        if not ((parts.scheme == "https" or loopback) and parts.netloc and not parts.path and not parts.query
                and not parts.fragment and "@" not in parts.netloc):
            problems.append(f"{ENV_ENDPOINT}: must be an https:// address without a path (http:// only on "
                            f"loopback), got {endpoint[:80]!r}")
        if problems:
            raise ProviderConfigError("Tencent Cloud SMS: " + "; ".join(problems))
        return cls(secret_id=secret_id, secret_key=secret_key or "", sdk_app_id=sdk_app_id, sign_name=sign_name,
                   template_id=template_id, region=region, endpoint=endpoint)

    @staticmethod
    def _read_secret_key(path: str, problems: list[str]) -> str | None:
        var = ENV_SECRET_KEY_FILE
        if not path:
            problems.append(f"{var}: missing (a file holding the API key's SecretKey, readable only by this service)")
            return None
        try:
            with open(path, "rb") as f:
                st = os.fstat(f.fileno())
                data = f.read(4097)
        except OSError as e:
            problems.append(f"{var}: cannot read {path}: {e.strerror or type(e).__name__}")
            return None
        if len(data) > 4096:
            problems.append(f"{var}: {path} is too large to hold a SecretKey")
            return None
        try:
            key = data.decode("ascii").strip()
        except UnicodeDecodeError:
            key = None
        if not key:
            problems.append(f"{var}: {path} " + ("is empty" if key == "" else "is not plain ASCII text"))
            return None
        if not _SECRET_KEY.match(key):
            problems.append(f"{var}: {path} must hold the SecretKey alone, on one line, without spaces "
                            f"({len(key)} characters found)")
            return None
        if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
            log.warning("%s: %s can be read by other users: chmod 600 it", var, path)
        return key


# ---------------------------------------------------------------------------------------------- the provider


class TencentSms:
    """Sends login codes through Tencent Cloud SMS. ``clock`` gives Unix seconds (tests move it to see
    AuthFailure.SignatureExpire); ``timeout`` is (connect, read) in seconds."""

    name = NAME
    is_development = False

    def __init__(self, config: TencentSmsConfig, *, timeout: tuple[float, float] = TIMEOUT,
                 clock: Callable[[], float] = time.time, session: requests.Session | None = None) -> None:
        self.config, self.timeout, self.clock = config, timeout, clock
        self.http = session or requests.Session()
        self._host = urllib.parse.urlsplit(config.endpoint).netloc

    def __repr__(self) -> str:
        return f"TencentSms(sdk_app_id={self.config.sdk_app_id}, region={self.config.region})"

    def send_code(self, phone: str, code: str, ttl_min: int) -> SmsReceipt:
        e164 = _e164(phone)
        body = {"PhoneNumberSet": [e164], "SmsSdkAppId": self.config.sdk_app_id, "SignName": self.config.sign_name,
                "TemplateId": self.config.template_id, "TemplateParamSet": [code, str(ttl_min)]}
        answer = self._call(ACTION, body, scrub=(code, phone))
        request_id = str(answer.get("RequestId") or "")[:80]
        statuses = answer.get("SendStatusSet")
        status = next((s for s in statuses if isinstance(s, dict) and s.get("PhoneNumber") == e164), None) \
            if isinstance(statuses, list) else None
        if status is None and isinstance(statuses, list) and len(statuses) == 1 and isinstance(statuses[0], dict):
            status = statuses[0]         # one number asked, one status: Tencent may write the number its own way
        if status is None:
            raise SmsFailed(NAME, "bad_answer", f"no send status for the number (RequestId {request_id or '?'})",
                            retryable=True, may_have_sent=True)
        result = str(status.get("Code") or "")
        if result != "Ok":
            raise self._failed(result or "bad_answer", str(status.get("Message") or ""), (code, phone), request_id)
        serial = str(status.get("SerialNo") or "")[:80]
        log.info("Tencent SMS took the message: RequestId %s, SerialNo %s", request_id, serial)
        return SmsReceipt(NAME, request_id, serial)

    # ------------------------------------------------------------------ the API call

    def _call(self, action: str, body: dict[str, Any], scrub: tuple[str, ...]) -> dict[str, Any]:
        payload = json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
        timestamp = int(self.clock())
        signed = {"content-type": CONTENT_TYPE, "host": self._host, "x-tc-action": action}
        sig = tc3_sign(self.config.secret_key, service=SERVICE, timestamp=timestamp, headers=signed, payload=payload)
        headers = {"Authorization": sig.authorization(self.config.secret_id), "Content-Type": CONTENT_TYPE,
                   "Host": self._host, "X-TC-Action": action, "X-TC-Version": VERSION,
                   "X-TC-Timestamp": str(timestamp), "X-TC-Region": self.config.region}
        try:
            r = self.http.post(self.config.endpoint + "/", data=payload, headers=headers, timeout=self.timeout,
                               allow_redirects=False, stream=True)
            with r:
                raw = r.raw.read(MAX_ANSWER_BYTES + 1, decode_content=True)
        except requests.ConnectTimeout:
            raise SmsFailed(NAME, "unreachable", "no connection to Tencent Cloud in time", retryable=True) from None
        except (requests.ReadTimeout, urllib3.exceptions.ReadTimeoutError):
            raise SmsFailed(NAME, "timeout", "Tencent Cloud did not answer in time", retryable=True,
                            may_have_sent=True) from None
        except requests.ConnectionError as e:
            # refused or no such host: nothing reached Tencent; a connection that broke later may have carried it
            raise SmsFailed(NAME, "unreachable", "cannot reach Tencent Cloud", retryable=True,
                            may_have_sent=not _never_connected(e)) from None
        except (requests.RequestException, urllib3.exceptions.HTTPError, OSError) as e:
            raise SmsFailed(NAME, "unreachable", f"the request failed: {type(e).__name__}", retryable=True,
                            may_have_sent=True) from None
        if r.status_code != 200:
            raise SmsFailed(NAME, f"http_{r.status_code}", "Tencent Cloud answered with an HTTP error",
                            retryable=r.status_code >= 500 or r.status_code == 429, may_have_sent=r.status_code >= 500)
        try:
            if len(raw) > MAX_ANSWER_BYTES:
                raise ValueError("too large")
            response = json.loads(raw.decode("utf-8"))["Response"]
            if not isinstance(response, dict):
                raise ValueError("not an object")
        except (ValueError, KeyError, TypeError, UnicodeDecodeError):
            raise SmsFailed(NAME, "bad_answer", "the answer is not Tencent Cloud's JSON", retryable=True,
                            may_have_sent=True) from None
        error = response.get("Error")
        if error is not None:
            code = str(error.get("Code") or "Error") if isinstance(error, dict) else "Error"
            message = str(error.get("Message") or "") if isinstance(error, dict) else ""
            raise self._failed(code, message, scrub, str(response.get("RequestId") or ""))
        return response

    @staticmethod
    def _failed(code: str, message: str, scrub: tuple[str, ...], request_id: str) -> SmsFailed:
        code = re.sub(r"[^A-Za-z0-9._:-]", "", code)[:80] or "Error"
        for secret in scrub:
            if secret:
                message = message.replace(secret, "***")
        message = " ".join(message.split())[:160]
        if request_id:
            message = f"{message} (RequestId {request_id[:40]})" if message else f"RequestId {request_id[:40]}"
        return SmsFailed(NAME, code, message, retryable=code.startswith(_RETRYABLE_PREFIXES),
                         user_fault=code in _USER_FAULT)


def _never_connected(e: requests.ConnectionError) -> bool:
    """The connection was never made (refused, no such host), so nothing was sent."""
    reason = getattr(e.args[0], "reason", None) if e.args else None
    return isinstance(reason, urllib3.exceptions.NewConnectionError)


def _e164(phone: str) -> str:
    """Our numbers are 11-digit mainland mobiles; Tencent wants E.164 (+86…)."""
    if _MAINLAND.match(phone):
        return "+86" + phone
    if re.match(r"^\+[1-9][0-9]{6,14}$", phone):
        return phone
    raise SmsFailed(NAME, "unsupported_number", "not a number this adapter sends to", user_fault=True)


def from_env(environ: Mapping[str, str]) -> TencentSms:
    """The Tencent Cloud SMS provider from the TAPSHARE_TENCENT_* variables (ProviderConfigError if they do not
    do)."""
    return TencentSms(TencentSmsConfig.from_env(environ))
