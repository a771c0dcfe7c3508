"""The payment-provider interface, and :class:`SandboxPay`, which behaves like a real provider (its own order
book, a pay page, signed notifications that arrive late and twice) but moves no money; it is refused in
production mode."""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import threading
import time
import uuid
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta, timezone
from typing import Protocol

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from cloud.errors import Gone, Invalid, NotFound, Unauthenticated

log = logging.getLogger("tapshare.cloud.payments")

NOTIFY_MAX_AGE_MS = 10 * 60_000

HEADER_TS, HEADER_SIG = "X-Pay-Timestamp", "X-Pay-Signature"
SANDBOX_KEPT = 10_000        # the development sandbox remembers this many orders, refunds and deliveries (oldest go)
CHINA = timezone(timedelta(hours=8))          # the providers' bills and times are in China Standard Time


class Notification(BaseModel):
    """A provider's word on a top-up order, from a verified notification or an order query. ``NOTPAY`` (only
    from a query): the order exists and is not paid yet."""

    model_config = ConfigDict(extra="forbid")
    notification_id: str = Field(min_length=1, max_length=64)
    order_id: str = Field(min_length=1, max_length=40)
    provider_txn_id: str = Field(min_length=1, max_length=64)
    amount_fen: int = Field(ge=0, le=10_000_000)
    status: str = Field(pattern=r"^(SUCCESS|CLOSED|NOTPAY)$")
    paid_ms: int = Field(ge=0, le=2**62)


class RefundNotice(BaseModel):
    """A provider's word on a refund: from the answer to the refund request, a refund query or a verified refund
    notification. PROCESSING is not final; SUCCESS, CLOSED (it failed and the money stayed with us) and
    ABNORMAL (the payer's account cannot take it: an operator must act) are."""

    model_config = ConfigDict(extra="forbid")
    refund_id: str = Field(min_length=1, max_length=64)
    order_id: str = Field(min_length=1, max_length=40)
    provider_refund_id: str = Field(default="", max_length=64)
    amount_fen: int = Field(ge=0, le=10_000_000)
    status: str = Field(pattern=r"^(PROCESSING|SUCCESS|CLOSED|ABNORMAL)$")
    done_ms: int = Field(default=0, ge=0, le=2**62)


@dataclass(frozen=True)
class PayRequest:
    """A top-up order to create at the provider. ``channel`` is one of the provider's ``channels``:
    ``jsapi`` (inside WeChat; needs ``payer_id``, the openid), ``h5`` (WeChat Pay from another mobile browser),
    ``native`` (a WeChat Pay QR code), ``wap`` (Alipay in a mobile browser or inside Alipay), ``precreate`` (an
    Alipay QR code), ``page`` (the sandbox's own page)."""

    order_id: str
    amount_fen: int
    description: str
    notify_url: str
    return_url: str
    expires_ms: int
    channel: str
    client_ip: str = ""
    payer_id: str = ""


@dataclass(frozen=True)
class PayStart:
    """What the phone page does next: ``redirect`` (open ``url``), ``jsapi`` (call WeChat's
    ``WeixinJSBridge.invoke("getBrandWCPayRequest", jsapi_params)``), or ``qr`` (show ``qr_text`` as a QR code
    to scan with the provider's app)."""

    kind: str
    url: str = ""
    qr_text: str = ""
    jsapi_params: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class RefundRequest:
    refund_id: str              # ours, the provider's idempotency key: a repeat with it never refunds twice
    order_id: str
    amount_fen: int
    order_total_fen: int
    reason: str
    notify_url: str


@dataclass(frozen=True)
class BillRow:
    """One line of a provider's trade bill: a payment or a refund that moved money that day."""

    kind: str                   # payment, refund
    order_id: str
    provider_txn_id: str
    amount_fen: int
    refund_id: str = ""
    at_ms: int = 0


@dataclass(frozen=True)
class NotifyAck:
    """The HTTP answer a provider expects to a notification (WeChat: 204 or JSON; Alipay: the text "success")."""

    status_code: int
    media_type: str
    body: bytes


class ProviderError(Exception):
    """The provider refused a request or could not be reached. ``code`` is the provider's (or ``unreachable``);
    ``retryable``: the same request may succeed later (network, the provider's system error, rate limits)."""

    def __init__(self, provider: str, code: str, message: str, retryable: bool = False) -> None:
        super().__init__(f"{provider}: {code}: {message}")
        self.provider, self.code, self.message, self.retryable = provider, code, message, retryable


