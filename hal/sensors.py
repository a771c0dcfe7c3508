"""Slow sensors, read on a worker thread: the DS18B20 tank thermometer and an optional TDS probe.

A DS18B20 read blocks 94-752 ms, so nothing here ever runs on the core or UI thread. Faults (no
sensor, CRC not YES, the 85.0 C power-on reset value, a value outside the sane range) make the
reading ``None`` ("unknown"): logged once when the fault starts and once more on recovery
(the Home Assistant onewire rule). A TDS probe that is not fitted is "not measured", never a made-up
number.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable
from pathlib import Path

from kiosk.events import Event, TemperatureReading, WaterQualityReading

os.environ.setdefault("W1THERMSENSOR_NO_KERNEL_MODULE", "1")   # the Pi's dtoverlay loads w1-gpio at boot

from w1thermsensor import W1ThermSensor
from w1thermsensor.errors import (
    NoSensorFoundError,
    ResetValueError,
    SensorNotReadyError,
    W1ThermSensorError,
)

log = logging.getLogger("tapshare.hal.sensors")


class FaultLatch:
    """Logs a sensor's fault once when it starts and once when it ends."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.fault: str | None = None
        self.fault_count = 0

    def ok(self) -> None:
        if self.fault is not None:
            log.warning("%s recovered (was: %s)", self.name, self.fault)
            self.fault = None

    def failed(self, reason: str) -> None:
        self.fault_count += 1
        if self.fault is None:
            log.error("%s reading unknown: %s", self.name, reason)
        self.fault = reason


class W1Thermometer:
    """A DS18B20 on the 1-Wire bus. ``base_directory`` replaces ``/sys/bus/w1/devices`` (simulation, tests)."""

    def __init__(self, *, sensor_id: str = "", sane_min_c: float = -5.0, sane_max_c: float = 70.0,
                 base_directory: Path | None = None) -> None:
        self.sensor_id = sensor_id or None
        self.sane_min_c, self.sane_max_c = sane_min_c, sane_max_c
        self._cls = W1ThermSensor if base_directory is None else type(
            "W1ThermSensorAt", (W1ThermSensor,), {"BASE_DIRECTORY": Path(base_directory)})
        self._sensor: W1ThermSensor | None = None
        self.latch = FaultLatch("tank thermometer")

    def read(self) -> float | None:
        try:
            if self._sensor is None:
                self._sensor = self._cls(sensor_id=self.sensor_id)
            temp = float(self._sensor.get_temperature())
        except NoSensorFoundError:
            self._sensor = None          # unplugged: look for it again next time
            self.latch.failed("no DS18B20 found on the 1-Wire bus")
            return None
        except SensorNotReadyError:
            self.latch.failed("CRC check failed (not YES)")
            return None
        except ResetValueError:
            self.latch.failed("power-on reset value 85.0 C (sensor not converted yet, or power fault)")
            return None
        except (W1ThermSensorError, OSError, ValueError, IndexError) as e:
            self.latch.failed(f"unreadable: {e}")
            return None
        if not self.sane_min_c <= temp <= self.sane_max_c:
            self.latch.failed(f"{temp:.1f} C is outside the sane range {self.sane_min_c}-{self.sane_max_c} C")
            return None
        self.latch.ok()
        return temp


def tds_ppm_from_voltage(volts: float, temp_c: float | None, k_value: float = 1.0) -> int:
    """Total dissolved solids (mg/L) from an analog TDS probe's voltage (the common Gravity-style
    probe curve), compensated to 25 C with 2 %/C; without a temperature it assumes 25 C."""
    compensated = volts / (1.0 + 0.02 * ((25.0 if temp_c is None else temp_c) - 25.0))
    ppm = (133.42 * compensated ** 3 - 255.86 * compensated ** 2 + 857.39 * compensated) * 0.5 * k_value
    return max(0, round(ppm))


class TdsProbe:
    """A TDS probe read through an ADC channel (``voltage()`` in volts)."""

    def __init__(self, adc: Callable[[], float], *, k_value: float = 1.0, max_volts: float = 2.3) -> None:
        self._adc, self.k_value, self.max_volts = adc, k_value, max_volts
        self.latch = FaultLatch("TDS probe")

    def read(self, temp_c: float | None) -> int | None:
        try:
            volts = self._adc()
        except Exception as e:
            self.latch.failed(f"ADC read failed: {e}")
            return None
        if not 0.0 <= volts <= self.max_volts:
            self.latch.failed(f"{volts:.2f} V is outside the probe's 0-{self.max_volts} V range")
            return None
        self.latch.ok()
        return tds_ppm_from_voltage(volts, temp_c, self.k_value)


class SensorPoller(threading.Thread):
    """Reads the thermometer (and TDS probe) every ``interval_ms`` and posts the readings as events."""

    def __init__(self, post: Callable[[Event], None], *, thermometer: W1Thermometer | None,
                 tds: TdsProbe | None, interval_ms: int) -> None:
        super().__init__(name="sensors", daemon=True)
        self._post, self.thermometer, self.tds, self.interval_ms = post, thermometer, tds, interval_ms
        self._halt = threading.Event()
        self.reads = 0

    def halt(self) -> None:
        self._halt.set()

    def poll_once(self) -> None:
        temp = self.thermometer.read() if self.thermometer is not None else None
        self._post(TemperatureReading(temp))
        if self.tds is None:
            self._post(WaterQualityReading(None, measured=False))
        else:
            self._post(WaterQualityReading(self.tds.read(temp), measured=True))
        self.reads += 1

    def run(self) -> None:
        while not self._halt.is_set():
            try:
                self.poll_once()
            except Exception:
                log.exception("sensor poll failed")
            self._halt.wait(self.interval_ms / 1000)
