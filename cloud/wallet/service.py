"""Wallet top-ups (s5) through the payment providers (WeChat Pay, Alipay, or the development sandbox), refunds
to the payments the money came from, and daily reconciliation with the providers' bills.

The rules that keep money right:

* the balance is credited only by a **verified provider notification** (or the provider's signed answer to an
  order query) whose order id and amount match the stored order, exactly once (a conditional state change in
  the same transaction as the ledger entry). The browser's return from the pay page credits nothing;
* money leaves the wallet (a withdrawal, a deleted account's balance, an operator's refund of a pour to the
  original payment) as **refund rows written in the same transaction as the debit**, split over the top-ups
  it came from (newest first, each within the provider's refund window); each row is then sent to the
  provider with its own id (the provider's idempotency key: a retry never refunds twice) and followed to a
  final state. A refund that fails comes back to the balance (or, for a deleted account, to the operators'
  manual list); one the payer's account cannot take raises an alarm;
* unpaid orders past their time are asked about at the provider, then closed there and here.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import logging
import secrets
import uuid
from collections.abc import Callable
from datetime import date, datetime, timedelta
from typing import Any

import segno
from sqlalchemy import and_, func, insert, select, update

from cloud import db as t
from cloud.db import Database, audit, first_row, raise_alarm
from cloud.errors import Conflict, DomainError, Gone, Invalid, NotFound, TooMany, Unauthenticated, Unavailable
from cloud.wallet.balance import add_entry, balance
from cloud.wallet.payments import (
    CHINA,
    BillRow,
    Notification,
    NotifyAck,
    PaymentProvider,
    PayRequest,
    ProviderError,
    RefundNotice,
    RefundRequest,
)

log = logging.getLogger("tapshare.cloud.payments")

ORDER_TTL_MS = 15 * 60_000
MIN_TOPUP_FEN, MAX_TOPUP_FEN = 100, 50_000
PENDING_ORDERS_PER_USER = 5            # unpaid orders open at once
ORDERS_PER_USER_PER_HOUR = 20
REFUND_RETRY_BASE_MS = 30_000          # a refund the provider did not take is sent again after 30 s, 1 min, ... 1 h
REFUND_RETRY_MAX_MS = 3_600_000        # (longer than one provider call can take: 5 s connect + 10 s read)
REFUND_ALARM_ATTEMPTS = 8              # ... and after 8 sends (about 2 hours) it is an operator's alarm, once
REFUND_QUERY_AFTER_MS = 60_000         # a refund still processing is asked about every minute ...
REFUND_ALARM_QUERIES = 24 * 60         # ... and after a day of that it is an operator's alarm, once
BILL_READY_HOUR = 11                   # the providers publish yesterday's bill by about 10:00 (UTC+8)
PAYER_LINK_TTL_MS = 10 * 60_000
RECONCILE_RETRY_MS = 30 * 60_000       # a bill not out yet is asked for again after half an hour
RECONCILE_DAYS = 3                     # days back that are still tried; then not reconciled is an alarm
WITHDRAWALS_PER_DAY = 5                # a person's withdrawals in 24 hours (each is a refund call per top-up)
MIN_WITHDRAWAL_FEN = 100               # unless it is the whole balance
FINAL_REFUND_STATES = ("success", "closed", "abnormal", "failed")


def china_day_bounds(day: date) -> tuple[int, int]:
    lo = int(datetime(day.year, day.month, day.day, tzinfo=CHINA).timestamp() * 1000)
    return lo, lo + 86_400_000


def _order_row(row) -> dict[str, Any]:
    return {k: row[k] for k in ("order_id", "amount_fen", "state", "created_ms", "expires_ms", "paid_ms")} | \
        {"provider": row["provider"], "refunded_fen": row.get("refunded_fen") or 0}


class Wallet:
    def __init__(self, db: Database, providers: dict[str, PaymentProvider] | PaymentProvider,
                 link_key: bytes = b"", public_url: Callable[[], str] = lambda: "") -> None:
        if not isinstance(providers, dict):
            providers = {providers.name: providers}
        if not providers:
            raise ValueError("at least one payment provider")
        self.db, self.providers = db, providers
        self._link_key = link_key or secrets.token_bytes(32)
        self._reconcile_tried: dict[tuple[str, str], int] = {}
        self._alarmed: set[tuple[str, ...]] = set()
        self._public_url = public_url       # the configured address (read when needed): never a request's Host
        self.refund_retry_base_ms = REFUND_RETRY_BASE_MS
        # the development sandbox, when it is on (its pages and the tests reach it here); else the first provider
        self.provider = providers.get("sandbox") or next(iter(providers.values()))

    @property
    def notify_base(self) -> str:
        """Providers notify ``{notify_base}/{provider}``; empty without a public address."""
        base = self._public_url().rstrip("/")
        return base + "/api/v1/payments/notify" if base else ""

    def _provider(self, name: str) -> PaymentProvider:
        p = self.providers.get(name)
        if p is None:
            raise Invalid("unknown_provider", f"payment provider {name!r} is not offered here; offered: "
                          + ", ".join(self.providers))
        return p

    def methods(self) -> list[dict[str, Any]]:
        return [{"provider": p.name, "channels": list(p.channels), "development": p.is_development}
                for p in self.providers.values()]

    def view(self, user_id: str, now_ms: int) -> dict[str, Any]:
        """The wallet page: balances, the newest entries (holds and releases left out), top-up orders and
        refunds."""
        e, o, r = t.balance_entries.c, t.topup_orders.c, t.provider_refunds.c
        with self.db.read() as conn:
            available, held = balance(conn, user_id)
            entries = conn.execute(select(e.kind, e.amount_fen, e.session_id, e.note, e.created_ms)
                                   .where(e.user_id == user_id, e.kind.not_in(("hold", "release")))
                                   .order_by(e.entry_id.desc()).limit(50)).mappings().all()
            orders = conn.execute(select(t.topup_orders).where(o.user_id == user_id)
                                  .order_by(o.created_ms.desc()).limit(20)).mappings().all()
            refunds = conn.execute(select(t.provider_refunds).where(r.user_id == user_id)
                                   .order_by(r.created_ms.desc()).limit(20)).mappings().all()
            refundable = self._refundable(conn, user_id, now_ms)
        return {"balance_fen": available + held, "held_fen": held, "available_fen": available,
                "arrears_fen": max(0, -available), "entries": [dict(x) for x in entries],
                "orders": [_order_row(x) for x in orders], "refunds": [_refund_out(x) for x in refunds],
                "withdrawable_fen": max(0, min(available, sum(a for _o, a in refundable))),
                "sandbox": self.provider.is_development, "methods": self.methods(),
                "min_topup_fen": MIN_TOPUP_FEN, "max_topup_fen": MAX_TOPUP_FEN}

    def create_topup(self, user_id: str, amount_fen: int, return_url: str, now_ms: int,
                     provider: str = "", channel: str = "", client_ip: str = "") -> dict[str, Any]:
        if not MIN_TOPUP_FEN <= amount_fen <= MAX_TOPUP_FEN:
            raise Invalid("bad_amount", f"a top-up is {MIN_TOPUP_FEN // 100} to {MAX_TOPUP_FEN // 100} yuan")
        prov = self._provider(provider) if provider else self.provider
        channel = channel or prov.channels[0]
        if channel not in prov.channels:
            raise Invalid("bad_channel", f"{prov.name} takes {', '.join(prov.channels)} here, not {channel!r}")
        payer_id = ""
        if channel == "jsapi":
            with self.db.read() as conn:
                payer_id = conn.execute(select(t.payer_accounts.c.payer_id).where(and_(
                    t.payer_accounts.c.user_id == user_id, t.payer_accounts.c.provider == prov.name))).scalar() or ""
            if not payer_id:
                raise Conflict("payer_unknown", "WeChat must tell us who is paying first (it asks once)",
                               provider=prov.name)
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
                                                       state="pending", provider=prov.name, channel=channel,
                                                       created_ms=now_ms, expires_ms=expires))
        req = PayRequest(order_id=order_id, amount_fen=amount_fen,
                         description=f"Tapshare 饮水充值 top-up ¥{amount_fen / 100:.2f}",
                         notify_url=f"{self.notify_base}/{prov.name}",
                         return_url=return_url.replace("{order_id}", order_id),
                         expires_ms=expires, channel=channel, client_ip=client_ip, payer_id=payer_id)
        try:
            start = prov.create(req)
        except ProviderError as e:
            log.warning("top-up %s not created at %s: %s %s", order_id, prov.name, e.code, e.message)
            with self.db.tx() as conn:
                conn.execute(update(t.topup_orders).where(t.topup_orders.c.order_id == order_id)
                             .values(state="closed", closed_ms=now_ms))
                if not e.retryable:
                    raise_alarm(conn, "payments", "create_refused",
                                {"provider": prov.name, "code": e.code, "message": e.message[:200]}, now_ms)
            raise Unavailable("payment_unavailable", f"{_label(prov.name)} could not start the payment "
                              f"({e.code}); nothing was charged, try again or choose another way to pay",
                              retry_after_s=30, provider=prov.name) from None
        qr_svg = ""
        if start.kind == "qr":
            qr_svg = segno.make(start.qr_text, error="m").svg_inline(scale=4, omitsize=True,
                                                                     title=f"{prov.name} {order_id}")
        return {"order_id": order_id, "amount_fen": amount_fen, "state": "pending", "provider": prov.name,
                "channel": channel, "pay_kind": start.kind, "pay_url": start.url, "qr_text": start.qr_text,
                "qr_svg": qr_svg,
                "jsapi_params": start.jsapi_params, "expires_ms": expires, "sandbox": prov.is_development}

    def payer_link(self, user_id: str, provider: str, resume_fen: int, redirect_uri: str, now_ms: int,
                   browser_key: str = "") -> str:
        """The provider's authorisation address that tells us who pays (WeChat's openid), valid for 10 minutes.
        Its ``state`` names this person, the top-up to resume, the expiry and the browser that asked (a hash of
        ``browser_key``, a cookie only that browser holds, so a link opened by someone else binds nothing), with a
        MAC: base32, so letters and digits only and under WeChat's 128 characters."""
        prov = self._provider(provider)
        if not hasattr(prov, "oauth_url"):
            raise Invalid("no_payer_link", f"{prov.name} needs no authorisation")
        browser = hashlib.sha256(browser_key.encode()).hexdigest()[:12]
        body = f"{user_id}|{now_ms + PAYER_LINK_TTL_MS}|{resume_fen}|{browser}".encode()
        mac = hmac.new(self._link_key, body, hashlib.sha256).digest()[:10]
        state = base64.b32encode(body + mac).decode().rstrip("=")
        return prov.oauth_url(redirect_uri, state)

    def payer_return(self, provider: str, code: str, state: str, now_ms: int, browser_key: str = "") -> str:
        """The provider sent the person back with a code: it becomes their payer id. Returns where to go."""
        prov = self._provider(provider)
        try:
            raw = base64.b32decode(state.upper() + "=" * (-len(state) % 8))
            body, mac = raw[:-10], raw[-10:]
            good = hmac.compare_digest(mac, hmac.new(self._link_key, body, hashlib.sha256).digest()[:10])
            user_id, expires, resume_fen, browser = body.decode().split("|")
            resume = int(resume_fen)
            good = good and hmac.compare_digest(browser, hashlib.sha256(browser_key.encode()).hexdigest()[:12])
        except ValueError:              # bad base32, text or numbers (UnicodeDecodeError is one too)
            good = False
        if not good:
            raise Unauthenticated("bad_state", "this authorisation link was not made here")
        if int(expires) < now_ms:
            raise Gone("link_expired", "this authorisation link has expired: start the top-up again")
        back = "/app#/wallet" + (f"?resume={resume}" if resume else "")
        if not code:                    # the person said no
            return "/app#/wallet?payer=refused"
        try:
            payer_id = prov.openid_for_code(code)
        except ProviderError as e:
            raise Unavailable("payer_unknown", f"WeChat did not say who is paying ({e.code})",
                              retry_after_s=10) from None
        self.remember_payer(user_id, prov.name, payer_id, now_ms)
        return back

    def remember_payer(self, user_id: str, provider: str, payer_id: str, now_ms: int) -> None:
        pa = t.payer_accounts.c
        with self.db.tx() as conn:
            self.db.lock(conn, f"payer:{user_id}:{provider}")      # two returns at once: one inserts
            known = conn.execute(select(pa.payer_id).where(and_(pa.user_id == user_id, pa.provider == provider))
                                 ).scalar()
            if known is None:
                conn.execute(insert(t.payer_accounts).values(user_id=user_id, provider=provider, payer_id=payer_id,
                                                             created_ms=now_ms))
            elif known != payer_id:
                conn.execute(update(t.payer_accounts).where(and_(pa.user_id == user_id, pa.provider == provider))
                             .values(payer_id=payer_id, created_ms=now_ms))

    def order(self, user_id: str, order_id: str) -> dict[str, Any]:
        with self.db.read() as conn:
            row = first_row(conn, select(t.topup_orders).where(t.topup_orders.c.order_id == order_id))
        if row is None or row["user_id"] != user_id:
            raise NotFound("unknown_order", "no such top-up order")
        return _order_row(row)

    # ---------------------------------------------------------------- what providers tell us

    def notify(self, provider: str, headers: dict[str, str], body: bytes, now_ms: int) -> NotifyAck:
        """A provider's notification: verified by that provider's published rule, committed, then acknowledged
        in the provider's format. Anything not genuine or not matching raises (the provider retries)."""
        prov = self._provider(provider)
        n = prov.verify({k.lower(): v for k, v in headers.items()}, body, now_ms)
        if isinstance(n, RefundNotice):
            self.apply_refund(prov.name, n, now_ms)
        else:
            self.apply(n, now_ms, prov.name)
        return prov.ack(True)

    def apply(self, n: Notification, now_ms: int, provider: str | None = None) -> dict[str, Any]:
        """Credit a verified notification's order once; a repeat is acknowledged and changes nothing."""
        o = t.topup_orders.c
        refused: DomainError | None = None
        with self.db.tx() as conn:                 # a mismatch is recorded (committed), then refused
            row = first_row(conn, select(t.topup_orders).where(o.order_id == n.order_id))
            if row is None:
                raise NotFound("unknown_order", "no such order")
            if provider is not None and row["provider"] != provider:
                audit(conn, "payments", "provider_mismatch", n.order_id,
                      {"notified_by": provider, "order_provider": row["provider"]}, now_ms)
                refused = Conflict("provider_mismatch", "this order was not placed with this provider")
            if refused is None:
                conn.execute(update(t.topup_orders).where(o.order_id == n.order_id)
                             .values(notifications=o.notifications + 1))
            if refused is None and n.status != "SUCCESS":
                return {"code": "SUCCESS", "credited": False}
            if refused is None and n.amount_fen != row["amount_fen"]:
                audit(conn, "payments", "amount_mismatch", n.order_id,
                      {"notified_fen": n.amount_fen, "ordered_fen": row["amount_fen"]}, now_ms)
                if row["state"] != "disputed":      # once: the provider's repeats and our queries say it again
                    raise_alarm(conn, "payments", "amount_mismatch", {"order_id": n.order_id,
                                "provider": row["provider"], "notified_fen": n.amount_fen,
                                "ordered_fen": row["amount_fen"]}, now_ms)
                    if row["state"] == "pending":   # not asked about again every second: an operator settles it
                        conn.execute(update(t.topup_orders).where(o.order_id == n.order_id).values(state="disputed"))
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
            back: list[str] = []
            if self._user_deleted(conn, row["user_id"]):    # paid just before the account was deleted: pay it back
                back = self.withdraw_for_deletion(conn, row["user_id"], row["amount_fen"], now_ms)["refund_ids"]
                raise_alarm(conn, "payments", "paid_after_deletion", {"order_id": n.order_id,
                            "amount_fen": row["amount_fen"], "refund_ids": back}, now_ms)
        if back:
            self.send_refunds(back, now_ms)
        return {"code": "SUCCESS", "credited": True}

    def close_expired(self, now_ms: int) -> list[str]:
        """Unpaid orders past their time: ask the provider first (a payment may be on its way), then close."""
        o = t.topup_orders.c
        with self.db.read() as conn:
            due = conn.execute(select(o.order_id, o.provider).where(and_(o.state == "pending", o.expires_ms < now_ms))
                               .limit(200)).all()
        closed = []
        for order_id, provider in due:
            prov = self.providers.get(provider)
            if prov is None:
                continue                                # a provider no longer configured: left for an operator
            try:
                n = prov.query(order_id)
                if n is not None and n.status == "SUCCESS":
                    self.apply(n, now_ms, prov.name)
                    continue
                if not prov.close(order_id):
                    continue                            # paid meanwhile: the notification will credit it
            except ProviderError as e:
                log.warning("order %s: %s did not answer about it (%s); asking again later", order_id, provider,
                            e.code)
                continue
            except DomainError as e:
                log.error("order %s: the provider's answer was refused: %s", order_id, e.message)
                continue
            with self.db.tx() as conn:
                if conn.execute(update(t.topup_orders).where(and_(o.order_id == order_id, o.state == "pending"))
                                .values(state="closed", closed_ms=now_ms)).rowcount:
                    closed.append(order_id)
        return closed

    # ---------------------------------------------------------------- money back to where it came from

    def _refundable(self, conn, user_id: str, now_ms: int) -> list[tuple[dict[str, Any], int]]:
        """The user's paid top-ups that can still take a refund (their provider is configured and the payment
        is inside its refund window), newest first, with how much each can still take."""
        o = t.topup_orders.c
        rows = conn.execute(select(t.topup_orders).where(and_(o.user_id == user_id, o.state == "paid",
                                                              o.amount_fen > o.refunded_fen))
                            .order_by(o.paid_ms.desc(), o.created_ms.desc(), o.order_id)).mappings().all()
        out = []
        for row in rows:
            prov = self.providers.get(row["provider"])
            if prov is None or (row["paid_ms"] or 0) < now_ms - prov.refund_window_days * 86_400_000:
                continue
            out.append((dict(row), row["amount_fen"] - row["refunded_fen"]))
        return out

    def _allocate(self, conn, user_id: str, amount_fen: int, origin: str, requested_by: str, reason: str,
                  now_ms: int) -> tuple[list[str], int]:
        """Split ``amount_fen`` over the user's refundable top-ups (newest first) as refund rows, in the caller's
        transaction; returns the refund ids and what no top-up could take."""
        ids, left = [], amount_fen
        for row, room in self._refundable(conn, user_id, now_ms):
            if left <= 0:
                break
            part = min(left, room)
            refund_id = "rf-" + uuid.uuid4().hex[:24]
            o = t.topup_orders.c
            took = conn.execute(update(t.topup_orders).where(and_(
                o.order_id == row["order_id"], o.refunded_fen + part <= o.amount_fen))
                .values(refunded_fen=o.refunded_fen + part)).rowcount
            if not took:
                continue
            conn.execute(insert(t.provider_refunds).values(
                refund_id=refund_id, order_id=row["order_id"], user_id=user_id, provider=row["provider"],
                amount_fen=part, origin=origin, reason=reason[:200], state="requested", requested_by=requested_by,
                created_ms=now_ms, updated_ms=now_ms, attempts=0))
            ids.append(refund_id)
            left -= part
        return ids, left

    def withdraw(self, user_id: str, amount_fen: int | None, now_ms: int) -> dict[str, Any]:
        """The person takes (part of) their balance back to the payments it came from. Only what the top-ups
        can take back is withdrawn; the rest stays in the wallet and the answer says why."""
        with self.db.tx() as conn:
            self.db.lock(conn, f"topup:{user_id}")
            users_q = select(t.users.c.user_id).where(t.users.c.user_id == user_id)
            if not self.db.is_sqlite:
                users_q = users_q.with_for_update()     # a start at the same moment waits: its hold is counted
            first_row(conn, users_q)
            available, _held = balance(conn, user_id)
            room = sum(a for _row, a in self._refundable(conn, user_id, now_ms))
            want = available if amount_fen is None else amount_fen
            if available <= 0:
                raise Conflict("nothing_to_withdraw", "there is no balance to take back", available_fen=available)
            if want < 1 or want > available:
                raise Invalid("bad_amount", f"you can take back at most ¥{available / 100:.2f}",
                              available_fen=available)
            if want < MIN_WITHDRAWAL_FEN and want != available:
                raise Invalid("bad_amount", f"take back at least ¥{MIN_WITHDRAWAL_FEN / 100:.2f}, or all of it",
                              available_fen=available)
            e = t.balance_entries.c
            recent = conn.execute(select(func.count()).where(and_(
                e.user_id == user_id, e.kind == "withdrawal", e.session_id.is_(None),
                e.created_ms > now_ms - 86_400_000))).scalar() or 0
            if recent >= WITHDRAWALS_PER_DAY:
                raise TooMany("too_many_withdrawals", f"at most {WITHDRAWALS_PER_DAY} withdrawals a day: "
                              "take it all back at once tomorrow", retry_after_s=3600)
            if room <= 0:
                raise Conflict("not_refundable", "this balance did not come from a top-up that can still be "
                               "refunded (older than the provider allows, or an operator's credit): ask the "
                               "operator", available_fen=available)
            take = min(want, room)
            ids, left = self._allocate(conn, user_id, take, "withdrawal", user_id, "余额退回 balance withdrawal",
                                       now_ms)
            taken = take - left
            add_entry(conn, user_id, "withdrawal", -taken, now_ms, note=f"{len(ids)} refund(s)")
        self.send_refunds(ids, now_ms)
        return {"withdrawn_fen": taken, "kept_fen": want - taken, "refunds": self.refunds_of(user_id, ids)}

    def withdraw_for_deletion(self, conn, user_id: str, available_fen: int, now_ms: int) -> dict[str, Any]:
        """A deleted account's balance, in the deletion's transaction: refunds to its top-ups, and what they
        cannot take as a manual refund for the operators (paid by transfer). Never forfeited."""
        ids, left = self._allocate(conn, user_id, available_fen, "deletion", user_id, "注销账户 account deleted",
                                   now_ms)
        manual_id = None
        if left > 0:
            manual_id = "br-" + uuid.uuid4().hex[:20]
            conn.execute(insert(t.balance_refunds).values(
                refund_id=manual_id, user_id=user_id, amount_fen=left, state="requested", created_ms=now_ms,
                orders=[{"order_id": None, "provider": "transfer", "amount_fen": left}]))
        add_entry(conn, user_id, "payout", -available_fen, now_ms, note=f"account deleted: {len(ids)} refund(s)"
                  + (f", {manual_id}" if manual_id else ""))
        return {"refund_ids": ids, "manual_refund_id": manual_id, "manual_fen": left}

    def refund(self, operator_id: str, session_id: str, amount_fen: int, reason: str, now_ms: int,
               to: str = "balance") -> dict[str, Any]:
        """Operator-initiated refund of (part of) a session's charge, e.g. for a failed dispense: to the balance,
        or on to the original payment (as much as the person's top-ups can take; the rest stays in the
        balance)."""
        e = t.balance_entries.c
        ids: list[str] = []
        left = 0
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
            if to == "original":
                ids, left = self._allocate(conn, s["user_id"], amount_fen, "session", operator_id, reason, now_ms)
                if amount_fen - left:
                    add_entry(conn, s["user_id"], "withdrawal", -(amount_fen - left), now_ms, session_id,
                              f"refund of {session_id} to the original payment")
            audit(conn, operator_id, "refund", session_id,
                  {"amount_fen": amount_fen, "reason": reason, "to": to, "provider_refunds": ids}, now_ms)
        if ids:
            self.send_refunds(ids, now_ms)
        return {"session_id": session_id, "refunded_fen": refunded + amount_fen, "charged_fen": charged, "to": to,
                "to_original_fen": amount_fen - left if to == "original" else 0,
                "to_balance_fen": left if to == "original" else amount_fen,
                "provider_refunds": self.refunds_of(s["user_id"], ids) if ids else []}

    def refunds_of(self, user_id: str, ids: list[str]) -> list[dict[str, Any]]:
        r = t.provider_refunds.c
        with self.db.read() as conn:
            rows = conn.execute(select(t.provider_refunds).where(and_(r.user_id == user_id, r.refund_id.in_(ids)))
                                .order_by(r.created_ms, r.refund_id)).mappings().all()
        return [_refund_out(x) for x in rows]

    def send_refunds(self, ids: list[str], now_ms: int) -> None:
        """Ask the providers for these refunds (each idempotent by its id). A provider that does not answer now
        is asked again by :meth:`settle_refunds`; nothing here can refund twice. Each row is claimed first
        (``updated_ms``), so two senders (a retry, another instance) do not work on it at once."""
        r = t.provider_refunds.c
        for refund_id in ids:
            with self.db.read() as conn:
                row = first_row(conn, select(t.provider_refunds, t.topup_orders.c.amount_fen.label("order_fen"))
                                .join(t.topup_orders, t.topup_orders.c.order_id == r.order_id)
                                .where(r.refund_id == refund_id))
            if row is None or row["state"] != "requested":
                continue
            prov = self.providers.get(row["provider"])
            if prov is None:
                self._note_refund(refund_id, now_ms, f"provider {row['provider']} is not configured here",
                                  alarm="refund_provider_missing")
                continue
            with self.db.tx() as conn:      # claim it: another sender that read the same row finds it moved
                if not conn.execute(update(t.provider_refunds).where(and_(
                        r.refund_id == refund_id, r.state == "requested", r.updated_ms == row["updated_ms"]))
                        .values(updated_ms=max(now_ms, row["updated_ms"] + 1), attempts=r.attempts + 1)).rowcount:
                    continue
            req = RefundRequest(refund_id=refund_id, order_id=row["order_id"], amount_fen=row["amount_fen"],
                                order_total_fen=row["order_fen"], reason=row["reason"] or "退款 refund",
                                notify_url=f"{self.notify_base}/{prov.name}" if self.notify_base else "")
            try:
                notice = prov.refund(req)
            except ProviderError as e:
                if e.retryable:
                    log.warning("refund %s: %s did not take it yet (%s); retrying later", refund_id, prov.name, e.code)
                    self._note_refund(refund_id, now_ms, f"{e.code}: {e.message}",
                                      alarm="refund_not_taken" if row["attempts"] + 1 == REFUND_ALARM_ATTEMPTS
                                      else "")
                    continue
                # refused: but an earlier attempt (a timeout, another sender) may have been taken; ask first
                try:
                    known = prov.query_refund(row["order_id"], refund_id)
                except ProviderError:
                    known = None
                    self._note_refund(refund_id, now_ms, f"{e.code}: {e.message}; not confirmed by a query")
                    continue
                if known is not None:
                    self.apply_refund(prov.name, known, now_ms)
                else:
                    self._finish_refund(refund_id, "failed", now_ms, error=f"{e.code}: {e.message}")
                continue
            self.apply_refund(prov.name, notice, now_ms)

    def _note_refund(self, refund_id: str, now_ms: int, error: str, alarm: str = "") -> None:
        r = t.provider_refunds.c
        with self.db.tx() as conn:
            conn.execute(update(t.provider_refunds).where(r.refund_id == refund_id)
                         .values(updated_ms=now_ms, last_error=error[:200]))
            if alarm:
                row = first_row(conn, select(t.provider_refunds).where(r.refund_id == refund_id))
                raise_alarm(conn, "payments", alarm, {"refund_id": refund_id, "provider": row["provider"],
                            "amount_fen": row["amount_fen"], "state": row["state"], "error": error[:200]}, now_ms)

    def apply_refund(self, provider: str, n: RefundNotice, now_ms: int) -> None:
        """A provider's word on one of our refunds (its answer, a query, or a verified notification). What does
        not match ours is an alarm (and is acknowledged: the provider's repeats would change nothing)."""
        r = t.provider_refunds.c
        with self.db.tx() as conn:
            row = first_row(conn, select(t.provider_refunds).where(r.refund_id == n.refund_id))
            problem = ""
            if row is None:
                problem = "unknown_refund"      # made in the provider's merchant console?
            elif row["provider"] != provider or row["order_id"] != n.order_id:
                problem = "refund_mismatch"
            elif n.amount_fen != row["amount_fen"]:
                problem = "refund_amount_mismatch"
            if problem:
                raise_alarm(conn, "payments", problem, {"provider": provider, "refund_id": n.refund_id,
                            "order_id": n.order_id, "notified_fen": n.amount_fen, "status": n.status,
                            "ours": None if row is None else {k: row[k] for k in ("provider", "order_id",
                                                                                  "amount_fen", "state")}},
                            now_ms)
                if row is not None:
                    conn.execute(update(t.provider_refunds).where(r.refund_id == n.refund_id).values(
                        updated_ms=now_ms, last_error=f"{problem}: {provider} says {n.amount_fen} fen, {n.status}"))
                log.error("%s's word on refund %s (%s, %d fen) does not match ours: %s", provider, n.refund_id,
                          n.order_id, n.amount_fen, problem)
                return
            conn.execute(update(t.provider_refunds).where(and_(r.refund_id == n.refund_id,
                                                               r.state.in_(("requested", "processing"))))
                         .values(state="processing", provider_refund_id=n.provider_refund_id or None,
                                 updated_ms=now_ms, last_error=None))
        if n.status == "SUCCESS" and row["state"] in ("closed", "failed", "abnormal"):
            self._succeeded_late(n.refund_id, now_ms, n.done_ms or now_ms)
        elif n.status != "PROCESSING":
            self._finish_refund(n.refund_id, n.status.lower(), now_ms, done_ms=n.done_ms or now_ms)

    def _user_deleted(self, conn, user_id: str) -> bool:
        return conn.execute(select(t.users.c.deleted_ms).where(t.users.c.user_id == user_id)).scalar() is not None

    def _finish_refund(self, refund_id: str, state: str, now_ms: int, done_ms: int | None = None,
                       error: str = "") -> None:
        """Move a refund to its final state once. If the money did not reach the payer (closed, failed), it comes
        back: to the balance, or for a deleted account to the operators' manual refunds; abnormal (the payer's
        account cannot take it) is the operators' to settle, with an alarm."""
        r, o = t.provider_refunds.c, t.topup_orders.c
        with self.db.tx() as conn:
            won = conn.execute(update(t.provider_refunds).where(and_(r.refund_id == refund_id,
                                                                     r.state.not_in(FINAL_REFUND_STATES)))
                               .values(state=state, done_ms=done_ms or now_ms, updated_ms=now_ms,
                                       last_error=error[:200] or r.last_error)).rowcount
            if not won:
                return
            row = first_row(conn, select(t.provider_refunds).where(r.refund_id == refund_id))
            if state == "success":
                return
            conn.execute(update(t.topup_orders).where(o.order_id == row["order_id"])
                         .values(refunded_fen=o.refunded_fen - row["amount_fen"]))
            detail = {"refund_id": refund_id, "order_id": row["order_id"], "provider": row["provider"],
                      "amount_fen": row["amount_fen"], "user_id": row["user_id"], "error": error[:200]}
            if state == "abnormal" or row["origin"] == "deletion" or self._user_deleted(conn, row["user_id"]):
                manual_id = "br-" + uuid.uuid4().hex[:20]
                conn.execute(insert(t.balance_refunds).values(
                    refund_id=manual_id, user_id=row["user_id"], amount_fen=row["amount_fen"], state="requested",
                    created_ms=now_ms, orders=[{"order_id": row["order_id"], "provider": row["provider"],
                                                "amount_fen": row["amount_fen"], "failed_refund_id": refund_id}]))
                raise_alarm(conn, "payments", f"refund_{state}", detail | {"manual_refund_id": manual_id}, now_ms)
            else:
                add_entry(conn, row["user_id"], "refund_return", row["amount_fen"], now_ms,
                          note=f"refund {refund_id} {state}: back in the wallet")
                raise_alarm(conn, "payments", f"refund_{state}", detail, now_ms)
        log.warning("refund %s ended %s %s", refund_id, state, error)

    def _succeeded_late(self, refund_id: str, now_ms: int, done_ms: int) -> None:
        """The provider says a refund we had given up on (closed, failed, abnormal) did reach the payer after all
        (WeChat lets a merchant settle an abnormal refund). What we gave back is taken back: from the balance it
        went to, or the manual refund still unpaid is withdrawn; an operator is told either way."""
        r, o, b = t.provider_refunds.c, t.topup_orders.c, t.balance_refunds.c
        with self.db.tx() as conn:
            row = first_row(conn, select(t.provider_refunds).where(r.refund_id == refund_id))
            if row is None or row["state"] not in ("closed", "failed", "abnormal"):
                return
            conn.execute(update(t.provider_refunds).where(r.refund_id == refund_id)
                         .values(state="success", done_ms=done_ms, updated_ms=now_ms))
            conn.execute(update(t.topup_orders).where(o.order_id == row["order_id"])
                         .values(refunded_fen=o.refunded_fen + row["amount_fen"]))
            manual = [x for x in conn.execute(select(t.balance_refunds).where(and_(
                b.user_id == row["user_id"], b.state == "requested"))).mappings()
                if any(part.get("failed_refund_id") == refund_id for part in x["orders"])]
            if manual:
                conn.execute(update(t.balance_refunds).where(b.refund_id == manual[0]["refund_id"])
                             .values(state="withdrawn", paid_ms=now_ms, paid_by="provider",
                                     reference=f"{row['provider']} refund {refund_id} succeeded"))
                taken = "the manual refund " + manual[0]["refund_id"] + " is withdrawn"
            elif any(m["state"] == "paid" for m in conn.execute(select(t.balance_refunds).where(
                    b.user_id == row["user_id"])).mappings()
                    if any(part.get("failed_refund_id") == refund_id for part in m["orders"])):
                taken = "PAID TWICE: the manual refund was paid already; recover it from the person"
            else:
                add_entry(conn, row["user_id"], "refund_correction", -row["amount_fen"], now_ms,
                          note=f"refund {refund_id} reached the payer after all")
                taken = "taken back from the balance"
            raise_alarm(conn, "payments", "refund_succeeded_late", {
                "refund_id": refund_id, "provider": row["provider"], "amount_fen": row["amount_fen"],
                "was": row["state"], "user_id": row["user_id"], "done": taken}, now_ms)
        log.error("refund %s (%s) succeeded after it was given up: %s", refund_id, row["state"], taken)

    def settle_refunds(self, now_ms: int) -> int:
        """Follow every unfinished refund: send again those the provider did not take (backing off), ask about
        those still processing; one the provider has not taken or settled for long is an operator's alarm
        (once). A row that fails here is noted and does not hold up the others."""
        r = t.provider_refunds.c
        with self.db.read() as conn:
            rows = conn.execute(select(r.refund_id, r.order_id, r.provider, r.state, r.attempts, r.updated_ms,
                                       r.created_ms)
                                .where(r.state.in_(("requested", "processing"))).order_by(r.updated_ms).limit(100)
                                ).mappings().all()
        touched = 0
        for row in rows:
            wait = min(REFUND_RETRY_MAX_MS, self.refund_retry_base_ms * 2 ** min(max(0, row["attempts"] - 1), 20))
            if row["state"] == "processing":
                wait = REFUND_QUERY_AFTER_MS
            if now_ms - row["updated_ms"] < wait:
                continue
            touched += 1
            try:
                self._settle_one(row, now_ms)
            except Exception as e:          # one bad row must not stop every other refund
                log.exception("refund %s could not be followed", row["refund_id"])
                self._note_refund(row["refund_id"], now_ms, f"{type(e).__name__}: {e}"[:200])
        return touched

    def _settle_one(self, row, now_ms: int) -> None:
        r = t.provider_refunds.c
        if row["state"] == "requested":
            self.send_refunds([row["refund_id"]], now_ms)
            return
        prov = self.providers.get(row["provider"])
        if prov is None:
            self._note_refund(row["refund_id"], now_ms, f"provider {row['provider']} is not configured here",
                              alarm="refund_provider_missing")
            return
        try:
            n = prov.query_refund(row["order_id"], row["refund_id"])
        except ProviderError as e:
            log.warning("refund %s: %s did not answer (%s)", row["refund_id"], row["provider"], e.code)
            n = None
        if n is not None:
            self.apply_refund(prov.name, n, now_ms)
        with self.db.tx() as conn:
            moved = conn.execute(update(t.provider_refunds).where(and_(r.refund_id == row["refund_id"],
                                                                       r.state == "processing"))
                                 .values(updated_ms=now_ms, attempts=r.attempts + 1)).rowcount
            if moved and row["attempts"] + 1 == REFUND_ALARM_QUERIES:
                raise_alarm(conn, "payments", "refund_stuck", {"refund_id": row["refund_id"],
                            "provider": row["provider"], "since_ms": row["created_ms"]}, now_ms)

    def provider_refunds(self, state: str, limit: int) -> list[dict[str, Any]]:
        r = t.provider_refunds.c
        q = select(t.provider_refunds).order_by(r.created_ms.desc()).limit(limit)
        if state != "all":
            q = q.where(r.state == state)
        with self.db.read() as conn:
            return [_refund_out(x) | {"user_id": x["user_id"], "origin": x["origin"], "attempts": x["attempts"],
                                      "last_error": x["last_error"], "requested_by": x["requested_by"]}
                    for x in conn.execute(q).mappings().all()]

    # ---------------------------------------------------------------- reconciliation

    def reconcile(self, provider: str, day: date, now_ms: int) -> dict[str, Any]:
        """Compare the provider's bill for ``day`` with our paid orders and finished refunds of that day (UTC+8);
        the report lists what is missing on either side, duplicated, or of a different amount. A mismatch
        raises an alarm. A bill not out yet raises Unavailable (nothing is stored)."""
        prov = self._provider(provider)
        try:
            bill = prov.bill(day)
        except ProviderError as e:
            raise Unavailable("bill_not_ready" if e.retryable else "bill_refused",
                              f"{prov.name} has no bill for {day.isoformat()} yet ({e.code}: {e.message})",
                              retry_after_s=3600) from None
        lo, hi = china_day_bounds(day)
        o, r = t.topup_orders.c, t.provider_refunds.c
        if getattr(prov, "bill_refund_day", "done") == "requested":      # listed the day asked, as it was then
            refunds_of_day = and_(r.created_ms >= lo, r.created_ms < hi, r.state.not_in(("requested", "failed")))
        else:
            refunds_of_day = and_(r.state == "success", r.done_ms >= lo, r.done_ms < hi)
        with self.db.read() as conn:
            ours_paid = {x["order_id"]: x for x in conn.execute(
                select(o.order_id, o.amount_fen, o.provider_txn_id).where(and_(
                    o.provider == prov.name, o.state == "paid", o.paid_ms >= lo, o.paid_ms < hi))).mappings()}
            ours_refunds = {x["refund_id"]: x for x in conn.execute(
                select(r.refund_id, r.order_id, r.amount_fen).where(and_(r.provider == prov.name, refunds_of_day))
            ).mappings()}
            # lines of the bill that are ours but of another day here (a time on either side of midnight)
            bill_orders = {b.order_id for b in bill if b.kind == "payment"} - set(ours_paid)
            known = {x["order_id"]: x for x in conn.execute(
                select(o.order_id, o.state, o.amount_fen, o.paid_ms).where(and_(
                    o.order_id.in_(bill_orders), o.provider == prov.name))).mappings()}
            bill_refunds = {b.refund_id for b in bill if b.kind == "refund"} - set(ours_refunds)
            known_refunds = {x["refund_id"]: x for x in conn.execute(
                select(r.refund_id, r.state, r.amount_fen, r.created_ms, r.done_ms).where(and_(
                    r.refund_id.in_(bill_refunds), r.provider == prov.name))).mappings()}
        report = _compare(bill, ours_paid, ours_refunds, known, known_refunds)
        state = "mismatch" if any(report[k] for k in ("missing_here", "missing_there", "duplicated",
                                                      "wrong_amount")) else "matched"
        report |= {"provider": prov.name, "bill_date": day.isoformat(), "state": state, "checked_ms": now_ms}
        with self.db.tx() as conn:
            c = t.reconciliations.c
            conn.execute(t.reconciliations.delete().where(and_(c.provider == prov.name,
                                                               c.bill_date == day.isoformat())))
            conn.execute(insert(t.reconciliations).values(provider=prov.name, bill_date=day.isoformat(),
                                                          state=state, report=report, checked_ms=now_ms))
            if state == "mismatch":
                raise_alarm(conn, "reconciliation", "mismatch", {
                    "provider": prov.name, "bill_date": day.isoformat(),
                    **{k: len(report[k]) for k in ("missing_here", "missing_there", "duplicated", "wrong_amount")}},
                    now_ms)
        if state == "mismatch":
            log.error("reconciliation %s %s: MISMATCH %s", prov.name, day, {k: len(report[k]) for k in
                      ("missing_here", "missing_there", "duplicated", "wrong_amount")})
        return report

    def reconciliation(self, provider: str, day: date) -> dict[str, Any]:
        c = t.reconciliations.c
        with self.db.read() as conn:
            row = first_row(conn, select(t.reconciliations).where(and_(c.provider == provider,
                                                                       c.bill_date == day.isoformat())))
        if row is None:
            raise NotFound("not_reconciled", f"{provider} {day.isoformat()} has not been reconciled")
        return row["report"]

    def reconcile_due(self, now_ms: int) -> list[dict[str, Any]]:
        """The last few days' bills (UTC+8) not yet reconciled, once they are out (yesterday's after 11:00),
        for every provider; a bill asked for again at most every half hour. A day still not reconciled when it
        leaves that window is an operator's alarm."""
        now = datetime.fromtimestamp(now_ms / 1000, CHINA)
        first = 1 if now.hour >= BILL_READY_HOUR else 2
        days = [(now - timedelta(days=d)).date() for d in range(first, first + RECONCILE_DAYS)]
        window = {d.isoformat() for d in days}
        # what is remembered is of the days still tried only (a provider and day each: at most RECONCILE_DAYS x
        # providers); a day that left the window is never tried nor alarmed about again
        self._reconcile_tried = {k: v for k, v in self._reconcile_tried.items() if k[1] in window}
        self._alarmed = {k for k in self._alarmed if k[-1] in window}
        c = t.reconciliations.c
        with self.db.read() as conn:
            done = set(conn.execute(select(c.provider, c.bill_date).where(
                c.bill_date.in_([d.isoformat() for d in days]))).all())
        out = []
        for day in days:
            for name in self.providers:
                key = (name, day.isoformat())
                if key in done or now_ms - self._reconcile_tried.get(key, -RECONCILE_RETRY_MS) < RECONCILE_RETRY_MS:
                    continue
                self._reconcile_tried[key] = now_ms
                try:
                    out.append(self.reconcile(name, day, now_ms))
                except DomainError as e:
                    log.warning("reconciliation %s %s: %s", name, day, e.message)
                    if day == days[-1]:
                        self._alarm_once("reconciliation", "not_reconciled", key,
                                         {"provider": name, "bill_date": day.isoformat(), "why": e.message[:200]},
                                         now_ms)
                except Exception:
                    log.exception("reconciliation %s %s failed", name, day)
        return out

    def _alarm_once(self, source: str, kind: str, key: tuple[str, str], detail: dict[str, Any], now_ms: int) -> None:
        if (kind, *key) in self._alarmed:
            return
        self._alarmed.add((kind, *key))
        with self.db.tx() as conn:
            raise_alarm(conn, source, kind, detail, now_ms)

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

