"""A small harness that drives the pure core with explicit time, for table-driven tests."""

from __future__ import annotations

from dataclasses import replace

from contract.billing import Calibration
from kiosk.events import (
    Action,
    CloseValve,
    Event,
    Grant,
    GrantReceived,
    LinkChanged,
    OpenValve,
    PriceChanged,
    PulseCount,
    SessionEnded,
    Tick,
)
from kiosk.session import CoreSettings, DispenserCore

SETTINGS = CoreSettings(
    machine_id="M1", calibration=Calibration(450_000), max_volume_ml=5_000, max_duration_ms=300_000,
    max_idle_ms=15_000, max_credit_fen=10_000, min_dispense_ml=10, overrun_window_ms=1_000,
    checkpoint_interval_ms=250, max_flow_ml_per_min=10_000, ghost_volume_ml=50, ghost_window_ms=600_000,
    receipt_display_ms=15_000, display_price_fen_per_l=200)


def grant(session_id: str = "s1", **kw) -> Grant:
    base = dict(session_id=session_id, machine_id="M1", user_ref="u1", price_fen_per_l=200, credit_limit_fen=1_000,
                max_volume_ml=5_000, max_duration_ms=300_000, max_idle_ms=15_000, expires_at_ms=10**12)
    base.update(kw)
    return Grant(**base)


class Harness:
    def __init__(self, online: bool = True, lockouts: dict[str, str] | None = None, **settings) -> None:
        self.core = DispenserCore(replace(SETTINGS, **settings), lockouts=lockouts)
        self.t = 1_000
        self.total = 0
        self.log: list[Action] = []
        self.send(PulseCount(0))
        if online:
            self.send(LinkChanged(True))

    @property
    def state(self) -> str:
        return self.core.state.value

    def send(self, event: Event, dt: int = 0) -> list[Action]:
        self.t += dt
        price = event.grant.price_fen_per_l if isinstance(event, GrantReceived) else None
        if isinstance(price, int) and price >= 0 and price != self.core.display_price_fen_per_l:
            # as in the field: the cloud sets the machine's price (shown) before it grants at that price
            self.log += self.core.handle(PriceChanged(price), self.t)
        actions = self.core.handle(event, self.t)
        self.log += actions
        return actions

    def pour(self, pulses: int, dt: int | None = None) -> list[Action]:
        """``pulses`` new pulses arriving ``dt`` ms after the previous sample (by default at a
        plausible 40 pulses/s, about 5.3 l/min)."""
        self.total += pulses
        return self.send(PulseCount(self.total), max(20, pulses * 25) if dt is None else dt)

    def flow(self, seconds: float, pulses_per_s: int = 40, step_ms: int = 50) -> list[Action]:
        """Steady flow (40 pulses/s is about 5.3 l/min) with a tick every step."""
        out: list[Action] = []
        for _ in range(int(seconds * 1000 / step_ms)):
            out += self.pour(pulses_per_s * step_ms // 1000, step_ms)
            out += self.send(Tick())
        return out

    def tick(self, dt: int) -> list[Action]:
        return self.send(Tick(), dt)

    def start(self, **kw) -> list[Action]:
        return self.send(GrantReceived(grant(**kw)))

    def ended(self) -> list[SessionEnded]:
        return [a for a in self.log if isinstance(a, SessionEnded)]

    def valve_commands(self) -> list[str]:
        return ["open" if isinstance(a, OpenValve) else "close" for a in self.log
                if isinstance(a, OpenValve | CloseValve)]
