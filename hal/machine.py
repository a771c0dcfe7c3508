"""Builds the dispenser's body from the configuration: the pin factory, every device, the sensor thread.

The pin factory is chosen explicitly and installed as gpiozero's default too, so no device (gpiozero's
software SPI bus included) can silently fall back to another one. On real hardware a mock factory is
refused: a machine that takes money must never run on simulated hardware.
"""

from __future__ import annotations

import logging
import os
import queue
import tempfile
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from gpiozero import Device
from gpiozero.pins import Factory
from gpiozero.pins.mock import MockFactory

from hal.gpio import GpioFlowMeter, GpioStopButton, GpioSwitch, GpioValve, Mcp3008Voltage
from hal.sensors import SensorPoller, TdsProbe, W1Thermometer
from hal.sim import SimMcp3008, SimThermometerFiles, WaterSimulator, mock_factory
from kiosk.config import Config
from kiosk.events import Event, LeakSensor, LowWater

log = logging.getLogger("tapshare.hal")

SIM_LEAK_PIN = 5
SIM_LOW_WATER_PIN = 6


class HardwareError(RuntimeError):
    """The hardware cannot be used safely (no pin factory, a pin in use, simulated pins on a real machine)."""


def make_pin_factory(name: str, *, simulate: bool, lg_wd: Path | None = None) -> Factory:
    """The pin factory, chosen explicitly. lgpio is the only one that works on a Pi 5; RPi.GPIO is
    imported only here, only when asked for (Pi 4 and older)."""
    if simulate:
        return mock_factory()
    env = os.environ.get("GPIOZERO_PIN_FACTORY", "")
    if env and env != name:
        raise HardwareError(f"GPIOZERO_PIN_FACTORY={env} but hardware.pin_factory is {name}: refusing to guess; "
                            "a machine that takes money must never run on simulated or unintended pins")
    try:
        if name == "lgpio":
            # lgpio creates notification pipes in its working directory: give it a writable one
            os.environ.setdefault("LG_WD", str(lg_wd or tempfile.gettempdir()))
            from gpiozero.pins.lgpio import LGPIOFactory
            factory: Factory = LGPIOFactory()
        elif name == "rpigpio":
            from gpiozero.pins.rpigpio import RPiGPIOFactory
            factory = RPiGPIOFactory()
        else:
            raise HardwareError(f"hardware.pin_factory: unknown pin factory {name!r}")
    except HardwareError:
        raise
    except ImportError as e:
        raise HardwareError(f"pin factory {name} is not installed ({e}); on a Pi run deploy.sh "
                            "(it installs python3-lgpio), or run with --simulate on a desktop") from e
    except Exception as e:
        raise HardwareError(f"pin factory {name} cannot start: {e} (not a Raspberry Pi? no /dev/gpiochip?)") from e
    if isinstance(factory, MockFactory):
        raise HardwareError("a mock pin factory without --simulate: refusing to run a real machine on simulated pins")
    return factory


@dataclass
class Hardware:
    factory: Factory
    valve: GpioValve
    meter: GpioFlowMeter
    stop: GpioStopButton
    sensors: SensorPoller
    switches: dict[str, GpioSwitch] = field(default_factory=dict)
    world: SimulatedWorld | None = None
    adc: Mcp3008Voltage | None = None

    def start(self) -> None:
        self.sensors.start()
        if self.world is not None:
            self.world.start()

    def close(self) -> None:
        """Stop the threads; the valve is closed and its pin left at the inactive level; every other device is
        closed too (gpiozero shares an SPI bus between devices on the same pins: one left open would answer the
        next MCP3008 made on those pins, even on another pin factory)."""
        self.valve.close()
        self.sensors.halt()
        if self.sensors.is_alive() and self.sensors is not threading.current_thread():
            self.sensors.join(timeout=2)
        if self.world is not None:
            self.world.halt()
        devices = [self.meter, self.stop, *self.switches.values(), self.adc]
        if self.world is not None:
            devices.append(self.world.adc)
        for dev in devices:
            if dev is None:
                continue
            try:
                dev.close()
            except Exception:
                log.warning("closing %s failed", type(dev).__name__, exc_info=True)


@dataclass
class SimulatedWorld:
    """What a simulation can do to the machine: water, temperature, water quality, faults, buttons."""

    factory: MockFactory
    water: WaterSimulator
    thermometer: SimThermometerFiles
    adc: SimMcp3008 | None
    cfg: Config
    tds_ppm: float = 80.0

    def start(self) -> None:
        self.water.start()

    def halt(self) -> None:
        self.water.halt()

    def set_tds(self, ppm: float) -> None:
        self.tds_ppm = ppm
        if self.adc is not None:
            self.adc.set_tds(self.cfg.pins.tds_adc_channel, ppm, self.thermometer.temp_c, self.cfg.sensors.tds_k_value)

    def _drive(self, pin: int, active: bool) -> None:
        p = self.factory.pin(pin)
        if active == self.cfg.pins.sensors_active_high:
            p.drive_high()
        else:
            p.drive_low()

    def set_leak(self, wet: bool) -> None:
        self._drive(self.cfg.pins.leak_sensor, wet)

    def set_low_water(self, low: bool) -> None:
        self._drive(self.cfg.pins.low_water, low)

    def press_stop(self) -> None:
        """A press and release of the physical stop button (the pin goes low, then high)."""
        p = self.factory.pin(self.cfg.pins.stop_button)
        p.drive_low()
        p.drive_high()

    def hold_stop(self, pressed: bool) -> None:
        p = self.factory.pin(self.cfg.pins.stop_button)
        (p.drive_low if pressed else p.drive_high)()