def _refund_out(r) -> dict[str, Any]:
    return {k: r[k] for k in ("refund_id", "order_id", "provider", "amount_fen", "state", "created_ms", "done_ms")}


def _label(provider: str) -> str:
    return {"wechatpay": "微信支付 WeChat Pay", "alipay": "支付宝 Alipay"}.get(provider, provider)


def _compare(bill: list[BillRow], ours_paid: dict, ours_refunds: dict, known: dict,
             known_refunds: dict) -> dict[str, list[dict[str, Any]]]:
    missing_here, missing_there, duplicated, wrong_amount = [], [], [], []
    seen: dict[tuple[str, str], int] = {}
    for b in bill:
        key = (b.kind, b.refund_id if b.kind == "refund" else b.order_id)
        seen[key] = seen.get(key, 0) + 1
        if seen[key] == 2:
            duplicated.append({"kind": b.kind, "order_id": b.order_id, "refund_id": b.refund_id,
                               "provider_txn_id": b.provider_txn_id, "amount_fen": b.amount_fen})
        if seen[key] > 1:
            continue
        ours = ours_paid.get(b.order_id) if b.kind == "payment" else ours_refunds.get(b.refund_id)
        other = known.get(b.order_id) if b.kind == "payment" else known_refunds.get(b.refund_id)
        settled = ("paid",) if b.kind == "payment" else ("processing", "success")
        if ours is None and other is not None and other["state"] in settled:
            ours = other                # ours, dated the day before or after here: compared by amount only
        if ours is None:
            missing_here.append({"kind": b.kind, "order_id": b.order_id, "refund_id": b.refund_id,
                                 "provider_txn_id": b.provider_txn_id, "amount_fen": b.amount_fen,
                                 "ours": dict(other) if other else None})
        elif ours["amount_fen"] != b.amount_fen:
            wrong_amount.append({"kind": b.kind, "order_id": b.order_id, "refund_id": b.refund_id,
                                 "bill_fen": b.amount_fen, "ours_fen": ours["amount_fen"]})
    for order_id, x in ours_paid.items():
        if ("payment", order_id) not in seen:
            missing_there.append({"kind": "payment", "order_id": order_id, "amount_fen": x["amount_fen"],
                                  "provider_txn_id": x["provider_txn_id"]})
    for refund_id, x in ours_refunds.items():
        if ("refund", refund_id) not in seen:
            missing_there.append({"kind": "refund", "order_id": x["order_id"], "refund_id": refund_id,
                                  "amount_fen": x["amount_fen"]})
    return {"missing_here": missing_here, "missing_there": missing_there, "duplicated": duplicated,
            "wrong_amount": wrong_amount,
            "bill_payments": sum(1 for b in bill if b.kind == "payment"),
            "bill_refunds": sum(1 for b in bill if b.kind == "refund"),
            "bill_payments_fen": sum(b.amount_fen for b in bill if b.kind == "payment"),
            "bill_refunds_fen": sum(b.amount_fen for b in bill if b.kind == "refund"),
            "our_payments": len(ours_paid), "our_refunds": len(ours_refunds)}
