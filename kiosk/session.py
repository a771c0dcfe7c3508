"""The dispensing core: a pure state machine that decides when water flows and what it costs.

No Kivy, gpiozero, requests, sqlite or clock reads here. :meth:`DispenserCore.handle` takes one event
(:mod:`kiosk.events`) and the monotonic time ``now_ms`` at which the core thread took it, and returns
the actions to carry out, in order. The UI reads :meth:`DispenserCore.snapshot`.

The core is composed of small parts (:mod:`kiosk.core`), each owning its piece of state: the lockouts, the
condition alarms, the pulse meter, the ghost-flow detector, the customer's session, the technician's pour and
maintenance mode. :class:`DispenserCore` hands each event to the parts it concerns, in a fixed order, and
merges their actions; what involves several parts at once (stopping the water on a fault or a leak, the
shutdown, the machine's own reasons to refuse a grant) is decided here.

Safety rules, all enforced here and covered by table-driven tests:

* The valve opens only for a valid, unexpired, unused grant for *this* machine, clamped to the machine's
  hard limits, and only after the session row is written (``SessionStarted`` precedes ``OpenValve``).
* It closes on the stop button, on the pulse that reaches the credit or volume limit (never billing
  beyond credit), at the maximum duration, after ``max_idle_ms`` without flow, on a cloud cancel, on
  any fault, on a leak, and on shutdown. Every end carries an :class:`~kiosk.events.EndReason`.
* Pulses within ``overrun_window_ms`` of a close are overrun (recorded, not billed). Pulses while the
  valve is closed outside that window are ghost flow: never billed; more than ``ghost_volume_ml``
  within ``ghost_window_ms`` locks the machine out of service (leak alarm).
* A reading faster than the plumbing can flow, or a counter that goes backwards, is a meter fault.
* A software update switches releases (a restart) only under a hold the core grants when it is idle, in the
  same step that makes it refuse every start and technician until the restart (:class:`BeginUpdate`).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, replace

from contract.events import EventKind
from kiosk.core.alarms import ConditionAlarms
from kiosk.core.customer import CustomerSession
from kiosk.core.ghost import GhostFlowDetector
from kiosk.core.lockouts import Lockouts
from kiosk.core.maintenance_mode import MaintenanceMode
from kiosk.core.meter import PulseMeter
from kiosk.core.settings import CoreSettings
from kiosk.core.tech_pour import TechnicianPour
from kiosk.core.update_hold import UpdateHold
from kiosk.events import (
    LOCKOUT_GHOST_FLOW,
    LOCKOUT_LEAK_SENSOR,
    LOCKOUT_REMOTE,
    Action,
    BeginUpdate,
    CancelReceived,
    ClearLockout,
    CloseValve,
    EndReason,
    EndUpdate,
    EnterMaintenance,
    Event,
    ExitMaintenance,
    Fault,
    GrantReceived,
    LeakSensor,
    LinkChanged,
    LowWater,
    MachineSettings,
    MaintenanceActivity,
    PriceChanged,
    PulseCount,
    ReceiptDismissed,
    RecordEvent,
    SessionRecord,
    SessionStartFailed,
    SetCalibration,
    SetOutOfService,
    Shutdown,
    State,
    StopPressed,
    TechPour,
    TechPourResult,
    TechStop,
    TemperatureReading,
    Tick,
    WaterQualityReading,
    fault_lockout,
)

__all__ = ["CoreSettings", "DispenserCore", "Snapshot"]


@dataclass(frozen=True)
class Snapshot:
    """What the screen shows; immutable, safe to hand to another thread."""

    state: State
    machine_id: str
    online: bool
    lockouts: tuple[str, ...]
    temp_c: float | None
    display_price_fen_per_l: int
    tds_ppm: int | None = None
    tds_measured: bool = False
    tds_limit_ppm: int = 500
    session_id: str | None = None
    price_fen_per_l: int = 0
    volume_ml: int = 0
    volume_ul: int = 0
    cost_fen: int = 0
    credit_limit_fen: int = 0
    remaining_credit_fen: int = 0
    flow_ml_per_min: int = 0
    progress_permille: int = 0
    elapsed_ms: int = 0
    receipt: SessionRecord | None = None
    receipt_balance_fen: int | None = None   # what the person has left after this pour (None: not known here)
    last_rejection: str | None = None     # why the last start was refused (shown a short while, then gone)
    timezone: str = ""                    # the machine's, from the cloud ("" until known: the Pi's own)
    hotline: str = ""
    clear_refusal: str | None = None      # why the last on-site attempt to clear a lockout was refused
    milli_pulses_per_litre: int = 0
    tech_active: bool = False             # a technician's pour has the valve open
    tech_purpose: str = ""
    tech_pulses: int = 0
    tech_volume_ml: int = 0
    tech_elapsed_ms: int = 0
    tech_last: TechPourResult | None = None
    maintenance_idle_ms: int = 0          # how long the maintenance screen has been untouched
    updating_version: str = ""            # the release an update is switching to (state UPDATING)


class DispenserCore:
    """The dispenser's state machine, composed of its parts (see the module's docstring). Not thread-safe: one
    thread (the core thread) calls it."""

    def __init__(self, settings: CoreSettings, *, lockouts: dict[str, str] | None = None,
                 seen_session_ids: tuple[str, ...] | list[str] = ()) -> None:
        self._lockouts = Lockouts(lockouts)
        self._meter = PulseMeter(settings)
        self._alarms = ConditionAlarms(settings, self._lockouts, self._stop_water)
        self._ghost_flow = GhostFlowDetector(settings, self._lockouts)
        self._maintenance = MaintenanceMode(settings)
        self._customer = CustomerSession(settings, self._meter, self._alarms.readings, seen_session_ids)
        self._tech = TechnicianPour(settings, self._meter, self._maintenance)
        self._update = UpdateHold()
        self.settings = settings
        self.online = False
        self.display_price_fen_per_l = settings.display_price_fen_per_l
        self.timezone = ""                 # the machine's, from the cloud ("" until known: the Pi's own)
        self.hotline = ""
        self._now_ms = 0

    # ------------------------------------------------------------------ public
    @property
    def settings(self) -> CoreSettings:
        return self._settings

    @settings.setter
    def settings(self, settings: CoreSettings) -> None:
        """New settings (a new calibration) reach every part at once."""
        self._settings = settings
        for part in (self._meter, self._alarms, self._ghost_flow, self._maintenance, self._customer, self._tech):
            part.settings = settings

    @property
    def state(self) -> State:
        if self._customer.phase is not None:
            return self._customer.phase
        if self._update.active:
            return State.UPDATING
        if self.lockouts:
            return State.OUT_OF_SERVICE
        if self.maintenance:
            return State.MAINTENANCE
        if not self.online:
            return State.OFFLINE
        return State.IDLE

    @property
    def lockouts(self) -> dict[str, str]:
        """The active lockouts: reason -> detail."""
        return self._lockouts.active

    @property
    def maintenance(self) -> bool:
        return self._maintenance.active

    @property
    def updating(self) -> str | None:
        """The release an update holds the machine for (no starts until the restart), or None."""
        return self._update.version

    @property
    def update_refusal(self) -> str | None:
        """Why the last :class:`BeginUpdate` was refused (None: it was accepted)."""
        return self._update.refusal

    @property
    def temp_c(self) -> float | None:
        return self._alarms.readings.temp_c

    @property
    def tds_ppm(self) -> int | None:
        return self._alarms.readings.tds_ppm

    @property
    def tds_measured(self) -> bool:
        return self._alarms.readings.tds_measured

    @property
    def valve_should_be_open(self) -> bool:
        return self._customer.dispensing or self._tech.pouring

    @property
    def session_id(self) -> str | None:
        s = self._customer.current
        return s.grant.session_id if s else None

    @property
    def session_billed_pulses(self) -> int:
        s = self._customer.current
        return s.billed_pulses if s else 0

    @property
    def _ghost(self) -> deque[tuple[int, int]]:
        """The ghost pulses within the ghost window, (ms, pulses) (read by a fault test)."""
        return self._ghost_flow.window

    def handle(self, event: Event, now_ms: int) -> list[Action]:
        """Apply one event at monotonic time ``now_ms``; return the actions to carry out, in order."""
        self._now_ms = now_ms
        handler = _HANDLERS.get(type(event))
        if handler is None:
            raise TypeError(f"unknown event {event!r}")
        return handler(self, event, now_ms)

    def collection_sizes(self) -> dict[str, int]:
        """How many items the core's long-lived collections hold (diagnostics and tests; README, "Bounded
        resources", states each one's bound)."""
        return {**self._customer.collection_sizes(), "ghost_window": len(self._ghost_flow.window),
                "lockouts": len(self._lockouts.active)}

    def snapshot(self) -> Snapshot:
        now, state, readings = self._now_ms, self.state, self._alarms.readings
        return Snapshot(state=state, machine_id=self.settings.machine_id, online=self.online,
                        lockouts=tuple(sorted(self.lockouts)), temp_c=readings.temp_c,
                        display_price_fen_per_l=self.display_price_fen_per_l,
                        tds_ppm=readings.tds_ppm, tds_measured=readings.tds_measured,
                        tds_limit_ppm=self.settings.tds_limit_ppm, clear_refusal=self._lockouts.clear_refusal,
                        timezone=self.timezone, hotline=self.hotline,
                        milli_pulses_per_litre=self.settings.calibration.milli_pulses_per_litre,
                        maintenance_idle_ms=self._maintenance.idle_ms(now),
                        updating_version=self._update.version or "",
                        **self._tech.snapshot_fields(now), **self._customer.snapshot_fields(now, state))

    # ------------------------------------------------------------------ what involves several parts
    def _stop_water(self, end: EndReason, now: int) -> list[Action]:
        """Close the valve for ``end``, whatever pours: a customer's session ends, a technician's pour closes."""
        # with no session dispensing the valve should be closed already: command it again anyway
        actions = self._customer.close(end, now) if self._customer.dispensing else [CloseValve(end.value)]
        if self._tech.pouring:
            actions += self._tech.close("fault", now)
        return actions

    def _fault(self, kind: str, detail: str, now: int) -> list[Action]:
        return [*self._stop_water(EndReason.FAULT, now), *self._lockouts.add(fault_lockout(kind), detail)]

    def _grant_refusal(self, ev: GrantReceived, now: int) -> str | None:
        """Why the machine cannot take this grant now, if it cannot."""
        if self._customer.busy:
            return "busy"
        if self._update.active:
            return "updating"
        if self.lockouts:
            return "out_of_service"
        if self.maintenance:
            return "maintenance"
        if not self.online:
            return "offline"
        return self._customer.grant_problem(ev.grant, now, self.display_price_fen_per_l)

    # ------------------------------------------------------------------ events: customers and the meter
    def _on_grant(self, ev: GrantReceived, now: int) -> list[Action]:
        reason = self._grant_refusal(ev, now)
        if reason is not None:
            return self._customer.refuse(ev.grant, reason, now, self.state)
        return self._customer.start(ev.grant, now, self.state)

    def _on_pulses(self, ev: PulseCount, now: int) -> list[Action]:
        pulses, fault = self._meter.read(ev.total_pulses, now)
        if fault is not None:
            return self._fault("flow_meter", fault, now)
        if not pulses:
            return []
        if self._customer.busy:
            return self._customer.on_pulses(pulses, now)
        if self._tech.current is not None:      # a technician's pour: metered, never billed, not ghost flow
            return self._tech.on_pulses(pulses, now)
        return self._ghost_flow.on_pulses(pulses, now)

    def _on_stop(self, ev: StopPressed, now: int) -> list[Action]:
        if self._customer.dispensing:
            return self._customer.close(EndReason.STOP_BUTTON, now)
        if self._tech.pouring:
            return self._tech.stop(now)         # the button stops a technician's pour too
        self._customer.dismiss_receipt()
        return []

    def _on_cancel(self, ev: CancelReceived, now: int) -> list[Action]:
        if self._customer.dispensing and self.session_id == ev.session_id:
            return self._customer.close(EndReason.CANCELLED, now)
        return [RecordEvent.of(EventKind.CANCEL_IGNORED, session_id=ev.session_id, state=self.state.value)]

    def _on_receipt_dismissed(self, ev: ReceiptDismissed, now: int) -> list[Action]:
        self._customer.dismiss_receipt()
        return []

    def _on_start_failed(self, ev: SessionStartFailed, now: int) -> list[Action]:
        self._customer.start_failed(ev.session_id)
        self._tech.start_failed(ev.session_id)
        return [RecordEvent.of(EventKind.SESSION_START_FAILED, session_id=ev.session_id, detail=ev.detail,
                               fault=ev.kind), *self._fault(ev.kind, ev.detail, now)]

    def _on_tick(self, ev: Tick, now: int) -> list[Action]:
        self._meter.still(now)
        end = self._customer.time_limit(now)
        if end is not None:
            return self._customer.close(end, now)    # everything else waits for the next tick
        actions = self._customer.on_tick(now)
        if self._tech.current is not None:
            actions += self._tech.on_tick(now)
        else:
            actions += self._maintenance.on_tick(now)
        if self._customer.phase is None:
            actions += self._meter.flush(now)
        return actions + self._ghost_flow.on_tick(now) + self._alarms.on_tick(now) + self._update.on_tick(now)

    def _on_shutdown(self, ev: Shutdown, now: int) -> list[Action]:
        actions = self._customer.shutdown(now) + self._tech.shutdown(now)
        actions = [a for a in actions if not isinstance(a, CloseValve)]
        actions.insert(0, CloseValve(ev.reason))        # the valve closes first, whatever else happens
        return actions + self._meter.flush(now, force=True) + self._ghost_flow.flush(now)

    # ------------------------------------------------------------------ events: alarms and lockouts
    def _on_temperature(self, ev: TemperatureReading, now: int) -> list[Action]:
        return self._alarms.on_temperature(ev.temp_c, now)

    def _on_water_quality(self, ev: WaterQualityReading, now: int) -> list[Action]:
        return self._alarms.on_water_quality(ev.tds_ppm, ev.measured, now)

    def _on_low_water(self, ev: LowWater, now: int) -> list[Action]:
        return self._alarms.on_low_water(ev.low)

    def _on_leak(self, ev: LeakSensor, now: int) -> list[Action]:
        return self._alarms.on_leak(ev.wet, now)

    def _on_fault(self, ev: Fault, now: int) -> list[Action]:
        return self._fault(ev.kind, ev.detail, now)

    def _on_out_of_service(self, ev: SetOutOfService, now: int) -> list[Action]:
        # An operator's request lets a running session finish; the machine then rests out of service.
        return self._lockouts.add(LOCKOUT_REMOTE, ev.detail or "taken out of service by an operator")

    def _on_clear(self, ev: ClearLockout, now: int) -> list[Action]:
        was_locked = ev.reason in self.lockouts
        actions = self._lockouts.clear(ev)
        if ev.reason == LOCKOUT_GHOST_FLOW and was_locked and ev.reason not in self.lockouts:
            self._ghost_flow.forget()
        return actions

    # ------------------------------------------------------------------ events: maintenance and technicians
    def _on_enter_maintenance(self, ev: EnterMaintenance, now: int) -> list[Action]:
        if self._update.active:                 # a technician's pour would be cut by the restart too
            return [RecordEvent.of(EventKind.MAINTENANCE_REFUSED, actor=ev.actor,
                                   why="a software update is being installed; try again in a few minutes")]
        actions = self._maintenance.enter(ev.actor, now, session_running=self._customer.busy)
        if self.maintenance:
            self._customer.dismiss_receipt()    # the technician's screen replaces a receipt
        return actions

    def _on_exit_maintenance(self, ev: ExitMaintenance, now: int) -> list[Action]:
        if not self.maintenance:
            return []
        actions = self._tech.end_for_exit(now)
        return actions + self._maintenance.exit(ev.actor)

    def _on_activity(self, ev: MaintenanceActivity, now: int) -> list[Action]:
        return self._maintenance.on_activity(now)

    def _on_tech_pour(self, ev: TechPour, now: int) -> list[Action]:
        return self._tech.start(ev, now, session_running=self._customer.phase is not None,
                                leak_sensor_wet=LOCKOUT_LEAK_SENSOR in self.lockouts)

    def _on_tech_stop(self, ev: TechStop, now: int) -> list[Action]:
        return self._tech.stop(now)

    def _on_set_calibration(self, ev: SetCalibration, now: int) -> list[Action]:
        actions, calibration = self._tech.calibrate(ev, now, session_present=self._customer.phase is not None)
        if calibration is not None:
            self.settings = replace(self.settings, calibration=calibration)
        return actions

    # ------------------------------------------------------------------ events: software updates
    def _update_busy(self, ev: BeginUpdate) -> str | None:
        """Why the machine cannot be restarted for an update now, if it cannot."""
        if self._customer.phase is State.RECEIPT:
            return "a receipt is on the screen"
        if self._customer.phase is not None:
            return f"a session is {self._customer.phase.value}"
        if self.valve_should_be_open:
            return "the valve is open"
        if self.maintenance:
            return "a technician is at the machine"
        if self._update.active and self._update.version != ev.version:
            return f"the update to {self._update.version} holds the machine"
        return None

    def _on_begin_update(self, ev: BeginUpdate, now: int) -> list[Action]:
        return self._update.begin(ev, now, self._update_busy(ev))

    def _on_end_update(self, ev: EndUpdate, now: int) -> list[Action]:
        return self._update.end(ev)

    # ------------------------------------------------------------------ events: the link and the cloud's settings
    def _on_link(self, ev: LinkChanged, now: int) -> list[Action]:
        if ev.online == self.online:
            return []
        self.online = ev.online
        return [RecordEvent.of(EventKind.LINK_UP if ev.online else EventKind.LINK_DOWN)]

    def _on_price(self, ev: PriceChanged, now: int) -> list[Action]:
        if ev.price_fen_per_l < 0:
            return [RecordEvent.of(EventKind.PRICE_REFUSED, price_fen_per_l=ev.price_fen_per_l)]
        old, self.display_price_fen_per_l = self.display_price_fen_per_l, ev.price_fen_per_l
        return [RecordEvent.of(EventKind.PRICE_CHANGED, **{"from": old, "to": ev.price_fen_per_l})]

    def _on_settings(self, ev: MachineSettings, now: int) -> list[Action]:
        actions = self._on_price(PriceChanged(ev.price_fen_per_l), now) \
            if ev.price_fen_per_l != self.display_price_fen_per_l else []
        self.timezone, self.hotline = ev.timezone, ev.hotline
        return actions


