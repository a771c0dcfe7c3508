"""The hardware layer on gpiozero's MockFactory and a fake /sys/bus/w1/devices tree."""

import logging
import threading
import time

import pytest
from gpiozero import Device
from hypothesis import given, settings
from hypothesis import strategies as st

from hal.gpio import GpioFlowMeter, GpioStopButton, GpioSwitch, GpioValve, Mcp3008Voltage
from hal.machine import HardwareError, make_pin_factory
from hal.sensors import SensorPoller, TdsProbe, W1Thermometer, tds_ppm_from_voltage
from hal.sim import SimMcp3008, SimThermometerFiles, mock_factory
from kiosk.events import TemperatureReading, WaterQualityReading

# ---------------------------------------------------------------- valve

@pytest.mark.parametrize("active_high", [True, False])
def test_the_valve_starts_closed_and_closes_to_the_configured_inactive_level(factory, active_high):
    v = GpioValve(17, active_high=active_high, pin_factory=factory)
    pin = factory.pin(17)
    inactive = 0 if active_high else 1
    assert not v.is_open and pin.state == inactive and v.inactive_level == inactive
    v.open()
    assert v.is_open and pin.state == 1 - inactive
    v.close()
    assert not v.is_open and pin.state == inactive
    assert v.transitions == 2


def test_valve_close_falls_back_to_the_raw_pin_if_gpiozero_fails(factory, caplog):
    v = GpioValve(17, active_high=False, pin_factory=factory)
    v.open()

    def broken():
        raise RuntimeError("simulated driver failure")

    v._dev.off = broken
    v.close()
    assert factory.pin(17).state == 1          # active-low board: inactive is high
    assert "writing the inactive level" in caplog.text


def test_valve_off_entry_point_shares_the_close_logic(factory):
    from hal.valve_off import drive_inactive
    from kiosk.config import Config
    cfg = Config().replace(pins={"valve": 23, "valve_active_high": False})
    factory.pin(23).function = "output"
    factory.pin(23).state = 0                  # the relay was energised when the app died
    drive_inactive(cfg, factory)
    assert factory.pin(23).state == 1


def test_valve_off_on_a_machine_without_gpio_says_why(tmp_path):
    import subprocess
    import sys
    out = subprocess.run([sys.executable, "-m", "hal.valve_off"], capture_output=True, text=True, timeout=30)
    assert out.returncode == 1
    assert "cannot drive the valve pin" in out.stderr and "pin factory lgpio" in out.stderr


# ---------------------------------------------------------------- flow meter

def test_the_meter_counts_falling_edges(factory):
    v = GpioValve(17, active_high=True, pin_factory=factory)
    m = GpioFlowMeter(27, valve=v, pin_factory=factory)
    pin = factory.pin(27)
    for _ in range(25):
        pin.drive_low()
        pin.drive_high()
    assert m.total_pulses() == 25
    assert m.pulses_per_s() == 25.0


def test_the_meter_closes_the_valve_on_the_limit_pulse(factory):
    v = GpioValve(17, active_high=True, pin_factory=factory)
    m = GpioFlowMeter(27, valve=v, pin_factory=factory)
    pin = factory.pin(27)
    v.open()
    m.arm_limit(10)
    for i in range(1, 13):
        pin.drive_low()
        pin.drive_high()
        assert v.is_open == (i < 10), i        # closed in the callback of the 10th pulse
    assert m.limit_closes == 1 and m.total_pulses() == 12


