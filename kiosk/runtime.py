"""The core thread: one event queue into the pure core, actions carried out against hal and the ledger.

Threads that produce events (gpiozero callbacks, the network, the UI, the simulator) only call
:meth:`Runtime.post`. The core thread samples the pulse counter every ``flow.sample_interval_ms``,
hands each event to :class:`~kiosk.session.DispenserCore` with the monotonic time, and carries out the
returned actions in order. Fail-safe rules:

* The valve is commanded closed before anything else at boot, and in a ``finally`` at exit.
* If a ledger write fails, the valve closes at once, any ``OpenValve`` left in that batch is dropped
  (a session or technician's pour whose row was not written never pours), and the core gets a
  ``storage`` fault, which locks the machine out of service. Clearing that lockout first re-tests the
  ledger with a real write (:meth:`~kiosk.ledger.Ledger.probe_write`); while it fails the clear is
  refused with the reason.
* A valve or meter that raises (a GPIO error) is a ``valve`` fault, anything else an ``internal`` one:
  each has its own lockout, and neither stops the ledger from being written.
* Listeners get the actions that were *carried out* (an ``OpenValve`` whose valve did not open is not
  among them), so nothing is acknowledged that did not happen.
* The meter is sampled right before a grant or a technician's pour is handled, so pulses that came
  just before it are ghost flow, not the new session's; and after the valve opens the armed limit is
  checked against the fresh count.
* If the valve is open while the core says it should not be, it is closed (checked every loop).
* A software update asks for its hold (:meth:`Runtime.begin_update`) and waits for the core thread's answer:
  the core checks it is idle and starts refusing starts in the one step, so nothing can open the valve between
  "idle" and the restart the update then asks for.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass, field, replace

from contract.billing import Calibration
from contract.events import EventKind
from kiosk.config import Config
from kiosk.events import (
    UPDATE_HOLD_MS,
    Action,
    AddToTotalizer,
    BeginUpdate,
    Checkpoint,
    ClearLockout,
    ClearSource,
    CloseValve,
    EndUpdate,
    Event,
    Fault,
    GrantReceived,
    OpenValve,
    PulseCount,
    RecordEvent,
    SaveCalibration,
    SessionEnded,
    SessionStarted,
    SessionStartFailed,
    SetLockout,
    SetOutOfService,
    Shutdown,
    StopPressed,
    TechPour,
    Tick,
    fault_lockout,
)
from kiosk.ledger import Ledger, LedgerError
from kiosk.ports import Clock, FlowMeter, Valve
from kiosk.session import CoreSettings, DispenserCore, Snapshot
from kiosk.version import running_version

log = logging.getLogger("tapshare.runtime")

STORAGE_LOCKOUT = fault_lockout("storage")
ADMIN_POLL_MS = 1_000
PRUNE_INTERVAL_MS = 3_600_000


CALIBRATION_KEY = "milli_pulses_per_litre"
IDLE_SAMPLE_MS = 100          # the core thread's cadence between sessions


@dataclass
class BootReport:
    ledger_error: str | None
    recovered: list
    lockouts: dict[str, str]


@dataclass
class _Ask:
    """An event posted with a reply: the core thread feeds it, then sets ``answer`` and ``done``."""

    event: BeginUpdate
    done: threading.Event = field(default_factory=threading.Event)
    answer: str | None = "the core thread did not answer"


class Runtime:
    """Owns the core; :meth:`run` is the core thread's body."""

    def __init__(self, cfg: Config, core: DispenserCore, ledger: Ledger | None, valve: Valve,
                 meter: FlowMeter, clock: Clock, *, trace: Callable[[dict], None] | None = None,
                 events: queue.Queue | None = None) -> None:
        self.cfg, self.core, self.ledger, self.valve, self.meter, self.clock = cfg, core, ledger, valve, meter, clock
        self.ledger_ok = ledger is not None
        self._events: queue.Queue[Event] = events if events is not None else queue.Queue()
        self._stopping = threading.Event()
        self._stopped = threading.Event()
        self._trace = trace
        self._last_total: int | None = None
        self._admin_polled_ms = 0
        self._pruned_ms = 0
        self.snapshot: Snapshot = core.snapshot()
        self.listeners: list[Callable[[Snapshot, list[Action]], None]] = []
        self.loop_count = 0

    # ------------------------------------------------------------------ other threads
    def post(self, event: Event) -> None:
        """Queue an event for the core thread (safe from any thread)."""
        self._events.put(event)

    def begin_update(self, version: str, *, hold_ms: int = UPDATE_HOLD_MS, timeout_s: float = 5.0) -> str | None:
        """Ask the core for an update's hold and wait for its answer (safe from any thread): ``None`` when the
        machine was idle and now refuses every start until the restart, :meth:`end_update` or ``hold_ms`` later;
        otherwise why not. A core thread that does not answer within ``timeout_s`` is a refusal (and the hold, if
        it is granted late, is ended at once: an ``EndUpdate`` is queued right behind the request)."""
        ask = _Ask(BeginUpdate(version, hold_ms))
        self._events.put(ask)       # type: ignore[arg-type]  (the core thread tells an _Ask from an event)
        if not ask.done.wait(timeout_s):
            self._events.put(EndUpdate(version, "no_answer"))
            return f"the core thread did not answer within {timeout_s:g} s"
        return ask.answer

    def end_update(self, version: str, reason: str = "ended") -> None:
        """The switch did not happen: lift the update's hold, if it still holds (safe from any thread)."""
        self._events.put(EndUpdate(version, reason))

    def stop_pressed(self) -> None:
        """The stop button's edge callback: the valve closes here and now, then the core is told.
        Closing is always safe, whatever the core's state; the bill is settled on the core thread."""
        self._safe_close_valve()
        self._events.put(StopPressed())

    def request_stop(self, reason: str = "shutdown") -> None:
        """Ask the core thread to end any session, close the valve and return (safe from signal handlers)."""
        if not self._stopping.is_set():
            self._stopping.set()
            self._events.put(Shutdown(reason))

    def wait_stopped(self, timeout_s: float | None = None) -> bool:
        return self._stopped.wait(timeout_s)

    # ------------------------------------------------------------------ core thread
    def run(self) -> None:
        sample_s = self.cfg.flow.sample_interval_ms / 1000
        idle_s = max(sample_s, IDLE_SAMPLE_MS / 1000)
        try:
            self._sample_meter()
            while True:
                # between sessions the meter is sampled less often (ghost flow is counted, not timed, so nothing
                # is missed); events (a grant, the stop button) still wake the thread at once
                busy = self.core.session_id is not None or self.valve.is_open
                try:
                    event = self._events.get(timeout=sample_s if busy else idle_s)
                except queue.Empty:
                    event = None
                while event is not None:
                    if isinstance(event, _Ask):
                        self._answer(event)
                    else:
                        self._feed(event)
                    if isinstance(event, Shutdown):
                        return
                    try:
                        event = self._events.get_nowait()
                    except queue.Empty:
                        event = None
                self._sample_meter()
                self._feed(Tick())
                self._housekeeping()
                self._enforce_valve()
                self.loop_count += 1
        finally:
            self._safe_close_valve()
            self.snapshot = self.core.snapshot()
            self._stopped.set()

    def _answer(self, ask: _Ask) -> None:
        ev = ask.event
        try:
            if self.valve.is_open:             # whatever the core believes, water that may flow is not idle
                ev = replace(ev, refused_why="the valve is open")
            self._feed(ev)
            ask.answer = None if self.core.updating == ev.version else (self.core.update_refusal or "refused")
        finally:
            ask.done.set()

    def _sample_meter(self) -> None:
        try:
            total = self.meter.total_pulses()
        except Exception as e:  # a meter that cannot be read is a fault, never a reason to keep pouring
            log.exception("flow meter read failed")
            self._feed(Fault("flow_meter", f"cannot read the pulse counter: {e}"))
            return
        if total != self._last_total:
            self._last_total = total
            self._feed(PulseCount(total))

    def _feed(self, event: Event) -> None:
        if isinstance(event, (GrantReceived, TechPour)):
            self._sample_meter()              # pulses before the grant are not the session's
        now = self.clock.monotonic_ms()
        if isinstance(event, ClearLockout) and event.reason == STORAGE_LOCKOUT and not event.refused_why:
            why = self._retry_storage()
            if why:
                event = replace(event, refused_why=why)
        try:
            actions = self.core.handle(event, now)
        except Exception as e:
            log.exception("core failed on %r", event)
            self._safe_close_valve()
            if isinstance(event, Fault) and event.kind == "internal":
                raise
            self._feed(Fault("internal", f"core error on {type(event).__name__}: {e!r}"))
            return
        if self._trace is not None and isinstance(event, PulseCount) and self.core.session_id:
            # printed before the ledger is written: the trace is never behind the disk
            self._trace({"t": "pulses", "session": self.core.session_id,
                         "billed": self.core.session_billed_pulses})
        done = self._execute(actions)
        self.snapshot = self.core.snapshot()
        if actions or not isinstance(event, (Tick, PulseCount)):
            for fn in self.listeners:
                try:
                    fn(self.snapshot, done)
                except Exception:      # an observer (sync, UI) must never take the core thread down
                    log.exception("listener %r failed", fn)

    def _execute(self, actions: list[Action]) -> list[Action]:
        """Carry out ``actions`` in order; returns those that were carried out."""
        done: list[Action] = []
        storage: LedgerError | None = None
        failures: list[tuple[str, str]] = []           # (fault kind, detail), fed to the core afterwards
        not_started: tuple[str, str, str] | None = None  # (session id, detail, fault kind) of a valve never opened
        for a in actions:
            if isinstance(a, OpenValve) and (storage is not None or failures):
                log.error("not opening the valve for %s: what had to precede it failed", a.session_id)
                if not_started is None:
                    kind = "storage" if storage is not None else failures[0][0]
                    not_started = (a.session_id, str(storage) if storage is not None else failures[0][1], kind)
                continue
            try:
                if self._do(a) is not False:
                    done.append(a)
            except LedgerError as e:
                storage = storage or e
                self._safe_close_valve()
                log.error("ledger write failed, valve closed, machine out of service: %s", e)
            except Exception as e:
                self._safe_close_valve()
                kind = "valve" if isinstance(a, (OpenValve, CloseValve)) else "internal"
                failures.append((kind, f"{type(a).__name__} failed: {e!r}"))
                log.exception("action %r failed (%s fault); valve closed", a, kind)
                if isinstance(a, OpenValve) and not_started is None and a.session_id.startswith("tech-"):
                    not_started = (a.session_id, failures[-1][1], kind)
        if not_started is not None:
            sid, detail, kind = not_started
            if storage is not None:
                self.ledger_ok = False
            self._feed(SessionStartFailed(sid, detail, kind=kind))
        elif storage is not None and self.ledger_ok:
            self.ledger_ok = False
            self._feed(Fault("storage", str(storage)))
        for kind, detail in failures:
            if not_started is None or kind != not_started[2]:
                self._feed(Fault(kind, detail))
        return done

    def _do(self, a: Action) -> bool | None:
        """Carry out one action; ``False`` when it was deliberately not carried out."""
        if isinstance(a, CloseValve):
            self._safe_close_valve()
            self.meter.arm_limit(None)
            log.info("valve closed (%s)", a.reason)
            return
        if isinstance(a, OpenValve):
            if self.meter.total_pulses() >= a.close_at_total_pulses:
                log.warning("not opening the valve for %s: the meter is already at its limit", a.session_id)
                return False
            self.meter.arm_limit(a.close_at_total_pulses)
            self.valve.open()
            if self.meter.total_pulses() >= a.close_at_total_pulses:   # reached between the arm and the open
                self._safe_close_valve()
            log.info("valve opened for session %s (closes at pulse %d)", a.session_id, a.close_at_total_pulses)
            return
        ledger = self.ledger
        if not self.ledger_ok or ledger is None:
            if isinstance(a, SessionStarted) or (isinstance(a, RecordEvent) and a.required):
                raise LedgerError("the ledger is unavailable (storage fault)")
            log.warning("ledger unavailable, not recorded: %r", a)
            return
        if isinstance(a, SessionStarted):
            ledger.start_session(a)
            self._emit({"t": "started", "session": a.session_id})
        elif isinstance(a, Checkpoint):
            ledger.checkpoint(a)
            self._emit({"t": "checkpoint", "session": a.session_id, "billed": a.billed_pulses})
        elif isinstance(a, SessionEnded):
            event_id = ledger.end_session(a)
            r = a.record
            log.info("session %s ended (%s): %d ml, %d fen, report %s", r.session_id, r.reason, r.volume_ml,
                     r.cost_fen, event_id)
            self._emit({"t": "ended", "session": r.session_id, "billed": r.billed_pulses, "reason": r.reason,
                        "cost_fen": r.cost_fen})
        elif isinstance(a, AddToTotalizer):
            ledger.add_to_totalizer(a.pulses)
        elif isinstance(a, RecordEvent):
            ledger.record_event(a.kind, a.detail, report=a.report)
            if a.kind in (EventKind.LOCKOUT, EventKind.GRANT_REJECTED, EventKind.LOCKOUT_CLEARED,
                          EventKind.LOCKOUT_CLEAR_REFUSED):
                log.warning("%s: %s", a.kind, a.detail)
        elif isinstance(a, SetLockout):
            ledger.set_lockout(a.reason, a.active, a.detail)
        elif isinstance(a, SaveCalibration):
            ledger.set_setting(CALIBRATION_KEY, a.milli_pulses_per_litre)
            log.warning("flow meter calibration is now %d milli-pulses per litre", a.milli_pulses_per_litre)
        else:  # pragma: no cover - a new action type without an executor is a programming error
            raise TypeError(f"no executor for {a!r}")

    def _emit(self, record: dict) -> None:
        if self._trace is not None:
            self._trace(record)

    def _safe_close_valve(self) -> None:
        try:
            self.valve.close()
        except Exception:  # pragma: no cover - hal close() must not raise; log loudly if it does
            log.critical("VALVE CLOSE FAILED", exc_info=True)

    def _enforce_valve(self) -> None:
        if self.valve.is_open and not self.core.valve_should_be_open:
            log.error("valve was open outside a session: closing it")
            self._safe_close_valve()

    def _retry_storage(self) -> str | None:
        """Before a storage lockout is cleared: a real write test. Returns why it cannot be cleared, or None."""
        if self.ledger is None:
            return "the ledger could not be opened at start: replace or repair it, then restart the machine"
        try:
            self.ledger.probe_write()
            self.ledger.record(EventKind.STORAGE_RETRY, ok=True)
            for r in self.ledger.recover_open_sessions(keep=self.core.session_id):
                log.warning("closed session %s left open by the storage fault (%s)", r.session_id, r.reason)
        except LedgerError as e:
            log.error("storage lockout not cleared, the ledger still fails: %s", e)
            self.ledger_ok = False
            return f"the ledger still cannot be written: {e}"
        self.ledger_ok = True
        return None

    def _housekeeping(self) -> None:
        now = self.clock.monotonic_ms()
        if self.ledger is None:
            return
        if now - self._admin_polled_ms >= ADMIN_POLL_MS:       # also after a storage fault: a clear may be queued
            self._admin_polled_ms = now
            try:
                for cmd in self.ledger.take_admin_commands():
                    self._admin(cmd)
            except LedgerError as e:
                log.error("cannot read admin commands: %s", e)
        if self.ledger_ok and now - self._pruned_ms >= PRUNE_INTERVAL_MS:
            self._pruned_ms = now
            try:
                pruned = self.ledger.prune(event_log_max_rows=self.cfg.ledger.event_log_max_rows,
                                           retention_days=self.cfg.ledger.retention_days)
                if any(pruned.values()):
                    log.info("pruned %s", pruned)
            except LedgerError as e:
                log.error("prune failed: %s", e)

    def _admin(self, cmd: dict) -> None:
        name, args = cmd["command"], cmd["args"]
        log.warning("admin command %s %s", name, args)
        if name == "clear_lockout":
            self._feed(ClearLockout(args["reason"], ClearSource.SITE, actor=args.get("actor", "cli")))
        elif name == "out_of_service":
            self._feed(SetOutOfService(args.get("detail", "")))
        else:
            log.error("unknown admin command %r", name)