_HANDLERS = {
    GrantReceived: DispenserCore._on_grant,
    PulseCount: DispenserCore._on_pulses,
    StopPressed: DispenserCore._on_stop,
    CancelReceived: DispenserCore._on_cancel,
    Tick: DispenserCore._on_tick,
    TemperatureReading: DispenserCore._on_temperature,
    WaterQualityReading: DispenserCore._on_water_quality,
    LowWater: DispenserCore._on_low_water,
    Fault: DispenserCore._on_fault,
    SessionStartFailed: DispenserCore._on_start_failed,
    LeakSensor: DispenserCore._on_leak,
    LinkChanged: DispenserCore._on_link,
    SetOutOfService: DispenserCore._on_out_of_service,
    ClearLockout: DispenserCore._on_clear,
    EnterMaintenance: DispenserCore._on_enter_maintenance,
    ExitMaintenance: DispenserCore._on_exit_maintenance,
    ReceiptDismissed: DispenserCore._on_receipt_dismissed,
    PriceChanged: DispenserCore._on_price,
    Shutdown: DispenserCore._on_shutdown,
    TechPour: DispenserCore._on_tech_pour,
    TechStop: DispenserCore._on_tech_stop,
    SetCalibration: DispenserCore._on_set_calibration,
    MaintenanceActivity: DispenserCore._on_activity,
    MachineSettings: DispenserCore._on_settings,
    BeginUpdate: DispenserCore._on_begin_update,
    EndUpdate: DispenserCore._on_end_update,
}
