"""systemd's notify protocol without a library: READY=1 once the machine is up, STOPPING=1 on the way down,
and WATCHDOG=1 only while every heartbeat counter (the core thread's loop, the UI's clock) keeps moving,
so a deadlocked core or a frozen screen stops feeding the watchdog and systemd restarts the service
(the unit's ExecStopPost then drives the valve pin inactive)."""

from __future__ import annotations

import logging
import os
import socket
import threading
from collections.abc import Callable

log = logging.getLogger("tapshare.systemd")


def notify(message: str) -> bool:
    """Send one sd_notify message; False when not started by systemd (no NOTIFY_SOCKET) or on error."""
    addr = os.environ.get("NOTIFY_SOCKET")
    if not addr:
        return False
    if addr.startswith("@"):
        addr = "\0" + addr[1:]                 # abstract namespace
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
            s.connect(addr)
            s.sendall(message.encode())
        return True
    except OSError as e:
        log.warning("sd_notify %r failed: %s", message, e)
        return False


def watchdog_period_s() -> float | None:
    """Half the unit's WatchdogSec (systemd's advice), or None when no watchdog is asked for."""
    usec, pid = os.environ.get("WATCHDOG_USEC"), os.environ.get("WATCHDOG_PID")
    if not usec or not usec.isdigit() or (pid and pid.isdigit() and int(pid) != os.getpid()):
        return None
    return int(usec) / 1_000_000 / 2


class Watchdog(threading.Thread):
    """Feeds systemd's watchdog while every beat advances. A beat returning None is not there yet (the UI
    before its window opens, or a headless machine) and is not waited for."""

    def __init__(self, beats: dict[str, Callable[[], int | None]], period_s: float) -> None:
        super().__init__(name="watchdog", daemon=True)
        self.beats, self.period_s = beats, period_s
        self._halt = threading.Event()
        self.fed = 0

    def run(self) -> None:
        last = {name: beat() for name, beat in self.beats.items()}
        while not self._halt.wait(self.period_s):
            now = {name: beat() for name, beat in self.beats.items()}
            stuck = [n for n, v in now.items() if v is not None and v == last.get(n)]
            if stuck:
                log.error("NOT feeding the watchdog: %s stopped ticking", ", ".join(stuck))
            elif notify("WATCHDOG=1"):
                self.fed += 1
            last = now

    def stop(self) -> None:
        self._halt.set()
