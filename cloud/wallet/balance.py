"""A person's money, as entries: available = every entry's sum; held = what running sessions have put aside
(``hold`` entries not yet ``release``d). Every change of money is one :func:`add_entry` in the caller's
transaction."""

from __future__ import annotations

from sqlalchemy import Connection, and_, func, insert, select

from cloud import db as t


def balance(conn: Connection, user_id: str) -> tuple[int, int]:
    """(available, held) in fen. Available is the sum of every entry; held is the sum of open holds."""
    e = t.balance_entries.c
    available = conn.execute(select(func.coalesce(func.sum(e.amount_fen), 0)).where(e.user_id == user_id)).scalar()
    held = conn.execute(select(func.coalesce(func.sum(e.amount_fen), 0)).where(
        and_(e.user_id == user_id, e.kind.in_(("hold", "release"))))).scalar()
    return int(available), -int(held)


def add_entry(conn: Connection, user_id: str, kind: str, amount_fen: int, now_ms: int, session_id: str | None = None,
              note: str = "") -> None:
    conn.execute(insert(t.balance_entries).values(user_id=user_id, kind=kind, amount_fen=amount_fen,
                                                  session_id=session_id, note=note, created_ms=now_ms))