def sign_notification(key: bytes, timestamp_ms: int, body: bytes) -> str:
    return hmac.new(key, str(timestamp_ms).encode() + b"\n" + body, hashlib.sha256).hexdigest()


class PaymentProvider(Protocol):
    name: str                   # stored with each order: wechatpay, alipay, sandbox
    is_development: bool
    channels: tuple[str, ...]   # the PayRequest channels it takes
    refund_window_days: int     # how old a payment it still refunds
    # optional: bill_refund_day = "requested" if its bill lists a refund on the day it was asked for (WeChat Pay);
    # otherwise on the day it was done

    def create(self, req: PayRequest) -> PayStart:
        """Create the order at the provider; raises ProviderError."""

    def query(self, order_id: str) -> Notification | None:
        """The provider's word on an order, or None if it does not know it."""

    def close(self, order_id: str) -> bool:
        """Close an unpaid order at the provider; False if it was paid meanwhile."""

    def verify(self, headers: dict[str, str], body: bytes, now_ms: int) -> Notification | RefundNotice:
        """Check a notification (header names lower-case, the raw body) as the provider publishes; raises
        Unauthenticated if it is not genuine, Invalid if it is malformed."""

    def ack(self, ok: bool, message: str = "") -> NotifyAck:
        """The answer to a notification: ``ok`` only once what it says is committed (the provider then stops)."""

    def refund(self, req: RefundRequest) -> RefundNotice:
        """Ask for a refund (idempotent by ``req.refund_id``); the answer is usually PROCESSING."""

    def query_refund(self, order_id: str, refund_id: str) -> RefundNotice | None:
        """The provider's word on a refund, or None if it does not know it."""

    def bill(self, day: date) -> list[BillRow]:
        """The day's trade bill (the provider's day, UTC+8): every payment and refund. ProviderError if it is
        not ready yet (bills come out around 10:00 the next day)."""


def _trim(kept: dict) -> None:
    """Forget the oldest entries beyond ``SANDBOX_KEPT`` (a dict keeps the order they came in)."""
    while len(kept) > SANDBOX_KEPT:
        kept.pop(next(iter(kept)))


@dataclass
class _SandboxOrder:
    order_id: str
    amount_fen: int
    description: str
    notify_url: str
    return_url: str
    expires_ms: int
    state: str = "unpaid"                 # unpaid, paid, closed
    txn_id: str = ""
    paid_ms: int = 0


