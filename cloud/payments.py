"""Wallet top-ups (s5) through a payment-provider interface, and refunds.

The rule that keeps money right: the balance is credited only by a **verified provider notification**
whose order id and amount match the stored order, exactly once (a conditional state change in the same
transaction as the ledger entry). The browser's return from the pay page credits nothing. Orders not
paid in time are asked about at the provider, then closed there and here.

:class:`SandboxPay` behaves like a real provider (its own order book, a pay page, signed notifications
that arrive late and twice) but moves no money; it is refused in production mode.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import secrets
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Any, Protocol

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from sqlalchemy import and_, func, insert, select, update

from cloud import db as t
from cloud.db import Database
from cloud.service import ApiError, _one, add_entry, audit

log = logging.getLogger("tapshare.cloud.payments")

ORDER_TTL_MS = 15 * 60_000
MIN_TOPUP_FEN, MAX_TOPUP_FEN = 100, 50_000
PENDING_ORDERS_PER_USER = 5            # unpaid orders open at once
ORDERS_PER_USER_PER_HOUR = 20
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
        """Check a notification's signature and freshness; raises ApiError(401) if it is not genuine."""


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
                raise ApiError(404, "unknown_order", "the payment provider does not know this order")
            if o.state == "closed" or (o.state == "unpaid" and o.expires_ms < now_ms):
                o.state = "closed"
                raise ApiError(410, "order_closed", "this order has closed: start a new top-up")
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
            raise ApiError(401, "unsigned_notification", "payment notifications must be signed")
        if not hmac.compare_digest(sign_notification(self.key, int(ts), body), sig):
            raise ApiError(401, "bad_signature", "the payment notification's signature does not match")
        if abs(now_ms - int(ts)) > NOTIFY_MAX_AGE_MS:
            raise ApiError(401, "stale_notification", "the payment notification's timestamp is too old")
        try:
            return Notification(**json.loads(body))
        except (ValueError, ValidationError, TypeError) as e:
            raise ApiError(422, "bad_notification", f"malformed payment notification: {e}") from None


