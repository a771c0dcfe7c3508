"""Development-only helpers (refused in production mode)."""

from __future__ import annotations

import uuid

from sqlalchemy import insert

from cloud import db as t
from cloud.db import Database
from cloud.security import new_token, token_hash
from cloud.wallet.balance import add_entry


def create_dev_user(db: Database, phone: str, balance_fen: int, registered: bool, now_ms: int) -> tuple[str, str]:
    user_id = "u-" + uuid.uuid4().hex[:16]
    token = new_token()
    with db.tx() as conn:
        conn.execute(insert(t.users).values(user_id=user_id, phone=phone, registered=registered, created_ms=now_ms))
        conn.execute(insert(t.user_tokens).values(token_hash=token_hash(token), user_id=user_id, created_ms=now_ms))
        if balance_fen:
            add_entry(conn, user_id, "topup", balance_fen, now_ms, note="development top-up")
    return user_id, token
