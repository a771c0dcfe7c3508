"""The outside services accounts need, as small interfaces an operator plugs a real provider into: SMS, and
identity verification. :class:`DevSmsSink` is **not** an SMS gateway (it keeps messages in memory for the demo
and the tests) and :class:`DevAutoVerify` is a development shortcut; both are refused in production mode. The real
SMS gateway is Tencent Cloud SMS (:mod:`cloud.accounts.sms_tencent`)."""

from __future__ import annotations

import threading
import time
import uuid
from collections import deque
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol


@dataclass(frozen=True)
class SmsReceipt:
    """The provider took the message: its name and its id for the request (what its support asks for)."""

    provider: str
    request_id: str
    serial_no: str = ""          # the provider's id for the one message, where it gives one


class SmsFailed(Exception):
    """The provider did not take the message. ``code`` is the provider's own (or ``unreachable``, ``timeout``,
    ``bad_answer``, ``http_NNN``); ``message`` is short and never holds the login code or a secret.
    ``retryable``: the same request may succeed later (network, the provider's internal errors, its rate limits).
    ``user_fault``: the provider refuses this number (malformed, not a mobile number, on its do-not-disturb list):
    the person must check it, and there is nothing for operators to fix. ``may_have_sent``: the outcome is
    unknown (no answer in time, a garbled one), so the message may still arrive."""

    def __init__(self, provider: str, code: str, message: str, retryable: bool = False, user_fault: bool = False,
                 may_have_sent: bool = False) -> None:
        super().__init__(f"{provider}: {code}: {message}")
        self.provider, self.code, self.message = provider, code, message
        self.retryable, self.user_fault, self.may_have_sent = retryable, user_fault, may_have_sent


class SmsProvider(Protocol):
    """What the accounts need from an SMS gateway: send a login code with an approved template that takes the code
    and its lifetime in minutes. Real gateways in China send only approved templates with parameters, never free
    text. A second gateway (Aliyun SMS, say) needs nothing but a class with these three members and a ``from_env``
    for the settings to pick it by name; the accounts service and its rate limits stay as they are."""

    name: str
    is_development: bool

    def send_code(self, phone: str, code: str, ttl_min: int) -> SmsReceipt:
        """Send ``code`` to ``phone`` (11 digits, mainland China); raises :class:`SmsFailed`."""


class DevSmsSink:
    """Development only: NOT an SMS gateway. Keeps the last messages per number in memory so the demo page
    and the tests can show the code. Nothing leaves this process."""

    name = "dev_sink"
    is_development = True

    def __init__(self, keep_per_phone: int = 5, max_phones: int = 10_000) -> None:
        self._lock = threading.Lock()
        self._messages: dict[str, deque[dict[str, Any]]] = {}
        self._readers: dict[str, set[str]] = {}          # phone -> the inbox keys of the browsers that asked
        self._keep, self._max_phones = keep_per_phone, max_phones

    def allow(self, phone: str, inbox_key: str) -> None:
        """The browser holding ``inbox_key`` asked for this number's code: it (only) may read it."""
        with self._lock:
            self._readers.setdefault(phone, set()).add(inbox_key)
            while len(self._readers) > self._max_phones:
                self._readers.pop(next(iter(self._readers)))

    def messages_for(self, phone: str, inbox_key: str) -> list[dict[str, Any]]:
        with self._lock:
            if inbox_key not in self._readers.get(phone, ()):
                return []
        return self.messages(phone)

    def send_code(self, phone: str, code: str, ttl_min: int) -> SmsReceipt:
        text = f"【Tapshare】您的登录验证码是 {code}，{ttl_min} 分钟内有效。Your login code is {code}."
        with self._lock:
            box = self._messages.setdefault(phone, deque(maxlen=self._keep))
            box.append({"phone": phone, "text": text, "sent_ms": _wall_ms()})
            while len(self._messages) > self._max_phones:
                self._messages.pop(next(iter(self._messages)))
        return SmsReceipt(self.name, "dev-" + uuid.uuid4().hex[:16])

    def messages(self, phone: str) -> list[dict[str, Any]]:
        with self._lock:
            return list(reversed(self._messages.get(phone, ())))


def _wall_ms() -> int:
    return time.time_ns() // 1_000_000


class Verifier(Protocol):
    name: str
    is_development: bool
    review_hint: dict[str, str]

    def decide_at_once(self, doc_type: str) -> bool:
        """True if this verifier settles the document on submission (no person involved)."""


class ManualReview:
    """An operator with the reviewer role looks at the photo and approves or rejects."""

    name = "manual"
    is_development = False
    review_hint: ClassVar[dict[str, str]] = {"zh": "人工审核，通常 1 个工作日内完成",
                                             "en": "Reviewed by a person, usually within one working day"}

    def decide_at_once(self, doc_type: str) -> bool:
        return False


class DevAutoVerify(ManualReview):
    """Development only: a resident ID whose number passes the GB 11643 check is verified at once (nothing
    is compared with the real register); other documents still go to manual review."""

    name = "dev_auto"
    is_development = True
    review_hint: ClassVar[dict[str, str]] = {
        "zh": "开发模式：居民身份证号校验通过即自动认证（未核验真实身份）；"
              "护照和通行证由人工审核，通常 1 个工作日内完成",
        "en": "Development mode: a resident ID with a valid checksum is verified at once (not checked against any "
              "register); passports and permits are reviewed by a person, usually within one working day"}

    def decide_at_once(self, doc_type: str) -> bool:
        return doc_type == "resident_id"
