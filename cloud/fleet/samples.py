"""Heartbeat samples for the machine page's charts: at most one row per machine every ``SAMPLE_EVERY_MS``, kept
``SAMPLES_KEEP_MS``. A heartbeat comes every few seconds, so the time of each machine's last sample is remembered
in memory; only when that says a sample may be due is the database asked (one indexed query on
``samples_by_machine``), which also sees samples another cloud instance wrote."""

from __future__ import annotations

from typing import Any

from sqlalchemy import Connection, func, insert, select

from cloud import db as t

SAMPLE_EVERY_MS = 5 * 60_000
SAMPLES_KEEP_MS = 35 * 86_400_000


class Samples:
    def __init__(self) -> None:
        self._last_ms: dict[str, int] = {}

    def record(self, conn: Connection, machine_id: str, heartbeat: dict[str, Any], now_ms: int) -> bool:
        """Write a sample of ``heartbeat`` in the caller's transaction if the machine has none from the last
        ``SAMPLE_EVERY_MS``; returns whether it did."""
        if now_ms - self._last_ms.get(machine_id, -SAMPLE_EVERY_MS) < SAMPLE_EVERY_MS:
            return False
        s = t.machine_samples.c
        last = conn.execute(select(func.max(s.at_ms)).where(s.machine_id == machine_id)).scalar()
        if last is not None and now_ms - last < SAMPLE_EVERY_MS:
            self._last_ms[machine_id] = last
            return False
        conn.execute(insert(t.machine_samples).values(
            machine_id=machine_id, at_ms=now_ms, temp_c=heartbeat.get("temp_c"), tds_ppm=heartbeat.get("tds_ppm"),
            outbox_depth=heartbeat.get("outbox_depth") or 0, dead_letters=heartbeat.get("dead_letters") or 0))
        self._last_ms[machine_id] = now_ms
        return True

    @staticmethod
    def prune(conn: Connection, now_ms: int) -> int:
        """Samples older than ``SAMPLES_KEEP_MS`` removed (the charts show at most 7 days)."""
        return conn.execute(t.machine_samples.delete().where(t.machine_samples.c.at_ms < now_ms - SAMPLES_KEEP_MS)
                            ).rowcount
