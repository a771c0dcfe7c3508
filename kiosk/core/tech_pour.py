"""Technicians' pours and the meter's calibration (:class:`TechnicianPour`)."""

from __future__ import annotations

from dataclasses import dataclass

from contract.billing import Calibration
from contract.events import EventKind
from kiosk.calibration import MAX_MPPL, MIN_MPPL
from kiosk.core.maintenance_mode import MaintenanceMode
from kiosk.core.meter import PulseMeter
from kiosk.core.settings import CoreSettings
from kiosk.events import (
    TECH_PURPOSES,
    Action,
    CloseValve,
    OpenValve,
    RecordEvent,
    SaveCalibration,
    SetCalibration,
    TechPour,
    TechPourResult,
)


@dataclass
class _Pour:
    """One technician's pour, from the valve opening until its overrun window has passed."""

    purpose: str
    actor: str
    started_ms: int
    target_pulses: int
    target_reason: str                    # why reaching target_pulses closes: target or max_volume
    max_ms: int
    milli_pulses_per_litre: int
    pulses: int = 0
    overrun_pulses: int = 0
    closed_ms: int | None = None
    reason: str = ""


class TechnicianPour:
    """A technician's pour in maintenance mode (a flush, a valve test, a calibration pour): metered and logged,
    never billed and never ghost flow. It closes at its target volume (at most ``tech_max_ml``), at its time
    limit (at most ``tech_max_ms``), on the stop button, on leaving maintenance and on any fault; pulses within
    ``overrun_window_ms`` of the close still count. Also checks and applies a new meter calibration, which only a
    technician sets, and only while no water flows."""

    def __init__(self, settings: CoreSettings, meter: PulseMeter, maintenance: MaintenanceMode) -> None:
        self.settings = settings
        self.current: _Pour | None = None
        self.last: TechPourResult | None = None      # the last pour's result, shown on the maintenance screen
        self._count = 0                               # pour number n opens the valve as session "tech-n"
        self._meter = meter
        self._maintenance = maintenance

    @property
    def pouring(self) -> bool:
        """The valve is open for a technician's pour."""
        return self.current is not None and self.current.closed_ms is None

    def start(self, ev: TechPour, now_ms: int, *, session_running: bool, leak_sensor_wet: bool) -> list[Action]:
        why = self._refusal(ev, session_running=session_running, leak_sensor_wet=leak_sensor_wet)
        if why is not None:
            return [RecordEvent.of(EventKind.TECH_POUR_REFUSED, purpose=ev.purpose, actor=ev.actor, why=why)]
        st = self.settings
        cal = st.calibration
        target_pulses = cal.max_pulses_for_volume(ev.target_ml if ev.target_ml is not None else st.tech_max_ml)
        self._count += 1
        self._maintenance.touch(now_ms)
        self.current = _Pour(purpose=ev.purpose, actor=ev.actor, started_ms=now_ms, target_pulses=target_pulses,
                             target_reason="target" if ev.target_ml is not None else "max_volume",
                             max_ms=min(ev.max_ms, st.tech_max_ms), milli_pulses_per_litre=cal.milli_pulses_per_litre)
        info = {"purpose": ev.purpose, "actor": ev.actor, "target_ml": ev.target_ml, "max_ms": self.current.max_ms}
        return [RecordEvent.of(EventKind.TECH_POUR_STARTED, **info, required=True),   # on disk before the valve opens
                OpenValve(f"tech-{self._count}", close_at_total_pulses=self._meter.close_at(target_pulses))]

    def _refusal(self, ev: TechPour, *, session_running: bool, leak_sensor_wet: bool) -> str | None:
        tech_max_ml = self.settings.tech_max_ml
        if not self._maintenance.active:
            return "the machine is not in maintenance mode"
        if session_running:
            return "a session is running"
        if self.current is not None:
            return "a pour is already running"
        if leak_sensor_wet:
            return "the leak sensor is wet: inspect and clear it first"
        if ev.purpose not in TECH_PURPOSES:
            return f"unknown purpose {ev.purpose!r}"
        if ev.target_ml is not None and not 1 <= ev.target_ml <= tech_max_ml:
            return f"the target must be 1 to {tech_max_ml} ml"
        if ev.max_ms <= 0:
            return "the time limit must be positive"
        return None

    def on_pulses(self, pulses: int, now_ms: int) -> list[Action]:
        p = self.current
        assert p is not None
        if p.closed_ms is not None:
            p.overrun_pulses += pulses
            return []
        p.pulses += pulses
        if p.pulses >= p.target_pulses:
            return self.close(p.target_reason, now_ms)
        return []

    def on_tick(self, now_ms: int) -> list[Action]:
        p = self.current
        if p is not None and p.closed_ms is None and now_ms - p.started_ms >= p.max_ms:
            return self.close("max_time", now_ms)
        if p is not None and p.closed_ms is not None and now_ms - p.closed_ms >= self.settings.overrun_window_ms:
            return self.finish(now_ms)
        return []

    def stop(self, now_ms: int) -> list[Action]:
        return self.close("stopped", now_ms) if self.pouring else []

    def close(self, reason: str, now_ms: int) -> list[Action]:
        """Close the valve; the pour is finished once its overrun window has passed (at once without one)."""
        p = self.current
        assert p is not None and p.closed_ms is None
        p.closed_ms, p.reason = now_ms, reason
        actions: list[Action] = [CloseValve(f"technician's pour: {reason}")]
        if self.settings.overrun_window_ms == 0:
            actions += self.finish(now_ms)
        return actions

    def finish(self, now_ms: int) -> list[Action]:
        """Log the closed pour with everything the meter counted, and keep its result for the screen."""
        p = self.current
        assert p is not None and p.closed_ms is not None
        pulses = p.pulses + p.overrun_pulses
        self.last = TechPourResult(purpose=p.purpose, pulses=pulses,
                                   volume_ml=self.settings.calibration.volume_ml(pulses),
                                   duration_ms=p.closed_ms - p.started_ms, reason=p.reason)
        self.current = None
        self._maintenance.touch(now_ms)
        return [RecordEvent.of(EventKind.TECH_POUR, purpose=p.purpose, actor=p.actor, pulses=pulses,
                               overrun_pulses=p.overrun_pulses, volume_ml=self.last.volume_ml,
                               duration_ms=self.last.duration_ms, reason=p.reason,
                               milli_pulses_per_litre=p.milli_pulses_per_litre, billed=False)]

    def end_for_exit(self, now_ms: int) -> list[Action]:
        """The technician leaves maintenance: a pour still open closes, and the pour is finished now."""
        if self.current is None:
            return []
        actions = self.close("exit", now_ms) if self.current.closed_ms is None else []
        # closing finishes the pour at once when there is no overrun window
        return actions + (self.finish(now_ms) if self.current is not None else [])

    def shutdown(self, now_ms: int) -> list[Action]:
        """Finish the pour now (the core closes the valve for the shutdown itself)."""
        p = self.current
        if p is None:
            return []
        if p.closed_ms is None:
            p.closed_ms, p.reason = now_ms, "shutdown"
        return self.finish(now_ms)

    def start_failed(self, session_id: str) -> None:
        """The pour's log row could not be written, so its valve never opened."""
        p = self.current
        if p is not None and session_id == f"tech-{self._count}":
            self.current = None
            self.last = TechPourResult(purpose=p.purpose, pulses=0, volume_ml=0, duration_ms=0, reason="not_started")

    def calibrate(self, ev: SetCalibration, now_ms: int, *,
                  session_present: bool) -> tuple[list[Action], Calibration | None]:
        """Check a new calibration: the actions, and the calibration to use from now on (None: refused)."""
        old = self.settings.calibration.milli_pulses_per_litre
        mppl = ev.milli_pulses_per_litre
        why = None
        if not self._maintenance.active:
            why = "the machine is not in maintenance mode"
        elif session_present or self.current is not None:
            why = "water is flowing"
        elif not MIN_MPPL <= mppl <= MAX_MPPL:
            why = f"{mppl} milli-pulses per litre is outside any real meter's range"
        if why is not None:
            return [RecordEvent.of(EventKind.CALIBRATION_REFUSED, actor=ev.actor, why=why)], None
        self._maintenance.touch(now_ms)
        return [SaveCalibration(mppl),
                RecordEvent.of(EventKind.CALIBRATION_CHANGED, **{"from": old, "to": mppl},
                               actor=ev.actor, pours=[list(p) for p in ev.pours])], Calibration(mppl)

    def snapshot_fields(self, now_ms: int) -> dict[str, object]:
        """The technician's pour as the screen shows it (fields of :class:`~kiosk.session.Snapshot`)."""
        fields: dict[str, object] = {"tech_last": self.last}
        p = self.current
        if p is not None:
            end_ms = p.closed_ms if p.closed_ms is not None else now_ms
            fields.update(tech_active=p.closed_ms is None, tech_purpose=p.purpose, tech_pulses=p.pulses,
                          tech_volume_ml=self.settings.calibration.volume_ml(p.pulses),
                          tech_elapsed_ms=max(0, end_ms - p.started_ms))
        return fields
