"""Operators: their tokens and roles, and what they do to the fleet (provision machines, change a price or
limits, take a machine out of service, clear a lockout remotely) and read from it (machines, alarms, command
outcomes, rental records). Every change is audit-logged in its transaction."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Any

from sqlalchemy import and_, insert, or_, select

import contract as p
from cloud import db as t
from cloud.console.service import ROLES, check_role
from cloud.db import Database, audit, first_row
from cloud.devices.service import SILENT_AFTER_MS, Commands, Machines
from cloud.errors import NotFound, Unauthenticated
from cloud.security import new_token, token_hash


def create_operator(database: Database, name: str, role: str, valid_days: int, now_ms: int) -> str:
    """A new operator and its bearer token (shown once), valid ``valid_days``."""
    if role not in ROLES:
        raise ValueError(f"role must be one of {', '.join(ROLES)}")
    token = new_token()
    with database.tx() as conn:
        conn.execute(insert(t.operators).values(operator_id=name, role=role, token_hash=token_hash(token),
                                                created_ms=now_ms, expires_ms=now_ms + valid_days * 86_400_000))
    return token


class Operators:
    def __init__(self, db: Database, machines: Machines, connected: Callable[[Mapping[str, Any]], bool],
                 notify: Callable[[str], None]) -> None:
        self.db, self.machines = db, machines
        self._connected, self._notify = connected, notify

    # ---------------------------------------------------------------- tokens
    def authenticate(self, token: str, min_role: str, only: tuple[str, ...], now_ms: int) -> dict[str, Any]:
        """The operator holding ``token``, if its role allows: at least ``min_role``, or one of ``only``."""
        with self.db.read() as conn:
            row = first_row(conn, select(t.operators).where(t.operators.c.token_hash == token_hash(token)))
        if row is None or row["revoked_ms"] is not None or row["disabled_ms"] is not None:
            raise Unauthenticated("unauthenticated", "unknown or revoked operator token")
        if row["expires_ms"] is not None and row["expires_ms"] < now_ms:
            raise Unauthenticated("token_expired", "this operator token has expired: ask an admin for a new one")
        check_role(row, min_role, only)
        return row

    def logout(self, operator_id: str, now_ms: int) -> None:
        """Revoke the operator's own token."""
        with self.db.tx() as conn:
            conn.execute(t.operators.update().where(t.operators.c.operator_id == operator_id).values(revoked_ms=now_ms))
            audit(conn, operator_id, "logout", operator_id, {}, now_ms)

    def revoke(self, admin_id: str, operator_id: str, now_ms: int) -> None:
        """An admin revokes another operator's token; the next request with it is refused."""
        with self.db.tx() as conn:
            changed = conn.execute(t.operators.update().where(and_(t.operators.c.operator_id == operator_id,
                                                                   t.operators.c.revoked_ms.is_(None)))
                                   .values(revoked_ms=now_ms)).rowcount
            if not changed:
                raise NotFound("unknown_operator", "no such operator with a live token")
            audit(conn, admin_id, "revoke_operator", operator_id, {}, now_ms)

    # ---------------------------------------------------------------- the fleet
    def machine_view(self, m: dict[str, Any], now_ms: int) -> dict[str, Any]:
        d = {k: v for k, v in m.items() if k != "secret_enc"}
        d["enrolled"] = m["secret_enc"] is not None
        d["online"] = self._connected(m) or (m["last_seen_ms"] or 0) > now_ms - SILENT_AFTER_MS
        return d

    def machines_view(self, now_ms: int) -> list[dict[str, Any]]:
        with self.db.read() as conn:
            rows = conn.execute(select(t.machines).order_by(t.machines.c.machine_id)).mappings().all()
        return [self.machine_view(dict(m), now_ms) for m in rows]

    def change_machine(self, operator_id: str, machine_id: str, changes: dict[str, Any], now_ms: int) -> dict:
        """Change a machine's price, limits, place, time zone or hotline (new grants use them); a new price is
        sent to the machine."""
        self.machines.get(machine_id)
        price = changes.get("price_fen_per_l")
        with self.db.tx() as conn:
            conn.execute(t.machines.update().where(t.machines.c.machine_id == machine_id).values(**changes))
            if price is not None:
                Commands.queue(conn, machine_id, p.CommandKind.PRICE, now_ms, price_fen_per_l=price)
            audit(conn, operator_id, "change_machine", machine_id, changes, now_ms)
        if price is not None:
            self._notify(machine_id)
        return self.machine_view(self.machines.get(machine_id), now_ms)

    def send(self, operator_id: str, machine_id: str, kind: p.CommandKind, audit_detail: dict[str, Any], now_ms: int,
             **fields: Any) -> str:
        """Queue a command for a machine (audited) and wake its long-poll; returns the command id."""
        self.machines.get(machine_id)
        with self.db.tx() as conn:
            cid = Commands.queue(conn, machine_id, kind, now_ms, **fields)
            audit(conn, operator_id, kind.value, machine_id, audit_detail, now_ms)
        self._notify(machine_id)
        return cid

    def command(self, command_id: str) -> dict[str, Any]:
        """What became of a command sent to a machine: delivered, acknowledged, refused with the reason."""
        with self.db.read() as conn:
            row = first_row(conn, select(t.commands).where(t.commands.c.command_id == command_id))
        if row is None:
            raise NotFound("unknown_command", "no such command")
        return {k: row[k] for k in ("command_id", "machine_id", "kind", "created_ms", "expires_ms", "delivered_ms",
                                    "acked_ms", "ack_ok", "ack_reason")}

    def alarms(self, limit: int, now_ms: int) -> dict[str, Any]:
        """The newest alarms (the machines', and the service's own: payments, SMS, reconciliation), and the
        enrolled machines not heard from for ``SILENT_AFTER_MS``."""
        cut = now_ms - SILENT_AFTER_MS
        with self.db.read() as conn:
            ev = conn.execute(select(t.machine_events).where(t.machine_events.c.alarm.is_(True))
                              .order_by(t.machine_events.c.received_ms.desc()).limit(limit)).mappings().all()
            mc = t.machines.c
            silent = conn.execute(select(mc.machine_id, mc.last_seen_ms, mc.poll_until_ms).where(and_(
                t.machines.c.secret_enc.is_not(None),
                or_(t.machines.c.last_seen_ms.is_(None), t.machines.c.last_seen_ms < cut)))).mappings().all()
            service = conn.execute(select(t.alarms).order_by(t.alarms.c.created_ms.desc(), t.alarms.c.id.desc())
                                   .limit(limit)).mappings().all()
        return {"alarms": [dict(e) for e in ev], "service_alarms": [dict(a) for a in service],
                "silent_machines": [dict(s) for s in silent if not self._connected(s)]}

    def records(self, machine_id: str | None, user_id: str | None, from_ms: int, to_ms: int,
                limit: int) -> list[dict[str, Any]]:
        """s7: rental records by machine, user and time range, newest first."""
        r = t.rental_records.c
        q = select(t.rental_records).where(and_(r.started_ms >= from_ms, r.started_ms < to_ms))
        if machine_id:
            q = q.where(r.machine_id == machine_id)
        if user_id:
            q = q.where(r.user_id == user_id)
        with self.db.read() as conn:
            return [dict(x) for x in conn.execute(q.order_by(r.started_ms.desc()).limit(limit)).mappings().all()]


    def audit_log(self, operator_id: str, action: str, target: str, from_ms: int, to_ms: int, before_id: int,
                  limit: int | None) -> Iterator[dict[str, Any]]:
        """Who did what to what, when: newest first, filtered; ``before_id`` pages on (the ids only grow)."""
        a = t.audit_log.c
        q = select(t.audit_log).where(and_(a.at_ms >= from_ms, a.at_ms < to_ms, a.id < before_id))
        if operator_id:
            q = q.where(a.operator_id == operator_id)
        if action:
            q = q.where(a.action == action)
        if target:
            q = q.where(a.target == target)
        q = q.order_by(a.id.desc())
        if limit is not None:
            q = q.limit(limit)
        with self.db.read() as conn:
            yield from (dict(r) for r in conn.execute(q).mappings())

    def audit_actions(self) -> list[str]:
        with self.db.read() as conn:
            return list(conn.execute(select(t.audit_log.c.action).distinct().order_by(t.audit_log.c.action)).scalars())
