"""A person's money, as entries: available = every entry's sum; held = what running sessions have put aside
(``hold`` entries not yet ``release``d). Every change of money is one :func:`add_entry` in the caller's
transaction."""

from __future__ import annotations

from sqlalchemy import Connection, bindparam, case, func, insert, select

from cloud import db as t

_e = t.balance_entries.c
# one pass over the person's entries for both sums (built once: a start and every balance read run it)
_BALANCE = select(func.coalesce(func.sum(_e.amount_fen), 0),
                  func.coalesce(func.sum(case((_e.kind.in_(("hold", "release")), _e.amount_fen), else_=0)), 0)
                  ).where(_e.user_id == bindparam("user_id"))
_ENTRY = insert(t.balance_entries)


def balance(conn: Connection, user_id: str) -> tuple[int, int]:
    """(available, held) in fen. Available is the sum of every entry; held is the sum of open holds."""
    available, held = conn.execute(_BALANCE, {"user_id": user_id}).one()
    return int(available), -int(held)


def add_entry(conn: Connection, user_id: str, kind: str, amount_fen: int, now_ms: int, session_id: str | None = None,
              note: str = "") -> None:
    conn.execute(_ENTRY, {"user_id": user_id, "kind": kind, "amount_fen": amount_fen, "session_id": session_id,
                          "note": note, "created_ms": now_ms})
