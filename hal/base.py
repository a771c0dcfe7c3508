"""Small hardware-layer parts shared by the real and the simulated machine: the system clock and the
stand-ins used when a device could not be set up. The interfaces they implement are in
:mod:`kiosk.ports`."""

from __future__ import annotations

import time


class SystemClock:
    """The real clocks."""

    def monotonic_ms(self) -> int:
        return time.monotonic_ns() // 1_000_000

    def wall_ms(self) -> int:
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
