"""A simulated dispenser body for desktops, tests and benchmarks.

:class:`SimValve` is a valve that remembers its state; :class:`SimFlowMeter` produces pulses as a
function of time while the valve is open (at ``flow_ml_per_min``), a few overrun pulses as the rotor
spins down after a close, and optional ghost flow (a leak or a stuck valve) while it is closed. Like the
real meter, it closes the valve itself on the pulse that reaches an armed limit.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

from hal.base import Clock


class SimValve:
    def __init__(self) -> None:
        self._lock = threading.RLock()
        self._open = False
        self._listeners: list[Callable[[bool], None]] = []
        self.transitions = 0

    @property
    def is_open(self) -> bool:
        return self._open

    def on_change(self, fn: Callable[[bool], None]) -> None:
        self._listeners.append(fn)

    def _set(self, value: bool) -> None:
        with self._lock:
            if self._open == value:
                return
            for fn in self._listeners:   # before the change: the meter accounts flow up to now
                fn(value)
            self._open = value
            self.transitions += 1

    def open(self) -> None:
        self._set(True)

    def close(self) -> None:
        self._set(False)


class SimFlowMeter:
    """Pulses from elapsed time: ``flow_ml_per_min`` while open, ``ghost_ml_per_min`` while closed."""

    def __init__(self, valve: SimValve, clock: Clock, *, pulses_per_litre: float = 450.0,
                 flow_ml_per_min: float = 6_000.0, overrun_pulses: int = 2, ghost_ml_per_min: float = 0.0) -> None:
        self._valve, self._clock = valve, clock
        self._lock = valve._lock   # one lock for the pair: no lock-order deadlock on close-at-limit
        self.pulses_per_litre = pulses_per_litre
        self.flow_ml_per_min = flow_ml_per_min
        self.ghost_ml_per_min = ghost_ml_per_min
        self.overrun_pulses = overrun_pulses
        self._pulses = 0.0
        self._last_ms = clock.monotonic_ms()
        self._limit: int | None = None
        valve.on_change(self._valve_changing)

    def _per_ms(self, ml_per_min: float) -> float:
        return ml_per_min / 60_000 * self.pulses_per_litre / 1000

    def _advance(self) -> None:
        now = self._clock.monotonic_ms()
        elapsed, self._last_ms = max(0, now - self._last_ms), now
        rate = self.flow_ml_per_min if self._valve.is_open else self.ghost_ml_per_min
        self._pulses += elapsed * self._per_ms(rate)
        if self._valve.is_open and self._limit is not None and self._pulses >= self._limit:
            self._pulses = float(self._limit)     # the edge callback closes the valve on this pulse
            self._limit = None
            self._valve.close()

    def _valve_changing(self, opening: bool) -> None:
        with self._lock:
            self._advance()
            if not opening:
                self._pulses += self.overrun_pulses

    def set_flow(self, ml_per_min: float) -> None:
        """Change the flow while open (0 simulates a cup taken away: no pulses, the idle timer runs)."""
        with self._lock:
            self._advance()
            self.flow_ml_per_min = ml_per_min

    def set_ghost_flow(self, ml_per_min: float) -> None:
        with self._lock:
            self._advance()
            self.ghost_ml_per_min = ml_per_min

    def total_pulses(self) -> int:
        with self._lock:
            self._advance()
            return int(self._pulses)

    def arm_limit(self, close_at_total_pulses: int | None) -> None:
        with self._lock:
            self._advance()
            self._limit = close_at_total_pulses
