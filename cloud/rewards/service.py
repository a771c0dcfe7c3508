"""Growth points and gifts (s6).

The rule: a settled session earns ``floor(amount charged in fen / 100) × POINTS_PER_YUAN`` points, i.e.
one point per whole yuan (a 1.99 yuan bill earns 1 point, a free pour none). Every change of points is a
row in ``points_entries``; ``users.points`` is the running total, changed only by conditional UPDATEs in
the same transaction, so it can never go below zero. A redemption carries the phone's request id: the
same request twice redeems once.
"""

from __future__ import annotations

import secrets
import uuid
from typing import Any

from sqlalchemy import Connection, and_, bindparam, insert, select, update
from sqlalchemy.exc import IntegrityError

from cloud import db as t
from cloud.accounts.identity import mask_phone
from cloud.db import Database, audit, first_row
from cloud.errors import Conflict, InsufficientFunds, NotFound
from cloud.wallet.balance import balance
from contract.billing import POINTS_PER_YUAN


class Rewards:
    def __init__(self, db: Database) -> None:
        self.db = db

    def history(self, user_id: str, limit: int = 100) -> dict[str, Any]:
        p = t.points_entries.c
        with self.db.read() as conn:
            total = conn.execute(select(t.users.c.points).where(t.users.c.user_id == user_id)).scalar() or 0
            rows = conn.execute(select(p.delta, p.kind, p.ref, p.note, p.created_ms).where(p.user_id == user_id)
                                .order_by(p.id.desc()).limit(limit)).mappings().all()
        return {"points": total, "rule": f"{POINTS_PER_YUAN} point per whole yuan paid for water",
                "history": [dict(r) for r in rows]}

    def catalog(self, include_inactive: bool = False) -> list[dict[str, Any]]:
        g = t.gifts.c
        q = select(t.gifts).order_by(g.points_cost, g.gift_id)
        if not include_inactive:
            q = q.where(g.active.is_(True))
        with self.db.read() as conn:
            return [dict(r) for r in conn.execute(q).mappings().all()]

    def add_gift(self, operator_id: str, name_zh: str, name_en: str, points_cost: int, stock: int,
                 now_ms: int) -> dict[str, Any]:
        gift_id = "g-" + uuid.uuid4().hex[:12]
        with self.db.tx() as conn:
            conn.execute(insert(t.gifts).values(gift_id=gift_id, name_zh=name_zh, name_en=name_en,
                                                points_cost=points_cost, stock=stock, active=True, created_ms=now_ms))
            audit(conn, operator_id, "add_gift", gift_id, {"name_zh": name_zh, "points_cost": points_cost,
                                                           "stock": stock}, now_ms)
            return dict(first_row(conn, select(t.gifts).where(t.gifts.c.gift_id == gift_id)) or {})

    def change_gift(self, operator_id: str, gift_id: str, changes: dict[str, Any], now_ms: int) -> dict[str, Any]:
        """Change a gift; ``stock_add`` restocks (or writes off) relative to the stock at that moment, so a
        redemption at the same time is never lost the way an absolute ``stock`` would lose it."""
        g = t.gifts.c
        values = {k: v for k, v in changes.items() if k != "stock_add"}
        cond = g.gift_id == gift_id
        if changes.get("stock_add"):
            values["stock"] = g.stock + changes["stock_add"]
            cond = and_(cond, g.stock + changes["stock_add"] >= 0)
        with self.db.tx() as conn:
            if conn.execute(update(t.gifts).where(cond).values(**values)).rowcount != 1:
                if first_row(conn, select(g.gift_id).where(g.gift_id == gift_id)) is None:
                    raise NotFound("unknown_gift", "no such gift")
                raise Conflict("stock_below_zero", "that would take the stock below zero")
            audit(conn, operator_id, "change_gift", gift_id, changes, now_ms)
            return dict(first_row(conn, select(t.gifts).where(t.gifts.c.gift_id == gift_id)) or {})

    def redeem(self, user_id: str, gift_id: str, request_id: str, now_ms: int) -> dict[str, Any]:
        r = t.redemptions.c
        with self.db.read() as conn:
            prior = first_row(conn, select(t.redemptions).where(and_(r.user_id == user_id, r.request_id == request_id)))
        if prior is not None:
            return self._out(prior, repeated=True)
        try:
            with self.db.tx() as conn:
                gift = first_row(conn, select(t.gifts).where(t.gifts.c.gift_id == gift_id))
                if gift is None or not gift["active"]:
                    raise NotFound("unknown_gift", "this gift is not in the catalog")
                cost = gift["points_cost"]
                u = t.users.c
                uq = select(u.user_id).where(u.user_id == user_id)
                if not self.db.is_sqlite:
                    conn.execute(uq.with_for_update())    # the balance cannot go into arrears meanwhile
                available, _ = balance(conn, user_id)
                if available < 0:
                    raise InsufficientFunds("arrears", f"your account is in arrears ({-available} fen): top up before "
                                                   "redeeming points", balance_fen=available)
                if conn.execute(update(t.users).where(and_(u.user_id == user_id, u.points >= cost))
                                .values(points=u.points - cost)).rowcount != 1:
                    have = conn.execute(select(u.points).where(u.user_id == user_id)).scalar() or 0
                    raise Conflict("insufficient_points", f"this gift needs {cost} points; you have {have}",
                                   points=have, points_cost=cost)
                g = t.gifts.c
                if conn.execute(update(t.gifts).where(and_(g.gift_id == gift_id, g.stock > 0))
                                .values(stock=g.stock - 1)).rowcount != 1:
                    raise Conflict("out_of_stock", "this gift is out of stock")
                rid = "r-" + uuid.uuid4().hex[:16]
                row = dict(redemption_id=rid, user_id=user_id, gift_id=gift_id, request_id=request_id, points=cost,
                           pickup_code=new_pickup_code(), created_ms=now_ms)
                conn.execute(insert(t.redemptions).values(**row))
                conn.execute(insert(t.points_entries).values(user_id=user_id, delta=-cost, kind="redeem", ref=rid,
                                                             note=gift["name_zh"], created_ms=now_ms))
        except IntegrityError:            # the same request raced itself: the other one won
            with self.db.read() as conn:
                prior = first_row(conn, select(t.redemptions)
                                  .where(and_(r.user_id == user_id, r.request_id == request_id)))
            if prior is None:
                raise
            return self._out(prior, repeated=True)
        return self._out(row, repeated=False)

    def _out(self, row: dict[str, Any], repeated: bool) -> dict[str, Any]:
        with self.db.read() as conn:
            g = t.gifts.c
            gift = first_row(conn, select(g.name_zh, g.name_en).where(g.gift_id == row["gift_id"]))
        out = {k: row[k] for k in ("redemption_id", "gift_id", "points", "pickup_code", "created_ms")}
        return out | {"name_zh": gift["name_zh"] if gift else "", "name_en": gift["name_en"] if gift else "",
                      "repeated": repeated}

    def redemptions(self, user_id: str) -> list[dict[str, Any]]:
        r = t.redemptions.c
        with self.db.read() as conn:
            rows = conn.execute(select(t.redemptions).where(r.user_id == user_id).order_by(r.created_ms.desc())
                                .limit(100)).mappings().all()
        return [self._out(dict(x), repeated=False) for x in rows]


    def all_redemptions(self, state: str, code: str, limit: int, before_ms: int) -> list[dict[str, Any]]:
        """Redemptions for the staff who hand gifts over: by pickup code, waiting or picked up, newest first."""
        r, g, u = t.redemptions.c, t.gifts.c, t.users.c
        q = (select(r.redemption_id, r.user_id, r.gift_id, r.points, r.pickup_code, r.created_ms, r.picked_up_ms,
                    r.picked_up_by, g.name_zh, g.name_en, u.phone, u.deleted_ms)
             .join(t.gifts, g.gift_id == r.gift_id).join(t.users, u.user_id == r.user_id)
             .where(r.created_ms < before_ms))
        if code:
            q = q.where(r.pickup_code == code)
        if state == "waiting":
            q = q.where(r.picked_up_ms.is_(None))
        elif state == "picked_up":
            q = q.where(r.picked_up_ms.is_not(None))
        with self.db.read() as conn:
            rows = conn.execute(q.order_by(r.created_ms.desc()).limit(limit)).mappings().all()
        return [{**{k: v for k, v in x.items() if k not in ("phone", "deleted_ms")},
                 "phone_masked": "" if x["deleted_ms"] else mask_phone(x["phone"])} for x in rows]

    def picked_up(self, operator_id: str, redemption_id: str, now_ms: int) -> None:
        """The gift was handed over; once only (a second click or a second desk is told so)."""
        r = t.redemptions.c
        with self.db.tx() as conn:
            changed = conn.execute(update(t.redemptions).where(and_(r.redemption_id == redemption_id,
                                                                    r.picked_up_ms.is_(None)))
                                   .values(picked_up_ms=now_ms, picked_up_by=operator_id)).rowcount
            if not changed:
                row = first_row(conn, select(r.picked_up_ms, r.picked_up_by).where(r.redemption_id == redemption_id))
                if row is None:
                    raise NotFound("unknown_redemption", "no such redemption")
                raise Conflict("already_picked_up", f"already handed over by {row['picked_up_by']}",
                               picked_up_ms=row["picked_up_ms"])
            audit(conn, operator_id, "gift_picked_up", redemption_id, {}, now_ms)


_EARN = update(t.users).where(t.users.c.user_id == bindparam("b_user_id")).values(
    points=t.users.c.points + bindparam("b_points"))
_POINTS_ENTRY = insert(t.points_entries)


def earn_points(conn: Connection, user_id: str, points: int, session_id: str, now_ms: int) -> None:
    """Every settled session's points (prebuilt statements: this is on every session's way)."""
    if points <= 0:
        return
    conn.execute(_EARN, {"b_user_id": user_id, "b_points": points})
    conn.execute(_POINTS_ENTRY, {"user_id": user_id, "delta": points, "kind": "earn", "ref": session_id,
                                 "note": "water bought", "created_ms": now_ms})


def new_pickup_code() -> str:
    return f"{secrets.randbelow(10**8):08d}"