def test_arming_a_limit_already_reached_closes_at_once(factory):
    v = GpioValve(17, active_high=True, pin_factory=factory)
    m = GpioFlowMeter(27, valve=v, pin_factory=factory)
    factory.pin(27).drive_low()
    v.open()
    m.arm_limit(1)
    assert not v.is_open


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(min_value=0, max_value=300), min_size=1, max_size=4))
def test_counted_pulses_equal_generated_pulses_from_concurrent_threads(bursts):
    f = mock_factory()
    Device.pin_factory = f
    try:
        v = GpioValve(17, active_high=True, pin_factory=f)
        m = GpioFlowMeter(27, valve=v, pin_factory=f)
        pin = f.pin(27)
        lock = threading.Lock()        # one wire: edges are serialised, callbacks race with readers

        def drive(n):
            for _ in range(n):
                with lock:
                    pin.drive_low()
                    pin.drive_high()

        readers_done = threading.Event()

        def read():
            while not readers_done.is_set():
                m.total_pulses()
                m.pulses_per_s()
                time.sleep(0)          # yield the GIL: a spinning reader must not starve the drivers

        r = threading.Thread(target=read)
        r.start()
        threads = [threading.Thread(target=drive, args=(n,)) for n in bursts]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        readers_done.set()
        r.join()
        assert m.total_pulses() == sum(bursts)
    finally:
        f.reset()


# ---------------------------------------------------------------- stop button, switches

def test_stop_button_presses_are_debounced(factory):
    presses = []
    clock = [100.0]
    b = GpioStopButton(22, on_press=lambda: presses.append(clock[0]), pin_factory=factory, debounce_ms=30,
                       clock=lambda: clock[0])
    pin = factory.pin(22)
    for dt in (0.0, 0.005, 0.010, 0.200):       # contact bounce, then a real second press
        clock[0] += dt
        pin.drive_low()
        pin.drive_high()
    assert len(presses) == 2 and b.bounces_ignored == 2


def test_a_long_press_is_reported(factory):
    held = threading.Event()
    GpioStopButton(22, on_press=lambda: None, on_long_press=held.set, long_press_ms=500, pin_factory=factory)
    pin = factory.pin(22)
    pin.drive_low()
    assert held.wait(3)
    pin.drive_high()


@pytest.mark.parametrize("active_high", [False, True])
def test_switch_inputs_report_both_ways(factory, active_high):
    seen = []
    sw = GpioSwitch(5, on_change=seen.append, active_high=active_high, pin_factory=factory)
    pin = factory.pin(5)
    assert not sw.active
    (pin.drive_high if active_high else pin.drive_low)()
    (pin.drive_low if active_high else pin.drive_high)()
    assert seen == [True, False]


# ---------------------------------------------------------------- thermometer

def test_thermometer_reads_and_turns_every_fault_into_unknown(tmp_path, caplog):
    files = SimThermometerFiles(tmp_path)
    t = W1Thermometer(base_directory=tmp_path)
    files.set(14.3)
    assert t.read() == pytest.approx(14.3125)        # 1/16 C resolution
    caplog.set_level(logging.WARNING)
    for fault in (files.crc_error, files.reset_value, files.unplug):
        fault()
        assert t.read() is None
    files.set(40.0)
    assert t.read() == 40.0
    files.set(71.0)                                  # outside the sane range: a sensor fault
    assert t.read() is None
    assert "outside the sane range" in t.latch.fault
    files.set(12.0)
    assert t.read() == 12.0
    msgs = [r.getMessage() for r in caplog.records]
    assert sum("reading unknown" in m for m in msgs) == 2      # once per fault episode
    assert sum("recovered" in m for m in msgs) == 2


def test_thermometer_without_any_sensor(tmp_path):
    t = W1Thermometer(base_directory=tmp_path)
    assert t.read() is None and "no DS18B20" in t.latch.fault


def test_thermometer_picks_the_configured_sensor(tmp_path):
    SimThermometerFiles(tmp_path, sensor_id="000000000001").set(10.0)
    SimThermometerFiles(tmp_path, sensor_id="000000000002").set(20.0)
    assert W1Thermometer(sensor_id="000000000002", base_directory=tmp_path).read() == 20.0


# ---------------------------------------------------------------- water quality

