"""Pulse counting and valve-close latency of the hardware layer with the core and ledger running.

    .venv/bin/python bench/bench_hal.py [--seconds 3] [--presses 200]

Edges are driven from a separate thread at a real-time rate (not synchronously from the measuring
thread) while a session runs on the core thread and the ledger checkpoints to a real SQLite file.
Runs unchanged on a Pi (it uses gpiozero's mock pins, so it measures the CPU, not the wiring).
Reports pulses lost at 225 Hz, 1 kHz and 2 kHz; latency from a stop-button edge to the valve pin
going inactive (and from a StopPressed event through the core thread, for comparison); latency from
the pulse that reaches the credit limit to the valve pin going inactive.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import pct, wait_until
from hal.base import SystemClock
from hal.machine import simulated_config, simulated_dispenser
from kiosk.config import Config
from kiosk.events import Grant, GrantReceived, LinkChanged, ReceiptDismissed, State, StopPressed


class Rig:
    def __init__(self, folder: Path) -> None:
        # a high-resolution meter (20,000 pulses/l) so 2 kHz is a plausible 6 l/min for the core
        self.cfg = simulated_config(Config().replace(
            paths={"data_dir": str(folder)}, flow={"pulses_per_litre": 20_000.0, "overrun_window_ms": 50},
            limits={"max_idle_ms": 120_000, "max_duration_ms": 600_000}, screen={"receipt_display_ms": 1_000}))
        self.clock = SystemClock()
        self.hw, self.rt, _ = simulated_dispenser(self.cfg, self.clock, folder / "sim")
        self.pin = self.hw.factory.pin(self.cfg.pins.flow_meter)
        self.pin_stop = self.hw.factory.pin(self.cfg.pins.stop_button)
        self.closed_at: float | None = None
        self.hw.valve.on_change(self._valve_changed)
        self.n = 0
        threading.Thread(target=self.rt.run, daemon=True).start()
        self.hw.sensors.start()              # the sensor thread runs too (no water simulator: we drive edges)
        self.rt.post(LinkChanged(True))

    def _valve_changed(self, is_open: bool) -> None:
        if not is_open:
            self.closed_at = time.perf_counter()

    def wait(self, pred, timeout=10.0) -> bool:
        return wait_until(pred, timeout)

    def start_session(self, credit_fen: int = 100_000, price: int = 200) -> str:
        self.wait(lambda: self.rt.snapshot.state in (State.IDLE, State.RECEIPT))
        self.n += 1
        sid = f"bench-{self.n}"
        self.closed_at = None
        self.rt.post(GrantReceived(Grant(sid, self.cfg.machine.id, "bench", price, credit_fen, 50_000, 600_000,
                                         120_000, self.clock.monotonic_ms() + 30_000)))
        if not self.wait(lambda: self.hw.valve.is_open):
            raise RuntimeError(f"session {sid} did not open the valve: {self.rt.snapshot}")
        return sid

    def end_session(self) -> None:
        if self.hw.valve.is_open:
            self.rt.post(StopPressed())
        self.wait(lambda: self.rt.snapshot.state is State.RECEIPT)
        self.rt.post(ReceiptDismissed())

    def pulse(self) -> None:
        self.pin.drive_low()
        self.pin.drive_high()

    def drive(self, rate_hz: float, seconds: float) -> tuple[int, float]:
        """Pulses at ``rate_hz`` from this (driver) thread, on a real-time schedule."""
        n = int(rate_hz * seconds)
        period = 1.0 / rate_hz
        t0 = time.perf_counter()
        for i in range(n):
            target = t0 + i * period
            while True:
                now = time.perf_counter()
                if now >= target:
                    break
                if target - now > 0.0005:
                    time.sleep(target - now - 0.0003)
            self.pulse()
        return n, time.perf_counter() - t0


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--presses", type=int, default=200)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        rig = Rig(Path(d))
        lost_total = 0
        for rate in (225, 1_000, 2_000):
            rig.start_session()
            meter_before = rig.hw.meter.total_pulses()
            result: dict = {}

            def run_driver(r: float = rate, out: dict = result) -> None:
                out["sent"], out["s"] = rig.drive(r, args.seconds)

            driver = threading.Thread(target=run_driver)
            driver.start()
            driver.join()
            counted = rig.hw.meter.total_pulses() - meter_before
            rig.wait(lambda c=counted: rig.rt.core.session_billed_pulses >= c, 2)
            billed = rig.rt.core.session_billed_pulses
            rig.end_session()
            lost = result["sent"] - counted
            lost_total += lost
            print(f"{rate:>5} Hz: sent {result['sent']:>5} in {result['s']:.2f} s "
                  f"({result['sent'] / result['s']:,.0f}/s achieved), counted {counted}, lost {lost}, "
                  f"billed by the core {billed}")
        cps = len(rig.rt.ledger.checkpoints(f"bench-{rig.n}"))
        print(f"        ledger checkpoints during the 2 kHz session: {cps}")

        def measure(press) -> list[float]:
            lat = []
            for _ in range(args.presses):
                rig.start_session()
                for _ in range(20):
                    rig.pulse()
                time.sleep(0.02)
                t0 = time.perf_counter()
                press()
                rig.wait(lambda: rig.closed_at is not None, 5)
                lat.append((rig.closed_at - t0) * 1000)
                rig.end_session()
            return lat

        button = measure(lambda: (rig.pin_stop.drive_low(), rig.pin_stop.drive_high()))
        core = measure(lambda: rig.rt.post(StopPressed()))
        print(f"stop button edge -> valve pin inactive: p50 {pct(button, .5):.3f} ms, p99 {pct(button, .99):.3f} ms "
              f"(n={len(button)})")
        print(f"StopPressed via the core thread -> valve pin inactive: p50 {pct(core, .5):.3f} ms, "
              f"p99 {pct(core, .99):.3f} ms")
        limit_lat = []
        for _ in range(args.presses):
            rig.start_session(credit_fen=5, price=200)        # 5 fen of credit: 25 ml, 500 pulses at 20,000/l
            limit = rig.hw.meter.armed_limit
            rig.drive(2_000, (limit - 1 - rig.hw.meter.total_pulses()) / 2_000)     # paced: 6 l/min
            while rig.hw.meter.total_pulses() < limit - 1:
                time.sleep(0.0005)
                rig.pulse()
            time.sleep(0.0005)
            t0 = time.perf_counter()
            rig.pulse()                                      # the pulse that reaches the credit limit
            rig.wait(lambda: rig.closed_at is not None, 5)
            limit_lat.append((rig.closed_at - t0) * 1000)
            rig.end_session()
        print(f"credit-limit pulse -> valve pin inactive: p50 {pct(limit_lat, .5):.3f} ms, "
              f"p99 {pct(limit_lat, .99):.3f} ms; mean {statistics.mean(limit_lat):.3f} ms")
        rig.rt.request_stop()
        rig.rt.wait_stopped(5)
        rig.hw.close()
        rig.rt.ledger.close()
    return 1 if lost_total else 0


if __name__ == "__main__":
    sys.exit(main())
