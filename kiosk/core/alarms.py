"""The water and tank readings, and the condition alarms on them (:class:`ConditionAlarms`)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from contract.events import EventKind
from kiosk.core.lockouts import Lockouts
from kiosk.core.settings import CoreSettings
from kiosk.events import (
    LOCKOUT_LEAK_SENSOR,
    LOCKOUT_LOW_WATER,
    LOCKOUT_TDS,
    LOCKOUT_TEMPERATURE,
    Action,
    EndReason,
    RecordEvent,
)

StopWater = Callable[[EndReason, int], list[Action]]
"""Closes the valve for a reason at ``now_ms``, whatever is pouring; returns the actions (the core's)."""


@dataclass
class WaterReadings:
    """The latest tank readings (``None``: unknown), shown on the screen and written into checkpoints and bills.
    ``tds_measured`` is False when no TDS probe is fitted."""

    temp_c: float | None = None
    tds_ppm: int | None = None
    tds_measured: bool = False


class ConditionAlarms:
    """Alarms on the water and the tank, each of which locks the machine out:

    * the tank water's temperature outside its band for ``temp_alarm_after_ms``, or its TDS above the limit for
      ``tds_alarm_after_ms`` (an unknown reading neither starts, stops nor restarts the timer);
    * the low-water switch;
    * a wet leak sensor, which also stops the water at once.

    The first three lift their own lockout when the condition ends; the leak sensor's is cleared on site, after
    inspection (:class:`~kiosk.core.lockouts.Lockouts`)."""

    def __init__(self, settings: CoreSettings, lockouts: Lockouts, stop_water: StopWater) -> None:
        self.settings = settings
        self.readings = WaterReadings()
        self._lockouts = lockouts
        self._stop_water = stop_water
        self._temp_out_since_ms: int | None = None
        self._tds_high_since_ms: int | None = None
        # the last reading outside its limit: an unknown reading since (a sensor fault) neither stops the timer
        # (the water is not known to be back in its band) nor is it what the alarm names
        self._temp_out_c: float | None = None
        self._tds_high_ppm: int | None = None

    def on_temperature(self, temp_c: float | None, now_ms: int) -> list[Action]:
        self.readings.temp_c = temp_c
        st = self.settings
        if temp_c is None:
            return []
        if st.temp_band_min_c <= temp_c <= st.temp_band_max_c:
            self._temp_out_since_ms = None
            return self._lockouts.condition_ended(LOCKOUT_TEMPERATURE, f"tank water back at {temp_c:.1f} C")
        if self._temp_out_since_ms is None:
            self._temp_out_since_ms = now_ms
        self._temp_out_c = temp_c
        return self.on_tick(now_ms)

    def on_water_quality(self, tds_ppm: int | None, measured: bool, now_ms: int) -> list[Action]:
        self.readings.tds_ppm, self.readings.tds_measured = tds_ppm, measured
        if tds_ppm is None:
            return []
        if tds_ppm <= self.settings.tds_limit_ppm:
            self._tds_high_since_ms = None
            return self._lockouts.condition_ended(LOCKOUT_TDS, f"TDS back at {tds_ppm} mg/L")
        if self._tds_high_since_ms is None:
            self._tds_high_since_ms = now_ms
        self._tds_high_ppm = tds_ppm
        return self.on_tick(now_ms)

    def on_low_water(self, low: bool) -> list[Action]:
        if low:
            return self._lockouts.add(LOCKOUT_LOW_WATER, "the tank is nearly empty")
        return self._lockouts.condition_ended(LOCKOUT_LOW_WATER, "the tank has been refilled")

    def on_leak(self, wet: bool, now_ms: int) -> list[Action]:
        if not wet:
            return [RecordEvent.of(EventKind.LEAK_SENSOR_DRY, locked_out=LOCKOUT_LEAK_SENSOR in self._lockouts.active)]
        return [*self._stop_water(EndReason.LEAK, now_ms),
                *self._lockouts.add(LOCKOUT_LEAK_SENSOR, "the leak sensor is wet")]

    def on_tick(self, now_ms: int) -> list[Action]:
        """Raise the temperature or TDS alarm once its condition has lasted long enough."""
        st, actions = self.settings, []
        since = self._temp_out_since_ms
        if since is not None and now_ms - since >= st.temp_alarm_after_ms \
                and LOCKOUT_TEMPERATURE not in self._lockouts.active:
            detail = (f"tank water at {self._temp_out_c:.1f} C, outside the safe band {st.temp_band_min_c:g}-"
                      f"{st.temp_band_max_c:g} C for {(now_ms - since) // 1000} s")
            actions += self._lockouts.add(LOCKOUT_TEMPERATURE, detail)
        since = self._tds_high_since_ms
        if since is not None and now_ms - since >= st.tds_alarm_after_ms and LOCKOUT_TDS not in self._lockouts.active:
            detail = (f"TDS {self._tds_high_ppm} mg/L above the limit of {st.tds_limit_ppm} mg/L for "
                      f"{(now_ms - since) // 1000} s")
            actions += self._lockouts.add(LOCKOUT_TDS, detail)
        return actions