class Wallet:
    def __init__(self, db: Database, provider: PaymentProvider) -> None:
        self.db, self.provider = db, provider

    def create_topup(self, user_id: str, amount_fen: int, notify_url: str, return_url: str,
                     now_ms: int) -> dict[str, Any]:
        if not MIN_TOPUP_FEN <= amount_fen <= MAX_TOPUP_FEN:
            raise ApiError(422, "bad_amount", f"a top-up is {MIN_TOPUP_FEN // 100} to {MAX_TOPUP_FEN // 100} yuan")
        order_id = "o-" + uuid.uuid4().hex[:24]
        expires = now_ms + ORDER_TTL_MS
        with self.db.tx() as conn:
            self.db.lock(conn, f"topup:{user_id}")
            o = t.topup_orders.c
            pending = conn.execute(select(func.count()).where(and_(o.user_id == user_id, o.state == "pending",
                                                                   o.expires_ms > now_ms))).scalar() or 0
            hourly = conn.execute(select(func.count()).where(and_(o.user_id == user_id,
                                                                  o.created_ms > now_ms - 3_600_000))).scalar() or 0
            if pending >= PENDING_ORDERS_PER_USER or hourly >= ORDERS_PER_USER_PER_HOUR:
                raise ApiError(429, "too_many_orders", "too many top-up orders at once: pay or wait for the open ones",
                               retry_after_s=60)
            conn.execute(insert(t.topup_orders).values(order_id=order_id, user_id=user_id, amount_fen=amount_fen,
                                                       state="pending", provider=self.provider.name,
                                                       created_ms=now_ms, expires_ms=expires))
        pay_url = self.provider.create(order_id, amount_fen, f"Tapshare top-up {amount_fen / 100:.2f} CNY",
                                       notify_url, return_url.replace("{order_id}", order_id), expires)
        return {"order_id": order_id, "amount_fen": amount_fen, "state": "pending", "pay_url": pay_url,
                "expires_ms": expires, "sandbox": self.provider.is_development}

    def order(self, user_id: str, order_id: str) -> dict[str, Any]:
        with self.db.read() as conn:
            row = _one(conn, select(t.topup_orders).where(t.topup_orders.c.order_id == order_id))
        if row is None or row["user_id"] != user_id:
            raise ApiError(404, "unknown_order", "no such top-up order")
        return {k: row[k] for k in ("order_id", "amount_fen", "state", "created_ms", "expires_ms", "paid_ms")}

    def notify(self, headers: dict[str, str], body: bytes, now_ms: int) -> dict[str, Any]:
        n = self.provider.verify({k.lower(): v for k, v in headers.items()}, body, now_ms)
        return self.apply(n, now_ms)

    def apply(self, n: Notification, now_ms: int) -> dict[str, Any]:
        """Credit a verified notification's order once; a repeat is acknowledged and changes nothing."""
        o = t.topup_orders.c
        refused: ApiError | None = None
        with self.db.tx() as conn:                 # a mismatch is recorded (committed), then refused
            row = _one(conn, select(t.topup_orders).where(o.order_id == n.order_id))
            if row is None:
                raise ApiError(404, "unknown_order", "no such order")
            conn.execute(update(t.topup_orders).where(o.order_id == n.order_id)
                         .values(notifications=o.notifications + 1))
            if n.status != "SUCCESS":
                return {"code": "SUCCESS", "credited": False}
            if n.amount_fen != row["amount_fen"]:
                audit(conn, "payments", "amount_mismatch", n.order_id,
                      {"notified_fen": n.amount_fen, "ordered_fen": row["amount_fen"]}, now_ms)
                log.error("payment notification for %s says %d fen, the order is %d fen: not credited",
                          n.order_id, n.amount_fen, row["amount_fen"])
                refused = ApiError(409, "amount_mismatch", "the notified amount does not match the order")
        if refused is not None:
            raise refused
        with self.db.tx() as conn:
            won = conn.execute(update(t.topup_orders).where(and_(o.order_id == n.order_id, o.state != "paid"))
                               .values(state="paid", paid_ms=n.paid_ms or now_ms,
                                       provider_txn_id=n.provider_txn_id)).rowcount
            if won != 1:
                return {"code": "SUCCESS", "credited": False, "duplicate": True}
            if row["state"] == "closed":
                log.warning("order %s was paid after it closed here: credited anyway (the money was taken)",
                            n.order_id)
            add_entry(conn, row["user_id"], "topup", row["amount_fen"], now_ms, note=f"order {n.order_id}")
        return {"code": "SUCCESS", "credited": True}

    def close_expired(self, now_ms: int) -> list[str]:
        """Unpaid orders past their time: ask the provider first (a payment may be on its way), then close."""
        o = t.topup_orders.c
        with self.db.read() as conn:
            due = conn.execute(select(o.order_id).where(and_(o.state == "pending", o.expires_ms < now_ms))
                               .limit(200)).scalars().all()
        closed = []
        for order_id in due:
            n = self.provider.query(order_id)
            if n is not None and n.status == "SUCCESS":
                self.apply(n, now_ms)
                continue
            if not self.provider.close(order_id):
                continue                                # paid meanwhile: the notification will credit it
            with self.db.tx() as conn:
                if conn.execute(update(t.topup_orders).where(and_(o.order_id == order_id, o.state == "pending"))
                                .values(state="closed", closed_ms=now_ms)).rowcount:
                    closed.append(order_id)
        return closed

    def refund(self, operator_id: str, session_id: str, amount_fen: int, reason: str, now_ms: int) -> dict[str, Any]:
        """Operator-initiated refund of (part of) a session's charge, e.g. for a failed dispense."""
        e = t.balance_entries.c
        with self.db.tx() as conn:
            q = select(t.sessions).where(t.sessions.c.session_id == session_id)
            if not self.db.is_sqlite:
                q = q.with_for_update()     # refunds of one session queue here: they cannot sum past the charge
            s = _one(conn, q)
            if s is None:
                raise ApiError(404, "unknown_session", "no such session")
            if s["state"] != "ended":
                raise ApiError(409, "not_settled", f"only settled sessions can be refunded (this one is {s['state']})")
            rows = conn.execute(select(e.kind, e.amount_fen).where(and_(
                e.session_id == session_id, e.kind.in_(("charge", "refund"))))).all()
            charged = -sum(a for k, a in rows if k == "charge")
            refunded = sum(a for k, a in rows if k == "refund")
            if amount_fen < 1 or amount_fen > charged - refunded:
                raise ApiError(422, "bad_refund", f"refundable: {charged - refunded} fen of {charged} fen charged",
                               refundable_fen=charged - refunded)
            add_entry(conn, s["user_id"], "refund", amount_fen, now_ms, session_id, reason[:200])
            audit(conn, operator_id, "refund", session_id, {"amount_fen": amount_fen, "reason": reason}, now_ms)
        return {"session_id": session_id, "refunded_fen": refunded + amount_fen, "charged_fen": charged}

    def balance_refunds(self, state: str, limit: int) -> list[dict[str, Any]]:
        r = t.balance_refunds.c
        with self.db.read() as conn:
            rows = conn.execute(select(t.balance_refunds).where(r.state == state)
                                .order_by(r.created_ms).limit(limit)).mappings().all()
        return [_refund_row(x) for x in rows]

    def balance_refund_paid(self, operator_id: str, refund_id: str, reference: str, now_ms: int) -> dict[str, Any]:
        """Mark a balance refund paid, once: a second marking (two operators, a double click) is refused."""
        r = t.balance_refunds.c
        with self.db.tx() as conn:
            changed = conn.execute(update(t.balance_refunds).where(and_(r.refund_id == refund_id,
                                                                        r.state == "requested"))
                                   .values(state="paid", paid_ms=now_ms, paid_by=operator_id,
                                           reference=reference)).rowcount
            row = _one(conn, select(t.balance_refunds).where(r.refund_id == refund_id))
            if row is None:
                raise ApiError(404, "unknown_refund", "no such balance refund")
            if not changed:
                raise ApiError(409, "already_paid", f"this refund was marked paid already ({row['reference']})")
            audit(conn, operator_id, "balance_refund_paid", refund_id,
                  {"amount_fen": row["amount_fen"], "reference": reference}, now_ms)
        return _refund_row(row)


def _refund_row(r) -> dict[str, Any]:
    return {k: r[k] for k in ("refund_id", "user_id", "amount_fen", "state", "created_ms", "paid_ms", "paid_by",
                              "reference", "orders")}


def new_pickup_code() -> str:
    return f"{secrets.randbelow(10**8):08d}"
