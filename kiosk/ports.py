"""The interfaces the dispenser's runtime needs from its body (implemented in hal/).

Every method is safe to call from any thread.
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
