"""People as the console sees them: masked by default (phone 138****8000, the name's first character), with
their money and points as the entries that made them, their sessions, bills, top-ups and refunds. The full
phone number and real name are shown only to roles that may see them, on purpose, with a reason that is
audit-logged; admins adjust a balance or points with a reason, in one audited transaction.

Deleted accounts keep their records (the law requires the money records) under the pseudonymous user id;
their personal data is already erased, so there is nothing to unmask and nothing to adjust."""

from __future__ import annotations

from typing import Any

from sqlalchemy import and_, func, insert, or_, select, update

from cloud import db as t
from cloud.accounts.identity import PHONE_RE, mask_name, mask_phone
from cloud.db import Database, audit, first_row
from cloud.errors import Conflict, Gone, Invalid, NotFound
from cloud.records.service import CURSOR_RE
from cloud.security import SecretBox
from cloud.wallet.balance import add_entry, balance

MAX_BALANCE_ADJUST_FEN = 1_000_000      # 10 000 yuan either way in one adjustment
MAX_POINTS_ADJUST = 1_000_000


class Users:
    def __init__(self, db: Database, pii: SecretBox) -> None:
        self.db, self.pii = db, pii

    def search(self, q: str, before: str, limit: int) -> dict[str, Any]:
        """People by phone number (exactly) or user id (exactly); without ``q``, the newest accounts first,
        paged with ``before`` (``<created_ms>.<user_id>`` of the last one shown)."""
        u = t.users.c
        query = select(t.users)
        q = q.strip()
        if q:
            phone = "".join(q.split()).removeprefix("+86")
            query = query.where(u.phone == phone) if PHONE_RE.match(phone) else query.where(u.user_id == q)
        if before:
            m = CURSOR_RE.match(before)
            if not m:
                raise Invalid("bad_cursor", "before: a cursor given by a previous page")
            at, uid = int(m.group(1)), m.group(2)
            query = query.where(and_(u.created_ms <= at, or_(u.created_ms < at, u.user_id < uid)))
        with self.db.read() as conn:
            rows = [dict(r) for r in conn.execute(query.order_by(u.created_ms.desc(), u.user_id.desc())
                                                  .limit(limit + 1)).mappings().all()]
            more = len(rows) > limit
            rows = rows[:limit]
            ids = [r["user_id"] for r in rows]
            idents = {r["user_id"]: dict(r) for r in conn.execute(
                select(t.identities.c.user_id, t.identities.c.state, t.identities.c.name_masked)
                .where(t.identities.c.user_id.in_(ids))).mappings()} if ids else {}
            e = t.balance_entries.c
            sums = dict(conn.execute(select(e.user_id, func.sum(e.amount_fen)).where(e.user_id.in_(ids))
                                     .group_by(e.user_id)).all()) if ids else {}
        out = [{**_masked(r, idents.get(r["user_id"])), "available_fen": int(sums.get(r["user_id"]) or 0)}
               for r in rows]
        return {"users": out, "next_before": f"{rows[-1]['created_ms']}.{rows[-1]['user_id']}" if more else None}

    def view(self, user_id: str, limit: int) -> dict[str, Any]:
        """One person (masked): balance and points with their newest entries (each with the total after it),
        sessions, bills, top-ups and refunds."""
        with self.db.read() as conn:
            user = first_row(conn, select(t.users).where(t.users.c.user_id == user_id))
            if user is None:
                raise NotFound("unknown_user", "no such user")
            ident = first_row(conn, select(t.identities.c.state, t.identities.c.name_masked, t.identities.c.doc_type,
                                           t.identities.c.number_masked, t.identities.c.submitted_ms,
                                           t.identities.c.decided_ms).where(t.identities.c.user_id == user_id))
            available, held = balance(conn, user_id)
            e, pe, s = t.balance_entries.c, t.points_entries.c, t.sessions.c
            entries = [dict(r) for r in conn.execute(
                select(e.entry_id, e.kind, e.amount_fen, e.session_id, e.note, e.created_ms)
                .where(e.user_id == user_id).order_by(e.entry_id.desc()).limit(limit)).mappings()]
            points = [dict(r) for r in conn.execute(
                select(pe.id, pe.delta, pe.kind, pe.ref, pe.note, pe.created_ms)
                .where(pe.user_id == user_id).order_by(pe.id.desc()).limit(limit)).mappings()]
            sessions = [dict(r) for r in conn.execute(
                select(s.session_id, s.machine_id, s.state, s.created_ms, s.ended_ms, s.end_reason, s.fee_fen,
                       s.volume_ml).where(s.user_id == user_id).order_by(s.created_ms.desc()).limit(limit)).mappings()]
            b = t.bills.c
            bills = [dict(x) for x in conn.execute(
                select(b.session_id, b.machine_id, b.started_at, b.duration_ms, b.volume_ml, b.amount_fen,
                       b.price_fen_per_l, b.points, b.end_reason, b.created_ms).where(b.user_id == user_id)
                .order_by(b.created_ms.desc()).limit(limit)).mappings()]
            refunded = dict(conn.execute(select(e.session_id, func.sum(e.amount_fen)).where(and_(
                e.user_id == user_id, e.kind == "refund", e.session_id.in_([x["session_id"] for x in bills])))
                .group_by(e.session_id)).all()) if bills else {}
            for x in bills:
                x["refunded_fen"] = int(refunded.get(x["session_id"]) or 0)
            o = t.topup_orders.c
            topups = [dict(r) for r in conn.execute(
                select(o.order_id, o.amount_fen, o.state, o.provider, o.channel, o.created_ms, o.paid_ms,
                       o.refunded_fen).where(o.user_id == user_id).order_by(o.created_ms.desc())
                .limit(limit)).mappings()]
            r = t.provider_refunds.c
            refunds = [dict(x) for x in conn.execute(
                select(r.refund_id, r.order_id, r.provider, r.amount_fen, r.origin, r.reason, r.state, r.requested_by,
                       r.created_ms, r.done_ms).where(r.user_id == user_id).order_by(r.created_ms.desc())
                .limit(limit)).mappings()]
            br = t.balance_refunds.c
            manual = [dict(x) for x in conn.execute(
                select(br.refund_id, br.amount_fen, br.state, br.created_ms, br.paid_ms, br.paid_by, br.reference)
                .where(br.user_id == user_id).order_by(br.created_ms.desc()).limit(limit)).mappings()]
        after = available
        for x in entries:                      # newest first: the balance after each entry, walking back
            x["balance_after_fen"] = after
            after -= x["amount_fen"]
        after = user["points"]
        for x in points:
            x["points_after"] = after
            after -= x["delta"]
        return {"user": {**_masked(user, ident), "available_fen": available, "held_fen": held},
                "identity": ident, "balance_entries": entries, "points_entries": points, "sessions": sessions,
                "bills": bills, "topups": topups, "provider_refunds": refunds, "balance_refunds": manual,
                "limit": limit}

    def unmask(self, operator_id: str, user_id: str, reason: str, now_ms: int) -> dict[str, Any]:
        """The full phone number and, if registered, the real name: audit-logged with the reason before anything
        leaves."""
        with self.db.tx() as conn:
            user = first_row(conn, select(t.users).where(t.users.c.user_id == user_id))
            if user is None:
                raise NotFound("unknown_user", "no such user")
            if user["deleted_ms"] is not None:
                raise Gone("account_deleted", "this account was deleted: its personal data is erased")
            ident = first_row(conn, select(t.identities.c.name_enc).where(t.identities.c.user_id == user_id))
            audit(conn, operator_id, "unmask_user", user_id, {"reason": reason, "name": ident is not None}, now_ms)
        name = self.pii.open(ident["name_enc"], f"name:{user_id}").decode() if ident else None
        return {"user_id": user_id, "phone": user["phone"], "name": name or user["name"] or None}

    def adjust(self, operator_id: str, user_id: str, kind: str, amount: int, reason: str,
               now_ms: int) -> dict[str, Any]:
        """An admin's correction of a balance (fen) or points, signed, with the reason: one ``adjustment``
        balance entry or ``adjust`` points entry, audit-logged in the same transaction. Neither may go below
        zero by it."""
        u = t.users.c
        with self.db.tx() as conn:
            q = select(t.users).where(u.user_id == user_id)
            if not self.db.is_sqlite:
                q = q.with_for_update()        # a start or a redemption at the same moment waits
            user = first_row(conn, q)
            if user is None:
                raise NotFound("unknown_user", "no such user")
            if user["deleted_ms"] is not None:
                raise Conflict("account_deleted", "this account was deleted: its balance was paid out")
            note = f"{operator_id}: {reason}"[:200]
            if kind == "balance":
                available, _held = balance(conn, user_id)
                if available + amount < 0:
                    raise Conflict("below_zero", f"the balance is {available} fen: it may not go below zero "
                                   f"(at most -{max(0, available)} fen)", available_fen=available)
                add_entry(conn, user_id, "adjustment", amount, now_ms, note=note)
                after = available + amount
            else:
                if conn.execute(update(t.users).where(and_(u.user_id == user_id, u.points + amount >= 0))
                                .values(points=u.points + amount)).rowcount != 1:
                    raise Conflict("below_zero", f"the points are {user['points']}: they may not go below zero",
                                   points=user["points"])
                conn.execute(insert(t.points_entries).values(user_id=user_id, delta=amount, kind="adjust",
                                                             ref=operator_id[:64], note=reason[:200],
                                                             created_ms=now_ms))
                after = user["points"] + amount
            audit(conn, operator_id, "adjust_" + kind, user_id, {"amount": amount, "reason": reason, "after": after},
                  now_ms)
        return {"user_id": user_id, "kind": kind, "amount": amount, "after": after}


def _masked(user: dict[str, Any], ident: dict[str, Any] | None) -> dict[str, Any]:
    deleted = user["deleted_ms"] is not None
    name = (ident or {}).get("name_masked") or mask_name(user.get("name") or "")
    return {"user_id": user["user_id"], "phone_masked": "" if deleted else mask_phone(user["phone"]),
            "name_masked": "" if deleted else name, "registered": bool(user["registered"]),
            "identity_state": (ident or {}).get("state") or "none", "points": user["points"],
            "created_ms": user["created_ms"], "deleted_ms": user["deleted_ms"]}