def simulated_config(cfg: Config) -> Config:
    """The simulation is a fully equipped machine: a TDS probe and leak and low-water switches."""
    pins: dict[str, int] = {}
    if cfg.pins.leak_sensor < 0:
        pins["leak_sensor"] = SIM_LEAK_PIN
    if cfg.pins.low_water < 0:
        pins["low_water"] = SIM_LOW_WATER_PIN
    return cfg.replace(pins=pins, sensors={"tds_fitted": True})


def build(cfg: Config, *, post: Callable[[Event], None], on_stop_press: Callable[[], None],
          on_stop_long_press: Callable[[], None] | None = None, simulate: bool, sim_dir: Path | None = None,
          sim_seed: int | None = None) -> Hardware:
    """Create every device from the pin map. Raises :class:`HardwareError` with a clear message."""
    factory = make_pin_factory(cfg.hardware.pin_factory, simulate=simulate, lg_wd=cfg.data_dir)
    Device.pin_factory = factory        # nothing may fall back to another factory, not even software SPI
    pins = cfg.pins
    world: SimulatedWorld | None = None
    thermo_dir: Path | None = None
    adc_sim = None
    if simulate:
        sim_dir = Path(sim_dir or tempfile.mkdtemp(prefix="tapshare-sim-"))
        thermo_dir = sim_dir / "w1-devices"
        thermometer_files = SimThermometerFiles(thermo_dir)
        adc_sim = SimMcp3008(factory, vref=cfg.sensors.adc_vref) if cfg.sensors.tds_fitted else None
        water = WaterSimulator(factory, valve_pin=pins.valve, valve_active_high=pins.valve_active_high,
                               meter_pin=pins.flow_meter, pulses_per_litre=cfg.flow.pulses_per_litre, seed=sim_seed)
        world = SimulatedWorld(factory, water, thermometer_files, adc_sim, cfg)
    try:
        valve = GpioValve(pins.valve, active_high=pins.valve_active_high, pin_factory=factory)
        meter = GpioFlowMeter(pins.flow_meter, valve=valve, pin_factory=factory)
        stop = GpioStopButton(pins.stop_button, on_press=on_stop_press, on_long_press=on_stop_long_press,
                              debounce_ms=pins.stop_debounce_ms, long_press_ms=pins.stop_long_press_ms,
                              pin_factory=factory)
        switches: dict[str, GpioSwitch] = {}
        if pins.leak_sensor >= 0:
            switches["leak"] = GpioSwitch(pins.leak_sensor, on_change=lambda wet: post(LeakSensor(wet)),
                                          active_high=pins.sensors_active_high, pin_factory=factory)
        if pins.low_water >= 0:
            switches["low_water"] = GpioSwitch(pins.low_water, on_change=lambda low: post(LowWater(low)),
                                               active_high=pins.sensors_active_high, pin_factory=factory)
        tds, adc = None, None
        if cfg.sensors.tds_fitted:
            adc = Mcp3008Voltage(pins.tds_adc_channel, vref=cfg.sensors.adc_vref, pin_factory=factory)
            tds = TdsProbe(adc.voltage, k_value=cfg.sensors.tds_k_value)
    except HardwareError:
        raise
    except Exception as e:
        raise HardwareError(f"cannot set up the pins {pins}: {e}") from e
    if world is not None:
        world.set_tds(world.tds_ppm)
    thermometer = W1Thermometer(sensor_id=cfg.sensors.thermometer_id, sane_min_c=cfg.sensors.temp_sane_min_c,
                                sane_max_c=cfg.sensors.temp_sane_max_c, base_directory=thermo_dir)
    poller = SensorPoller(post, thermometer=thermometer, tds=tds, interval_ms=cfg.sensors.read_interval_ms)
    hw = Hardware(factory, valve, meter, stop, poller, switches, world, adc)
    # a sensor that is already triggered at boot must lock out at once
    for name, sw in switches.items():
        if sw.active:
            post(LeakSensor(True) if name == "leak" else LowWater(True))
    return hw


def simulated_dispenser(cfg: Config, clock, sim_dir: Path, *, sim_seed: int | None = None):
    """A whole simulated dispenser for tests and benchmarks: simulated hardware wired to a booted runtime
    exactly as main.py wires them (one event queue; the stop edge closes the valve then tells the core).
    Returns ``(hardware, runtime, boot_report)``; nothing is started yet."""
    from kiosk.runtime import boot
    events: queue.Queue = queue.Queue()
    holder: list = []
    hw = build(cfg, post=events.put, on_stop_press=lambda: holder[0].stop_pressed() if holder else None,
               simulate=True, sim_dir=sim_dir, sim_seed=sim_seed)
    rt, report = boot(cfg, hw.valve, hw.meter, clock, events=events)
    holder.append(rt)
    return hw, rt, report
