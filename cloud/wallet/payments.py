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
from dataclasses import dataclass
from typing import Protocol

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from cloud.errors import Gone, Invalid, NotFound, Unauthenticated

log = logging.getLogger("tapshare.cloud.payments")

NOTIFY_MAX_AGE_MS = 10 * 60_000

HEADER_TS, HEADER_SIG = "X-Pay-Timestamp", "X-Pay-Signature"


class Notification(BaseModel):
    """What a provider says about an order (a simplified WeChat Pay / Alipay notification)."""

    model_config = ConfigDict(extra="forbid")
    notification_id: str = Field(min_length=1, max_length=64)
    order_id: str = Field(min_length=1, max_length=40)
    provider_txn_id: str = Field(min_length=1, max_length=64)
    amount_fen: int = Field(ge=0, le=10_000_000)
    status: str = Field(pattern=r"^(SUCCESS|CLOSED)$")
    paid_ms: int = Field(ge=0, le=2**62)


def sign_notification(key: bytes, timestamp_ms: int, body: bytes) -> str:
    return hmac.new(key, str(timestamp_ms).encode() + b"\n" + body, hashlib.sha256).hexdigest()


class PaymentProvider(Protocol):
    name: str
    is_development: bool

    def create(self, order_id: str, amount_fen: int, description: str, notify_url: str, return_url: str,
               expires_ms: int) -> str:
        """Create the order at the provider; returns the URL of its pay page."""

    def query(self, order_id: str) -> Notification | None:
        """The provider's word on an order (a signed answer in real life), or None if it does not know it."""

    def close(self, order_id: str) -> bool:
        """Close an unpaid order at the provider; False if it was paid meanwhile."""

    def verify(self, headers: dict[str, str], body: bytes, now_ms: int) -> Notification:
        """Check a notification's signature and freshness; raises Unauthenticated if it is not genuine."""


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

    def __init__(self, key: bytes, base_url_for_pages: str = "", first_delay_s: float = 0.3,
                 repeat_delay_s: float = 1.5) -> None:
        self.key = key
        self.first_delay_s, self.repeat_delay_s = first_delay_s, repeat_delay_s
        self._orders: dict[str, _SandboxOrder] = {}
        self._lock = threading.Lock()
        self.deliveries: list[tuple[str, int]] = []          # (order id, HTTP status): for tests and the demo

    def create(self, order_id: str, amount_fen: int, description: str, notify_url: str, return_url: str,
               expires_ms: int) -> str:
        with self._lock:
            self._orders[order_id] = _SandboxOrder(order_id, amount_fen, description, notify_url, return_url,
                                                   expires_ms)
        return f"/sandbox-pay/{order_id}"

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
                            status="SUCCESS" if o.state == "paid" else "CLOSED", paid_ms=o.paid_ms)

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
