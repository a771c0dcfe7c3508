"""A local stand-in of Tencent Cloud's SMS API (API 3.0, ``SendSms`` version 2021-01-11), written from Tencent's
published formats, for tests over real HTTP on loopback. It is not a mock of our adapter: it checks every request as
Tencent does and answers in Tencent's layout.

* ``POST /`` with ``Content-Type: application/json``. The signature (签名方法 v3, TC3-HMAC-SHA256) is recomputed
  from the request as received (method, path, query, the headers named in SignedHeaders with their received
  values, the SHA-256 of the body bytes) with the SecretKey this stand-in knows for the SecretId: an unknown
  SecretId answers ``AuthFailure.SecretIdNotFound``; a timestamp more than five minutes off this stand-in's clock
  ``AuthFailure.SignatureExpire``; a malformed Authorization ``AuthFailure.InvalidAuthorization``; a credential scope
  whose date is not the timestamp's UTC date, a service other than ``sms``, signed headers without content-type and
  host, or a wrong signature ``AuthFailure.SignatureFailure``.
* Common headers: X-TC-Action must be ``SendSms`` (``InvalidAction``), X-TC-Version ``2021-01-11``
  (``NoSuchVersion``), X-TC-Region one the SMS API serves (``MissingParameter`` / ``UnsupportedRegion``).
* The body: ``SmsSdkAppId`` (``UnauthorizedOperation.SmsSdkAppIdVerifyFail``), ``SignName``
  (``FailedOperation.SignatureIncorrectOrUnapproved``), ``TemplateId``
  (``FailedOperation.TemplateIncorrectOrUnapproved``), the number of ``TemplateParamSet`` entries against the
  template's (``FailedOperation.TemplateParamSetNotMatchApprovedTemplate``; a verification-code template's parameters
  are at most 6 digits: ``InvalidParameterValue.TemplateParameterFormatError``), ``PhoneNumberSet`` (empty:
  ``MissingParameter.EmptyPhoneNumberSet``, more than 200: ``LimitExceeded.PhoneNumberCountLimit``); each number must
  be E.164 (``+86`` and 11 digits for the mainland), or its status is ``InvalidParameterValue.IncorrectPhoneNumber``.
* Answers are HTTP 200 with ``{"Response": {"SendStatusSet": [{"SerialNo", "PhoneNumber", "Fee", "SessionContext",
  "Code": "Ok", "Message": "send success", "IsoCode": "CN"}], "RequestId": "…"}}``, or ``{"Response": {"Error":
  {"Code", "Message"}, "RequestId": "…"}}``.

Knobs: ``error`` (answer the whole request with that code), ``status`` (every number's status code) and
``number_status`` (per number), ``delay_s`` (answer late: a timeout for the client; the message is still sent, as
Tencent's would be), ``http_status`` (a gateway error instead of Tencent's JSON), :meth:`down` / :meth:`up` (nothing
listens on the port). Records: ``sent`` (the messages "sent") and ``calls`` (every request with the answer's code).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
import secrets
import threading
import time
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

SECRET_ID = "AKIDtapsharestandin0000000000000001"
SECRET_KEY = "standinSecretKey0123456789abcdef"
SDK_APP_ID = "1400123456"
SIGN_NAME = "清泉水务"
TEMPLATE_ID = "1837465"
REGIONS = ("ap-guangzhou", "ap-beijing", "ap-nanjing")
SIGNATURE_WINDOW_S = 300                   # Tencent: the timestamp may be at most five minutes off

MESSAGES = {               # Tencent's published descriptions, shortened
    "AuthFailure.SignatureFailure": "The provided credentials could not be validated. Please check your signature "
                                    "is correct.",
    "AuthFailure.SignatureExpire": "Signature expired. Timestamp and server time cannot differ by more than 5 "
                                   "minutes.",
    "AuthFailure.SecretIdNotFound": "The SecretId is not found, please ensure that your SecretId is correct.",
    "AuthFailure.InvalidAuthorization": "Authorization header does not conform to the Tencent Cloud standard.",
    "InvalidAction": "The requested action does not exist.",
    "NoSuchVersion": "The requested version does not exist.",
    "UnsupportedRegion": "The action does not support this region.",
    "MissingParameter": "A required parameter is missing.",
    "InvalidParameter": "A parameter is invalid.",
    "FailedOperation.JsonParseFail": "Failed to parse the request body as JSON.",
    "UnauthorizedOperation.SmsSdkAppIdVerifyFail": "SmsSdkAppId verification failed.",
    "FailedOperation.SignatureIncorrectOrUnapproved": "The signature is not approved or its format is incorrect.",
    "FailedOperation.TemplateIncorrectOrUnapproved": "The template is not approved or the content does not match.",
    "FailedOperation.TemplateParamSetNotMatchApprovedTemplate": "The number of template parameters does not match "
                                                                "the approved template.",
    "InvalidParameterValue.TemplateParameterFormatError": "Verification code template parameters must be 0-6 "
                                                          "digits.",
    "MissingParameter.EmptyPhoneNumberSet": "The phone number set is empty.",
    "LimitExceeded.PhoneNumberCountLimit": "More than 200 numbers in one request.",
    "InvalidParameterValue.IncorrectPhoneNumber": "The phone number format is incorrect.",
    "FailedOperation.InsufficientBalanceInSmsPackage": "The SMS package balance is insufficient.",
    "FailedOperation.PhoneNumberInBlacklist": "The number is on the do-not-disturb list.",
    "LimitExceeded.PhoneNumberDailyLimit": "The number exceeded its daily limit of messages.",
    "LimitExceeded.PhoneNumberThirtySecondLimit": "The number exceeded its 30-second limit of messages.",
    "LimitExceeded.PhoneNumberOneHourLimit": "The number exceeded its one-hour limit of messages.",
    "InternalError.Timeout": "The request to send the message timed out.",
    "InternalError.OtherError": "Other error.",
    "RequestLimitExceeded": "The request frequency exceeds the limit.",
}

_AUTH = re.compile(r"^TC3-HMAC-SHA256 Credential=([^/,\s]+)/(\d{4}-\d{2}-\d{2})/([a-z0-9]+)/tc3_request, "
                   r"SignedHeaders=([a-z0-9;-]+), Signature=([0-9a-f]{64})$")
_E164 = re.compile(r"^\+[1-9][0-9]{6,14}$")
_MAINLAND = re.compile(r"^\+861[3-9][0-9]{9}$")


@dataclass
class Sent:
    phone: str                       # as received: +86…
    sign_name: str
    template_id: str
    params: list[str]
    serial_no: str
    request_id: str
    at: float = field(default_factory=time.time)

    @property
    def text(self) -> str:
        """What the phone would show (our approved template's wording)."""
        code, minutes = [*self.params, "", ""][:2]
        return f"【{self.sign_name}】您的登录验证码是 {code}，{minutes} 分钟内有效。"


@dataclass
class Call:
    action: str
    body: Any
    answer_code: str                 # "Ok" (every number taken), a status code, or the Error code
    request_id: str


class Refused(Exception):
    def __init__(self, code: str, message: str | None = None) -> None:
        super().__init__(code)
        self.code, self.message = code, message or MESSAGES.get(code, code)


def tc3_signature(secret_key: str, date: str, service: str, string_to_sign: str) -> str:
    def mac(key: bytes, msg: str) -> bytes:
        return hmac.new(key, msg.encode(), hashlib.sha256).digest()
    signing = mac(mac(mac(("TC3" + secret_key).encode(), date), service), "tc3_request")
    return hmac.new(signing, string_to_sign.encode(), hashlib.sha256).hexdigest()


class TencentSmsStandIn:
    """``with TencentSmsStandIn() as tc:`` — ``tc.endpoint`` is its address; :meth:`env` gives TAPSHARE_TENCENT_*
    for ``cloud.accounts.sms_tencent.from_env``."""

    def __init__(self, *, keys: dict[str, str] | None = None, sdk_app_id: str = SDK_APP_ID,
                 sign_name: str = SIGN_NAME, template_id: str = TEMPLATE_ID, template_params: int = 2,
                 clock=time.time) -> None:
        self.keys = dict(keys or {SECRET_ID: SECRET_KEY})          # SecretId -> SecretKey
        self.sdk_app_id, self.sign_name, self.template_id = sdk_app_id, sign_name, template_id
        self.template_params, self.clock = template_params, clock
        # knobs
        self.error: str | None = None                    # the whole request refused with this code
        self.error_message: str | None = None
        self.status: str | None = None                   # every number's status
        self.number_status: dict[str, str] = {}          # "+86…" -> status code
        self.delay_s = 0.0
        self.http_status: int | None = None              # e.g. 502: a gateway's error page, not Tencent's JSON
        # records
        self.sent: list[Sent] = []
        self.calls: list[Call] = []
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self.port = 0

    # ------------------------------------------------------------------ lifecycle

    def __enter__(self) -> TencentSmsStandIn:
        self.up()
        return self

    def __exit__(self, *exc) -> None:
        self._stopping.set()
        self.down()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def up(self) -> None:
        """Listen (again, on the same port after :meth:`down`)."""
        stand_in = self

        class Handler(_Handler):
            owner = stand_in

        server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        server.daemon_threads = True
        server.block_on_close = False
        self._server, self.port = server, server.server_address[1]
        self._thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()

    def down(self) -> None:
        """Stop listening: connections are refused until :meth:`up`."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join(5)
            self._thread = None

    def env(self, directory: Path, secret_id: str = SECRET_ID, secret_key: str | None = None,
            **overrides: str) -> dict[str, str]:
        """TAPSHARE_TENCENT_* for this stand-in; the SecretKey is written to a file (mode 600) in ``directory``."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        key_file = directory / "tencent_secret_key"
        key_file.write_text((secret_key if secret_key is not None else self.keys.get(secret_id, SECRET_KEY)) + "\n")
        key_file.chmod(0o600)
        env = {"TAPSHARE_TENCENT_SECRET_ID": secret_id, "TAPSHARE_TENCENT_SECRET_KEY_FILE": str(key_file),
               "TAPSHARE_TENCENT_SMS_SDK_APP_ID": self.sdk_app_id, "TAPSHARE_TENCENT_SMS_SIGN_NAME": self.sign_name,
               "TAPSHARE_TENCENT_SMS_TEMPLATE_ID": self.template_id, "TAPSHARE_TENCENT_SMS_REGION": "ap-guangzhou",
               "TAPSHARE_TENCENT_SMS_ENDPOINT": self.endpoint}
        env.update(overrides)
        return env

    # ------------------------------------------------------------------ for assertions

    def codes(self, phone: str) -> list[str]:
        """The codes sent to ``phone`` (11 digits or +86…), oldest first."""
        e164 = phone if phone.startswith("+") else "+86" + phone
        with self._lock:
            return [s.params[0] for s in self.sent if s.phone == e164 and s.params]

    def last_code(self, phone: str) -> str:
        codes = self.codes(phone)
        assert codes, f"the stand-in sent nothing to {phone}"
        return codes[-1]

    # ------------------------------------------------------------------ Tencent's checks

    def answer(self, method: str, path: str, headers: dict[str, str], body: bytes) -> dict[str, Any]:
        request_id = str(uuid.uuid4())
        action = headers.get("x-tc-action", "")
        parsed: Any = None
        try:
            self._authenticate(method, path, headers, body)
            if action != "SendSms":
                raise Refused("InvalidAction", f"The action {action[:40]!r} does not exist.")
            if headers.get("x-tc-version") != "2021-01-11":
                raise Refused("NoSuchVersion")
            region = headers.get("x-tc-region", "")
            if not region:
                raise Refused("MissingParameter", "The parameter Region is missing.")
            if region not in REGIONS:
                raise Refused("UnsupportedRegion")
            if not headers.get("content-type", "").lower().startswith("application/json"):
                raise Refused("InvalidParameter", "The Content-Type must be application/json.")
            try:
                parsed = json.loads(body.decode("utf-8"))
            except (UnicodeDecodeError, ValueError):
                raise Refused("FailedOperation.JsonParseFail") from None
            if not isinstance(parsed, dict):
                raise Refused("FailedOperation.JsonParseFail")
            if self.error:
                raise Refused(self.error, self.error_message)
            statuses = self._send(parsed, request_id)
        except Refused as e:
            with self._lock:
                self.calls.append(Call(action, parsed, e.code, request_id))
            return {"Response": {"Error": {"Code": e.code, "Message": e.message}, "RequestId": request_id}}
        codes = {s["Code"] for s in statuses}
        with self._lock:
            self.calls.append(Call(action, parsed, "Ok" if codes == {"Ok"} else sorted(codes - {"Ok"})[0], request_id))
        return {"Response": {"SendStatusSet": statuses, "RequestId": request_id}}

    def _authenticate(self, method: str, path: str, headers: dict[str, str], body: bytes) -> None:
        auth = headers.get("authorization", "")
        m = _AUTH.match(auth)
        if not m:
            raise Refused("AuthFailure.InvalidAuthorization")
        secret_id, date, service, signed_headers, signature = m.groups()
        secret_key = self.keys.get(secret_id)
        if secret_key is None:
            raise Refused("AuthFailure.SecretIdNotFound")
        stamp = headers.get("x-tc-timestamp", "")
        if not stamp.isdigit():
            raise Refused("MissingParameter", "The parameter Timestamp is missing or not a number.")
        if abs(self.clock() - int(stamp)) > SIGNATURE_WINDOW_S:
            raise Refused("AuthFailure.SignatureExpire")
        names = signed_headers.split(";")
        if "content-type" not in names or "host" not in names or names != sorted(names) or \
                any(n not in headers for n in names):
            raise Refused("AuthFailure.SignatureFailure")
        if date != datetime.fromtimestamp(int(stamp), UTC).strftime("%Y-%m-%d") or service != "sms":
            raise Refused("AuthFailure.SignatureFailure")
        url_path, _, query = path.partition("?")
        canonical_headers = "".join(f"{n}:{headers[n].strip().lower()}\n" for n in names)
        canonical = "\n".join((method, url_path, query, canonical_headers, signed_headers,
                               hashlib.sha256(body).hexdigest()))
        string_to_sign = "\n".join(("TC3-HMAC-SHA256", stamp, f"{date}/{service}/tc3_request",
                                    hashlib.sha256(canonical.encode()).hexdigest()))
        if not hmac.compare_digest(tc3_signature(secret_key, date, service, string_to_sign), signature):
            raise Refused("AuthFailure.SignatureFailure")

    def _send(self, body: dict[str, Any], request_id: str) -> list[dict[str, Any]]:
        phones = body.get("PhoneNumberSet")
        if not isinstance(phones, list) or not phones:
            raise Refused("MissingParameter.EmptyPhoneNumberSet")
        if len(phones) > 200:
            raise Refused("LimitExceeded.PhoneNumberCountLimit")
        if str(body.get("SmsSdkAppId", "")) != self.sdk_app_id:
            raise Refused("UnauthorizedOperation.SmsSdkAppIdVerifyFail")
        if str(body.get("SignName", "")) != self.sign_name:
            raise Refused("FailedOperation.SignatureIncorrectOrUnapproved")
        if str(body.get("TemplateId", "")) != self.template_id:
            raise Refused("FailedOperation.TemplateIncorrectOrUnapproved")
        params = body.get("TemplateParamSet") or []
        if not isinstance(params, list) or len(params) != self.template_params:
            raise Refused("FailedOperation.TemplateParamSetNotMatchApprovedTemplate")
        if any(not isinstance(p, str) or not re.fullmatch(r"[0-9]{0,6}", p) for p in params):
            raise Refused("InvalidParameterValue.TemplateParameterFormatError")
        out = []
        for phone in phones:
            phone = str(phone)
            code = self.number_status.get(phone) or self.status or "Ok"
            if code == "Ok" and not (_E164.match(phone) and (not phone.startswith("+86") or _MAINLAND.match(phone))):
                code = "InvalidParameterValue.IncorrectPhoneNumber"
            serial = f"2433:{secrets.randbelow(10**30):030d}" if code == "Ok" else ""
            out.append({"SerialNo": serial, "PhoneNumber": phone, "Fee": 1 if code == "Ok" else 0,
                        "SessionContext": str(body.get("SessionContext", "")), "Code": code,
                        "Message": "send success" if code == "Ok" else MESSAGES.get(code, code),
                        "IsoCode": "CN" if phone.startswith("+86") else "DEF"})
            if code == "Ok":
                with self._lock:
                    self.sent.append(Sent(phone, self.sign_name, self.template_id, list(params), serial, request_id))
        return out


class _Handler(BaseHTTPRequestHandler):
    owner: TencentSmsStandIn
    protocol_version = "HTTP/1.1"

    def log_message(self, *args) -> None:
        pass

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(min(length, 1 << 20))
        headers = {k.lower(): v for k, v in self.headers.items()}
        owner = self.owner
        if owner.http_status:
            self._reply(owner.http_status, b"<html><body>502 Bad Gateway</body></html>", "text/html")
            return
        answer = owner.answer("POST", self.path, headers, body)
        if owner.delay_s and owner._stopping.wait(owner.delay_s):
            return
        self._reply(200, json.dumps(answer, ensure_ascii=False).encode(), "application/json")

    def do_GET(self) -> None:
        answer = {"Response": {"Error": {"Code": "InvalidParameter", "Message": "This stand-in takes POST only."},
                               "RequestId": str(uuid.uuid4())}}
        self._reply(200, json.dumps(answer).encode(), "application/json")

    def _reply(self, status: int, data: bytes, content_type: str) -> None:
        try:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
        except OSError:
            pass                         # the client gave up (a timeout): nothing to do