class SandboxPay:
    """Development only: a payment provider that moves no money. Its pay page is served by this cloud under
    ``/sandbox-pay/``; paying there sends the signed notification after ``first_delay_s`` and again after
    ``repeat_delay_s``, as real providers do when they are not sure they were heard."""

    name = "sandbox"
    is_development = True
    channels = ("page",)
    refund_window_days = 365

    def __init__(self, key: bytes, base_url_for_pages: str = "", first_delay_s: float = 0.3,
                 repeat_delay_s: float = 1.5) -> None:
        self.key = key
        self.first_delay_s, self.repeat_delay_s = first_delay_s, repeat_delay_s
        self._orders: dict[str, _SandboxOrder] = {}
        self._refunds: dict[str, RefundNotice] = {}
        self._lock = threading.Lock()
        self.deliveries: list[tuple[str, int]] = []          # (order id, HTTP status): for tests and the demo

    def create(self, req: PayRequest) -> PayStart:
        with self._lock:
            self._orders[req.order_id] = _SandboxOrder(req.order_id, req.amount_fen, req.description,
                                                       req.notify_url, req.return_url, req.expires_ms)
            _trim(self._orders)
        return PayStart("redirect", url=f"/sandbox-pay/{req.order_id}")

    def order(self, order_id: str) -> _SandboxOrder | None:
        with self._lock:
            return self._orders.get(order_id)

    def pay(self, order_id: str, now_ms: int) -> _SandboxOrder:
        """The person pressed "pay" on the sandbox page."""
        with self._lock:
            o = self._orders.get(order_id)
            if o is None:
                raise NotFound("unknown_order", "the payment provider does not know this order")
            if o.state == "closed" or (o.state == "unpaid" and o.expires_ms < now_ms):
                o.state = "closed"
                raise Gone("order_closed", "this order has closed: start a new top-up")
            if o.state == "unpaid":
                o.state, o.txn_id, o.paid_ms = "paid", "sbx-" + uuid.uuid4().hex[:20], now_ms
        for delay in (self.first_delay_s, self.first_delay_s + self.repeat_delay_s):
            timer = threading.Timer(delay, self._deliver, args=(o,))
            timer.daemon = True
            timer.start()
        return o

    def notification(self, o: _SandboxOrder) -> Notification:
        return Notification(notification_id="n-" + uuid.uuid4().hex[:20], order_id=o.order_id,
                            provider_txn_id=o.txn_id or "-", amount_fen=o.amount_fen,
                            status={"paid": "SUCCESS", "closed": "CLOSED"}.get(o.state, "NOTPAY"),
                            paid_ms=o.paid_ms)

    def signed(self, n: Notification, now_ms: int | None = None) -> tuple[dict[str, str], bytes]:
        body = n.model_dump_json().encode()
        ts = now_ms if now_ms is not None else time.time_ns() // 1_000_000
        return {HEADER_TS: str(ts), HEADER_SIG: sign_notification(self.key, ts, body),
                "Content-Type": "application/json"}, body

    def _deliver(self, o: _SandboxOrder) -> None:
        import requests
        headers, body = self.signed(self.notification(o))
        try:
            r = requests.post(o.notify_url, data=body, headers=headers, timeout=10)
            status = r.status_code
        except requests.RequestException as e:
            log.warning("sandbox notification for %s not delivered: %s", o.order_id, e)
            status = 0
        with self._lock:
            self.deliveries.append((o.order_id, status))
            del self.deliveries[:-SANDBOX_KEPT]

    def query(self, order_id: str) -> Notification | None:
        o = self.order(order_id)
        return None if o is None else self.notification(o)

    def close(self, order_id: str) -> bool:
        with self._lock:
            o = self._orders.get(order_id)
            if o is None or o.state == "closed":
                return True
            if o.state == "paid":
                return False
            o.state = "closed"
            return True

    def verify(self, headers: dict[str, str], body: bytes, now_ms: int) -> Notification:
        ts, sig = headers.get(HEADER_TS.lower(), ""), headers.get(HEADER_SIG.lower(), "")
        if not ts.isdigit() or not sig:
            raise Unauthenticated("unsigned_notification", "payment notifications must be signed")
        if not hmac.compare_digest(sign_notification(self.key, int(ts), body), sig):
            raise Unauthenticated("bad_signature", "the payment notification's signature does not match")
        if abs(now_ms - int(ts)) > NOTIFY_MAX_AGE_MS:
            raise Unauthenticated("stale_notification", "the payment notification's timestamp is too old")
        try:
            return Notification(**json.loads(body))
        except (ValueError, ValidationError, TypeError) as e:
            raise Invalid("bad_notification", f"malformed payment notification: {e}") from None

    def ack(self, ok: bool, message: str = "") -> NotifyAck:
        return NotifyAck(200 if ok else 500, "application/json",
                         json.dumps({"code": "SUCCESS" if ok else "FAIL", "message": message}).encode())

    def refund(self, req: RefundRequest) -> RefundNotice:
        """The sandbox refunds at once (no money moves); the same refund id answers the same refund."""
        with self._lock:
            known = self._refunds.get(req.refund_id)
            if known is not None:
                return known
            o = self._orders.get(req.order_id)
            if o is None or o.state != "paid":
                raise ProviderError(self.name, "ORDER_NOT_PAID", "the sandbox has no paid order " + req.order_id)
            done = sum(r.amount_fen for r in self._refunds.values() if r.order_id == req.order_id)
            if done + req.amount_fen > o.amount_fen:
                raise ProviderError(self.name, "REFUND_TOO_MUCH", "more than the order's unrefunded amount")
            notice = RefundNotice(refund_id=req.refund_id, order_id=req.order_id,
                                  provider_refund_id="sbr-" + uuid.uuid4().hex[:20], amount_fen=req.amount_fen,
                                  status="SUCCESS", done_ms=time.time_ns() // 1_000_000)
            self._refunds[req.refund_id] = notice
            _trim(self._refunds)
            return notice

    def query_refund(self, order_id: str, refund_id: str) -> RefundNotice | None:
        with self._lock:
            return self._refunds.get(refund_id)

    def bill(self, day: date) -> list[BillRow]:
        lo = int(datetime(day.year, day.month, day.day, tzinfo=CHINA).timestamp() * 1000)
        hi = lo + 86_400_000
        with self._lock:
            rows = [BillRow("payment", o.order_id, o.txn_id, o.amount_fen, at_ms=o.paid_ms)
                    for o in self._orders.values() if o.txn_id and lo <= o.paid_ms < hi]
            rows += [BillRow("refund", r.order_id, r.provider_refund_id, r.amount_fen, r.refund_id, r.done_ms)
                     for r in self._refunds.values() if lo <= r.done_ms < hi]
        return rows
