"""Wakes long-polling dispensers when a command is queued for them.

Waiters hold no database connection: they wait on an :class:`asyncio.Event` per machine and re-read
their commands when woken (or at the end of the poll). One server process holds the hub; a fleet
bigger than one process can serve would put a pub/sub (PostgreSQL LISTEN/NOTIFY) behind the same
two methods.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager


class CommandHub:
    RECENT_S = 3.0       # a dispenser re-polls at once; between two polls it still counts as connected

    def __init__(self) -> None:
        self._events: dict[str, asyncio.Event] = {}
        self._polling: dict[str, int] = {}
        self._last_poll_end: dict[str, float] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self.closing = False

    def close(self) -> None:
        """Safe from any thread (a signal handler): the server is stopping. Every held long-poll answers now (the
        device polls again, through the load balancer, at once) and no new one waits."""
        self.closing = True
        if self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._wake_all)

    def _wake_all(self) -> None:
        for ev in self._events.values():
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