def boot(cfg: Config, valve: Valve, meter: FlowMeter, clock: Clock, *,
         trace: Callable[[dict], None] | None = None, events: queue.Queue | None = None,
         lockouts: dict[str, str] | None = None) -> tuple[Runtime, BootReport]:
    """The start-up sequence: valve closed first, ledger opened and recovered, then the core built.

    A ledger that cannot be opened does not stop the machine from starting: it starts out of service
    with the valve closed and says why.
    """
    valve.close()
    ledger: Ledger | None = None
    error: str | None = None
    recovered = []
    extra = dict(lockouts or {})
    lockouts = {}
    seen: list[str] = []
    try:
        ledger = Ledger.open(cfg.db_path, machine_id=cfg.machine.id, wall_clock=clock.wall_ms,
                             software_version=running_version(), mono_clock=clock.monotonic_ms)
        recovered = ledger.recover_open_sessions()
        for r in recovered:
            log.warning("session %s was left open (%s): closed, billed %d fen from its last checkpoint",
                        r.session_id, r.reason, r.cost_fen)
        lockouts = ledger.lockouts()
        seen = ledger.recent_session_ids()
        ledger.record(EventKind.BOOT, version=running_version(), boot_id=ledger.boot_id,
                      recovered_sessions=[r.session_id for r in recovered], totalizer_pulses=ledger.totalizer_pulses())
    except LedgerError as e:
        error = str(e)
        log.error("LEDGER UNAVAILABLE, machine out of service: %s", e)
        lockouts[STORAGE_LOCKOUT] = error
        if ledger is not None:
            ledger.close()
            ledger = None
    lockouts.update(extra)
    calibration = None
    if ledger is not None:
        mppl = ledger.setting(CALIBRATION_KEY)
        if isinstance(mppl, int) and mppl > 0:
            calibration = Calibration(mppl)          # the technician's calibration beats the config's default
    core = DispenserCore(CoreSettings.from_config(cfg, calibration=calibration), lockouts=lockouts,
                         seen_session_ids=seen)
    rt = Runtime(cfg, core, ledger, valve, meter, clock, trace=trace, events=events)
    return rt, BootReport(ledger_error=error, recovered=recovered, lockouts=lockouts)
