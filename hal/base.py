"""The interfaces between the dispenser's runtime and its body.

Implementations: :mod:`hal.sim` (a simulated machine for desktops and tests); the gpiozero and
w1thermsensor parts for the Raspberry Pi come with the hardware issue. Every method is safe to call
from any thread.
"""

from __future__ import annotations

from typing import Protocol


class Clock(Protocol):
    def monotonic_ms(self) -> int:
        """Milliseconds on a clock that never jumps (for limits and timeouts)."""

    def wall_ms(self) -> int:
        """Milliseconds since the Unix epoch, UTC (for records; may be wrong until time sync)."""


class Valve(Protocol):
    """A normally-closed solenoid valve. ``close()`` must never raise for a reason that leaves it open."""

    @property
    def is_open(self) -> bool: ...

    def open(self) -> None: ...

    def close(self) -> None: ...


class FlowMeter(Protocol):
    """A pulse-output flow meter whose edges are counted in callbacks, never by polling."""

    def total_pulses(self) -> int:
        """Pulses counted since the meter started; never decreases."""

    def arm_limit(self, close_at_total_pulses: int | None) -> None:
        """Close the valve from the edge callback on the pulse that reaches this total (``None`` disarms)."""


class SystemClock:
    """The real clocks."""

    def monotonic_ms(self) -> int:
        import time
        return time.monotonic_ns() // 1_000_000

    def wall_ms(self) -> int:
        import time
        return time.time_ns() // 1_000_000


class DisconnectedValve:
    """Stands in when the valve's pin could not be set up: never opens (the machine is out of service)."""

    is_open = False

    def open(self) -> None:
        raise RuntimeError("the valve is not connected")

    def close(self) -> None:
        pass


class DisconnectedMeter:
    """Stands in when the flow meter's pin could not be set up."""

    def total_pulses(self) -> int:
        return 0

    def arm_limit(self, close_at_total_pulses: int | None) -> None:
        pass
