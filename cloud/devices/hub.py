"""Wakes long-polling dispensers when a command is queued for them.

Waiters hold no database connection: they wait on an :class:`asyncio.Event` per machine and re-read
their commands when woken (or at the end of the poll). Each instance has its hub; with several instances
on PostgreSQL, a command queued at any of them reaches this hub through the instance's one ``LISTEN``
connection (:mod:`cloud.cluster`), and :class:`Presence` tells every instance which machines poll.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from typing import Any

from sqlalchemy import bindparam, case, update

from cloud import db as t


class CommandHub:
    RECENT_S = 3.0       # a dispenser re-polls at once; between two polls it still counts as connected

    def __init__(self) -> None:
        self._events: dict[str, asyncio.Event] = {}
        self._polling: dict[str, int] = {}
        self._last_poll_end: dict[str, float] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self.draining = False    # stopping soon: health says so, polls are still held as usual
        self.closing = False

    def drain(self) -> None:
        """Safe from any thread: the server will stop after its drain. Until then everything is served as usual
        (held polls too), while the balancer, told by /healthz, takes the instance out. Answering the held polls
        now instead sent 3,000 machines straight back here (the fewest connections, for ``leastconn``), in a
        loop of polls answered at once, until the balancer saw the health check."""
        self.draining = True

    def close(self, spread: bool = False) -> None:
        """Safe from any thread (a signal handler): the server is stopping. Every held long-poll answers (the
        device polls again, through the load balancer, at once) and no new one waits. ``spread`` (a drained
        instance behind a balancer): they answer in turn, RELEASE_PER_S a second (at most RELEASE_MAX_S), so
        their machines reach the other instances as a stream, not one wave: 3,333 polls at once kept two
        instances' cores busy for seconds, and every start meanwhile waited (rolling restart p99 1.5 s)."""
        self.closing = True
        if self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._wake_all, spread)

    RELEASE_PER_S = 1_000
    RELEASE_MAX_S = 5.0           # within uvicorn's graceful shutdown (10 s), after TAPSHARE_DRAIN_S
    RELEASE_TICK_S = 0.02

    def _wake_all(self, spread: bool = False) -> None:
        events = list(self._events.values())
        spread_s = min(self.RELEASE_MAX_S, len(events) / self.RELEASE_PER_S) if spread else 0.0
        turns = min(int(spread_s / self.RELEASE_TICK_S), len(events))
        if turns < 2:
            self._set_all(events)
            return
        per = -(-len(events) // turns)
        for i in range(turns):
            if events[i * per:(i + 1) * per]:
                self._loop.call_later(i * spread_s / turns, self._set_all, events[i * per:(i + 1) * per])

    @staticmethod
    def _set_all(events: list[asyncio.Event]) -> None:
        for ev in events:
            ev.set()

    def bind(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop

    def connected(self, machine_id: str) -> bool:
        if self._polling.get(machine_id, 0) > 0:
            return True
        return time.monotonic() - self._last_poll_end.get(machine_id, -1e9) < self.RECENT_S

    def notify(self, machine_id: str) -> None:
        """Safe from any thread: wakes the machine's long-poll, if any."""
        loop = self._loop
        if loop is None:
            return
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is loop:
            self._set(machine_id)
        else:
            loop.call_soon_threadsafe(self._set, machine_id)

    def _set(self, machine_id: str) -> None:
        ev = self._events.get(machine_id)
        if ev is not None:
            ev.set()

    @asynccontextmanager
    async def polling(self, machine_id: str) -> AsyncIterator[asyncio.Event]:
        """Register as a waiter *before* reading the commands, so a command queued in between is not
        missed: ``async with hub.polling(m) as ev: read; if nothing: await wait_for(ev.wait(), t)``."""
        ev = self._events.setdefault(machine_id, asyncio.Event())
        self._polling[machine_id] = self._polling.get(machine_id, 0) + 1
        try:
            yield ev
        finally:
            ev.clear()
            n = self._polling.get(machine_id, 1) - 1
            if n <= 0:
                self._polling.pop(machine_id, None)
                self._events.pop(machine_id, None)
            else:
                self._polling[machine_id] = n
            self._last_poll_end[machine_id] = time.monotonic()

    @property
    def connected_count(self) -> int:
        return len(self._polling)


# PostgreSQL: two statements whatever the number of machines (a statement a machine was a sixth of an instance's
# time under a fleet's polls), their text constant so psycopg prepares them; the rows are locked first, in
# machine order, so two instances' flushes never wait on each other crosswise
_LOCK_PG = "SELECT 1 FROM machines WHERE machine_id = ANY(%(m)s::varchar[]) ORDER BY machine_id FOR UPDATE"
_POLLING_PG = ("UPDATE machines SET poll_until_ms = GREATEST(machines.poll_until_ms, batch.u) "
               "FROM unnest(%(m)s::varchar[], %(u)s::bigint[]) AS batch(m, u) WHERE machines.machine_id = batch.m")


_until = bindparam("until", type_=t.machines.c.poll_until_ms.type)
_POLLING_SQLITE = update(t.machines).where(t.machines.c.machine_id == bindparam("mid")).values(poll_until_ms=case(
    (t.machines.c.poll_until_ms.is_(None), _until), (t.machines.c.poll_until_ms < _until, _until),
    else_=t.machines.c.poll_until_ms))


class Presence:
    """Whether a machine is reachable now: long-polling at this instance (the hub knows), or at another one.

    Each long-poll that starts records until when it will be held (``machines.poll_until_ms``, at most one write
    a machine a second, in one batch each ``flush``), so a phone's request at instance B can start a
    machine that polls instance A. A held poll whose machine has gone counts as connected until its end, as it
    does for the hub itself; an unclaimed start is voided and its money released either way. With SQLite there
    is one process and only the hub is asked."""

    # a machine polls again at once, but a busy one (or a slow network) may take a few seconds: its last poll
    # counts this long after its end, as a heartbeat does (RECENTLY_SEEN_MS); a start to a machine that has in
    # fact gone is voided by its deadline and its money released
    RECENT_MS = 10_000
    REWRITE_MS = 1_000           # at most one write a machine a second (a machine polling without waiting)
    PRUNE_EVERY_MS = 10_000      # _written keeps each machine until its poll_until_ms, dropped this often

    def __init__(self, hub: CommandHub, db, clock_ms, shared: bool) -> None:
        self.hub, self.db, self.clock_ms, self.shared = hub, db, clock_ms, shared
        self._due: dict[str, int] = {}           # machine -> poll_until_ms to write
        self._written: dict[str, int] = {}       # machine -> poll_until_ms last written by this instance
        self._pruned_ms = 0                      # when the times past were last dropped from _written
        self._lock = threading.Lock()

    def polling(self, machine_id: str, wait_ms: int, now_ms: int) -> None:
        if not self.shared:
            return
        until = now_ms + wait_ms + self.RECENT_MS
        if until > self._written.get(machine_id, 0) + self.REWRITE_MS:
            with self._lock:
                self._due[machine_id] = until
                self._written[machine_id] = until

    def flush(self) -> int:
        """Write the polls begun since the last flush (one transaction; machines in order, so two instances'
        flushes never wait on each other crosswise). An earlier time never replaces a later one."""
        with self._lock:
            due, self._due = self._due, {}
            now = self.clock_ms()
            if now - self._pruned_ms >= self.PRUNE_EVERY_MS:    # not every flush: it is a pass over every machine
                self._pruned_ms = now
                self._written = {m: u for m, u in self._written.items() if u > now}
        if not due:
            return 0
        try:
            with self.db.tx() as conn:
                ids = sorted(due)
                if conn.dialect.name == "postgresql":
                    conn.exec_driver_sql(_LOCK_PG, {"m": ids})
                    conn.exec_driver_sql(_POLLING_PG, {"m": ids, "u": [due[m] for m in ids]})
                else:
                    conn.execute(_POLLING_SQLITE, [{"mid": m, "until": due[m]} for m in ids])
        except Exception:
            with self._lock:                     # written with the next flush, not forgotten
                for m, u in due.items():
                    self._due[m] = max(u, self._due.get(m, 0))
            raise
        return len(due)

    def connected(self, machine: Mapping[str, Any]) -> bool:
        """``machine``: its row (``machine_id`` and ``poll_until_ms``)."""
        if self.hub.connected(machine["machine_id"]):
            return True
        return self.shared and (machine.get("poll_until_ms") or 0) > self.clock_ms()
