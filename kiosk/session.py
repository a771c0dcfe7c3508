"""The dispensing core: a pure state machine that decides when water flows and what it costs.

No Kivy, gpiozero, requests, sqlite or clock reads here. :meth:`DispenserCore.handle` takes one event
(:mod:`kiosk.events`) and the monotonic time ``now_ms`` at which the core thread took it, and returns
the actions to carry out, in order. The UI reads :meth:`DispenserCore.snapshot`.

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
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, replace

from contract.billing import Calibration
from contract.events import EventKind
from kiosk.calibration import MAX_MPPL, MIN_MPPL
from kiosk.config import Config
from kiosk.events import (
    LOCKOUT_GHOST_FLOW,
    LOCKOUT_LEAK_SENSOR,
    LOCKOUT_LOW_WATER,
    LOCKOUT_REMOTE,
    LOCKOUT_TDS,
    LOCKOUT_TEMPERATURE,
    SITE_ONLY_LOCKOUTS,
    TECH_PURPOSES,
    Action,
    AddToTotalizer,
    CancelReceived,
    Checkpoint,
    ClearLockout,
    ClearSource,
    CloseValve,
    EndReason,
    EnterMaintenance,
    Event,
    ExitMaintenance,
    Fault,
    Grant,
    GrantReceived,
    LeakSensor,
    LinkChanged,
    LowWater,
    MachineSettings,
    MaintenanceActivity,
    OpenValve,
    PriceChanged,
    PulseCount,
    ReceiptDismissed,
    RecordEvent,
    SaveCalibration,
    SessionEnded,
    SessionRecord,
    SessionStarted,
    SessionStartFailed,
    SetCalibration,
    SetLockout,
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

FLOW_WINDOW_MS = 1_000          # flow rate shown on screen is averaged over this window
GHOST_LOG_INTERVAL_MS = 60_000  # ghost pulses are logged and reported in batches at most this often (a slow
                                # drip below the lockout threshold still reaches the operators, once a minute)
REJECTION_SHOWN_MS = 10_000     # how long a refused start's reason stays on the screen
SEEN_SESSION_IDS = 10_000       # how many past session ids are remembered to refuse a replayed grant
METER_SLACK_PULSES = 5          # tolerance of the plausibility check for jitter on short intervals


@dataclass(frozen=True)
class CoreSettings:
    """The parts of the configuration the core needs, with units in every name."""

    machine_id: str
    calibration: Calibration
    max_volume_ml: int
    max_duration_ms: int
    max_idle_ms: int
    max_credit_fen: int
    min_dispense_ml: int
    overrun_window_ms: int
    checkpoint_interval_ms: int
    max_flow_ml_per_min: int
    ghost_volume_ml: int
    ghost_window_ms: int
    receipt_display_ms: int
    display_price_fen_per_l: int
    temp_band_min_c: float = 2.0
    temp_band_max_c: float = 35.0
    temp_alarm_after_ms: int = 600_000
    tds_limit_ppm: int = 500
    tds_alarm_after_ms: int = 60_000
    tech_max_ms: int = 120_000            # a technician's pour never lasts longer
    tech_max_ml: int = 10_000             # nor pours more
    maintenance_timeout_ms: int = 600_000  # maintenance ends by itself after this long untouched

    @classmethod
    def from_config(cls, cfg: Config, calibration: Calibration | None = None) -> CoreSettings:
        return cls(
            machine_id=cfg.machine.id,
            calibration=calibration or Calibration.from_pulses_per_litre(cfg.flow.pulses_per_litre),
            max_volume_ml=cfg.limits.max_volume_ml,
            max_duration_ms=cfg.limits.max_duration_ms,
            max_idle_ms=cfg.limits.max_idle_ms,
            max_credit_fen=cfg.limits.max_credit_fen,
            min_dispense_ml=cfg.limits.min_dispense_ml,
            overrun_window_ms=cfg.flow.overrun_window_ms,
            checkpoint_interval_ms=cfg.flow.checkpoint_interval_ms,
            max_flow_ml_per_min=cfg.flow.max_flow_ml_per_min,
            ghost_volume_ml=cfg.leak.ghost_volume_ml,
            ghost_window_ms=cfg.leak.ghost_window_ms,
            receipt_display_ms=cfg.screen.receipt_display_ms,
            display_price_fen_per_l=cfg.pricing.display_price_fen_per_l,
            temp_band_min_c=cfg.sensors.temp_band_min_c,
            temp_band_max_c=cfg.sensors.temp_band_max_c,
            temp_alarm_after_ms=cfg.sensors.temp_alarm_after_ms,
            tds_limit_ppm=cfg.sensors.tds_limit_ppm,
            tds_alarm_after_ms=cfg.sensors.tds_alarm_after_ms,
            tech_max_ms=cfg.maintenance.max_pour_ms,
            tech_max_ml=cfg.maintenance.max_pour_ml,
            maintenance_timeout_ms=cfg.maintenance.timeout_ms,
        )


@dataclass
class _Tech:
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


@dataclass
class _Session:
    grant: Grant
    price_fen_per_l: int
    credit_limit_fen: int
    max_volume_ml: int
    max_duration_ms: int
    max_idle_ms: int
    limit_pulses: int
    limit_reason: EndReason
    started_ms: int
    temp_start_c: float | None
    min_dispense_ml: int
    billed_pulses: int = 0
    overrun_pulses: int = 0
    last_flow_ms: int = 0
    checkpoint_ms: int = 0
    checkpointed: tuple[int, int] = (0, 0)
    closed_ms: int | None = None
    close_reason: EndReason | None = None


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


class DispenserCore:
    """The session state machine. Not thread-safe: one thread (the core thread) calls it."""

    def __init__(self, settings: CoreSettings, *, lockouts: dict[str, str] | None = None,
                 seen_session_ids: tuple[str, ...] | list[str] = ()) -> None:
        self.settings = settings
        self.lockouts: dict[str, str] = dict(lockouts or {})
        self.online = False
        self.maintenance = False
        self.display_price_fen_per_l = settings.display_price_fen_per_l
        self.temp_c: float | None = None
        self.tds_ppm: int | None = None
        self.tds_measured = False
        self._temp_out_since: int | None = None
        self._tds_high_since: int | None = None
        self._phase: State | None = None            # DISPENSING, SETTLING or RECEIPT; None = resting
        self._session: _Session | None = None
        self._receipt: SessionRecord | None = None
        self._receipt_balance_fen: int | None = None
        self._receipt_until_ms = 0
        self._last_total: int | None = None
        self._last_sample_ms = 0
        self._flow_samples: deque[tuple[int, int]] = deque()
        self._ghost: deque[tuple[int, int]] = deque()
        self._ghost_unlogged = 0
        self._ghost_logged_ms = 0
        self._totalizer_pending = 0
        self._totalizer_flushed_ms = 0
        self._seen_order: deque[str] = deque(maxlen=SEEN_SESSION_IDS)
        self._seen: set[str] = set()
        self._last_rejection: str | None = None
        self._rejected_ms = 0
        self._rejection_state: State | None = None
        self.timezone = ""
        self.hotline = ""
        self._clear_refusal: str | None = None
        self._tech: _Tech | None = None
        self._tech_last: TechPourResult | None = None
        self._tech_count = 0
        self._maint_activity_ms = 0
        self._now_ms = 0
        for sid in seen_session_ids:
            self._remember(sid)

    # ------------------------------------------------------------------ public
    @property
    def state(self) -> State:
        if self._phase is not None:
            return self._phase
        if self.lockouts:
            return State.OUT_OF_SERVICE
        if self.maintenance:
            return State.MAINTENANCE
        if not self.online:
            return State.OFFLINE
        return State.IDLE

    @property
    def valve_should_be_open(self) -> bool:
        return self._phase is State.DISPENSING or (self._tech is not None and self._tech.closed_ms is None)

    @property
    def session_id(self) -> str | None:
        return self._session.grant.session_id if self._session else None

    @property
    def session_billed_pulses(self) -> int:
        return self._session.billed_pulses if self._session else 0

    def handle(self, event: Event, now_ms: int) -> list[Action]:
        """Apply one event at monotonic time ``now_ms``; return the actions to carry out, in order."""
        self._now_ms = now_ms
        handler = _HANDLERS.get(type(event))
        if handler is None:
            raise TypeError(f"unknown event {event!r}")
        return handler(self, event, now_ms)

    def snapshot(self) -> Snapshot:
        now = self._now_ms
        base = Snapshot(state=self.state, machine_id=self.settings.machine_id, online=self.online,
                        lockouts=tuple(sorted(self.lockouts)), temp_c=self.temp_c,
                        display_price_fen_per_l=self.display_price_fen_per_l,
                        tds_ppm=self.tds_ppm, tds_measured=self.tds_measured,
                        tds_limit_ppm=self.settings.tds_limit_ppm,
                        receipt=self._receipt if self._phase is State.RECEIPT else None,
                        receipt_balance_fen=self._receipt_balance_fen if self._phase is State.RECEIPT else None,
                        last_rejection=self._shown_rejection(now), clear_refusal=self._clear_refusal,
                        timezone=self.timezone, hotline=self.hotline,
                        milli_pulses_per_litre=self.settings.calibration.milli_pulses_per_litre,
                        tech_last=self._tech_last,
                        maintenance_idle_ms=max(0, now - self._maint_activity_ms) if self.maintenance else 0)
        t = self._tech
        if t is not None:
            cal = self.settings.calibration
            base = replace(base, tech_active=t.closed_ms is None, tech_purpose=t.purpose, tech_pulses=t.pulses,
                           tech_volume_ml=cal.volume_ml(t.pulses),
                           tech_elapsed_ms=max(0, (t.closed_ms if t.closed_ms is not None else now) - t.started_ms))
        s = self._session
        if s is None:
            return base
        cal = self.settings.calibration
        cost = cal.cost_fen(s.billed_pulses, s.price_fen_per_l)
        end = s.closed_ms if s.closed_ms is not None else now
        return replace(
            base, session_id=s.grant.session_id, price_fen_per_l=s.price_fen_per_l,
            volume_ml=cal.volume_ml(s.billed_pulses), volume_ul=cal.volume_ul(s.billed_pulses),
            cost_fen=cost, credit_limit_fen=s.credit_limit_fen,
            remaining_credit_fen=max(0, s.credit_limit_fen - cost),
            flow_ml_per_min=self._flow_rate(now) if s.closed_ms is None else 0,
            progress_permille=min(1000, s.billed_pulses * 1000 // s.limit_pulses) if s.limit_pulses else 0,
            elapsed_ms=max(0, end - s.started_ms))

    # ------------------------------------------------------------------ events
    def _on_grant(self, ev: GrantReceived, now: int) -> list[Action]:
        g = ev.grant
        reason = self._grant_problem(g, now)
        if reason is not None:
            self._reject(reason, now)
            return [RecordEvent.of(EventKind.GRANT_REJECTED, session_id=g.session_id, reason=reason)]
        st = self.settings
        cal = st.calibration
        credit = min(g.credit_limit_fen, st.max_credit_fen)
        max_volume = min(g.max_volume_ml, st.max_volume_ml)
        by_volume = cal.max_pulses_for_volume(max_volume)
        by_credit = cal.max_pulses_for_credit(credit, g.price_fen_per_l)
        if by_credit is not None and by_credit < by_volume:
            limit, limit_reason = by_credit, EndReason.CREDIT_EXHAUSTED
        else:
            limit, limit_reason = by_volume, EndReason.MAX_VOLUME
        min_ml = g.min_dispense_ml if g.min_dispense_ml is not None else st.min_dispense_ml
        if (g.price_fen_per_l > 0 and credit <= 0) or limit <= 0 or cal.volume_ml(limit) < min_ml:
            # not even the minimum dispense is affordable: tell the user to top up (s5), pour nothing
            self._reject("insufficient_credit", now)
            return [RecordEvent.of(EventKind.GRANT_REJECTED, session_id=g.session_id, reason="insufficient_credit")]
        self._remember(g.session_id)
        self._last_rejection = None
        s = _Session(grant=g, price_fen_per_l=g.price_fen_per_l, credit_limit_fen=credit, max_volume_ml=max_volume,
                     max_duration_ms=min(g.max_duration_ms, st.max_duration_ms),
                     max_idle_ms=min(g.max_idle_ms, st.max_idle_ms), limit_pulses=limit,
                     limit_reason=limit_reason, started_ms=now, temp_start_c=self.temp_c,
                     min_dispense_ml=min_ml, last_flow_ms=now, checkpoint_ms=now)
        self._session, self._phase, self._receipt = s, State.DISPENSING, None
        self._flow_samples.clear()
        self._flow_samples.append((now, 0))
        actions: list[Action] = self._flush_totalizer(now, force=True)
        actions += [
            SessionStarted(session_id=g.session_id, user_ref=g.user_ref, price_fen_per_l=s.price_fen_per_l,
                           credit_limit_fen=credit, max_volume_ml=max_volume, max_duration_ms=s.max_duration_ms,
                           max_idle_ms=s.max_idle_ms, limit_pulses=limit,
                           milli_pulses_per_litre=cal.milli_pulses_per_litre, min_dispense_ml=min_ml,
                           started_mono_ms=now, temp_c=self.temp_c),
            OpenValve(g.session_id, close_at_total_pulses=(self._last_total or 0) + limit),
        ]
        return actions

    def _grant_problem(self, g: Grant, now: int) -> str | None:
        if self._phase in (State.DISPENSING, State.SETTLING):
            return "busy"
        if self.lockouts:
            return "out_of_service"
        if self.maintenance:
            return "maintenance"
        if not self.online:
            return "offline"
        if g.machine_id != self.settings.machine_id:
            return "wrong_machine"
        if not g.session_id or g.session_id in self._seen:
            return "duplicate_session"
        if now > g.expires_at_ms:
            return "expired"
        numbers = (g.price_fen_per_l, g.credit_limit_fen, g.max_volume_ml, g.max_duration_ms, g.max_idle_ms)
        if any(not isinstance(n, int) or isinstance(n, bool) for n in numbers) or g.price_fen_per_l < 0 \
                or g.credit_limit_fen < 0 or min(g.max_volume_ml, g.max_duration_ms, g.max_idle_ms) <= 0:
            return "invalid_grant"
        if g.price_fen_per_l != self.display_price_fen_per_l:
            return "price_changed"            # the price on the screen is the price charged, or nothing is
        return None

    def _on_pulses(self, ev: PulseCount, now: int) -> list[Action]:
        total = ev.total_pulses
        if self._last_total is None:
            self._last_total, self._last_sample_ms = total, now
            return []
        delta = total - self._last_total
        elapsed = now - self._last_sample_ms
        self._last_total, self._last_sample_ms = total, now
        if delta == 0:
            return []
        if delta < 0:
            return self._fault("flow_meter", f"pulse counter went backwards by {-delta}", now)
        cal = self.settings.calibration
        plausible = cal.pulses_for_volume_ml(self.settings.max_flow_ml_per_min * max(elapsed, 1) / 60_000) * 1.5
        if delta > plausible + METER_SLACK_PULSES:
            return self._fault("flow_meter", f"{delta} pulses in {elapsed} ms is faster than the plumbing "
                                             f"can flow ({self.settings.max_flow_ml_per_min} ml/min)", now)
        self._totalizer_pending += delta
        s = self._session
        if self._phase is State.DISPENSING and s is not None:
            take = min(delta, s.limit_pulses - s.billed_pulses)
            s.billed_pulses += take
            s.overrun_pulses += delta - take
            s.last_flow_ms = now
            self._flow_samples.append((now, s.billed_pulses + s.overrun_pulses))
            self._flow_rate(now)   # prunes samples older than the window
            if s.billed_pulses >= s.limit_pulses:
                return self._close(s.limit_reason, now)
            return self._maybe_checkpoint(now)
        if self._phase is State.SETTLING and s is not None:
            s.overrun_pulses += delta
            return []
        t = self._tech
        if t is not None:                     # a technician's pour: metered, never billed, not ghost flow
            if t.closed_ms is not None:
                t.overrun_pulses += delta
                return []
            t.pulses += delta
            if t.pulses >= t.target_pulses:
                return self._tech_close(t.target_reason, now)
            return []
        return self._ghost_flow(delta, now)

    def _on_stop(self, ev: StopPressed, now: int) -> list[Action]:
        if self._phase is State.DISPENSING:
            return self._close(EndReason.STOP_BUTTON, now)
        if self._tech is not None and self._tech.closed_ms is None:
            return self._tech_close("stopped", now)        # the button stops a technician's pour too
        if self._phase is State.RECEIPT:
            return self._end_receipt()
        return []

    def _on_cancel(self, ev: CancelReceived, now: int) -> list[Action]:
        if self._phase is State.DISPENSING and self.session_id == ev.session_id:
            return self._close(EndReason.CANCELLED, now)
        return [RecordEvent.of(EventKind.CANCEL_IGNORED, session_id=ev.session_id, state=self.state.value)]

    def _on_tick(self, ev: Tick, now: int) -> list[Action]:
        s = self._session
        actions: list[Action] = []
        if self._phase is State.DISPENSING and s is not None:
            if now - s.started_ms >= s.max_duration_ms:
                return self._close(EndReason.MAX_DURATION, now)
            if now - s.last_flow_ms >= s.max_idle_ms:
                return self._close(EndReason.IDLE, now)
            actions += self._maybe_checkpoint(now)
        elif self._phase is State.SETTLING and s is not None and s.closed_ms is not None:
            if now - s.closed_ms >= self.settings.overrun_window_ms:
                actions += self._finalize(now)
        elif self._phase is State.RECEIPT and now >= self._receipt_until_ms:
            actions += self._end_receipt()
        t = self._tech
        if t is not None and t.closed_ms is None and now - t.started_ms >= t.max_ms:
            actions += self._tech_close("max_time", now)
        elif t is not None and t.closed_ms is not None and now - t.closed_ms >= self.settings.overrun_window_ms:
            actions += self._tech_finish(now)
        elif t is None and self.maintenance and \
                now - self._maint_activity_ms >= self.settings.maintenance_timeout_ms:
            self.maintenance = False
            actions.append(RecordEvent.of(EventKind.MAINTENANCE_EXITED, actor="inactivity"))
        if self._phase is None:
            actions += self._flush_totalizer(now)
        if self._ghost_unlogged and now - self._ghost_logged_ms >= GHOST_LOG_INTERVAL_MS:
            actions.append(self._ghost_log(now))
        if self._temp_out_since is not None or self._tds_high_since is not None:
            actions += self._check_conditions(now)
        return actions

    def _on_temperature(self, ev: TemperatureReading, now: int) -> list[Action]:
        self.temp_c = t = ev.temp_c
        st = self.settings
        if t is None:                       # unknown: the alarm timer neither starts, stops nor restarts
            return []
        if st.temp_band_min_c <= t <= st.temp_band_max_c:
            self._temp_out_since = None
            return self._clear_condition(LOCKOUT_TEMPERATURE, f"tank water back at {t:.1f} C")
        if self._temp_out_since is None:
            self._temp_out_since = now
        return self._check_conditions(now)

    def _on_water_quality(self, ev: WaterQualityReading, now: int) -> list[Action]:
        self.tds_ppm, self.tds_measured = ev.tds_ppm, ev.measured
        if ev.tds_ppm is None:              # unknown: the alarm timer neither starts, stops nor restarts
            return []
        if ev.tds_ppm <= self.settings.tds_limit_ppm:
            self._tds_high_since = None
            return self._clear_condition(LOCKOUT_TDS, f"TDS back at {ev.tds_ppm} mg/L")
        if self._tds_high_since is None:
            self._tds_high_since = now
        return self._check_conditions(now)

    def _on_low_water(self, ev: LowWater, now: int) -> list[Action]:
        if ev.low:
            return self._lock(LOCKOUT_LOW_WATER, "the tank is nearly empty", now, None)
        return self._clear_condition(LOCKOUT_LOW_WATER, "the tank has been refilled")

    def _check_conditions(self, now: int) -> list[Action]:
        st, actions = self.settings, []
        if self._temp_out_since is not None and now - self._temp_out_since >= st.temp_alarm_after_ms \
                and LOCKOUT_TEMPERATURE not in self.lockouts:
            detail = (f"tank water at {self.temp_c:.1f} C, outside the safe band {st.temp_band_min_c:g}-"
                      f"{st.temp_band_max_c:g} C for {(now - self._temp_out_since) // 1000} s")
            actions += self._lock(LOCKOUT_TEMPERATURE, detail, now, None)
        if self._tds_high_since is not None and now - self._tds_high_since >= st.tds_alarm_after_ms \
                and LOCKOUT_TDS not in self.lockouts:
            detail = (f"TDS {self.tds_ppm} mg/L above the limit of {st.tds_limit_ppm} mg/L for "
                      f"{(now - self._tds_high_since) // 1000} s")
            actions += self._lock(LOCKOUT_TDS, detail, now, None)
        return actions

    def _clear_condition(self, reason: str, detail: str) -> list[Action]:
        if reason not in self.lockouts:
            return []
        del self.lockouts[reason]
        return [SetLockout(reason, active=False), RecordEvent.of(EventKind.ALARM_CLEARED, reason=reason,
                                                                 detail=detail)]

    def _on_fault(self, ev: Fault, now: int) -> list[Action]:
        return self._fault(ev.kind, ev.detail, now)

    def _on_start_failed(self, ev: SessionStartFailed, now: int) -> list[Action]:
        s = self._session
        if self._phase is State.DISPENSING and s is not None and s.grant.session_id == ev.session_id:
            self._session, self._phase = None, None     # never on disk, never poured: no bill, no receipt
        t = self._tech
        if t is not None and ev.session_id == f"tech-{self._tech_count}":
            self._tech = None                           # a technician's pour whose log row was not written
            self._tech_last = TechPourResult(purpose=t.purpose, pulses=0, volume_ml=0, duration_ms=0,
                                             reason="not_started")
        actions: list[Action] = [RecordEvent.of(EventKind.SESSION_START_FAILED, session_id=ev.session_id,
                                                    detail=ev.detail, fault=ev.kind)]
        return actions + self._fault(ev.kind, ev.detail, now)

    def _on_leak(self, ev: LeakSensor, now: int) -> list[Action]:
        if not ev.wet:
            return [RecordEvent.of(EventKind.LEAK_SENSOR_DRY, locked_out=LOCKOUT_LEAK_SENSOR in self.lockouts)]
        return self._lock(LOCKOUT_LEAK_SENSOR, "the leak sensor is wet", now, EndReason.LEAK)

    def _on_link(self, ev: LinkChanged, now: int) -> list[Action]:
        if ev.online == self.online:
            return []
        self.online = ev.online
        return [RecordEvent.of(EventKind.LINK_UP if ev.online else EventKind.LINK_DOWN)]

    def _on_out_of_service(self, ev: SetOutOfService, now: int) -> list[Action]:
        # An operator's request lets a running session finish; the machine then rests out of service.
        return self._lock(LOCKOUT_REMOTE, ev.detail or "taken out of service by an operator", now, None)

    def _on_clear(self, ev: ClearLockout, now: int) -> list[Action]:
        info = {"reason": ev.reason, "source": ev.source.value, "actor": ev.actor}
        if ev.ref:
            info["ref"] = ev.ref
        if ev.source is ClearSource.SITE:
            self._clear_refusal = None
        if ev.reason in self.lockouts and ev.refused_why:
            if ev.source is ClearSource.SITE:
                self._clear_refusal = ev.refused_why
            return [RecordEvent.of(EventKind.LOCKOUT_CLEAR_REFUSED, **info, why=ev.refused_why)]
        if ev.reason not in self.lockouts:
            return [RecordEvent.of(EventKind.LOCKOUT_CLEAR_IGNORED, **info, why="not locked out for this reason")]
        if ev.reason in SITE_ONLY_LOCKOUTS and ev.source is not ClearSource.SITE:
            return [RecordEvent.of(EventKind.LOCKOUT_CLEAR_REFUSED, **info,
                                   why="must be cleared on site after inspection")]
        del self.lockouts[ev.reason]
        if ev.reason == LOCKOUT_GHOST_FLOW:
            self._ghost.clear()
        return [SetLockout(ev.reason, active=False), RecordEvent.of(EventKind.LOCKOUT_CLEARED, **info)]

    def _on_enter_maintenance(self, ev: EnterMaintenance, now: int) -> list[Action]:
        if self._phase in (State.DISPENSING, State.SETTLING):
            return [RecordEvent.of(EventKind.MAINTENANCE_REFUSED, actor=ev.actor, why="a session is running")]
        self._maint_activity_ms = now
        if self.maintenance:
            return []
        self.maintenance = True
        actions = self._end_receipt() if self._phase is State.RECEIPT else []
        return [*actions, RecordEvent.of(EventKind.MAINTENANCE_ENTERED, actor=ev.actor)]

    def _on_exit_maintenance(self, ev: ExitMaintenance, now: int) -> list[Action]:
        if not self.maintenance:
            return []
        actions: list[Action] = []
        if self._tech is not None:
            if self._tech.closed_ms is None:
                actions += self._tech_close("exit", now)
            actions += self._tech_finish(now)
        self.maintenance = False
        return [*actions, RecordEvent.of(EventKind.MAINTENANCE_EXITED, actor=ev.actor)]

    def _on_activity(self, ev: MaintenanceActivity, now: int) -> list[Action]:
        if self.maintenance:
            self._maint_activity_ms = now
        return []

    # ------------------------------------------------------------------ technicians' pours and calibration
    def _on_tech_pour(self, ev: TechPour, now: int) -> list[Action]:
        st = self.settings
        why = None
        if not self.maintenance:
            why = "the machine is not in maintenance mode"
        elif self._phase is not None:
            why = "a session is running"
        elif self._tech is not None:
            why = "a pour is already running"
        elif LOCKOUT_LEAK_SENSOR in self.lockouts:
            why = "the leak sensor is wet: inspect and clear it first"
        elif ev.purpose not in TECH_PURPOSES:
            why = f"unknown purpose {ev.purpose!r}"
        elif ev.target_ml is not None and not 1 <= ev.target_ml <= st.tech_max_ml:
            why = f"the target must be 1 to {st.tech_max_ml} ml"
        elif ev.max_ms <= 0:
            why = "the time limit must be positive"
        if why is not None:
            return [RecordEvent.of(EventKind.TECH_POUR_REFUSED, purpose=ev.purpose, actor=ev.actor, why=why)]
        cal = st.calibration
        volume = ev.target_ml if ev.target_ml is not None else st.tech_max_ml
        target = cal.max_pulses_for_volume(volume)
        self._tech_count += 1
        self._maint_activity_ms = now
        self._tech = _Tech(purpose=ev.purpose, actor=ev.actor, started_ms=now, target_pulses=target,
                           target_reason="target" if ev.target_ml is not None else "max_volume",
                           max_ms=min(ev.max_ms, st.tech_max_ms), milli_pulses_per_litre=cal.milli_pulses_per_litre)
        info = {"purpose": ev.purpose, "actor": ev.actor, "target_ml": ev.target_ml, "max_ms": self._tech.max_ms}
        return [RecordEvent.of(EventKind.TECH_POUR_STARTED, **info, required=True),     # on disk before the valve opens
                OpenValve(f"tech-{self._tech_count}", close_at_total_pulses=(self._last_total or 0) + target)]

    def _on_tech_stop(self, ev: TechStop, now: int) -> list[Action]:
        if self._tech is None or self._tech.closed_ms is not None:
            return []
        return self._tech_close("stopped", now)

    def _tech_close(self, reason: str, now: int) -> list[Action]:
        t = self._tech
        assert t is not None and t.closed_ms is None
        t.closed_ms, t.reason = now, reason
        actions: list[Action] = [CloseValve(f"technician's pour: {reason}")]
        if self.settings.overrun_window_ms == 0:
            actions += self._tech_finish(now)
        return actions

    def _tech_finish(self, now: int) -> list[Action]:
        t = self._tech
        assert t is not None and t.closed_ms is not None
        pulses = t.pulses + t.overrun_pulses
        self._tech_last = TechPourResult(purpose=t.purpose, pulses=pulses,
                                         volume_ml=self.settings.calibration.volume_ml(pulses),
                                         duration_ms=t.closed_ms - t.started_ms, reason=t.reason)
        self._tech = None
        self._maint_activity_ms = now
        return [RecordEvent.of(EventKind.TECH_POUR, purpose=t.purpose, actor=t.actor, pulses=pulses,
                               overrun_pulses=t.overrun_pulses, volume_ml=self._tech_last.volume_ml,
                               duration_ms=self._tech_last.duration_ms, reason=t.reason,
                               milli_pulses_per_litre=t.milli_pulses_per_litre, billed=False)]

    def _on_set_calibration(self, ev: SetCalibration, now: int) -> list[Action]:
        old = self.settings.calibration.milli_pulses_per_litre
        why = None
        if not self.maintenance:
            why = "the machine is not in maintenance mode"
        elif self._phase is not None or self._tech is not None:
            why = "water is flowing"
        elif not MIN_MPPL <= ev.milli_pulses_per_litre <= MAX_MPPL:
            why = f"{ev.milli_pulses_per_litre} milli-pulses per litre is outside any real meter's range"
        if why is not None:
            return [RecordEvent.of(EventKind.CALIBRATION_REFUSED, actor=ev.actor, why=why)]
        self.settings = replace(self.settings, calibration=Calibration(ev.milli_pulses_per_litre))
        self._maint_activity_ms = now
        return [SaveCalibration(ev.milli_pulses_per_litre),
                RecordEvent.of(EventKind.CALIBRATION_CHANGED, **{"from": old, "to": ev.milli_pulses_per_litre},
                               actor=ev.actor, pours=[list(p) for p in ev.pours])]

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

    def _reject(self, reason: str, now: int) -> None:
        self._last_rejection, self._rejected_ms, self._rejection_state = reason, now, self.state

    def _shown_rejection(self, now: int) -> str | None:
        """A refusal is shown to the person it concerns: for REJECTION_SHOWN_MS, and only while the machine stays
        in the state it was refused in (the next customer never sees it)."""
        if self._last_rejection is None:
            return None
        if now - self._rejected_ms > REJECTION_SHOWN_MS or self.state is not self._rejection_state:
            return None
        return self._last_rejection

    def _on_receipt_dismissed(self, ev: ReceiptDismissed, now: int) -> list[Action]:
        return self._end_receipt() if self._phase is State.RECEIPT else []

    def _on_shutdown(self, ev: Shutdown, now: int) -> list[Action]:
        actions: list[Action] = []
        if self._phase is State.DISPENSING:
            actions += self._close(EndReason.SHUTDOWN, now)
        if self._phase is State.SETTLING:
            actions += self._finalize(now)
        if self._tech is not None:
            if self._tech.closed_ms is None:
                self._tech.closed_ms, self._tech.reason = now, "shutdown"
            actions += self._tech_finish(now)
        actions = [a for a in actions if not isinstance(a, CloseValve)]
        actions.insert(0, CloseValve(ev.reason))        # the valve closes first, whatever else happens
        actions += self._flush_totalizer(now, force=True)
        if self._ghost_unlogged:
            actions.append(self._ghost_log(now))
        return actions

    # ------------------------------------------------------------------ helpers
    def _close(self, reason: EndReason, now: int) -> list[Action]:
        s = self._session
        assert s is not None and self._phase is State.DISPENSING
        s.closed_ms, s.close_reason = now, reason
        self._phase = State.SETTLING
        actions: list[Action] = [CloseValve(reason.value), self._checkpoint(now, closing=True)]
        if self.settings.overrun_window_ms == 0:
            actions += self._finalize(now)
        return actions

    def _finalize(self, now: int) -> list[Action]:
        s = self._session
        assert s is not None and s.closed_ms is not None and s.close_reason is not None
        cal, st = self.settings.calibration, self.settings
        volume = cal.volume_ml(s.billed_pulses)
        below = volume < s.min_dispense_ml
        record = SessionRecord(
            session_id=s.grant.session_id, user_ref=s.grant.user_ref, reason=s.close_reason.value,
            started_mono_ms=s.started_ms, closed_mono_ms=s.closed_ms, ended_mono_ms=now,
            price_fen_per_l=s.price_fen_per_l, credit_limit_fen=s.credit_limit_fen,
            milli_pulses_per_litre=cal.milli_pulses_per_litre, billed_pulses=s.billed_pulses,
            overrun_pulses=s.overrun_pulses, volume_ml=volume,
            cost_fen=0 if below else cal.cost_fen(s.billed_pulses, s.price_fen_per_l),
            below_minimum=below, temp_start_c=s.temp_start_c, temp_end_c=self.temp_c,
            tds_ppm=self.tds_ppm, tds_measured=self.tds_measured, tds_limit_ppm=st.tds_limit_ppm)
        pending, self._totalizer_pending = self._totalizer_pending, 0
        self._totalizer_flushed_ms = now
        self._session, self._receipt = None, record
        b = s.grant.balance_fen
        self._receipt_balance_fen = None if b is None else max(0, b - record.cost_fen)
        self._phase, self._receipt_until_ms = State.RECEIPT, now + st.receipt_display_ms
        return [SessionEnded(record, totalizer_pulses=pending)]

    def _end_receipt(self) -> list[Action]:
        self._phase, self._receipt = None, None
        return []

    def _checkpoint(self, now: int, closing: bool = False) -> Checkpoint:
        s = self._session
        assert s is not None
        pending, self._totalizer_pending = self._totalizer_pending, 0
        s.checkpoint_ms, s.checkpointed = now, (s.billed_pulses, s.overrun_pulses)
        return Checkpoint(session_id=s.grant.session_id, mono_ms=now, billed_pulses=s.billed_pulses,
                          overrun_pulses=s.overrun_pulses, temp_c=self.temp_c, valve_open=not closing,
                          totalizer_pulses=pending,
                          closing_reason=s.close_reason.value if closing and s.close_reason else None)

    def _maybe_checkpoint(self, now: int) -> list[Action]:
        s = self._session
        assert s is not None
        if now - s.checkpoint_ms < self.settings.checkpoint_interval_ms:
            return []
        if s.checkpointed == (s.billed_pulses, s.overrun_pulses):
            return []
        return [self._checkpoint(now)]

    def _flush_totalizer(self, now: int, force: bool = False) -> list[Action]:
        if not self._totalizer_pending:
            return []
        if not force and now - self._totalizer_flushed_ms < self.settings.checkpoint_interval_ms:
            return []
        pending, self._totalizer_pending = self._totalizer_pending, 0
        self._totalizer_flushed_ms = now
        return [AddToTotalizer(pending)]

    def _ghost_flow(self, pulses: int, now: int) -> list[Action]:
        st = self.settings
        self._ghost.append((now, pulses))
        self._ghost_unlogged += pulses
        while self._ghost and now - self._ghost[0][0] > st.ghost_window_ms:
            self._ghost.popleft()
        ghost_ml = st.calibration.volume_ml(sum(p for _, p in self._ghost))
        if ghost_ml > st.ghost_volume_ml and LOCKOUT_GHOST_FLOW not in self.lockouts:
            detail = (f"{ghost_ml} ml flowed with the valve closed within "
                      f"{st.ghost_window_ms // 1000} s (leak or stuck valve)")
            return [self._ghost_log(now), *self._lock(LOCKOUT_GHOST_FLOW, detail, now, None)]
        return []

    def _ghost_log(self, now: int) -> RecordEvent:
        pulses, self._ghost_unlogged, self._ghost_logged_ms = self._ghost_unlogged, 0, now
        return RecordEvent.of(EventKind.GHOST_FLOW, pulses=pulses,
                              volume_ml=self.settings.calibration.volume_ml(pulses))

    def _fault(self, kind: str, detail: str, now: int) -> list[Action]:
        return self._lock(fault_lockout(kind), detail, now, EndReason.FAULT)

    def _lock(self, reason: str, detail: str, now: int, end: EndReason | None) -> list[Action]:
        actions: list[Action] = []
        if end is not None and self._phase is State.DISPENSING:
            actions += self._close(end, now)
        elif end is not None:
            actions.append(CloseValve(end.value))   # should be closed already: command it again anyway
        if end is not None and self._tech is not None and self._tech.closed_ms is None:
            actions += self._tech_close("fault", now)
        if reason not in self.lockouts:
            self.lockouts[reason] = detail
            actions += [SetLockout(reason, active=True, detail=detail),
                        RecordEvent.of(EventKind.LOCKOUT, reason=reason, detail=detail)]
        return actions

    def _flow_rate(self, now: int) -> int:
        samples = self._flow_samples
        while len(samples) > 2 and now - samples[1][0] >= FLOW_WINDOW_MS:
            samples.popleft()
        if len(samples) < 2 or now <= samples[0][0]:
            return 0
        (t0, p0), (_, p1) = samples[0], samples[-1]
        return self.settings.calibration.volume_ul(p1 - p0) * 60 // (now - t0)

    def _remember(self, session_id: str) -> None:
        if len(self._seen_order) == self._seen_order.maxlen:
            self._seen.discard(self._seen_order[0])
        self._seen_order.append(session_id)
        self._seen.add(session_id)


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
}