def test_tds_curve_and_temperature_compensation():
    assert tds_ppm_from_voltage(0.0, 25.0) == 0
    assert 360 <= tds_ppm_from_voltage(1.0, 25.0) <= 370
    # warmer water conducts better: the same voltage means less dissolved solids
    assert tds_ppm_from_voltage(1.0, 35.0) < tds_ppm_from_voltage(1.0, 25.0) < tds_ppm_from_voltage(1.0, 10.0)
    assert tds_ppm_from_voltage(1.0, None) == tds_ppm_from_voltage(1.0, 25.0)


def test_tds_through_a_real_mcp3008_conversation(factory):
    adc = SimMcp3008(factory)
    v = Mcp3008Voltage(3, vref=3.3, pin_factory=factory)
    adc.volts[3] = 1.65
    assert v.voltage() == pytest.approx(1.65, abs=3.3 / 1023)
    adc.set_tds(3, 420, 18.0)
    assert abs(TdsProbe(v.voltage).read(18.0) - 420) <= 2


def test_tds_probe_faults_are_unknown():
    assert TdsProbe(lambda: 3.1).read(20.0) is None           # beyond the probe's range: disconnected?

    def broken():
        raise OSError("SPI bus error")

    p = TdsProbe(broken)
    assert p.read(20.0) is None and "SPI bus error" in p.latch.fault


def test_sensor_poller_posts_readings_and_not_measured(tmp_path):
    SimThermometerFiles(tmp_path).set(11.0)
    posted = []
    SensorPoller(posted.append, thermometer=W1Thermometer(base_directory=tmp_path), tds=None,
                 interval_ms=1_000).poll_once()
    assert posted == [TemperatureReading(11.0), WaterQualityReading(None, measured=False)]
    posted.clear()
    SensorPoller(posted.append, thermometer=None, tds=TdsProbe(lambda: 0.5), interval_ms=1_000).poll_once()
    assert posted[0] == TemperatureReading(None) and posted[1].measured and posted[1].tds_ppm > 0


# ---------------------------------------------------------------- pin factory

def test_a_desktop_without_gpio_gets_a_clear_error():
    with pytest.raises(HardwareError, match="pin factory lgpio"):
        make_pin_factory("lgpio", simulate=False)


def test_a_mock_pin_factory_is_refused_on_a_real_machine(monkeypatch):
    monkeypatch.setenv("GPIOZERO_PIN_FACTORY", "mock")
    with pytest.raises(HardwareError, match="never run on simulated"):
        make_pin_factory("lgpio", simulate=False)


def test_lgpio_gets_a_writable_working_directory(monkeypatch, tmp_path):
    monkeypatch.delenv("LG_WD", raising=False)
    with pytest.raises(HardwareError):
        make_pin_factory("lgpio", simulate=False, lg_wd=tmp_path)
    import os
    assert os.environ["LG_WD"] == str(tmp_path)


def test_rpigpio_is_never_imported_unless_asked_for():
    import subprocess
    import sys
    code = "import sys, main, hal.machine, hal.gpio, hal.sim; print('RPi' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30)
    assert out.stdout.strip() == "False"


def test_water_simulator_follows_the_valve(factory):
    from hal.sim import WaterSimulator
    v = GpioValve(17, active_high=True, pin_factory=factory)
    m = GpioFlowMeter(27, valve=v, pin_factory=factory)
    w = WaterSimulator(factory, valve_pin=17, valve_active_high=True, meter_pin=27, flow_ml_per_min=6_000,
                       noise=0.0, overrun_pulses=2)
    w.step(1.0)
    assert m.total_pulses() == 0                  # closed: nothing flows
    v.open()
    w.step(1.0)
    assert m.total_pulses() == 45                 # 6 l/min = 100 ml/s = 45 pulses at 450/l
    v.close()
    w.step(0.01)
    w.step(0.01)
    assert m.total_pulses() == 47                 # two overrun pulses
    w.set_ghost_flow(600)
    w.step(1.0)
    assert m.total_pulses() == 51                 # a stuck valve: 10 ml/s
    time.sleep(0)
