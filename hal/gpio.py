"""gpiozero parts of the dispenser: valve, flow meter, stop button, switch inputs, TDS through an MCP3008.

The same classes run on a Raspberry Pi (lgpio pin factory) and in the desktop simulation (gpiozero's
MockFactory), so the simulation exercises the real code paths. Every class takes its pin factory
explicitly; none relies on gpiozero's global default.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable

from gpiozero import MCP3008, Button, DigitalInputDevice, DigitalOutputDevice
from gpiozero.pins import Factory

log = logging.getLogger("tapshare.hal")


class GpioValve:
    """A normally-closed solenoid valve behind a relay on one output pin.

    ``active_high`` is the level that *opens* the valve (many relay boards switch on a low level).
    :meth:`close` drives the pin to the *inactive* level (``not active_high``) and never raises: if
    gpiozero's device call fails it writes the raw pin level as a second way, and logs critically.
    The pin is claimed with ``initial_value=False``, so creating this object closes the valve.
    """

    def __init__(self, pin: int, *, active_high: bool, pin_factory: Factory) -> None:
        self.pin_number = pin
        self.active_high = active_high
        self._dev = DigitalOutputDevice(pin, active_high=active_high, initial_value=False, pin_factory=pin_factory)
        self._lock = threading.Lock()
        self.transitions = 0
        self._listeners: list[Callable[[bool], None]] = []

    @property
    def inactive_level(self) -> int:
        """The electrical level (0 or 1) that closes the valve."""
        return 0 if self.active_high else 1

    @property
    def is_open(self) -> bool:
        return bool(self._dev.value)

    @property
    def pin_level(self) -> int:
        return int(self._dev.pin.state)

    def on_change(self, fn: Callable[[bool], None]) -> None:
        """``fn(is_open)`` after every transition (the simulation's water follows the valve)."""
        self._listeners.append(fn)

    def open(self) -> None:
        with self._lock:
            if not self.is_open:
                self._dev.on()
                self.transitions += 1
                self._notify(True)

    def close(self) -> None:
        with self._lock:
            was_open = self.is_open
            try:
                self._dev.off()
            except Exception:
                log.critical("valve: gpiozero off() failed; writing the inactive level to the pin", exc_info=True)
                try:
                    self._dev.pin.state = self.inactive_level
                except Exception:
                    log.critical("VALVE PIN %d COULD NOT BE DRIVEN INACTIVE", self.pin_number, exc_info=True)
                    return
            if was_open:
                self.transitions += 1
                self._notify(False)

    def _notify(self, is_open: bool) -> None:
        for fn in self._listeners:
            try:
                fn(is_open)
            except Exception:
                log.exception("valve listener failed")


class GpioFlowMeter:
    """A hall-effect flow meter: one pulse per edge, counted in gpiozero's edge callback.

    The counter is thread-safe and never decreases. :meth:`arm_limit` makes the callback itself close
    the valve on the pulse that reaches a total, without waiting for any other thread.
    """

    RATE_WINDOW_S = 1.0
    MAX_EDGES_KEPT = 4_096      # bound of the rate window's edge times (2 kHz, the fastest meter tested, for 2 s)

    def __init__(self, pin: int, *, valve: GpioValve, pin_factory: Factory, pull_up: bool = True,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._valve, self._clock = valve, clock
        self._lock = threading.Lock()
        self._count = 0
        self._limit: int | None = None
        # edge times of the last RATE_WINDOW_S only: old ones leave on every edge (they once stayed until a rate
        # was asked for, and nothing in service asks, so every pulse of a machine's life was kept)
        self._edges: deque[float] = deque(maxlen=self.MAX_EDGES_KEPT)
        self.limit_closes = 0
        self._dev = DigitalInputDevice(pin, pull_up=pull_up, pin_factory=pin_factory)
        self._dev.when_activated = self._edge

    def _edge(self) -> None:
        now = self._clock()
        close = False
        with self._lock:
            self._count += 1
            edges = self._edges
            edges.append(now)
            while now - edges[0] > self.RATE_WINDOW_S:
                edges.popleft()
            if self._limit is not None and self._count >= self._limit:
                self._limit = None
                close = True
        if close:
            self._valve.close()
            self.limit_closes += 1

    def total_pulses(self) -> int:
        with self._lock:
            return self._count

    @property
    def armed_limit(self) -> int | None:
        return self._limit

    def arm_limit(self, close_at_total_pulses: int | None) -> None:
        close = False
        with self._lock:
            self._limit = close_at_total_pulses
            if close_at_total_pulses is not None and self._count >= close_at_total_pulses:
                self._limit, close = None, True
        if close:
            self._valve.close()

    def pulses_per_s(self) -> float:
        """Instantaneous rate: edges in the last second."""
        now = self._clock()
        with self._lock:
            while self._edges and now - self._edges[0] > self.RATE_WINDOW_S:
                self._edges.popleft()
            return len(self._edges) / self.RATE_WINDOW_S

    def close(self) -> None:
        self._dev.close()


class GpioStopButton:
    """The machine's momentary stop button (to ground, internal pull-up).

    Presses are debounced in software too (gpiozero's ``bounce_time`` depends on the pin factory and
    the mock ignores it). Holding it for ``long_press_ms`` calls ``on_long_press`` (technicians).
    """

    def __init__(self, pin: int, *, on_press: Callable[[], None], pin_factory: Factory,
                 on_long_press: Callable[[], None] | None = None, debounce_ms: int = 30,
                 long_press_ms: int = 3_000, clock: Callable[[], float] = time.monotonic) -> None:
        self._on_press, self._on_long_press, self._clock = on_press, on_long_press, clock
        self._debounce_s = debounce_ms / 1000
        self._last_press = -1e9
        self.presses = 0
        self.bounces_ignored = 0
        self._dev = Button(pin, pull_up=True, bounce_time=None, hold_time=long_press_ms / 1000,
                           pin_factory=pin_factory)
        self._dev.when_pressed = self._pressed
        self._dev.when_held = self._held

    def _pressed(self) -> None:
        now = self._clock()
        if now - self._last_press < self._debounce_s:
            self.bounces_ignored += 1
            return
        self._last_press = now
        self.presses += 1
        self._on_press()

    def _held(self) -> None:
        if self._on_long_press is not None:
            self._on_long_press()

    def close(self) -> None:
        self._dev.close()


class GpioSwitch:
    """A digital sensor input (leak/flood sensor, low-water float switch): ``on_change(active)``."""

    def __init__(self, pin: int, *, on_change: Callable[[bool], None], pin_factory: Factory,
                 active_high: bool = False) -> None:
        self._on_change = on_change
        # active_high=False: the sensor pulls the line low when it triggers (pull-up on the Pi side)
        self._dev = DigitalInputDevice(pin, pull_up=not active_high, pin_factory=pin_factory)
        self._dev.when_activated = lambda: self._on_change(True)
        self._dev.when_deactivated = lambda: self._on_change(False)

    @property
    def active(self) -> bool:
        return bool(self._dev.value)

    def close(self) -> None:
        self._dev.close()


class Mcp3008Voltage:
    """One channel of an MCP3008 ADC on the SPI bus, read as volts."""

    def __init__(self, channel: int, *, vref: float, pin_factory: Factory) -> None:
        self._adc = MCP3008(channel=channel, max_voltage=vref, pin_factory=pin_factory)

    def voltage(self) -> float:
        return float(self._adc.voltage)

    def close(self) -> None:
        self._adc.close()
