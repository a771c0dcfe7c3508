"""Simulated people at a simulated machine: grants, pours, stop presses, cancels and walk-aways.

Used by ``python main.py --simulate --headless`` (and by the crash test and benchmarks). It talks to
the runtime only the way real parts do: it posts events and reads the published snapshot.
"""

from __future__ import annotations

import logging
import random
import threading
import time
import uuid
from collections.abc import Callable

from hal.machine import SimulatedWorld
from kiosk.events import CancelReceived, Grant, GrantReceived, LinkChanged, ReceiptDismissed, State
from kiosk.ports import Clock
from kiosk.runtime import Runtime

log = logging.getLogger("tapshare.sim_users")

SCENARIOS = ("stop_button", "stop_button", "stop_button", "credit", "walk_away", "cancel")


class SimulatedUsers(threading.Thread):
    """Plays ``sessions`` sessions (0: until stopped), then asks the runtime to stop."""

    def __init__(self, runtime: Runtime, world: SimulatedWorld, clock: Clock, *, sessions: int = 0,
                 seed: int | None = None,
                 pour_ms: tuple[int, int] = (1_500, 6_000), flow_ml_per_min: tuple[int, int] = (4_000, 8_000),
                 pause_ms: tuple[int, int] = (500, 2_000), stop_when_done: bool = True,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        super().__init__(name="simulated-users", daemon=True)
        self.rt, self.world, self.clock = runtime, world, clock
        self.sessions, self.pour_ms, self.flow, self.pause_ms = sessions, pour_ms, flow_ml_per_min, pause_ms
        self.rng = random.Random(seed)
        self.stop_when_done = stop_when_done
        self._sleep = sleep
        self._halt = threading.Event()
        self.completed = 0

    def halt(self) -> None:
        self._halt.set()

    def _wait_for(self, pred: Callable[[], bool], timeout_ms: int) -> bool:
        deadline = time.monotonic() + timeout_ms / 1000
        while not self._halt.is_set() and time.monotonic() < deadline:
            if pred():
                return True
            self._sleep(0.005)
        return pred()

    def run(self) -> None:
        self.rt.post(LinkChanged(True))
        while not self._halt.is_set() and (self.sessions == 0 or self.completed < self.sessions):
            if not self._wait_for(lambda: self.rt.snapshot.state in (State.IDLE, State.RECEIPT), 60_000):
                log.warning("machine not ready (%s); simulated users give up", self.rt.snapshot.state.value)
                break
            if self._one_session():
                self.completed += 1
            self._sleep(self.rng.uniform(*self.pause_ms) / 1000)
            self.rt.post(ReceiptDismissed())
        if self.stop_when_done:
            self.rt.request_stop("simulation finished")

    def _one_session(self) -> bool:
        cfg = self.rt.cfg
        scenario = self.rng.choice(SCENARIOS)
        price = self.rt.snapshot.display_price_fen_per_l     # the price on the screen is the price charged
        credit = self.rng.randint(5, 40) if scenario == "credit" else self.rng.randint(200, 2_000)
        sid = "sim-" + uuid.uuid4().hex[:12]
        self.world.water.set_flow(self.rng.uniform(*self.flow))
        temp = self.world.thermometer.temp_c + self.rng.uniform(-0.3, 0.3)
        self.world.thermometer.set(min(20.0, max(8.0, temp)))    # the tank drifts a little
        grant = Grant(session_id=sid, machine_id=cfg.machine.id, user_ref="sim-user",
                      price_fen_per_l=price, credit_limit_fen=credit, max_volume_ml=cfg.limits.max_volume_ml,
                      max_duration_ms=cfg.limits.max_duration_ms, max_idle_ms=cfg.limits.max_idle_ms,
                      expires_at_ms=self.clock.monotonic_ms() + 30_000)
        log.info("simulated user scans: session %s, %s, %d fen/L, credit %d fen", sid, scenario, price, credit)
        self.rt.post(GrantReceived(grant))
        if not self._wait_for(lambda: self.rt.snapshot.session_id == sid, 5_000):
            log.warning("session %s did not start (%s)", sid, self.rt.snapshot.last_rejection)
            return False
        pour_s = self.rng.uniform(*self.pour_ms) / 1000
        if scenario == "stop_button":
            self._sleep(pour_s)
            self.world.press_stop()          # the physical button: gpiozero edge, debounce, valve closes
        elif scenario == "cancel":
            self._sleep(pour_s)
            self.rt.post(CancelReceived(sid, "simulated cancel"))
        elif scenario == "walk_away":
            self._sleep(pour_s)
            self.world.water.set_flow(0)      # cup taken away: no flow, the idle timer closes the valve
        self._wait_for(lambda: self.rt.snapshot.session_id != sid or self.rt.snapshot.state is State.RECEIPT,
                       cfg.limits.max_duration_ms + 10_000)
        self._wait_for(lambda: self.rt.snapshot.state is not State.SETTLING, 10_000)
        return True
