"""The simulated physical world of a dispenser, for desktops, tests and benchmarks.

The dispenser's own code is the same as on a Raspberry Pi: gpiozero devices (:mod:`hal.gpio`) on
gpiozero's :class:`~gpiozero.pins.mock.MockFactory`, w1thermsensor reading a ``w1_slave`` file, and
gpiozero's MCP3008 class talking SPI. Only the world outside the pins is simulated here:

* :class:`WaterSimulator`: water flows while the valve pin is active, at ``flow_ml_per_min`` with
  realistic noise; the meter's pin sees one falling edge per pulse at the K-factor's rate; a few
  overrun pulses follow a close; a stuck valve or leak gives ghost flow.
* :class:`SimThermometerFiles`: a DS18B20 in a fake ``/sys/bus/w1/devices`` tree, with injectable
  faults (unplugged, CRC error, 85.0 C reset value).
* :class:`SimMcp3008`: the ADC's side of the SPI conversation, so gpiozero's MCP3008 reads a TDS
  probe voltage.
"""

from __future__ import annotations

import os
import random
import shutil
import threading
import time
from collections import deque
from pathlib import Path

from gpiozero.pins.mock import MockFactory, MockPin, MockSPIDevice

from hal.sensors import tds_ppm_from_voltage

PIN_STATES_KEPT = 256          # states a simulated pin remembers (gpiozero's MockPin keeps every one)


class SimPin(MockPin):
    """A MockPin that keeps only its last ``PIN_STATES_KEPT`` states (MockPin keeps all; a simulation runs for
    days)."""

    def clear_states(self) -> None:
        super().clear_states()
        self.states = deque(self.states, maxlen=PIN_STATES_KEPT)


def mock_factory() -> MockFactory:
    return MockFactory(pin_class=SimPin)


class WaterSimulator(threading.Thread):
    """Drives the flow meter's pin from the valve pin's state, in real time, on its own thread."""

    def __init__(self, factory: MockFactory, *, valve_pin: int, valve_active_high: bool, meter_pin: int,
                 pulses_per_litre: float = 450.0, flow_ml_per_min: float = 6_000.0, noise: float = 0.03,
                 overrun_pulses: int = 2, step_s: float = 0.002, seed: int | None = None) -> None:
        super().__init__(name="water-simulator", daemon=True)
        self._valve = factory.pin(valve_pin)
        self._active = valve_active_high
        self._meter = factory.pin(meter_pin)
        self.pulses_per_litre = pulses_per_litre
        self.flow_ml_per_min = flow_ml_per_min
        self.ghost_ml_per_min = 0.0
        self.noise = noise
        self.overrun_pulses = overrun_pulses
        self._step_s = step_s
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        self._halt = threading.Event()
        self._due = 0.0
        self._was_open = False
        self._overrun_left = 0
        self.pulses_sent = 0

    @property
    def valve_open(self) -> bool:
        return bool(self._valve.state) == self._active

    def set_flow(self, ml_per_min: float) -> None:
        """The flow while the valve is open (0: the cup was taken away, nothing flows)."""
        with self._lock:
            self.flow_ml_per_min = ml_per_min

    def set_ghost_flow(self, ml_per_min: float) -> None:
        """Flow with the valve closed: a stuck valve or a leak upstream of the meter."""
        with self._lock:
            self.ghost_ml_per_min = ml_per_min

    def halt(self) -> None:
        self._halt.set()

    def pulse(self, n: int = 1) -> None:
        """``n`` pulses on the meter's pin now (one falling edge each)."""
        for _ in range(n):
            self._meter.drive_low()
            self._meter.drive_high()
        self.pulses_sent += n

    def step(self, dt_s: float) -> None:
        with self._lock:
            is_open = self.valve_open
            if self._was_open and not is_open:
                self._overrun_left = self.overrun_pulses      # the rotor spins on after the close
            self._was_open = is_open
            rate = self.flow_ml_per_min if is_open else self.ghost_ml_per_min
            if rate > 0:
                jitter = 1.0 + self._rng.gauss(0.0, self.noise)
                self._due += dt_s * rate / 60_000 * self.pulses_per_litre * max(0.0, jitter)
            n = int(self._due)
            self._due -= n
            if self._overrun_left and not is_open:
                n += 1
                self._overrun_left -= 1
        if n:
            self.pulse(n)

    def run(self) -> None:
        last = time.monotonic()
        step_s = self._step_s
        while not self._halt.wait(step_s):
            now = time.monotonic()
            self.step(now - last)
            last = now
            # nothing flows while the valve is shut (no ghost flow, no overrun left): look less often
            resting = not self.valve_open and not self.ghost_ml_per_min and not self._overrun_left
            step_s = 0.02 if resting else self._step_s


