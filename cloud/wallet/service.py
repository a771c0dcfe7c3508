"""Wallet top-ups (s5) through a payment-provider interface, and refunds.

The rule that keeps money right: the balance is credited only by a **verified provider notification**
whose order id and amount match the stored order, exactly once (a conditional state change in the same
transaction as the ledger entry). The browser's return from the pay page credits nothing. Orders not
paid in time are asked about at the provider, then closed there and here.
"""

from __future__ import annotations

import logging
import uuid
from typing import Any

from sqlalchemy import and_, func, insert, select, update

from cloud import db as t
from cloud.db import Database, audit, first_row
from cloud.errors import Conflict, DomainError, Invalid, NotFound, TooMany
from cloud.wallet.balance import add_entry, balance
from cloud.wallet.payments import Notification, PaymentProvider

log = logging.getLogger("tapshare.cloud.payments")

ORDER_TTL_MS = 15 * 60_000
MIN_TOPUP_FEN, MAX_TOPUP_FEN = 100, 50_000
PENDING_ORDERS_PER_USER = 5            # unpaid orders open at once
ORDERS_PER_USER_PER_HOUR = 20


class Wallet:
    def __init__(self, db: Database, provider: PaymentProvider) -> None:
        self.db, self.provider = db, provider

    def view(self, user_id: str) -> dict[str, Any]:
        """The wallet page: balances, the newest entries (holds and releases left out) and top-up orders."""
        e, o = t.balance_entries.c, t.topup_orders.c
        with self.db.read() as conn:
            available, held = balance(conn, user_id)
            entries = conn.execute(select(e.kind, e.amount_fen, e.session_id, e.note, e.created_ms)
                                   .where(e.user_id == user_id, e.kind.not_in(("hold", "release")))
                                   .order_by(e.entry_id.desc()).limit(50)).mappings().all()
            orders = conn.execute(select(o.order_id, o.amount_fen, o.state, o.created_ms, o.expires_ms, o.paid_ms)
                                  .where(o.user_id == user_id).order_by(o.created_ms.desc()).limit(20)).mappings().all()
        return {"balance_fen": available + held, "held_fen": held, "available_fen": available,
                "arrears_fen": max(0, -available), "entries": [dict(x) for x in entries],
                "orders": [dict(x) for x in orders], "sandbox": self.provider.is_development,
                "min_topup_fen": MIN_TOPUP_FEN, "max_topup_fen": MAX_TOPUP_FEN}

    def create_topup(self, user_id: str, amount_fen: int, notify_url: str, return_url: str,
                     now_ms: int) -> dict[str, Any]:
        if not MIN_TOPUP_FEN <= amount_fen <= MAX_TOPUP_FEN:
            raise Invalid("bad_amount", f"a top-up is {MIN_TOPUP_FEN // 100} to {MAX_TOPUP_FEN // 100} yuan")
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
                raise TooMany("too_many_orders", "too many top-up orders at once: pay or wait for the open ones",
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
            row = first_row(conn, select(t.topup_orders).where(t.topup_orders.c.order_id == order_id))
        if row is None or row["user_id"] != user_id:
            raise NotFound("unknown_order", "no such top-up order")
        return {k: row[k] for k in ("order_id", "amount_fen", "state", "created_ms", "expires_ms", "paid_ms")}

    def notify(self, headers: dict[str, str], body: bytes, now_ms: int) -> dict[str, Any]:
        n = self.provider.verify({k.lower(): v for k, v in headers.items()}, body, now_ms)
        return self.apply(n, now_ms)

    def apply(self, n: Notification, now_ms: int) -> dict[str, Any]:
        """Credit a verified notification's order once; a repeat is acknowledged and changes nothing."""
        o = t.topup_orders.c
        refused: DomainError | None = None
        with self.db.tx() as conn:                 # a mismatch is recorded (committed), then refused
            row = first_row(conn, select(t.topup_orders).where(o.order_id == n.order_id))
            if row is None:
                raise NotFound("unknown_order", "no such order")
            conn.execute(update(t.topup_orders).where(o.order_id == n.order_id)
                         .values(notifications=o.notifications + 1))
            if n.status != "SUCCESS":
                return {"code": "SUCCESS", "credited": False}
            if n.amount_fen != row["amount_fen"]:
                audit(conn, "payments", "amount_mismatch", n.order_id,
                      {"notified_fen": n.amount_fen, "ordered_fen": row["amount_fen"]}, now_ms)
                log.error("payment notification for %s says %d fen, the order is %d fen: not credited",
                          n.order_id, n.amount_fen, row["amount_fen"])
                refused = Conflict("amount_mismatch", "the notified amount does not match the order")
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
            s = first_row(conn, q)
            if s is None:
                raise NotFound("unknown_session", "no such session")
            if s["state"] != "ended":
                raise Conflict("not_settled", f"only settled sessions can be refunded (this one is {s['state']})")
            rows = conn.execute(select(e.kind, e.amount_fen).where(and_(
                e.session_id == session_id, e.kind.in_(("charge", "refund"))))).all()
            charged = -sum(a for k, a in rows if k == "charge")
            refunded = sum(a for k, a in rows if k == "refund")
            if amount_fen < 1 or amount_fen > charged - refunded:
                raise Invalid("bad_refund", f"refundable: {charged - refunded} fen of {charged} fen charged",
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
            row = first_row(conn, select(t.balance_refunds).where(r.refund_id == refund_id))
            if row is None:
                raise NotFound("unknown_refund", "no such balance refund")
            if not changed:
                raise Conflict("already_paid", f"this refund was marked paid already ({row['reference']})")
            audit(conn, operator_id, "balance_refund_paid", refund_id,
                  {"amount_fen": row["amount_fen"], "reference": reference}, now_ms)
        return _refund_row(row)


def _refund_row(r) -> dict[str, Any]:
    return {k: r[k] for k in ("refund_id", "user_id", "amount_fen", "state", "created_ms", "paid_ms", "paid_by",
                              "reference", "orders")}