DS18B20_ID = "0000075a1ad5"


class SimThermometerFiles:
    """A DS18B20 as the w1-therm kernel driver shows it: ``<base>/28-<id>/w1_slave``."""

    def __init__(self, base: Path, sensor_id: str = DS18B20_ID) -> None:
        self.base = Path(base)
        self.folder = self.base / f"28-{sensor_id}"
        self.base.mkdir(parents=True, exist_ok=True)
        self.temp_c = 12.0
        self.set(12.0)

    def _write(self, text: str) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        tmp = self.folder / "w1_slave.tmp"
        tmp.write_text(text)
        os.replace(tmp, self.folder / "w1_slave")     # atomic: a reader never sees half a file

    def set(self, temp_c: float) -> None:
        self.temp_c = temp_c
        milli = round(temp_c * 1000)
        raw = round(temp_c * 16) & 0xFFFF     # the DS18B20 counts sixteenths of a degree
        b = f"{raw & 0xFF:02x} {raw >> 8:02x} 4b 46 7f ff 0e 10 57"
        self._write(f"{b} : crc=57 YES\n{b} t={milli}\n")

    def crc_error(self) -> None:
        self._write("72 01 4b 46 7f ff 0e 10 57 : crc=ff NO\n72 01 4b 46 7f ff 0e 10 57 t=23125\n")

    def reset_value(self) -> None:
        self._write("50 05 4b 46 7f ff 0c 10 1c : crc=1c YES\n50 05 4b 46 7f ff 0c 10 1c t=85000\n")

    def unplug(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)

    def plug_in(self) -> None:
        self.set(self.temp_c)


class SimMcp3008(MockSPIDevice):
    """The MCP3008's side of SPI: start bit, SGL/DIFF and three channel bits in; a null bit and the
    10-bit conversion of ``volts[channel]`` out. Single-ended channels only (what a TDS probe uses)."""

    def __init__(self, factory: MockFactory, *, vref: float = 3.3, clock_pin: int = 11, mosi_pin: int = 10,
                 miso_pin: int = 9, select_pin: int = 8) -> None:
        super().__init__(clock_pin, mosi_pin, miso_pin, select_pin, pin_factory=factory)
        # gpiozero makes the clock and select pins with its own classes, which keep every state: a TDS read every
        # few seconds toggled them ~50 times, for ever (the soak benchmark found it)
        for pin in (self.clock_pin, self.select_pin):
            if pin is not None:
                pin.states = deque(pin.states, maxlen=PIN_STATES_KEPT)
        self.vref = vref
        self.volts = [0.0] * 8
        self._phase = "idle"

    def on_start(self) -> None:
        super().on_start()
        self._phase = "idle"

    def on_bit(self) -> None:
        if self._phase == "idle":
            if self.rx_buf[-1]:                      # the start bit
                self._phase, self.rx_buf = "config", []
        elif self._phase == "config" and len(self.rx_buf) == 4:
            channel = self.rx_buf[1] << 2 | self.rx_buf[2] << 1 | self.rx_buf[3]
            volts = min(max(self.volts[channel], 0.0), self.vref)
            code = round(volts / self.vref * 1023)
            self.tx_word(code, 12)                   # sample clock, null bit, then B9..B0
            self._phase = "converting"

    def set_tds(self, channel: int, tds_ppm: float, temp_c: float | None, k_value: float = 1.0) -> None:
        """Set the probe voltage that reads as ``tds_ppm`` at ``temp_c`` (bisection on the probe curve)."""
        lo, hi = 0.0, 2.3
        for _ in range(40):
            mid = (lo + hi) / 2
            if tds_ppm_from_voltage(mid, temp_c, k_value) < tds_ppm:
                lo = mid
            else:
                hi = mid
        self.volts[channel] = hi
